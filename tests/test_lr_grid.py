"""The adaptation-lr grid reaches past a choice at its edge (issue 18: the grid must reach past the chosen
value on both sides), tuned on meta-val scores only."""

from __future__ import annotations

import math

import pytest

from metaprep.bench.harness import tune_lr


def bowl(optimum: float):
    """A meta-val score with its minimum at ``optimum`` (quadratic in log lr), and the lrs it was asked for."""
    asked: list[float] = []

    def score(lr: float) -> float:
        asked.append(lr)
        return (math.log10(lr) - math.log10(optimum)) ** 2

    return score, asked


def test_an_interior_choice_keeps_the_grid():
    score, asked = bowl(1e-3)
    lr, scores = tune_lr((3e-4, 1e-3, 3e-3), score, extend=2)
    assert lr == 1e-3 and asked == [3e-4, 1e-3, 3e-3] and set(scores) == {3e-4, 1e-3, 3e-3}


def test_the_grid_grows_below_its_lowest_point_until_the_choice_is_interior():
    score, asked = bowl(1e-4)
    lr, scores = tune_lr((3e-4, 1e-3, 3e-3), score, extend=3)
    assert asked[3:] == [9e-5, 2.7e-5]  # ratio 1e-3 / 3e-4 per step; 9e-5 is then interior: stop
    assert lr == 9e-5 and scores[9e-5] < scores[3e-4] and scores[9e-5] < scores[2.7e-5]


def test_the_grid_grows_above_its_highest_point():
    score, asked = bowl(1e-1)
    lr, _ = tune_lr((1e-3, 3e-3, 1e-2), score, extend=2)
    assert asked[3:] == [pytest.approx(3.3e-2), pytest.approx(0.11)] and lr == pytest.approx(0.11)


def test_the_extension_is_bounded_and_can_be_turned_off():
    score, asked = bowl(1e-8)
    lr, scores = tune_lr((3e-4, 1e-3), score, extend=2)
    assert asked[2:] == [9e-5, 2.7e-5] and lr == 2.7e-5  # two more points, still at the edge: stop
    score, asked = bowl(1e-8)
    assert tune_lr((3e-4, 1e-3), score, extend=0)[0] == 3e-4 and asked == [3e-4, 1e-3]


def test_a_diverged_top_edge_is_not_extended_and_one_point_cannot_be():
    lr, scores = tune_lr((1e-3, 1e-2), lambda lr: math.inf if lr > 5e-3 else 1.0, extend=2)
    assert lr == 1e-3 and set(scores) == {1e-3, 1e-2, 1e-4}  # the low edge won: the grid grew downward only
    score, asked = bowl(1e-5)
    assert tune_lr((1e-3,), score, extend=2) == (1e-3, {1e-3: pytest.approx(4.0)}) and asked == [1e-3]

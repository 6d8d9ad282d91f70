"""The protocol of each LM benchmark suite: a YAML recipe under ``jobs/configs/bench/``.

A recipe (its header gives the commands that use it) has up to three sections, each a mapping of
:class:`Protocol` fields:

* ``protocol`` — every field, for the model the suite is sized for (stories260K, a llama2.c
  checkpoint, on 2 shared CPU cores; the MiniLM scorer for ``convai2_mc_encoder.yaml``);
* ``large_model`` — the fields replaced for any other model (SmolLM2-135M: shorter episodes, fewer
  meta-steps and methods, fast weights on attention q/v only; fp32, since bf16 autocast pays only on
  CPUs with native bf16 GEMMs, and then far less than the GEMM speed-up); absent = no change;
* ``quick`` — the fields replaced by ``--quick`` (tests, smoke checks: 2 methods, 1 seed, tiny
  budgets), applied after ``large_model``.

:func:`protocol_for` picks the suite's recipe (:data:`SUITE_RECIPES`); ``--seeds``, ``--meta-steps``
and ``--methods`` (or ``$METAPREP_BENCH_METHODS``) then override the result. Recipes load through
:func:`metaprep.config.load_yaml` / :func:`~metaprep.config.from_dict`, so a wrong key or type is
reported with ``file:line``, and :meth:`Protocol.validate` checks ranges and method names against
the algorithm registry.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from metaprep.config import apply_overrides, from_dict, load_yaml
from metaprep.errors import ConfigError
from metaprep.meta.algorithm import ALGORITHMS
from metaprep.models.base import detect_kind, resolve_path

RECIPES = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "bench"
SUITE_RECIPES = {"persona": "persona.yaml", "multidomain": "multidomain.yaml",
                 "summarization": "summarization.yaml",
                 "convai2_mc": "persona.yaml"}  # the causal-LM scorer: the persona split and episodes
ENCODER_RECIPE = "convai2_mc_encoder.yaml"  # convai2_mc with the sentence-encoder scorer
SECTIONS = ("protocol", "large_model", "quick")
METHODS_ENV = "METAPREP_BENCH_METHODS"
PRECISIONS = ("fp32", "bf16")
REFERENCE = "finetune"  # every run includes it: the reference of steps_to_match


@dataclass(frozen=True)
class Protocol:
    """The budget every method of one suite run shares; fixed before any test task is seen."""

    shots: int  # support examples per task (k)
    query_size: int  # query examples per task
    seq_len: int  # tokens per example (prompts keep their end, targets their start)
    adapt_steps: int  # adaptation steps at meta-val and meta-test (same for all methods)
    lr_grid: tuple[float, ...]  # adaptation lr candidates (Adam-style inner update), tuned on meta-val
    inner_lr: float  # meta-training inner lr, fixed a priori
    inner_steps: int  # meta-training inner steps (T_in)
    support_weight: float  # meta.support_weight of the episodic methods (0 = the papers' objective)
    meta_steps: int  # outer steps of every meta-trained method
    meta_batch_size: int  # tasks per outer step
    outer_lr: float  # AdamW on the slow weights
    rank: int  # r of LoRA/TARP
    alpha: float  # scale of the low-rank update (scale = alpha / r)
    tarp_kind: str  # the reparam kind of the algorithms that need a TARP kind
    targets: tuple[str, ...]  # wrapped layers; () = the config default (all attention + FFN)
    val_tasks: int  # meta-val tasks used for lr tuning
    test_tasks: int  # cap on test tasks (0 = all)
    eval_chunk: int  # test tasks adapted together in one batched inner loop
    seeds: int
    methods: tuple[str, ...]  # algorithm names, in run (and table) order; finetune included
    precision: str  # bf16 = autocast
    threads: int  # torch intra-op threads
    max_new_tokens: int  # > 0: greedy generation (summarization)
    shard_size: int  # examples per summarization task shard
    max_shards: int  # shards per meta-training summarization domain
    test_shards: int  # test tasks (shards) per held-out summarization domain
    lr_grid_extend: int  # points the lr grid may grow past an end of it that meta-val picks

    def validate(self, where: Callable[[str], str] = str) -> Protocol:
        """Range checks that types alone cannot express; ``where(key)`` names the key in an error."""
        def need(key: str, ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"{where(key)}: {what}, got {getattr(self, key)!r}")

        for key, tp in typing.get_type_hints(Protocol).items():
            if tp is int:
                low = 0 if key in ("test_tasks", "max_new_tokens", "lr_grid_extend") else 1
                need(key, getattr(self, key) >= low, f"must be >= {low}")
            elif tp is float and key == "support_weight":
                need(key, math.isfinite(self.support_weight) and self.support_weight >= 0,
                     "must be a finite number >= 0")
            elif tp is float:
                need(key, _finite_positive(getattr(self, key)), "must be a finite number > 0")
        need("lr_grid", bool(self.lr_grid) and all(map(_finite_positive, self.lr_grid)),
             "must be a non-empty list of finite numbers > 0")
        need("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}")
        from metaprep.reparam.kinds import REPARAM_KINDS

        tarp = [name for name, kind in REPARAM_KINDS.items() if kind.tarp]
        need("tarp_kind", self.tarp_kind in tarp, f"must be a TARP kind ({', '.join(tarp)})")
        need("methods", valid_methods(self.methods),
             f"must be registered algorithms ({', '.join(ALGORITHMS)}), optionally ALGO+KEY=VALUE variants, "
             f"each once, including {REFERENCE} (the reference of steps_to_match)")
        return self


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def split_method(method: str) -> tuple[str, list[str]]:
    """A method is an algorithm name, optionally with config overrides: ``ALGO+KEY=VALUE+...``
    (e.g. ``mltd+meta.inner_steps=5+meta.support_weight=1``), so variants of one algorithm are
    compared paired, on the same episodes, in one run. Returns (algorithm, overrides)."""
    algorithm, *overrides = method.split("+")
    return algorithm.strip(), [o.strip() for o in overrides]


def method_override(method: str, key: str) -> str | None:
    """The value ``method`` sets for config ``key`` with a ``+key=value`` override (the last one wins), or None
    (e.g. ``method_override("multitask+meta.meta_steps=130", "meta.meta_steps") == "130"``)."""
    values = [value for name, _, value in (o.partition("=") for o in split_method(method)[1])
              if name.strip() == key]
    return values[-1].strip() if values else None


def method_config_error(method: str) -> str | None:
    """Why ``method`` is not a valid method, or None (the overrides are checked as config keys)."""
    from metaprep.config import MetaTrainConfig, load_config

    algorithm, overrides = split_method(method)
    if algorithm not in ALGORITHMS:
        return f"unknown algorithm {algorithm!r}"
    from metaprep.reparam.kinds import REPARAM_KINDS

    kind = next(k for k, v in REPARAM_KINDS.items() if v.tarp == ALGORITHMS[algorithm].needs_tarp)
    try:  # the harness sets the reparam kind and budget; the overrides are checked on top
        load_config(MetaTrainConfig, None, [f"algorithm={algorithm}", f"reparam.kind={kind}",
                                            "meta.meta_steps=1000000", *overrides])
    except ConfigError as exc:
        return f"{method}: {exc}"
    return None


def valid_methods(methods: tuple[str, ...]) -> bool:
    """Registered algorithms (optionally ``+KEY=VALUE`` variants), finetune (the reference of
    steps_to_match) among them, no method twice."""
    return (all(method_config_error(m) is None for m in methods) and REFERENCE in methods
            and len(set(methods)) == len(methods))


# from_dict builds list fields; Protocol is frozen with tuples: read it through a twin with lists
_LISTED = dataclasses.make_dataclass("Protocol", [
    (name, list[typing.get_args(tp)[0]] if typing.get_origin(tp) is tuple else tp)
    for name, tp in typing.get_type_hints(Protocol).items()])


def load_protocol(path: str | Path, large_model: bool = False, quick: bool = False,
                  overrides: typing.Sequence[str] = ()) -> Protocol:
    """The recipe's ``protocol``, with its ``large_model`` and then ``quick`` sections applied when asked, then
    ``overrides`` (``KEY=VALUE`` protocol keys from ``jobs.benchmark --set``, values parsed as YAML scalars)."""
    data, lines = load_yaml(path)
    source = str(path)
    names = [f.name for f in dataclasses.fields(Protocol)]
    for section, values in data.items():  # every section, also those this call does not apply
        if section not in SECTIONS:
            raise ConfigError(f"{source}:{lines[section]}: unknown section {section!r}; valid sections: "
                              f"{', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}:{lines[section]}: {section}: expected a mapping of protocol keys, "
                              f"got {values!r}")
        for key in values:
            if key not in names:
                raise ConfigError(f"{source}:{lines[f'{section}.{key}']}: unknown key '{section}.{key}'; valid "
                                  f"keys here: {', '.join(names)}")
    missing = [name for name in names if name not in data.get("protocol", {})]
    if missing:
        raise ConfigError(f"{source}:{lines.get('protocol', 1)}: protocol: missing {', '.join(missing)} "
                          f"(the protocol section sets every key)")
    values, at = {}, {}
    for section in ("protocol", *(["large_model"] if large_model else []), *(["quick"] if quick else [])):
        for key, value in data.get(section, {}).items():
            values[key] = value
            at[key] = at[f"{key}[]"] = lines[f"{section}.{key}"]  # from_dict names list items key[]
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in names:
            raise ConfigError(f"--set {item}: unknown protocol key {key!r}; valid keys: {', '.join(names)}")
        apply_overrides(values, [item])
        at[key] = at[f"{key}[]"] = f"--set {item}"  # errors name the flag, not the recipe's line
    listed = from_dict(_LISTED, values, source, at)
    proto = Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(listed).items()})
    return proto.validate(lambda key: f"{at[key]}: {key}" if isinstance(at[key], str) else f"{source}:{at[key]}: {key}")


def protocol_for(suite: str, model_path: str, quick: bool, seeds: int | None, methods: str | None = None,
                 meta_steps: int | None = None, encoder: bool = False,
                 overrides: typing.Sequence[str] = ()) -> Protocol:
    """The suite's protocol for this model (its recipe: :data:`SUITE_RECIPES`); ``quick`` = tiny budgets.

    ``methods`` (comma-separated; else ``$METAPREP_BENCH_METHODS``) and ``meta_steps`` override the
    suite's method list and meta-training budget (e.g. longer runs of a few methods). ``encoder``: the
    convai2_mc sentence-encoder scorer (:data:`ENCODER_RECIPE`). ``overrides``: any protocol key,
    ``KEY=VALUE`` (``jobs.benchmark --set precision=bf16``), applied before those three.
    """
    if suite not in SUITE_RECIPES:
        raise ConfigError(f"suite {suite!r} has no protocol recipe; LM suites: {', '.join(SUITE_RECIPES)}")
    recipe = RECIPES / (ENCODER_RECIPE if encoder else SUITE_RECIPES[suite])
    proto = load_protocol(recipe, large_model=not _is_llama2c(model_path), quick=quick, overrides=overrides)
    if seeds is not None:
        proto = replace(proto, seeds=seeds)
    if meta_steps is not None:
        proto = replace(proto, meta_steps=meta_steps)
    source, listed = ("--methods", methods) if methods else (f"${METHODS_ENV}", os.environ.get(METHODS_ENV))
    if listed:
        proto = replace(proto, methods=parse_methods(listed, source))
    return proto


def parse_methods(listed: str, source: str = "--methods") -> tuple[str, ...]:
    """A comma-separated method list of registered algorithms; it must include finetune."""
    chosen = tuple(m.strip() for m in listed.split(",") if m.strip())
    if not valid_methods(chosen):
        bad = next((e for e in map(method_config_error, chosen) if e), None)
        raise ConfigError(f"{source}: {listed!r}{f' ({bad})' if bad else ''}; expected a comma-separated subset "
                          f"of {', '.join(ALGORITHMS)} (each optionally ALGO+KEY=VALUE+...), each once, "
                          f"that includes {REFERENCE} (the reference of steps_to_match)")
    return chosen


def _is_llama2c(model_path: str) -> bool:
    try:
        return detect_kind(resolve_path(model_path)) == "llama2c"
    except Exception:  # unknown kinds get the large-model protocol; loading reports the real error
        return False

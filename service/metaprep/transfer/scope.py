"""Restricting the candidate configurations: ``--scope KEY=VALUE[,VALUE...]`` and ``--finetune-only``.

A scope keeps the candidates whose field KEY has one of the VALUEs; several scopes must all hold.
Numbers match numerically (``r=8`` matches 8.0), text case-insensitively, a list-valued field by its
JSON text (``--scope 'opt_betas=[0.9, 0.999]'``, one value per flag). The surrogate is still
fitted on the whole meta-dataset: a scope narrows what is *recommended*, not what is learnt from.

From scratch vs finetuning. NMTLC marks a from-scratch run by ``basemodel`` ``"scratch"`` (its
``task`` is ``"scratch"`` exactly then; finetunes name the pretrained model, ``bloomz`` or ``xglm``),
and a generic meta-dataset may follow the same convention. ``--finetune-only`` drops those
configurations; every Quick-Tune configuration finetunes a pretrained ``model``, so there it drops
nothing (and says so).
"""

from __future__ import annotations

import json

from metaprep.errors import ConfigError
from metaprep.transfer.metadataset import ConfigValue

BASE_FIELDS = ("basemodel", "base_model", "model")  # fields naming what a run starts from
SCRATCH = "scratch"  # the value of such a field for a run from random initialisation
SHOWN_VALUES = 12  # a field with more distinct values is summarised as a range


def parse_scope(items: list[str]) -> dict[str, list[str]]:
    """``["basemodel=bloomz,xglm", "r=8"]`` -> ``{"basemodel": ["bloomz", "xglm"], "r": ["8"]}`` (syntax only)."""
    scope: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        # a JSON list or object value (Quick-Tune's opt_betas=[0.9, 0.999]) is one value, commas and all
        wanted = [values.strip()] if values.strip().startswith(("[", "{")) else [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(wanted):
            raise ConfigError(f"--scope {item!r}: expected KEY=VALUE[,VALUE...], e.g. --scope basemodel=bloomz,xglm")
        scope.setdefault(key.strip(), []).extend(wanted)
    return scope


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: object) -> str:
    """A non-numeric value as the text a user types (a list or object of a ``--candidates`` file as JSON)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def field_values(configs: list[dict]) -> dict[str, list[ConfigValue]]:
    """Each configuration field's distinct values over ``configs``, sorted (numbers before text)."""
    values: dict[str, set] = {}
    for config in configs:
        for key, value in config.items():
            values.setdefault(key, set()).add(float(value) if _is_number(value) else _text(value))
    return {k: sorted(v, key=lambda x: (0, x, "") if _is_number(x) else (1, 0.0, x)) for k, v in sorted(values.items())}


def value_summary(values: list[ConfigValue]) -> dict:
    """A field's values for JSON: all of them, or a long numeric list as its range (a long text list: the first)."""
    if len(values) <= SHOWN_VALUES:
        return {"values": values}
    if all(_is_number(v) for v in values):
        return {"min": min(values), "max": max(values), "n_values": len(values)}
    return {"values": values[:SHOWN_VALUES], "n_values": len(values)}


def describe_summary(summary: dict) -> str:
    """A :func:`value_summary` as text: ``bloomz, scratch, xglm``; a long numeric list ``1e-05 .. 0.01 (40 values)``."""
    if "min" in summary:
        return f"{summary['min']:g} .. {summary['max']:g} ({summary['n_values']} values)"
    shown = ", ".join(f"{v:g}" if _is_number(v) else str(v) for v in summary["values"])
    return shown + (f", ... ({summary['n_values']} values)" if "n_values" in summary else "")


def describe_values(values: list[ConfigValue]) -> str:
    return describe_summary(value_summary(values))


def matches(value: ConfigValue | None, wanted: str) -> bool:
    """Whether a configuration value is the scope value ``wanted`` (module docstring)."""
    if _is_number(value):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    return value is not None and _text(value).casefold() == wanted.casefold()


def base_field(configs: list[dict]) -> str | None:
    """The field of ``configs`` that names what a run starts from (:data:`BASE_FIELDS`), None when none does."""
    present = {k for c in configs for k in c}
    return next((f for f in BASE_FIELDS if f in present), None)


def apply_scope(configs: list[dict], scope: dict[str, list[str]], finetune_only: bool = False
                ) -> tuple[list[dict], list[str]]:
    """The candidates of ``configs`` inside ``scope`` (and not from scratch with ``finetune_only``), plus notes
    for the user; a one-line :class:`ConfigError` naming the flag for an unknown field or value."""
    values = field_values(configs)
    notes: list[str] = []
    for key, wanted in scope.items():
        if key not in values:
            raise ConfigError(f"--scope {key}=...: unknown configuration field {key!r}; fields: {', '.join(values)}")
        for w in wanted:
            if not any(matches(v, w) for v in values[key]):
                raise ConfigError(f"--scope {key}={w}: no candidate has {key} {w!r}; its values: "
                                  f"{describe_values(values[key])}")
    kept = [c for c in configs if all(any(matches(c.get(k), w) for w in ws) for k, ws in scope.items())]
    if finetune_only:
        field = base_field(configs)
        if field is None:
            raise ConfigError(f"--finetune-only: no configuration field names a base model ({', '.join(BASE_FIELDS)}), "
                              f"so none is marked as trained from scratch; fields: {', '.join(values)}; "
                              "narrow with --scope KEY=VALUE instead")
        before = len(kept)
        kept = [c for c in kept if not matches(c.get(field), SCRATCH)]
        if len(kept) == before:
            notes.append(f"--finetune-only: no candidate trains from scratch ({field} is never {SCRATCH!r}); "
                         "nothing dropped")
    if not kept:
        flags = [f"--scope {k}={','.join(ws)}" for k, ws in scope.items()] + (["--finetune-only"] * finetune_only)
        raise ConfigError(f"{' '.join(flags)}: no candidate configuration matches all of them; values per field: "
                          + "; ".join(f"{k}: {describe_values(values[k])}" for k in scope))
    return kept, notes

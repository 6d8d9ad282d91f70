"""Champion promotion: ``champion`` moves to a candidate only if it wins on the same meta-val episodes.

Both models are scored here with the same code on the recipe's meta-validation tasks, each adapted
with its own prepared inner-loop settings (:func:`score_prepared`). The key of a score names those
episodes (:func:`val_set_key`): scores are comparable iff their keys are equal. Each score is recorded
as the version tag ``score.<key>``; :func:`comparison` applies the rule (:data:`RULE`) and
:func:`apply_comparison` records the decision on the candidate (``champion_comparison``, strict JSON: a
score that is missing or not finite is ``null`` and ``why_null`` says why) and moves the alias on both
registered models. The sweep promotes through :func:`compare_and_promote`; ``jobs.promote`` lists,
compares and moves through :func:`prepared_versions`, :func:`compare_versions` and :func:`move_champion`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from metaprep.config import MetaTrainConfig
from metaprep.errors import RegistryError
from metaprep.jsonio import is_finite_number
from metaprep.registry.client import mlflow_client
from metaprep.registry.register import KINDS

METRIC = "meta_val_loss"  # mean meta-validation query loss after adaptation, lower is better
ALIASES = ("champion", "candidate")
RULE = ("champion moves to a candidate only if the candidate's meta-val loss (mean query loss after adapting "
        "to each meta-validation task, lower is better) is strictly lower than the champion's on the same "
        "meta-val episodes (same tasks, shots, query size, sequence length and seed); the first version becomes "
        "champion; a champion whose score is not finite is replaced; one that cannot be evaluated is kept")


def val_set_key(cfg: MetaTrainConfig, split) -> str:
    """Names the meta-validation episodes (tasks, shots, query size, seed): scores are comparable iff equal."""
    from metaprep.tasks.base import fingerprint

    ident = json.dumps([fingerprint(split.val[: cfg.meta.eval_tasks]), cfg.tasks.shots, cfg.tasks.query_size,
                        cfg.tasks.seq_len, cfg.seed])
    return f"{METRIC}.valset-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def score_prepared(base_dir: Path, ctrl_dir: Path, cfg: MetaTrainConfig, split) -> float:
    """Meta-val loss of a prepared model on the recipe's meta-val episodes, adapted with its own inner settings."""
    import torch

    from metaprep.registry.artifacts import load_prepared
    from metaprep.tasks.base import fixed_episodes
    from metaprep.tasks.families import batch_encoder_for
    from metaprep.train.loop import evaluate

    model, loaded, own = load_prepared(base_dir, ctrl_dir)
    eps = fixed_episodes(split.val[: cfg.meta.eval_tasks], cfg.tasks.shots, cfg.tasks.query_size, cfg.seed)
    encode = batch_encoder_for(own)
    support = encode(eps, "support", loaded.tokenizer, cfg.tasks.seq_len)
    query = encode(eps, "query", loaded.tokenizer, cfg.tasks.seq_len)
    torch.manual_seed(cfg.seed)
    return float(evaluate(model, own, support, query))


# --------------------------------------------------------------------------- the rule, in plain words


def _num(v: float) -> str:
    return f"{v:.4g}"


def decide(candidate: float | None, champion_version: str | None, champion: float | None) -> tuple[bool, str]:
    """:data:`RULE`: whether the candidate takes ``champion``, and why in plain words."""
    if not is_finite_number(candidate):
        return False, f"the candidate has no finite meta-val loss ({candidate})"
    if champion_version is None:
        return True, "no champion yet"
    if not is_finite_number(champion):
        return True, f"champion v{champion_version} has no finite meta-val loss ({champion}) on these episodes"
    if candidate < champion:
        return True, f"meta-val {_num(candidate)} < champion v{champion_version} {_num(champion)} on the same episodes"
    return False, f"meta-val {_num(candidate)} >= champion v{champion_version} {_num(champion)} on the same episodes"


def comparison(key: str, candidate_version: str, candidate: float | None, champion_version: str | None,
               champion: float | None, *, error: str | None = None, forced: bool = False) -> dict[str, Any]:
    """The comparison record (the ``champion_comparison`` tag): both scores, the decision and its reason.

    ``error``: the champion could not be evaluated, so it is kept. ``forced``: move ``champion`` whatever the
    scores say (``jobs.promote --to V --force``). Scores that are missing or not finite are ``None``, and
    ``why_null`` says why."""
    if error is not None:
        wins, reason = False, f"champion v{champion_version} could not be evaluated ({error})"
    else:
        wins, reason = decide(candidate, champion_version, champion)
    why_null = {}
    if not is_finite_number(candidate):
        why_null["candidate"] = f"not finite ({candidate})" if candidate is not None else "not scored"
    if champion_version is None:
        why_null["champion"] = "no champion yet"
    elif not is_finite_number(champion):
        why_null["champion"] = (f"could not be evaluated ({error})" if error else
                                f"not finite ({champion})" if champion is not None else "not scored")
    record = {"metric": key, "candidate_version": candidate_version,
              "candidate": candidate if is_finite_number(candidate) else None, "champion_version": champion_version,
              "champion": champion if is_finite_number(champion) else None, "promoted": wins or forced,
              "wins": wins, "reason": reason, "rule": RULE}
    if forced:
        record["forced"] = True
    if error is not None:
        record["error"] = error
    if why_null:
        record["why_null"] = why_null
    return record


def verdict(record: dict, applied: bool = True) -> str:
    """One line: what happened to ``champion`` and why (what the sweep and ``jobs.promote`` print);
    ``applied=False``: what would happen (a comparison that moves nothing)."""
    cand, champ, why = record["candidate_version"], record["champion_version"], record["reason"]
    if champ is not None and champ == cand:
        return f"v{cand} is already champion"
    if record.get("forced") and not record["wins"]:
        return (f"moved champion to v{cand} by --force although it does not win: {why}" if applied else
                f"v{cand} does not win; --force would move champion to it anyway: {why}")
    if record["promoted"]:
        if champ is None:
            return (f"first version: v{cand} is champion (there was no champion before)" if applied else
                    f"v{cand} would become champion: there is no champion yet")
        return f"promoted v{cand} to champion: {why}" if applied else f"v{cand} wins and would take champion: {why}"
    if champ is None:
        return f"v{cand} not promoted: {why}" if applied else f"v{cand} would not become champion: {why}"
    return f"kept champion v{champ}: {why}" if applied else f"champion v{champ} would stay: {why}"


def tag_json(value: Any) -> str:
    """Strict JSON (``NaN``/``Infinity`` would make the tag unreadable to every JSON parser): non-finite
    floats become ``null``; records built by :func:`comparison` say why in ``why_null``."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, sort_keys=True)


def apply_comparison(client, name: str, versions: dict[str, str], record: dict) -> None:
    """Record ``record`` on the candidate (``versions``: kind -> version) and move ``champion`` if it says so."""
    for kind in KINDS:
        model = f"{name}-{kind}"
        if record["candidate"] is not None:
            client.set_model_version_tag(model, versions[kind], f"score.{record['metric']}",
                                         f"{record['candidate']:.6g}")
        client.set_model_version_tag(model, versions[kind], "champion_comparison", tag_json(record))
        if record["promoted"]:
            client.set_registered_model_alias(model, "champion", versions[kind])


def _by_alias(client, model: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


def compare_and_promote(uri: str, cfg: MetaTrainConfig, split, uris: dict, export: Path) -> dict:
    """Score candidate (``export``, registered as ``uris``) and champion on the same meta-val episodes;
    move ``champion`` if the candidate wins. Returns the comparison record (also a version tag)."""
    from metaprep.registry.resolve import resolve_artifact

    client = mlflow_client(uri)
    name = cfg.registry.name
    key = val_set_key(cfg, split)
    versions = {kind: uris[f"{kind}_version"] for kind in KINDS}
    candidate = score_prepared(export / "base", export / "controller", cfg, split)
    champion = _by_alias(client, f"{name}-base", "champion")
    champ_score, error = None, None
    if champion is not None:
        try:
            champ_score = score_prepared(resolve_artifact(f"models:/{name}-base@champion", uri),
                                         resolve_artifact(f"models:/{name}-controller@champion", uri), cfg, split)
        except Exception as exc:  # noqa: BLE001 - any load/eval failure: keep the champion, record why
            error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        else:
            champs = {kind: _by_alias(client, f"{name}-{kind}", "champion") for kind in KINDS}
            _record_score(client, name, {k: mv.version for k, mv in champs.items() if mv is not None}, key,
                          champ_score)
    record = comparison(key, versions["base"], candidate, str(champion.version) if champion else None,
                        champ_score, error=error)
    apply_comparison(client, name, versions, record)
    return record


def _record_score(client, name: str, versions: dict[str, str], key: str, score: float) -> None:
    """Tag both models' ``versions`` (kind -> version) with their score on the episodes ``key``."""
    if not is_finite_number(score):
        return
    for kind, version in versions.items():
        client.set_model_version_tag(f"{name}-{kind}", version, f"score.{key}", f"{score:.6g}")


# --------------------------------------------------------------------------- jobs.promote: list, compare, move

def _registered(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    from metaprep.registry.names import check_model_name

    check_model_name(name, "--name")
    missing = []
    for kind in KINDS:
        try:
            client.get_registered_model(f"{name}-{kind}")
        except MlflowException:
            missing.append(f"{name}-{kind}")
    if missing:
        known = sorted({m.name.rsplit("-", 1)[0] for m in client.search_registered_models(max_results=1000)
                        if m.name.endswith("-base")})
        raise RegistryError(f"--name {name}: no registered model {' or '.join(missing)}; prepared models here: "
                            f"{', '.join(known) or 'none'} (jobs.meta_train and jobs.sweep register NAME-base and "
                            f"NAME-controller, NAME being registry.name)")


def _scores(tags: dict) -> dict[str, float]:
    out = {}
    for k, v in tags.items():
        if k.startswith("score."):
            try:
                out[k.removeprefix("score.")] = float(v)
            except ValueError:
                continue
    return out


def _comparison_tag(tags: dict) -> dict | None:
    raw = tags.get("champion_comparison")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"unreadable": raw[:200]}


def prepared_versions(uri: str, name: str) -> list[dict]:
    """Every version of ``NAME-base`` (newest first) with its aliases, recorded scores and comparison."""
    client = mlflow_client(uri)
    _registered(client, name)
    aliases = client.get_registered_model(f"{name}-base").aliases or {}  # version searches leave them out
    out = []
    for mv in client.search_model_versions(f"name='{name}-base'", max_results=10000):
        out.append({"version": str(mv.version), "aliases": sorted(a for a in ALIASES
                                                                  if str(aliases.get(a)) == str(mv.version)),
                    "run_id": mv.run_id, "scores": _scores(mv.tags), "meta_val_loss_end": mv.tags.get(
                        "meta_val_loss_end"), "champion_comparison": _comparison_tag(mv.tags)})
    return sorted(out, key=lambda v: -int(v["version"]))


def find_version(client, name: str, ref: str) -> dict[str, Any]:
    """``ref`` (3, v3, champion or candidate) as ``{kind: ModelVersion}``: the base version and the controller
    version registered by the same run; a one-line error naming the valid versions otherwise."""
    from mlflow.exceptions import MlflowException

    _registered(client, name)
    base, ref = f"{name}-base", str(ref)
    plain = ref[1:] if ref[:1] in "vV" and ref[1:].isdigit() else ref
    if plain.isdigit():
        try:
            mv = client.get_model_version(base, plain)
        except MlflowException:
            mv = None
    else:
        mv = _by_alias(client, base, plain)
    if mv is None:
        versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{base}'")), reverse=True)
        raise RegistryError(f"version {ref!r}: {base} has no such version or alias; versions: "
                            f"{', '.join(map(str, versions)) or 'none'}; aliases: {', '.join(ALIASES)} (if set)")
    found = client.search_model_versions(f"name='{name}-controller' and run_id='{mv.run_id}'")
    if not found:
        raise RegistryError(f"version {ref!r}: {base} v{mv.version} has no {name}-controller version registered "
                            f"by the same run ({mv.run_id}); it cannot be scored or promoted")
    return {"base": mv, "controller": found[0]}


def _pick_key(cand: dict, champ: dict, cand_tags: dict) -> str | None:
    common = sorted(set(cand) & set(champ))
    if not common:
        return None
    previous = (_comparison_tag(cand_tags) or {}).get("metric")
    return previous if previous in common else common[0]


def compare_versions(uri: str, name: str, ref: str = "candidate", cfg: MetaTrainConfig | None = None,
                     split=None, *, force: bool = False) -> dict:
    """Version ``ref`` against the champion on the same meta-val episodes: the comparison record, plus
    ``source`` (``recorded``: both scores are ``score.<key>`` tags; ``scored``: missing ones were scored now
    with ``cfg``'s episodes, and recorded) and ``versions`` (kind -> candidate version)."""
    from metaprep.registry.resolve import resolve_artifact

    client = mlflow_client(uri)
    cand = find_version(client, name, ref)
    champ = _by_alias(client, f"{name}-base", "champion")
    champ_pair = find_version(client, name, champ.version) if champ is not None else None
    versions = {kind: str(mv.version) for kind, mv in cand.items()}
    cand_scores = _scores(cand["base"].tags)
    champ_scores = _scores(champ.tags) if champ is not None else {}
    if cfg is not None:
        key = val_set_key(cfg, split)
    else:  # without a recipe: a key both have recorded (with no champion: any the candidate has)
        key = _pick_key(cand_scores, champ_scores if champ is not None else cand_scores, cand["base"].tags)
        if key is None:
            what = (f"v{versions['base']} and champion v{champ.version} have no score on the same meta-val episodes"
                    if champ is not None else f"v{versions['base']} has no recorded score")
            raise RegistryError(f"--compare: {what}; pass --config RECIPE (the recipe they were prepared with) to "
                                f"score them on its meta-val episodes")
    source = "recorded"

    def score(pair: dict, scores: dict) -> float:
        nonlocal source
        if key in scores:
            return scores[key]
        source = "scored"
        value = score_prepared(resolve_artifact(f"models:/{name}-base/{pair['base'].version}", uri),
                               resolve_artifact(f"models:/{name}-controller/{pair['controller'].version}", uri),
                               cfg, split)
        _record_score(client, name, {kind: str(mv.version) for kind, mv in pair.items()}, key, value)
        return value

    candidate = score(cand, cand_scores)
    champion = score(champ_pair, champ_scores) if champ_pair is not None else None
    record = comparison(key, versions["base"], candidate, str(champ.version) if champ else None, champion,
                        forced=force)
    return {**record, "source": source, "versions": versions}


def move_champion(uri: str, name: str, ref: str, cfg: MetaTrainConfig | None = None, split=None, *,
                  force: bool = False) -> dict:
    """Compare version ``ref`` with the champion (:func:`compare_versions`) and move ``champion`` on both
    models if it wins (or ``force``); the record is written to the version's ``champion_comparison`` tag."""
    record = compare_versions(uri, name, ref, cfg, split, force=force)
    if record["champion_version"] == record["candidate_version"]:
        return {**record, "promoted": False, "moved": False}
    apply_comparison(mlflow_client(uri), name, record["versions"],
                     {k: v for k, v in record.items() if k not in ("source", "versions")})
    return {**record, "moved": record["promoted"]}

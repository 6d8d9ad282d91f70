"""Champion promotion: ``champion`` moves to a candidate only if it wins on the same meta-val episodes.

Both models are scored here with the same code on the recipe's meta-validation tasks, each adapted
with its own prepared inner-loop settings (:func:`score_prepared`). The key of a score names those
episodes (:func:`val_set_key`): scores are comparable iff their keys are equal. The champion's
score is recorded as its version tag ``score.<key>``; :func:`promote_if_better` records both scores
on the candidate (``champion_comparison``) and moves the alias on both registered models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from metaprep.config import MetaTrainConfig
from metaprep.registry.client import mlflow_client
from metaprep.registry.register import KINDS

METRIC = "meta_val_loss"  # mean meta-validation query loss after adaptation, lower is better


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


def compare_and_promote(uri: str, cfg: MetaTrainConfig, split, uris: dict, export: Path) -> dict:
    """Score candidate (``export``, registered as ``uris``) and champion on the same meta-val episodes;
    move ``champion`` if the candidate wins. Returns the comparison record (also a version tag)."""
    from mlflow.exceptions import MlflowException

    from metaprep.registry.resolve import resolve_artifact

    client = mlflow_client(uri)
    name = cfg.registry.name
    key = val_set_key(cfg, split)
    version = uris["base_version"]
    candidate = score_prepared(export / "base", export / "controller", cfg, split)
    try:
        champion = client.get_model_version_by_alias(f"{name}-base", "champion")
    except MlflowException:
        champion = None
    record: dict[str, Any] = {"metric": key, "candidate": candidate, "candidate_version": version,
                              "champion": None, "champion_version": champion.version if champion else None}
    if champion is not None:
        try:
            champ_score = score_prepared(resolve_artifact(f"models:/{name}-base@champion", uri),
                                         resolve_artifact(f"models:/{name}-controller@champion", uri), cfg, split)
        except Exception as exc:  # noqa: BLE001 - any load/eval failure: keep the champion, record why
            reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            return _not_promoted(client, name, uris, record, f"champion could not be evaluated ({reason})")
        record["champion"] = champ_score
        for kind in KINDS:  # the champion's score on these episodes, for promote_if_better
            client.set_model_version_tag(f"{name}-{kind}", champion.version, f"score.{key}", f"{champ_score:.6g}")
    if uris["base_version"] != uris["controller_version"]:
        # promote_if_better tags and moves one version number in both models; refuse to touch a wrong version
        return _not_promoted(client, name, uris, record, f"base version {uris['base_version']} != controller "
                                                         f"version {uris['controller_version']}; champion not moved")
    record["promoted"] = promote_if_better(uri, name, version, candidate, metric=key)
    return record


def _not_promoted(client, name: str, uris: dict, record: dict, error: str) -> dict:
    record.update(promoted=False, error=error)
    for kind in KINDS:
        client.set_model_version_tag(f"{name}-{kind}", uris[f"{kind}_version"], "champion_comparison",
                                     json.dumps(record))
    return record


def promote_if_better(uri: str, registry_name: str, version: str, score: float, metric: str = METRIC,
                      lower_is_better: bool = True) -> bool:
    """Move ``champion`` to ``version`` of both models if it beats the current champion's score.

    Both scores are recorded as version tags (``champion_comparison``) so the decision is auditable.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    base = f"{registry_name}-base"
    try:
        current = client.get_model_version_by_alias(base, "champion")
    except MlflowException:
        current = None
    current_score = float(current.tags.get(f"score.{metric}", "nan")) if current else float("nan")
    better = current is None or current_score != current_score or (
        score < current_score if lower_is_better else score > current_score)
    record = json.dumps({"metric": metric, "candidate": score, "champion": current_score,
                         "champion_version": current.version if current else None, "promoted": better})
    for kind in KINDS:
        name = f"{registry_name}-{kind}"
        client.set_model_version_tag(name, version, f"score.{metric}", f"{score:.6g}")
        client.set_model_version_tag(name, version, "champion_comparison", record)
        if better:
            client.set_registered_model_alias(name, "champion", version)
    return better

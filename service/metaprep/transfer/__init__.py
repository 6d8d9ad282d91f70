"""Transfer-learned finetuning configurations (Strangmann et al., 2024; Quick-Tune, Arango et al., ICLR 2024).

- :mod:`~metaprep.transfer.metadataset`: meta-dataset rows and readers (NMTLC, Quick-Tune, generic
  CSV/JSONL, the service's MLflow adapt runs), ``load_metadataset`` auto-detecting the format;
- :mod:`~metaprep.transfer.features`: configuration / meta-feature encoding;
- :mod:`~metaprep.transfer.surrogate`: performance (with uncertainty) and cost surrogates, saved as
  safetensors + JSON;
- :mod:`~metaprep.transfer.recommender`: zero-shot ranking and top-k portfolio (optionally cost-aware);
- :mod:`~metaprep.transfer.evidence`: the training evidence behind a pick (predicted metric in its own
  units with a band, nearest training datasets), saved next to the surrogate;
- :mod:`~metaprep.transfer.scope`: restricting the candidates (``--scope KEY=VALUE``, ``--finetune-only``);
- :mod:`~metaprep.transfer.recommend_run`: what ``jobs.recommend`` runs;
- :mod:`~metaprep.transfer.searcher`: a Ray Tune searcher proposing the portfolio first;
- :mod:`~metaprep.transfer.registry`: logging and registering a fitted surrogate in MLflow.

Ray, MLflow and torch are imported only by the modules that need them (names below load lazily,
so reading a meta-dataset or a CLI's argument check does not pay for torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MetaDataset": "metadataset", "MetaRow": "metadataset", "Pool": "metadataset",
    "load_metadataset": "metadataset", "Recommendation": "recommender", "Recommender": "recommender",
    "TransferSurrogate": "surrogate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

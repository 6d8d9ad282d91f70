"""Encoding configurations and meta-features as vectors for the surrogates.

The same recipe as Quick-Tune's pipeline encoding (Arango et al., ICLR 2024, §4.1: one-hot
categoricals, scaled numerics, meta-features appended), with the scaling rules fixed a priori and
fitted on training datasets only:

- numeric column: ``log(x + offset)`` when every value is >= 0 and the positive values span a factor
  of at least 20 (learning rates, weight decay, sizes, BPE merges), the offset being half the
  smallest positive value when 0 occurs; then standardised ``(x - mean) / std`` (std 0 -> 1, so a
  constant column encodes as 0). A value missing in some training rows gets an extra 0/1
  "missing" indicator and is imputed with the mean.
- categorical column (any non-numeric value): one-hot over the training categories, sorted; an
  unseen category encodes as all zeros.

Everything fitted is plain JSON (``to_dict``/``from_dict``), so a saved surrogate is safetensors plus
JSON and nothing is unpickled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

LOG_SPAN = 20.0  # a numeric column spanning this factor or more is log-scaled


@dataclass
class Column:
    name: str
    kind: str  # "num" or "cat"
    log: bool = False
    offset: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    missing: bool = False  # an indicator column follows the value
    categories: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.categories) if self.kind == "cat" else 1 + int(self.missing)

    @classmethod
    def from_dict(cls, data: Any) -> Column:
        """A column saved by ``asdict``; ``ValueError`` naming the field when a value has the wrong type."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ValueError("column must be an object with a string 'name'")
        where = f"column {data['name']!r}"
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        if data.get("kind") not in ("num", "cat"):
            raise ValueError(f"{where}: 'kind' must be 'num' or 'cat', got {data.get('kind')!r}")
        for key in ("log", "missing"):
            if not isinstance(data.get(key, False), bool):
                raise ValueError(f"{where}: {key!r} must be true or false")
        for key in ("offset", "mean", "std"):
            if not _is_number(data.get(key, 0.0)):
                raise ValueError(f"{where}: {key!r} must be a finite number")
        categories = data.get("categories", [])
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise ValueError(f"{where}: 'categories' must be a list of strings")
        return cls(**data)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class DictEncoder:
    """Encodes dicts of ``name -> number | string`` as fixed-width float vectors."""

    def __init__(self, columns: list[Column] | None = None):
        self.columns = columns or []

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    def feature_names(self) -> list[str]:
        out = []
        for c in self.columns:
            if c.kind == "cat":
                out += [f"{c.name}={v}" for v in c.categories]
            else:
                out += [c.name] + ([f"{c.name}?missing"] if c.missing else [])
        return out

    def fit(self, records: list[dict[str, Any]]) -> DictEncoder:
        names = sorted({k for r in records for k in r})
        self.columns = []
        for name in names:
            present = [r[name] for r in records if name in r and r[name] is not None]
            missing = len(present) < len(records)
            if present and all(_is_number(v) or isinstance(v, bool) for v in present):
                x = np.array([float(v) for v in present])
                col = Column(name, "num", missing=missing)
                positive = x[x > 0]
                if x.min() >= 0 and positive.size and len(np.unique(x)) >= 3 \
                        and positive.max() / positive.min() >= LOG_SPAN:
                    col.log = True
                    col.offset = 0.0 if x.min() > 0 else float(positive.min() / 2)
                    x = np.log(x + col.offset)
                col.mean = float(x.mean())
                col.std = float(x.std()) or 1.0
            else:
                col = Column(name, "cat", categories=sorted({str(v) for v in present}))
            self.columns.append(col)
        return self

    def transform(self, records: list[dict[str, Any]]) -> np.ndarray:
        out = np.zeros((len(records), self.width), dtype=np.float32)
        j = 0
        for c in self.columns:
            if c.kind == "cat":
                index = {v: i for i, v in enumerate(c.categories)}
                for i, r in enumerate(records):
                    k = index.get(str(r[c.name])) if r.get(c.name) is not None else None
                    if k is not None:
                        out[i, j + k] = 1.0
            else:
                for i, r in enumerate(records):
                    v = r.get(c.name)
                    if v is None or not (_is_number(v) or isinstance(v, bool)):
                        if c.missing:
                            out[i, j + 1] = 1.0
                        continue  # imputed with the mean: standardised value 0
                    x = float(v)
                    if c.log:
                        x = math.log(max(x + c.offset, 1e-12))
                    out[i, j] = (x - c.mean) / c.std
            j += c.width
        return out

    def to_dict(self) -> dict:
        return {"columns": [asdict(c) for c in self.columns]}

    @classmethod
    def from_dict(cls, data: Any) -> DictEncoder:
        """An encoder saved by :meth:`to_dict`; ``ValueError`` when it is malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("columns"), list):
            raise ValueError("must be an object with a list 'columns'")
        return cls([Column.from_dict(c) for c in data["columns"]])


class FeatureEncoder:
    """Configuration encoder plus meta-feature encoder, both fitted on training data only."""

    def __init__(self, config: DictEncoder | None = None, meta: DictEncoder | None = None):
        self.config = config or DictEncoder()
        self.meta = meta or DictEncoder()

    def fit(self, configs: list[dict], metas: list[dict[str, float]]) -> FeatureEncoder:
        """``metas``: one meta-feature dict per *dataset*, so large pools do not dominate the scaling."""
        self.config.fit(configs)
        self.meta.fit(metas)
        if any(c.kind == "cat" for c in self.meta.columns):
            bad = [c.name for c in self.meta.columns if c.kind == "cat"]
            raise ValueError(f"meta-features must be numeric: {bad}")
        return self

    @property
    def width(self) -> int:
        return self.config.width + self.meta.width

    def transform(self, configs: list[dict], meta: dict[str, float] | list[dict[str, float]]) -> np.ndarray:
        """Rows ``[config features | meta-features]``; one ``meta`` dict is broadcast to every config."""
        xc = self.config.transform(configs)
        metas = [meta] * len(configs) if isinstance(meta, dict) else meta
        xm = self.meta.transform(metas)
        return np.concatenate([xc, xm], axis=1)

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "meta": self.meta.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> FeatureEncoder:
        """An encoder saved by :meth:`to_dict`; ``ValueError`` naming the part that is malformed."""
        if not isinstance(data, dict):
            raise ValueError("must be an object with 'config' and 'meta' encoders")
        parts = []
        for part in ("config", "meta"):
            try:
                parts.append(DictEncoder.from_dict(data.get(part)))
            except ValueError as exc:
                raise ValueError(f"{part!r}: {exc}") from None
        return cls(*parts)

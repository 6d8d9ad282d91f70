"""The one rule for registered-model names (prepared bases and controllers, adapted models, surrogates).

A name that MLflow accepts and that ``models:/NAME/VERSION`` and ``models:/NAME@alias`` can address:
MLflow refuses '/', ':' and path-like names ('..', './x'); '@' would read as an alias, and quotes, spaces
or control characters break registry searches (``name='...'`` filters), the URIs and the shell commands
users copy from the summary.
"""

from __future__ import annotations

import re

from metaprep.errors import ConfigError

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MODEL_NAME_MAX = 250
PREFIX_MAX = 100  # registry.name: a prefix of NAME-base / NAME-controller


def check_model_name(name: str, flag: str = "name", limit: int = MODEL_NAME_MAX) -> None:
    """Refuse, before anything is logged, a registered model name MLflow or a ``models:/`` URI cannot take."""
    if not MODEL_NAME.fullmatch(name) or len(name) > limit:
        shown = name if len(name) <= 60 else name[:60] + "..."
        raise ConfigError(f"{flag} {shown!r}: not a valid registered model name; use 1-{limit} letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit (it names MLflow models and is quoted "
                          "in registry searches)")

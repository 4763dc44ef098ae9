"""Data sources for curriculax: records, synthetic tasks, JSONL, TFDS, tokenizers.

Every source yields plain record dicts (see :mod:`curriculax.data.records`).
``tfds_source`` is imported lazily (on first attribute access) because
``tensorflow_datasets`` is slow to import and optional for most users.
"""

from __future__ import annotations

import importlib
from typing import Any

from curriculax.data import jsonl, records, synthetic, tokenizer
from curriculax.data.records import FIELDS, DataError, validate

_LAZY_MODULES = ("tfds_source",)

__all__ = ["DataError", "FIELDS", "jsonl", "records", "synthetic", "tfds_source", "tokenizer", "validate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""TFDS over local JSONL: turn record files into a TFDS dataset Grain can read.

:class:`CurriculaxJsonl` is a ``tfds.core.GeneratorBasedBuilder`` whose
:class:`CurriculaxJsonlConfig` holds one JSONL file per split.  Each line must
be a record (see :mod:`curriculax.data.records`); the features are the record
fields (``tfds.features.Text`` for strings, an int64 ``Scalar`` for
``difficulty``).  Extra record fields (``stage``, ``numbers``, ...) are not
stored.  File order is kept (``disable_shuffling=True``), so a curriculum
written in order reads back in order.

The dataset is written in the ``array_record`` format, so
``tfds.data_source(...)`` (random access, what Grain consumes) works.  Both
writing and reading work WITHOUT TensorFlow installed (checked with
tensorflow-datasets 4.9.10 and array_record 0.8.6): ``download_and_prepare``
with ``file_format="array_record"`` serializes examples with TFDS's bundled
``tf_example_pb2`` protos and reads them back with its numpy decoders.  One
TFDS 4.9.10 quirk is worked around: its default ``code_path`` needs the
``importlib_resources`` backport (not a dependency on Python >= 3.9), so
:class:`CurriculaxJsonl` overrides it.

``tensorflow_datasets`` is imported only when this module is, and
``curriculax.data`` imports this module lazily.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from curriculax.data.jsonl import read_jsonl_numbered
from curriculax.data.records import FIELDS, STRING_FIELDS, Record, validate

BUILDER_NAME = "curriculax_jsonl"
VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class CurriculaxJsonlConfig(tfds.core.BuilderConfig):
    """A named set of splits: ``jsonl_paths`` maps split name -> JSONL path."""

    jsonl_paths: Mapping[str, str] = dataclasses.field(default_factory=dict)


class CurriculaxJsonl(tfds.core.GeneratorBasedBuilder):
    """Records from local JSONL files, one file per split (see module docstring)."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS: list[CurriculaxJsonlConfig] = []

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's default looks up `importlib_resources`, a backport it only
        # requires on Python < 3.9, and fails without it: point at this file directly.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {name: tfds.features.Text() for name in STRING_FIELDS}
        features["difficulty"] = tfds.features.Scalar(np.int64)
        return tfds.core.DatasetInfo(
            builder=self,
            description="curriculax records (id, prompt, response, answer, category, difficulty).",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        paths = self.builder_config.jsonl_paths
        if not paths:
            raise ValueError("CurriculaxJsonlConfig.jsonl_paths is empty: give {split: path.jsonl}")
        return {split: self._generate_examples(path) for split, path in paths.items()}

    def _generate_examples(self, path: str):
        for index, (line, obj) in enumerate(read_jsonl_numbered(path)):
            record = validate(obj, source=str(path), line=line)
            yield index, {name: record[name] for name in FIELDS}


def build_jsonl_dataset(jsonl_paths: Mapping[str, str | os.PathLike], data_dir: str | os.PathLike, *,
                        name: str = "default") -> CurriculaxJsonl:
    """Prepare ``{split: path.jsonl}`` as an array_record TFDS dataset under ``data_dir``.

    The dataset lands in ``data_dir/curriculax_jsonl/{name}/1.0.0``; an already
    prepared config is reused as is (TFDS semantics), so use a new ``name`` or a
    fresh ``data_dir`` after changing the files.  Returns the builder.
    """
    missing = [str(p) for p in jsonl_paths.values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"JSONL file(s) not found: {', '.join(missing)}")
    config = CurriculaxJsonlConfig(name=name, jsonl_paths={k: str(Path(v).resolve()) for k, v in jsonl_paths.items()})
    builder = CurriculaxJsonl(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def data_source(data_dir: str | os.PathLike, split: str, *, name: str = "default") -> Sequence[dict[str, Any]]:
    """Random-access source of the split prepared by :func:`build_jsonl_dataset`.

    ``data_dir`` is the directory given to ``build_jsonl_dataset`` (or the
    prepared version directory itself).  Reads from the files alone, so the
    JSONL files need not exist any more.  Items are dicts whose text fields are
    ``bytes``; :func:`records_from_source` decodes them.
    """
    root = Path(data_dir)
    builder_dir = root if (root / "dataset_info.json").is_file() else root / BUILDER_NAME / name / VERSION
    if not (builder_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(f"no prepared {BUILDER_NAME} dataset at {builder_dir}: "
                                "run build_jsonl_dataset(..., data_dir) first")
    return tfds.builder_from_directory(str(builder_dir)).as_data_source(split=split)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def records_from_source(source: Sequence[Mapping[str, Any]]) -> list[Record]:
    """Materialize a source as records: bytes -> str, numpy scalars -> int."""
    return [{name: _decode(item[name]) for name in FIELDS} for item in (source[i] for i in range(len(source)))]

"""Config → records: the training and held-out sets named by ``config.data``.

Sources are looked up in a table (no ``if source == ...`` chains elsewhere). Synthetic sources
draw the eval set from another seed and drop any eval prompt also present in training, so
held-out accuracy measures generalization, not recall. The fact-editing sources are the exception:
recall is what they measure, so their held-out set keeps the training prompts (``facts``: the
edits, their paraphrases and unrelated locality facts, interleaved; ``facts_world``: the pre-edit
world itself, a base model's training set before editing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from curriculax.data import facts, jsonl, records, synthetic


def _synthetic(make: Callable, min_key: str, max_key: str, extra: Callable = lambda d: {}):
    def load(d, seed, *, train: bool, overdraw: int = 4):
        lo, hi = (d.min_difficulty, d.max_difficulty) if train else (
            d.eval_min_difficulty, d.eval_max_difficulty)
        n = d.num_train if train else d.num_eval
        # Over-draw the eval set so that dropping training overlaps still leaves `num_eval`.
        n = n if train else overdraw * n
        try:
            return make(n, seed if train else seed + 7919, **{min_key: lo, max_key: hi}, **extra(d))
        except ValueError as err:  # the generator names its arguments: say which config fields they are
            prefix = "" if train else "eval_"
            fields = {min_key: f"{prefix}min_difficulty", max_key: f"{prefix}max_difficulty",
                      **{k: k for k in extra(d)}}
            raise ValueError(f"config.data.source={d.source!r}: {err} (" + ", ".join(
                f"{arg} is config.data.{field}" for arg, field in fields.items()) + ")") from None
    return load


def _file(read: Callable):
    def load(d, seed, *, train: bool):
        del seed
        path = d.path if train else d.eval_path
        if not path:
            field = "data.path" if train else "data.eval_path"
            raise ValueError(f"config.{field} is empty: set it to the {d.source} file to read.")
        records = read(path)
        lo, hi = (d.min_difficulty, d.max_difficulty) if train else (
            d.eval_min_difficulty, d.eval_max_difficulty)
        kept = [r for r in records if lo <= r["difficulty"] <= hi]
        if len(kept) < len(records):  # never silently: the default 1..8 can cut a file to nothing
            field = "config.data." + ("" if train else "eval_")
            diffs = [r["difficulty"] for r in records]
            if not kept:
                raise ValueError(f"{field}min_difficulty={lo} / {field}max_difficulty={hi} keep none of "
                                 f"the {len(records)} records of {path} (difficulties {min(diffs)}.."
                                 f"{max(diffs)}): widen the range.")
            logging.getLogger(__name__).warning(
                "%s: %d of %d records have a difficulty outside [%smin_difficulty, %smax_difficulty] = "
                "[%d, %d]; they are left out.", path, len(records) - len(kept), len(records), field, field,
                lo, hi)
        records = kept
        limit = d.num_train if train else d.num_eval
        return records[:limit] if limit else records
    return load


def _generic_jsonl(path):
    return [records.validate(r, source=str(path), line=line)
            for line, r in jsonl.read_jsonl_numbered(path)]


def _facts(world: bool):
    """``data.num_train`` edits (seed ``seed``); training rows are the edits (``facts``) or the
    pre-edit world (``facts_world``), the held-out set every category of :mod:`facts`."""
    def load(d, seed, *, train: bool):
        if world:
            return facts.knowledge_records(d.num_train, seed)
        edits, paraphrases, locality = facts.edit_records(d.num_train, seed)
        return edits if train else facts.interleave(edits, paraphrases, locality)
    return load


def _tfds(path):
    """``DIR`` (its ``train`` split) or ``DIR:SPLIT``: a dataset from ``tfds_source.build_jsonl_dataset``."""
    from curriculax.data import tfds_source

    root, _, split = str(path).rpartition(":")
    if not root or "/" in split or "\\" in split:  # no split given (or a ':' inside the path)
        root, split = str(path), "train"
    return tfds_source.records_from_source(tfds_source.data_source(root, split))


SOURCES: dict[str, Callable] = {
    "arithmetic": _synthetic(synthetic.arithmetic, "min_steps", "max_steps",
                             lambda d: {"max_value": d.max_value}),
    "countdown": _synthetic(synthetic.countdown, "min_numbers", "max_numbers"),
    "gsm8k": _file(jsonl.gsm8k),
    "math": _file(jsonl.math),
    "jsonl": _file(_generic_jsonl),
    "tfds": _file(_tfds),  # data.eval_path="DIR:test" reads the test split
    "facts": _facts(world=False),
    "facts_world": _facts(world=True),
}
# Sources whose held-out set is drawn by the source itself (not split off the training rows).
GENERATED = ("arithmetic", "countdown", "facts", "facts_world")
# Sources evaluated on recall: held-out prompts that also occur in training are kept.
RECALL = ("facts", "facts_world")


def load_records(data_config, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train_records, eval_records)`` for ``config.data``."""
    if data_config.source not in SOURCES:
        raise ValueError(
            f"config.data.source={data_config.source!r} is unknown; choose one of {sorted(SOURCES)}."
        )
    load = SOURCES[data_config.source]
    train = load(data_config, seed, train=True)
    eval_source = data_config.get("eval_source") or data_config.source
    if eval_source not in SOURCES:
        raise ValueError(f"config.data.eval_source={eval_source!r} is unknown; choose one of "
                         f"{sorted(SOURCES)} (or leave it empty: the training source).")
    if data_config.eval_path or eval_source in GENERATED:
        held_out = SOURCES[eval_source](data_config, seed, train=False)
    else:  # one file: split the tail off as the held-out set
        n = data_config.num_eval
        if n <= 0:
            raise ValueError(f"config.data.num_eval={n}: splitting the held-out set off one file needs "
                             f"num_eval >= 1 (or give config.data.eval_path).")
        if n >= len(train):
            raise ValueError(
                f"config.data.num_eval={n} leaves no training data out of {len(train)} records."
            )
        train, held_out = train[:-n], train[-n:]
    if eval_source not in RECALL:
        seen = {r["prompt"] for r in train}
        held_out = [r for r in held_out if r["prompt"] not in seen]
        for overdraw in (16, 64) if eval_source in GENERATED else ():
            if len(held_out) >= data_config.num_eval:
                break
            more = SOURCES[eval_source](data_config, seed, train=False, overdraw=overdraw)
            held_out = [r for r in more if r["prompt"] not in seen]
        if len(held_out) < data_config.num_eval:
            logging.getLogger(__name__).warning(
                "config.data.num_eval=%d: only %d held-out problems are not also training prompts "
                "(small difficulty range?); evaluating on those.", data_config.num_eval, len(held_out))
    if data_config.num_eval > 0:  # 0: all of an eval file, as `_file` reads it
        held_out = held_out[: data_config.num_eval]
    if not held_out:
        raise ValueError(f"config.data.num_eval={data_config.num_eval}: no held-out problems are left. Set "
                         f"it >= 1 (0 means all only with config.data.eval_path); held-out prompts "
                         f"that are also training prompts are dropped.")
    stage = data_config.get("curr_reft_stage", "")
    if stage:  # Curr-ReFT: the same problems recast as judge / choice / open questions
        from curriculax.rl import curr_reft

        train = curr_reft.recast(train, stage, seed)
        held_out = curr_reft.recast(held_out, stage, seed + 1)
    return train, held_out

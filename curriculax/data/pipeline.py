"""Streaming candidate pools with Grain, for fine-tuning sets larger than device memory.

Instead of the whole bank, each step receives a *pool*: ``pool_size`` rows laid out exactly
like :class:`~curriculax.data.bank.Bank` (same fields, same ``[P,T]`` shapes every step), and
the curriculum samples the batch from the pool inside the jitted step. The step cannot tell
the two paths apart.

Pools are a Grain ``MapDataset`` with random access, ``pools[t]`` being the pool of step ``t``;
resuming at step ``t`` therefore needs no iterator state beyond the step itself. Pools are
stratified: each category is its own shuffled, repeated stream and the streams are mixed in
equal proportion, so rare categories stay visible to category-level curricula (SEC, Skill-it).

Curricula that keep per-row state or build an order at init index it by row, which in a pool
means "row of this pool": the trainer refuses them (only ``uniform`` is pool-safe); use the
resident bank for those.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from curriculax.data.bank import OVERFLOW, TEMPLATES, Bank, BankInfo, pack_rows, tokenize_record


def pool_dataset(records: Sequence[dict], tokenizer, *, seq_len: int, pool_size: int, seed: int,
                 template: str = "plain", overflow: str = "truncate", add_bos: bool = True,
                 category_names: Sequence[str] | None = None) -> tuple[grain.MapDataset, BankInfo]:
    """An infinite ``MapDataset`` of pools (dicts of ``[P,...]`` arrays) and their static info.

    Rows longer than ``seq_len`` are truncated (``overflow="truncate"``) or, as a row whose prompt
    alone does not fit, kept with an empty loss mask: a streamed pool cannot drop rows, so a
    "dropped" row contributes no loss. Pools tokenize lazily, so ``info.num_truncated`` /
    ``num_dropped`` are -1 (not counted).
    """
    if template not in TEMPLATES:
        raise ValueError(f"data.template={template!r}: choose one of {TEMPLATES}.")
    if overflow not in OVERFLOW:
        raise ValueError(f"data.overflow={overflow!r}: choose one of {OVERFLOW}.")
    if pool_size <= 0:
        raise ValueError(f"data.pool_size={pool_size} must be positive for streaming.")
    cats = tuple(category_names or sorted({r["category"] for r in records}))
    cat_index = {c: i for i, c in enumerate(cats)}
    by_category = [[(i, r) for i, r in enumerate(records) if r["category"] == c] for c in cats]
    streams = [grain.MapDataset.source(rows).shuffle(seed=seed + k).repeat()
               for k, rows in enumerate(by_category) if rows]

    def to_row(item):
        index, rec = item
        row = tokenize_record(rec, tokenizer, template, add_bos)
        arrays = pack_rows([(row, cat_index[rec["category"]], int(rec["difficulty"]))], seq_len,
                           tokenizer.pad_id)
        arrays["example_id"][0] = index
        too_long = len(row[0]) - 1 > seq_len
        if too_long and (overflow == "drop" or row[2] >= seq_len):  # as the bank would drop it
            arrays["loss_mask"][0] = False
        return {k: v[0] for k, v in arrays.items()}

    pools = grain.MapDataset.mix(streams).map(to_row).batch(pool_size, drop_remainder=True)
    difficulties = [int(r["difficulty"]) for r in records]
    info = BankInfo(seq_len=seq_len, category_names=cats, difficulty_min=min(difficulties),
                    difficulty_max=max(difficulties), num_truncated=-1, num_dropped=-1,
                    pad_id=int(tokenizer.pad_id), mask_id=getattr(tokenizer, "mask_id", None),
                    bos_id=getattr(tokenizer, "bos_id", None))
    return pools, info


def pool_at(pools: grain.MapDataset, info: BankInfo, step: int) -> Bank:
    """The pool of global step ``step`` as a host :class:`Bank`."""
    return Bank(**{k: np.asarray(v) for k, v in pools[step].items()}, info=info)


def stacked_pools(pools: grain.MapDataset, info: BankInfo, start: int, count: int) -> Bank:
    """Pools of steps ``start .. start+count-1`` stacked on a leading axis (for ``lax.scan``)."""
    items = [pools[start + i] for i in range(count)]
    return Bank(**{k: np.stack([it[k] for it in items]) for k in items[0]}, info=info)

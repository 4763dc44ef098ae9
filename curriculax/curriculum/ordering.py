"""Human-style data orderings (blocked / interleaved / curriculum / anti) and staged curricula.

Sources: Yang, Bean, McCraith, Mahdi, "Fine-tuning LLMs with Human-inspired Learning Strategies
in Medical QA" (NeurIPS 2024 FITML workshop, arXiv 2408.07888; code
``Oxford-AI-for-Society/human-learning-strategies``, ``training/data_ordering.py``); Corgi: Lee,
Cho, Yoo, "Instruction Tuning with Human Curriculum" (Findings of NAACL 2024, arXiv 2310.09518);
Curr-ReFT stage training (Deng et al. 2025, arXiv 2503.07065).

Sequential kinds build one permutation of the bank at ``init`` and step ``t`` trains on its
positions ``t*B .. t*B+B-1`` (wrapping around: one pass per epoch). Categories are visited in
index order (the repo's sorted ``groupby`` order) unless ``category_order`` names them. Ties are
random (seeded; ``tie_break="index"`` keeps index order as the repo's stable sorts do).

* ``random``: a seeded shuffle.
* ``curriculum`` / ``anti``: sort by difficulty ascending / descending.
* ``blocked``: category by category, shuffled within; ``blocked_curriculum``: easy to hard within.
* ``interleaved`` / ``interleaved_curriculum``: take the blocked (curriculum) order, split each
  category's sequence into ``parts`` contiguous near-equal parts (numpy ``array_split``: the first
  parts get the extra item) and emit part ``r`` of every category for ``r = 0, 1, ...``.
* ``interleaved_difficulty`` (the repo's ``interleaved_emh``): for each difficulty level (or
  bucket, see ``buckets``), each category's rows of that level.
* ``corgi``: sort by difficulty level and round-robin over categories inside each level (the
  "global interleaving" curriculum; Corgi's stage and Bloom level both map to difficulty here).
* ``staged``: a list of stages, each ``{end, end_step, categories, min_difficulty,
  max_difficulty}``; stage ``s`` lasts until step ``end_step`` (or ``end * total_steps``) and
  draws uniformly (with replacement) from the rows its filters admit (Corgi / Curr-ReFT stage
  training; ``curriculax.curriculum.designer`` emits such configs).

``buckets``: difficulty thresholds (``d <= b_0`` is level 0, ...); empty = every difficulty value
is its own level. Defaults: ``kind="curriculum", parts=3``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from curriculax.curriculum import sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights

KINDS = ("random", "curriculum", "anti", "blocked", "blocked_curriculum", "interleaved",
         "interleaved_curriculum", "interleaved_difficulty", "corgi", "staged")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "ordering"
    c.kind = "curriculum"  # one of KINDS
    c.parts = 3  # interleaved: parts per category
    c.category_order = ()  # category names (or indices) in visiting order; () = index order
    c.buckets = ()  # difficulty thresholds for levels; () = one level per difficulty value
    c.tie_break = "random"  # random | index
    c.stages = ()  # staged: tuple of dicts (see module docstring)
    c.seed = 0
    c.total_steps = 0  # 0: the trainer's config.steps (staged `end` fractions)
    return c


def _category_rank(cfg, meta: BankMeta) -> np.ndarray:
    k = meta.num_categories
    if not len(cfg.category_order):
        return np.arange(k, dtype=np.int32)
    order = [meta.category_names.index(c) if isinstance(c, str) else int(c)
             for c in cfg.category_order]
    rest = [c for c in range(k) if c not in order]
    rank = np.empty(k, np.int32)
    rank[np.asarray(order + rest)] = np.arange(k)
    return rank


def _levels(difficulty, buckets) -> jax.Array:
    if not len(buckets):
        return difficulty.astype(jnp.int32)
    return jnp.searchsorted(jnp.asarray(buckets, jnp.float32), difficulty.astype(jnp.float32),
                            side="left").astype(jnp.int32)


def _position_in_block(order, block):
    """Each row's position inside its block, for rows sorted by ``block`` (``order``)."""
    e = order.shape[0]
    sorted_block = block[order]
    i = jnp.arange(e, dtype=jnp.int32)
    is_start = jnp.concatenate([jnp.ones((1,), bool), sorted_block[1:] != sorted_block[:-1]])
    start = jax.lax.cummax(jnp.where(is_start, i, 0))
    return jnp.zeros((e,), jnp.int32).at[order].set(i - start)


def array_split_part(pos, n, parts: int):
    """numpy ``array_split`` part index of item ``pos`` of a sequence of length ``n``."""
    q, rem = n // parts, n % parts
    boundary = rem * (q + 1)
    return jnp.where(pos < boundary, pos // (q + 1), rem + (pos - boundary) // jnp.maximum(q, 1))


def permutation(cfg, meta: BankMeta) -> jax.Array:
    """The ordering's permutation of the bank rows, as int32 [E]."""
    e = meta.num_examples
    kind = cfg.kind
    shuffle = sampling.random_ranks(jax.random.PRNGKey(cfg.seed), e)
    tie = jnp.arange(e, dtype=jnp.int32) if cfg.tie_break == "index" else shuffle
    d = meta.difficulty.astype(jnp.int32)
    k = meta.num_categories
    cat = jnp.asarray(_category_rank(cfg, meta))[meta.category.astype(jnp.int32)]
    if kind == "random":  # a shuffle whatever the tie-break (there are no ties to break)
        return sampling.sort_order(shuffle)
    if kind == "curriculum":
        return sampling.sort_order(d, tie)
    if kind == "anti":
        return sampling.sort_order(-d, tie)
    if kind == "blocked":
        return sampling.sort_order(cat, tie)
    if kind == "blocked_curriculum":
        return sampling.sort_order(cat, d, tie)
    if kind in ("interleaved", "interleaved_curriculum"):
        base = (sampling.sort_order(cat, tie) if kind == "interleaved"
                else sampling.sort_order(cat, d, tie))
        pos = _position_in_block(base, cat)
        size = jax.ops.segment_sum(jnp.ones((e,), jnp.int32), cat, num_segments=k)
        part = array_split_part(pos, size[cat], int(cfg.parts))
        return sampling.sort_order(part, cat, pos)
    level = _levels(d, cfg.buckets)
    if kind == "interleaved_difficulty":
        return sampling.sort_order(level, cat, d, tie)
    if kind == "corgi":
        # Position of each row inside its (level, category) cell, then round-robin: all
        # categories' first rows of the level, then their second rows, ...
        pos = _position_in_block(sampling.sort_order(level, cat, d, tie), level * k + cat)
        return sampling.sort_order(level, pos, cat, d, tie)
    raise ValueError(f"curriculum.kind={kind!r}: choose one of {KINDS}.")


@struct.dataclass
class Stages:
    """Static stage table: ``ends[s]`` (last step + 1), ``categories[s][c]``, difficulty range."""

    ends: tuple = ()
    categories: tuple = ()
    min_difficulty: tuple = ()
    max_difficulty: tuple = ()


def stage_table(cfg, meta: BankMeta, total_steps: int) -> Stages:
    if not len(cfg.stages):
        raise ValueError("curriculum.kind='staged' needs curriculum.stages (a list of dicts).")
    ends, cats, lo, hi = [], [], [], []
    # The emptiness check below needs the labels' values: skipped when init is traced with meta
    # as a jit argument (the trainer passes a concrete meta, so it checks there).
    try:
        diff, cat = np.asarray(meta.difficulty), np.asarray(meta.category)
        concrete = True
    except jax.errors.TracerArrayConversionError:
        diff = cat = None
        concrete = False
    for i, st in enumerate(cfg.stages):
        st = dict(st)
        unknown = set(st) - {"end", "end_step", "categories", "min_difficulty", "max_difficulty"}
        if unknown:
            raise ValueError(f"curriculum.stages[{i}] has unknown keys {sorted(unknown)}.")
        end = int(st.get("end_step", 0)) or int(round(float(st.get("end", 1.0)) * total_steps))
        names = st.get("categories", ()) or ()
        allowed = np.zeros(meta.num_categories, bool)
        if len(names):
            for c in names:
                if isinstance(c, str) and c not in meta.category_names:
                    raise ValueError(f"curriculum.stages[{i}].categories names {c!r}, not a category of "
                                     f"the bank: choose from {list(meta.category_names)}.")
                allowed[meta.category_names.index(c) if isinstance(c, str) else int(c)] = True
        else:
            allowed[:] = True
        ends.append(end)
        cats.append(tuple(bool(a) for a in allowed))
        lo.append(int(st.get("min_difficulty", meta.difficulty_min)))
        hi.append(int(st.get("max_difficulty", meta.difficulty_max)))
        if concrete and not np.any(allowed[cat] & (diff >= lo[-1]) & (diff <= hi[-1])):
            # the sampler would fall back to the whole bank
            raise ValueError(f"curriculum.stages[{i}] admits no row of the bank (categories "
                             f"{list(names) or 'all'}, difficulty {lo[-1]}..{hi[-1]}; the bank's "
                             f"difficulties span {meta.difficulty_min}..{meta.difficulty_max}).")
    if any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"curriculum.stages must end in increasing order, got ends {ends}.")
    return Stages(tuple(ends), tuple(cats), tuple(lo), tuple(hi))


def stage_at(stages: Stages, t) -> jax.Array:
    """Index of the stage active at step ``t`` (the last stage holds after its end)."""
    j = jnp.sum(jnp.asarray(t) >= jnp.asarray(stages.ends, jnp.int32))
    return jnp.minimum(j, len(stages.ends) - 1).astype(jnp.int32)


@struct.dataclass
class OrderingState:
    perm: jax.Array  # [E] int32 (staged: unused identity)
    counts: jax.Array  # [E] int32 draws per row
    t: jax.Array  # [] int32
    kind: str = struct.field(pytree_node=False, default="curriculum")
    stages: Stages = struct.field(pytree_node=False, default=Stages())


def init(config, meta: BankMeta) -> OrderingState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.kind not in KINDS:
        raise ValueError(f"curriculum.kind={cfg.kind!r}: choose one of {KINDS}.")
    if cfg.tie_break not in ("random", "index"):
        raise ValueError(f"curriculum.tie_break={cfg.tie_break!r}: choose random or index.")
    e = meta.num_examples
    if cfg.kind == "staged":
        stages = stage_table(cfg, meta, sampling.require_total_steps(cfg, "ordering/staged"))
        perm = jnp.arange(e, dtype=jnp.int32)
    else:
        stages, perm = Stages(), permutation(cfg, meta)
    return OrderingState(perm=perm, counts=jnp.zeros((e,), jnp.int32),
                         t=jnp.zeros((), jnp.int32), kind=cfg.kind, stages=stages)


def stage_mask(state: OrderingState, meta: BankMeta, stage) -> jax.Array:
    s = state.stages
    allowed = jnp.asarray(np.asarray(s.categories, bool))[stage][meta.category]
    lo = jnp.asarray(s.min_difficulty, jnp.int32)[stage]
    hi = jnp.asarray(s.max_difficulty, jnp.int32)[stage]
    return allowed & (meta.difficulty >= lo) & (meta.difficulty <= hi)


def sample(state: OrderingState, rng, meta: BankMeta, batch_size: int):
    if state.kind == "staged":
        mask = stage_mask(state, meta, stage_at(state.stages, state.t))
        return sampling.categorical_rows(rng, mask.astype(jnp.float32), batch_size), \
            uniform_weights(batch_size)
    e = state.perm.shape[0]
    pos = (state.t * batch_size + jnp.arange(batch_size, dtype=jnp.int32)) % e
    return state.perm[pos], uniform_weights(batch_size)


def update(state: OrderingState, feedback: Feedback) -> OrderingState:
    return state.replace(counts=state.counts.at[feedback.indices].add(1),
                         t=(feedback.step + 1).astype(jnp.int32))


def summarize(state: OrderingState):
    out = {"coverage": jnp.mean(state.counts > 0)}
    if state.kind == "staged":
        out["stage"] = stage_at(state.stages, state.t)
    return out


ordering = register("ordering", Curriculum(init, sample, update, summarize))

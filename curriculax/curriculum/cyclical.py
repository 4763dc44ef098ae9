"""Cyclical Curriculum Learning (CCL): the training-set fraction grows and shrinks in cycles.

Paper: H. T. Kesgin, M. F. Amasyali, "Cyclical Curriculum Learning", arXiv 2202.05531, IEEE
TNNLS 2023. Code: ``CyclicalCurriculum/Cyclical-Curriculum`` (``get_cycle_sizes``).

Size schedule (official rule, :func:`cycle_sizes`): ``S_0 = sp``; while ``sum(S) < T``: grow
``n = min(n / alpha, ep)`` when ``n == sp`` or (``S_{t-1} < S_t`` and ``n != ep``), else shrink
``n = max(n * alpha, sp)``. Epoch ``e`` trains on ``int(N S_e)`` rows. Here an "epoch" is a
phase of ``round(N S_e / B)`` steps (the same number of samples), and the list repeats if the
run is longer; ``T`` (``config.epochs``) defaults to the run's budget ``total_steps * B / N``.

Which rows: at the start of each phase ``int(N S_e)`` rows are drawn *without replacement*
with probability ∝ ``score_i`` (the paper's ``numpy.choice(p=score/sum, replace=False)``,
done here with Gumbel-top-k), and the phase's batches are drawn uniformly from them.
``score_i = 1 / L_i`` (easy first; ``order="hard"``: ``L_i``), where ``L_i`` is the row's
*tracked* loss: an EMA (``decay``) of the per-example loss the step feeds back. (The paper
scores once with a vanilla-trained model; we track the current model instead. Rows never seen
take the mean tracked loss, so the first phase is a uniform random subset.)
``selection="hard"`` takes the top ``int(N S_e)`` rows by score instead (random ties).

Defaults (``MainCyclicalCurriculum.py``): ``start=0.25, end=1.0, alpha=0.5``, easy first;
``decay=0.9``. The per-phase re-selection is one sort inside a ``lax.cond`` that only runs when
the phase changes; every other step costs ``B`` gathers plus the EMA scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from curriculax.curriculum import pacing, sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "cyclical"
    c.start = 0.25  # sp: smallest fraction of the bank
    c.end = 1.0  # ep: largest fraction
    c.alpha = 0.5  # multiplier: the size grows by 1/alpha, shrinks by alpha
    c.epochs = 0.0  # T in full-bank epochs; 0: the run's budget total_steps * B / N
    c.order = "easy"  # easy: score = 1/loss; hard: score = loss
    c.selection = "soft"  # soft: weighted draw without replacement (paper); hard: top by score
    c.decay = 0.9  # EMA of each row's loss
    c.seed = 0
    c.total_steps = 0  # 0: the trainer's config.steps
    return c


def cycle_sizes(start: float, end: float, alpha: float, total: float) -> list[float]:
    """The official ``get_cycle_sizes`` list ``S`` (fractions per epoch, ``sum(S) >= total``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"cyclical alpha={alpha} must be in (0, 1).")
    if not 0 < start <= end <= 1:
        raise ValueError(f"cyclical needs 0 < start <= end <= 1, got {start}, {end}.")
    sizes, n = [start], start
    while sum(sizes) < total:
        growing = n == start or (len(sizes) >= 2 and sizes[-2] < sizes[-1] and n != end)
        n = min(n / alpha, end) if growing else max(n * alpha, start)
        sizes.append(n)
    return sizes


@functools.lru_cache(maxsize=64)
def phase_table(sizes: tuple, num_examples: int, batch_size: int):
    """``(fractions [P], ends [P])``: phase ``e`` covers steps ``[ends[e-1], ends[e])``."""
    steps = [max(1, int(round(num_examples * s / batch_size))) for s in sizes]
    return np.asarray(sizes, np.float32), np.cumsum(steps).astype(np.int32)


@struct.dataclass
class CyclicalState:
    ema: jax.Array  # [E] f32 tracked loss
    seen: jax.Array  # [E] bool
    order: jax.Array  # [E] int32 this phase's rows first
    count: jax.Array  # [] int32 rows in this phase's subset
    phase: jax.Array  # [] int32 absolute phase index
    fraction: jax.Array  # [] f32 this phase's S_e
    t: jax.Array  # [] int32 steps done
    key: jax.Array  # uint32[2]
    cycle: tuple = struct.field(pytree_node=False, default=(0.25, 1.0, 0.5))  # sp, ep, alpha
    epochs: float = struct.field(pytree_node=False, default=0.0)
    total_steps: int = struct.field(pytree_node=False, default=1)
    hard_first: bool = struct.field(pytree_node=False, default=False)
    soft: bool = struct.field(pytree_node=False, default=True)
    decay: float = struct.field(pytree_node=False, default=0.9)


def _sizes_for(state: CyclicalState, num_examples: int, batch_size: int) -> tuple:
    budget = state.epochs if state.epochs > 0 else state.total_steps * batch_size / num_examples
    return tuple(cycle_sizes(*state.cycle, budget))


def phase_at(state: CyclicalState, t, num_examples: int, batch_size: int):
    """``(absolute phase, fraction)`` at step ``t`` (the list repeats after its last phase)."""
    fracs, ends = phase_table(_sizes_for(state, num_examples, batch_size), num_examples,
                              batch_size)
    period = int(ends[-1])
    cycle, within = t // period, t % period
    p = jnp.searchsorted(jnp.asarray(ends), within, side="right").astype(jnp.int32)
    return cycle * len(fracs) + p, jnp.asarray(fracs)[p]


def _select(ema, seen, frac, key, hard_first: bool, soft: bool):
    loss = jnp.maximum(sampling.fill_unseen(ema, seen), 1e-6)
    log_score = jnp.log(loss) if hard_first else -jnp.log(loss)
    if soft:
        noise = jax.random.gumbel(key, loss.shape, jnp.float32)
    else:
        noise = 1e-6 * jax.random.uniform(key, loss.shape, jnp.float32)
    order = jnp.argsort(-(log_score + noise)).astype(jnp.int32)
    return order, pacing.eligible_count(frac, loss.shape[0])


def init(config, meta: BankMeta) -> CyclicalState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.order not in ("easy", "hard") or cfg.selection not in ("soft", "hard"):
        raise ValueError("curriculum.order must be easy|hard and curriculum.selection soft|hard.")
    total = sampling.require_total_steps(cfg, "cyclical")
    e = meta.num_examples
    cycle = (float(cfg.start), float(cfg.end), float(cfg.alpha))
    cycle_sizes(*cycle, 1.0)  # validates
    key = jax.random.PRNGKey(cfg.seed)
    ema, seen = jnp.zeros((e,), jnp.float32), jnp.zeros((e,), bool)
    frac0 = jnp.float32(cfg.start)
    order, count = _select(ema, seen, frac0, jax.random.fold_in(key, 0), cfg.order == "hard",
                           cfg.selection == "soft")
    return CyclicalState(ema=ema, seen=seen, order=order, count=count,
                         phase=jnp.zeros((), jnp.int32), fraction=frac0,
                         t=jnp.zeros((), jnp.int32), key=key, cycle=cycle,
                         epochs=float(cfg.epochs), total_steps=total,
                         hard_first=cfg.order == "hard", soft=cfg.selection == "soft",
                         decay=float(cfg.decay))


def sample(state: CyclicalState, rng, meta: BankMeta, batch_size: int):
    del meta
    return sampling.uniform_prefix(rng, state.order, state.count, batch_size), \
        uniform_weights(batch_size)


def update(state: CyclicalState, feedback: Feedback) -> CyclicalState:
    e, b = state.ema.shape[0], feedback.indices.shape[0]
    ema, seen = sampling.track_loss(state.ema, state.seen, feedback.indices, feedback.loss,
                                    state.decay)
    t = (feedback.step + 1).astype(jnp.int32)
    phase, frac = phase_at(state, t, e, b)
    order, count = jax.lax.cond(
        phase != state.phase,
        lambda: _select(ema, seen, frac, jax.random.fold_in(state.key, phase), state.hard_first,
                        state.soft),
        lambda: (state.order, state.count))
    return state.replace(ema=ema, seen=seen, order=order, count=count, phase=phase,
                         fraction=frac, t=t)


def summarize(state: CyclicalState):
    n_seen = jnp.maximum(jnp.sum(state.seen), 1)
    return {"fraction": state.fraction, "phase": state.phase,
            "tracked_loss": jnp.sum(jnp.where(state.seen, state.ema, 0.0)) / n_seen,
            "coverage": jnp.mean(state.seen)}


cyclical = register("cyclical", Curriculum(init, sample, update, summarize))

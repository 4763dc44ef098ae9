"""Difficulty-weighted training annealed to uniform.

Framework design from methods/answer_rerank_difficulty.md (section A; closest paper: Wu et al.,
"Progressive Mastery", arXiv 2506.04065 -- the annealing rule itself is a design choice, flagged
unverified there). With a normalized difficulty ``d_i`` in ``[0, 1]``:

    q_i ∝ f(d_i),  f = floor + (1 - floor)(1 - d)  (easy first) or  floor + (1 - floor) d  (hard)
    w_i(t) = (1 - lambda_t) q_i + lambda_t / N,    lambda_t = min(1, t / T_anneal)

(:func:`anneal`). At ``t = 0`` this is the pure curriculum; from ``T_anneal = anneal * total_steps``
on it is uniform. ``mode="loss_weight"`` (default) samples uniformly and returns ``N w_i`` (mean 1
over the bank) as the per-example loss weights, which the step multiplies into each row's loss
(``objectives.reduce_loss``); ``mode="sample"`` draws rows with probability ``w_i`` instead.

Difficulty signal: ``signal="labels"`` uses ``(difficulty - d_min) / (d_max - d_min)``, or
``config.scores``: a per-row ``d_i`` in ``[0, 1]`` used as is (e.g. ``1 - correct/k`` from the
model's own sampled answers; scores outside ``[0, 1]`` are min-max normalized);
``signal="loss"`` uses the model's own tracked loss (EMA per row, ``decay``):
``d_i = L_i / max_j L_j`` over seen rows, unseen rows at the mean.

Defaults: ``signal="labels", order="easy", floor=0.0, anneal=1.0, mode="loss_weight"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from curriculax.curriculum import sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "reweight"
    c.signal = "labels"  # labels | loss
    c.order = "easy"  # easy: f = 1 - d (easy rows weigh more); hard: f = d
    c.floor = 0.0  # smallest f, so no row starts at weight 0 when > 0
    c.anneal = 1.0  # lambda reaches 1 (uniform) at anneal * total_steps
    c.mode = "loss_weight"  # loss_weight | sample
    c.decay = 0.9  # signal=loss: EMA of each row's loss
    c.scores = ()  # optional per-row difficulty [E] for signal=labels
    c.total_steps = 0  # 0: the trainer's config.steps
    return c


def anneal(q, lam) -> jax.Array:
    """``(1 - lam) q + lam / N`` for a distribution ``q`` [N]."""
    q = jnp.asarray(q, jnp.float32)
    return (1.0 - lam) * q + lam / q.shape[-1]


@struct.dataclass
class ReweightState:
    difficulty: jax.Array  # [E] f32 normalized label difficulty (signal=labels)
    ema: jax.Array  # [E] f32 tracked loss (signal=loss)
    seen: jax.Array  # [E] bool
    t: jax.Array  # [] int32
    last_weight_max: jax.Array  # [] f32 largest weight of the last batch
    signal: str = struct.field(pytree_node=False, default="labels")
    hard_first: bool = struct.field(pytree_node=False, default=False)
    floor: float = struct.field(pytree_node=False, default=0.0)
    anneal_steps: float = struct.field(pytree_node=False, default=1.0)
    sample_mode: bool = struct.field(pytree_node=False, default=False)
    decay: float = struct.field(pytree_node=False, default=0.9)


def init(config, meta: BankMeta) -> ReweightState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.signal not in ("labels", "loss") or cfg.order not in ("easy", "hard"):
        raise ValueError("curriculum.signal must be labels|loss and curriculum.order easy|hard.")
    if cfg.mode not in ("loss_weight", "sample"):
        raise ValueError(f"curriculum.mode={cfg.mode!r}: choose loss_weight or sample.")
    total = sampling.require_total_steps(cfg, "reweight")
    e = meta.num_examples
    if len(cfg.scores):
        s = np.asarray(cfg.scores, np.float32)
        if s.shape != (e,):
            raise ValueError(f"curriculum.scores has {s.size} values for a bank of {e} rows: give one "
                             f"difficulty per row.")
        if s.min() < 0 or s.max() > 1:  # already a difficulty in [0, 1]: keep its scale
            s = (s - s.min()) / max(float(s.max() - s.min()), 1e-12)
        d = jnp.asarray(s)
    else:
        span = max(meta.difficulty_max - meta.difficulty_min, 1)
        d = (meta.difficulty.astype(jnp.float32) - meta.difficulty_min) / span
    return ReweightState(difficulty=d, ema=jnp.zeros((e,), jnp.float32),
                         seen=jnp.zeros((e,), bool), t=jnp.zeros((), jnp.int32),
                         last_weight_max=jnp.ones((), jnp.float32), signal=cfg.signal,
                         hard_first=cfg.order == "hard", floor=float(cfg.floor),
                         anneal_steps=max(float(cfg.anneal) * total, 1e-9),
                         sample_mode=cfg.mode == "sample", decay=float(cfg.decay))


def lam(state: ReweightState, t=None) -> jax.Array:
    t = state.t if t is None else t
    return jnp.minimum(1.0, t.astype(jnp.float32) / state.anneal_steps)


def row_difficulty(state: ReweightState) -> jax.Array:
    if state.signal == "labels":
        return state.difficulty
    loss = sampling.fill_unseen(state.ema, state.seen)
    return jnp.clip(loss / jnp.maximum(jnp.max(loss), 1e-12), 0.0, 1.0)


def weights(state: ReweightState) -> jax.Array:
    """``N w_i(t)`` for every row [E]: mean 1 over the bank, 1 everywhere once annealed."""
    d = row_difficulty(state)
    f = state.floor + (1.0 - state.floor) * (d if state.hard_first else 1.0 - d)
    f = jnp.where(jnp.sum(f) > 0, f, jnp.ones_like(f))
    q = f / jnp.sum(f)
    return anneal(q, lam(state)) * d.shape[0]


def sample(state: ReweightState, rng, meta: BankMeta, batch_size: int):
    w = weights(state)
    if state.sample_mode:
        return sampling.categorical_rows(rng, w, batch_size), jnp.ones((batch_size,), jnp.float32)
    idx = jax.random.randint(rng, (batch_size,), 0, meta.num_examples, dtype=jnp.int32)
    return idx, w[idx]


def update(state: ReweightState, feedback: Feedback) -> ReweightState:
    if state.signal == "loss":
        ema, seen = sampling.track_loss(state.ema, state.seen, feedback.indices, feedback.loss,
                                        state.decay)
        state = state.replace(ema=ema, seen=seen)
    return state.replace(t=(feedback.step + 1).astype(jnp.int32),
                         last_weight_max=jnp.max(feedback.weights).astype(jnp.float32))


def summarize(state: ReweightState):
    return {"lambda": lam(state), "batch_weight_max": state.last_weight_max}


reweight = register("reweight", Curriculum(init, sample, update, summarize))

"""Self-paced learning: train on the rows the current model already finds easy, with a growing pace.

Paper: Kumar, Packer, Koller, "Self-Paced Learning for Latent Variable Models", NeurIPS 2010.
With the weights fixed, the SPL objective's closed form selects ``v_i = 1[L_i < lambda]``, and
``lambda`` grows over training (``lambda <- mu lambda``) until every row is included.

Here ``L_i`` is the row's *tracked* loss (EMA, ``decay``, of the per-example loss the step feeds
back) and rows are eligible when ``L_i <= lambda(t)``; batches are drawn uniformly from the
eligible rows (inverse-CDF over a mask: O(E) per step).

``lambda(t)``:

* ``threshold="quantile"`` (default): ``lambda(t)`` is the ``g(t)``-quantile of the tracked
  losses of seen rows, with ``g`` a pacing function
  (:func:`curriculax.curriculum.pacing.fraction`; default linear from ``start=0.5`` -- SPL's
  usual "start with half the data" -- to ``end=1.0`` at ``ramp=0.8`` of training).
  Scale-free, so no loss-unit hyper-parameter.
  Computed by a 32-step bisection (masked counts) instead of a sort.
* ``threshold="absolute"``: ``lambda(t) = lambda0 * mu^floor(t / period)`` in loss units.

Unseen rows: a row that was never drawn has no loss to judge, so it is **eligible** by default
(``unseen="eligible"``): every row gets scored at least once and the pace only ever excludes
rows the model has been seen to fail. ``unseen="ineligible"`` excludes them once at least
``min_seen`` rows are seen (before that every row is eligible).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from curriculax.curriculum import pacing, sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "self_paced"
    c.threshold = "quantile"  # quantile | absolute
    c.kind = "linear"  # quantile: pacing kind of g(t)
    c.start = 0.5  # quantile: g(0)
    c.end = 1.0  # quantile: g after the ramp
    c.ramp = 0.8  # quantile: g reaches `end` at ramp * total_steps
    c.lambda0 = 1.0  # absolute: initial threshold (loss units)
    c.mu = 1.3  # absolute: growth factor per period
    c.period = 50  # absolute: steps per growth
    c.unseen = "eligible"  # eligible | ineligible
    c.min_seen = 256  # unseen=ineligible: rows seen before unseen rows are excluded
    c.decay = 0.9  # EMA of each row's loss
    c.total_steps = 0  # 0: the trainer's config.steps
    return c


@struct.dataclass
class SelfPacedState:
    ema: jax.Array  # [E] f32 tracked loss
    seen: jax.Array  # [E] bool
    t: jax.Array  # [] int32
    threshold: jax.Array  # [] f32 lambda used by the next batch
    pace: pacing.Pace = struct.field(pytree_node=False, default=pacing.Pace())
    quantile: bool = struct.field(pytree_node=False, default=True)
    absolute: tuple = struct.field(pytree_node=False, default=(1.0, 1.3, 50))
    unseen_eligible: bool = struct.field(pytree_node=False, default=True)
    min_seen: int = struct.field(pytree_node=False, default=256)
    decay: float = struct.field(pytree_node=False, default=0.9)


def init(config, meta: BankMeta) -> SelfPacedState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.threshold not in ("quantile", "absolute"):
        raise ValueError(f"curriculum.threshold={cfg.threshold!r}: choose quantile or absolute.")
    if cfg.unseen not in ("eligible", "ineligible"):
        raise ValueError(f"curriculum.unseen={cfg.unseen!r}: choose eligible or ineligible.")
    total = sampling.require_total_steps(cfg, "self_paced")
    e = meta.num_examples
    pace = pacing.Pace.from_config(sampling.with_defaults(cfg, pacing.default_config(), strict=False), total)
    return SelfPacedState(
        ema=jnp.zeros((e,), jnp.float32), seen=jnp.zeros((e,), bool), t=jnp.zeros((), jnp.int32),
        threshold=jnp.full((), jnp.inf, jnp.float32), pace=pace,
        quantile=cfg.threshold == "quantile",
        absolute=(float(cfg.lambda0), float(cfg.mu), int(cfg.period)),
        unseen_eligible=cfg.unseen == "eligible", min_seen=int(cfg.min_seen),
        decay=float(cfg.decay))


def threshold_at(state: SelfPacedState, ema, seen, t) -> jax.Array:
    if state.quantile:
        q = jnp.clip(state.pace(t), 0.0, 1.0)
        lam = sampling.masked_quantile(ema, seen, q)
        return jnp.where((q >= 1.0) | ~jnp.any(seen), jnp.inf, lam)
    lambda0, mu, period = state.absolute
    return lambda0 * mu ** jnp.floor(t.astype(jnp.float32) / period)


def eligible(state: SelfPacedState) -> jax.Array:
    """[E] bool rows the next batch may draw."""
    ok = state.seen & (state.ema <= state.threshold)
    if state.unseen_eligible:
        ok = ok | ~state.seen
    else:
        ok = ok | (~state.seen & (jnp.sum(state.seen) < state.min_seen))
    return jnp.where(jnp.any(ok), ok, jnp.ones_like(ok))


def sample(state: SelfPacedState, rng, meta: BankMeta, batch_size: int):
    del meta
    return sampling.categorical_rows(rng, eligible(state).astype(jnp.float32), batch_size), \
        uniform_weights(batch_size)


def update(state: SelfPacedState, feedback: Feedback) -> SelfPacedState:
    ema, seen = sampling.track_loss(state.ema, state.seen, feedback.indices, feedback.loss,
                                    state.decay)
    t = (feedback.step + 1).astype(jnp.int32)
    return state.replace(ema=ema, seen=seen, t=t, threshold=threshold_at(state, ema, seen, t))


def summarize(state: SelfPacedState):
    lam = state.threshold
    return {"threshold": jnp.where(jnp.isfinite(lam), lam, -1.0),
            "eligible": jnp.mean(eligible(state)), "coverage": jnp.mean(state.seen)}


self_paced = register("self_paced", Curriculum(init, sample, update, summarize))

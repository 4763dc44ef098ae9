"""Pacing (competence) curricula: only the easiest fraction ``g(t)`` of the bank is eligible.

Papers and formulas (``x = min(t / (ramp * T), 1)``, ``s`` = start, ``e`` = end fraction):

* ``linear`` -- Platanios et al. 2019 (NAACL), competence ``c(t) = s + (e - s) x``
  (with ``e = 1``: ``min(1, t (1 - c0) / T + c0)``).
* ``root`` -- Platanios et al. 2019, root-p competence ``c(t) = (s^p + (e^p - s^p) x)^(1/p)``,
  ``p = 2`` ("sqrt").
* ``sqrt`` / ``quad`` -- Wu, Dyer & Neyshabur 2021 ("When do curricula work?") shapes
  ``s + (e - s) sqrt(x)`` and ``s + (e - s) x^2`` (``ramp`` = their ``a``, ``s`` = their ``b``).
* ``geometric`` -- Penha & Hauff 2020 style ``s (e / s)^x`` (``= c0^(1 - t/T)`` for ``e = 1``).
* ``exponential`` -- Hacohen & Weinshall 2019 (ICML) fixed exponential pacing
  ``min(s * inc^floor(t / step_length), e)``; defaults ``s = 0.04, inc = 1.9, step_length = 100``.
* ``step`` -- single-step pacing (Hacohen & Weinshall; Wu et al. ``step``): ``s`` until
  ``t >= ramp * T``, then ``e``.
* ``discrete`` -- DeepSpeed ``fixed_discrete``: ``levels[j]``, ``j = #{m in boundaries: t > m}``
  (``levels=(a, b, c), boundaries=(5, 10)``: ``t <= 5 -> a``, ``6..10 -> b``, ``> 10 -> c``).
* ``constant`` -- ``e``.

The bank is ordered once at ``init`` by ``difficulty`` (or by the per-row ``scores`` a config
gives, e.g. model-derived difficulty ``1 - correct/k`` or a CLIMB n-gram perplexity), ties
broken by a random permutation fixed from ``config.seed``; ``anti=True`` reverses it (hardest
first). At step ``t`` the first ``n(t)`` rows of that order are eligible, ``n = floor(g(t) E)``
(Platanios' "difficulty CDF <= c(t)", Wu et al.'s ``int(...)``) or, for ``exponential``,
``ceil(g(t) E)`` (Hacohen & Weinshall); ``rounding`` overrides it. The batch is drawn uniformly
from them, with replacement (Hacohen & Weinshall: "minibatches are sampled
uniformly from the first g(i) items"). ``mode="value"`` reads ``g(t)`` as a fraction of the
difficulty *range* instead (DeepSpeed-style: eligible iff
``difficulty <= d_min + g(t) (d_max - d_min)``). :func:`deepspeed_difficulty` reproduces
DeepSpeed's ``fixed_linear`` / ``fixed_root`` difficulty schedule exactly.

State: the order ``[E]``, the sorted keys ``[E]``, per-row draw counts ``[E]`` and the step
counter; one sample costs ``B`` gathers. ``total_steps`` is ``config.steps`` (the trainer
fills ``curriculum.total_steps`` when it is 0).

Defaults: ``kind="linear", start=0.1, end=1.0, ramp=1.0`` (``g = 1`` at ``t = T``, as in
Platanios et al.: the last trained step ``T - 1`` still leaves out the hardest ``(1 - s) / T`` of
the bank; ``ramp < 1`` trains on all of it for the final steps); ``start`` unset is ``0.04`` for
``exponential``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from curriculax.curriculum import sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights

KINDS = ("linear", "root", "sqrt", "quad", "geometric", "exponential", "step", "discrete",
         "constant")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "pacing"
    c.kind = "linear"  # one of KINDS
    c.start = None  # fraction of the bank eligible at step 0 (None: 0.1; exponential 0.04)
    c.end = 1.0  # fraction eligible once the ramp is over
    c.ramp = 1.0  # the ramp ends at ramp * total_steps
    c.p = 2.0  # root-p exponent
    c.inc = 1.9  # exponential pacing factor (Hacohen & Weinshall)
    c.step_length = 100  # exponential pacing: steps between increases
    c.levels = ()  # discrete: fractions per stage
    c.boundaries = ()  # discrete: last step of each stage but the last
    c.anti = False  # hardest first
    c.mode = "fraction"  # fraction: easiest g(t)*E rows; value: difficulty <= d_min + g(t)*range
    c.scores = ()  # optional per-row difficulty scores [E] overriding meta.difficulty
    c.seed = 0  # random tie-break permutation
    c.rounding = ""  # eligible rows: floor | ceil of g(t) * E ("": ceil for exponential, else floor)
    c.total_steps = 0  # 0: the trainer's config.steps
    return c


def fraction(kind: str, step, total_steps: int, start: float | None = None, end: float = 1.0, *,
             ramp: float = 1.0, p: float = 2.0, inc: float = 1.9, step_length: int = 100,
             levels=(), boundaries=()) -> jax.Array:
    """The pacing value ``g(step)`` (a float32 array; see the module docstring). ``start=None``
    is 0.1, or 0.04 for ``exponential`` (Hacohen & Weinshall), as in :func:`default_config`."""
    if start is None:
        start = 0.04 if kind == "exponential" else 0.1
    t = jnp.asarray(step, jnp.float32)
    span = max(float(ramp) * float(total_steps), 1e-9)
    x = jnp.clip(t / span, 0.0, 1.0)
    s, e = float(start), float(end)
    if kind == "linear":
        g = s + (e - s) * x
    elif kind == "root":
        g = (s ** p + (e ** p - s ** p) * x) ** (1.0 / p)
    elif kind == "sqrt":
        g = s + (e - s) * jnp.sqrt(x)
    elif kind == "quad":
        g = s + (e - s) * x * x
    elif kind == "geometric":
        if s <= 0:
            raise ValueError("geometric pacing needs start > 0.")
        g = s * (e / s) ** x
    elif kind == "exponential":
        g = jnp.minimum(s * inc ** jnp.floor(t / step_length), e)
    elif kind == "step":
        g = jnp.where(t >= span, e, s)
    elif kind == "discrete":
        if len(levels) != len(boundaries) + 1:
            raise ValueError(f"discrete pacing needs len(levels) == len(boundaries) + 1, got "
                             f"levels={tuple(levels)} boundaries={tuple(boundaries)}.")
        j = jnp.sum(t > jnp.asarray(boundaries, jnp.float32)) if len(boundaries) else 0
        g = jnp.asarray(levels, jnp.float32)[j]
    elif kind == "constant":
        g = jnp.full((), e)
    else:
        raise ValueError(f"pacing kind {kind!r}: choose one of {KINDS}.")
    return jnp.asarray(g, jnp.float32)


def deepspeed_difficulty(kind: str, step, total_step: int, min_difficulty: int,
                         max_difficulty: int, difficulty_step: int = 1,
                         root_degree: float = 1.0) -> jax.Array:
    """DeepSpeed ``fixed_linear`` / ``fixed_root`` curriculum difficulty (int32):
    ``x = floor((t/Tc)^(1/r) (D1 - D0) + D0); x -= x mod s; min(x, D1)``."""
    if kind not in ("fixed_linear", "fixed_root"):
        raise ValueError(f"kind={kind!r}: choose fixed_linear or fixed_root.")
    r = 1.0 if kind == "fixed_linear" else float(root_degree)
    t = jnp.asarray(step, jnp.float32)
    x = jnp.floor((t / total_step) ** (1.0 / r) * (max_difficulty - min_difficulty)
                  + min_difficulty + 1e-4).astype(jnp.int32)
    x = x - x % difficulty_step
    return jnp.minimum(x, max_difficulty)


@dataclasses.dataclass(frozen=True)
class Pace:
    """Static pacing parameters (hashable; stored as a static field of a state)."""

    kind: str = "linear"
    start: float = 0.1
    end: float = 1.0
    total_steps: int = 1
    ramp: float = 1.0
    p: float = 2.0
    inc: float = 1.9
    step_length: int = 100
    levels: tuple = ()
    boundaries: tuple = ()
    rounding: str = "floor"

    @classmethod
    def from_config(cls, c, total_steps: int) -> "Pace":
        if c.kind not in KINDS:
            raise ValueError(f"curriculum.kind={c.kind!r}: choose one of {KINDS}.")
        rounding = c.get("rounding", "") or ("ceil" if c.kind == "exponential" else "floor")
        if rounding not in ("floor", "ceil"):
            raise ValueError(f"curriculum.rounding={rounding!r}: choose floor or ceil.")
        start = c.get("start")
        start = (0.04 if c.kind == "exponential" else 0.1) if start is None else float(start)
        return cls(kind=c.kind, start=start, end=float(c.end), total_steps=total_steps,
                   ramp=float(c.ramp), p=float(c.p), inc=float(c.inc),
                   step_length=int(c.step_length), levels=tuple(float(v) for v in c.levels),
                   boundaries=tuple(int(v) for v in c.boundaries), rounding=rounding)

    def __call__(self, step) -> jax.Array:
        return fraction(self.kind, step, self.total_steps, self.start, self.end, ramp=self.ramp,
                        p=self.p, inc=self.inc, step_length=self.step_length,
                        levels=self.levels, boundaries=self.boundaries)


def eligible_count(frac, num_examples: int, rounding: str = "floor") -> jax.Array:
    """``floor`` (or ``ceil``) of ``frac * E``, clipped to ``[1, E]``; robust to the float32
    rounding of exact products (``0.6 * 1000`` is 600, not 599)."""
    x = jnp.asarray(frac, jnp.float32) * num_examples
    n = jnp.ceil(x - 1e-3) if rounding == "ceil" else jnp.floor(x + 1e-3)
    return jnp.clip(n.astype(jnp.int32), 1, num_examples)


def row_keys(cfg, meta: BankMeta) -> jax.Array:
    """Per-row difficulty keys: ``config.scores`` when given, else ``meta.difficulty``."""
    if len(cfg.scores):
        scores = np.asarray(cfg.scores, np.float32)
        if scores.shape != (meta.num_examples,):
            raise ValueError(f"curriculum.scores has {scores.shape[0]} entries for a bank of "
                             f"{meta.num_examples} rows.")
        return jnp.asarray(scores)
    return meta.difficulty.astype(jnp.float32)


@struct.dataclass
class PacingState:
    order: jax.Array  # [E] int32 rows, easiest first (hardest first when anti)
    sorted_key: jax.Array  # [E] f32 keys in that order (negated when anti)
    counts: jax.Array  # [E] int32 draws per row
    t: jax.Array  # [] int32 steps done
    pace: Pace = struct.field(pytree_node=False, default=Pace())
    mode: str = struct.field(pytree_node=False, default="fraction")
    key_range: tuple = struct.field(pytree_node=False, default=(0.0, 1.0))
    anti: bool = struct.field(pytree_node=False, default=False)


def init(config, meta: BankMeta) -> PacingState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.mode not in ("fraction", "value"):
        raise ValueError(f"curriculum.mode={cfg.mode!r}: choose fraction or value.")
    pace = Pace.from_config(cfg, sampling.require_total_steps(cfg, "pacing"))
    keys = row_keys(cfg, meta)
    if cfg.anti:
        keys = -keys
    ranks = sampling.random_ranks(jax.random.PRNGKey(cfg.seed), meta.num_examples)
    order = sampling.sort_order(keys, ranks)
    if len(cfg.scores):
        lo, hi = float(np.min(cfg.scores)), float(np.max(cfg.scores))
    else:
        lo, hi = float(meta.difficulty_min), float(meta.difficulty_max)
    key_range = (-hi, -lo) if cfg.anti else (lo, hi)
    return PacingState(order=order, sorted_key=keys[order],
                       counts=jnp.zeros((meta.num_examples,), jnp.int32),
                       t=jnp.zeros((), jnp.int32), pace=pace, mode=cfg.mode, key_range=key_range,
                       anti=bool(cfg.anti))


def num_eligible(state: PacingState, frac=None) -> jax.Array:
    frac = state.pace(state.t) if frac is None else frac
    e = state.order.shape[0]
    if state.mode == "fraction":
        return eligible_count(frac, e, state.pace.rounding)
    lo, hi = state.key_range
    threshold = lo + frac * (hi - lo) + 1e-6
    return jnp.clip(jnp.searchsorted(state.sorted_key, threshold, side="right"), 1, e)


def sample(state: PacingState, rng, meta: BankMeta, batch_size: int):
    del meta
    idx = sampling.uniform_prefix(rng, state.order, num_eligible(state), batch_size)
    return idx, uniform_weights(batch_size)


def update(state: PacingState, feedback: Feedback) -> PacingState:
    return state.replace(counts=state.counts.at[feedback.indices].add(1),
                         t=(feedback.step + 1).astype(jnp.int32))


def summarize(state: PacingState):
    frac = state.pace(state.t)
    n = num_eligible(state, frac)
    return {"fraction": frac, "eligible": n.astype(jnp.float32) / state.order.shape[0],
            "frontier": -state.sorted_key[n - 1] if state.anti else state.sorted_key[n - 1],
            "coverage": jnp.mean(state.counts > 0)}


pacing = register("pacing", Curriculum(init, sample, update, summarize))

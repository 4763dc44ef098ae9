"""CLIMB: vocabulary, data and objective curricula sharing one pacing function.

Paper: Martinez, McGovern, Goriely, Davis, Caines, Buttery, Beinborn, "CLIMB: Curriculum
Learning for Infant-inspired Model Building", CoNLL BabyLM Challenge 2023. Code:
``codebyzeb/CLIMB`` (checked in the ``suchirsalhan/MAO-CLIMB`` fork: ``pacing_fn.py``,
``difficulty_scorer/*``, ``vocabulary_map/*``, ``objective_curriculum/*``).

* :func:`pacing_fn` ``g(t) in [b, M]``: ``t0 = s_f T``, ``t1 = e_f T``, ``n = int(t1 - t0)``,
  ``D = t - t0``; ``g = b`` for ``t < t0`` (all kinds but ``step``); ``linear: b + (M-b) D/n``,
  ``quad: b + (M-b)(D/n)^2``, ``root: b + (M-b) sqrt(D/n)``, ``step: b if t < t1 else M``,
  ``exp: b + (M-b)(e^{cD/n} - 1)/(e^c - 1)``, ``log: b + (M-b)(1 + ln(D/n + e^{-c})/c)``
  (``c = 10``), all clipped at ``M``; ``kind="none"``: 1. Defaults (shipped configs):
  ``s_f = 0.0625, e_f = 0.875, b = 0.1, M = 1``.
* Vocabulary curriculum: the transform ``vocab_curriculum``
  (:mod:`curriculax.transforms.vocab_curriculum`) maps input ids ``> g(t) V`` to ``<unk>``
  (specials never) inside the step; :func:`vocab_map` is the rule.
* Data curriculum (this module's registered curriculum ``climb``): with ``q = g(t)`` the
  threshold is ``percentile(scores, 100 q)`` (numpy linear interpolation), rows with
  ``score > thr`` get weight 0, the others weight 1 (``uniform_sampling``, the default) or
  ``score``, and the batch is drawn *without replacement* (Gumbel-top-k; with replacement only
  when fewer than ``B`` rows are eligible). Scores: the bank's ``difficulty`` or ``config.scores``
  from a host-side scorer run once before training: :func:`unigram_perplexity` (CLIMB's
  ``ngram_perplexity`` with n = 1) or :func:`data_split_scores` (source ranks).
* Objective curriculum: task units active in fraction windows ``[a, b]`` of training, the
  total loss summing the active units: :func:`objective_weights` (``schedules.window``).

State of the data curriculum: scores sorted once ``[E]``, the order ``[E]``, the step counter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from curriculax.curriculum import pacing, sampling, schedules
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights

KINDS = ("linear", "quad", "root", "step", "exp", "log", "none")

# CLIMB's data_split difficulty (spoken first): lower rank = easier source.
SPOKEN_FIRST = {"aochildes": 1, "bnc_spoken": 2, "switchboard": 2, "open_subtitles": 3, "qed": 3,
                "cbt": 4, "children_stories": 4, "simple_wiki": 5, "wikipedia": 6, "gutenberg": 6}
# Example objective-curriculum configs of the paper (unit -> active window).
POS_NV_MLM = {"pos_nv": (0.0, 0.125), "mlm": (0.125, 1.0)}
MULTITASK = {"pos_nv": (0.0, 0.0625), "pos_all": (0.0625, 1.0), "mlm": (0.125, 1.0)}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "climb"
    c.kind = "linear"  # one of KINDS
    c.start_frac = 0.0625  # s_f: the ramp starts at s_f * total_steps
    c.end_frac = 0.875  # e_f: and ends at e_f * total_steps
    c.b = 0.1  # starting value
    c.max = 1.0  # M
    c.uniform_sampling = True  # eligible rows weigh 1 (else their score)
    c.scores = ()  # per-row difficulty scores [E]; () = meta.difficulty
    c.total_steps = 0  # 0: the trainer's config.steps
    return c


def pacing_fn(kind: str, step, total_steps: int, start_frac: float = 0.0625,
              end_frac: float = 0.875, b: float = 0.1, max_value: float = 1.0,
              c: float = 10.0) -> jax.Array:
    """CLIMB's pacing function ``g(t)`` (float32; see the module docstring)."""
    t = jnp.asarray(step, jnp.float32)
    t0, t1 = start_frac * total_steps, end_frac * total_steps
    n = max(int(t1 - t0), 1)
    x = jnp.maximum(t - t0, 0.0) / n
    span = max_value - b
    if kind == "none":
        return jnp.ones((), jnp.float32)
    if kind == "step":
        return jnp.where(t < t1, b, max_value).astype(jnp.float32)
    if kind == "linear":
        g = b + span * x
    elif kind == "quad":
        g = b + span * x * x
    elif kind == "root":
        g = b + span * jnp.sqrt(x)
    elif kind == "exp":
        g = b + span * (jnp.exp(c * x) - 1.0) / (math.exp(c) - 1.0)
    elif kind == "log":
        g = b + span * (1.0 + jnp.log(x + math.exp(-c)) / c)
    else:
        raise ValueError(f"CLIMB pacing kind {kind!r}: choose one of {KINDS}.")
    return jnp.where(t < t0, b, jnp.minimum(g, max_value)).astype(jnp.float32)


def vocab_map(ids, g, vocab_size: int, unk_id: int, special_min_id: int | None = None,
              special_ids=()) -> jax.Array:
    """CLIMB ``token_ids`` map: ``id > g * V`` becomes ``unk_id`` unless the id is special
    (``>= special_min_id`` or listed in ``special_ids``)."""
    ids = jnp.asarray(ids)
    special = jnp.zeros(ids.shape, bool)
    if special_min_id is not None:
        special |= ids >= special_min_id
    for s in special_ids:
        special |= ids == s
    drop = (ids.astype(jnp.float32) > g * vocab_size) & ~special
    return jnp.where(drop, jnp.asarray(unk_id, ids.dtype), ids)


def objective_weights(step, total_steps: int, units: dict) -> dict:
    """``{unit: 1.0 if active at step else 0.0}`` for ``units = {name: (a, b)}``."""
    return {name: schedules.window(step, total_steps, a, b) for name, (a, b) in units.items()}


def unigram_perplexity(tokens, mask) -> np.ndarray:
    """Per-row unigram (n = 1) MLE perplexity over the masked tokens (host-side, once).

    ``tokens``/``mask`` are ``[E, T]``; the unigram distribution is estimated on the whole
    bank's masked tokens. Rows without masked tokens get perplexity 1.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    counts = np.bincount(tokens[mask].ravel(), minlength=int(tokens.max()) + 1).astype(np.float64)
    logp = np.log(np.maximum(counts, 1e-12) / counts.sum())
    n = np.maximum(mask.sum(1), 1)
    return np.exp(-(logp[tokens] * mask).sum(1) / n).astype(np.float32)


def data_split_scores(sources, ranks: dict = SPOKEN_FIRST) -> np.ndarray:
    """Per-row scores from each row's source name (CLIMB's ``data_split`` scorer)."""
    return np.asarray([ranks[s] for s in sources], np.float32)


def percentile_sorted(sorted_values, q) -> jax.Array:
    """numpy ``percentile(values, 100 q)`` (linear interpolation) of ascending ``sorted_values``."""
    e = sorted_values.shape[0]
    pos = jnp.clip(q, 0.0, 1.0) * (e - 1)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, e - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


@struct.dataclass
class ClimbState:
    sorted_scores: jax.Array  # [E] f32 ascending
    order: jax.Array  # [E] int32 rows in that order
    t: jax.Array  # [] int32
    pace: tuple = struct.field(pytree_node=False, default=("linear", 1, 0.0625, 0.875, 0.1, 1.0))
    uniform: bool = struct.field(pytree_node=False, default=True)


def init(config, meta: BankMeta) -> ClimbState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.kind not in KINDS:
        raise ValueError(f"curriculum.kind={cfg.kind!r}: choose one of {KINDS}.")
    total = sampling.require_total_steps(cfg, "climb")
    scores = pacing.row_keys(cfg, meta)
    order = sampling.sort_order(scores, jnp.arange(meta.num_examples, dtype=jnp.int32))
    return ClimbState(sorted_scores=scores[order], order=order, t=jnp.zeros((), jnp.int32),
                      pace=(cfg.kind, total, float(cfg.start_frac), float(cfg.end_frac),
                            float(cfg.b), float(cfg["max"])),
                      uniform=bool(cfg.uniform_sampling))


def fraction(state: ClimbState, t=None) -> jax.Array:
    kind, total, s_f, e_f, b, m = state.pace
    return pacing_fn(kind, state.t if t is None else t, total, s_f, e_f, b, m)


def num_eligible(state: ClimbState) -> jax.Array:
    thr = percentile_sorted(state.sorted_scores, fraction(state))
    return jnp.maximum(jnp.searchsorted(state.sorted_scores, thr, side="right"), 1)


def sample(state: ClimbState, rng, meta: BankMeta, batch_size: int):
    del meta
    e = state.order.shape[0]
    n = num_eligible(state)
    ok = jnp.arange(e) < n
    logw = 0.0 if state.uniform else jnp.log(jnp.maximum(state.sorted_scores, 1e-12))
    k = min(batch_size, e)
    top_rng, fill_rng = jax.random.split(rng)
    pos = sampling.gumbel_top_k(top_rng, jnp.where(ok, logw, -jnp.inf), k)
    if k < batch_size:
        pos = jnp.concatenate([pos, jnp.zeros((batch_size - k,), jnp.int32)])
    fill = jax.random.randint(fill_rng, (batch_size,), 0, n, dtype=jnp.int32)
    pos = jnp.where(jnp.arange(batch_size) < n, pos, fill)  # fewer than B eligible rows
    return state.order[pos], uniform_weights(batch_size)


def update(state: ClimbState, feedback: Feedback) -> ClimbState:
    return state.replace(t=(feedback.step + 1).astype(jnp.int32))


def summarize(state: ClimbState):
    return {"pace": fraction(state),
            "eligible": num_eligible(state).astype(jnp.float32) / state.order.shape[0]}


climb = register("climb", Curriculum(init, sample, update, summarize))

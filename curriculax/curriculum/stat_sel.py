"""STAT-Sel (Skill-Targeted Adaptive Training, selection variant): sample for missing skills.

Idea (STAT, "Skill-Targeted Adaptive Training", 2025): find the skills the model fails on,
collect them in a *Missing-Skill-Profile* (how often each skill appears among failures), and
select training examples whose skills match that profile. The paper labels skills with a
teacher LLM; here each row's skills are a multi-hot vector derived from its labels
(``skills="category"``, ``"difficulty"``, ``"category+difficulty"`` (both one-hots), ``"joint"``
(one skill per pair), or ``"given"``: ``category_skills`` ``[K, M]`` and/or
``difficulty_skills`` ``[D, M]`` row-major matrices, OR-ed).

In-jit rule (design choices documented here; no official code was available):

* A batch row *fails* when its teacher-forced ``token_accuracy < accuracy_threshold`` (default
  1.0: any wrong response token), or -- on RL steps where ``feedback.reward`` is given -- when
  ``reward < reward_threshold``. ``failure="relative"`` compares instead with a running mean
  (EMA, ``mean_decay``) of the batches' token accuracy (or reward): for a weak model that fails
  almost every row in absolute terms, the profile then tracks *relative* weakness.
* Missing-Skill-Profile ``m_s`` (decayed counts): ``m <- decay * m + sum_{failed rows} skills``;
  attempts ``a`` likewise over all rows. The profile is ``pi_s = m_s / sum(m)``.
* Row weight ``w_i = eps + sum_s S_is pi_s`` (``eps = uniform_mix`` keeps every row reachable);
  batches are drawn with probability ∝ ``w`` (inverse-CDF, O(E)). With no failures yet, every
  row has the same weight.

Per-row skill vectors are never materialized: ``w_i`` is a lookup ``table[category_i,
difficulty_i]`` of a ``[K, D]`` table computed per step. Defaults: ``skills="category+difficulty",
decay=0.99, uniform_mix=0.1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from curriculax.curriculum import sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights

SKILLS = ("category", "difficulty", "category+difficulty", "joint", "given")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "stat_sel"
    c.skills = "category+difficulty"  # one of SKILLS
    c.category_skills = ()  # given: K*M entries (row-major)
    c.difficulty_skills = ()  # given: D*M entries (row-major), D = difficulty levels
    c.num_skills = 0  # given: M
    c.accuracy_threshold = 1.0  # a row fails when token_accuracy < this
    c.reward_threshold = 0.5  # RL steps: a row fails when reward < this
    c.failure = "absolute"  # absolute: the thresholds above; relative: below the running mean
    c.mean_decay = 0.9  # failure=relative: EMA of the batch-mean token accuracy / reward
    c.decay = 0.99  # per-step decay of the profile counts
    c.uniform_mix = 0.1  # eps added to every row's weight
    return c


def skill_tables(cfg, k: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cat_skills [K, M], diff_skills [D, M])`` float 0/1 multi-hot tables."""
    kind = cfg.skills
    if kind == "category":
        return np.eye(k, dtype=np.float32), np.zeros((levels, k), np.float32)
    if kind == "difficulty":
        return np.zeros((k, levels), np.float32), np.eye(levels, dtype=np.float32)
    if kind == "category+difficulty":
        cat = np.concatenate([np.eye(k), np.zeros((k, levels))], 1).astype(np.float32)
        diff = np.concatenate([np.zeros((levels, k)), np.eye(levels)], 1).astype(np.float32)
        return cat, diff
    if kind == "given":
        m = int(cfg.num_skills)
        if m <= 0:
            raise ValueError("curriculum.skills='given' needs curriculum.num_skills > 0.")
        cat = (np.asarray(cfg.category_skills, np.float32).reshape(k, m)
               if len(cfg.category_skills) else np.zeros((k, m), np.float32))
        diff = (np.asarray(cfg.difficulty_skills, np.float32).reshape(levels, m)
                if len(cfg.difficulty_skills) else np.zeros((levels, m), np.float32))
        return cat, diff
    raise ValueError(f"curriculum.skills={kind!r}: choose one of {SKILLS}.")


@struct.dataclass
class StatSelState:
    missing: jax.Array  # [M] f32 decayed failure counts per skill (the profile, unnormalized)
    attempts: jax.Array  # [M] f32 decayed attempts per skill
    cat_skills: jax.Array  # [K, M] (joint: [K*D, M] with diff_skills unused)
    diff_skills: jax.Array  # [D, M]
    mean_score: jax.Array  # [] f32 running mean of token accuracy / reward (failure=relative)
    scored: jax.Array  # [] bool whether mean_score holds a value yet
    difficulty_min: int = struct.field(pytree_node=False, default=0)
    levels: int = struct.field(pytree_node=False, default=1)
    joint: bool = struct.field(pytree_node=False, default=False)
    accuracy_threshold: float = struct.field(pytree_node=False, default=1.0)
    reward_threshold: float = struct.field(pytree_node=False, default=0.5)
    decay: float = struct.field(pytree_node=False, default=0.99)
    relative: bool = struct.field(pytree_node=False, default=False)
    mean_decay: float = struct.field(pytree_node=False, default=0.9)
    uniform_mix: float = struct.field(pytree_node=False, default=0.1)


def init(config, meta: BankMeta) -> StatSelState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.failure not in ("absolute", "relative"):
        raise ValueError(f"curriculum.failure={cfg.failure!r}: choose absolute or relative.")
    k, levels = meta.num_categories, meta.difficulty_max - meta.difficulty_min + 1
    joint = cfg.skills == "joint"
    if joint:
        cat, diff = np.eye(k * levels, dtype=np.float32), np.zeros((levels, k * levels), np.float32)
    else:
        cat, diff = skill_tables(cfg, k, levels)
    m = cat.shape[1]
    return StatSelState(missing=jnp.zeros((m,), jnp.float32), attempts=jnp.zeros((m,), jnp.float32),
                        cat_skills=jnp.asarray(cat), diff_skills=jnp.asarray(diff),
                        mean_score=jnp.zeros((), jnp.float32), scored=jnp.zeros((), bool),
                        relative=cfg.failure == "relative", mean_decay=float(cfg.mean_decay),
                        difficulty_min=meta.difficulty_min, levels=levels, joint=joint,
                        accuracy_threshold=float(cfg.accuracy_threshold),
                        reward_threshold=float(cfg.reward_threshold), decay=float(cfg.decay),
                        uniform_mix=float(cfg.uniform_mix))


def row_skills(state: StatSelState, category, difficulty) -> jax.Array:
    """Multi-hot skills ``[..., M]`` of rows with these labels."""
    d = jnp.clip(difficulty - state.difficulty_min, 0, state.levels - 1)
    if state.joint:
        return state.cat_skills[category * state.levels + d]
    return jnp.maximum(state.cat_skills[category], state.diff_skills[d])


def profile(state: StatSelState) -> jax.Array:
    """The Missing-Skill-Profile ``pi`` [M] (zeros before any failure)."""
    total = jnp.sum(state.missing)
    return jnp.where(total > 0, state.missing / jnp.maximum(total, 1e-12), 0.0)


def row_weights(state: StatSelState, meta: BankMeta) -> jax.Array:
    """``eps + S_i . pi`` for every row [E], via a ``[K, D]`` lookup table."""
    k = state.cat_skills.shape[0] // (state.levels if state.joint else 1)
    cats = jnp.arange(k)[:, None]
    diffs = jnp.arange(state.levels)[None, :] + state.difficulty_min
    table = jnp.sum(row_skills(state, cats, diffs) * profile(state), axis=-1)  # [K, D]
    d = jnp.clip(meta.difficulty - state.difficulty_min, 0, state.levels - 1)
    return state.uniform_mix + table[meta.category, d]


def sample(state: StatSelState, rng, meta: BankMeta, batch_size: int):
    return sampling.categorical_rows(rng, row_weights(state, meta), batch_size), \
        uniform_weights(batch_size)


def _scores(feedback: Feedback) -> jax.Array:
    return feedback.reward if feedback.reward is not None else feedback.token_accuracy


def failures(state: StatSelState, feedback: Feedback) -> jax.Array:
    score = _scores(feedback)
    if state.relative:  # below the running mean (the batch mean on the first step)
        ref = jnp.where(state.scored, state.mean_score, jnp.mean(score))
        return score < ref
    threshold = state.reward_threshold if feedback.reward is not None else state.accuracy_threshold
    return score < threshold


def update(state: StatSelState, feedback: Feedback) -> StatSelState:
    s = row_skills(state, feedback.category, feedback.difficulty)  # [B, M]
    fail = failures(state, feedback).astype(jnp.float32)
    batch_mean = jnp.mean(_scores(feedback)).astype(jnp.float32)
    d = state.mean_decay
    mean = jnp.where(state.scored, d * state.mean_score + (1 - d) * batch_mean, batch_mean)
    return state.replace(missing=state.decay * state.missing + jnp.sum(fail[:, None] * s, 0),
                         attempts=state.decay * state.attempts + jnp.sum(s, 0), mean_score=mean,
                         scored=jnp.ones((), bool))


def summarize(state: StatSelState):
    rate = state.missing / jnp.maximum(state.attempts, 1e-12)
    return {"profile": profile(state), "failure_rate": rate}


# Its state is per skill and the rows it weighs are looked up by label, so streamed pools work.
stat_sel = register("stat_sel", Curriculum(init, sample, update, summarize, pool_safe=True))

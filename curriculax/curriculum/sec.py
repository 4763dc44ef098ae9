"""Self-Evolving Curriculum (SEC): a non-stationary bandit over problem arms.

Paper: Chen, Lu, Kim, Zhang, Tang, Piché, Gontier, Bengio, Kamalloo, "Self-Evolving Curriculum
for LLM Reasoning", arXiv 2505.14970 (2025). Rules checked against the authors' verl code
(``verl/utils/auto_curriculum/priority.py``, ``dataloader.py``; see methods/sec.md).

* Arms ``c = 1..K``: categories, difficulty levels, or their product (``arms="joint"``).
* Policy: ``pi(c) = softmax(Q / tau)`` (:func:`boltzmann`) over the *non-empty* arms; each of the
  ``B`` batch slots draws an arm i.i.d. and takes the arm's next unused row (each arm's list is
  shuffled once and cycles, ``within="queue"``; ``within="uniform"`` draws with replacement).
  Empty arms are never drawn (the code falls back to a random non-empty arm instead).
* Reward of arm ``c`` at step ``t``: ``r_t(c)`` = mean ``|A|`` over the batch rows of arm ``c``
  when the step provides GRPO advantages (``reward="advantage"``, SEC's default objective).
  Supervised steps have none, so ``reward="auto"`` falls back to a learning-progress signal:
  ``progress`` = mean over the arm's rows of (the row's previous loss - its loss now), counted
  on rows seen before (design choice, in the spirit of the code's ``progress`` objective);
  ``abs_progress`` = its absolute value; ``loss`` = the arm's mean loss.
* TD(0): ``Q <- (1 - alpha) Q + alpha r`` (:func:`td_update`). By default (the code) every arm is
  updated and an arm not drawn this step gets ``r = 0``, so its ``Q`` decays;
  ``update_unseen=False`` keeps it (the paper-style reading). ``Q_0 = 0`` (uniform start).

Defaults: ``alpha = 0.5, tau = 1.0`` (the README runs; the code's config default is 0.1),
``arms="difficulty"``, ``reward="auto"``. State: ``Q [K]``, arm queues, per-row last loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from curriculax.curriculum import sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights

ARMS = ("category", "difficulty", "joint")
REWARDS = ("auto", "advantage", "progress", "abs_progress", "loss")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "sec"
    c.arms = "difficulty"  # category | difficulty | joint
    c.alpha = 0.5  # TD(0) step size
    c.tau = 1.0  # Boltzmann temperature
    c.reward = "auto"  # auto (advantage if given, else progress) | advantage | progress | ...
    c.update_unseen = True  # arms not drawn this step get reward 0 (code) or keep Q (False)
    c.within = "queue"  # queue: next unused row of the arm (code); uniform: with replacement
    c.seed = 0
    return c


def boltzmann(q, tau: float, valid=None) -> jax.Array:
    """``softmax(q / tau)``; arms with ``valid == False`` get probability 0."""
    logits = jnp.asarray(q, jnp.float32) / tau
    if valid is not None:
        logits = jnp.where(valid, logits, -jnp.inf)
    return jax.nn.softmax(logits)


def td_update(q, arm_reward, arm_count, alpha: float, *, update_unseen: bool = True):
    """``Q <- (1 - alpha) Q + alpha r``; arms with ``arm_count == 0`` get ``r = 0``
    (``update_unseen=True``, the code) or keep their value (``False``)."""
    drawn = jnp.asarray(arm_count) > 0
    r = jnp.where(drawn, arm_reward, 0.0)
    new = (1.0 - alpha) * q + alpha * r
    return new if update_unseen else jnp.where(drawn, new, q)


def arm_rewards(values, arms, num_arms: int, where=None):
    """``(mean value per arm, count per arm)`` over the batch (e.g. ``values = |A|``)."""
    return sampling.segment_mean(values, arms, num_arms, where)


def num_arms(arms: str, meta: BankMeta) -> int:
    levels = meta.difficulty_max - meta.difficulty_min + 1
    return {"category": meta.num_categories, "difficulty": levels,
            "joint": meta.num_categories * levels}[arms]


def arm_of(arms: str, category, difficulty, difficulty_min: int, levels: int):
    d = jnp.clip(difficulty - difficulty_min, 0, levels - 1)
    if arms == "category":
        return category.astype(jnp.int32)
    if arms == "difficulty":
        return d.astype(jnp.int32)
    return (category * levels + d).astype(jnp.int32)


@struct.dataclass
class SECState:
    q: jax.Array  # [K] f32 arm values
    groups: sampling.Groups  # rows by arm
    cursor: jax.Array  # [K] int32 next unused position per arm
    last_loss: jax.Array  # [E] f32 each row's loss at its last visit
    seen: jax.Array  # [E] bool
    last_reward: jax.Array  # [K] f32
    pulls: jax.Array  # [K] int32 rows drawn per arm
    arms: str = struct.field(pytree_node=False, default="difficulty")
    difficulty_min: int = struct.field(pytree_node=False, default=0)
    levels: int = struct.field(pytree_node=False, default=1)
    alpha: float = struct.field(pytree_node=False, default=0.5)
    tau: float = struct.field(pytree_node=False, default=1.0)
    reward: str = struct.field(pytree_node=False, default="auto")
    update_unseen: bool = struct.field(pytree_node=False, default=True)
    queue: bool = struct.field(pytree_node=False, default=True)


def init(config, meta: BankMeta) -> SECState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.arms not in ARMS:
        raise ValueError(f"curriculum.arms={cfg.arms!r}: choose one of {ARMS}.")
    if cfg.reward not in REWARDS:
        raise ValueError(f"curriculum.reward={cfg.reward!r}: choose one of {REWARDS}.")
    if cfg.within not in ("queue", "uniform"):
        raise ValueError(f"curriculum.within={cfg.within!r}: choose queue or uniform.")
    if not float(cfg.tau) > 0:
        raise ValueError(f"curriculum.tau={cfg.tau!r} must be > 0 (softmax(Q / tau)).")
    k = num_arms(cfg.arms, meta)
    levels = meta.difficulty_max - meta.difficulty_min + 1
    arm = arm_of(cfg.arms, meta.category, meta.difficulty, meta.difficulty_min, levels)
    e = meta.num_examples
    return SECState(
        q=jnp.zeros((k,), jnp.float32),
        groups=sampling.make_groups(jax.random.PRNGKey(cfg.seed), arm, k),
        cursor=jnp.zeros((k,), jnp.int32), last_loss=jnp.zeros((e,), jnp.float32),
        seen=jnp.zeros((e,), bool), last_reward=jnp.zeros((k,), jnp.float32),
        pulls=jnp.zeros((k,), jnp.int32), arms=cfg.arms, difficulty_min=meta.difficulty_min,
        levels=levels, alpha=float(cfg.alpha), tau=float(cfg.tau), reward=cfg.reward,
        update_unseen=bool(cfg.update_unseen), queue=cfg.within == "queue")


def policy(state: SECState) -> jax.Array:
    return boltzmann(state.q, state.tau, state.groups.size > 0)


def sample(state: SECState, rng, meta: BankMeta, batch_size: int):
    del meta
    arm_rng, row_rng = jax.random.split(rng)
    logits = jnp.where(state.groups.size > 0, state.q / state.tau, -jnp.inf)
    arms = jax.random.categorical(arm_rng, logits, shape=(batch_size,)).astype(jnp.int32)
    idx = sampling.sample_in_groups(row_rng, state.groups, arms,
                                    state.cursor if state.queue else None)
    return idx, uniform_weights(batch_size)


def _reward_kind(state: SECState, feedback: Feedback) -> str:
    if state.reward == "auto":  # static: RL steps carry advantages, SFT steps do not
        return "advantage" if feedback.advantage is not None else "progress"
    return state.reward


def _reward(state: SECState, feedback: Feedback, arms, k: int):
    kind = _reward_kind(state, feedback)
    if kind == "advantage":
        if feedback.advantage is None:
            raise ValueError("curriculum.reward='advantage' needs feedback.advantage (RL steps).")
        return arm_rewards(jnp.abs(feedback.advantage), arms, k)
    if kind == "loss":
        return arm_rewards(feedback.loss, arms, k)
    prev_seen = state.seen[feedback.indices]
    delta = state.last_loss[feedback.indices] - feedback.loss
    if kind == "abs_progress":
        delta = jnp.abs(delta)
    return arm_rewards(delta, arms, k, where=prev_seen)


def update(state: SECState, feedback: Feedback) -> SECState:
    k = state.q.shape[0]
    arms = arm_of(state.arms, feedback.category, feedback.difficulty, state.difficulty_min,
                  state.levels)
    reward, count = _reward(state, feedback, arms, k)
    q = td_update(state.q, reward, count, state.alpha, update_unseen=state.update_unseen)
    drawn = jax.ops.segment_sum(jnp.ones_like(arms), arms, num_segments=k)
    size = jnp.maximum(state.groups.size, 1)
    state = state.replace(q=q, cursor=(state.cursor + drawn) % size, last_reward=reward,
                          pulls=state.pulls + drawn)
    if _reward_kind(state, feedback) in ("progress", "abs_progress"):  # per-row memory
        # a row drawn twice keeps its batch mean (a plain scatter-set of duplicates is arbitrary)
        last_loss, seen = sampling.track_loss(state.last_loss, state.seen, feedback.indices,
                                              feedback.loss, 0.0)
        state = state.replace(last_loss=last_loss, seen=seen)
    return state


def summarize(state: SECState):
    return {"q": state.q, "policy": policy(state), "reward": state.last_reward}


sec = register("sec", Curriculum(init, sample, update, summarize))

"""Skill-It!: online data mixing over skills by multiplicative weights on validation losses.

Paper: Chen, Roberts, Bhatia, Wang, Zhang, Sala, Ré, "Skill-It! A Data-Driven Skills Framework
for Understanding and Training Language Models", arXiv 2307.14430 (NeurIPS 2023). Code:
``HazyResearch/skill-it`` (``trainer/mw_trainer.py``).

Skills are the bank's categories (``k = m``, the continual setting). Training runs in rounds of
``update_steps`` steps (default ``total_steps // rounds``); before round ``t + 1`` the mixture is

    p_i(t + 1) ∝ prior_i * exp( eta * sum_j A_ij * sum_{tau in window} L_j(tau) )

(:func:`mixture`) where ``L_j(tau)`` are per-skill validation losses and the window keeps the last
``window`` entries of the loss history. Before any loss is seen the losses count as 1
(``p ∝ prior * exp(eta * A 1)``). Batches draw a skill from ``p`` per slot and a row uniformly
inside it.

Validation losses come from the step's ``probe`` hook: ``holdout_per_skill`` rows of every skill
are reserved at init (never sampled for training) and each step evaluates ``probe_per_skill``
of them per skill, forward only, rotating through the pool. The history starts with the probe
loss of the first round's first step (the paper's step-0 evaluation, ``L(0)``) and gets one entry
per round, the mean probe loss of each skill over the round (design choice: the code evaluates
the whole validation set at checkpoints; rotating keeps the per-step probe cost at
``k * probe_per_skill`` rows). A skill with a single row keeps it for training and has no
held-out rows: its entries are the measured skills' mean. Steps without probes (the RL and
preference trainers run none) are an error, not a silent uniform mixture.

Skills graph ``A`` (``k x k``, ``A_ij`` = how much training on ``i`` helps ``j``):
``graph="identity"`` (the "no graph" fallback), ``"given"`` (``graph_matrix``, row-major; with
``rescale_binary`` off-diagonal 1s become 0.5 as in the code), or ``"estimated"`` (design
choice, the paper's idea done online): the run starts with ``k`` segments of ``graph_steps``
steps, segment ``i`` training only on skill ``i``; with ``D_ij`` = the drop of skill ``j``'s mean
probe loss from the previous segment to segment ``i``,
``A_ij = clip(D_ij / D_ii, 0, 1)`` (``A_ii = 1``; a row with ``D_ii <= 0`` stays identity).
Rounds start after the estimation.

Defaults (framework suggestion in methods/skill_it.md): ``eta=0.5, window=3, rounds=6``,
prior 1, identity graph, ``holdout_per_skill=8, probe_per_skill=1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from curriculax.curriculum import sampling
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights

GRAPHS = ("identity", "given", "estimated")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "skill_it"
    c.eta = 0.5  # multiplicative-weights step size
    c.window = 3  # loss-history entries summed
    c.rounds = 6  # mixture updates per run (update_steps = total_steps // rounds)
    c.update_steps = 0  # > 0 overrides rounds
    c.graph = "identity"  # identity | given | estimated
    c.graph_matrix = ()  # given: k*k entries, row-major (A_ij: training i helps j)
    c.rescale_binary = True  # given: off-diagonal 1s become 0.5 (the code's convention)
    c.graph_steps = 10  # estimated: steps of single-skill training per skill
    c.prior = ()  # k prior weights (default 1)
    c.holdout_per_skill = 8  # rows per skill reserved for validation (never trained on)
    c.probe_per_skill = 1  # held-out rows per skill evaluated each step
    c.seed = 0
    c.total_steps = 0  # 0: the trainer's config.steps
    return c


def mixture(graph, loss_sum, eta: float, prior=None) -> jax.Array:
    """``p_i ∝ prior_i exp(eta * sum_j A_ij loss_sum_j)`` (computed as a stable softmax)."""
    graph, loss_sum = jnp.asarray(graph, jnp.float32), jnp.asarray(loss_sum, jnp.float32)
    logits = eta * jnp.sum(graph * loss_sum[None, :], axis=1)  # no matmul: exact f32 on TPU
    if prior is not None:
        logits = logits + jnp.log(jnp.asarray(prior, jnp.float32))
    return jax.nn.softmax(logits)


def given_graph(values, k: int, rescale_binary: bool = True) -> np.ndarray:
    """A ``k x k`` graph from a row-major list; binary off-diagonal 1s -> 0.5 when rescaling."""
    a = np.asarray(values, np.float32).reshape(k, k)
    if rescale_binary and np.all(np.isin(a, (0.0, 1.0))):
        a = np.where(np.eye(k, dtype=bool), a, 0.5 * a)
    return a


@struct.dataclass
class SkillItState:
    p: jax.Array  # [k] mixture
    graph: jax.Array  # [k, k] A
    history: jax.Array  # [W, k] loss history (last row newest)
    filled: jax.Array  # [] int32 valid history rows
    acc_sum: jax.Array  # [k] probe-loss sum of the current round / segment
    acc_n: jax.Array  # [k]
    baseline: jax.Array  # [k] estimation: the previous segment's mean probe loss
    val_loss: jax.Array  # [k] latest round mean
    groups: sampling.Groups  # trainable rows by skill
    pool: jax.Array  # [k, H] held-out rows per skill
    pool_size: jax.Array  # [k] int32
    t: jax.Array  # [] int32
    prior: jax.Array  # [k]
    eta: float = struct.field(pytree_node=False, default=0.5)
    update_steps: int = struct.field(pytree_node=False, default=1)
    estimate_steps: int = struct.field(pytree_node=False, default=0)  # per skill; 0 = none
    probe_per_skill: int = struct.field(pytree_node=False, default=1)


def init(config, meta: BankMeta) -> SkillItState:
    cfg = sampling.with_defaults(config, default_config())
    if cfg.graph not in GRAPHS:
        raise ValueError(f"curriculum.graph={cfg.graph!r}: choose one of {GRAPHS}.")
    total = sampling.require_total_steps(cfg, "skill_it")
    k, e = meta.num_categories, meta.num_examples
    estimate = int(cfg.graph_steps) if cfg.graph == "estimated" else 0
    rounds_steps = max(total - k * estimate, 1)
    update_steps = int(cfg.update_steps) or max(rounds_steps // max(int(cfg.rounds), 1), 1)
    if cfg.graph == "given":
        if len(cfg.graph_matrix) != k * k:
            raise ValueError(f"curriculum.graph_matrix needs {k}*{k} entries, got "
                             f"{len(cfg.graph_matrix)}.")
        graph = jnp.asarray(given_graph(cfg.graph_matrix, k, cfg.rescale_binary))
    else:
        graph = jnp.eye(k, dtype=jnp.float32)
    prior = jnp.asarray(cfg.prior if len(cfg.prior) else np.ones(k), jnp.float32)
    if prior.shape != (k,):
        raise ValueError(f"curriculum.prior needs {k} entries, got {prior.shape[0]}.")

    # Reserve held-out rows: the first h_c rows of each skill's shuffled list (keep >= 1 to train).
    hold_rng, train_rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
    cat = meta.category.astype(jnp.int32)
    all_groups = sampling.make_groups(hold_rng, cat, k)
    h = int(cfg.holdout_per_skill)
    pool_size = jnp.clip(jnp.minimum(h, all_groups.size - 1), 0, None).astype(jnp.int32)
    rank = jnp.zeros((e,), jnp.int32).at[all_groups.order].set(jnp.arange(e, dtype=jnp.int32))
    held = (rank - all_groups.start[cat]) < pool_size[cat]
    j = jnp.arange(max(h, 1), dtype=jnp.int32)[None, :]
    pos = all_groups.start[:, None] + jnp.minimum(j, jnp.maximum(pool_size[:, None] - 1, 0))
    pool = all_groups.order[jnp.clip(pos, 0, e - 1)]
    groups = sampling.make_groups(train_rng, jnp.where(held, -1, cat), k)

    w = int(cfg.window)
    return SkillItState(
        p=mixture(graph, jnp.ones((k,)), cfg.eta, prior), graph=graph,
        history=jnp.zeros((w, k), jnp.float32), filled=jnp.zeros((), jnp.int32),
        acc_sum=jnp.zeros((k,), jnp.float32), acc_n=jnp.zeros((k,), jnp.float32),
        baseline=jnp.zeros((k,), jnp.float32), val_loss=jnp.zeros((k,), jnp.float32),
        groups=groups, pool=pool, pool_size=pool_size, t=jnp.zeros((), jnp.int32), prior=prior,
        eta=float(cfg.eta), update_steps=update_steps, estimate_steps=estimate,
        probe_per_skill=int(cfg.probe_per_skill))


def held_out_mask(state: SkillItState, num_examples: int) -> jax.Array:
    """[E] bool: rows reserved for validation (never sampled)."""
    valid = jnp.arange(state.pool.shape[1])[None, :] < state.pool_size[:, None]
    return jnp.zeros((num_examples,), bool).at[state.pool].max(valid)


def _estimating(state: SkillItState, t):
    k = state.p.shape[0]
    return t < k * state.estimate_steps


def sample(state: SkillItState, rng, meta: BankMeta, batch_size: int):
    del meta
    k = state.p.shape[0]
    arm_rng, row_rng = jax.random.split(rng)
    logits = jnp.where(state.groups.size > 0, jnp.log(state.p), -jnp.inf)
    arms = jax.random.categorical(arm_rng, logits, shape=(batch_size,)).astype(jnp.int32)
    if state.estimate_steps:
        seg = jnp.minimum(state.t // state.estimate_steps, k - 1).astype(jnp.int32)
        # a skill with no trainable rows keeps the mixture (its group would index other rows)
        single = _estimating(state, state.t) & (state.groups.size[seg] > 0)
        arms = jnp.where(single, jnp.full_like(arms, seg), arms)
    return sampling.sample_in_groups(row_rng, state.groups, arms), uniform_weights(batch_size)


def probe(state: SkillItState, rng, meta: BankMeta) -> jax.Array:
    del rng, meta
    n = state.probe_per_skill
    j = (state.t * n + jnp.arange(n, dtype=jnp.int32))[None, :] % jnp.maximum(
        state.pool_size[:, None], 1)
    return jnp.take_along_axis(state.pool, j, axis=1).reshape(-1)


def update(state: SkillItState, feedback: Feedback) -> SkillItState:
    k, n = state.p.shape[0], state.probe_per_skill
    t = feedback.step.astype(jnp.int32)
    valid = (state.pool_size > 0).astype(jnp.float32)
    if feedback.probe_loss is None:
        raise ValueError("curriculum.name='skill_it' needs per-skill validation losses from the "
                         "train step's probe; this trainer runs none (the SFT trainer does): pick "
                         "another curriculum, e.g. 'sec'.")
    # float32 whatever the feedback's dtype: the state must keep its dtypes (lax.scan carries)
    probe_mean = feedback.probe_loss.astype(jnp.float32).reshape(k, n).mean(axis=1)
    acc_sum, acc_n = state.acc_sum + valid * probe_mean, state.acc_n + valid
    mean = jnp.where(acc_n > 0, acc_sum / jnp.maximum(acc_n, 1.0), 0.0)
    state = state.replace(t=t + 1)

    # Graph estimation: at the end of segment i, row i of A from the probe-loss drops.
    est = state.estimate_steps
    graph, baseline = state.graph, state.baseline
    if est:
        baseline = jnp.where(t == 0, mean, baseline)
        seg = t // est
        seg_end = ((t + 1) % est == 0) & (seg < k)
        drop = baseline - mean
        self_drop = drop[jnp.clip(seg, 0, k - 1)]
        row = jnp.where(self_drop > 0, jnp.clip(drop / jnp.maximum(self_drop, 1e-12), 0.0, 1.0),
                        jnp.zeros((k,), jnp.float32))
        row = row.at[jnp.clip(seg, 0, k - 1)].set(1.0)
        graph = jnp.where(seg_end & (jnp.arange(k) == seg)[:, None], row[None, :], graph)
        baseline = jnp.where(seg_end, mean, baseline)
    in_rounds = t >= k * est
    round_end = in_rounds & (((t + 1 - k * est) % state.update_steps) == 0)
    est_end = (t + 1 == k * est) if est else jnp.bool_(False)
    reset = round_end | est_end | (est > 0) & ~in_rounds & (((t + 1) % max(est, 1)) == 0)

    def push(history, filled, entry, when):
        return (jnp.where(when, jnp.roll(history, -1, axis=0).at[-1].set(entry), history),
                jnp.where(when, jnp.minimum(filled + 1, history.shape[0]), filled))

    history, filled = push(state.history, state.filled, _measured(probe_mean, valid),
                           t == k * est)  # L(0)
    history, filled = push(history, filled, _measured(mean, valid), round_end)
    rows = jnp.arange(history.shape[0]) >= history.shape[0] - filled
    loss_sum = jnp.where(filled > 0, jnp.sum(jnp.where(rows[:, None], history, 0.0), 0),
                         jnp.ones((k,), jnp.float32))
    p = jnp.where(round_end | est_end, mixture(graph, loss_sum, state.eta, state.prior), state.p)
    return state.replace(
        p=p, graph=graph, history=history, filled=filled, baseline=baseline,
        acc_sum=jnp.where(reset, 0.0, acc_sum), acc_n=jnp.where(reset, 0.0, acc_n),
        val_loss=jnp.where(round_end, _measured(mean, valid), state.val_loss))


def _measured(loss, valid):
    """Per-skill losses where a skill without held-out rows (a single row, kept to train) counts
    as the measured skills' mean: a neutral weight.  Its probe reads another skill's row, and 0
    would read as "learned" and starve it."""
    neutral = jnp.sum(loss * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return jnp.where(valid > 0, loss, neutral)


def summarize(state: SkillItState):
    k = state.p.shape[0]
    off = jnp.sum(state.graph * (1 - jnp.eye(k))) / max(k * (k - 1), 1)
    return {"mixture": state.p, "val_loss": state.val_loss, "graph_offdiag": off}


skill_it = register("skill_it", Curriculum(init, sample, update, summarize, probe))

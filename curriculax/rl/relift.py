"""ReLIFT: RL interleaved with online fine-tuning on the hardest questions.

Paper: Ma et al., "Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning for
Hardest Questions", 2025 (arXiv 2506.07527); code ``TheRoadQaQ/ReLIFT`` (``../shared/methods/relift.md``).

Per RL step, every prompt whose G rollouts are all wrong ("solve none") is *prepended* to a
buffer of bank rows (newest first). Once the buffer holds ``sft_size`` rows, one SFT update runs
on the first ``sft_size`` of them with their demonstrations (the bank row's gold response)::

    L_sft = token_mean(-log pi(y_t)) - entropy_coef * token_mean(H_t)

and those rows leave the buffer, so the RL:SFT ratio is data-driven. The buffer lives in
``TrainState.rl`` and everything runs inside the jitted RL step (``lax.cond``), so nothing
returns to the host. Deviation from the code: the SFT update uses the RL optimizer (the repo
configures a second optimizer with the same lr 1e-6), so each SFT update also advances that
optimizer's count: a decaying learning-rate schedule runs ahead of the RL steps by the number of
SFT updates (and the logged ``lr``, computed from RL updates only, lags it); use a constant
schedule to match the repo. Rows that fail by format (reward -1 in the repo) are not separated
because our rewards do not have a format-failure value.

Defaults (``config.rl``): ``relift_sft_size`` 8 (repo 128 with 8 rollouts x 128 prompts),
``relift_capacity`` 64, ``relift_entropy_coef`` 0.0 (repo 0.001); the repo's RL side uses
``advantage_std="none"``, no clipping and ``aggregation="seq_sum_norm"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from curriculax import objectives
from curriculax.models.layers import AuxLoss


@struct.dataclass
class ReliftState:
    buffer: jax.Array  # [C] int32 bank rows, newest first
    count: jax.Array  # [] int32 valid entries
    collected: jax.Array  # [] int32 hardest prompts seen so far
    sft_updates: jax.Array  # [] int32 SFT steps taken


def init(capacity: int) -> ReliftState:
    z = jnp.zeros((), jnp.int32)
    return ReliftState(jnp.zeros((capacity,), jnp.int32), z, z, z)


def push(state: ReliftState, rows_P, hardest_P) -> ReliftState:
    """Prepends the hardest rows (in batch order) to the buffer; the oldest fall off the end."""
    cap = state.buffer.shape[0]
    order = jnp.argsort(~hardest_P, stable=True)  # hardest rows first, batch order kept
    new = rows_P[order]
    n_new = hardest_P.sum().astype(jnp.int32)
    slot = jnp.arange(cap)
    old = state.buffer[jnp.clip(slot - n_new, 0, cap - 1)]
    fresh = new[jnp.clip(slot, 0, new.shape[0] - 1)]
    buffer = jnp.where(slot < n_new, fresh, old)
    return state.replace(buffer=buffer, count=jnp.minimum(state.count + n_new, cap),
                         collected=state.collected + n_new)


def pop(state: ReliftState, size: int):
    """``(rows [size], state)``: the ``size`` newest rows, removed from the buffer."""
    cap = state.buffer.shape[0]
    slot = jnp.arange(cap)
    rows = state.buffer[:size]
    buffer = jnp.where(slot + size < cap, state.buffer[jnp.clip(slot + size, 0, cap - 1)], 0)
    return rows, state.replace(buffer=buffer, count=state.count - size,
                               sft_updates=state.sft_updates + 1)


def sft_loss(token_logprob_BxT, entropy_BxT, mask_BxT, entropy_coef: float = 0.0):
    """Token-mean NLL minus ``entropy_coef`` times the token-mean entropy."""
    m = mask_BxT.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    return jnp.sum(-token_logprob_BxT * m) / n - entropy_coef * jnp.sum(entropy_BxT * m) / n


def make_interleave(*, graphdef, optimizer, config, to_model=lambda p: p, head=None):
    """``interleave(state, bank, rows_P, correct_PxG) -> (state, metrics)`` for the RL step;
    ``head``: :func:`curriculax.objectives.lm_head_stats` options (mesh, impl)."""
    rl = config.rl
    size, coef = int(rl.relift_sft_size), float(rl.relift_entropy_coef)
    head = head or {"impl": config.objective.impl}

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, to_model(params))
        hidden, sown = nnx.capture(model, AuxLoss)(batch.tokens, category=batch.category)
        weight, layout = model.head_weight()
        stats = objectives.lm_head_stats(hidden, weight, batch.targets, batch.loss_mask,
                                         weight_layout=layout, **head)
        # plus the model's auxiliary losses (LoRAMoE's balancing constraint), as in the SFT step
        return sft_loss(stats.target_logprob, stats.entropy, batch.loss_mask, coef) + sum(
            jax.tree.leaves(sown), jnp.zeros((), jnp.float32))

    def interleave(state, bank, rows_P, correct_PxG):
        buf = push(state.rl, rows_P, ~correct_PxG.any(-1))

        def sft(args):
            params, opt_state, buf = args
            rows, buf = pop(buf, size)
            loss, grads = jax.value_and_grad(loss_fn)(params, bank.gather(rows))
            mask_kw = {} if state.masks is None else {"masks": state.masks}
            updates, opt_state = optimizer.update(grads, opt_state, params, **mask_kw)
            return optax.apply_updates(params, updates), opt_state, buf, loss

        def skip(args):
            return (*args, jnp.zeros((), jnp.float32))

        params, opt_state, buf, loss = jax.lax.cond(
            buf.count >= size, sft, skip, (state.params, state.opt_state, buf))
        metrics = {"relift/sft_loss": loss, "relift/buffer": buf.count,
                   "relift/sft_updates": buf.sft_updates, "relift/collected": buf.collected}
        return state.replace(params=params, opt_state=opt_state, rl=buf), metrics

    return interleave

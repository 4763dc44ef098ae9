"""The RL train step: sample prompts → roll out G completions → reward → advantages →
clipped policy updates → curriculum feedback, all inside one ``jax.jit``.

It has the same signature as the supervised step (``rl_step(state, bank) -> (state,
metrics)``), so the training loop, ``lax.scan`` over several steps, checkpoints and shardings
are shared. The curriculum picks the prompts (bank rows) on the devices and receives, per
prompt, the mean ``|advantage|`` of its group (``Feedback.advantage``; SEC's bandit reward) and
the mean reward. Rewards are Python functions over decoded text (``rl.rewards``), called
through ``jax.pure_callback`` from inside the jitted step: the only host round trip is the
token ids of the completions and one float per completion.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from curriculax import objectives
from curriculax.curriculum.base import Feedback
from curriculax.models.layers import AuxLoss
from curriculax.rl import base, grpo
from curriculax.rl.rollout import left_pad_prompts, rollout, sequences
from curriculax.sparsity import base as sparsity_lib
from curriculax.train.step import global_norm

log = logging.getLogger(__name__)

HostReward = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def reward_callback(records, tokenizer, reward_fn, group_size: int) -> HostReward:
    """Host function ``(rows [P], tokens [B,N], mask [B,N], step) -> rewards [B] float32``.

    ``records[row]`` is the bank row's source record; ``reward_fn(text, record) -> float``.
    """
    from curriculax.rl import rewards as rewards_lib

    def host(rows, tokens, mask, step):
        del step
        rows, tokens, mask = np.asarray(rows), np.asarray(tokens), np.asarray(mask)
        texts = [tokenizer.decode([int(t) for t, m in zip(tok, msk) if m and t not in tokenizer.stop_ids])
                 for tok, msk in zip(tokens, mask)]
        recs = [records[int(rows[b // group_size])] for b in range(len(texts))]
        return rewards_lib.score(reward_fn, texts, recs)

    return host


def head_options(config, mesh=None, rules=()) -> dict:
    """Keyword arguments of :func:`curriculax.objectives.lm_head_stats` for a trainer's step."""
    return dict(impl=config.objective.impl, mesh=mesh, rules=rules,
                shard_map=config.objective.get("shard_map", "auto"),
                bwd_rows=config.objective.get("bwd_rows"),
                grad_filter_eps=config.objective.get("grad_filter_eps"))


def policy_logprob(model, seq, temperature: float, head: dict, category=None):
    """LM-head statistics of ``seq.targets`` at the sampling temperature (``[B,T]`` each), and the
    sum of the auxiliary losses the model sows given per-sequence ``category`` (LoRAMoE's
    balancing constraint; 0 without)."""
    hidden, sown = nnx.capture(model, AuxLoss)(seq.tokens, positions=seq.positions,
                                               segment_ids=seq.segment_ids, category=category)
    weight, layout = model.head_weight()
    stats = objectives.lm_head_stats(hidden / temperature, weight, seq.targets, seq.loss_mask,
                                     weight_layout=layout, **head)
    return stats, sum(jax.tree.leaves(sown), jnp.zeros((), jnp.float32))


def make_rl_step(*, graphdef, curriculum, optimizer, lr_schedule, config, host_reward: HostReward,
                 prompt_width: int, eos_id: int | None, pad_id: int, sparsity=None,
                 interleave=None, mesh=None, rules=()):
    """Returns ``rl_step(state, bank) -> (state, metrics)``; ``config.batch_size`` prompts/step.

    ``interleave(state, bank, rows_P, correct_PxG) -> (state, metrics)``, when given, runs
    after the policy update (ReLIFT's SFT on the prompts no rollout solved).
    """
    rl = config.rl
    num_prompts, group = config.batch_size, int(rl.group_size)
    num_responses = num_prompts * group
    inner, minibatches = int(rl.inner_steps), int(rl.minibatches)
    if num_responses % minibatches:
        raise ValueError(f"config.rl.minibatches={minibatches} must divide batch_size x "
                         f"rl.group_size = {num_responses} responses.")
    loss_fn = base.get(rl.loss)
    temperature = float(rl.temperature)
    head = head_options(config, mesh, rules)
    kl_coef = float(rl.kl_coef)
    to_model = sparsity_lib.forward_fn(sparsity)  # LoRA: the frozen base with its adapters
    refresh = None if sparsity is None else sparsity.refresh
    reward_shape = jax.ShapeDtypeStruct((num_responses,), jnp.float32)

    def loss_and_stats(params, seq, category, old_logp, ref_logp, signals, weights):
        model = nnx.merge(graphdef, to_model(params))
        stats, aux_loss = policy_logprob(model, seq, temperature, head, category)
        logp = stats.target_logprob
        # One update per rollout batch: rho = exp(logp - sg(logp)) is exactly 1 (TRL).
        old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
        tok = loss_fn.token_loss(logp, old, signals, rl)
        kl = jnp.zeros_like(logp) if ref_logp is None else grpo.kl_k3(logp, ref_logp)
        tok = tok + kl_coef * kl
        loss = grpo.aggregate(tok, seq.loss_mask, rl.aggregation, weights,
                              t_max=int(rl.max_new_tokens)) + aux_loss
        m = seq.loss_mask.astype(jnp.float32)
        ratio = jnp.exp(logp - old)
        a = signals.advantage[:, None]  # clipped = the surrogate's gradient is cut (TRL's count)
        clipped = (((ratio < 1.0 - float(rl.clip_eps_low)) & (a < 0))
                   | ((ratio > 1.0 + float(rl.clip_eps_high)) & (a > 0))) & seq.loss_mask
        aux = {"kl": jnp.sum(kl * m) / jnp.maximum(m.sum(), 1.0),
               "clip_fraction": clipped.sum() / jnp.maximum(m.sum(), 1.0)}
        return loss, aux

    grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)

    def forward_logp(params, seq):
        model = nnx.merge(graphdef, jax.lax.stop_gradient(to_model(params)))
        return policy_logprob(model, seq, temperature, head)[0].target_logprob

    def rl_step(state, bank):
        rng, sample_rng, roll_rng, perm_rng = jax.random.split(state.rng, 4)
        meta = bank.meta()
        indices, weights = curriculum.sample(state.curriculum, sample_rng, meta, num_prompts)
        rows = bank.gather(indices)
        prompt, pmask = left_pad_prompts(rows.tokens, rows.prompt_len, prompt_width, pad_id)
        policy = nnx.merge(graphdef, jax.lax.stop_gradient(to_model(state.params)))
        gen = rollout(policy, prompt, pmask, roll_rng, group_size=group,
                      max_new_tokens=int(rl.max_new_tokens), temperature=temperature,
                      top_p=float(rl.top_p), eos_id=eos_id, pad_id=pad_id)
        rewards = jax.pure_callback(host_reward, reward_shape, indices, gen.tokens, gen.mask,
                                    state.step)
        rewards_PxG = rewards.reshape(num_prompts, group)
        adv = grpo.advantages(rewards_PxG, float(rl.advantage_eps), std=rl.advantage_std)
        correct = rewards_PxG >= float(rl.success_threshold)
        group_acc = jnp.broadcast_to(correct.mean(-1, keepdims=True), correct.shape)
        signals = base.Signals(advantage=adv.reshape(-1), reward=rewards,
                               correct=correct.reshape(-1), group_accuracy=group_acc.reshape(-1))
        seq = sequences(jnp.repeat(prompt, group, 0), jnp.repeat(pmask, group, 0), gen)
        seq_weights = jnp.repeat(weights, group)
        seq_category = jnp.repeat(rows.category, group)
        single_update = inner * minibatches == 1
        old_logp = None if single_update else forward_logp(state.params, seq)
        ref_logp = None if kl_coef == 0.0 else forward_logp(state.ref_params, seq)

        mb_size = num_responses // minibatches
        perms = jnp.stack([jax.random.permutation(k, num_responses)
                           for k in jax.random.split(perm_rng, inner)])
        order = perms.reshape(inner * minibatches, mb_size)
        mask_kw = {} if state.masks is None else {"masks": state.masks}

        def update(carry, idx):
            params, opt_state = carry
            take = lambda x: None if x is None else x[idx]  # noqa: E731
            mb_seq = jax.tree.map(lambda x: x[idx], seq)
            mb_sig = jax.tree.map(lambda x: x[idx], signals)
            (loss, aux), grads = grad_fn(params, mb_seq, seq_category[idx], take(old_logp),
                                         take(ref_logp), mb_sig, seq_weights[idx])
            updates, opt_state = optimizer.update(grads, opt_state, params, **mask_kw)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), {"loss": loss, "grad_norm": global_norm(grads), **aux}

        (params, opt_state), upd = jax.lax.scan(update, (state.params, state.opt_state), order)
        masks = state.masks
        if refresh is not None:
            masks, params, opt_state = refresh(masks, params, opt_state, state.step + 1)

        # Curriculum feedback, one entry per prompt (SEC's reward: mean |A| of the group).
        resp_len = gen.mask.sum(-1).astype(jnp.float32)
        sampled_nll = -jnp.sum(gen.logprobs, -1) / jnp.maximum(resp_len, 1.0)
        feedback = Feedback(
            indices=indices, loss=sampled_nll.reshape(num_prompts, group).mean(-1),
            token_accuracy=correct.mean(-1), category=rows.category, difficulty=rows.difficulty,
            weights=weights, step=state.step, advantage=jnp.abs(adv).mean(-1),
            reward=rewards_PxG.mean(-1))
        cur = curriculum.update(state.curriculum, feedback)
        new_state = state.replace(step=state.step + 1, rng=rng, params=params,
                                  opt_state=opt_state, curriculum=cur, masks=masks)
        metrics = {
            "loss": upd["loss"].mean(), "grad_norm": upd["grad_norm"].mean(),
            "kl": upd["kl"].mean(), "clip_fraction": upd["clip_fraction"].mean(),
            "lr": lr_schedule(state.step * inner * minibatches),  # optax counts updates
            "reward": rewards.mean(), "accuracy": correct.mean(),
            "advantage_abs": jnp.abs(adv).mean(),
            "solved_none": jnp.mean(~correct.any(-1)), "solved_all": jnp.mean(correct.all(-1)),
            "response_length": resp_len.mean(),
            "loss_tokens": gen.mask.sum(),
            **{f"curriculum/{k}": v for k, v in curriculum.summarize(cur).items()},
        }
        if interleave is not None:
            new_state, extra = interleave(new_state, bank, indices, correct)
            metrics.update(extra)
        return new_state, metrics

    return rl_step

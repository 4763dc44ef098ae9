"""The SPIN train step: the opponent's own generations are the rejected side of a DPO loss.

Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
ICML 2024 (:mod:`curriculax.rl.spin` has the formula and defaults). Inside one jitted step:
the curriculum picks bank rows, the opponent ``TrainState.ref_params`` (theta_t) samples a
completion for each prompt, the gold response is *chosen* and the generation *rejected*, and
the policy minimizes the DPO-form loss with the opponent as reference. Every
``rl.spin_steps_per_iteration`` steps the opponent becomes the current policy (theta_{t+1}),
so iterations need no host loop. Deviation from the official scripts: each iteration samples
fresh generations every step (on-line) instead of regenerating a fixed synthetic set, and does
not mix in the previous iteration's pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from curriculax import objectives
from curriculax.curriculum.base import Feedback
from curriculax.models.generate import decode_model
from curriculax.rl import dpo, spin
from curriculax.rl.rollout import left_pad_prompts, sequences


def _sequence_logprob(model, tokens, targets, mask, impl, positions=None, segment_ids=None):
    hidden = model(tokens, positions=positions, segment_ids=segment_ids)
    stats = objectives.lm_head_stats(hidden, model.lm_head_weight(), targets, mask, impl=impl)
    return dpo.sequence_logprob(stats.target_logprob, mask), stats


def make_step(*, graphdef, curriculum, optimizer, lr_schedule, config, prompt_width: int,
              eos_id, pad_id: int):
    rl = config.rl
    batch, impl = config.batch_size, config.objective.impl
    every = int(rl.spin_steps_per_iteration)

    def logps(params, rows, rejected):
        model = nnx.merge(graphdef, params)
        chosen, stats = _sequence_logprob(model, rows.tokens, rows.targets, rows.loss_mask, impl)
        rej, _ = _sequence_logprob(model, rejected.tokens, rejected.targets, rejected.loss_mask,
                                   impl, rejected.positions, rejected.segment_ids)
        return chosen, rej, stats

    def loss_fn(params, ref_params, rows, rejected):
        chosen, rej, stats = logps(params, rows, rejected)
        ref_chosen, ref_rej, _ = logps(jax.lax.stop_gradient(ref_params), rows, rejected)
        loss, metrics = spin.loss(chosen, rej, jax.lax.stop_gradient(ref_chosen),
                                  jax.lax.stop_gradient(ref_rej), beta=float(rl.spin_beta),
                                  kind=rl.spin_loss)
        n = jnp.maximum(rows.loss_mask.sum(-1), 1)
        nll = -jnp.sum(stats.target_logprob * rows.loss_mask, -1) / n
        return loss, (metrics, jax.lax.stop_gradient(nll))

    def spin_step(state, bank):
        rng, sample_rng, gen_rng = jax.random.split(state.rng, 3)
        indices, weights = curriculum.sample(state.curriculum, sample_rng, bank.meta(), batch)
        rows = bank.gather(indices)
        prompt, pmask = left_pad_prompts(rows.tokens, rows.prompt_len, prompt_width, pad_id)
        opponent = nnx.merge(graphdef, jax.lax.stop_gradient(state.ref_params))
        gen = decode_model(opponent, prompt, pmask, gen_rng, max_new_tokens=int(rl.max_new_tokens),
                           temperature=float(rl.temperature), top_p=float(rl.top_p),
                           eos_id=eos_id, pad_id=pad_id)
        rejected = sequences(prompt, pmask, gen)
        (loss, (metrics, nll)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.ref_params, rows, rejected)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_iteration = (state.step + 1) % every == 0  # theta_{t+1} becomes the opponent
        ref = jax.tree.map(lambda p, r: jnp.where(new_iteration, p, r), params, state.ref_params)
        feedback = Feedback(indices=indices, loss=nll, token_accuracy=jnp.zeros_like(nll),
                            category=rows.category, difficulty=rows.difficulty, weights=weights,
                            step=state.step)
        cur = curriculum.update(state.curriculum, feedback)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step),
               "spin/iteration": spin.iteration(state.step, every),  # the opponent's theta_t
               "response_length": gen.mask.sum(-1).mean(),
               **{f"spin/{k}": v for k, v in metrics.items()},
               **{f"curriculum/{k}": v for k, v in curriculum.summarize(cur).items()}}
        return state.replace(step=state.step + 1, rng=rng, params=params, opt_state=opt_state,
                             curriculum=cur, ref_params=ref), out

    return spin_step

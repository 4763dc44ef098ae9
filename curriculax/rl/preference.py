"""Preference train steps: DPO on (chosen, rejected) pairs and SPIN's self-play pairs.

Both minimize the DPO-form loss of :mod:`curriculax.rl.dpo` on summed response log-probs of
the policy against a frozen reference (``TrainState.ref_params``), inside one jitted step:

- ``make_dpo_step``: offline pairs. Records carry a ``rejected`` response next to ``response``
  (the chosen one); the bank is a :class:`PairBank` whose two halves share row indices, so
  the curriculum samples pairs like rows. The reference is the starting model.
- ``make_spin_step``: SPIN (Chen et al., ICML 2024; :mod:`curriculax.rl.spin`). The opponent
  (the reference, theta_t) samples a completion for each prompt; gold is chosen, the sample
  rejected. Every ``rl.spin_steps_per_iteration`` steps the opponent becomes the current policy,
  so iterations need no host loop. Deviation from the official scripts: generations are drawn
  fresh every step instead of regenerating a fixed synthetic set per iteration, and the
  previous iteration's pairs are not mixed in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from curriculax import objectives
from curriculax.curriculum.base import Feedback
from curriculax.data.bank import Bank, ExampleBank
from curriculax.models.generate import decode_model
from curriculax.rl import dpo, spin
from curriculax.rl.rollout import left_pad_prompts, sequences
from curriculax.rl.step import head_options
from curriculax.train.step import example_stats, global_norm


@struct.dataclass
class PairBank:
    """Chosen and rejected rows with shared indices (row ``i`` of both is one pair)."""

    chosen: Bank
    rejected: Bank

    def meta(self):
        return self.chosen.meta()


def pair_bank(train_data: ExampleBank, tokenizer, cfg) -> tuple[PairBank, ExampleBank]:
    """Tokenizes each record's ``rejected`` response; keeps the pairs whose both sides fit."""
    missing = [r["id"] for r in train_data.records if not str(r.get("rejected", "")).strip()]
    if missing:
        raise ValueError(f"config.trainer='dpo' needs a non-empty 'rejected' response in every "
                         f"training record; {len(missing)} lack one (first: {missing[0]!r}). "
                         f"Add it to the data file (JSONL: prompt, response, rejected, ...).")
    d = cfg.data
    # Pairs are matched by the chosen row's position, not by record id: ids need not be unique
    # (several preference pairs per prompt id), and matching by id would silently drop pairs or,
    # when one side overflows, pair a chosen response with another record's rejected one.
    rejected = ExampleBank.build([{**r, "response": r["rejected"], "id": str(n)}
                                  for n, r in enumerate(train_data.records)],
                                 tokenizer, d.seq_len, template=d.template, overflow=d.overflow,
                                 category_names=train_data.info.category_names)
    pos_rej = {int(i): n for n, i in enumerate(rejected.ids)}  # chosen row -> rejected row
    chosen_rows = sorted(pos_rej)

    def subset(bank: Bank, rows):
        fields = {f.name: getattr(bank, f.name)[rows] for f in dataclasses.fields(Bank)
                  if f.name != "info"}
        fields["example_id"] = fields["example_id"].copy()
        return Bank(**fields, info=bank.info)

    chosen = subset(train_data.bank, chosen_rows)
    rej = subset(rejected.bank, [pos_rej[n] for n in chosen_rows])
    kept = ExampleBank(chosen, [train_data.ids[n] for n in chosen_rows],
                       [train_data.answers[n] for n in chosen_rows],
                       [train_data.records[n] for n in chosen_rows])
    return PairBank(chosen, rej), kept


def _sequence_logprob(model, seq, head):
    hidden = model(seq.tokens, positions=getattr(seq, "positions", None),
                   segment_ids=getattr(seq, "segment_ids", None))
    weight, layout = model.head_weight()
    stats = objectives.lm_head_stats(hidden, weight, seq.targets, seq.loss_mask, weight_layout=layout,
                                     **head)
    return dpo.sequence_logprob(stats.target_logprob, seq.loss_mask), stats


def _pair_loss_fn(graphdef, head, loss):
    """``(params, ref_params, chosen, rejected, weights) -> (loss, (metrics, chosen_stats))``
    (``chosen_stats``: the chosen response's per-pair NLL and argmax accuracy);
    ``weights``: the curriculum's per-pair loss weights."""
    def logps(params, chosen, rejected):
        model = nnx.merge(graphdef, params)
        c, stats = _sequence_logprob(model, chosen, head)
        r, _ = _sequence_logprob(model, rejected, head)
        return c, r, stats

    def fn(params, ref_params, chosen, rejected, weights):
        c, r, stats = logps(params, chosen, rejected)
        rc, rr, _ = jax.lax.stop_gradient(logps(ref_params, chosen, rejected))
        value, metrics = loss(c, r, rc, rr, weights_B=weights)
        # the chosen response's NLL and argmax accuracy: curricula read both (STAT-Sel's
        # failures are rows with token_accuracy below its threshold)
        return value, (metrics, jax.lax.stop_gradient(example_stats(stats, chosen.loss_mask)))

    return jax.value_and_grad(fn, has_aux=True)


def _finish(state, *, curriculum, optimizer, lr_schedule, grads, loss, metrics, chosen_stats,
            rows, indices, weights, rng, prefix, ref_params=None, extra=None):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    nll, accuracy = chosen_stats
    feedback = Feedback(indices=indices, loss=nll, token_accuracy=accuracy,
                        category=rows.category, difficulty=rows.difficulty, weights=weights,
                        step=state.step)
    cur = curriculum.update(state.curriculum, feedback)
    ref = state.ref_params if ref_params is None else ref_params(params)
    out = {"loss": loss, "grad_norm": global_norm(grads), "lr": lr_schedule(state.step),
           **{f"{prefix}/{k}": v for k, v in metrics.items()}, **(extra or {}),
           **{f"curriculum/{k}": v for k, v in curriculum.summarize(cur).items()}}
    return state.replace(step=state.step + 1, rng=rng, params=params, opt_state=opt_state,
                         curriculum=cur, ref_params=ref), out


def make_dpo_step(*, graphdef, curriculum, optimizer, lr_schedule, config, mesh=None, rules=()):
    c = config.rl
    grad_fn = _pair_loss_fn(graphdef, head_options(config, mesh, rules), lambda *s, **w: dpo.loss(
        *s, **w, beta=float(c.dpo_beta), label_smoothing=float(c.dpo_label_smoothing),
        kind=c.dpo_kind))

    def dpo_step(state, bank: PairBank):
        rng, sample_rng = jax.random.split(state.rng)
        indices, weights = curriculum.sample(state.curriculum, sample_rng, bank.meta(),
                                             config.batch_size)
        chosen, rejected = bank.chosen.gather(indices), bank.rejected.gather(indices)
        (loss, (metrics, chosen_stats)), grads = grad_fn(state.params, state.ref_params, chosen,
                                                         rejected, weights)
        return _finish(state, curriculum=curriculum, optimizer=optimizer,
                       lr_schedule=lr_schedule, grads=grads, loss=loss, metrics=metrics,
                       chosen_stats=chosen_stats, rows=chosen, indices=indices, weights=weights,
                       rng=rng, prefix="dpo")

    return dpo_step


def make_spin_step(*, graphdef, curriculum, optimizer, lr_schedule, config, prompt_width: int,
                   eos_id, pad_id: int, mesh=None, rules=()):
    rl = config.rl
    every = int(rl.spin_steps_per_iteration)
    grad_fn = _pair_loss_fn(graphdef, head_options(config, mesh, rules), lambda *s, **w: spin.loss(
        *s, **w, beta=float(rl.spin_beta), kind=rl.spin_loss))

    def spin_step(state, bank):
        rng, sample_rng, gen_rng = jax.random.split(state.rng, 3)
        indices, weights = curriculum.sample(state.curriculum, sample_rng, bank.meta(),
                                             config.batch_size)
        rows = bank.gather(indices)
        prompt, pmask = left_pad_prompts(rows.tokens, rows.prompt_len, prompt_width, pad_id)
        opponent = nnx.merge(graphdef, jax.lax.stop_gradient(state.ref_params))
        gen = decode_model(opponent, prompt, pmask, gen_rng, max_new_tokens=int(rl.max_new_tokens),
                           temperature=float(rl.temperature), top_p=float(rl.top_p),
                           eos_id=eos_id, pad_id=pad_id)
        (loss, (metrics, chosen_stats)), grads = grad_fn(state.params, state.ref_params, rows,
                                                         sequences(prompt, pmask, gen), weights)
        new_iteration = (state.step + 1) % every == 0  # theta_{t+1} becomes the opponent

        def next_opponent(params):
            return jax.tree.map(lambda p, r: jnp.where(new_iteration, p, r), params,
                                state.ref_params)

        extra = {"spin/iteration": spin.iteration(state.step, every),  # the opponent's t
                 "response_length": gen.mask.sum(-1).mean()}
        return _finish(state, curriculum=curriculum, optimizer=optimizer,
                       lr_schedule=lr_schedule, grads=grads, loss=loss, metrics=metrics,
                       chosen_stats=chosen_stats, rows=rows, indices=indices, weights=weights,
                       rng=rng, prefix="spin", ref_params=next_opponent, extra=extra)

    return spin_step

"""The train step: curriculum sample → gather → transforms → loss → optax update → feedback.

Everything happens inside one ``jax.jit``: the curriculum draws bank rows on the devices, input
transforms rewrite the batch, the objective runs through the fused LM-head kernel, and
per-example feedback updates the curriculum state before the step returns. Nothing crosses
to the host but the metrics.

Auxiliary model losses: the trained forward pass runs under ``nnx.capture(model, AuxLoss)``
with the batch's per-example ``category``; whatever :class:`~curriculax.models.layers.AuxLoss`
scalars the model sows (LoRAMoE's balancing constraint) are summed into the loss (averaged over
``grad_accum`` micro-batches, each computing its own). A model that sows nothing trains exactly
as before.

Gradient accumulation: ``grad_accum`` micro-batches of strided rows give the full batch's
gradient. Random draws inside the loss (OTR's samples, scheduled sampling's predictions and
coins) are keyed by each example's row in the step's batch, so they match ``grad_accum=1`` too;
only a loss that is not a sum over examples (LoRAMoE's balancing term) differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from curriculax import objectives, transforms
from curriculax.curriculum.base import Feedback
from curriculax.kernels import gumbel
from curriculax.models.layers import AuxLoss
from curriculax.sharding import named_sharding
from curriculax.sparsity import base as sparsity_lib
from curriculax.train.optim import global_norm
from curriculax.train.state import TrainState


def example_stats(stats, mask_BxT):
    """Per-example mean token NLL and argmax accuracy over the loss mask."""
    mask = mask_BxT.astype(jnp.float32)
    n = jnp.maximum(mask.sum(-1), 1.0)
    loss = jnp.sum(-stats.target_logprob * mask, -1) / n
    correct = (stats.target_logprob >= stats.max_logprob).astype(jnp.float32)
    return loss, jnp.sum(correct * mask, -1) / n


def micro_batches(tree, accum: int):
    """``[B, ...]`` leaves as ``[accum, B / accum, ...]`` micro-batches of strided rows (micro-batch
    ``j`` holds rows ``j, j + accum, ...``): with the rows sharded in contiguous blocks over the
    data-parallel devices, every device keeps its share of every micro-batch (a plain reshape
    would give each micro-batch to ``1 / accum`` of the devices)."""
    def one(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    return jax.tree.map(one, tree)


def make_train_step(*, graphdef, curriculum, objective, optimizer, lr_schedule, config,
                    mesh=None, rules=(), sparsity=None):
    """Returns ``train_step(state, bank) -> (state, metrics)``, pure and jit-able.

    With ``sparsity`` (:class:`curriculax.sparsity.Sparsity`), ``state.masks`` reaches the
    optimizer as ``masks=`` and its ``refresh`` may recompute masks after each update.
    """
    refresh = None if sparsity is None else sparsity.refresh
    to_model = sparsity_lib.forward_fn(sparsity)  # LoRA: the frozen base with its adapters
    batch_size, accum = config.batch_size, config.grad_accum
    mode = config.objective.normalization
    impl = config.objective.impl
    transform_fns = [(name, transforms.get(name)) for name in config.transforms]
    # A transform may supply the trained pass's input embeddings (scheduled sampling).
    embed_hooks = [(name, t.embed) for name, t in transform_fns if t.embed is not None]
    if len(embed_hooks) > 1:
        raise ValueError(f"config.transforms has several model-level transforms "
                         f"{[name for name, _ in embed_hooks]}; at most one may set `embed`.")
    kernel_options = objective.kernel_options(config.objective) if objective.kernel_options else {}
    sharded = dict(mesh=mesh, rules=rules, shard_map=config.objective.get("shard_map", "auto"),
                   bwd_rows=config.objective.get("bwd_rows"),
                   grad_filter_eps=config.objective.get("grad_filter_eps"))

    def constrain_batch(tree):
        if mesh is None:
            return tree

        def one(x):
            axes = ("batch",) + (None,) * (x.ndim - 1)
            return jax.lax.with_sharding_constraint(x, named_sharding(mesh, x.shape, axes, rules))
        return jax.tree.map(one, tree)

    def head_stats(params, ref_params, batch, rng, model_ctx=None, rows=None):
        """Fused LM-head statistics, with the extras the objective asked for, and the list of
        auxiliary losses the model sowed (empty for most models). ``rows`` ``[B]``: the
        examples' positions in the step's batch, which seed their random draws."""
        model = nnx.merge(graphdef, to_model(params))
        forward = nnx.capture(model, AuxLoss)
        if model_ctx is None:
            hidden, sown = forward(batch.tokens, category=batch.category)
        else:  # the embed hook's inputs (e.g. scheduled sampling's gold/prediction mixup)
            embeds = embed_hooks[0][1](model, batch, jax.random.fold_in(rng, 1), model_ctx)
            hidden, sown = forward(batch.tokens, inputs_embeds=embeds, category=batch.category)
        extra = dict(kernel_options)
        weight, layout = model.head_weight()
        ref_head = {}
        if {"ref", "ref_logprob"} & set(objective.needs):  # the frozen reference model
            ref = nnx.merge(graphdef, jax.lax.stop_gradient(to_model(ref_params)))
            ref_head = dict(ref_hidden=ref(batch.tokens), ref_weight=ref.head_weight(layout)[0])
        if "ref" in objective.needs:  # KL anchors: the kernel walks both heads at once
            extra.update(ref_head)
        if "sample" in objective.needs:  # in-kernel Gumbel-max sampling (OTR)
            extra.update(sample_rng=rng)
            if rows is not None:
                extra.update(sample_rows=gumbel.token_rows(rows, batch.tokens.shape[1]))
        stats = objectives.lm_head_stats(hidden, weight, batch.targets, batch.loss_mask, impl=impl,
                                         weight_layout=layout, **sharded, **extra)
        if "ref_logprob" in objective.needs:  # a gradient-free pass over the reference head
            ref_stats = objectives.lm_head_stats(ref_head["ref_hidden"], ref_head["ref_weight"],
                                                 batch.targets, batch.loss_mask, impl=impl,
                                                 weight_layout=layout, **sharded)
            stats = objectives.attach(stats, ref_target_logprob=ref_stats.target_logprob)
        return stats, jax.tree.leaves(sown)

    def micro_loss(params, ref_params, batch, weights, rng, denominator, model_ctx=None, rows=None):
        stats, aux = head_stats(params, ref_params, batch, rng, model_ctx, rows)
        token_loss = objective.token_loss(stats, batch, config.objective)
        loss = objectives.reduce_loss(token_loss, batch.loss_mask, weights, denominator, mode)
        if aux:  # micro-batch losses are summed: each adds its share of the auxiliary mean
            loss = loss + sum(aux) / accum
        return loss, example_stats(stats, batch.loss_mask)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def gradients(state, batch, weights, rng, model_ctx=None):
        denominator = objectives.normalizer(batch.loss_mask, mode)
        if accum == 1:
            return grad_fn(state.params, state.ref_params, batch, weights, rng, denominator,
                           model_ctx)
        # Every micro-batch gets the step's rng and its rows' positions in the full batch:
        # random draws keyed by row (OTR's and scheduled sampling's samples, the latter's coins)
        # are those of grad_accum=1.
        micro = micro_batches((batch, weights, jnp.arange(batch_size, dtype=jnp.int32)), accum)

        def body(grad_sum, xs):
            mb, w, rows = constrain_batch(xs)
            ctx = None if model_ctx is None else model_ctx.replace(rows=rows)
            (loss, aux), grads = grad_fn(state.params, state.ref_params, mb, w, rng, denominator,
                                         ctx, rows)
            return jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads), (loss, aux)

        # The sum runs in float32 whatever the weights' dtype (one float32 copy of the params
        # while accumulating): bfloat16 sums of 64 micro-batches were 1.0e-2 (relative) from
        # the full batch's gradient, float32 sums 3.6e-3.
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                             state.params)
        grads, (losses, aux) = jax.lax.scan(body, zeros, micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        aux = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(batch_size, *x.shape[2:]), aux)
        return (losses.sum(), aux), grads

    def apply_transforms(batch, rng, state, bank):
        for i, (name, transform) in enumerate(transform_fns):
            ctx = transforms.TransformContext(
                step=state.step, total_steps=config.steps, curriculum=state.curriculum,
                config=config.transform_config.get(name), mask_id=bank.info.mask_id,
                pad_id=bank.info.pad_id, bos_id=bank.info.bos_id)
            batch = transform.apply(batch, jax.random.fold_in(rng, i), ctx)
        return batch

    def probe(state, rng, bank, meta):
        if curriculum.probe is None:
            return {}
        idx = curriculum.probe(state.curriculum, rng, meta)
        rows = bank.gather(idx)
        stats, _ = head_stats(state.params, state.ref_params, rows, rng)
        loss, _ = example_stats(jax.lax.stop_gradient(stats), rows.loss_mask)
        return {"probe_indices": idx, "probe_loss": loss}

    def train_step(state: TrainState, bank):
        rng, sample_rng, transform_rng, loss_rng, probe_rng = jax.random.split(state.rng, 5)
        meta = bank.meta()
        indices, weights = curriculum.sample(state.curriculum, sample_rng, meta, batch_size)
        batch = constrain_batch(apply_transforms(bank.gather(indices), transform_rng, state, bank))
        model_ctx = None
        if embed_hooks:
            model_ctx = transforms.TransformContext(
                step=state.step, total_steps=config.steps, curriculum=state.curriculum,
                config=config.transform_config.get(embed_hooks[0][0]),
                mask_id=bank.info.mask_id, pad_id=bank.info.pad_id, bos_id=bank.info.bos_id, mesh=mesh, rules=rules,
                shard_map=sharded["shard_map"])
        (loss, (ex_loss, ex_acc)), grads = gradients(state, batch, weights, loss_rng, model_ctx)
        probed = probe(state, probe_rng, bank, meta)
        mask_kw = {} if state.masks is None else {"masks": state.masks}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **mask_kw)
        params = optax.apply_updates(state.params, updates)
        masks = state.masks
        if refresh is not None:  # masks that change during training (LIFT, HFT rounds, LT-SFT)
            masks, params, opt_state = refresh(masks, params, opt_state, state.step + 1)
        feedback = Feedback(indices=indices, loss=ex_loss, token_accuracy=ex_acc,
                            category=batch.category, difficulty=batch.difficulty,
                            weights=weights, step=state.step, **probed)
        cur = curriculum.update(state.curriculum, feedback)
        tokens = batch.loss_mask.sum()
        metrics = {
            "loss": loss,
            "token_accuracy": jnp.sum(ex_acc * batch.loss_mask.sum(-1)) / jnp.maximum(tokens, 1),
            "grad_norm": global_norm(grads),
            "lr": lr_schedule(state.step),
            "loss_tokens": tokens,
            **{f"curriculum/{k}": v for k, v in curriculum.summarize(cur).items()},
        }
        new_state = state.replace(step=state.step + 1, rng=rng, params=params,
                                  opt_state=opt_state, curriculum=cur, masks=masks)
        return new_state, metrics

    return train_step


def multi_step(train_step, num_steps: int, *, streaming: bool = False):
    """``num_steps`` train steps in one ``lax.scan``; metrics come back stacked ``[k]``.

    With ``streaming`` the second argument holds one pool per step stacked on a leading axis
    (``[k, P, ...]``) and step ``i`` samples from pool ``i``; otherwise every step samples
    from the same resident bank.
    """
    def run(state, bank):
        if streaming:
            return jax.lax.scan(train_step, state, bank)
        return jax.lax.scan(lambda s, _: train_step(s, bank), state, None, length=num_steps)
    return run


def jit_steps(train_step, num_steps: int, state_shardings, bank_shardings, *,
              streaming: bool = False):
    """Jitted k-step function with explicit shardings; the state buffer is donated."""
    return jax.jit(multi_step(train_step, num_steps, streaming=streaming),
                   in_shardings=(state_shardings, bank_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

"""Optimizer from config: clipping, AdamW and a warmup-cosine schedule, all optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(opt_config, total_steps: int) -> optax.Schedule:
    """Warmup-cosine over ``total_steps`` train steps, as a function of optax's update count.

    ``opt_config.updates_per_step`` (set by the trainer, e.g. RL's ``inner_steps x minibatches``;
    default 1) maps updates back to train steps, so that warmup and decay follow
    ``config.steps`` whatever the number of updates each step makes."""
    warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
    per_step = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt_config.lr * opt_config.end_lr_factor,
    )
    k = int(opt_config.get("updates_per_step", 1))
    return per_step if k == 1 else (lambda count: per_step(count // k))


def decays(path, p) -> bool:
    """Matrices decay; norms' scales and biases do not (Qwen2's ``q_bias`` is 2-D
    ``[heads, head_dim]``, so the leaf's name decides, not only its rank)."""
    last = path[-1] if path else None
    name = str(getattr(last, "key", getattr(last, "name", last)))
    return p.ndim >= 2 and not name.endswith("bias")


def decay_mask(params):
    """Weight decay on matrices only: norms' scales and biases are not shrunk toward 0."""
    return jax.tree_util.tree_map_with_path(decays, params)


def global_norm(tree) -> jax.Array:
    """The float32 L2 norm of a pytree (``optax.tree.norm`` sums the leaves' squares in their own
    dtype: bfloat16 gradients gave a bfloat16 norm off by ~5% with 300 leaves)."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` with the norm in float32 (optax's is a bfloat16 sum for
    bfloat16 gradients, so the clip threshold was ~5% off); leaves keep their dtype."""

    def clip(g, norm):
        # optax's arithmetic, in float32 at least: float32 runs stay bitwise those of optax
        wide = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        return jnp.where(norm < max_norm, g, ((wide / norm) * max_norm).astype(g.dtype))

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates)
        return jax.tree.map(lambda g: clip(g, norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        clip_by_global_norm(opt_config.grad_clip),
        optax.adamw(schedule(opt_config, total_steps), b1=opt_config.b1, b2=opt_config.b2,
                    eps=opt_config.eps, weight_decay=opt_config.weight_decay, mask=decay_mask),
    )

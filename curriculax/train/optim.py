"""Optimizer from config: clipping, AdamW and a warmup-cosine schedule, all optax."""

from __future__ import annotations

import jax
import optax


def schedule(opt_config, total_steps: int) -> optax.Schedule:
    warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt_config.lr * opt_config.end_lr_factor,
    )


def decay_mask(params):
    """Weight decay on matrices only: norms' scales and biases are not shrunk toward 0."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(opt_config.grad_clip),
        optax.adamw(schedule(opt_config, total_steps), b1=opt_config.b1, b2=opt_config.b2,
                    eps=opt_config.eps, weight_decay=opt_config.weight_decay, mask=decay_mask),
    )

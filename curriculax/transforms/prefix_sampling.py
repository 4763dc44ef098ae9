"""Prefix sampling: train on a prefix of each response whose length grows over training.

Sources: UL2's S-denoiser (Tay et al., 2022: a random prefix/target split) and the EfficientTrain
idea of training on an "easier view" first (Wang et al., ICCV 2023 / TPAMI 2024) -- here a
shorter response (shared/methods/efficienttrain_ul2_prefix.md). As an LLM fine-tuning curriculum
this is our adaptation; no paper default exists (**unverified**).

Per row with ``n`` response targets, keep the first ``k = max(1, ceil(phi n))`` of them; the rest
of the row is neither input nor target (tokens and targets become ``pad``, loss and reasoning
masks false, except ``reasoning_mask`` just after the last kept target, which still marks whether
that target is a reasoning token)::

    f(step) = scheduled fraction (default: linear from start=0.25 to ratio=1.0 over
              warmup_ratio=0.5 of the run, then 1.0)
    phi     = f(step)                        sampling="fixed"   (default)
    phi     ~ Uniform(min_fraction, f(step)) sampling="uniform" (a random prefix fraction)

With a causal model the kept positions see exactly the context they would in the full row, so
the transform changes only *which* targets are trained (early response tokens first).

Defaults (``default_config``): ``ratio=1.0`` (final fraction), ``start=0.25``,
``schedule="linear"``, ``warmup_ratio=0.5``, ``sampling="fixed"``, ``min_fraction=0``.

Usage::

    c.transforms = ("prefix_sampling",)
    c.transform_config.prefix_sampling = prefix_sampling.default_config()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.transforms.base import Transform, register, transform_config
from curriculax.transforms.schedule import from_config

SAMPLINGS = ("fixed", "uniform")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        ratio=1.0, start=0.25, schedule="linear", warmup_ratio=0.5, schedule_kwargs={},
        from_curriculum="", sampling="fixed", min_fraction=0.0))


def prefix_keep_mask(loss_mask_BxT, fraction_B) -> jax.Array:
    """``[B,T]`` bool: the first ``max(1, ceil(fraction * n))`` loss targets of each row."""
    mask = loss_mask_BxT.astype(bool)
    n = mask.sum(-1)
    k = jnp.maximum(1, jnp.ceil(fraction_B * n - 1e-6).astype(jnp.int32))
    return mask & (jnp.cumsum(mask, -1) <= k[:, None])


def prefix_sample(batch, fraction_B, pad_id: int):
    """Cuts every row after its kept response prefix (see module docstring)."""
    keep = prefix_keep_mask(batch.loss_mask, fraction_B)
    t = keep.shape[1]
    last = jnp.where(keep.any(-1), t - 1 - jnp.argmax(keep[:, ::-1], -1), t - 1)
    live = jnp.arange(t)[None] <= last[:, None]
    has_resp = batch.loss_mask.any(-1)[:, None]
    live = live | ~has_resp  # rows without a response stay as they are
    # reasoning_mask[i + 1] also says whether target i is a reasoning token (token-weighted key
    # tokens read it): keep it for the last kept target
    live_next = live | (jnp.arange(t)[None] == last[:, None] + 1)
    return batch.replace(
        tokens=jnp.where(live, batch.tokens, pad_id),
        targets=jnp.where(live, batch.targets, pad_id),
        loss_mask=jnp.where(has_resp, keep, batch.loss_mask),
        reasoning_mask=batch.reasoning_mask & live_next,
    )


def apply(batch, rng, ctx):
    cfg = transform_config(ctx, default_config(), "prefix_sampling")
    f = jnp.clip(from_config(cfg, "ratio", ctx), 0.0, 1.0)
    b = batch.tokens.shape[0]
    sampling = cfg.get("sampling", "fixed")
    if sampling == "fixed":
        frac = jnp.full((b,), f)
    elif sampling == "uniform":
        lo = jnp.minimum(float(cfg.get("min_fraction", 0.0)), f)
        frac = jax.random.uniform(rng, (b,), minval=lo, maxval=f)
    else:
        raise ValueError(f"transform_config.prefix_sampling.sampling={sampling!r}: "
                         f"choose one of {SAMPLINGS}.")
    return prefix_sample(batch, frac, ctx.pad_id)


prefix_sampling = register("prefix_sampling", Transform(apply))

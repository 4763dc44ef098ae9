"""Masked Thought: replace reasoning-span input tokens with ``<mask>``; targets stay original.

Paper: Chen et al., "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve
Mathematical Reasoning Learning of Language Models", ACL 2024 (arXiv 2403.02178); code
``AlibabaResearch/DAMO-ConvAI/MaskedThought`` (shared/methods/masked_thought.md).

Rule: each input position ``i`` in the span is corrupted with probability ``p``::

    x~_i = <mask> (or, with probability replace_rate, a uniform random id < vocab_size)
    L    = -(1/|R|) sum_{i in R} log p_theta(x_i | x~_<i)      (ordinary CE on the original targets)

Only *inputs* change, so the loss is whatever objective the config names (SFT in the paper).
The span is ``span="reasoning"`` (the bank's ``reasoning_mask``: worked steps only, never the
prompt nor the final ``####`` answer line -- our default) or ``"response"`` (the whole response
including the answer line and EOS, as the official code does).
``selection="independent"`` draws one Bernoulli(p) per position (README/MetaMath path);
``"exact_count"`` draws ``c ~ Binomial(n, p)`` per row and masks ``c`` uniformly chosen
positions (the main code path; same marginal ``p``).

Curriculum over ``p`` (``schedule``, see :mod:`curriculax.transforms.schedule`): the paper's main
path ``"linear_warmup"``: ``p(step) = min(p_max step / (total warmup_ratio + 1), p_max)``;
or ``"constant"``, ``"linear"``, any shared schedule name, or ``from_curriculum`` (read ``p`` from
the curriculum state).

Defaults (``default_config``): ``ratio=0.4`` (p_max), ``schedule="linear_warmup"``,
``warmup_ratio=2/3``, ``span="reasoning"``, ``selection="independent"``, ``replace_rate=0``
(pure ``<mask>``), ``mask_id=-1`` (the tokenizer's mask token), ``vocab_size=0`` (needed only
for ``replace_rate > 0``).

Usage::

    c.transforms = ("masked_thought",)
    c.transform_config.masked_thought = masked_thought.default_config()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.transforms.base import Transform, register, transform_config
from curriculax.transforms.schedule import from_config

SPANS = ("reasoning", "response")
SELECTIONS = ("independent", "exact_count")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        ratio=0.4, schedule="linear_warmup", warmup_ratio=2.0 / 3.0, start=0.0,
        schedule_kwargs={}, from_curriculum="", span="reasoning", selection="independent",
        replace_rate=0.0, vocab_size=0, mask_id=-1))


def mask_from_uniforms(span_BxT, uniforms_BxT, ratio) -> jax.Array:
    """The independent rule with given draws: corrupt span positions where ``u < ratio``."""
    return span_BxT.astype(bool) & (uniforms_BxT < ratio)


def select_positions(span_BxT, rng, ratio, selection: str = "independent") -> jax.Array:
    """``[B,T]`` bool: which span positions to corrupt, marginal probability ``ratio`` each."""
    span = span_BxT.astype(bool)
    if selection == "independent":
        return mask_from_uniforms(span, jax.random.uniform(rng, span.shape), ratio)
    if selection != "exact_count":
        raise ValueError(f"selection={selection!r}: choose one of {SELECTIONS}.")
    r_u, r_count = jax.random.split(rng)
    u = jax.random.uniform(r_u, span.shape)
    n = span.sum(-1).astype(jnp.float32)
    # clipped as the independent rule saturates (a curriculum may hand over any ratio)
    p = jnp.clip(jnp.asarray(ratio, jnp.float32), 0.0, 1.0)
    count = jax.random.binomial(r_count, n, jnp.broadcast_to(p, n.shape))
    rank = jnp.argsort(jnp.argsort(jnp.where(span, u, 2.0), axis=-1), axis=-1)
    return span & (rank < count[:, None])


def masked_thought(tokens, reasoning_mask, rng, ratio, mask_id, *, replace_rate: float = 0.0,
                   vocab_size: int = 0, selection: str = "independent"):
    """``tokens`` with each ``reasoning_mask`` position replaced by ``mask_id`` w.p. ``ratio``.

    ``replace_rate > 0`` turns that fraction of the replacements into uniform random ids in
    ``[0, vocab_size)`` instead of ``mask_id``. Positions outside ``reasoning_mask`` are never
    touched.
    """
    r_sel, r_kind, r_id = jax.random.split(rng, 3)
    chosen = select_positions(reasoning_mask, r_sel, ratio, selection)
    fill = jnp.full_like(tokens, mask_id)
    if replace_rate > 0:
        if vocab_size <= 0:
            raise ValueError("masked_thought: replace_rate > 0 needs vocab_size > 0.")
        random_ids = jax.random.randint(r_id, tokens.shape, 0, vocab_size, tokens.dtype)
        fill = jnp.where(jax.random.uniform(r_kind, tokens.shape) < replace_rate, random_ids, fill)
    return jnp.where(chosen, fill, tokens)


def response_input_mask(batch) -> jax.Array:
    """``[B,T]``: input positions holding a response token (``tokens[i] == targets[i-1]``, a
    loss target)."""
    return jnp.pad(batch.loss_mask[:, :-1], ((0, 0), (1, 0))).astype(bool)


def apply(batch, rng, ctx):
    cfg = transform_config(ctx, default_config(), "masked_thought")
    span_name = cfg.get("span", "reasoning")
    if span_name not in SPANS:
        raise ValueError(f"transform_config.masked_thought.span={span_name!r}: choose one of {SPANS}.")
    span = batch.reasoning_mask if span_name == "reasoning" else response_input_mask(batch)
    mask_id = int(cfg.get("mask_id", -1))
    if mask_id < 0:
        mask_id = ctx.mask_id
    replace_rate = float(cfg.get("replace_rate", 0.0))
    if mask_id is None and replace_rate < 1.0:
        raise ValueError("masked_thought needs a mask token: the tokenizer has none, so set "
                         "transform_config.masked_thought.mask_id (or replace_rate=1 with vocab_size).")
    ratio = from_config(cfg, "ratio", ctx)
    tokens = masked_thought(batch.tokens, span, rng, ratio, -1 if mask_id is None else mask_id,
                            replace_rate=replace_rate, vocab_size=int(cfg.get("vocab_size", 0)),
                            selection=cfg.get("selection", "independent"))
    return batch.replace(tokens=tokens)


masked_thought_transform = register("masked_thought", Transform(apply))

"""Decoder-only transformer (Llama / Qwen2 / Qwen3) in Flax NNX.

The model returns final *normalized hidden states*, not logits: the loss applies the LM head
itself (``lm_head_weight()``) so the fused kernel never materializes ``[tokens, vocab]``.

Auxiliary losses (LoRAMoE's balancing constraint) are sown as ``layers.AuxLoss`` scalars when
the call is given per-example ``category`` indices; collect them with
``hidden, aux = nnx.capture(model, AuxLoss)(tokens, category=c)`` (the train step does).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from curriculax.models.config import ModelConfig
from curriculax.models.layers import Block, RMSNorm, example_type, param
from curriculax.sharding import constrain


@struct.dataclass
class KVCache:
    """Keys/values for every layer, ``[L,B,S,K,D]``; ``segment_ids`` 0 marks empty/padded slots."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array  # [B,S] int32
    index: jax.Array  # [] int32: number of filled slots

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32),
        )


def _apply_block(block, *args):
    return block(*args)


# Recompute each block's activations in the backward pass instead of storing them.
_apply_block_remat = nnx.remat(_apply_block)


@jax.custom_vjp
def _lookup_f32_grad(table, tokens):
    return jnp.take(table, tokens, axis=0, mode="clip")


def _lookup_fwd(table, tokens):
    return _lookup_f32_grad(table, tokens), (table, tokens)


def _lookup_bwd(res, ct):
    table, tokens = res
    ids = jnp.clip(tokens, 0, table.shape[0] - 1)
    grad = jnp.zeros(table.shape, jnp.float32).at[ids].add(ct.astype(jnp.float32))
    return grad.astype(table.dtype), None


_lookup_f32_grad.defvjp(_lookup_fwd, _lookup_bwd)


def embed_lookup(table, tokens) -> jax.Array:
    """``take(table, tokens, axis=0, mode="clip")``. Autodiff's transpose is a scatter-add in the
    table's dtype: a bfloat16 table's row for a token seen hundreds of times in the batch
    stagnates (bf16 sums of O(1) terms stop growing at 256-512), so a low-precision table
    accumulates its gradient in float32 instead (as PyTorch's embedding backward does)."""
    if jnp.dtype(table.dtype).itemsize >= 4:
        return jnp.take(table, tokens, axis=0, mode="clip")
    return _lookup_f32_grad(table, tokens)


def head_logits(hidden, w, layout: str) -> jax.Array:
    """``hidden [..., d]`` times a head stored ``[d, V]`` ("dv") or ``[V, d]`` ("vd"), float32."""
    spec = "...d,vd->...v" if layout == "vd" else "...d,dv->...v"
    return jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32)


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, v, pd = config.hidden_size, config.vocab_size, config.weight_dtype
        self.embed = param(rngs, nnx.initializers.normal(1.0), (v, d), ("vocab", "embed"), pd)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(d, config.rms_norm_eps, pd, rngs=rngs)
        if not config.tie_embeddings:
            init = nnx.initializers.normal(1.0 / math.sqrt(d))
            self.lm_head = param(rngs, init, (d, v), ("embed", "vocab"), pd)
        if config.loramoe_experts or config.prefix_len:
            # The adapters draw from one key taken after every base weight: the base weights
            # are exactly those of the plain model with the same seed.
            adapter_rngs = nnx.Rngs(params=rngs.params())
            for block in self.layers:
                block.add_adapters(config, rngs=adapter_rngs)

    def lm_head_weight(self) -> jax.Array:
        """The ``[d, V]`` output projection (the transposed embedding when tied)."""
        return self.head_weight("dv")[0]

    def head_weight(self, layout: str | None = None) -> tuple[jax.Array, str]:
        """``(weight, layout)`` of the output head for ``fused_lm_head(weight_layout=layout)``:
        as stored (a tied embedding ``[V, d]``, "vd", read in place by the kernels; an untied
        head ``[d, V]``, "dv"), or transposed to ``layout`` when one is asked for."""
        w, stored = (self.embed[...], "vd") if self.config.tie_embeddings else (self.lm_head[...], "dv")
        return (w, stored) if layout in (None, stored) else (w.T, layout)

    def logits(self, hidden_BxTxd) -> jax.Array:
        """Materialized float32 logits ``[..., V]`` (generation, metrics): the head is read as
        stored, in the activations' dtype, like the fused kernel reads it."""
        w, layout = self.head_weight()
        return head_logits(hidden_BxTxd, w.astype(hidden_BxTxd.dtype), layout)

    def __call__(self, tokens_BxT, *, positions=None, segment_ids=None, cache: KVCache | None = None,
                 inputs_embeds=None, category=None):
        """Returns hidden states ``[B,T,d]``, or ``(hidden, cache)`` when a cache is given.

        ``positions`` default to ``arange(T)`` (offset by the cache index); ``segment_ids``
        (packing; 0 = padding) default to all ones. ``inputs_embeds`` ``[B,T,d]``, when given,
        replaces the embedding lookup of ``tokens_BxT`` (e.g. scheduled-sampling mixtures).
        ``category`` ``[B]`` (the bank's per-example category index) only feeds auxiliary
        losses: with LoRAMoE and ``loramoe_lbc_weight != 0`` each adapted projection sows its
        balancing loss (examples typed by :func:`~curriculax.models.layers.example_type`).
        """
        cfg = self.config
        b, t = tokens_BxT.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        q_index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is None:
            positions = q_index
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        if inputs_embeds is None:
            # clip: an out-of-range pad id would read NaN, and 0-probability attention to a NaN
            # value is still NaN (padded positions are masked, their embedding is irrelevant)
            x = embed_lookup(self.embed[...], tokens_BxT).astype(cfg.compute_dtype)
        else:
            if inputs_embeds.shape != (b, t, cfg.hidden_size):
                raise ValueError(f"inputs_embeds must be {(b, t, cfg.hidden_size)}, got {inputs_embeds.shape}")
            x = inputs_embeds.astype(cfg.compute_dtype)
        x = constrain(x, ("batch", None, None))  # not laid out like the embedding table
        types = None
        if category is not None and cfg.loramoe_experts and cfg.loramoe_lbc_weight != 0:
            types = example_type(category, cfg.loramoe_type1_categories)
        kv_seg = None
        if cache is not None:
            if t > cache.segment_ids.shape[1]:
                raise ValueError(f"{t} tokens do not fit a KV cache of {cache.segment_ids.shape[1]} slots: "
                                 f"make it longer (KVCache.init(..., max_len)).")
            kv_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, start, axis=1)

        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], kv_seg, start)
            # Cached calls (decoding) are never differentiated, and nnx.remat cannot lift a
            # model that a decode loop's lax.scan closes over (TraceContextError).
            apply = _apply_block_remat if cfg.remat and cache is None else _apply_block
            x, layer_cache = apply(block, x, positions, segment_ids, q_index, layer_cache, types)
            x = constrain(x, ("batch", None, None))
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        hidden = self.final_norm(x)
        if cache is None:
            return hidden
        cache = KVCache(jnp.stack(new_k), jnp.stack(new_v), kv_seg, start + t)
        # past the last slot dynamic_update_slice clamps and overwrites earlier keys: make the
        # (traced, so unraisable) overflow visible as NaN rather than silently wrong
        overflow = start + t > cache.segment_ids.shape[1]
        return jnp.where(overflow, jnp.nan, hidden).astype(hidden.dtype), cache

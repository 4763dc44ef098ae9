"""Building blocks: RMSNorm, rotary embeddings, attention with GQA, SwiGLU MLP.

Every parameter carries logical axis names (``out_sharding`` metadata, lazily applied) that
:mod:`curriculax.sharding` maps to mesh axes with config rules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from curriculax.models.config import ModelConfig, RopeScaling

NEG_INF = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, not NaN


def param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    """A parameter annotated with logical axes; sharding is applied later by rules."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, normalised in fp32 as HF Llama/Qwen do."""

    def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs, axis_name="norm"):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * x32.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jnp.ndarray:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama-3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxTxHxD, positions_BxT, inv_freq):
    """Rotate-half RoPE (the HF convention: first and second halves pair up)."""
    angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq  # [B,T,D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


def attention_mask(q_index_BxT, q_seg_BxT, kv_seg_BxS):
    """Causal + same-segment mask ``[B,1,T,S]``; segment 0 marks padding / empty cache slots."""
    kv_index = jnp.arange(kv_seg_BxS.shape[1])
    causal = kv_index[None, None, :] <= q_index_BxT[:, :, None]
    same = q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :]
    valid = kv_seg_BxS[:, None, :] != 0
    return (causal & same & valid)[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = cfg.weight_dtype
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(d))
        self.cfg = cfg
        self.q = param(rngs, init, (d, h, hd), ("embed", "q_heads", "head_dim"), pd)
        self.k = param(rngs, init, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v = param(rngs, init, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
        out_init = nnx.initializers.normal(stddev=1.0 / math.sqrt(h * hd))
        self.o = param(rngs, out_init, (h, hd, d), ("q_heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, zeros, (h, hd), ("q_heads", "head_dim"), pd)
            self.k_bias = param(rngs, zeros, (k, hd), ("kv_heads", "head_dim"), pd)
            self.v_bias = param(rngs, zeros, (k, hd), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs, axis_name="head_dim")

    def _project(self, x, w, bias_name):
        dt = self.cfg.compute_dtype
        y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(dt))
        if self.cfg.qkv_bias:
            y = y + getattr(self, bias_name)[...].astype(dt)
        return y

    def __call__(self, x_BxTxd, positions_BxT, segment_ids_BxT, q_index_BxT, layer_cache=None):
        cfg = self.cfg
        q = self._project(x_BxTxd, self.q, "q_bias")
        k = self._project(x_BxTxd, self.k, "k_bias")
        v = self._project(x_BxTxd, self.v, "v_bias")
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # A trace-time constant (folded by XLA), so the model's state holds only parameters.
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions_BxT, inv_freq)
        k = apply_rope(k, positions_BxT, inv_freq)

        kv_seg = segment_ids_BxT
        if layer_cache is not None:
            k_cache, v_cache, kv_seg, start = layer_cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
            layer_cache = (k, v)

        b, t, h, hd = q.shape
        groups = h // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(hd)
        mask = attention_mask(q_index_BxT, segment_ids_BxT, kv_seg)  # [B,1,T,S]
        scores = jnp.where(mask[:, :, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(cfg.compute_dtype))
        out = out.reshape(b, t, h, hd)
        y = jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(cfg.compute_dtype))
        return y, layer_cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
        self.dtype = cfg.compute_dtype
        self.gate = param(rngs, nnx.initializers.normal(1 / math.sqrt(d)), (d, f), ("embed", "mlp"), pd)
        self.up = param(rngs, nnx.initializers.normal(1 / math.sqrt(d)), (d, f), ("embed", "mlp"), pd)
        self.down = param(rngs, nnx.initializers.normal(1 / math.sqrt(f)), (f, d), ("mlp", "embed"), pd)

    def __call__(self, x):
        dt = self.dtype
        g = x @ self.gate[...].astype(dt)
        u = x @ self.up[...].astype(dt)
        return (jax.nn.silu(g) * u) @ self.down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, q_index, layer_cache=None):
        h, layer_cache = self.attn(self.attn_norm(x), positions, segment_ids, q_index, layer_cache)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, layer_cache

"""Building blocks: RMSNorm, rotary embeddings, attention with GQA, SwiGLU MLP, and the optional
parameter-efficient modules (LoRAMoE experts on the MLP, prefix keys/values on attention).

Every parameter carries logical axis names (``out_sharding`` metadata, lazily applied) that
:mod:`curriculax.sharding` maps to mesh axes with config rules. The adapter-only names
(``experts``, ``lora_rank``, ``prefix``) have no rule by default, so those axes replicate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from curriculax.models.config import ModelConfig, RopeScaling

NEG_INF = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, not NaN


def param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    """A parameter annotated with logical axes; sharding is applied later by rules."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class AuxLoss(nnx.Intermediate):
    """A scalar the model sows into its loss (LoRAMoE's balancing constraint). The train step
    collects them with ``nnx.capture(model, AuxLoss)`` and adds their sum to the objective."""


@struct.dataclass
class LowRank:
    """A frozen weight ``w`` with a LoRA update ``scale * a @ b`` kept apart (the value
    :func:`curriculax.peft.lora.attach` puts in a projection's parameter). ``a [m, r]`` and
    ``b [r, n]`` act on the 2-D ``[m, n]`` view of ``w`` (attention ``o [H,D,d]`` is ``[H*D, d]``).
    Applying ``x @ w + scale * (x @ a) @ b`` instead of a merged ``w + scale * a @ b`` keeps the
    adapter updates that rounding the merge to a bfloat16 ``w`` would lose."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False, default=1.0)


def project(spec: str, x, weight: nnx.Variable, dtype):
    """``einsum(spec, x, weight)`` in ``dtype``; a :class:`LowRank` weight adds its adapter term,
    computed in float32 (``r`` is small: a few percent of the projection's FLOPs)."""
    w = weight.get_value()
    if not isinstance(w, LowRank):
        return jnp.einsum(spec, x, w.astype(dtype))
    y = jnp.einsum(spec, x, w.w.astype(dtype))
    n_in = (x.ndim + w.w.ndim - y.ndim) // 2  # trailing dims of x the einsum contracts
    x_2d = x.reshape(*x.shape[:x.ndim - n_in], w.a.shape[0]).astype(jnp.float32)
    delta = (x_2d @ w.a.astype(jnp.float32)) @ w.b.astype(jnp.float32)
    return y + (w.scale * delta).reshape(y.shape).astype(y.dtype)


# LoRAMoE (curriculax.peft.loramoe): pure functions ------------------------------------------

class LayerInput(nnx.Intermediate):
    """The inputs of the projection matrices, sown only while a module's ``record_inputs`` is
    set (CorDA's covariance collection, :func:`curriculax.peft.corda.collect_covariances`)."""


def record(module: nnx.Module, name: str, x) -> None:
    if getattr(module, "record_inputs", False):
        module.sow(LayerInput, name, x)


def kaiming_uniform(fan_in_axis: int):
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's ``kaiming_uniform_(a=sqrt(5))`` on an
    ``nn.Linear`` weight (gain ``sqrt(1/3)`` times ``sqrt(3/fan_in)``), fan-in read from
    ``shape[fan_in_axis]`` of our ``[in, ...]`` layout."""
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(shape[fan_in_axis])
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def router_weights(x, router_dxE):
    """``omega(x) = softmax(x @ W_r)`` over the experts, always in float32 (as the official
    code computes the router)."""
    logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), router_dxE.astype(jnp.float32))
    return jax.nn.softmax(logits, axis=-1)


def loramoe_delta(x, a_ExDxR, b_ExRxO, weights, scale: float):
    """``scale * sum_i omega_i(x) B_i A_i x`` in our ``y = x @ W`` layout (``a[i] = A_i^T``,
    ``b[i] = B_i^T``). The router weight scales the rank-r code before ``B``, so no
    ``[..., experts, out]`` tensor is ever built."""
    dt = x.dtype
    h = jnp.einsum("...d,edr->...er", x, a_ExDxR.astype(dt)) * weights.astype(dt)[..., None]
    return scale * jnp.einsum("...er,ero->...o", h, b_ExRxO.astype(dt))


def balance_loss(importance_BxE, example_type_B, *, delta: float, weight: float,
                 form: str = "code"):
    """LoRAMoE's localized balancing constraint for one adapted projection.

    ``Q[m, n] = 1 + delta`` when expert ``n`` is in the half matching the example's type (type 1:
    experts ``0..N/2-1``; type 0: ``N/2..N-1``), else ``1 - delta``; ``Z = I * Q`` flattened;
    ``form="code"``: ``weight * Var_ddof1(Z) / (Mean(Z)^2 + 1e-10)`` (the official code),
    ``"paper"``: ``weight * Var(Z) / Mean(Z)`` (the paper's formula). 0 when ``weight == 0`` or
    ``Z`` has one element (torch's ddof=1 variance would be NaN there)."""
    b, e = importance_BxE.shape
    if weight == 0 or b * e == 1:
        return jnp.zeros((), jnp.float32)
    first_half = jnp.arange(e) < e // 2
    matched = jnp.where(example_type_B[:, None] == 1, first_half, ~first_half)
    z = (importance_BxE.astype(jnp.float32) * jnp.where(matched, 1.0 + delta, 1.0 - delta))
    z = z.reshape(-1)
    mean = jnp.mean(z)
    if form == "code":
        return weight * jnp.var(z, ddof=1) / (mean * mean + 1e-10)
    return weight * jnp.var(z) / (mean + 1e-10)


def example_type(category_B, type1_categories: tuple[int, ...]):
    """The binary LoRAMoE data type of each example from its category index: 1 for the listed
    categories, or (empty list) for odd category indices."""
    category_B = category_B.astype(jnp.int32)
    if type1_categories:
        return jnp.isin(category_B, jnp.asarray(type1_categories, jnp.int32)).astype(jnp.int32)
    return category_B % 2


class LoRAMoE(nnx.Module):
    """N LoRA experts and a router on one projection ``[d_in] -> [d_out]``; adds
    ``(alpha/r) sum_i omega_i(x) B_i A_i x`` to the frozen projection's output. ``A_i`` and the
    router start kaiming-uniform, ``B_i`` at zero (so the block starts equal to the plain one).
    Parameters are float32 whatever ``param_dtype``: they are the trained ones."""

    def __init__(self, cfg: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], *,
                 rngs: nnx.Rngs):
        e, r = cfg.loramoe_experts, cfg.loramoe_rank
        in_axis, out_axis = axes
        f32 = jnp.float32
        self.scale = float(cfg.loramoe_alpha) / r
        self.lbc = (cfg.loramoe_lbc_weight, cfg.loramoe_lbc_delta, cfg.loramoe_lbc_form)
        self.a = param(rngs, kaiming_uniform(1), (e, d_in, r),
                       ("experts", in_axis, "lora_rank"), f32)
        self.b = param(rngs, nnx.initializers.zeros, (e, r, d_out),
                       ("experts", "lora_rank", out_axis), f32)
        self.router = param(rngs, kaiming_uniform(0), (d_in, e), (in_axis, "experts"), f32)

    def __call__(self, x_BxTxD, example_type_B=None):
        weights = router_weights(x_BxTxD, self.router[...])
        if example_type_B is not None and self.lbc[0] != 0:
            # Importance sums the router weights over every position, padding included (as in
            # the official code); the loss is sown already multiplied by beta.
            importance = weights.reshape(weights.shape[0], -1, weights.shape[-1]).sum(1)
            weight, delta, form = self.lbc
            self.sow(AuxLoss, "aux_loss", balance_loss(importance, example_type_B, delta=delta,
                                                       weight=weight, form=form))
        return loramoe_delta(x_BxTxD, self.a[...], self.b[...], weights, self.scale)


class Prefix(nnx.Module):
    """Prefix tuning's learned keys and values for one attention layer, ``[P, K, D]`` each (per
    KV head, post-RoPE and post-norm: they are used as given). Initialised ``N(0, 1)`` like PEFT's
    ``nn.Embedding``; float32 whatever ``param_dtype``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        shape = (cfg.prefix_len, cfg.num_kv_heads, cfg.head_dim)
        axes = ("prefix", "kv_heads", "head_dim")
        self.k = param(rngs, nnx.initializers.normal(1.0), shape, axes, jnp.float32)
        self.v = param(rngs, nnx.initializers.normal(1.0), shape, axes, jnp.float32)


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
        self.prefix = None  # a Prefix, attached by the Transformer when prefix_len > 0

    def _project(self, x, w, bias_name):
        dt = self.cfg.compute_dtype
        y = project("btd,dhk->bthk", x, w, dt)
        if self.cfg.qkv_bias:
            y = y + getattr(self, bias_name)[...].astype(dt)
        return y

    def __call__(self, x_BxTxd, positions_BxT, segment_ids_BxT, q_index_BxT, layer_cache=None):
        cfg = self.cfg
        record(self, "qkv_input", x_BxTxd)
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
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        mask = attention_mask(q_index_BxT, segment_ids_BxT, kv_seg)  # [B,1,T,S]
        scores = jnp.where(mask[:, :, None], scores, NEG_INF)
        if self.prefix is not None:
            return self._with_prefix(q, scores, v, segment_ids_BxT), layer_cache
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(cfg.compute_dtype))
        out = out.reshape(b, t, h, hd)
        record(self, "o_input", out.reshape(b, t, h * hd))
        y = project("bthk,hkd->btd", out, self.o, cfg.compute_dtype)
        return y, layer_cache

    def _with_prefix(self, q, scores, v, segment_ids_BxT):
        """Attention over ``[prefix; sequence]``: every real token (segment != 0, in every
        packed segment) also sees the ``P`` prefix slots; padding rows stay fully masked. The
        prefixes come from the parameters at every call, never from the KV cache, so cached
        decoding equals the full forward pass."""
        cfg = self.cfg
        b, t, kv, groups, hd = q.shape
        dt = cfg.compute_dtype
        pk, pv = self.prefix.k[...].astype(q.dtype), self.prefix.v[...].astype(dt)
        p_scores = jnp.einsum("btkgd,pkd->bkgtp", q, pk, preferred_element_type=jnp.float32) / math.sqrt(hd)
        real = (segment_ids_BxT != 0)[:, None, None, :, None]
        p_scores = jnp.where(real, p_scores, NEG_INF)
        probs = jax.nn.softmax(jnp.concatenate([p_scores, scores], -1), axis=-1).astype(dt)
        n = cfg.prefix_len
        out = (jnp.einsum("bkgtp,pkd->btkgd", probs[..., :n], pv)
               + jnp.einsum("bkgts,bskd->btkgd", probs[..., n:], v.astype(dt)))
        out = out.reshape(b, t, kv * groups, hd)
        record(self, "o_input", out.reshape(b, t, kv * groups * hd))
        return project("bthk,hkd->btd", out, self.o, dt)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
        self.dtype = cfg.compute_dtype
        self.gate = param(rngs, nnx.initializers.normal(1 / math.sqrt(d)), (d, f), ("embed", "mlp"), pd)
        self.up = param(rngs, nnx.initializers.normal(1 / math.sqrt(d)), (d, f), ("embed", "mlp"), pd)
        self.down = param(rngs, nnx.initializers.normal(1 / math.sqrt(f)), (f, d), ("mlp", "embed"), pd)
        self.loramoe = None  # {target: LoRAMoE}, attached by the Transformer when experts > 0

    def add_loramoe(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        shapes = {"gate": (d, f, ("embed", "mlp")), "up": (d, f, ("embed", "mlp")),
                  "down": (f, d, ("mlp", "embed"))}
        names = [name for name in ("gate", "up", "down") if name in cfg.loramoe_targets]
        self.loramoe = nnx.data(nnx.Dict(
            {name: LoRAMoE(cfg, *shapes[name], rngs=rngs) for name in names}))

    def _adapted(self, name, x, w, example_type_B):
        y = project("...i,io->...o", x, w, self.dtype)
        if self.loramoe is not None and name in self.loramoe:
            y = y + self.loramoe[name](x, example_type_B)
        return y

    def __call__(self, x, example_type_B=None):
        record(self, "gate_up_input", x)
        g = self._adapted("gate", x, self.gate, example_type_B)
        u = self._adapted("up", x, self.up, example_type_B)
        h = jax.nn.silu(g) * u
        record(self, "down_input", h)
        return self._adapted("down", h, self.down, example_type_B)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def add_adapters(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        """Attaches the optional LoRAMoE experts / prefixes (after every base weight exists)."""
        if cfg.loramoe_experts:
            self.mlp.add_loramoe(cfg, rngs=rngs)
        if cfg.prefix_len:
            self.attn.prefix = nnx.data(Prefix(cfg, rngs=rngs))

    def __call__(self, x, positions, segment_ids, q_index, layer_cache=None, example_type_B=None):
        h, layer_cache = self.attn(self.attn_norm(x), positions, segment_ids, q_index, layer_cache)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x), example_type_B)
        return x, layer_cache

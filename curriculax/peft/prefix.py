"""Prefix tuning — learned attention keys/values prepended to every sequence.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL 2021, arXiv
2101.00190). The model is frozen; every attention layer ``l`` gets ``P`` learned key/value pairs
``(K_l^P, V_l^P)`` that every real token attends to in front of the sequence::

    attn(q, [K_l^P; K], [V_l^P; V])      K_l^P, V_l^P: [P, kv_heads, head_dim]

They are the layer's *activations* (the paper's ``P_theta``, HF's ``past_key_values``): used as
given, after RoPE and the QK norm, never projected. Real tokens keep positions ``0..T-1`` (HF's
PEFT shifts them by ``P``; with unrotated learned keys that is the same family of models, a fixed
rotation of ``K^P`` apart). With packing every segment sees the prefixes; padding rows stay
masked; a KV cache holds only real tokens (the prefixes are re-read from the parameters at every
call), so cached decoding equals the full forward pass. In the model: ``ModelConfig.prefix_len``
(0 = off, the plain model exactly), parameters ``layers/<i>/attn/prefix/{k,v}``, initialised
``N(0, 1)`` like PEFT's ``nn.Embedding``. :func:`curriculax.models.hf.save_hf` refuses such a
model (a plain HF checkpoint cannot hold the prefixes).

Reparameterization (the paper's, for stable optimisation; ``reparam_hidden > 0``): the trained
parameters are a smaller ``P' [P, d_model]`` and a one-hidden-layer MLP::

    [K^P; V^P]_{all layers} = tanh(P' W1 + b1) W2 + b2     W2: [hidden, L * 2 * K * D]

(``P' ~ N(0, 1)``, ``W``/``b`` PyTorch ``nn.Linear`` init). The trainer's parameters are then
``{"base": model weights, "reparam": {...}}`` and the model runs on :func:`materialize`'s output;
``exp.model_params(params)`` gives plain model weights with the computed prefixes (after
training only ``P_theta`` is kept, as in the paper). ``reparam_hidden = 0`` trains the prefixes
directly.

Defaults: ``prefix_len=10`` (the paper's table-to-text value; it reports gains up to ~200 for
summarization, unverified), ``reparam_hidden=512`` (the official code's ``mid_dim``). Not
implemented: initialising the prefixes from real words' activations (the paper's low-data
trick), and the paper's "embedding-only" ablation (virtual tokens at the input only).

Usage::

    from curriculax import sparsity
    c.sparsity = sparsity.config("prefix", prefix_len=10, reparam_hidden=512)
    train(c, "runs/prefix")
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from curriculax.sparsity import base, select

TRAINABLE = r"/attn/prefix/(k|v)$"  # path regex of the direct prefixes
_PATH = re.compile(r"layers/(\d+)/attn/prefix/(k|v)")


def default_config() -> dict:
    return dict(prefix_len=10, reparam_hidden=512)


def model_overrides(cfg) -> dict:
    return dict(prefix_len=int(cfg.prefix_len))


def init_leaf(path: str, shape, dtype, key):
    """The model's initialisation of one prefix (``N(0, 1)``)."""
    del path
    return jax.random.normal(key, shape, dtype)


# Reparameterization ---------------------------------------------------------------------------

def reparam_shapes(model_config, hidden: int) -> dict[str, tuple[int, ...]]:
    c = model_config
    out = c.num_layers * 2 * c.num_kv_heads * c.head_dim
    return {"embed": (c.prefix_len, c.hidden_size), "w1": (c.hidden_size, hidden),
            "b1": (hidden,), "w2": (hidden, out), "b2": (out,)}


def init_reparam(model_config, hidden: int, key) -> dict:
    """``P' ~ N(0, 1)``; each linear layer's weight and bias ``U(±1/sqrt(fan_in))``."""
    shapes = reparam_shapes(model_config, hidden)
    keys = dict(zip(sorted(shapes), jax.random.split(key, len(shapes))))
    fan_in = {"w1": model_config.hidden_size, "b1": model_config.hidden_size, "w2": hidden,
              "b2": hidden}
    out = {"embed": jax.random.normal(keys["embed"], shapes["embed"], jnp.float32)}
    for name, n in fan_in.items():
        bound = 1.0 / math.sqrt(n)
        out[name] = jax.random.uniform(keys[name], shapes[name], jnp.float32, -bound, bound)
    return out


def reparam_prefixes(reparam, model_config):
    """``[L, 2, P, K, D]`` keys (index 0) and values (1) of every layer from the MLP."""
    c = model_config
    h = jnp.tanh(reparam["embed"] @ reparam["w1"] + reparam["b1"])
    kv = h @ reparam["w2"] + reparam["b2"]  # [P, L*2*K*D]
    kv = kv.reshape(c.prefix_len, c.num_layers, 2, c.num_kv_heads, c.head_dim)
    return kv.transpose(1, 2, 0, 3, 4)


def materialize(params, model_config):
    """Model weights from ``{"base", "reparam"}``: the base (frozen) with every layer's prefix
    keys/values replaced by the MLP's output."""
    kv = reparam_prefixes(params["reparam"], model_config)

    def one(path, w):
        m = _PATH.fullmatch(path)
        if m is None:
            return jax.lax.stop_gradient(w)
        return kv[int(m.group(1)), "kv".index(m.group(2))].astype(w.dtype)
    return base.map_with_path(one, params["base"])


# Trainer integration --------------------------------------------------------------------------

def _model_config(abstract_params):
    """The prefix geometry read off the parameter shapes (the builder only gets shapes)."""
    from types import SimpleNamespace

    layers = abstract_params["layers"]
    pk = layers[next(iter(layers))]["attn"]["prefix"]["k"].shape
    return SimpleNamespace(num_layers=len(layers), prefix_len=pk[0], num_kv_heads=pk[1],
                           head_dim=pk[2], hidden_size=abstract_params["embed"].shape[1])


def build(config, abstract_params) -> base.Sparsity:
    cfg = base.method_config(config)
    what = "prefix keys/values (ModelConfig.prefix_len > 0)"
    if not cfg.reparam_hidden:
        sparsity = select.selection(config, abstract_params, TRAINABLE, what=what)
        return sparsity._replace(init_params=lambda params, rng: select.fill_missing(
            params, abstract_params, init_leaf, rng))

    select.selection(config, abstract_params, TRAINABLE, what=what)  # checks the model has them
    geometry = _model_config(abstract_params)
    shapes = reparam_shapes(geometry, cfg.reparam_hidden)
    wrapped = {"base": abstract_params,
               "reparam": {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}}
    sparsity = select.selection(config, wrapped, r"^reparam/", what=what)

    def init_params(params, rng):
        filled = select.fill_missing(params, abstract_params, init_leaf, rng)
        return {"base": filled,
                "reparam": init_reparam(geometry, cfg.reparam_hidden, jax.random.fold_in(rng, 1))}

    def param_shardings(model_shardings, replicated):
        return {"base": model_shardings,
                "reparam": jax.tree.map(lambda _: replicated, wrapped["reparam"])}

    return sparsity._replace(init_params=init_params,  # materialize stops the base's gradients
                             materialize=lambda params: materialize(params, geometry),
                             forward_params=None, param_shardings=param_shardings)


base.register("prefix", build, default_config, model_overrides)

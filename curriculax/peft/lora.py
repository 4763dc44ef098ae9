"""LoRA — low-rank adapters (Hu et al., ICLR 2022, arXiv 2106.09685).

For each targeted weight ``W`` (2-D view ``[m, n]``, :func:`curriculax.sparsity.base.matrix_view`;
attention ``q [d,H,D]`` is ``[d, H*D]``, ``o [H,D,d]`` is ``[H*D, d]``)::

    W' = W + (alpha / rank) · A @ B,     A: [m, rank] ~ U(-1/sqrt(m), 1/sqrt(m)),   B: [rank, n] = 0

(our weights are ``[in, out]`` with ``y = x @ W``, so ``A`` is PEFT's ``lora_A.T`` and ``B`` its
``lora_B.T``; ``B = 0`` makes the adapted model start equal to the base). Only ``A`` and ``B``
train; ``W`` is frozen (and gets no optimizer state).

Targets are chosen by a regular expression over parameter paths (``layers/3/attn/q``,
``layers/0/mlp/up``, ...). Defaults: ``rank=8``, ``alpha=16``, ``targets`` = every
attention/MLP projection (the paper adapted ``q``/``v`` only: ``r"attn/(q|v)$"``), ``seed=None``:
``A`` is drawn from the run's ``config.seed`` (as PEFT draws it from the trainer's seed); an int
fixes it across runs.

In the trainer (``config.sparsity = sparsity.config("lora", rank=..., ...)``) the parameters are
``{"base": model weights, "lora": {path: {"a", "b"}}}`` and the optimizer (clip + AdamW) keeps
moments for the adapters only. The step's forward pass does not merge: :func:`attach` puts a
:class:`~curriculax.models.layers.LowRank` ``(W, A, B)`` in each adapted projection (base under
``stop_gradient``) and the layer computes ``x @ W + scale · (x @ A) @ B``, the adapter term in
float32, so updates far below a bfloat16 ``W``'s rounding step still reach the output (a merged
``W + scale · A @ B`` rounded to bfloat16 drops every entry below ``~|W| / 256``). Targets the
layers do not read as projections (embedding, LM head) are merged. :func:`merge` gives plain model
weights (``exp.model_params``, soups) and :func:`save_hf` writes them as a Hugging Face
safetensors checkpoint; merging to bfloat16 there rounds as any bfloat16 export does.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax

from curriculax.models.layers import LowRank
from curriculax.sparsity import base

# the weights the model's layers read through `layers.project` (the others are merged)
_PROJECTION = re.compile(r"layers/\d+/(attn/[qkvo]|mlp/(gate|up|down))$")


def default_config() -> dict:
    # corda: a covariance file from curriculax.peft.corda.prepare -> CorDA-initialized adapters
    return dict(rank=8, alpha=16.0, targets=r"layers/\d+/(attn/[qkvo]|mlp/(gate|up|down))$",
                seed=None, corda="", corda_mode="ipm")


def targets(abstract_params, pattern: str) -> dict[str, tuple[int, int]]:
    """``{path: (m, n)}`` of every weight (≥ 2-D) whose path matches ``pattern``."""
    out = {}
    for path, p in jax.tree_util.tree_leaves_with_path(abstract_params):
        name = base.path_str(path)
        if len(p.shape) >= 2 and base.matches(pattern, name):
            out[name] = base.matrix_view(name, p.shape)
    if not out:
        raise ValueError(f"LoRA targets={pattern!r} match no weight matrix.")
    return out


def init(abstract_params, key, *, rank: int, pattern: str, dtype=jnp.float32) -> dict:
    """Adapters ``{path: {"a": [m, rank], "b": [rank, n]}}`` (``b`` zero)."""
    out = {}
    for i, (name, (m, n)) in enumerate(sorted(targets(abstract_params, pattern).items())):
        bound = 1.0 / math.sqrt(m)
        a = jax.random.uniform(jax.random.fold_in(key, i), (m, rank), dtype, -bound, bound)
        out[name] = {"a": a, "b": jnp.zeros((rank, n), dtype)}
    return out


def _merged(w, ad, scale: float):
    delta = (ad["a"].astype(jnp.float32) @ ad["b"].astype(jnp.float32)) * scale
    return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)


def merge(params, adapters, *, scale: float):
    """``params`` with ``W + scale · A @ B`` on every adapted weight (same dtypes)."""
    def one(path, w):
        name = base.path_str(path)
        return _merged(w, adapters[name], scale) if name in adapters else w
    return jax.tree_util.tree_map_with_path(one, params)


def attach(params, adapters, *, scale: float):
    """``params`` with a :class:`~curriculax.models.layers.LowRank` ``(W, A, B, scale)`` in every
    adapted projection (the model applies it unmerged) and the other adapted weights merged."""
    def one(path, w):
        name = base.path_str(path)
        if name not in adapters:
            return w
        if _PROJECTION.search(name):
            return LowRank(w, adapters[name]["a"], adapters[name]["b"], scale)
        return _merged(w, adapters[name], scale)
    return jax.tree_util.tree_map_with_path(one, params)


def scale_of(cfg) -> float:
    return float(cfg.alpha) / float(cfg.rank)


def materialize(params, cfg):
    """Plain model weights from the trainer's ``{"base", "lora"}`` params (base frozen)."""
    return merge(jax.lax.stop_gradient(params["base"]), params["lora"], scale=scale_of(cfg))


def forward_params(params, cfg):
    """The step's model parameters: the frozen base with its adapters :func:`attach` -ed."""
    return attach(jax.lax.stop_gradient(params["base"]), params["lora"], scale=scale_of(cfg))


def save_hf(model_config, params, adapters, path, *, scale: float, **save_kw):
    """Merged weights written as an HF checkpoint (:func:`curriculax.models.hf.save_hf`)."""
    from flax import nnx

    from curriculax.models import Transformer, hf

    merged = jax.device_get(merge(params, adapters, scale=scale))
    abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, merged)
    return hf.save_hf(model, model_config, path, **save_kw)


def trainable_count(adapters) -> int:
    return sum(x.size for x in jax.tree.leaves(adapters))


# Trainer integration ------------------------------------------------------------------------

def build(config, abstract_params) -> base.Sparsity:
    from curriculax.sparsity import lift

    cfg = base.method_config(config)
    shapes = targets(abstract_params, cfg.targets)
    wrapped = {"base": abstract_params,
               "lora": {name: {"a": jax.ShapeDtypeStruct((m, cfg.rank), jnp.float32),
                               "b": jax.ShapeDtypeStruct((cfg.rank, n), jnp.float32)}
                        for name, (m, n) in shapes.items()}}
    plan = {"base": jax.tree.map(lambda _: lift.LeafPlan("frozen"), abstract_params),
            "lora": jax.tree.map(lambda _: lift.LeafPlan("dense"), wrapped["lora"])}
    # CorDA adapters hold a slice of the pretrained weight (W = W_res + B A): decay toward 0
    # would erode the model itself, so they train without it (PEFT's Trainer default is 0 too).
    decay = jax.tree.map(lambda lp: lp.kind == "dense" and not cfg.get("corda"), plan,
                         is_leaf=lift._is_plan)
    inner = base.base_optimizer(config.optimizer, config.steps, decay_mask=decay)
    optimizer = lift.sparse_state(inner, plan)
    masks = jax.tree.map(lambda lp: jnp.bool_(lp.kind == "dense"), plan, is_leaf=lift._is_plan)

    def with_masks(opt):  # the masks are static: no TrainState.masks needed
        def update(updates, state, params=None, **extra):
            extra.pop("masks", None)
            return opt.update(updates, state, params, masks=masks)
        return optax.GradientTransformationExtraArgs(opt.init, update)

    def init_params(params, rng):
        if cfg.get("corda"):  # CorDA: base = W_res, adapters from the context decomposition
            from curriculax.peft import corda

            if float(cfg.alpha) != float(cfg.rank):
                raise ValueError(f"sparsity.corda needs scale 1: set sparsity.alpha = "
                                 f"sparsity.rank = {cfg.rank} (got alpha={cfg.alpha}).")
            residual, adapters = corda.init_from_file(params, cfg.corda, cfg.rank, cfg.corda_mode,
                                                      paths=set(shapes))
            missing = set(shapes) - set(adapters)
            if missing:
                raise ValueError(f"sparsity.corda={cfg.corda!r} has no covariance for "
                                 f"{sorted(missing)[:3]}...: rerun corda.prepare with the same "
                                 f"targets.")
            return {"base": residual, "lora": adapters}
        key = rng if cfg.seed is None else jax.random.PRNGKey(cfg.seed)
        return {"base": params,
                "lora": init(params, key, rank=cfg.rank, pattern=cfg.targets)}

    def param_shardings(model_shardings, replicated):
        return {"base": model_shardings,
                "lora": jax.tree.map(lambda _: replicated, wrapped["lora"])}

    def opt_state_shardings(abstract_opt, param_shardings, replicated):
        compact = {"base": jax.tree.map(lambda _: replicated, param_shardings["base"]),
                   "lora": param_shardings["lora"]}
        return lift.SparseState(optax.tree_map_params(
            inner, lambda _, s: s, abstract_opt.inner, compact,
            transform_non_params=lambda _: replicated))

    return base.Sparsity(optimizer=with_masks(optimizer), init_params=init_params,
                         materialize=lambda params: materialize(params, cfg),
                         forward_params=lambda params: forward_params(params, cfg),
                         param_shardings=param_shardings,
                         opt_state_shardings=opt_state_shardings)


base.register("lora", build, default_config)

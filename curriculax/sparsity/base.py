"""The parameter-selection protocol: which entries of the weights an optimizer step may move.

A method is registered under a name (``config.sparsity.name``) as a *builder*::

    build(config, abstract_params) -> Sparsity

called once in :func:`curriculax.train.setup.build` with the experiment config and the
parameters' shapes. The returned :class:`Sparsity` bundles pure functions the trainer calls:

- ``optimizer``: an ``optax.GradientTransformationExtraArgs``; its ``update`` receives the
  masks as the keyword argument ``masks=state.masks``;
- ``init_masks(params, rng) -> masks``: the mask pytree kept in ``TrainState.masks`` (``None``
  when the method needs none);
- ``refresh(masks, params, opt_state, step) -> (masks, params, opt_state)``: run inside the
  jitted step after every update (``step`` = steps done); methods whose masks change during
  training (LIFT, HFT rounds, LT-SFT's phase switch) recompute them here under ``lax.cond``;
- ``mask_shardings`` / ``opt_state_shardings``: how the state is laid out on the mesh;
- ``init_params`` / ``materialize`` / ``param_shardings``: for re-parameterizations (LoRA) whose
  trained pytree is not the model's weights; ``materialize(params)`` gives plain model weights
  (export, soups) and the step runs the model on ``forward_params(params)`` when a method sets it
  (LoRA: :class:`~curriculax.models.layers.LowRank` projections, adapters unmerged), else on
  ``materialize(params)`` (:func:`forward_fn`).

A method that needs modules in the model itself (LoRAMoE experts, prefix keys/values) registers
``model_overrides(method_config) -> {ModelConfig field: value}``; :func:`model_overrides` applies
them in :func:`curriculax.train.setup.build` before the model is built.

A mask is a pytree shaped like the params. Each leaf is a boolean (a scalar: the whole matrix,
or an array of the parameter's shape: per entry) or an ``int32 [k]`` set of flat (C-order)
indices for sparse updates (LIFT). Frozen entries get an update of exactly ``-0.0``, weight decay
included, so they are bitwise unchanged after any number of steps.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


class Sparsity(NamedTuple):
    optimizer: optax.GradientTransformationExtraArgs
    init_masks: Callable[[Any, jax.Array], Any] = lambda params, rng: None
    refresh: Callable | None = None  # (masks, params, opt_state, step) -> (masks, params, opt)
    mask_shardings: Callable | None = None  # (abstract_masks, param_shardings, replicated)
    opt_state_shardings: Callable | None = None  # (abstract_opt, param_shardings, replicated)
    # Re-parameterizations (LoRA): the trained pytree differs from the model's weights.
    init_params: Callable | None = None  # (model params, rng) -> trained params
    materialize: Callable | None = None  # trained params -> plain model weights
    forward_params: Callable | None = None  # trained params -> what the step's model runs on
    param_shardings: Callable | None = None  # (model param shardings, replicated) -> shardings


def forward_fn(sparsity: Sparsity | None) -> Callable:
    """``trained params -> model params`` for the forward pass (the identity without a
    re-parameterization)."""
    if sparsity is None:
        return lambda params: params
    return sparsity.forward_params or sparsity.materialize or (lambda params: params)


Builder = Callable[[Any, Any], Sparsity]
_REGISTRY: dict[str, tuple[Builder, Callable[[], dict], Callable | None]] = {}


def register(name: str, build: Builder, default_config: Callable[[], dict] = dict,
             model_overrides: Callable[[Any], dict] | None = None) -> Builder:
    if name in _REGISTRY:
        raise ValueError(f"Sparsity method {name!r} is already registered.")
    _REGISTRY[name] = (build, default_config, model_overrides)
    return build


def model_overrides(config) -> dict:
    """The ``ModelConfig`` fields that ``config.sparsity``'s method sets ({} for most)."""
    sp = config.get("sparsity", None)
    name = sp.get("name", "none") if sp is not None else "none"
    if name not in _REGISTRY or _REGISTRY[name][2] is None:
        return {}
    return dict(_REGISTRY[name][2](method_config(config)))


def get(name: str) -> Builder:
    """The builder registered under ``name`` (config field ``sparsity.name``)."""
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown sparsity.name={name!r}; registered methods: {sorted(_REGISTRY)}.")
    return _REGISTRY[name][0]


def names() -> list[str]:
    return sorted(_REGISTRY)


def method_config(config) -> ml_collections.ConfigDict:
    """``config.sparsity`` over the method's ``default_config()`` (unknown keys are errors)."""
    sp = config.get("sparsity", None) or ml_collections.ConfigDict({"name": "none"})
    name = sp.get("name", "none")
    defaults = dict(_REGISTRY[name][1]()) if name in _REGISTRY else {}
    given = {k: v for k, v in sp.items() if k != "name"}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"config.sparsity has keys {unknown} unknown to method {name!r}; "
                         f"known: {sorted(defaults)}.")
    out = ml_collections.ConfigDict({**defaults, **given})
    return out


def build(config, abstract_params) -> Sparsity:
    sp = config.get("sparsity", None)
    name = sp.get("name", "none") if sp is not None else "none"
    return get(name)(config, abstract_params)


# Pytree helpers -------------------------------------------------------------------------------

def path_str(path) -> str:
    """``layers/0/attn/q`` from a ``jax.tree_util`` key path."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(parts)


def map_with_path(fn, tree, *rest):
    """``jax.tree.map`` whose function also gets the leaf's path string first."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def matrix_view(path: str, shape) -> tuple[int, int]:
    """The 2-D ``[m, n]`` (input, output) view of a weight: attention ``o [H,D,d]`` is
    ``[H*D, d]``; every other projection ``[d, ...out]`` is ``[d, prod(out)]``. Both are C-order
    reshapes, so flat indices are the same in the N-D and the 2-D view."""
    shape = tuple(shape)
    size = 1
    for s in shape:
        size *= s
    if path.rsplit("/", 1)[-1] == "o" and len(shape) > 2:
        return size // shape[-1], shape[-1]
    return shape[0], size // shape[0]


def matches(pattern: str, path: str) -> bool:
    return re.search(pattern, path) is not None


# The default optimizer and its masked versions --------------------------------------------------

def base_optimizer(opt_config, total_steps: int, *, weight_decay=None, eps=None,
                   decay_mask=None) -> optax.GradientTransformation:
    """Clip + AdamW as :func:`curriculax.train.optim.make_optimizer`, with overrides (None:
    ``opt_config``'s value)."""
    from curriculax.train import optim

    wd = opt_config.weight_decay if weight_decay is None else weight_decay
    return optax.chain(
        optim.clip_by_global_norm(opt_config.grad_clip),
        optax.adamw(optim.schedule(opt_config, total_steps), b1=opt_config.b1, b2=opt_config.b2,
                    eps=opt_config.eps if eps is None else eps, weight_decay=wd,
                    mask=optim.decay_mask if decay_mask is None else decay_mask),
    )


def _where(m, new, old):
    return jnp.where(m, new, old).astype(new.dtype)


def masked_dense(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` restricted to boolean masks (``masks=`` at update, params-shaped, scalar or
    per-entry leaves): gradients outside the mask are zeroed *before* clipping (the global norm is
    the selected entries'), the optimizer state of frozen entries is left as it was (no moment
    decay), and their update is exactly -0.0 (every bit kept), decoupled weight decay included.
    State memory is that of ``inner`` (dense); use the sparse-state transform of
    :mod:`curriculax.sparsity.lift` for index-set masks."""

    def update(updates, state, params=None, *, masks=None, **extra):
        del extra
        if masks is None:
            return inner.update(updates, state, params)
        grads = jax.tree.map(lambda g, m: _where(m, g, jnp.zeros_like(g)), updates, masks)
        new_updates, new_state = inner.update(grads, state, params)
        # -0.0, not 0.0: p + (-0.0) is p bit for bit, even for a frozen p = -0.0
        new_updates = jax.tree.map(lambda u, m: _where(m, u, jnp.full_like(u, -0.0)), new_updates,
                                   masks)
        state_masks = optax.tree_map_params(inner, lambda _, m: m, state, masks,
                                            transform_non_params=lambda _: jnp.bool_(True))
        new_state = jax.tree.map(_where, state_masks, new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def like_params_shardings(abstract_masks, param_shardings, replicated):
    """Mask leaves shaped like their parameter share its sharding; other leaves replicate."""
    def one(m, s):
        return replicated if not hasattr(m, "shape") or m.ndim == 0 else s
    return jax.tree.map(one, abstract_masks, param_shardings)


def refresh_due(step, every: int, offset: int = 0):
    """True after optimizer step ``step`` (1-based count of steps done) when
    ``(step + offset) % every == 0``; never when ``every <= 0``."""
    if every <= 0:
        return jnp.bool_(False)
    return (step + offset) % every == 0


# "none": full fine-tuning --------------------------------------------------------------------

def _build_none(config, abstract_params) -> Sparsity:
    from curriculax.train.optim import make_optimizer

    return Sparsity(optimizer=optax.with_extra_args_support(
        make_optimizer(config.optimizer, config.steps)))


register("none", _build_none)


def config(name: str, **overrides) -> ml_collections.ConfigDict:
    """A full ``config.sparsity`` for method ``name``: its defaults, then ``overrides``
    (so that command-line ``--config.sparsity.<key>=...`` can reach every setting)."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown sparsity method {name!r}; registered: {sorted(_REGISTRY)}.")
    defaults = dict(_REGISTRY[name][1]())
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown settings {unknown} for sparsity method {name!r}; "
                         f"known: {sorted(defaults)}.")
    return ml_collections.ConfigDict({"name": name, **defaults, **overrides})

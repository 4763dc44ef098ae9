"""Train a fixed subset of whole parameters chosen by path (e.g. embedding-only tuning).

``include`` is a regular expression over parameter paths (``embed``, ``lm_head``,
``layers/3/attn/q``, ``layers/0/mlp_norm/scale``...) or the name of a preset in :data:`PRESETS`;
matching parameters train with the usual clip + AdamW, everything else is frozen and holds
**no** optimizer state (the sparse-state transform of :mod:`curriculax.sparsity.lift` with
dense/frozen leaves). Default: embedding-only tuning (``include="embedding-only"``, i.e.
``r"^embed$"``: the input embedding matrix, which is also the output head when embeddings are
tied); e.g. ``"norms"`` tunes only the RMSNorm scales, ``"vocab"`` both vocabulary matrices.

(Li & Liang's "embedding-only" ablation of prefix tuning, learned virtual-token embeddings at the
input only, is a different method: it is not implemented.)

:func:`selection` is the building block other methods reuse for their own trainable set
(LoRAMoE's experts, prefix tuning's keys/values), with :func:`fill_missing` to create those
parameters when the starting weights lack them (a Hugging Face checkpoint).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import optax

from curriculax.sparsity import base, lift

PRESETS = {
    "embedding-only": r"^embed$",
    "norms": r"norm/scale$",
    "vocab": r"^(embed|lm_head)$",
}


def default_config() -> dict:
    return dict(include="embedding-only")


def pattern(include: str) -> str:
    """A preset name's regular expression; any other string is used as a regex."""
    return PRESETS.get(include, include)


def selection(config, abstract_params, include: str, *, what: str = "sparsity.include",
              weight_decay: float | None = None) -> base.Sparsity:
    """Clip + AdamW on the leaves whose path matches the regex ``include``, the rest frozen
    (bitwise: exact zero updates, no optimizer state). Weight decay (``weight_decay``, default
    ``config.optimizer``'s) on the trained leaves of rank >= 2. ``what`` names the setting in
    the error when nothing matches."""
    plan = base.map_with_path(
        lambda path, p: lift.LeafPlan("dense" if base.matches(include, path) else "frozen"),
        abstract_params)
    kinds = [lp.kind for lp in jax.tree.leaves(plan, is_leaf=lift._is_plan)]
    if "dense" not in kinds:
        raise ValueError(f"{what}={include!r} matches no parameter.")
    from curriculax.train import optim

    decay = jax.tree.map(lambda lp, d: lp.kind == "dense" and d, plan,
                         optim.decay_mask(abstract_params), is_leaf=lift._is_plan)
    inner = base.base_optimizer(config.optimizer, config.steps, weight_decay=weight_decay,
                                decay_mask=decay)
    optimizer = lift.sparse_state(inner, plan)

    def opt_state_shardings(abstract_opt, param_shardings, replicated):
        compact = jax.tree.map(lambda lp, s: s if lp.kind == "dense" else replicated, plan,
                               param_shardings, is_leaf=lift._is_plan)
        return lift.SparseState(optax.tree_map_params(
            inner, lambda _, s: s, abstract_opt.inner, compact,
            transform_non_params=lambda _: replicated))

    def forward_params(params):
        # frozen leaves get no gradient at all: the backward skips their weight-gradient GEMMs,
        # and grad_norm (and clipping) see the trained leaves only
        return jax.tree.map(lambda lp, p: p if lp.kind == "dense" else jax.lax.stop_gradient(p),
                            plan, params, is_leaf=lift._is_plan)

    return base.Sparsity(
        optimizer=optimizer,
        init_masks=lambda params, rng: jax.tree.map(
            lambda lp: jnp.bool_(lp.kind == "dense"), plan, is_leaf=lift._is_plan),
        mask_shardings=lambda m, p, replicated: jax.tree.map(lambda _: replicated, m),
        opt_state_shardings=opt_state_shardings, forward_params=forward_params)


def fill_missing(params, abstract, init_leaf, rng):
    """``params`` completed to the structure of ``abstract``: a leaf it lacks is created by
    ``init_leaf(path, shape, dtype, key)`` (key from ``rng`` and the path, so it does not depend
    on which other leaves are missing); leaves it has are kept as they are."""
    have = {base.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}

    def one(path, a):
        if path in have:
            return have[path]
        key = jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        return init_leaf(path, a.shape, a.dtype, key)
    return base.map_with_path(one, abstract)


def build(config, abstract_params) -> base.Sparsity:
    cfg = base.method_config(config)
    return selection(config, abstract_params, pattern(cfg.include))


base.register("select", build, default_config)

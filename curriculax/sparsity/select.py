"""Train a fixed subset of whole parameters chosen by path (e.g. embedding-only tuning).

``include`` is a regular expression over parameter paths (``embed``, ``lm_head``,
``layers/3/attn/q``, ``layers/0/mlp_norm/scale``...); matching parameters train with the usual
clip + AdamW, everything else is frozen and holds **no** optimizer state (the sparse-state
transform of :mod:`curriculax.sparsity.lift` with dense/frozen leaves). Default: embedding-only
tuning (``include=r"^embed$"``); e.g. ``r"norm"`` tunes only the RMSNorm scales,
``r"^(embed|lm_head)$"`` the vocabulary matrices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from curriculax.sparsity import base, lift


def default_config() -> dict:
    return dict(include=r"^embed$")


def build(config, abstract_params) -> base.Sparsity:
    cfg = base.method_config(config)
    plan = base.map_with_path(
        lambda path, p: lift.LeafPlan("dense" if base.matches(cfg.include, path) else "frozen"),
        abstract_params)
    kinds = [lp.kind for lp in jax.tree.leaves(plan, is_leaf=lift._is_plan)]
    if "dense" not in kinds:
        raise ValueError(f"sparsity.include={cfg.include!r} matches no parameter.")
    decay = jax.tree.map(lambda lp, p: lp.kind == "dense" and len(p.shape) >= 2, plan,
                         abstract_params, is_leaf=lift._is_plan)
    inner = base.base_optimizer(config.optimizer, config.steps, decay_mask=decay)
    optimizer = lift.sparse_state(inner, plan)

    def opt_state_shardings(abstract_opt, param_shardings, replicated):
        compact = jax.tree.map(lambda lp, s: s if lp.kind == "dense" else replicated, plan,
                               param_shardings, is_leaf=lift._is_plan)
        return lift.SparseState(optax.tree_map_params(
            inner, lambda _, s: s, abstract_opt.inner, compact,
            transform_non_params=lambda _: replicated))

    return base.Sparsity(
        optimizer=optimizer,
        init_masks=lambda params, rng: jax.tree.map(
            lambda lp: jnp.bool_(lp.kind == "dense"), plan, is_leaf=lift._is_plan),
        mask_shardings=lambda m, p, replicated: jax.tree.map(lambda _: replicated, m),
        opt_state_shardings=opt_state_shardings)


base.register("select", build, default_config)

"""LIFT — Low-rank Informed sparse Fine-Tuning (Liu et al., ICML 2025, arXiv 2506.00772).

Only the "Principal Weights" of each selected matrix train: for a weight ``W`` viewed as
``[m, n]`` (:func:`curriculax.sparsity.base.matrix_view`; attention ``q [d,H,D]`` is
``[d, H*D]``)::

    W_r   = U[:, :r] diag(S[:r]) V[:, :r]^T        (rank-r approximation, r = filter_rank)
    score = |W_r|
    k     = min((m + n) * lora_rank, m * n)       (LoRA-equivalent budget; or density * m * n)
    mask  = the k largest scores                  (ties: lower flat index first)

Only masked entries update; Adam moments are stored as ``[k]`` vectors next to ``int32 [k]``
flat indices (the mask, kept in ``TrainState.masks``), so optimizer memory is
``2 * k`` floats per matrix instead of ``2 * m * n``. Masks are recomputed from the current
weights inside the jitted step after optimizer step ``t`` when ``(t + 1) % refresh_every == 0``
(the official code's schedule: refreshes after steps 399, 799, ... for interval 400); moments
of entries that stay selected are carried over, new entries start at 0 (``reset_moments=True``
zeroes all); the bias-correction count is never reset.

Defaults (``default_config``), from the paper/code (see ``shared/methods/lift.md``):
``filter_rank=128``, ``lora_rank=128`` (budget), ``refresh_every=400``; selected matrices: every
attention/MLP projection (``include``), all other parameters (embeddings, ``lm_head``, norms)
frozen (``others="frozen"``; ``"dense"`` trains them with ordinary AdamW). The optimizer is
``config.optimizer``'s AdamW with the paper's ``weight_decay=0.0`` and ``eps=1e-6`` (``None``
takes ``config.optimizer``'s value). The paper picks the *largest* ``|W_r|`` (the official scripts'
``mask_type`` picks the smallest, a flagged discrepancy): ``select="largest"|"smallest"``.

The SVD is exact (``jnp.linalg.svd``, as the paper), the default. ``exact_svd_max=M`` opts
into a randomized range finder for matrices whose smaller side exceeds ``M`` (the official
code's optional ``svd_lowrank`` variant: ``r + oversample`` columns, ``oversample=None`` -> ``r``,
``power_iters`` subspace iterations; Halko et al. 2011) with a fixed key. It is only as good as
the spectrum decays: on a 192x160 matrix with ``s_i ~ 1/i`` its r=8 mask matches the exact one
on 99.9% of entries (88% without power iterations); on a Gaussian (flat) matrix on ~30%.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curriculax.sparsity import base


def default_config() -> dict:
    return dict(filter_rank=128, lora_rank=128, density=0.0, refresh_every=400,
                reset_moments=False, include=r"layers/\d+/(attn/[qkvo]|mlp/(gate|up|down))$",
                others="frozen", weight_decay=0.0, eps=1e-6, select="largest", exact_svd_max=None,
                oversample=None, power_iters=2)


# The mask -------------------------------------------------------------------------------------

def budget(m: int, n: int, *, lora_rank: int | None = None, density: float | None = None) -> int:
    """Entries to select in an ``[m, n]`` matrix: ``density * m * n`` (rounded) when given,
    else the LoRA-equivalent ``min((m + n) * lora_rank, m * n)``."""
    if density:
        return max(1, min(m * n, int(round(density * m * n))))
    if lora_rank is None:
        raise ValueError("lift.budget needs lora_rank or density.")
    return min((m + n) * lora_rank, m * n)


def low_rank(w, rank: int, *, exact_svd_max: int | None = None, oversample: int | None = None,
             power_iters: int = 2, key=None):
    """Rank-``rank`` approximation of a 2-D ``w`` in float32: exact SVD, or randomized when the
    smaller side exceeds ``exact_svd_max`` (``oversample`` None: ``rank`` extra columns)."""
    w = jnp.asarray(w, jnp.float32)
    m, n = w.shape
    rank = min(rank, m, n)
    oversample = rank if oversample is None else oversample
    if exact_svd_max is None or min(m, n) <= exact_svd_max or rank + oversample >= min(m, n):
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vt[:rank]
    key = jax.random.PRNGKey(0) if key is None else key
    omega = jax.random.normal(key, (n, rank + oversample), jnp.float32)
    q, _ = jnp.linalg.qr(w @ omega)
    for _ in range(power_iters):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u_b, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return ((q @ u_b[:, :rank]) * s[:rank]) @ vt[:rank]


def indices(w, rank: int, k: int, *, select: str = "largest", **svd_kw) -> jax.Array:
    """Sorted flat (C-order) ``int32 [k]`` indices of the ``k`` largest ``|W_rank|`` entries of
    the 2-D ``w`` (ties: lower index first). Jit-able; ``k`` must be static."""
    score = jnp.abs(low_rank(w, rank, **svd_kw)).reshape(-1)
    if select == "smallest":
        score = -score
    elif select != "largest":
        raise ValueError(f"lift select={select!r}; expected 'largest' or 'smallest'.")
    return top_k(score, k)


def top_k(score, k: int) -> jax.Array:
    """Sorted ``int32 [k]`` flat indices of the ``k`` largest entries of ``score``; equal
    scores are taken in index order (``lax.top_k`` is stable)."""
    _, idx = jax.lax.top_k(score.reshape(-1), k)
    return jnp.sort(idx).astype(jnp.int32)


def mask(w, rank: int, density: float | None = None, *, lora_rank: int | None = None,
         select: str = "largest", **svd_kw) -> jax.Array:
    """Boolean mask (shape of the 2-D ``w``) of LIFT's principal weights: top-k of ``|W_rank|``
    with ``k`` from ``density`` or the LoRA budget ``(m + n) * lora_rank``."""
    w = jnp.asarray(w)
    m, n = w.shape
    k = budget(m, n, lora_rank=lora_rank, density=density)
    idx = indices(w, rank, k, select=select, **svd_kw)
    return jnp.zeros(m * n, bool).at[idx].set(True).reshape(m, n)


# The plan: what happens to each parameter --------------------------------------------------------

class LeafPlan(NamedTuple):
    kind: str  # "sparse" | "dense" | "frozen"
    k: int = 0
    view: tuple[int, int] = (0, 0)


def plan(abstract_params, cfg) -> dict:
    """Static per-leaf decisions (a params-shaped tree of :class:`LeafPlan`)."""
    if cfg.others not in ("frozen", "dense"):
        raise ValueError(f"sparsity.others={cfg.others!r}; expected 'frozen' or 'dense'.")

    def one(path, p):
        if base.matches(cfg.include, path) and p.ndim >= 2:
            m, n = base.matrix_view(path, p.shape)
            return LeafPlan("sparse", budget(m, n, lora_rank=cfg.lora_rank,
                                             density=cfg.density or None), (m, n))
        return LeafPlan(cfg.others)

    return base.map_with_path(one, abstract_params)


def _is_plan(x):
    return isinstance(x, LeafPlan)


def _pmap(fn, plan_tree, *trees):
    return jax.tree.map(fn, plan_tree, *trees, is_leaf=_is_plan)


def compute_masks(params, plan_tree, cfg):
    """Index sets for sparse leaves; scalar booleans (trained / frozen) for the others."""
    def one(lp: LeafPlan, p):
        if lp.kind == "sparse":
            return indices(p.reshape(lp.view), cfg.filter_rank, lp.k, select=cfg.select,
                           exact_svd_max=cfg.exact_svd_max, oversample=cfg.oversample,
                           power_iters=cfg.power_iters)
        return jnp.bool_(lp.kind == "dense")
    return _pmap(one, plan_tree, params)


# The sparse-state optimizer --------------------------------------------------------------------

class SparseState(NamedTuple):
    inner: optax.OptState  # the inner optimizer's state over the compact tree


def compact(tree, masks, plan_tree):
    """Selected entries only: ``[k]`` for sparse leaves, whole dense leaves, and a constant
    ``[1]`` zero for frozen ones (its gradient is 0, so its moments stay 0; never applied)."""
    def one(lp: LeafPlan, x, m):
        if lp.kind == "sparse":
            return x.reshape(-1)[m]
        if lp.kind == "dense":
            return x
        return jnp.zeros((1,), x.dtype)  # a 1-entry stand-in: Orbax cannot save empty arrays
    return _pmap(one, plan_tree, tree, masks)


def scatter(compact_updates, masks, params, plan_tree):
    """Dense updates: selected entries from ``compact_updates``, exactly ``-0.0`` elsewhere
    (which leaves every frozen bit pattern, ``-0.0`` included, as it was)."""
    def one(lp: LeafPlan, u, m, p):
        if lp.kind == "sparse":
            return jnp.full(p.size, -0.0, p.dtype).at[m].set(u.astype(p.dtype)).reshape(p.shape)
        if lp.kind == "dense":
            return u.astype(p.dtype)
        return jnp.full_like(p, -0.0)
    return _pmap(one, plan_tree, compact_updates, masks, params)


def _compact_abstract(params, plan_tree):
    def one(lp: LeafPlan, p):
        if lp.kind == "sparse":
            return jnp.zeros((lp.k,), p.dtype)
        if lp.kind == "dense":
            return jnp.zeros(p.shape, p.dtype)
        return jnp.zeros((1,), p.dtype)
    return _pmap(one, plan_tree, params)


def sparse_state(inner: optax.GradientTransformation, plan_tree
                 ) -> optax.GradientTransformationExtraArgs:
    """``inner`` (e.g. clip + AdamW) run on the selected entries only.

    ``update(grads, state, params, masks=index_sets)`` gathers the selected gradient entries
    into ``[k]`` vectors, runs ``inner`` on that compact tree (so its moments are ``[k]``) and
    scatters the result back with exact zeros elsewhere. Equals ``inner`` run densely on
    gradients zeroed outside the mask, on the selected entries."""

    def init(params):
        return SparseState(inner.init(_compact_abstract(params, plan_tree)))

    def update(updates, state, params=None, *, masks=None, **extra):
        del extra
        g = compact(updates, masks, plan_tree)
        p = compact(params, masks, plan_tree)
        u, inner_state = inner.update(g, state.inner, p)
        return scatter(u, masks, params, plan_tree), SparseState(inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def remap_moments(inner, inner_state, old_masks, new_masks, plan_tree, *, reset: bool = False):
    """Moments re-indexed from ``old_masks`` to ``new_masks``: kept where an index stays,
    0 where it is new (all 0 with ``reset``). Non-moment state (counts) is untouched."""

    def move(x, lp: LeafPlan, old, new):
        if lp.kind != "sparse":
            return x
        if reset:
            return jnp.zeros_like(x)
        pos = jnp.clip(jnp.searchsorted(old, new), 0, old.shape[0] - 1)
        hit = old[pos] == new
        return jnp.where(hit, x[pos], jnp.zeros_like(x))

    def per_leaf(x, lp, old, new):
        return move(x, lp, old, new)

    return optax.tree_map_params(
        inner, lambda x, lp, old, new: per_leaf(x, lp, old, new), inner_state, plan_tree,
        old_masks, new_masks, is_leaf=_is_plan)


def state_bytes(opt_state) -> int:
    """Bytes of every array in an optimizer state."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(opt_state) if hasattr(x, "shape")))


# Registration ---------------------------------------------------------------------------------

def build(config, abstract_params) -> base.Sparsity:
    cfg = base.method_config(config)
    tree = plan(abstract_params, cfg)
    if not any(lp.kind == "sparse" for lp in jax.tree.leaves(tree, is_leaf=_is_plan)):
        raise ValueError(f"sparsity.include={cfg.include!r} matches no weight matrix.")
    decay = _pmap(lambda lp: lp.kind == "sparse", tree)  # compact leaves are 1-D: mask by plan
    if cfg.others == "dense":
        from curriculax.train import optim

        decay = _pmap(lambda lp, d: lp.kind == "sparse" or (lp.kind == "dense" and d),
                      tree, optim.decay_mask(abstract_params))
    inner = base.base_optimizer(config.optimizer, config.steps, weight_decay=cfg.weight_decay,
                                eps=cfg.eps, decay_mask=decay)
    optimizer = sparse_state(inner, tree)

    def init_masks(params, rng):
        del rng
        return compute_masks(params, tree, cfg)

    def refresh(masks, params, opt_state, step):
        def redo(args):
            masks, opt_state = args
            new = compute_masks(params, tree, cfg)
            moved = remap_moments(inner, opt_state.inner, masks, new, tree,
                                  reset=cfg.reset_moments)
            return new, SparseState(moved)

        due = base.refresh_due(step, cfg.refresh_every, offset=1)
        masks, opt_state = jax.lax.cond(due, redo, lambda a: a, (masks, opt_state))
        return masks, params, opt_state

    def opt_state_shardings(abstract_opt, param_shardings, replicated):
        compact_sh = _pmap(lambda lp, s: s if lp.kind == "dense" else replicated, tree,
                           param_shardings)
        return SparseState(optax.tree_map_params(
            inner, lambda _, s: s, abstract_opt.inner, compact_sh,
            transform_non_params=lambda _: replicated))

    def mask_shardings(abstract_masks, param_shardings, replicated):
        return jax.tree.map(lambda _: replicated, abstract_masks)

    return base.Sparsity(optimizer=optimizer, init_masks=init_masks,
                         refresh=refresh if cfg.refresh_every > 0 else None,
                         mask_shardings=mask_shardings, opt_state_shardings=opt_state_shardings)


base.register("lift", build, default_config)


def fraction(abstract_params, config) -> float:
    """Fraction of all parameters LIFT trains under ``config`` (sparse budgets + dense leaves)."""
    tree = plan(abstract_params, base.method_config(config))
    total = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract_params))
    chosen = sum(lp.k if lp.kind == "sparse" else (math.prod(p.shape) if lp.kind == "dense" else 0)
                 for lp, p in zip(jax.tree.leaves(tree, is_leaf=_is_plan),
                                  jax.tree.leaves(abstract_params)))
    return chosen / total

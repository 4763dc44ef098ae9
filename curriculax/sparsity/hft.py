"""HFT — Half Fine-Tuning (Hui et al., 2024, arXiv 2404.18466).

In each round half of the parameters, chosen at the *category level* (whole matrices), train and
the other half stay frozen at their current values: ``θ ← θ − η · (M ⊙ update)``, ``M`` one
boolean per matrix. The official code is not public; the per-category rule below is the
recommended reading of the paper's figure (``shared/methods/hft.md``), per transformer block:

- attention ``{q, k, v, o}``: 2 of 4 uniformly at random (a projection's bias and q/k norm
  follow it);
- MLP ``{gate, up, down}``: 1 or 2 of 3, alternating between consecutive blocks (the parity
  drawn per round), so that half of the MLP matrices train over every two blocks;
- norms ``{attn_norm, mlp_norm}``: 1 of 2;
- outside the blocks: one of ``{embed, lm_head}`` (``embed`` alone, with probability 1/2, when
  tied) and ``final_norm`` with probability 1/2.

Rounds: ``round_steps=0`` (default) keeps one selection for the whole run (the paper's "per
stage"); ``round_steps=K`` re-draws it after every K steps, inside the jitted step, from
``fold_in(key, round)``. ``key``: ``PRNGKey(seed)``, ``seed=None`` (default) taking
``config.seed``; a stage that starts from an earlier run (``config.model.init_from``) folds in a
hash of that path, so each stage of a chain (SFT, then DPO, ...) draws its own half, as the
paper resamples per stage. Frozen matrices' optimizer state is not updated (no moment decay);
it resumes where it stopped when they train again. Memory is that of dense AdamW (the masks
are per-matrix scalars; a frozen matrix still holds its moments).
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp

from curriculax.sparsity import base


def default_config() -> dict:
    return dict(round_steps=0, seed=None)


_ATTN = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")
_NORMS = ("attn_norm", "mlp_norm")


def _category(path: str):
    """``(layer, group, member)`` for a block parameter, ``(None, name, None)`` otherwise."""
    m = re.match(r"layers/(\d+)/(.*)$", path)
    if m is None:
        return None, path.split("/")[0], None
    layer, rest = int(m.group(1)), m.group(2)
    parts = rest.split("/")
    if parts[0] == "attn":
        name = parts[1]
        member = {"q_bias": "q", "k_bias": "k", "v_bias": "v", "q_norm": "q",
                  "k_norm": "k"}.get(name, name)
        return layer, "attn", member
    if parts[0] == "mlp":
        return layer, "mlp", parts[1]
    if parts[0] in _NORMS:
        return layer, "norm", parts[0]
    return layer, "other", rest


def select(abstract_params, key) -> dict:
    """Per-parameter scalar booleans (``True`` = trains this round). Jit-able."""
    k_attn, k_mlp, k_norm, k_par, k_top, k_final = jax.random.split(key, 6)
    parity = jax.random.bernoulli(k_par).astype(jnp.int32)
    top = jax.random.bernoulli(k_top)

    def one(path, _):
        layer, group, member = _category(path)
        if layer is None:
            if group == "embed":
                return top
            if group == "lm_head":
                return ~top
            if group == "final_norm":
                return jax.random.bernoulli(k_final)
            return jnp.bool_(True)
        lk = lambda k: jax.random.fold_in(k, layer)  # noqa: E731
        if group == "attn":
            rank = jnp.argsort(jax.random.permutation(lk(k_attn), 4))  # position of each member
            return rank[_ATTN.index(member)] < 2
        if group == "mlp":
            count = 1 + (layer + parity) % 2
            rank = jnp.argsort(jax.random.permutation(lk(k_mlp), 3))
            return rank[_MLP.index(member)] < count
        if group == "norm":
            first = jax.random.bernoulli(lk(k_norm))
            return first if member == _NORMS[0] else ~first
        return jnp.bool_(True)

    return base.map_with_path(one, abstract_params)


def round_index(step, round_steps: int):
    return jnp.zeros((), jnp.int32) if round_steps <= 0 else step // round_steps


def stage_key(config) -> jax.Array:
    """The selection key of this run (see the module docstring)."""
    seed = base.method_config(config).seed
    key = jax.random.PRNGKey(config.seed if seed is None else seed)
    init_from = config.model.get("init_from", "")
    return jax.random.fold_in(key, zlib.crc32(init_from.encode()) & 0x7FFFFFFF) if init_from else key


def build(config, abstract_params) -> base.Sparsity:
    cfg = base.method_config(config)
    inner = base.base_optimizer(config.optimizer, config.steps)
    key = stage_key(config)

    def masks_at(round_):
        return select(abstract_params, jax.random.fold_in(key, round_))

    def refresh(masks, params, opt_state, step):
        due = base.refresh_due(step, cfg.round_steps)
        masks = jax.lax.cond(due, lambda: masks_at(round_index(step, cfg.round_steps)),
                             lambda: masks)
        return masks, params, opt_state

    return base.Sparsity(
        optimizer=base.masked_dense(inner),
        init_masks=lambda params, rng: masks_at(jnp.zeros((), jnp.int32)),
        refresh=refresh if cfg.round_steps > 0 else None,
        mask_shardings=base.like_params_shardings)


base.register("hft", build, default_config)

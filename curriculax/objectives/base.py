"""Objectives: per-token losses from LM-head statistics, and shared normalization.

An objective is ``token_loss(stats, batch, config) -> [B,T]``: the loss of each token before
masking and normalization. ``stats`` are the fused LM-head kernel's per-token statistics
(:class:`curriculax.kernels.LMHeadStats`, reshaped to ``[B,T]``), so every objective gets the
memory-light loss path without materializing ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from curriculax.kernels import fused_lm_head, resolve_impl
from curriculax.sharding import DEFAULT_RULES
from curriculax.registry import Registry

NORMALIZATIONS = ("token", "sequence", "batch", "constant")


class Objective(NamedTuple):
    token_loss: Callable[[Any, Any, Any], jax.Array]
    # Extra statistics the step must provide: "ref" (frozen reference -> stats.kl_to_ref),
    # "sample" (in-kernel sampling -> stats.sampled_token / sampled_logprob), "ref_logprob"
    # (frozen reference -> stats.ref_target_logprob). Either of the two "ref" needs keeps the
    # reference model; only "ref" makes the kernel compute the KL.
    needs: tuple[str, ...] = ()
    # Optional ``kernel_options(config.objective) -> dict`` of static LM-head kernel keywords
    # (e.g. ``kl_direction`` for ASFT, the sampling ``temperature`` for OTR).
    kernel_options: Callable[[Any], dict] | None = None


_REGISTRY: Registry[Objective] = Registry("objective", "objective.name")
register = _REGISTRY.register
get = _REGISTRY.get  # the objective registered under a name (config field objective.name)
names = _REGISTRY.names


SHARD_MAP = ("auto", "always", "never")


def lm_head_stats(hidden_BxTxd, weight_dxV, targets_BxT, mask_BxT, *, mesh=None, rules=(),
                  shard_map: str = "auto", **kernel_kwargs):
    """Runs the fused LM-head kernel on ``[B,T]`` tokens and returns ``[B,T]`` statistics.

    With a multi-device ``mesh``, ``shard_map="auto"`` runs Pallas kernels under ``shard_map``
    (:func:`curriculax.kernels.sharded.sharded_lm_head`: rows over the mesh axes of the logical
    ``batch`` axis, vocab over those of ``vocab``), since XLA cannot partition a custom call;
    ``"always"`` does so for every impl, ``"never"`` leaves partitioning to XLA.
    The kernel's matmuls run in the hidden states' dtype (the model's compute dtype).
    """
    if shard_map not in SHARD_MAP:
        raise ValueError(f"objective.shard_map={shard_map!r}: choose one of {SHARD_MAP}.")
    b, t, d = hidden_BxTxd.shape
    if kernel_kwargs.get("ref_hidden") is not None:  # the reference's hidden states, [B,T,d_ref]
        kernel_kwargs["ref_hidden"] = kernel_kwargs["ref_hidden"].reshape(b * t, -1)
    if kernel_kwargs.get("sample_rows") is not None:  # [B,T] noise counters
        kernel_kwargs["sample_rows"] = kernel_kwargs["sample_rows"].reshape(b * t)
    args = (hidden_BxTxd.reshape(b * t, d), weight_dxV, targets_BxT.reshape(b * t))
    impl = resolve_impl(kernel_kwargs.get("impl", "auto"))
    if mesh is not None and mesh.size > 1 and (
            shard_map == "always" or (shard_map == "auto" and impl.startswith("pallas"))):
        from curriculax.kernels.sharded import sharded_lm_head
        from curriculax.sharding import logical_to_mesh

        rows, vocab = logical_to_mesh(("batch", "vocab"), rules or DEFAULT_RULES)
        as_tuple = lambda a: (a,) if isinstance(a, str) else tuple(a or ())  # noqa: E731
        vocab_axes = as_tuple(vocab)
        stats = sharded_lm_head(*args, mesh=mesh, row_axes=as_tuple(rows),
                                vocab_axis=vocab_axes[0] if vocab_axes else "",
                                where=mask_BxT.reshape(b * t), **kernel_kwargs)
    else:
        stats = fused_lm_head(*args, where=mask_BxT.reshape(b * t), **kernel_kwargs)
    return jax.tree.map(lambda x: x.reshape(b, t), stats)


def normalizer(mask_BxT, mode: str) -> jax.Array:
    """The denominator of the batch loss; computed on the *whole* batch so that gradient
    accumulation over micro-batches gives exactly the full-batch gradient."""
    mask = mask_BxT.astype(jnp.float32)
    if mode == "token":
        return jnp.maximum(mask.sum(), 1.0)
    if mode in ("sequence", "batch"):
        return jnp.asarray(mask.shape[0], jnp.float32)
    if mode == "constant":
        return jnp.asarray(mask.size, jnp.float32)
    raise ValueError(f"objective.normalization={mode!r}: choose one of {NORMALIZATIONS}.")


def reduce_loss(token_loss_BxT, mask_BxT, weights_B, denominator, mode: str) -> jax.Array:
    """Sums the masked, example-weighted token losses and divides by ``denominator``.

    ``sequence`` first averages each row over its own tokens (every example counts equally);
    the other modes sum tokens (``token``: mean over the batch's tokens, ``batch``: sum per
    example, ``constant``: divide by ``B*T`` as in Dr. GRPO).
    """
    mask = mask_BxT.astype(jnp.float32)
    per_row = jnp.sum(token_loss_BxT * mask, axis=-1)
    if mode == "sequence":
        per_row = per_row / jnp.maximum(mask.sum(-1), 1.0)
    return jnp.sum(per_row * weights_B) / denominator

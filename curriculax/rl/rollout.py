"""Jitted rollouts: G sampled completions per prompt with the KV cache, and the sequences to score.

Everything here is a pure function of arrays (plus a merged model), so the RL step traces it
inside its single ``jax.jit``: prompts come from bank rows chosen on the devices, completions
are sampled with :func:`curriculax.models.generate.decode_model`, and the scored sequences are
laid out for the fused LM-head loss without leaving the devices.

Layout: ``P`` prompts, group size ``G``, ``B = P*G`` responses; response ``b`` belongs to prompt
``b // G`` (groups are consecutive rows, so ``x.reshape(P, G)`` recovers them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from curriculax.models.generate import Generation, decode_model


@struct.dataclass
class Sequences:
    """Prompt + completion laid out for scoring: ``[B, W+N-1]`` (``W`` prompt width)."""

    tokens: jax.Array  # inputs
    targets: jax.Array  # next tokens
    loss_mask: jax.Array  # True on sampled completion tokens (EOS included)
    segment_ids: jax.Array  # 0 on left padding so real tokens never attend to it
    positions: jax.Array  # counts real tokens only, as during decoding


def left_pad_prompts(tokens_BxT, prompt_len_B, width: int, pad_id: int):
    """Right-aligns each row's first ``prompt_len`` tokens into ``[B, width]`` (and its mask)."""
    col = jnp.arange(width)[None, :]
    shift = width - prompt_len_B[:, None]  # leading pad columns of each row
    src = jnp.clip(col - shift, 0, tokens_BxT.shape[1] - 1)
    mask = col >= shift
    prompt = jnp.where(mask, jnp.take_along_axis(tokens_BxT, src, axis=1), pad_id)
    return prompt.astype(jnp.int32), mask


def rollout(model, prompt_PxW, mask_PxW, rng, *, group_size: int, max_new_tokens: int,
            temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
            pad_id: int = 0) -> Generation:
    """``group_size`` completions of every prompt: tokens, sampling log-probs and masks ``[P*G, N]``.

    Identical to ``generate``/``decode`` on the prompts repeated ``group_size`` times with the
    same ``rng`` (the test checks it), so a rollout is reproducible from the step's key.
    """
    prompts = jnp.repeat(prompt_PxW, group_size, axis=0)
    masks = jnp.repeat(mask_PxW, group_size, axis=0)
    return decode_model(model, prompts, masks, rng, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id)


def sequences(prompt_BxW, mask_BxW, gen: Generation) -> Sequences:
    """Teacher-forcing layout of ``prompt ++ completion`` with the loss on completion tokens."""
    seq = jnp.concatenate([prompt_BxW, gen.tokens], axis=1)
    real = jnp.concatenate([mask_BxW, jnp.ones_like(gen.mask)], axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    w = prompt_BxW.shape[1]
    # targets[:, j] = seq[:, j+1]; completion token i sits at target column w - 1 + i.
    loss_mask = jnp.concatenate(
        [jnp.zeros((seq.shape[0], w - 1), bool), gen.mask], axis=1)
    return Sequences(tokens=seq[:, :-1], targets=seq[:, 1:], loss_mask=loss_mask,
                     segment_ids=real[:, :-1], positions=positions[:, :-1])

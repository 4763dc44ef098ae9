"""Jitted batched decoding with a KV cache (greedy, temperature and nucleus sampling).

Prompts of different lengths are *left*-padded into one ``[B,P]`` array; padding gets
segment id 0 so real tokens never attend to it, and positions count real tokens only, which
makes a padded prompt decode exactly like the same prompt alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from curriculax import sharding
from curriculax.models.transformer import KVCache, head_logits


@struct.dataclass
class Generation:
    tokens: jax.Array  # [B,N] int32, pad_id after EOS
    logprobs: jax.Array  # [B,N] float32 log-prob of each token under the sampling policy
    mask: jax.Array  # [B,N] bool, True up to and including EOS


def top_p_filter(logits_BxV, top_p: float):
    """Keeps the smallest set of tokens whose probability mass reaches ``top_p``, plus every
    token tied with the last one kept (HF's warper breaks such ties by sort position instead;
    keeping them all does not depend on the token ids' order)."""
    sorted_desc = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, keep[:, None] - 1, axis=-1)
    return jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)


def pick_token(logits_BxV, rng, temperature: float, top_p: float):
    """Returns ``(token, logprob)``: argmax when ``temperature == 0``, else a sample."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0.0:
        token = jnp.argmax(logits_BxV, axis=-1)
        logp = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled = logits_BxV / temperature
        if top_p < 1.0:
            scaled = top_p_filter(scaled, top_p)
        token = jax.random.categorical(rng, scaled, axis=-1)
        logp = jax.nn.log_softmax(scaled, axis=-1)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _eos_tuple(eos_id) -> tuple[int, ...]:
    """``eos_id``: None, one id, or several (Llama-3's generation configs list more than one)."""
    if eos_id is None:
        return ()
    return (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(e) for e in eos_id)


def decode_model(model, prompt_BxP, mask_BxP, rng, *, max_new_tokens: int, temperature: float,
                 top_p: float, eos_id: int | tuple[int, ...] | None, pad_id: int) -> Generation:
    """Decoding as a pure function of a model: traceable inside any jitted step (RL rollouts)."""
    cfg = model.config
    eos_ids = _eos_tuple(eos_id)
    b, p = prompt_BxP.shape
    seg = mask_BxP.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    cache = KVCache.init(cfg, b, p + max_new_tokens)
    hidden, cache = model(prompt_BxP, positions=positions, segment_ids=seg, cache=cache)
    w, layout = model.head_weight()  # as stored: no transposed copy of a tied embedding
    w = w.astype(hidden.dtype)  # once per decode, not per token

    def step(carry, key):
        cache, h_Bxd, pos_B, done_B = carry
        logits = head_logits(h_Bxd, w, layout)
        token, logp = pick_token(logits, key, temperature, top_p)
        token = jnp.where(done_B, pad_id, token)
        emitted = ~done_B
        if eos_ids:
            done_B = done_B | jnp.isin(token, jnp.asarray(eos_ids, jnp.int32))
        h, cache = model(token[:, None], positions=pos_B[:, None],
                         segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache)
        return (cache, h[:, 0], pos_B + 1, done_B), (token, jnp.where(emitted, logp, 0.0), emitted)

    last = p - 1 - jnp.argmax(seg[:, ::-1], axis=1)  # the last real token (any padding side)
    init = (cache, hidden[jnp.arange(b), last], positions[:, -1] + 1, jnp.zeros((b,), bool))
    keys = jax.random.split(rng, max_new_tokens)
    _, (tokens, logps, emitted) = jax.lax.scan(step, init, keys)
    return Generation(tokens.T, logps.T, emitted.T)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "eos_id", "pad_id",
                     "mesh", "rules"),
)
def _decode(graphdef, state, prompt_BxP, mask_BxP, rng, *, mesh, rules, **kwargs) -> Generation:
    with sharding.activation_sharding(mesh, rules):
        out = decode_model(nnx.merge(graphdef, state), prompt_BxP, mask_BxP, rng, **kwargs)
    if mesh is None:
        return out
    # replicated: every process reads all the tokens (a multi-process run's rows span hosts)
    return jax.lax.with_sharding_constraint(out, sharding.replicated(mesh))


def decode(model, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, rng=None, eos_id: int | tuple[int, ...] | None = None, pad_id: int = 0,
           prompt_mask=None, mesh=None, rules=sharding.DEFAULT_RULES) -> Generation:
    """Full decoding output (tokens, per-token log-probs, validity mask); see :func:`generate`."""
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt_mask is None:
        prompt_mask = prompt_tokens != pad_id
    if temperature > 0.0 and rng is None:
        raise ValueError("generate(temperature > 0) needs an explicit rng=jax.random.key(...).")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, prompt_tokens, jnp.asarray(prompt_mask), rng,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_p=float(top_p), eos_id=_eos_tuple(eos_id) or None, pad_id=int(pad_id),
                   mesh=mesh, rules=tuple(rules))


def generate(model, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, rng=None, eos_id: int | tuple[int, ...] | None = None, pad_id: int = 0,
             prompt_mask=None, mesh=None, rules=sharding.DEFAULT_RULES) -> jax.Array:
    """Generates ``[B, max_new_tokens]`` tokens after left-padded prompts ``[B,P]`` (right
    padding decodes the same: each row continues from its last real token).

    ``prompt_mask`` (True = real token) defaults to ``prompt_tokens != pad_id``. After a row
    emits ``eos_id`` (one id or a tuple of them) it is filled with ``pad_id``.

    With the ``mesh`` (and ``rules``) the model's weights are sharded on, activations follow the
    batch axis as in the train step: under FSDP each device decodes its share of the rows.
    """
    return decode(model, prompt_tokens, max_new_tokens, temperature=temperature, top_p=top_p,
                  rng=rng, eos_id=eos_id, pad_id=pad_id, prompt_mask=prompt_mask, mesh=mesh,
                  rules=rules).tokens

"""Token-weighted SFT: cross-entropy with detached per-token weights from a weight function.

``l_t = -w_t * log p_t`` with ``w_t = sg(weight_fn(t))``; with ``renormalize=True`` (default) the
weights of each sequence are rescaled to mean 1 over its loss tokens, so only the *relative*
emphasis changes (the loss scale, and so the learning rate, stays comparable to SFT).

Weight functions (``weight_fn``):

* ``"key_tokens"`` -- TL-Training "Prioritizing Key Tokens" (Ye et al., 2024, arXiv 2412.15495;
  code ``Junjie-Ye/TL-Training`` ``GCELoss``). Per sequence with ``|K|`` key, ``|P|`` parameter
  and ``|O|`` other loss tokens: ``w_K = min(|O| / |K|, max_weight)`` if ``|K| < |O|`` else 1,
  ``w_P = w_O = 1``; with ``renormalize`` and ``normalization="sequence"`` the row loss is exactly
  ``(w sum_K l + sum_P l + sum_O l) / (w |K| + |P| + |O|)`` (token_weighting.md, example A:
  56/53). Parameter tokens: targets whose id is in ``param_token_ids`` (default none).
  Key tokens here (``key_tokens``): ``"answer"`` = the first response token plus the final
  answer line (``#### N`` and EOS) -- the decision tokens of a math response, as TL-Training's are
  the first token and the tool name; ``"ids"`` = targets whose id is in ``key_token_ids``.
  Default ``max_weight=9``.
* ``"loss"`` -- ``w = sg(-log p_t) ** alpha``: emphasize tokens the model gets wrong.
* ``"focal"`` -- focal loss (Lin et al., 2017): ``w = (1 - sg(p_t)) ** focal_gamma`` (default 2).
* ``"entropy"`` -- ``w = sg(H_t) ** alpha``: emphasize high-entropy ("forking") positions.
* ``"ref_confidence"`` -- ``w = pi_ref(y_t) ** alpha``: trust tokens the frozen reference finds
  plausible, down-weight tokens it finds surprising (noisy labels). Registered separately as
  ``token_weighted_ref`` because it needs the reference model (``needs=("ref_logprob",)``).

``weight_max > 0`` clips raw weights before renormalizing. Defaults (``default_config``):
``weight_fn="key_tokens"``, ``alpha=1``, ``focal_gamma=2``, ``max_weight=9``,
``key_tokens="answer"``, ``renormalize=True``, token-mean normalization.

Usage::

    c.objective = token_weighted.default_config()                  # TL-Training PKT
    c.objective = token_weighted.default_config("entropy")         # entropy weights
    c.objective = token_weighted.default_config("ref_confidence")  # name token_weighted_ref
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.objectives.base import Objective, register

WEIGHT_FNS = ("key_tokens", "loss", "focal", "entropy", "ref_confidence")
KEY_TOKENS = ("answer", "ids")


def default_config(weight_fn: str = "key_tokens") -> ml_collections.ConfigDict:
    if weight_fn not in WEIGHT_FNS:
        raise ValueError(f"weight_fn={weight_fn!r}: choose one of {WEIGHT_FNS}.")
    name = "token_weighted_ref" if weight_fn == "ref_confidence" else "token_weighted"
    return ml_collections.ConfigDict(dict(
        name=name, normalization="token", impl="auto", weight_fn=weight_fn, alpha=1.0,
        focal_gamma=2.0, max_weight=9.0, key_tokens="answer", key_token_ids=(), param_token_ids=(),
        weight_max=0.0, renormalize=True))


def key_token_mask(batch, key_tokens: str = "answer", key_token_ids=()) -> jax.Array:
    """``[B,T]`` bool: which *targets* are key tokens (see module docstring)."""
    if key_tokens == "ids":
        ids = jnp.asarray(tuple(key_token_ids), jnp.int32).reshape(-1)
        return jnp.isin(batch.targets, ids) & batch.loss_mask.astype(bool)
    if key_tokens != "answer":
        raise ValueError(f"objective.key_tokens={key_tokens!r}: choose one of {KEY_TOKENS}.")
    mask = batch.loss_mask.astype(bool)
    # targets[i] is tokens[i+1]; it lies in the reasoning span iff reasoning_mask[i+1].
    reasoning_target = jnp.pad(batch.reasoning_mask[:, 1:], ((0, 0), (0, 1)))
    first = jnp.arange(mask.shape[1])[None] == jnp.argmax(mask, axis=1)[:, None]
    return mask & (~reasoning_target | first)


def pkt_weights(key_BxT, mask_BxT, max_weight: float = 9.0, param_BxT=None) -> jax.Array:
    """TL-Training PKT: key tokens get ``min(|O|/|K|, max_weight)`` if ``|K| < |O|``, else 1;
    parameter tokens (``param_BxT``, not key) keep 1 and do not count in ``|O|``."""
    m = mask_BxT.astype(jnp.float32)
    key = key_BxT.astype(jnp.float32) * m
    param = 0.0 if param_BxT is None else param_BxT.astype(jnp.float32) * (m - key)
    n_key = key.sum(-1, keepdims=True)
    n_other = (m - key - param).sum(-1, keepdims=True)
    w = jnp.where(n_key < n_other, jnp.minimum(n_other / jnp.maximum(n_key, 1.0), max_weight), 1.0)
    return jnp.where(key > 0, w, 1.0)


def renormalize_rows(weights_BxT, mask_BxT) -> jax.Array:
    """Rescale each row so that its weights average 1 over its loss tokens."""
    m = mask_BxT.astype(jnp.float32)
    total = jnp.sum(weights_BxT * m, -1, keepdims=True)
    count = m.sum(-1, keepdims=True)
    return jnp.where(total > 0, weights_BxT * count / jnp.where(total > 0, total, 1.0), 1.0)


def token_weights(stats, batch, config) -> jax.Array:
    """The detached ``[B,T]`` weights of ``config.weight_fn``."""
    fn = config.get("weight_fn", "key_tokens")
    alpha = float(config.get("alpha", 1.0))
    lp = jax.lax.stop_gradient(stats.target_logprob)
    if fn == "key_tokens":
        key = key_token_mask(batch, config.get("key_tokens", "answer"),
                             config.get("key_token_ids", ()))
        param_ids = tuple(config.get("param_token_ids", ()))
        param = None
        if param_ids:
            param = (jnp.isin(batch.targets, jnp.asarray(param_ids, jnp.int32))
                     & batch.loss_mask.astype(bool))
        w = pkt_weights(key, batch.loss_mask, float(config.get("max_weight", 9.0)), param)
    elif fn == "loss":
        w = jnp.maximum(-lp, 0.0) ** alpha
    elif fn == "focal":
        w = (1.0 - jnp.exp(lp)) ** float(config.get("focal_gamma", 2.0))
    elif fn == "entropy":
        w = jnp.maximum(jax.lax.stop_gradient(stats.entropy), 0.0) ** alpha
    elif fn == "ref_confidence":
        ref_lp = getattr(stats, "ref_target_logprob", None)
        if ref_lp is None:
            raise ValueError("weight_fn='ref_confidence' needs stats.ref_target_logprob: use the "
                             "objective name 'token_weighted_ref' (needs the reference model).")
        w = jnp.exp(alpha * jax.lax.stop_gradient(ref_lp))
    else:
        raise ValueError(f"objective.weight_fn={fn!r}: choose one of {WEIGHT_FNS}.")
    w_max = float(config.get("weight_max", 0.0))
    if w_max > 0:
        w = jnp.minimum(w, w_max)
    if config.get("renormalize", True):
        w = renormalize_rows(w, batch.loss_mask)
    return jax.lax.stop_gradient(w)


def token_loss(stats, batch, config):
    return -token_weights(stats, batch, config) * stats.target_logprob


token_weighted = register("token_weighted", Objective(token_loss))
token_weighted_ref = register("token_weighted_ref",
                              Objective(token_loss, needs=("ref_logprob",)))

"""Scheduled sampling with embedding mixup, two passes in one jitted step.

Papers: Bengio et al., "Scheduled Sampling for Sequence Prediction with RNNs", NeurIPS 2015
(the decays); Mihaylova & Martins, "Scheduled Sampling for Transformers", ACL SRW 2019 (the
two-pass scheme and gold/prediction mixing, ``deep-spin/scheduled-sampling-transformers``);
Liu et al., "Scheduled Sampling Based on Decoding Steps for NMT", EMNLP 2021 (soft embeddings,
bridge loss). Notes: shared/methods/scheduled_sampling_mixup.md.

Inside the loss (this transform's ``embed`` hook, see :class:`curriculax.transforms.Transform`):

1. Pass 1, no gradient: ``h = model(tokens)``; a prediction ``y^_t`` per response position
   (``prediction``: ``"sample"`` = in-kernel Gumbel-max at ``temperature``, memory-light;
   ``"argmax"``; ``"soft"`` = ``softmax(z / temperature) @ E``; the last two materialize
   ``[B,T,V]`` logits, without gradient).
2. Shift right by one: the prediction made at ``t-1`` is the candidate input at ``t``,
   ``e~_t = E[y^_{t-1}]``.
3. Per response input position, with probability ``1 - p_gold(step)`` replace the gold
   embedding ``e_t = E[x_t]`` by the mix (``mix``): ``"replace"`` ``e~_t``; ``"mean"``
   ``(e_t + e~_t) / 2`` (deep-spin ``tf_mean_mix``); ``"gate"`` ``g e_t + (1 - g) e~_t``.
4. Pass 2 runs on the mixed embeddings and the objective trains on the gold targets (the
   EMNLP-2021 fine-tuning recipe ``lambda_mle = 0, lambda_bridge = 1``).

Prompt positions are never touched. ``p_gold`` schedule: ``decay`` = Bengio's absolute-step
decays ``"exponential"`` ``k**i``, ``"inverse_sigmoid"`` ``k / (k + exp(i / k))``,
``"linear_decay"`` ``max(limit, k - c i)``; or ``decay=""`` and the relative ``schedule``
fields of :mod:`curriculax.transforms.schedule` (from ``start`` to ``p_gold``). ``k`` / ``c``
unset (None) take a per-decay default: ``k = 0.9999`` (exponential), ``2000`` (inverse sigmoid,
which needs ``k >= 1``), ``1`` with ``c = 1e-5`` (linear).

Defaults (``default_config``; the papers' best values are **unverified**): ``decay=""``,
``schedule="linear"``, ``start=1.0`` -> ``p_gold=0.75`` over the whole run,
``prediction="sample"``, ``temperature=1.0``, ``mix="mean"``, ``gate=0.5``.
The reference model of a KL-anchored objective still sees the gold tokens.

Usage::

    c.transforms = ("scheduled_sampling",)
    c.transform_config.scheduled_sampling = scheduled_sampling.default_config()
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.kernels.gumbel import token_rows
from curriculax.models.transformer import embed_lookup
from curriculax.objectives.base import lm_head_stats
from curriculax.transforms.base import Transform, batch_rows, register, row_uniform, transform_config
from curriculax.transforms.masked_thought import response_input_mask
from curriculax.transforms.schedule import from_config

PREDICTIONS = ("sample", "argmax", "soft")
MIXES = ("replace", "mean", "gate")
DECAYS = ("", "exponential", "inverse_sigmoid", "linear_decay")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        p_gold=0.75, schedule="linear", start=1.0, warmup_ratio=1.0, schedule_kwargs={},
        from_curriculum="", decay="", k=None, c=None, limit=0.0, prediction="sample",
        temperature=1.0, mix="mean", gate=0.5, impl="auto"))


def bengio_decay(decay: str, step, *, k: float, c: float = 0.0, limit: float = 0.0):
    """Bengio et al. (2015) teacher-forcing probability at training step ``step``."""
    i = jnp.asarray(step, jnp.float32)
    if decay == "exponential":
        return jnp.exp(i * math.log(k))  # log in float64: k**i loses digits in float32
    if decay == "inverse_sigmoid":
        return jnp.where(i / k > 700.0, 0.0, k / (k + jnp.exp(jnp.minimum(i / k, 700.0))))
    if decay == "linear_decay":
        return jnp.maximum(limit, k - c * i)
    raise ValueError(f"decay={decay!r}: choose one of {DECAYS}.")


_DECAY_K = {"exponential": 0.9999, "inverse_sigmoid": 2000.0, "linear_decay": 1.0}


def p_gold_at(cfg, ctx) -> jax.Array:
    decay = cfg.get("decay", "")
    if decay:
        if decay not in _DECAY_K:
            raise ValueError(f"scheduled_sampling.decay={decay!r}: choose one of {DECAYS}.")
        k = _DECAY_K[decay] if cfg.get("k") is None else float(cfg.k)
        if decay == "inverse_sigmoid" and k < 1:
            raise ValueError(f"scheduled_sampling.k={k} with decay='inverse_sigmoid' gives p_gold ~ 0 "
                             f"from the first step: it needs k >= 1 (e.g. 2000).")
        c = 1e-5 if cfg.get("c") is None else float(cfg.c)
        return bengio_decay(decay, ctx.step, k=k, c=c, limit=float(cfg.get("limit", 0.0)))
    return jnp.clip(from_config(cfg, "p_gold", ctx), 0.0, 1.0)


def predicted_embeddings(model, batch, rng, cfg, rows_B=None, placement=None) -> jax.Array:
    """``[B,T,d]``: the embedding of the pass-1 prediction made at ``t-1``, for input ``t``;
    ``rows_B``: the rows' positions in the full batch (their sampling noise counters);
    ``placement``: ``lm_head_stats``' ``mesh`` / ``rules`` / ``shard_map`` (a Pallas kernel on a
    multi-device mesh must run under shard_map, like the loss's)."""
    prediction = cfg.get("prediction", "sample")
    temperature = float(cfg.get("temperature", 1.0))
    table = model.embed[...]
    hidden = jax.lax.stop_gradient(model(batch.tokens))
    b, t, d = hidden.shape
    if prediction == "sample":
        weight, layout = model.head_weight()
        stats = lm_head_stats(hidden, jax.lax.stop_gradient(weight), batch.targets, batch.loss_mask,
                              sample_rng=rng, temperature=temperature,
                              sample_rows=None if rows_B is None else token_rows(rows_B, t),
                              impl=cfg.get("impl", "auto"), weight_layout=layout,
                              **(placement or {}))
        pred = embed_lookup(table, stats.sampled_token)
    elif prediction in ("argmax", "soft"):
        logits = jax.lax.stop_gradient(model.logits(hidden))
        if prediction == "argmax":
            pred = embed_lookup(table, jnp.argmax(logits, -1))
        else:
            probs = jax.nn.softmax(logits / temperature, axis=-1)
            pred = jnp.einsum("btv,vd->btd", probs, table.astype(jnp.float32))
    else:
        raise ValueError(f"scheduled_sampling.prediction={prediction!r}: choose one of {PREDICTIONS}.")
    return jnp.pad(pred[:, :-1], ((0, 0), (1, 0), (0, 0)))  # shift right by one position


def mix_embeddings(gold, pred, use_pred, mix: str = "mean", gate: float = 0.5):
    """Gold embeddings where ``~use_pred``; elsewhere the ``mix`` of gold and predicted."""
    if mix == "replace":
        mixed = pred
    elif mix == "mean":
        mixed = 0.5 * (gold + pred)
    elif mix == "gate":
        mixed = gate * gold + (1.0 - gate) * pred
    else:
        raise ValueError(f"scheduled_sampling.mix={mix!r}: choose one of {MIXES}.")
    return jnp.where(use_pred[..., None], mixed.astype(gold.dtype), gold)


def embed(model, batch, rng, ctx) -> jax.Array:
    """The ``embed`` hook: mixed input embeddings for the trained (second) pass."""
    cfg = transform_config(ctx, default_config(), "scheduled_sampling")
    r_pred, r_coin = jax.random.split(rng)
    # clipped like the model's own lookup: an out-of-range (pad) id would read NaN, which
    # 0-probability attention still spreads to every real token
    gold = embed_lookup(model.embed[...], batch.tokens)
    b, t = batch.tokens.shape
    rows = batch_rows(ctx, b)
    pred = predicted_embeddings(model, batch, r_pred, cfg, rows,
                                dict(mesh=ctx.mesh, rules=ctx.rules, shard_map=ctx.shard_map))
    p_gold = p_gold_at(cfg, ctx)
    use_pred = response_input_mask(batch) & (row_uniform(r_coin, rows, t) >= p_gold)
    return mix_embeddings(gold, pred, use_pred, cfg.get("mix", "mean"), float(cfg.get("gate", 0.5)))


def apply(batch, rng, ctx):
    del rng, ctx
    return batch  # the work happens in the model-level ``embed`` hook


scheduled_sampling = register("scheduled_sampling", Transform(apply, embed=embed))

"""UL2 mixture of denoisers for decoder-only models: a data transform plus a prefix-LM loss.

Paper: Tay et al., "UL2: Unifying Language Learning Paradigms", 2022 (arXiv 2205.05131);
mixture and S-denoiser split as in ``stanford-crfm/levanter`` ``data/ul2r.py``; span sampling as
T5's ``random_spans_noise_mask`` (shared/methods/token_weighting.md §2,
efficienttrain_ul2_prefix.md).

Each row of the batch picks one denoiser ``(kind, mean_span mu, corruption_rate r)`` and is
rewritten (in the step, fixed shapes) from ``prefix + doc + eos`` to::

    R/X:  prefix [mode] doc-with-each-noise-span-replaced-by-a-sentinel  <s0> span0 <s1> span1 ... eos
    S:    prefix [mode] doc[:n-m]  doc[n-m:] eos          (m = pivot ~ UniformInt{0..n}; 0 -> n)

with the loss only on the part after the input (``<s0> span0 ... eos``, resp. ``doc[n-m:] eos``):
the prefix-LM loss region. ``prefix`` is ``[bos] prompt`` (``region="response"``: the
response is the document, the prompt stays clean context) or, with ``region="all"``, ``[bos]``
when the row starts with the tokenizer's BOS and nothing otherwise.
Span corruption (T5): ``num_noise = clip(round(n r), 1, n-1)``, ``num_spans =
max(1, round(num_noise / mu))``; noise and non-noise lengths are uniform random compositions and
the spans alternate starting with non-noise, so the doc always ends in a noise span.
Mode tokens: ``[NLU]`` for R, ``[S2S]`` for S, ``[NLG]`` for X.

Decoder-only choices (ours): attention stays causal (the model has no bidirectional prefix
mask), ``eos`` is never corrupted and always the last target, and the rewritten row is cut at
``seq_len`` (a span denoiser adds ``2 * num_spans + 1`` tokens; leave headroom in
``data.seq_len``). Rows not drawn (``apply_prob < 1``) and rows with ``n < 2`` stay unchanged.

Defaults (``default_config``): the UL2 mixture of levanter -- S with probability 0.5, else
uniform over R(3, .15), R(8, .15), X(3, .5), X(8, .5), X(64, .15), X(64, .5);
``mode_token_ids=(261, 262, 263)`` (the ByteTokenizer's spare ids: set your tokenizer's added
tokens), ``sentinel_ids=()`` (every sentinel is the tokenizer's ``<mask>``; give a tuple of ids
for T5-style unique sentinels, span ``k`` uses ``sentinel_ids[min(k, len - 1)]``),
``region="response"``, ``apply_prob=1``.

Usage (the objective is the CE on the loss region the transform wrote)::

    c.transforms = ("ul2",)
    c.transform_config.ul2 = ul2.default_config()
    c.objective = ul2.objective_config()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.objectives.base import Objective, register

KINDS = ("R", "S", "X")
REGIONS = ("response", "all")
UL2_DENOISERS = ("S", "R:3:0.15", "R:8:0.15", "X:3:0.5", "X:8:0.5", "X:64:0.15", "X:64:0.5")
UL2_WEIGHTS = (6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def default_config() -> ml_collections.ConfigDict:
    """The transform's settings (``config.transform_config.ul2``)."""
    return ml_collections.ConfigDict(dict(
        denoisers=UL2_DENOISERS, weights=UL2_WEIGHTS, mode_token_ids=(261, 262, 263),
        sentinel_ids=(), region="response", apply_prob=1.0))


def objective_config() -> ml_collections.ConfigDict:
    """The objective's settings (``config.objective``): CE over the transform's loss region."""
    return ml_collections.ConfigDict(dict(name="ul2", normalization="token", impl="auto"))


def parse_denoiser(spec: str) -> tuple[int, float, float]:
    """``"R:3:0.15"`` -> ``(kind index, mean span, rate)``; ``"S"`` or ``"S:0:0.25"`` -> S."""
    parts = str(spec).split(":")
    if parts[0] not in KINDS or (parts[0] != "S" and len(parts) != 3):
        raise ValueError(f"UL2 denoiser {spec!r}: write 'R:<mean_span>:<rate>', 'X:...' or 'S'.")
    if parts[0] == "S":
        return 1, 0.0, 0.0
    return KINDS.index(parts[0]), float(parts[1]), float(parts[2])


def _random_segmentation(num_items, num_segments, rng, size: int):
    """Segment ids ``[size]`` of a uniformly random composition of ``num_items`` items into
    ``num_segments`` non-empty segments (T5 ``_random_segmentation``), and the lengths ``[size]``."""
    j = jnp.arange(size)
    candidate = (j >= 1) & (j < num_items)  # a new segment may start at item j
    keys = jnp.where(candidate, jax.random.uniform(rng, (size,)), 2.0)
    rank = jnp.argsort(jnp.argsort(keys))
    starts = candidate & (rank < num_segments - 1)
    seg = jnp.cumsum(starts.astype(jnp.int32))
    lengths = jax.ops.segment_sum((j < num_items).astype(jnp.int32), seg, num_segments=size)
    return seg, lengths


def random_spans_noise_mask(n, rng, *, corruption_rate, mean_span, size: int):
    """T5 span corruption over the first ``n`` of ``size`` positions (``n`` may be traced).

    Returns ``(noise [size] bool, span_id [size] int32 (-1 outside noise), num_noise, num_spans)``.
    """
    n = jnp.asarray(n, jnp.int32)
    num_noise = jnp.clip(jnp.round(n * corruption_rate).astype(jnp.int32), 1, jnp.maximum(n - 1, 1))
    num_spans = jnp.maximum(1, jnp.round(num_noise / jnp.maximum(mean_span, 1e-6)).astype(jnp.int32))
    num_spans = jnp.clip(num_spans, 1, jnp.maximum(jnp.minimum(num_noise, n - num_noise), 1))
    r1, r2 = jax.random.split(rng)
    _, noise_len = _random_segmentation(num_noise, num_spans, r1, size)
    _, clean_len = _random_segmentation(n - num_noise, num_spans, r2, size)
    k = jnp.arange(size)
    live = k < num_spans
    noise_len = jnp.where(live, noise_len, 0)
    clean_len = jnp.where(live, clean_len, 0)
    noise_start = jnp.cumsum(clean_len + noise_len) - noise_len  # clean_k comes before noise_k
    edges = jnp.zeros((size + 1,), jnp.int32)
    edges = edges.at[jnp.where(live, noise_start, size)].add(1)
    edges = edges.at[jnp.where(live, noise_start + noise_len, size)].add(-1)
    noise = (jnp.cumsum(edges)[:size] > 0) & (k < n)
    starts = jnp.zeros((size + 1,), jnp.int32).at[jnp.where(live, noise_start, size)].add(1)[:size]
    span_id = jnp.where(noise, jnp.cumsum(starts) - 1, -1)
    return noise, span_id, num_noise, num_spans


def _scatter(out, pos, values, keep):
    return out.at[jnp.where(keep, pos, out.shape[0])].set(values, mode="drop")


def corrupt_row(seq, length, prefix_len, rng, *, kind, mean_span, rate, mode_id, sentinels,
                pad_id):
    """One row. ``seq [T+1]``: the full sequence, valid in ``[0, length]`` (``seq[length]`` is
    the eos). Returns ``(new_seq [T+1], target_mask [T+1])`` where ``target_mask[j]`` marks
    output tokens that are prediction targets."""
    size = seq.shape[0]
    i = jnp.arange(size)
    n = length - prefix_len  # document tokens seq[prefix_len:length]; eos stays out of it
    has_mode = (mode_id >= 0).astype(jnp.int32)
    base = prefix_len + has_mode
    doc = jnp.roll(seq, -prefix_len)  # doc[i] = seq[prefix_len + i]
    in_doc = i < n
    eos = seq[length]

    # R / X: span corruption with sentinels.
    noise, span_id, num_noise, num_spans = random_spans_noise_mask(
        n, jax.random.fold_in(rng, 1), corruption_rate=rate, mean_span=mean_span, size=size)
    first = noise & (jnp.roll(span_id, 1) != span_id)
    sentinel = sentinels[jnp.clip(span_id, 0, sentinels.shape[0] - 1)]
    keep_in = in_doc & (~noise | first)
    in_pos = base + jnp.cumsum(keep_in) - 1
    n_in = keep_in.sum()
    noise_before = jnp.cumsum(noise) - noise
    t_base = base + n_in
    out = jnp.full((size,), pad_id, seq.dtype)
    out = _scatter(out, i, seq, i < prefix_len)
    put_mode = (i == 0) & (has_mode > 0)
    at_mode, mode_tok = jnp.full_like(i, prefix_len), jnp.full_like(i, mode_id)
    out = _scatter(out, at_mode, mode_tok, put_mode)
    out = _scatter(out, in_pos, jnp.where(noise, sentinel, doc), keep_in)
    tgt_pos = t_base + noise_before + span_id + 1
    out = _scatter(out, tgt_pos - 1, sentinel, first)
    out = _scatter(out, tgt_pos, doc, noise)
    end = t_base + num_noise + num_spans
    out = _scatter(out, jnp.full_like(i, end), jnp.full_like(i, eos), i == 0)
    span_target = (i >= t_base) & (i <= end)

    # S: prefix-LM split of the document at a uniform pivot.
    pivot = jax.random.randint(jax.random.fold_in(rng, 2), (), 0, n + 1)
    m = jnp.where(pivot > 0, pivot, n)
    s_out = jnp.full((size,), pad_id, seq.dtype)
    s_out = _scatter(s_out, i, seq, i < prefix_len)
    s_out = _scatter(s_out, at_mode, mode_tok, put_mode)
    s_out = _scatter(s_out, base + i, doc, i <= n)  # doc[n] is the eos
    s_target = (i >= base + n - m) & (i <= base + n)

    is_s = kind == 1
    return jnp.where(is_s, s_out, out), jnp.where(is_s, s_target, span_target)


def ul2_transform(batch, rng, ctx):
    """The registered ``ul2`` transform (see the module docstring)."""
    from curriculax.transforms.base import transform_config  # transforms imports this module

    cfg = transform_config(ctx, default_config(), "ul2")
    specs = [parse_denoiser(s) for s in cfg.denoisers]
    weights = jnp.asarray(tuple(cfg.get("weights", (1.0,) * len(specs))), jnp.float32)
    if weights.shape[0] != len(specs):
        raise ValueError("transform_config.ul2.weights must have one entry per denoiser.")
    region = cfg.get("region", "response")
    if region not in REGIONS:
        raise ValueError(f"transform_config.ul2.region={region!r}: choose one of {REGIONS}.")
    mode_ids = tuple(cfg.get("mode_token_ids", ()))
    if mode_ids and len(mode_ids) != 3:
        raise ValueError("transform_config.ul2.mode_token_ids needs 3 ids ([NLU], [S2S], [NLG]) or ().")
    sentinel_ids = tuple(cfg.get("sentinel_ids", ()))
    if not sentinel_ids:
        if ctx.mask_id is None:
            raise ValueError("ul2 needs sentinel ids: set transform_config.ul2.sentinel_ids or use a "
                             "tokenizer with a mask token.")
        sentinel_ids = (ctx.mask_id,)
    sentinels = jnp.asarray(sentinel_ids, batch.tokens.dtype)
    kinds = jnp.asarray([s[0] for s in specs], jnp.int32)
    spans = jnp.asarray([s[1] for s in specs], jnp.float32)
    rates = jnp.asarray([s[2] for s in specs], jnp.float32)
    modes = jnp.asarray(mode_ids if mode_ids else (-1, -1, -1), jnp.int32)

    b, t = batch.tokens.shape
    mask = batch.loss_mask.astype(bool)
    has_resp = mask.any(-1)
    length = t - jnp.argmax(mask[:, ::-1], axis=-1)  # last loss position + 1
    seq = jnp.concatenate([batch.tokens, jnp.zeros((b, 1), batch.tokens.dtype)], axis=1)
    last_target = jnp.take_along_axis(batch.targets, length[:, None] - 1, 1)[:, 0]  # the eos
    seq = jax.vmap(lambda s, n, y: s.at[n].set(y))(seq, length, last_target)
    if region == "response":
        prefix = batch.prompt_len
    else:  # only a BOS stays clean context: Qwen2-style tokenizers start rows with a document token
        has_bos = jnp.zeros((b,), bool) if ctx.bos_id is None else batch.tokens[:, 0] == ctx.bos_id
        prefix = has_bos.astype(jnp.int32)
    prefix = jnp.minimum(prefix, length)
    r_choice, r_apply, r_rows = jax.random.split(rng, 3)
    idx = jax.random.categorical(r_choice, jnp.log(weights / weights.sum()), shape=(b,))
    kind = kinds[idx]

    def one(s, l, p, k, mu, r, key):
        return corrupt_row(s, l, p, key, kind=k, mean_span=mu, rate=r, mode_id=modes[k],
                           sentinels=sentinels, pad_id=ctx.pad_id)

    new_seq, target = jax.vmap(one)(seq, length, prefix, kind, spans[idx], rates[idx],
                                    jax.random.split(r_rows, b))
    apply = (has_resp & (length - prefix >= 2)
             & (jax.random.uniform(r_apply, (b,)) < cfg.get("apply_prob", 1.0)))[:, None]
    return batch.replace(
        tokens=jnp.where(apply, new_seq[:, :-1], batch.tokens),
        targets=jnp.where(apply, new_seq[:, 1:], batch.targets),
        loss_mask=jnp.where(apply, target[:, 1:], batch.loss_mask),
        reasoning_mask=jnp.where(apply, False, batch.reasoning_mask),
    )


def token_loss(stats, batch, config):
    del batch, config
    return -stats.target_logprob


ul2 = register("ul2", Objective(token_loss))

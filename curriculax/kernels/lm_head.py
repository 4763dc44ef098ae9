"""``fused_lm_head``: per-token statistics of ``softmax(h @ W)`` without ``[N, V]``.

Public API
----------
``fused_lm_head(hidden [N,d], weight [d,V], targets [N], *, where=None,
logit_softcap=None, ref_weight=None, ref_hidden=None, kl_direction="policy_ref",
sample_rng=None, sample_rows=None, temperature=1.0, block_n=None, block_v=None, block_d=None,
bwd_rows=None, grad_filter_eps=None, weight_layout="dv", impl="auto", interpret=None) -> LMHeadStats``

Statistics (float32 ``[N]``; see :mod:`curriculax.kernels.xla` for formulas):

* ``target_logprob``  log p(target), ``lse`` logsumexp of the logits,
  ``entropy`` -sum p log p, ``max_logprob`` log p of the argmax token (no
  gradient; for accuracy) -- always.
* ``kl_to_ref`` -- when ``ref_weight`` is given.  The reference head's logits
  are ``ref_hidden @ ref_weight`` (``ref_hidden`` defaults to ``hidden``), with
  the same softcap, and receive **no gradient**.  Direction:

  - ``kl_direction="policy_ref"`` (default): ``KL(p_policy || p_ref)``, the
    "reverse" KL of RLHF-style anchoring.
  - ``kl_direction="ref_policy"``: ``KL(p_ref || p_policy)``, the *forward* KL
    that Anchored SFT uses (``F.kl_div(log_softmax(theta), softmax(ref))``,
    shared/methods/asft.md); its logit gradient is ``p_policy - p_ref``.

* ``sampled_token`` (int32) / ``sampled_logprob`` -- when ``sample_rng`` is
  given: Gumbel-max sampling from ``softmax(z / temperature)`` with the
  counter-based noise of :mod:`curriculax.kernels.gumbel` (identical on every
  implementation and blocking).  ``sampled_logprob`` is ``log p(token)`` under
  the temperature-1 (capped) policy; it is differentiable, the token is not.
  ``sample_rows`` (int32 ``[N]``, default ``arange(N)``) are the rows' noise
  counters: pass each row's position in a larger batch (``gumbel.token_rows``)
  and a slice of it samples exactly what the whole batch would.

Masking: a row is *valid* iff ``where[n]`` (default True) and
``0 <= targets[n] < V``.  Invalid rows (prompt/pad, ``targets=-100``/``-1``)
return 0 for every statistic (``sampled_token`` 0 too) and get exactly zero
gradient; out-of-range targets are treated as masked rather than clamped.

Head layout and dtype: ``weight`` is ``[d, V]`` (``weight_layout="dv"``) or
``[V, d]`` (``"vd"``: e.g. a tied input embedding, read in place with no
transposed copy); ``ref_weight`` uses the same layout.  The matmuls run in
``hidden``'s dtype with float32 accumulation (a float32 head under bf16
activations is cast tile by tile inside the kernels); gradients come back in
the inputs' own dtypes.

Gradients: ``xla_naive`` differentiates the materialized computation with
plain autodiff (the reference).  Every other impl is a ``jax.custom_vjp``
whose backward recomputes logits blockwise from ``(hidden, weight)`` and the
saved per-row ``lse`` (and entropy / KL / reference lse), supporting
cotangents on every float statistic at once.  ``d_hidden`` / ``d_weight`` come
back in the input dtypes; accumulation is float32.  Reverse mode only
(``jax.jvp`` of a ``custom_vjp`` is an error); higher orders work with
``xla_chunked``, whose backward is plain JAX.  The Pallas impls are
differentiable once: a second derivative raises ``NotImplementedError``
naming ``impl="xla_chunked"``.

Backward memory (``xla_chunked`` / ``pallas_gpu``): besides the gradients
themselves the backward holds a float32 ``d_hidden`` accumulator (``4 N d``
bytes) and one vocabulary chunk.  ``bwd_rows=R`` walks the rows in groups of
``R`` so the accumulator shrinks to ``4 R d``; each extra group adds one
rounding of ``d_weight`` in its dtype (bf16: relative error ~``2**-9`` per
group; none for float32 weights).  ``bwd_rows="auto"`` picks ``R`` so the
accumulator stays under 3.5% of the gradients' size (at least 256 rows:
:func:`xla.default_bwd_rows`); ``None`` (default) keeps one group, the
fastest.  On an H100, ``pallas_gpu`` with ``"auto"`` holds 1.04-1.045x the
gradients' size in all (default: 1.21-1.35x) for 1.18-1.23x the time (measured
with the 64x128 row-group tiles that :func:`pallas_gpu.bwd_blocks` has since replaced).
``pallas_tpu`` ignores it (its backward accumulates in VMEM).

Gradient filtering (``grad_filter_eps``, the Pallas impls; default None = exact): the
approximation Apple's Cut Cross-Entropy makes by default (``filter_eps="auto"``, ``2**-12`` in
bf16; ``grad_filter_eps="auto"`` picks the same ``finfo(hidden.dtype).eps / 32``).  A backward
tile of logits whose softmax probabilities are all ``< eps`` (and the reference head's too,
with a KL) and which holds no target or sampled token is dropped and
its update matmuls are skipped (``pallas_gpu``: in-place GEMMs that loop over live tiles;
``pallas_tpu``: a ``pl.when``, untested on hardware).  Each dropped term is below ``eps`` times
the row's cotangents (times ``|log p|`` for entropy and KL), but they add up: on the bench's
``N(0, 1)`` logits, ``bwd_rows="auto"`` tiles (64x128) skip 68-81% of the update work at a
1.5-2.1% error in ``d_hidden``'s norm (CCE's 128x128: 46-65%, 1.0-1.7%;
``experiments/results/grad_filter.md``; both depend strongly on the logit distribution).  The
XLA impls ignore it and stay exact.

Implementations (``IMPLS``):

==============  ==============================================================
``xla_naive``   materialized ``[N, V]`` logits; reference, O(N V) memory
``xla_chunked`` ``lax.scan`` over vocab chunks, online logsumexp; portable,
                the CPU default; O(N * block_v) temporaries
``pallas_gpu``  fused Triton forward; backward = fused Pallas ``dlogits`` per
                vocab chunk + cuBLAS GEMMs (in-place Pallas GEMMs with row
                groups; see ``pallas_gpu.py``)
``pallas_tpu``  fused Mosaic-TPU forward and backward (see ``pallas_tpu.py``)
``auto``        gpu -> pallas_gpu, tpu -> pallas_tpu, otherwise xla_chunked
==============  ==============================================================

``interpret``: run Pallas kernels through the Pallas interpreter (``None``:
only when the default backend is CPU; ``pallas_tpu`` also accepts a
``pltpu.InterpretParams`` for the TPU-faithful interpreter).  Block sizes default per impl;
``block_d`` is the inner hidden-dim chunk of ``pallas_gpu`` only, and
``block_n`` is ignored by the XLA impls (they process all rows per chunk).
Temperature, softcap and block sizes are static (a change recompiles).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from curriculax.kernels import gumbel, pallas_gpu, pallas_tpu, xla
from curriculax.kernels.xla import HeadOpts

IMPLS = ("auto", "xla_naive", "xla_chunked", "pallas_gpu", "pallas_tpu")

_STAT_FIELDS = ("target_logprob", "lse", "entropy", "max_logprob", "kl_to_ref", "sampled_token",
                "sampled_logprob")


@flax.struct.dataclass
class LMHeadStats:
    """Per-token statistics, each ``[N]`` (optional ones None when not requested)."""

    target_logprob: jax.Array
    lse: jax.Array
    entropy: jax.Array
    # log p of the most likely token: ``target_logprob >= max_logprob`` iff the target is the
    # argmax (token accuracy). A metric: it carries no gradient in any implementation.
    max_logprob: jax.Array
    kl_to_ref: Optional[jax.Array] = None
    sampled_token: Optional[jax.Array] = None
    sampled_logprob: Optional[jax.Array] = None


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}.get(
        backend, "xla_chunked"
    )


def _mask_stats(stats: dict, valid: jax.Array) -> dict:
    out = {}
    for k in _STAT_FIELDS:
        if k in stats:
            out[k] = jnp.where(valid, stats[k], jnp.zeros((), stats[k].dtype))
    return out


def _bwd_rows(bwd_rows, h, w, opts):
    if bwd_rows == "auto":
        return xla.default_bwd_rows(h.shape[0], h.shape[1], w.shape[xla.vocab_axis(opts)],
                                    jnp.dtype(w.dtype).itemsize)
    return bwd_rows


def _first_order_only(kernel, impl):
    """Second-order autodiff differentiates the custom_vjp's fwd and bwd themselves; through a
    pallas_call that dies in a bare assert inside Pallas, so say what to do instead."""

    @jax.custom_jvp
    def call(*args):
        return kernel(*args)

    @call.defjvp
    def _(primals, tangents):
        raise NotImplementedError(
            f"fused_lm_head(impl={impl!r}) is differentiable once (reverse mode): its kernels are "
            "Pallas calls with no derivative. For higher-order gradients (jax.hessian, grad of grad) "
            "pass impl='xla_chunked', whose backward is plain JAX.")

    return call


@functools.lru_cache(maxsize=None)
def _make_fused(impl: str, opts: HeadOpts, block_n, block_v, block_d, bwd_rows, grad_filter_eps, interpret: bool):
    """Build the custom_vjp'd statistics function for one static configuration."""
    if impl == "xla_chunked":

        def fwd_state(h, w, hr, wr, t, rh):
            bv = block_v or xla.default_block_v(h.shape[0], w.shape[xla.vocab_axis(opts)])
            return xla.chunked_forward(h, w, hr, wr, t[:, None], None if rh is None else rh[:, None], opts, block_v=bv)

        def bwd_grads(h, w, hr, wr, rg):
            bv = block_v or xla.default_block_v(h.shape[0], w.shape[xla.vocab_axis(opts)])
            return xla.chunked_backward(h, w, hr, wr, rg, opts, block_v=bv, bwd_rows=_bwd_rows(bwd_rows, h, w, opts))

    elif impl == "pallas_gpu":
        kw = dict(block_n=block_n, block_v=block_v, block_d=block_d, interpret=interpret)

        def fwd_state(h, w, hr, wr, t, rh):
            return pallas_gpu.forward(h, w, hr, wr, t, rh, opts, **kw)

        def bwd_grads(h, w, hr, wr, rg):
            return pallas_gpu.backward(h, w, hr, wr, rg, opts, bwd_rows=_bwd_rows(bwd_rows, h, w, opts),
                                       grad_filter_eps=grad_filter_eps, **kw)

    elif impl == "pallas_tpu":
        kw = dict(block_n=block_n, block_v=block_v, interpret=interpret)

        def fwd_state(h, w, hr, wr, t, rh):
            return pallas_tpu.forward(h, w, hr, wr, t, rh, opts, **kw)

        def bwd_grads(h, w, hr, wr, rg):
            return pallas_tpu.backward(h, w, hr, wr, rg, opts, grad_filter_eps=grad_filter_eps, **kw)

    else:  # pragma: no cover
        raise ValueError(impl)
    if impl.startswith("pallas"):
        fwd_state, bwd_grads = _first_order_only(fwd_state, impl), _first_order_only(bwd_grads, impl)

    def forward(h, w, hr, wr, targets, valid, row_hash):
        stats = xla.finalize(fwd_state(h, w, hr, wr, targets, row_hash), opts)
        return _mask_stats(stats, valid), stats

    @jax.custom_vjp
    def fused(h, w, hr, wr, targets, valid, row_hash):
        return forward(h, w, hr, wr, targets, valid, row_hash)[0]

    def fused_fwd(h, w, hr, wr, targets, valid, row_hash):
        out, stats = forward(h, w, hr, wr, targets, valid, row_hash)
        keep = {k: stats[k] for k in ("lse", "entropy", "kl_to_ref", "lse_ref", "sampled_token") if k in stats}
        return out, (h, w, hr, wr, targets, valid, keep)

    def fused_bwd(res, cts):
        h, w, hr, wr, targets, valid, keep = res
        rg = xla.row_grad(keep, cts, targets, keep.get("sampled_token"), valid, opts)
        d_h, d_w = bwd_grads(h, w, hr, wr, rg)
        # reference side, targets, mask and noise get no gradient
        return d_h, d_w, None, None, None, None, None

    fused.defvjp(fused_fwd, fused_bwd)
    return fused


def fused_lm_head(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    *,
    where: Optional[jax.Array] = None,
    logit_softcap: Optional[float] = None,
    ref_weight: Optional[jax.Array] = None,
    ref_hidden: Optional[jax.Array] = None,
    kl_direction: str = "policy_ref",
    sample_rng: Optional[jax.Array] = None,
    sample_rows: Optional[jax.Array] = None,
    temperature: float = 1.0,
    block_n: Optional[int] = None,
    block_v: Optional[int] = None,
    block_d: Optional[int] = None,
    bwd_rows: Optional[int | str] = None,
    grad_filter_eps: Optional[float | str] = None,
    weight_layout: str = "dv",
    impl: str = "auto",
    interpret: Optional[bool] = None,
) -> LMHeadStats:
    """Per-token statistics of the LM head ``softmax(cap(hidden @ weight))``.

    See the module docstring for the statistics, masking, KL direction,
    sampling and implementation details.
    """
    n, vocab = check_args(hidden, weight, targets, ref_weight, ref_hidden, kl_direction, temperature,
                          logit_softcap, bwd_rows, weight_layout, where)
    grad_filter_eps = resolve_grad_filter_eps(grad_filter_eps, hidden.dtype)

    impl, opts, interpret = _static_options(impl, interpret, logit_softcap, temperature,
                                            ref_weight is not None, kl_direction,
                                            sample_rng is not None, weight_layout)
    targets, valid = _valid_targets(targets, vocab, where)
    row_hash = gumbel.noise_row_hash(sample_rng, n, sample_rows) if opts.with_sample else None
    return compute(impl, opts, (block_n, block_v, block_d, bwd_rows, grad_filter_eps), interpret, hidden, weight,
                   ref_hidden, ref_weight, targets, valid, row_hash)


def check_args(hidden, weight, targets, ref_weight, ref_hidden, kl_direction, temperature, logit_softcap,
               bwd_rows, weight_layout, where=None):
    """The argument checks of :func:`fused_lm_head` (shared with ``sharded_lm_head``); returns
    ``(N, V)``."""
    if weight_layout not in ("dv", "vd"):
        raise ValueError(f"weight_layout must be 'dv' ([d, V]) or 'vd' ([V, d]), got {weight_layout!r}")
    vd = weight_layout == "vd"
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[int(vd)]:
        raise ValueError(f"expected hidden [N,d] and weight {'[V,d]' if vd else '[d,V]'}, got {hidden.shape} "
                         f"and {weight.shape}")
    n, vocab = hidden.shape[0], weight.shape[1 - int(vd)]
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {targets.shape}")
    if where is not None and jnp.shape(where) != (n,):  # else it broadcasts against the [N] mask
        raise ValueError(f"where must have shape ({n},), got {jnp.shape(where)}")
    if ref_hidden is not None and ref_hidden.ndim != 2:
        raise ValueError(f"ref_hidden must be [N, d_ref], got {ref_hidden.shape}")
    if ref_hidden is not None and ref_weight is None:
        raise ValueError("ref_hidden given without ref_weight")
    if ref_weight is not None:
        ref_d = hidden.shape[1] if ref_hidden is None else ref_hidden.shape[1]
        want = (vocab, ref_d) if vd else (ref_d, vocab)
        if ref_weight.shape != want:
            raise ValueError(f"ref_weight must be {list(want)} (weight_layout={weight_layout!r}), "
                             f"got {ref_weight.shape}")
        if ref_hidden is not None and ref_hidden.shape[0] != n:
            raise ValueError(f"ref_hidden must have {n} rows, got {ref_hidden.shape}")
    if kl_direction not in xla.KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {xla.KL_DIRECTIONS}")
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError("logit_softcap must be > 0 or None")
    if not (bwd_rows is None or bwd_rows == "auto" or (isinstance(bwd_rows, int) and bwd_rows > 0)):
        raise ValueError(f"bwd_rows must be a positive int, 'auto' or None, got {bwd_rows!r}")
    return n, vocab


def resolve_grad_filter_eps(eps, dtype) -> Optional[float]:
    """``grad_filter_eps`` as a float or None; ``"auto"`` is CCE's ``finfo(dtype).eps / 32``
    (``2**-12`` for bf16 activations, ~4e-9 for float32: nearly exact)."""
    if eps == "auto":
        return float(jnp.finfo(dtype).eps) / 32
    if eps is not None and not (isinstance(eps, float) and 0.0 < eps < 1.0):
        raise ValueError(f"grad_filter_eps must be a float in (0, 1), 'auto' (CCE's default: 2**-12 for bf16) "
                         f"or None (exact gradients), got {eps!r}")
    return eps


def _static_options(impl, interpret, logit_softcap, temperature, with_kl, kl_direction,
                    with_sample, weight_layout="dv"):
    impl = resolve_impl(impl)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if isinstance(interpret, (bool, int)):
        interpret = bool(interpret)  # else e.g. a (hashable) pltpu.InterpretParams
    opts = HeadOpts(
        softcap=None if logit_softcap is None else float(logit_softcap),
        temperature=float(temperature),
        with_kl=with_kl,
        kl_direction=kl_direction,
        with_sample=with_sample,
        w_vd=weight_layout == "vd",
    )
    return impl, opts, interpret


def _valid_targets(targets, vocab: int, where=None):
    """``(targets with -1 on invalid rows, valid)``: out-of-range targets count as masked."""
    targets = targets.astype(jnp.int32)
    valid = (targets >= 0) & (targets < vocab)
    if where is not None:
        valid = valid & where.astype(bool)
    return jnp.where(valid, targets, -1), valid


def compute(impl, opts, blocks, interpret, hidden, weight, ref_hidden, ref_weight, targets,
            valid, row_hash) -> LMHeadStats:
    """The statistics for prepared inputs (also the per-shard body of
    :func:`curriculax.kernels.sharded.sharded_lm_head`)."""
    ref_weight = None if ref_weight is None else jax.lax.stop_gradient(ref_weight)
    ref_hidden = None if ref_hidden is None else jax.lax.stop_gradient(ref_hidden)
    if hidden.shape[0] == 0 and impl.startswith("pallas"):
        impl = "xla_chunked"  # no rows: a Pallas grid cannot be empty (ZeroDivisionError on blocks)
    if impl == "xla_naive":
        stats = _mask_stats(
            xla.naive_stats(hidden, weight, ref_hidden, ref_weight, targets, valid, row_hash, opts), valid
        )
    else:
        fn = _make_fused(impl, opts, *blocks, interpret)
        stats = fn(hidden, weight, ref_hidden, ref_weight, targets, valid, row_hash)
    if "sampled_token" in stats:
        stats["sampled_token"] = stats["sampled_token"].astype(jnp.int32)
    return LMHeadStats(**stats)

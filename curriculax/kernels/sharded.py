"""``sharded_lm_head``: the fused LM head under ``shard_map`` on a device mesh.

A Pallas kernel is one opaque custom call: XLA's SPMD partitioner cannot split it, so under a
sharded ``jit`` it would run on gathered (replicated) operands. This wrapper states the
parallelism explicitly with ``shard_map``:

* **rows** (tokens) split over the batch mesh axes (``data``, ``fsdp`` by default). Each
  device runs the kernel on its rows. The weight is gathered to each device's vocab slice by
  the ``in_specs`` (an FSDP-sharded ``embed`` axis is all-gathered, as FSDP does for any layer).
* **vocab** split over ``tensor`` (vocab-parallel loss, as Megatron's cross-entropy): each
  device sees ``V / t`` columns and computes its slice's ``lse_k``, entropy ``H_k`` and max
  log-prob. The slices are combined exactly::

      lse  = log sum_k exp(lse_k)
      z_t  = psum(target logit on the slice that owns the target)
      H    = sum_k s_k (H_k - log s_k),   s_k = exp(lse_k - lse)   (= lse - sum_k s_k E_k[z])
      max  = pmax(max_k + lse_k) - lse, or exactly log p(target) where the target is the
             argmax (decided on the slice that owns it), so target >= max is token accuracy

  Gradients flow through each slice's custom-VJP kernel and the collectives (autodiff of
  ``shard_map``), so ``d_weight`` stays vocab-sharded and no device holds ``[N, V]``.
  KL to a reference head and in-kernel sampling need the whole row distribution: they are
  supported with rows split only (``tensor`` = 1, or a vocab size it does not divide).

Sampling noise is keyed on the *global* row index, so samples equal the single-device ones.
Mesh axes whose product does not divide ``N`` (or ``V``) are left out (replicated).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from curriculax.kernels import gumbel, lm_head, xla
from curriculax.kernels.lm_head import LMHeadStats


def _fitting_axes(mesh: Mesh, axes: Sequence[str], size: int) -> tuple[str, ...]:
    """The longest prefix of ``axes`` (present in the mesh, size > 1) whose product divides ``size``."""
    out, prod = [], 1
    for a in axes:
        if a not in mesh.shape or mesh.shape[a] == 1:
            continue
        if size % (prod * mesh.shape[a]):
            break
        out.append(a)
        prod *= mesh.shape[a]
    return tuple(out)


def _spec(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def sharded_lm_head(hidden, weight, targets, *, mesh: Mesh,
                    row_axes: Sequence[str] = ("data", "fsdp"), vocab_axis: str = "tensor",
                    where=None, logit_softcap: Optional[float] = None, ref_weight=None,
                    ref_hidden=None, kl_direction: str = "policy_ref", sample_rng=None, sample_rows=None,
                    temperature: float = 1.0, block_n=None, block_v=None, block_d=None,
                    bwd_rows=None, grad_filter_eps=None, weight_layout: str = "dv", impl: str = "auto",
                    interpret=None) -> LMHeadStats:
    """:func:`curriculax.kernels.fused_lm_head` with rows and vocab split over ``mesh``."""
    lm_head.check_args(hidden, weight, targets, ref_weight, ref_hidden, kl_direction, temperature,
                       logit_softcap, bwd_rows, weight_layout, where)
    vd = weight_layout == "vd"
    n, vocab = hidden.shape[0], weight.shape[0 if vd else 1]
    impl, opts, interpret = lm_head._static_options(
        impl, interpret, logit_softcap, temperature, ref_weight is not None, kl_direction,
        sample_rng is not None, weight_layout)
    rows = _fitting_axes(mesh, row_axes, n)
    cols = _fitting_axes(mesh, (vocab_axis,), vocab)
    if cols and (opts.with_kl or opts.with_sample):
        cols = ()  # these statistics need every column of a row on one device
    targets, valid = lm_head._valid_targets(targets, vocab, where)
    row_hash = gumbel.noise_row_hash(sample_rng, n, sample_rows) if opts.with_sample else None
    grad_filter_eps = lm_head.resolve_grad_filter_eps(grad_filter_eps, hidden.dtype)
    blocks = (block_n, block_v, block_d, bwd_rows, grad_filter_eps)
    rspec, cspec = _spec(rows), _spec(cols)
    row_in, w_in = P(rspec, None), (P(cspec, None) if vd else P(None, cspec))
    vec = P(rspec)

    if not cols:
        def body(h, w, hr, wr, t, ok, rh):
            return lm_head.compute(impl, opts, blocks, interpret, h, w, hr, wr, t, ok, rh)

        hr = None if ref_hidden is None else ref_hidden
        specs = (row_in, w_in, None if hr is None else row_in,
                 None if ref_weight is None else P(None, None), vec, vec,
                 None if row_hash is None else vec)
        out_specs = LMHeadStats(vec, vec, vec, vec, vec if opts.with_kl else None,
                                vec if opts.with_sample else None,
                                vec if opts.with_sample else None)
        fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)
        return fn(hidden, weight, hr, ref_weight, targets, valid, row_hash)

    shards = mesh.shape[cols[0]]
    width = vocab // shards

    def vocab_body(h, w, t, ok):
        k = jax.lax.axis_index(cols[0])
        local_t = t - k * width
        mine = ok & (local_t >= 0) & (local_t < width)
        # Every valid row needs its slice's lse/entropy: score the local target where this slice
        # holds it (for the exact argmax test below), a dummy in-range one elsewhere.
        st = lm_head.compute(impl, opts, blocks, interpret, h, w, None, None,
                             jnp.where(ok, jnp.where(mine, local_t, 0), -1), ok, None)
        col = jnp.take(w, jnp.clip(local_t, 0, width - 1), axis=0 if vd else 1)  # the targets' head rows
        # in h's dtype with float32 accumulation, as the kernels' logits (xla.head_dot): a float32
        # head under bf16 activations must be rounded to bf16 here too, or z_t and lse disagree
        z = jnp.einsum("nd,nd->n" if vd else "nd,dn->n", h, col.astype(h.dtype),
                       preferred_element_type=jnp.float32)
        z = xla.cap(z, opts.softcap)
        z_t = jax.lax.psum(jnp.where(mine, z, 0.0), cols[0])
        m = jax.lax.pmax(jax.lax.stop_gradient(st.lse), cols[0])  # a shift: value-neutral
        lse = m + jnp.log(jax.lax.psum(jnp.exp(st.lse - m), cols[0]))
        log_share = st.lse - lse
        # H = sum_k share_k (H_k - log share_k): no lse - E[z] cancellation for large logits
        entropy = jax.lax.psum(jnp.exp(log_share) * (st.entropy - log_share), cols[0])
        local_top = jax.lax.stop_gradient(st.max_logprob + st.lse)  # ~ the slice's max logit
        best = jax.lax.pmax(local_top, cols[0])
        top = best - jax.lax.stop_gradient(lse)
        # Argmax accuracy compares target_logprob >= max_logprob: z_t (einsum) and the kernels'
        # max logit round differently, so decide "the target is the argmax" exactly (the slice
        # holding it: its kernel's own target vs max, and its max is the largest slice max) and
        # then report max_logprob equal to target_logprob.
        hit = mine & (st.target_logprob >= st.max_logprob) & (local_top >= best)
        hit = jax.lax.pmax(hit.astype(jnp.int32), cols[0]) > 0
        target_logprob = z_t - lse
        top = jnp.where(hit, jax.lax.stop_gradient(target_logprob), top)
        zero = jnp.zeros((), jnp.float32)
        return LMHeadStats(target_logprob=jnp.where(ok, target_logprob, zero),
                           lse=jnp.where(ok, lse, zero), entropy=jnp.where(ok, entropy, zero),
                           max_logprob=jnp.where(ok, top, zero))

    out_specs = LMHeadStats(vec, vec, vec, vec)
    fn = jax.shard_map(vocab_body, mesh=mesh, in_specs=(row_in, w_in, vec, vec),
                       out_specs=out_specs, check_vma=False)
    return fn(hidden, weight, targets, valid)

"""``sharded_lm_head``: rows over data/fsdp and vocab over tensor give the single-device values
and gradients (8 simulated devices; Pallas in interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculax.kernels import fused_lm_head
from curriculax.kernels.sharded import sharded_lm_head
from curriculax.sharding import make_mesh

N, D, V = 24, 16, 64
FIELDS = ("target_logprob", "lse", "entropy", "max_logprob")


def _inputs():
    k = jax.random.split(jax.random.key(0), 5)
    return (jax.random.normal(k[0], (N, D)), jax.random.normal(k[1], (D, V)) * 0.3,
            jax.random.randint(k[2], (N,), 0, V), jax.random.uniform(k[3], (N,)) > 0.2,
            jax.random.normal(k[4], (N, D)))


def _loss(fn, h, w, t, where, **kw):
    st = fn(h, w, t, where=where, logit_softcap=5.0, **kw)
    value = jnp.sum(st.target_logprob * 1.3 + st.entropy * 0.7 + st.lse * 0.1)
    if st.kl_to_ref is not None:
        value = value + jnp.sum(st.kl_to_ref * 0.5)
    if st.sampled_logprob is not None:
        value = value + jnp.sum(st.sampled_logprob * 0.2)
    return value, st


def _check(mesh_shape, impl, **kw):
    h, w, t, where, hr = _inputs()
    vd = kw.pop("vd", False)
    if kw.pop("with_ref", False):
        kw.update(ref_weight=w[::-1] * 0.7, ref_hidden=hr)
    mesh = make_mesh(*mesh_shape)
    grad = lambda fn, **k: jax.value_and_grad(  # noqa: E731
        lambda h, w: _loss(fn, h, w, t, where, **kw, **k), (0, 1), has_aux=True)
    (_, s0), g0 = grad(fused_lm_head, impl="xla_naive")(h, w)
    if vd:  # the sharded call gets the head stored [V, d]
        sharded = lambda h_, w_, t_, **k: sharded_lm_head(  # noqa: E731
            h_, w_.T, t_, weight_layout="vd",
            **{**k, **({"ref_weight": k["ref_weight"].T} if "ref_weight" in k else {})})
    else:
        sharded = sharded_lm_head
    (_, s1), g1 = jax.jit(grad(sharded, mesh=mesh, impl=impl))(h, w)
    for f in FIELDS + ("kl_to_ref", "sampled_logprob"):
        if getattr(s0, f) is not None:
            np.testing.assert_allclose(getattr(s1, f), getattr(s0, f), rtol=1e-5, atol=1e-5)
    if s0.sampled_token is not None:  # noise keyed on the global row: the same samples
        np.testing.assert_array_equal(s1.sampled_token, s0.sampled_token)
    np.testing.assert_allclose(g1[0], g0[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g1[1], g0[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla_chunked", "pallas_gpu"])
def test_vocab_parallel_matches_single_device(impl):
    _check((2, 1, 4), impl)


def test_rows_and_fsdp_with_kl_and_sampling():
    # KL and sampling need whole rows: the tensor axis is not used for vocab here.
    _check((2, 2, 2), "pallas_gpu", with_ref=True, sample_rng=jax.random.key(3))


def test_axes_that_do_not_divide_are_replicated():
    h, w, t, where, _ = _inputs()
    mesh = make_mesh(8, 1, 1)  # 8 devices do not divide 20 rows: rows stay replicated
    st = sharded_lm_head(h[:20], w, t[:20], where=where[:20], mesh=mesh, impl="xla_chunked")
    ref = fused_lm_head(h[:20], w, t[:20], where=where[:20], impl="xla_naive")
    np.testing.assert_allclose(st.target_logprob, ref.target_logprob, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_step_with_pallas_under_shard_map_matches_one_device():
    from test_train import one_step, tiny_config  # tests/ is on sys.path under pytest

    one = tiny_config(**{"objective.impl": "xla_naive"})
    tp = tiny_config(**{"objective.impl": "pallas_gpu", "mesh.num_devices": 0, "mesh.data": 2,
                        "mesh.tensor": 4, "model.vocab_size": 264})
    (_, m1), _ = one_step(one)
    (_, m8), exp = one_step(tp)
    assert exp.mesh.shape["tensor"] == 4
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)


def test_vocab_parallel_with_a_vd_head():
    """A ``[V, d]`` head (a tied embedding) splits its rows over ``tensor``."""
    _check((2, 1, 4), "pallas_gpu", vd=True)


def test_gradient_filter_under_shard_map():
    """``grad_filter_eps`` runs per shard (each shard filters on its own, larger, probabilities:
    conservative); with nothing below eps it is the exact result."""
    _check((2, 1, 4), "pallas_gpu", grad_filter_eps=1e-30)


def test_vocab_parallel_mixed_dtype_and_large_logits():
    """bf16 activations with a float32 head: the target logit is read in the activations' dtype
    like the kernels' logits (else log p(target) can exceed 0); and the entropy recombination
    stays accurate when every logit carries a large common offset."""
    h, w, t, where, _ = _inputs()
    mesh = make_mesh(2, 1, 4)
    hb = h.astype(jnp.bfloat16)
    w8 = w * 8.0  # confident rows: p(target) ~ 1
    t8 = jnp.argmax(hb.astype(jnp.float32) @ w8.astype(jnp.bfloat16).astype(jnp.float32), -1)
    ref = fused_lm_head(hb, w8, t8, impl="xla_naive")
    st = jax.jit(lambda h_, w_: sharded_lm_head(h_, w_, t8, mesh=mesh, impl="xla_chunked"))(hb, w8)
    np.testing.assert_allclose(st.target_logprob, ref.target_logprob, rtol=1e-5, atol=1e-4)
    assert float(st.target_logprob.max()) <= 1e-5

    shift = jnp.zeros((D, V)).at[0].set(2000.0)  # adds 2000 * h[:, 0] to every logit of a row
    hs = h.at[:, 0].set(1.0)
    ref = fused_lm_head(hs, w + shift, t, impl="xla_naive")
    st = sharded_lm_head(hs, w + shift, t, mesh=mesh, impl="xla_chunked")
    np.testing.assert_allclose(st.entropy, ref.entropy, rtol=0, atol=2e-3)


@pytest.mark.parametrize("bad", [dict(kl_direction="reverse", ref_weight=True), dict(temperature=-1.0),
                                 dict(weight_layout="VD"), dict(bwd_rows=-3), dict(logit_softcap=0.0)])
def test_sharded_validates_arguments_like_fused(bad):
    """A typo must not silently pick another KL direction / an argmin sampler on a mesh."""
    h, w, t, where, _ = _inputs()
    if bad.pop("ref_weight", False):
        bad["ref_weight"] = w
    if "temperature" in bad:
        bad["sample_rng"] = jax.random.key(0)
    with pytest.raises(ValueError):
        fused_lm_head(h, w, t, impl="xla_chunked", **bad)
    with pytest.raises(ValueError):
        sharded_lm_head(h, w, t, mesh=make_mesh(2, 1, 4), impl="xla_chunked", **bad)


@pytest.mark.parametrize("impl", ["xla_chunked", "pallas_gpu"])
def test_vocab_parallel_argmax_accuracy_is_exact(impl):
    """``target_logprob >= max_logprob`` (token accuracy) is exactly "the target is the argmax"
    with the vocab split: z_t and the slices' max logits round differently, so a plain
    comparison missed ~20% of the argmax hits."""
    n = 256
    k = jax.random.split(jax.random.key(3), 3)
    h, w = jax.random.normal(k[0], (n, D)), jax.random.normal(k[1], (D, V)) * 0.5
    z = np.asarray(jnp.dot(h, w, precision="highest"))
    top2 = np.sort(z, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3  # argmax no rounding can change
    argmax = jnp.asarray(z.argmax(-1), jnp.int32)
    other = jnp.asarray((z.argmax(-1) + 1 + jax.random.randint(k[2], (n,), 0, V - 1)) % V, jnp.int32)
    for shape in [(1, 1, 8), (2, 2, 2)]:
        mesh = make_mesh(*shape)
        for t, want in ((argmax, True), (other, False)):
            st = jax.jit(lambda h, w, t: sharded_lm_head(h, w, t, mesh=mesh, impl=impl,
                                                         interpret=True))(h, w, t)
            hit = np.asarray(st.target_logprob >= st.max_logprob)
            assert (hit[clear] == want).all(), (shape, want, int((hit[clear] != want).sum()))

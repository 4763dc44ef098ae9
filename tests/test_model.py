"""Model invariants: KV-cache decoding, packing, padding, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from curriculax import sharding
from curriculax.models import KVCache, ModelConfig, Transformer, generate, num_params
from curriculax.models.generate import top_p_filter

FAMILIES = {
    "llama": dict(rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, tie_embeddings=True),
}


def _model(family="llama", seed=0, **kw):
    model = Transformer(ModelConfig.tiny(**FAMILIES[family], **kw), rngs=nnx.Rngs(seed))
    if family == "qwen2":  # zero-initialised biases would hide a bias bug
        for name in ("q_bias", "k_bias", "v_bias"):
            for i, layer in enumerate(model.layers):
                var = getattr(layer.attn, name)
                var[...] = jax.random.normal(jax.random.key(i), var.shape) * 0.5
    return model


def _tokens(b, t, seed=1, vocab=264):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_param_count_matches_formula():
    for fam in FAMILIES:
        model = _model(fam)
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert n == num_params(model.config)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_matches_full_forward(family):
    model = _model(family)
    toks = _tokens(2, 20)
    full = model(toks)
    cache = KVCache.init(model.config, 2, 24)
    parts = []
    for lo, hi in [(0, 7), (7, 8), (8, 15), (15, 20)]:
        h, cache = model(toks[:, lo:hi], cache=cache)
        parts.append(h)
    np.testing.assert_allclose(jnp.concatenate(parts, 1), full, atol=1e-5)
    assert int(cache.index) == 20


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_segments_equal_separate_forwards(family):
    model = _model(family)
    a, b = _tokens(1, 9, seed=2), _tokens(1, 7, seed=3)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 9 + [2] * 7])
    pos = jnp.array([list(range(9)) + list(range(7))])
    out = model(packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[:, :9], model(a), atol=1e-5)
    np.testing.assert_allclose(out[:, 9:], model(b), atol=1e-5)
    # Without segment ids the second sequence would see the first: the test can fail.
    leaky = model(packed, positions=pos)
    assert float(jnp.abs(leaky[:, 9:] - model(b)).max()) > 1e-3


def test_left_padding_equals_unpadded():
    model = _model("qwen2")
    toks = _tokens(1, 10)
    padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), toks], 1)
    seg = (jnp.arange(15) >= 5).astype(jnp.int32)[None]
    pos = jnp.maximum(jnp.cumsum(seg, 1) - 1, 0)
    out = model(padded, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[:, 5:], model(toks), atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_matches_argmax_loop(family):
    model = _model(family)
    prompts = [np.asarray(_tokens(1, n, seed=n))[0] for n in (5, 9)]
    batch = np.zeros((2, 9), np.int32)
    mask = np.zeros((2, 9), bool)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p):], mask[i, 9 - len(p):] = p, True
    out = np.asarray(generate(model, batch, 6, prompt_mask=mask))
    for i, p in enumerate(prompts):
        seq = list(p)
        for _ in range(6):  # recompute from scratch each time: no cache involved
            logits = model.logits(model(jnp.array([seq])))[0, -1]
            seq.append(int(jnp.argmax(logits)))
        assert out[i].tolist() == seq[len(p):]


def test_generate_eos_and_sampling():
    model = _model("llama")
    prompt = _tokens(3, 6)
    greedy = np.asarray(generate(model, prompt, 8, prompt_mask=jnp.ones((3, 6), bool)))
    eos = int(greedy[0, 2])
    stopped = np.asarray(generate(model, prompt, 8, eos_id=eos, pad_id=-1,
                                  prompt_mask=jnp.ones((3, 6), bool)))
    first = list(greedy[0]).index(eos)
    assert stopped[0, first] == eos and (stopped[0, first + 1:] == -1).all()
    # several EOS ids (Llama-3's generation configs list more than one)
    both = np.asarray(generate(model, prompt, 8, eos_id=(int(greedy[0, 0]), eos), pad_id=-1,
                               prompt_mask=jnp.ones((3, 6), bool)))
    assert both[0, 0] == greedy[0, 0] and (both[0, 1:] == -1).all()
    kw = dict(temperature=1.0, prompt_mask=jnp.ones((3, 6), bool))
    s1 = generate(model, prompt, 8, rng=jax.random.key(0), **kw)
    s2 = generate(model, prompt, 8, rng=jax.random.key(0), **kw)
    s3 = generate(model, prompt, 8, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(s1, s2)
    assert (np.asarray(s1) != np.asarray(s3)).any()
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, 2, temperature=1.0)


def test_pick_token_samples_the_tempered_nucleus():
    """20k draws: temperature divides the logits, top-p cuts the tail, keys are not reused."""
    from curriculax.models.generate import pick_token

    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p)), (20_000, 4))
    tempered = p ** 0.5 / np.sum(p ** 0.5)  # T = 2
    token, logp = pick_token(logits, jax.random.key(0), 2.0, 1.0)
    np.testing.assert_allclose(np.bincount(token, minlength=4) / 20_000, tempered, atol=0.012)
    np.testing.assert_allclose(np.exp(logp), tempered[np.asarray(token)], rtol=1e-5)
    token, _ = pick_token(logits, jax.random.key(1), 1.0, 0.7)  # nucleus {0, 1}
    np.testing.assert_allclose(np.bincount(token, minlength=4) / 20_000, [0.625, 0.375, 0, 0], atol=0.012)


def test_kv_cache_overflow_and_out_of_vocab_pad_are_visible_or_harmless():
    model = _model("llama")
    tokens = _tokens(1, 7)
    cache = KVCache.init(model.config, 1, 6)
    with pytest.raises(ValueError, match="7 tokens do not fit a KV cache of 6 slots"):
        model(tokens, cache=cache)
    _, cache = model(tokens[:, :4], cache=cache)
    hidden, _ = model(tokens[:, 4:7], cache=cache)  # 4 + 3 > 6: earlier keys were overwritten
    assert np.isnan(np.asarray(hidden)).all()
    # a pad id past the vocabulary, left padding: the real tokens stay finite and unchanged
    seg = jnp.array([[0, 0, 1, 1, 1]])
    padded = jnp.concatenate([jnp.full((1, 2), model.config.vocab_size + 36), tokens[:, :3]], 1)
    out = model(padded, positions=jnp.maximum(jnp.cumsum(seg, 1) - 1, 0), segment_ids=seg)
    np.testing.assert_allclose(out[:, 2:], model(tokens[:, :3]), atol=1e-5)


def test_top_p_filter_keeps_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = jnp.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert jnp.isfinite(top_p_filter(logits, 1.0)).all()


@pytest.mark.slow
def test_sharded_2x4_mesh_matches_single_device():
    assert len(jax.devices()) >= 8, "tests expect 8 simulated devices (see conftest.py)"
    model = _model("qwen2", num_heads=8, num_kv_heads=4, head_dim=8)
    toks = _tokens(4, 12)
    expected = model(toks)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    sharding.shard_model(model, mesh)
    q = model.layers[0].attn.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m, t: m(t))(model, toks)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_logical_rules_and_fitting():
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4, devices=jax.devices()[:8])
    spec = sharding.logical_to_mesh(("batch", "vocab"), sharding.DEFAULT_RULES)
    assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    # 6 is not divisible by tensor=4: replicated instead of failing.
    assert sharding.fit_spec(jax.sharding.PartitionSpec(None, "tensor"), (3, 6), mesh) == \
        jax.sharding.PartitionSpec(None, None)
    with pytest.raises(ValueError, match="absorb"):
        sharding.make_mesh(data=3, fsdp=1, tensor=1)


@pytest.mark.slow
def test_bf16_embedding_gradient_of_a_frequent_token_accumulates_in_float32():
    """The lookup's gradient is a scatter-add over every occurrence of a token: in a bfloat16
    table's own dtype a token seen ~1000 times stagnates (bf16 sums of O(1) terms stop growing
    at 256-512). bfloat16 weights must get the float32 weights' gradient, rounded once."""
    cfg = ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (4, 256))
    tokens[rng.random(tokens.shape) < 0.8] = 7  # ~800 occurrences of token 7
    tokens = jnp.asarray(tokens, jnp.int32)
    c = jax.random.normal(jax.random.key(1), (4, 256, cfg.hidden_size)) + 1.0

    def embed_grad(dtype):
        def loss(st):
            return jnp.sum(nnx.merge(graphdef, st)(tokens).astype(jnp.float32) * c)
        st = jax.tree.map(lambda x: x.astype(dtype), state)  # the same (bf16-exact) values
        return jax.grad(loss)(st)["embed"][...]

    g16, g32 = embed_grad(jnp.bfloat16), embed_grad(jnp.float32)
    assert g16.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(g16[7].astype(jnp.float32) - g32[7]) / jnp.linalg.norm(g32[7]))
    assert rel < 1e-2, rel

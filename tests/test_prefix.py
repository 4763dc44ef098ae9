"""Prefix tuning: off = the plain model, attention over [prefix; sequence] equals HF-style past
key/values, KV-cache decoding, padding and packing, training only the prefixes (direct and
through the reparameterization MLP), export refusal; the embedding-only selection preset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from curriculax import sparsity
from curriculax.models import KVCache, ModelConfig, Transformer, num_params, save_hf
from curriculax.peft import prefix
from curriculax.train import metrics, train

from test_sparsity import _flat, _stepwise, assert_trains_only
from test_train import tiny_config

P = 3
_fwd = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw))  # one compile, not op by op


def _tokens(b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 264)


def _models(**kw):
    cfg = ModelConfig.tiny(qk_norm=True, **kw)  # the QK norm must not touch the prefix keys
    return (Transformer(cfg, rngs=nnx.Rngs(0)),
            Transformer(cfg.replace(prefix_len=P), rngs=nnx.Rngs(0)))


def test_prefix_len_zero_is_the_plain_model_and_base_weights_unchanged():
    plain, pre = _models()
    toks = _tokens(2, 10)
    ref = _fwd(plain, toks)
    off = Transformer(plain.config.replace(prefix_len=0), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_fwd(off, toks), ref)
    flat_plain = _flat(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    flat_pre = _flat(nnx.to_pure_dict(nnx.state(pre, nnx.Param)))
    for k, v in flat_plain.items():
        np.testing.assert_array_equal(flat_pre[k], v)
    assert sorted(set(flat_pre) - set(flat_plain)) == [
        f"layers/{i}/attn/prefix/{p}" for i in (0, 1) for p in "kv"]
    assert flat_pre["layers/0/attn/prefix/k"].shape == (P, 2, 16)
    assert sum(v.size for v in flat_pre.values()) == num_params(pre.config)
    assert float(jnp.abs(_fwd(pre, toks) - ref).max()) > 1e-3  # the prefixes are attended to


def test_prefixes_equal_past_key_values():
    """The plain model with the prefixes written into its KV cache as a "past" (how HF PEFT runs
    prefix tuning) computes the same hidden states."""
    plain, pre = _models()
    toks = _tokens(2, 9)
    cache = KVCache.init(plain.config, 2, P + 9)
    k = jnp.stack([layer.attn.prefix.k[...] for layer in pre.layers])  # [L, P, K, D]
    v = jnp.stack([layer.attn.prefix.v[...] for layer in pre.layers])
    cache = cache.replace(
        k=cache.k.at[:, :, :P].set(jnp.broadcast_to(k[:, None], (2, 2) + k.shape[1:])),
        v=cache.v.at[:, :, :P].set(jnp.broadcast_to(v[:, None], (2, 2) + v.shape[1:])),
        segment_ids=cache.segment_ids.at[:, :P].set(1), index=jnp.int32(P))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    past, _ = _fwd(plain, toks, positions=pos, cache=cache)
    np.testing.assert_allclose(_fwd(pre, toks), past, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    _, pre = _models()
    toks = _tokens(2, 16)
    full = _fwd(pre, toks)
    cache = KVCache.init(pre.config, 2, 20)
    parts = []
    for lo, hi in [(0, 5), (5, 6), (6, 11), (11, 16)]:
        h, cache = _fwd(pre, toks[:, lo:hi], cache=cache)
        parts.append(h)
    np.testing.assert_allclose(jnp.concatenate(parts, 1), full, atol=1e-5)


def test_padded_and_packed_batches_equal_per_row_forwards():
    _, pre = _models()
    a, b = _tokens(1, 10, seed=2), _tokens(1, 6, seed=3)
    # Row 0: a; row 1: b left-padded with 4 padding slots (segment 0, as generate pads).
    batch = jnp.concatenate([a, jnp.concatenate([jnp.zeros((1, 4), jnp.int32), b], 1)], 0)
    seg = jnp.stack([jnp.ones(10, jnp.int32), (jnp.arange(10) >= 4).astype(jnp.int32)])
    pos = jnp.maximum(jnp.cumsum(seg, 1) - 1, 0)
    out = _fwd(pre, batch, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[:1], _fwd(pre, a), atol=1e-5)
    np.testing.assert_allclose(out[1:, 4:], _fwd(pre, b), atol=1e-5)
    assert np.all(np.isfinite(out))
    # Packing: every segment sees the prefixes and nothing of the other segment.
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 10 + [2] * 6])
    pos = jnp.array([list(range(10)) + list(range(6))])
    out = _fwd(pre, packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[:, :10], _fwd(pre, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 10:], _fwd(pre, b), atol=1e-5)


def test_export_refused(tmp_path):
    _, pre = _models()
    with pytest.raises(ValueError, match="prefix"):
        save_hf(pre, pre.config, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_trainer_updates_only_prefixes():
    cfg = tiny_config(**{"optimizer.weight_decay": 0.1, "optimizer.warmup_steps": 0})
    cfg.sparsity = sparsity.config("prefix", prefix_len=4, reparam_hidden=0)
    exp, states, losses = _stepwise(cfg, 3)
    assert exp.model_config.prefix_len == 4
    assert losses[-1] < losses[0]
    assert len(assert_trains_only(states, "/prefix/", changed=np.all)) == 4


@pytest.mark.slow  # ~20 s: two trainer runs; the 8-device path is also covered by test_train
def test_reparameterized_prefixes_in_trainer_one_and_eight_devices(tmp_path):
    """The MLP trains, the base is frozen, model weights carry the MLP's prefixes; the same
    run on one and on 8 devices gives the same losses."""
    assert len(jax.devices()) >= 8
    kw = {"steps": 4, "eval_every": 4, "checkpoint_every": 4, "optimizer.weight_decay": 0.1}
    runs = {"one": {}, "eight": {"mesh.num_devices": 0, "mesh.data": -1}}
    for name, mesh in runs.items():
        cfg = tiny_config(**kw, **mesh)
        cfg.sparsity = sparsity.config("prefix", prefix_len=4, reparam_hidden=32)
        last = train(cfg, tmp_path / name)
    one, eight = ([r["loss"] for r in metrics.read(tmp_path / n) if "loss" in r] for n in runs)
    assert len(one) == len(eight) == 4 and np.all(np.isfinite(one))
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
    assert "eval/accuracy" in last

    from test_train import _final_state  # restores the last checkpoint of a run

    from curriculax.train import build

    exp = build(cfg)
    start, final = jax.device_get(exp.init_state()), _final_state(tmp_path / "eight", cfg)
    assert set(final.params) == {"base", "reparam"}
    jax.tree.map(np.testing.assert_array_equal, final.params["base"], start.params["base"])
    for k, v in _flat(start.params["reparam"]).items():
        assert np.any(_flat(final.params["reparam"])[k] != v), k
    weights = _flat(exp.model_params(final.params))
    kv = prefix.reparam_prefixes(final.params["reparam"], exp.model_config)
    np.testing.assert_allclose(weights["layers/1/attn/prefix/v"], kv[1, 1], rtol=1e-6)
    np.testing.assert_array_equal(weights["layers/1/mlp/up"],
                                  _flat(final.params["base"])["layers/1/mlp/up"])


def test_embedding_only_preset():
    cfg = tiny_config()
    cfg.sparsity = sparsity.config("select", include="embedding-only")
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))), nnx.Param))
    masks = _flat(sparsity.build(cfg, abstract).init_masks(abstract, None))
    assert [k for k, m in masks.items() if m] == ["embed"]
    cfg.sparsity = sparsity.config("prefix")
    with pytest.raises(ValueError, match="prefix_len > 0"):  # a model without prefixes
        sparsity.build(cfg, abstract)

"""CorDA end to end: covariances from the model's layer inputs, the jitted decomposition, and a
LoRA run that starts exactly at the pretrained model."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sparsity import _stepwise  # tests/ is on sys.path under pytest
from test_train import tiny_config

from curriculax.models import ModelConfig, Transformer
from curriculax.peft import corda


def test_collected_covariances_equal_the_layer_inputs():
    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 264)
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool)
    covs = corda.collect_covariances(model, [(tokens, mask), (tokens, mask)], normalize="none")
    x = np.asarray(model.layers[0].attn_norm(jnp.take(model.embed[...], tokens, axis=0)),
                   np.float64)
    real = x[np.asarray(mask)]
    expect = 2 * real.T @ real  # two identical batches
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(covs[f"layers/0/attn/{name}"], expect, rtol=1e-4, atol=1e-4)
    # The official normalization: each row scaled by its largest |x|, the mean over the rows
    # (the padded row-less third row of a batch is not a sample).
    rows = [x[b][np.asarray(mask[b])] for b in range(2)]
    expect = sum(r.T @ r / np.abs(r).max() ** 2 for r in rows) / 2
    padded = (jnp.concatenate([tokens, tokens[:1]]), jnp.concatenate([mask, mask[:1] & False]))
    covs = corda.collect_covariances(model, [(tokens, mask), padded])
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(covs[f"layers/0/attn/{name}"], expect, rtol=1e-4, atol=1e-5)
    d, f = model.config.hidden_size, model.config.intermediate_size
    assert covs["layers/1/mlp/down"].shape == (f, f) and covs["layers/1/mlp/up"].shape == (d, d)
    heads = model.config.num_heads * model.config.head_dim
    assert covs["layers/0/attn/o"].shape == (heads, heads)
    assert not any(getattr(m, "record_inputs", False) for _, m in nnx.iter_modules(model))


def test_jnp_decomposition_matches_numpy():
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).T
    cov = np.array([[2.0, 1.0], [1.0, 5.0]])
    c = corda.damp(cov)
    for mode in ("ipm", "kpm"):
        a, b, res = corda.decompose(w, cov, 1, mode)
        ja, jb, jres = jax.jit(corda.decompose_jnp, static_argnums=(3, 4))(
            w, c.astype(np.float32), np.linalg.inv(c).astype(np.float32), 1, mode)
        np.testing.assert_allclose(ja @ jb, a @ b, atol=1e-4)
        np.testing.assert_allclose(jres, res, atol=1e-4)
    for bad in (0, 3):  # a rank beyond the weight would wrap kpm's slice around
        with pytest.raises(ValueError, match=f"CorDA rank={bad} must be in \\[1, 2\\]"):
            corda.decompose(w, cov, bad, "kpm")
        with pytest.raises(ValueError, match=f"CorDA rank={bad}"):
            corda.decompose_jnp(w, c, np.linalg.inv(c), bad, "kpm")


@pytest.mark.slow
def test_corda_lora_run_starts_at_the_pretrained_model(tmp_path):
    cfg = tiny_config(**{"optimizer.warmup_steps": 0})
    targets = r"layers/\d+/(attn/(q|v)|mlp/down)$"
    lora_cfg = corda.prepare(cfg, tmp_path, rank=4, targets=targets, samples=16, batch_size=8)
    path = pathlib.Path(lora_cfg.sparsity.corda)
    assert path.parent == tmp_path and path.name.startswith("corda_covariances-") and path.exists()
    plain, plain_states, plain_losses = _stepwise(cfg, 1)
    exp, states, losses = _stepwise(lora_cfg, 3)
    # W_res + A B = W: the first step sees exactly the starting model's loss.
    np.testing.assert_allclose(losses[0], plain_losses[0], rtol=1e-4)
    merged = exp.model_params(states[0].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), merged,
                 plain_states[0].params)
    assert set(states[0].params["lora"]) == {
        f"layers/{i}/{m}" for i in (0, 1) for m in ("attn/q", "attn/v", "mlp/down")}
    assert losses[-1] < losses[0]


def test_init_adapters_split_each_covered_weight_exactly():
    rng = np.random.default_rng(0)
    params = {"layers": {"0": {"mlp": {"up": rng.normal(size=(4, 6)).astype(np.float32),
                                       "down": rng.normal(size=(6, 4)).astype(np.float32)}}}}
    x = rng.normal(size=(32, 4))
    residual, adapters = corda.init_adapters(params, {"layers/0/mlp/up": x.T @ x}, rank=2)
    ad = adapters["layers/0/mlp/up"]
    assert set(adapters) == {"layers/0/mlp/up"} and ad["a"].shape == (4, 2)
    np.testing.assert_allclose(residual["layers"]["0"]["mlp"]["up"] + ad["a"] @ ad["b"],
                               params["layers"]["0"]["mlp"]["up"], atol=1e-5)
    np.testing.assert_array_equal(residual["layers"]["0"]["mlp"]["down"],
                                  params["layers"]["0"]["mlp"]["down"])


def test_prepare_counts_real_tokens_only(tmp_path, monkeypatch):
    """The calibration mask covers each row's real input tokens, not the first padding slot."""
    from curriculax.train import build

    seen = []
    monkeypatch.setattr(corda, "collect_covariances",
                        lambda model, batches, pattern=None: (seen.extend(batches), {})[1])
    cfg = tiny_config()
    corda.prepare(cfg, tmp_path, rank=4, samples=16, batch_size=8)
    tokens = np.concatenate([t for t, _ in seen])
    mask = np.concatenate([m for _, m in seen])
    pad = build(cfg).train_data.bank.info.pad_id
    np.testing.assert_array_equal(mask, tokens != pad)


def test_covariance_file_with_more_paths_than_the_targets(tmp_path):
    """A covariance file that holds more paths than the targets: only the targets decompose."""
    from curriculax.train import build

    cfg = tiny_config()
    narrow = corda.prepare(cfg, tmp_path, rank=4, samples=16, batch_size=8)  # every projection
    narrow.sparsity.targets = r"layers/\d+/attn/q$"
    exp = build(narrow)
    state = exp.init_state()
    assert set(state.params["lora"]) == {"layers/0/attn/q", "layers/1/attn/q"}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 exp.model_params(state.params), build(cfg).init_state().params)


def test_jnp_decomposition_refuses_an_unknown_mode():
    """The trainer's jitted init (sparsity.corda_mode) must not read a typo as "kpm"."""
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).T
    c = corda.damp(np.array([[2.0, 1.0], [1.0, 5.0]]))
    for bad in ("IPM", "ipa", ""):
        with pytest.raises(ValueError, match="CorDA mode"):
            corda.decompose_jnp(w, c, np.linalg.inv(c), 1, bad)


def test_prepare_with_streaming_pools_reads_the_training_records(tmp_path, monkeypatch):
    """data.pool_size > 0 keeps no resident bank (exp.train_data is None): the calibration rows
    are still the first training rows, the same as without streaming."""
    seen = {}
    for pool_size in (0, 64):
        batches = seen.setdefault(pool_size, [])
        monkeypatch.setattr(corda, "collect_covariances",
                            lambda model, b, pattern=None, out=batches: (out.extend(b), {})[1])
        corda.prepare(tiny_config(**{"data.pool_size": pool_size}), tmp_path / str(pool_size),
                      rank=4, samples=16, batch_size=8)
    assert len(seen[64]) == len(seen[0]) == 2
    for (t0, m0), (t1, m1) in zip(seen[0], seen[64]):
        np.testing.assert_array_equal(t1, t0)
        np.testing.assert_array_equal(m1, m0)


def test_prepare_reuses_a_file_only_for_the_same_calibration(tmp_path, monkeypatch):
    """The file was one fixed name: a kpm run after an ipm run in the same workdir silently reused
    the task's covariances instead of the knowledge rows'."""
    runs = []
    monkeypatch.setattr(corda, "collect_covariances",
                        lambda model, batches, pattern=None: (runs.append(len(batches)), {})[1])
    cfg = tiny_config()
    knowledge = [{"id": f"k{i}", "prompt": "Capital of France?", "response": "#### Paris",
                  "category": "facts", "difficulty": 1} for i in range(3)]
    ipm = corda.prepare(cfg, tmp_path, rank=4, samples=16, batch_size=8)
    assert corda.prepare(cfg, tmp_path, rank=4, samples=16, batch_size=8) == ipm and len(runs) == 1
    kpm = corda.prepare(cfg, tmp_path, rank=4, mode="kpm", calibration=knowledge, batch_size=8)
    other = corda.prepare(cfg, tmp_path, rank=4, samples=8, batch_size=8)
    paths = {ipm.sparsity.corda, kpm.sparsity.corda, other.sparsity.corda}
    assert len(paths) == 3 and all(pathlib.Path(p).exists() for p in paths) and len(runs) == 3


def test_corda_adapters_take_no_weight_decay():
    """CorDA's adapters start as the weight's principal slice (ipm): AdamW's decay toward 0 shrank
    the pretrained model itself (each factor 0.2% per 1000 steps at lr 2e-4 and the default
    weight decay 0.01)."""
    from curriculax import sparsity
    from curriculax.peft import lora

    cfg = tiny_config(**{"optimizer.weight_decay": 0.5, "optimizer.warmup_steps": 0})
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))), nnx.Param))
    params = {"base": jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract),
              "lora": {name: {"a": jnp.ones((m, 4)), "b": jnp.ones((4, n))}
                       for name, (m, n) in lora.targets(abstract, r"attn/q$").items()}}
    decayed = {}
    for corda_file in ("", "covariances.npz"):
        cfg.sparsity = sparsity.config("lora", rank=4, alpha=4.0, targets=r"attn/q$",
                                       corda=corda_file)
        opt = sparsity.build(cfg, abstract).optimizer
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = opt.update(zeros, opt.init(params), params)
        decayed[corda_file] = max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates["lora"]))
    assert decayed[""] > 0 and decayed["covariances.npz"] == 0

"""LoRA: adapters, merging, merged HF export (transformers logits), training through the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from curriculax import sparsity
from curriculax.models import ModelConfig, Transformer
from curriculax.models.layers import LowRank
from curriculax.peft import lora
from curriculax.sparsity import lift

from test_sparsity import _flat, _stepwise
from test_train import tiny_config

def test_merge_formula_and_zero_init():
    params = {"layers": {0: {"attn": {"q": jnp.ones((4, 2, 3)), "o": jnp.ones((2, 3, 4))},
                             "attn_norm": {"scale": jnp.ones(4)}}}, "embed": jnp.ones((5, 4))}
    ad = lora.init(params, jax.random.PRNGKey(0), rank=2, pattern=r"attn/[qo]$")
    assert ad["layers/0/attn/q"]["a"].shape == (4, 2) and ad["layers/0/attn/q"]["b"].shape == (2, 6)
    assert ad["layers/0/attn/o"]["a"].shape == (6, 2) and ad["layers/0/attn/o"]["b"].shape == (2, 4)
    jax.tree.map(np.testing.assert_array_equal, lora.merge(params, ad, scale=8.0), params)
    b = jnp.arange(12.0).reshape(2, 6)
    ad["layers/0/attn/q"]["b"] = b
    merged = lora.merge(params, ad, scale=0.5)
    want = 1.0 + 0.5 * np.asarray(ad["layers/0/attn/q"]["a"]) @ np.asarray(b)
    np.testing.assert_allclose(merged["layers"][0]["attn"]["q"], want.reshape(4, 2, 3), rtol=1e-6)
    np.testing.assert_array_equal(merged["embed"], params["embed"])


def test_merged_export_loads_in_transformers_with_same_logits(tmp_path):
    torch = pytest.importorskip("torch")  # the only test here that needs the references
    transformers = pytest.importorskip("transformers")
    from test_hf import TOL, hf_logits, make_hf_model, max_real_diff, our_logits, padded_batch

    from curriculax.models import load_hf

    hf_model = make_hf_model("qwen2")
    hf_model.save_pretrained(tmp_path / "base")
    model, cfg = load_hf(tmp_path / "base")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ad = lora.init(params, jax.random.PRNGKey(1), rank=4, pattern=r"attn/[qkvo]$|mlp/(gate|down)$")
    ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), ad)
    merged = lora.merge(params, ad, scale=2.0)
    graphdef, _ = nnx.split(model, nnx.Param)
    ours = nnx.merge(graphdef, merged)
    out = lora.save_hf(cfg, params, ad, tmp_path / "merged", scale=2.0)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    tokens, mask = padded_batch()
    ref = hf_logits(back, tokens, mask)
    assert max_real_diff(our_logits(ours, tokens, mask), ref, mask) <= TOL
    # The adapters matter: the base model's logits are far from the merged ones.
    assert max_real_diff(hf_logits(hf_model, tokens, mask), ref, mask) > 100 * TOL


def test_lora_in_trainer_updates_only_adapters():
    cfg = tiny_config(**{"optimizer.weight_decay": 0.1, "optimizer.warmup_steps": 0})
    cfg.sparsity = sparsity.config("lora", rank=4, alpha=8.0, targets=r"attn/(q|v)$")
    exp, states, losses = _stepwise(cfg, 3)
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, states[-1].params["base"], states[0].params["base"])
    assert set(states[0].params["lora"]) == {f"layers/{i}/attn/{m}" for i in (0, 1) for m in "qv"}
    assert not np.any(_flat(states[0].params["lora"])["layers/0/attn/q/b"])
    assert np.any(_flat(states[-1].params["lora"])["layers/0/attn/q/b"])
    adapters = sum(x.size for x in jax.tree.leaves(states[0].params["lora"]))
    moments = sum(x.size for x in jax.tree.leaves(states[-1].opt_state) if x.size > 1)
    assert moments == 2 * adapters  # Adam moments for the adapters only
    merged = exp.model_params(states[-1].params)
    expect = lora.merge(states[-1].params["base"], states[-1].params["lora"], scale=2.0)
    jax.tree.map(np.testing.assert_array_equal, merged, expect)
    assert lift.state_bytes(states[-1].opt_state) < 0.1 * lift.state_bytes(states[0].params["base"])


@pytest.mark.slow
def test_adapter_init_follows_the_run_seed_unless_fixed():
    """Runs with seeds 0 and 1 must not start from the same A (PEFT draws it from the trainer's
    seed); ``sparsity.seed`` fixes it across runs."""
    from curriculax.train import build

    def first_a(run_seed, **kw):
        cfg = tiny_config(seed=run_seed)
        cfg.sparsity = sparsity.config("lora", rank=4, targets=r"attn/q$", **kw)
        return np.asarray(build(cfg).init_state().params["lora"]["layers/0/attn/q"]["a"])

    a0, a1 = first_a(0), first_a(1)
    assert not np.allclose(a0, a1)
    np.testing.assert_array_equal(a0, first_a(0))
    np.testing.assert_array_equal(first_a(0, seed=5), first_a(1, seed=5))


def _model_and_adapters(dtype, pattern=r"attn/[qkvo]$|mlp/(gate|up|down)$"):
    cfg = ModelConfig.tiny(dtype=dtype, param_dtype=dtype)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    ad = lora.init(params, jax.random.PRNGKey(1), rank=4, pattern=pattern)
    return cfg, graphdef, params, ad


@pytest.mark.slow
def test_unmerged_forward_equals_merged_in_float32_values_and_adapter_grads():
    cfg, graphdef, params, ad = _model_and_adapters("float32", r"attn/[qkvo]$|mlp/(gate|up|down)$|embed")
    ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), ad)
    attached = lora.attach(params, ad, scale=2.0)
    assert isinstance(attached["layers"][0]["attn"]["o"], LowRank)
    assert isinstance(attached["layers"][1]["mlp"]["down"], LowRank)
    assert not isinstance(attached["embed"], LowRank)  # not a projection: merged
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 7), 0, cfg.vocab_size)

    def loss(adapters, fn):
        hidden = nnx.merge(graphdef, fn(params, adapters, scale=2.0))(tokens)
        return jnp.sum(jnp.sin(hidden))

    for_merged, g_merged = jax.value_and_grad(loss)(ad, lora.merge)
    for_attached, g_attached = jax.jit(jax.value_and_grad(loss), static_argnums=1)(ad, lora.attach)
    np.testing.assert_allclose(for_attached, for_merged, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
                 g_attached, g_merged)


def test_unmerged_bfloat16_projection_keeps_updates_a_merge_rounds_away():
    # A rank-1 update along the inputs' common direction: each entry (6e-5) is below half the
    # bfloat16 rounding step of most W entries (~0.06 / 256), so a merged W + dW rounds it away,
    # but its effect on the outputs (~256 coherent terms, ~1% of y) survives the output's rounding.
    from curriculax.models.layers import project

    m, n = 256, 128
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = (1.0 + 0.3 * jax.random.normal(kx, (64, m))).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (m, n)) / 16).astype(jnp.bfloat16)
    a, b = jnp.full((m, 1), 1 / 16), jnp.full((1, n), 1e-3)
    exact = x.astype(jnp.float32) @ (w.astype(jnp.float32) + a @ b)
    base = project("...i,io->...o", x, nnx.Param(w), jnp.bfloat16).astype(jnp.float32)
    merged = lora.merge({"layers": {0: {"mlp": {"down": w}}}}, {"layers/0/mlp/down": {"a": a, "b": b}},
                        scale=1.0)["layers"][0]["mlp"]["down"]
    assert float(jnp.mean(merged != w)) < 0.5  # the merge keeps it only on small entries
    y_merged = project("...i,io->...o", x, nnx.Param(merged), jnp.bfloat16).astype(jnp.float32)
    y_low = project("...i,io->...o", x, nnx.Param(LowRank(w, a, b, 1.0)), jnp.bfloat16)
    assert y_low.dtype == jnp.bfloat16
    effect = exact - x.astype(jnp.float32) @ w.astype(jnp.float32)
    err_low = float(jnp.abs((y_low.astype(jnp.float32) - base) - effect).mean())
    err_merged = float(jnp.abs((y_merged - base) - effect).mean())
    size = float(jnp.abs(effect).mean())
    assert err_low < 0.1 * size and err_merged > 0.3 * size  # measured: 2% and 45%


def test_corda_worked_examples():
    from curriculax.peft import corda

    # Example 1 (no damping): W = I, C = diag(4, 1).
    a, b, res = corda.decompose(np.eye(2), np.diag([4.0, 1.0]), 1, "ipm", damping=None)
    np.testing.assert_allclose((a @ b).T, [[1, 0], [0, 0]], atol=1e-6)  # B A in HF layout
    np.testing.assert_allclose(res.T, [[0, 0], [0, 1]], atol=1e-6)
    a, b, res = corda.decompose(np.eye(2), np.diag([4.0, 1.0]), 1, "kpm", damping=None)
    np.testing.assert_allclose((a @ b).T, [[0, 0], [0, 1]], atol=1e-6)
    # Example 2: W_hf = [[1,2],[3,4]], C = [[2,1],[1,5]]; ours is W_hf.T.
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).T
    cov = np.array([[2.0, 1.0], [1.0, 5.0]])
    a, b, res = corda.decompose(w, cov, 1, "ipm", damping=None)
    np.testing.assert_allclose((a @ b).T, [[1.3273, 1.8887], [2.8474, 4.0519]], atol=1e-4)
    np.testing.assert_allclose(res.T, [[-0.3273, 0.1113], [0.1526, -0.0519]], atol=1e-4)
    ka, kb, kres = corda.decompose(w, cov, 1, "kpm", damping=None)
    np.testing.assert_allclose(kres, a @ b, atol=1e-4)  # complements
    for mode in ("ipm", "kpm"):  # with the code's damping: still exact
        a, b, res = corda.decompose(w, cov, 1, mode)
        np.testing.assert_allclose(res + a @ b, w, atol=1e-5)
    np.testing.assert_allclose(corda.damp(cov), cov + 0.035 * np.eye(2))

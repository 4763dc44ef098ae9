"""LoRAMoE: worked examples, router, balancing loss and its gradient, the model at init, the
trainer (only the experts train; the balancing loss reaches the step's loss), export refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from curriculax import sparsity
from curriculax.models import AuxLoss, ModelConfig, Transformer, num_params, save_hf
from curriculax.models.layers import LoRAMoE
from curriculax.peft import loramoe
from curriculax.train import metrics, train

from test_sparsity import _flat, _stepwise, assert_trains_only
from test_train import tiny_config


_fwd = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw))  # one compile, not op by op


def _tokens(b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 264)


# Pure functions: the note's worked examples ------------------------------------------------------

def test_worked_example_forward():
    x = jnp.array([[1.0, 0.0]])
    router = jnp.array([[1.0, 0.0], [0.0, 0.0]]).T  # W_r [N, d_in] -> ours [d_in, N]
    a = jnp.array([[[1.0], [0.0]], [[1.0], [1.0]]])  # A_1 = [1,0], A_2 = [1,1] as [N, d_in, r]
    b = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # B_1 = [1,0]^T, B_2 = [0,1]^T as [N, r, d_out]
    np.testing.assert_allclose(loramoe.router_weights(x, router), [[0.7311, 0.2689]], atol=1e-4)
    h = loramoe.forward(x, jnp.eye(2), a, b, router, alpha=2.0, rank=1)
    np.testing.assert_allclose(h, [[2.4621, 0.5379]], atol=1e-4)


def test_worked_examples_balance_loss():
    t = jnp.array([1, 0])
    imp = jnp.array([[3.0, 1, 1, 1], [1, 1, 2, 2]])

    def lbc(i, types=t, **kw):
        return float(loramoe.balance_loss(i, types, **{"delta": 0.1, "weight": 1.0, **kw}))

    assert lbc(imp) == pytest.approx(0.344879, abs=1e-6)  # code: ddof=1, / mean^2
    assert lbc(imp, form="paper") == pytest.approx(0.467742, abs=1e-6)  # sigma^2 / mu
    assert lbc(jnp.full((2, 4), 1.5)) == pytest.approx(0.011429, abs=1e-6)  # Q itself non-uniform
    assert lbc(imp, weight=0.5) == pytest.approx(0.5 * 0.344879, abs=1e-6)
    assert lbc(imp, weight=0.0) == 0.0
    assert lbc(jnp.ones((1, 1)), jnp.array([1])) == 0.0  # batch x N = 1
    # Types select which half gets 1 + delta: swapping them changes Z.
    assert lbc(imp, jnp.array([0, 1])) != pytest.approx(lbc(imp))


def test_example_type_from_category():
    cat = jnp.array([0, 1, 2, 3, 4])
    np.testing.assert_array_equal(loramoe.example_type(cat, ()), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(loramoe.example_type(cat, (0, 4)), [1, 0, 0, 0, 1])


def test_router_weights_are_float32_and_sum_to_one():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16)).astype(jnp.bfloat16)
    w = loramoe.router_weights(x, jax.random.normal(jax.random.key(1), (16, 8)))
    assert w.dtype == jnp.float32 and w.shape == (2, 5, 8)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert float(w.min()) > 0


def test_balance_loss_gradient_matches_plain_reference():
    cfg = ModelConfig.tiny(loramoe_experts=4, loramoe_lbc_weight=0.5, loramoe_lbc_delta=0.1)
    layer = LoRAMoE(cfg, 8, 6, ("embed", "mlp"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (3, 5, 8))
    types = jnp.array([0, 1, 1])
    graphdef, state = nnx.split(layer)

    def ours(state):
        _, sown = nnx.capture(nnx.merge(graphdef, state), AuxLoss)(x, types)
        (aux,) = jax.tree.leaves(sown)
        return aux

    def reference(router):  # softmax, importance, Q, torch's unbiased variance / mean^2
        e = jnp.exp(x @ router)
        importance = (e / e.sum(-1, keepdims=True)).sum(1)
        first = np.arange(4) < 2
        matched = np.where(np.asarray(types)[:, None] == 1, first, ~first)
        z = (importance * np.where(matched, 1.1, 0.9)).ravel()
        return 0.5 * jnp.sum((z - z.mean()) ** 2) / (z.size - 1) / z.mean() ** 2

    router = state["router"][...]
    np.testing.assert_allclose(ours(state), reference(router), rtol=1e-5)
    grad = jax.grad(ours)(state)
    np.testing.assert_allclose(grad["router"][...], jax.grad(reference)(router), rtol=1e-4,
                               atol=1e-7)
    assert not np.any(grad["a"][...]) and not np.any(grad["b"][...])  # the LBC sees the router only


# The model ---------------------------------------------------------------------------------------

def test_model_at_init_equals_frozen_model():
    cfg = ModelConfig.tiny()
    plain = Transformer(cfg, rngs=nnx.Rngs(0))
    moe_cfg = cfg.replace(loramoe_experts=8, loramoe_lbc_weight=0.1, loramoe_lbc_delta=0.1)
    moe = Transformer(moe_cfg, rngs=nnx.Rngs(0))
    toks = _tokens(2, 12)
    ref = _fwd(plain, toks)
    np.testing.assert_array_equal(_fwd(moe, toks), ref)  # B = 0: bitwise the frozen model
    flat_plain = _flat(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    flat_moe = _flat(nnx.to_pure_dict(nnx.state(moe, nnx.Param)))
    for k, v in flat_plain.items():  # the adapters do not shift the base weights' rng
        np.testing.assert_array_equal(flat_moe[k], v)
    extra = sorted(set(flat_moe) - set(flat_plain))
    assert extra == sorted(f"layers/{i}/mlp/loramoe/{t}/{p}" for i in (0, 1)
                           for t in ("gate", "up", "down") for p in ("a", "b", "router"))
    assert flat_moe["layers/0/mlp/loramoe/down/a"].shape == (8, 192, 4)
    assert sum(v.size for v in flat_moe.values()) == num_params(moe_cfg)
    # Six balancing losses (2 layers x 3 projections) when categories are given, none otherwise.
    hidden, sown = nnx.capture(moe, AuxLoss)(toks, category=jnp.array([0, 1]))
    np.testing.assert_allclose(hidden, ref, atol=1e-6)  # eager vs jitted: rounding only
    assert len(jax.tree.leaves(sown)) == 6 and all(float(v) > 0 for v in jax.tree.leaves(sown))
    assert not jax.tree.leaves(nnx.capture(moe, AuxLoss)(toks)[1])
    # Nonzero experts change the output.
    moe.layers[0].mlp.loramoe["up"].b[...] = 0.1 * jnp.ones((8, 4, 192))
    assert float(jnp.abs(_fwd(moe, toks) - ref).max()) > 1e-3


def test_config_validation_and_export_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        ModelConfig.tiny(loramoe_experts=3, loramoe_lbc_weight=0.1)
    with pytest.raises(ValueError, match="loramoe_targets"):
        ModelConfig.tiny(loramoe_experts=2, loramoe_targets=("q",))
    model = Transformer(ModelConfig.tiny(loramoe_experts=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot be merged"):
        save_hf(model, model.config, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_init_params_adds_missing_experts():
    """Weights without experts (a loaded HF checkpoint) get them at the model's init."""
    cfg = tiny_config()
    cfg.sparsity = sparsity.config("loramoe", experts=2)
    moe_cfg = ModelConfig.tiny(loramoe_experts=2)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Transformer(moe_cfg, rngs=nnx.Rngs(0))), nnx.Param))
    sp = sparsity.build(cfg, abstract)
    plain = nnx.to_pure_dict(nnx.state(Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0)),
                                       nnx.Param))
    full = _flat(sp.init_params(plain, jax.random.PRNGKey(3)))
    for k, v in _flat(plain).items():
        np.testing.assert_array_equal(full[k], v)
    assert not np.any(full["layers/1/mlp/loramoe/gate/b"])
    a = full["layers/1/mlp/loramoe/down/a"]  # [N, f, r]: U(+-1/sqrt(f))
    assert a.shape == (2, 192, 4) and 0 < np.abs(a).max() <= 1 / np.sqrt(192)
    assert np.abs(full["layers/0/mlp/loramoe/up/router"]).max() <= 1 / np.sqrt(64)


# The trainer -------------------------------------------------------------------------------------

def test_trainer_updates_only_experts_and_adds_balancing_loss():
    cfg = tiny_config(**{"optimizer.weight_decay": 0.1, "optimizer.warmup_steps": 0})
    cfg.sparsity = sparsity.config("loramoe", experts=4, lbc_weight=0.1, lbc_delta=0.1)
    exp, states, losses = _stepwise(cfg, 3)
    assert exp.model_config.loramoe_experts == 4 and exp.model_config.loramoe_lbc_weight == 0.1
    assert losses[-1] < losses[0]
    assert len(assert_trains_only(states, "/loramoe/")) == 18  # Adam state for experts only
    # At init B = 0, so the task loss's gradient on the routers is exactly 0: their first Adam
    # moment after step 1 comes from the balancing loss the step added.
    mu = {k: v for k, v in _flat(states[1].opt_state).items() if "/mu/" in f"/{k}/"}
    routers = [v for k, v in mu.items() if k.endswith("router")]
    assert len(routers) == 6 and all(np.any(v) for v in routers)


@pytest.mark.slow  # ~20 s: two trainer runs; the 8-device path is also covered by test_train
def test_train_run_one_and_eight_devices(tmp_path):
    assert len(jax.devices()) >= 8
    kw = {"steps": 4, "eval_every": 4, "checkpoint_every": 4}
    runs = {"one": {}, "eight": {"mesh.num_devices": 0, "mesh.data": -1}}
    for name, mesh in runs.items():
        cfg = tiny_config(**kw, **mesh)
        cfg.sparsity = sparsity.config("loramoe", experts=4, lbc_weight=0.1, lbc_delta=0.1)
        train(cfg, tmp_path / name)
    one, eight = ([r["loss"] for r in metrics.read(tmp_path / n) if "loss" in r] for n in runs)
    assert len(one) == len(eight) == 4 and np.all(np.isfinite(one))
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_init_from_a_plain_run_adds_the_experts(tmp_path):
    """``model.init_from`` a run without experts (an SFT warm-up): its weights, new experts."""
    from curriculax.train import build, checkpoint

    plain = tiny_config(**{"steps": 1, "eval_every": 1, "checkpoint_every": 1})
    train(plain, tmp_path / "sft")
    cfg = tiny_config(**{"steps": 1})
    cfg.model.init_from = str(tmp_path / "sft")
    cfg.sparsity = sparsity.config("loramoe", experts=2)
    params = _flat(build(cfg).init_state().params)
    exp = build(plain)
    mngr = checkpoint.manager(tmp_path / "sft", async_save=False)
    sft = _flat(checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings)[0].params)
    for k, v in sft.items():
        np.testing.assert_array_equal(params[k], v)
    assert not np.any(params["layers/0/mlp/loramoe/up/b"])
    assert np.any(params["layers/0/mlp/loramoe/up/a"])

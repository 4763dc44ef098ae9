"""DPO, SPIN and NFT on the worked numbers of ../shared/methods/{dpo_spin,token_weighting}.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculax.rl import base, dpo, nft, spin

# ---------------------------------------------------------------- DPO / SPIN


def _dpo(pc, pr, rc, rr, **kw):
    return dpo.loss(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32),
                    jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32), **kw)


def test_dpo_example_1_value_metrics_and_grad():
    loss, m = _dpo([-10.0], [-12.0], [-11.0], [-11.0], beta=0.1)
    np.testing.assert_allclose(loss, 0.5981389, rtol=1e-6)
    np.testing.assert_allclose(m["reward_chosen"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(m["reward_rejected"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(m["reward_margin"], 0.2, rtol=1e-6)
    assert float(m["reward_accuracy"]) == 1.0
    # z = pc - rc - (pr - rr): dL/dpc = dL/dz, dL/dpr = -dL/dz, and no gradient through metrics.
    g = jax.grad(lambda pc, pr: _dpo(pc, pr, [-11.0], [-11.0], beta=0.1)[0], argnums=(0, 1))(
        jnp.array([-10.0]), jnp.array([-12.0]))
    np.testing.assert_allclose(g[0], [-0.0450166], rtol=1e-5)
    np.testing.assert_allclose(g[1], [0.0450166], rtol=1e-5)


def test_policy_equal_reference_gives_log2():
    s = jax.random.normal(jax.random.key(0), (2, 5)) * 30.0
    loss, m = _dpo(s[0], s[1], s[0], s[1], beta=0.1)
    np.testing.assert_allclose(loss, 0.6931472, rtol=1e-6)
    assert float(m["reward_accuracy"]) == 0.0 and float(m["reward_margin"]) == 0.0
    # SPIN iteration start: policy initialized at the opponent, same value.
    np.testing.assert_allclose(spin.loss(s[0], s[1], s[0], s[1])[0], 0.6931472, rtol=1e-6)


def test_pair_loss_weights():
    """A curriculum's per-pair weights: mean(w * loss); the metrics stay unweighted."""
    pc, pr, rc, rr = ([-10.0, -5.0], [-12.0, -5.0], [-11.0, -5.0], [-11.0, -5.0])
    (l0, _), (l1, m1) = _dpo(pc, pr, rc, rr), _dpo(pc, pr, rc, rr, weights_B=jnp.array([1.5, 0.5]))
    np.testing.assert_allclose(l0, (0.5981389 + np.log(2.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(l1, (1.5 * 0.5981389 + 0.5 * np.log(2.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(m1["reward_margin"], 0.1, rtol=1e-6)
    args = [jnp.array([v, v]) for v in (-20.0, -15.0, -22.0, -14.0)]
    np.testing.assert_allclose(spin.loss(*args, weights_B=jnp.array([2.0, 0.0]))[0], 0.5543552, rtol=1e-6)


def test_spin_example_3_sigmoid_and_hinge():
    args = [jnp.array([v]) for v in (-20.0, -15.0, -22.0, -14.0)]
    np.testing.assert_allclose(spin.loss(*args, beta=0.1)[0], 0.5543552, rtol=1e-6)
    np.testing.assert_allclose(spin.loss(*args, beta=0.1, kind="hinge")[0], 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="rl.spin_loss.*'ipo'"):
        spin.loss(*args, kind="ipo")


def test_label_smoothing_hinge_ipo_formulas():
    # Example 1 (z = 2, beta z = 0.2), eps = 0.2: 0.8 * 0.5981389 + 0.2 * (0.2 + 0.5981389).
    args = ([-10.0], [-12.0], [-11.0], [-11.0])
    np.testing.assert_allclose(_dpo(*args, beta=0.1, label_smoothing=0.2)[0], 0.6381389,
                               rtol=1e-6)
    np.testing.assert_allclose(_dpo(*args, beta=0.1, kind="hinge")[0], 0.8, rtol=1e-6)
    np.testing.assert_allclose(_dpo(*args, beta=0.1, kind="ipo")[0], 9.0, rtol=1e-6)  # (2-5)^2
    # Two pairs, z = [2, -1], beta 0.5: IPO mean((2-1)^2, (-1-1)^2) = 2.5; hinge mean(0, 1.5).
    two = ([0.0, 0.0], [-2.0, 1.0], [0.0, 0.0], [0.0, 0.0])
    np.testing.assert_allclose(_dpo(*two, beta=0.5, kind="ipo")[0], 2.5, rtol=1e-6)
    np.testing.assert_allclose(_dpo(*two, beta=0.5, kind="hinge")[0], 0.75, rtol=1e-6)
    _, m = _dpo(*two, beta=0.5)
    np.testing.assert_allclose(m["reward_accuracy"], 0.5)
    np.testing.assert_allclose(m["reward_margin"], 0.25, rtol=1e-6)  # 0.5 * mean(2, -1)
    with pytest.raises(ValueError, match="rl.dpo_kind.*'sigmoid', 'hinge', 'ipo'"):
        _dpo(*two, kind="kto")


def test_dpo_grad_matches_explicit_formula_and_is_stable():
    pc, pr, rc, rr = np.random.default_rng(0).normal(size=(4, 6)) * 20.0
    beta, eps = 0.3, 0.1

    def f(pc, pr):
        return _dpo(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0]

    g_c, g_r = jax.grad(f, argnums=(0, 1))(jnp.asarray(pc, jnp.float32),
                                           jnp.asarray(pr, jnp.float32))
    z = (pc - rc) - (pr - rr)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    dz = (-(1 - eps) * beta * sig(-beta * z) + eps * beta * sig(beta * z)) / len(z)
    np.testing.assert_allclose(g_c, dz, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_r, -dz, rtol=1e-5, atol=1e-8)
    # Huge margins: log_sigmoid keeps the value and gradient finite (log(sigmoid) would be -inf).
    loss, grad = jax.value_and_grad(lambda p: _dpo(p, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0],
                                                   beta=1.0)[0])(jnp.array([1e4, -1e4]))
    np.testing.assert_allclose(loss, 5000.0, rtol=1e-6)  # mean(0, 1e4)
    np.testing.assert_allclose(grad, [0.0, -0.5], atol=1e-7)


def test_sequence_logprob_masks_prompt_and_padding():
    lp = jnp.array([[-9.0, -1.0, -2.0, -jnp.inf], [jnp.nan, -0.5, -0.5, -0.5]])
    mask = jnp.array([[0, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_allclose(dpo.sequence_logprob(lp, mask), [-3.0, -1.5])  # sum, no mean
    g = jax.grad(lambda x: dpo.sequence_logprob(x, mask).sum())(lp)
    np.testing.assert_array_equal(g, mask.astype(np.float32))


def test_spin_iteration_helpers_and_configs():
    steps = jnp.arange(7)
    np.testing.assert_array_equal(jax.jit(spin.iteration, static_argnums=1)(steps, 3),
                                  [0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(jax.jit(spin.is_iteration_start, static_argnums=1)(steps, 3),
                                  [1, 0, 0, 1, 0, 0, 1])
    c = spin.default_config()
    assert (c.beta, c.kind, c.learning_rate, c.global_batch_size) == (0.1, "sigmoid", 5e-7, 64)
    d = dpo.default_config()
    assert (d.beta, d.label_smoothing, d.kind) == (0.1, 0.0, "sigmoid")


# ---------------------------------------------------------------- NFT


def _nft_reference(logp, old, correct, r_q, eps_neg=1.0, neg_weight=1.0):
    """The repo's formula written literally (clamp_preserve_grad, exp then log)."""
    r = jnp.clip(r_q, 0.02, 0.98)[:, None]
    ratio = jnp.exp(jnp.minimum(logp - old, 10.0))
    proxy = (1.0 - r * ratio) / (1.0 - r)
    clamped = proxy + jax.lax.stop_gradient(jnp.maximum(proxy, eps_neg) - proxy)
    neg = -jnp.log(clamped)
    pos = -jnp.log(ratio)
    c = correct.astype(jnp.float32)[:, None]
    return (1.0 - r) * (neg * (1.0 - c) * neg_weight + c * pos)


def _nft_with_grad(log_ratio, correct, r_q, **kw):
    """Token losses and dL/dR (= dL/dlogp / R) for a [B, T] of log-ratios against old = 0."""
    lr = jnp.asarray(log_ratio, jnp.float32)
    old = jnp.zeros_like(lr)
    c, r = jnp.asarray(correct), jnp.asarray(r_q, jnp.float32)
    loss = nft.nft_token_loss(lr, old, c, r, **kw)
    dlogp = jax.grad(lambda x: nft.nft_token_loss(x, old, c, r, **kw).sum())(lr)
    return loss, dlogp / jnp.exp(lr)


def test_nft_example_1_on_policy():
    loss, d_r = _nft_with_grad([[0.0], [0.0]], [True, False], [0.25, 0.25])
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    np.testing.assert_allclose(d_r[:, 0], [-0.75, 0.25], rtol=1e-6)  # GRPO's (1-r), -r


def test_nft_example_2_clamped_and_unclamped():
    lr = np.log([[0.8], [1.2]])
    loss, d_r = _nft_with_grad(lr, [True, False], [0.5, 0.5])
    np.testing.assert_allclose(loss[:, 0], [0.111572, 0.0], rtol=1e-5, atol=1e-7)
    # Forward clamped 0.8 -> 1.0, backward divides by the clamped value: 0.5 * (0.5/0.5) / 1.0.
    np.testing.assert_allclose(d_r[1, 0], 0.5, rtol=1e-5)
    np.testing.assert_allclose(d_r[0, 0], -0.5 / 0.8, rtol=1e-5)  # 0.5 * d(-ln R)/dR
    loss, d_r = _nft_with_grad(lr, [True, False], [0.5, 0.5], eps_neg=1e-6)
    np.testing.assert_allclose(loss[:, 0], [0.111572, 0.111572], rtol=1e-5)
    np.testing.assert_allclose(d_r[1, 0], 0.5 / 0.8, rtol=1e-5)


def test_nft_nonpositive_proxy_is_finite():
    # r_q = 0.5, R = 3: proxy = -1; r_q = 0.98, R = e^5: proxy ~ -7223; R = e^30 is capped at e^10.
    lr = jnp.array([[np.log(3.0), 5.0, 30.0]] * 2)
    for eps in (1.0, 1e-6):
        loss, d_r = _nft_with_grad(lr, [False, False], [0.5, 0.98], eps_neg=eps)
        assert np.isfinite(loss).all() and np.isfinite(d_r).all()
    loss, d_r = _nft_with_grad(lr, [False, False], [0.5, 0.98], eps_neg=1e-6)
    # value (1 - r) * -ln(1e-6); gradient (1 - r) * r / (1 - r) / 1e-6 = r / 1e-6 per unit R.
    np.testing.assert_allclose(loss[0], 0.5 * -np.log(1e-6), rtol=1e-5)
    np.testing.assert_allclose(loss[1], 0.02 * -np.log(1e-6), rtol=1e-5)
    np.testing.assert_allclose(d_r[0, 0], 0.5 / 1e-6, rtol=1e-4)
    np.testing.assert_allclose(d_r[1, 1], 0.98 / 1e-6, rtol=1e-4)
    assert float(d_r[0, 2]) == 0.0  # log-ratio above max_log_ratio: no gradient (min(., 10))
    loss, d_r = _nft_with_grad(lr, [False, False], [0.5, 0.98])  # eps_neg = 1: value 0
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    np.testing.assert_allclose(d_r[0, 0], 0.5, rtol=1e-5)


def test_nft_matches_literal_reference_and_finite_differences():
    k = jax.random.split(jax.random.key(1), 3)
    logp = jax.random.normal(k[0], (4, 6)) * 0.5 - 1.0
    old = jax.random.normal(k[1], (4, 6)) * 0.5 - 1.0
    correct = jnp.array([True, False, True, False])
    r_q = jnp.array([0.25, 0.75, 1.0, 0.0])  # last two exercise the [0.02, 0.98] clamp
    # Small eps_neg is left to the finite differences below: the literal x + sg(clamp(x) - x)
    # loses digits in float32 when x is far below eps_neg.
    for eps, w in ((1.0, 1.0), (0.25, 1.0), (0.5, 0.3)):
        kw = dict(eps_neg=eps, neg_weight=w)
        ours = lambda x: nft.nft_token_loss(x, old, correct, r_q, **kw)  # noqa: E731, B023
        ref = lambda x: _nft_reference(x, old, correct, r_q, eps, w)  # noqa: E731, B023
        np.testing.assert_allclose(ours(logp), ref(logp), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(jax.grad(lambda x: ours(x).sum())(logp),
                                   jax.grad(lambda x: ref(x).sum())(logp), rtol=1e-4, atol=1e-6)
    # Central differences of single (elementwise) token losses wherever nothing is clamped.
    eps = 1e-6
    f = lambda x: nft.nft_token_loss(x, old, correct, r_q, eps_neg=eps)  # noqa: E731
    g = np.asarray(jax.grad(lambda x: f(x).sum())(logp))
    r = np.clip(np.asarray(r_q), 0.02, 0.98)[:, None]
    proxy = (1 - r * np.exp(np.asarray(logp - old))) / (1 - r)
    free = np.asarray(correct)[:, None] | (proxy > 0.3)
    assert free.sum() >= 16
    x = np.asarray(logp)
    for i, j in zip(*np.nonzero(free)):
        h = np.zeros_like(x)
        h[i, j] = 3e-3
        fd = (float(f(jnp.asarray(x + h))[i, j]) - float(f(jnp.asarray(x - h))[i, j])) / 6e-3
        np.testing.assert_allclose(g[i, j], fd, rtol=2e-3, atol=1e-5)


def test_nft_rft_clamp_and_registered_token_loss():
    lr = np.log([[0.8], [1.2]])
    loss, d_r = _nft_with_grad(lr, [True, False], [1.0, 0.5], neg_weight=0.0)  # RFT
    np.testing.assert_allclose(loss[:, 0], [0.02 * -np.log(0.8), 0.0], rtol=1e-5, atol=1e-8)
    assert float(d_r[1, 0]) == 0.0
    with pytest.raises(ValueError, match="rl.nft_neg_weight"):
        nft.nft_token_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.array([True]),
                           jnp.array([0.5]), neg_weight=-1.0)
    assert "nft" in base.names()
    policy = base.get("nft")
    cfg = policy.default_config()
    assert (cfg.loss, cfg.nft_eps_neg, cfg.nft_neg_weight) == ("nft", 1.0, 1.0)
    cfg.nft_eps_neg = 1e-6
    sig = base.Signals(advantage=jnp.zeros(2), reward=jnp.array([1.0, 0.0]),
                       correct=jnp.array([True, False]), group_accuracy=jnp.array([0.5, 0.5]))
    out = jax.jit(lambda lp: policy.token_loss(lp, jnp.zeros_like(lp), sig, cfg))(
        jnp.asarray(lr, jnp.float32))
    np.testing.assert_allclose(out[:, 0], [0.111572, 0.111572], rtol=1e-5)


def test_pair_bank_keeps_every_pair_with_repeated_ids():
    """Several pairs may share a record id (one prompt, several preference pairs): every pair is
    kept and each chosen response is paired with the rejected response of the same record."""
    import ml_collections

    from curriculax.data.bank import ExampleBank
    from curriculax.data.tokenizer import ByteTokenizer
    from curriculax.rl.preference import pair_bank

    tok = ByteTokenizer()
    rec = lambda i, p, c, r: dict(id=i, prompt=p, response=c, rejected=r, answer=c,  # noqa: E731
                                  category="a", difficulty=1)
    recs = [rec("q1", "2+2?", "4", "5"), rec("q1", "2+2?", "four", "22"),
            rec("q2", "3+3?", "6", "7"), rec("q2", "5+5?", "10", "x" * 60)]
    text = lambda row: tok.decode([int(t) for t in row if t != tok.pad_id])  # noqa: E731
    for overflow, n_pairs in (("truncate", 4), ("drop", 3)):
        cfg = ml_collections.ConfigDict(dict(data=dict(seq_len=24, template="plain",
                                                       overflow=overflow)))
        pairs, kept = pair_bank(ExampleBank.build(recs, tok, 24, overflow=overflow), tok, cfg)
        assert pairs.chosen.tokens.shape[0] == n_pairs == len(kept.records)
        for i, r in enumerate(kept.records):
            assert text(pairs.chosen.tokens[i]).startswith(r["prompt"] + "\n" + r["response"][:1])
            assert text(pairs.rejected.tokens[i]).startswith(r["prompt"] + "\n" + r["rejected"][:1])


def test_nft_default_config_selects_the_repo_reduction_and_answer_tags_ignore_case():
    from curriculax.rl import curr_reft

    assert nft.default_config().aggregation == "seq_sum_norm"
    assert curr_reft.judge_reward("<ANSWER>no</ANSWER> (I first thought yes)", {"answer": "no"}) == 1.0


def test_every_nft_setting_is_a_config_field():
    """`--config.rl.nft_r_min=...` is refused as unknown unless rl_config() lists the field."""
    from curriculax.train.config import rl_config

    fields = rl_config()
    for key, value in nft.default_config().items():
        assert key in fields, key
        if key.startswith("nft_"):
            assert fields[key] == value, key  # same defaults as the module's

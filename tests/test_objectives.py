"""Objectives (issue 6): worked examples from shared/methods, gradients, OTR unbiasedness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculax import objectives
from curriculax.data.bank import Batch
from curriculax.kernels import LMHeadStats, fused_lm_head
from curriculax.objectives import asft, dft, otr, token_weighted

Z = jnp.array([[2.0, 1.0, 0.0]])  # logits of the worked examples; pi = [0.665241, 0.244728, 0.090031]
EYE = jnp.eye(3)
PI = np.array([0.665241, 0.244728, 0.090031])
LOG_PI = np.array([-0.407606, -1.407606, -2.407606])


def _batch(targets, loss_mask, reasoning_mask=None):
    targets = jnp.asarray(targets, jnp.int32)
    b, t = targets.shape
    zeros = jnp.zeros((b,), jnp.int32)
    rm = jnp.zeros((b, t), bool) if reasoning_mask is None else jnp.asarray(reasoning_mask, bool)
    return Batch(tokens=targets, targets=targets, loss_mask=jnp.asarray(loss_mask, bool),
                 reasoning_mask=rm, prompt_len=zeros, category=zeros, difficulty=zeros,
                 example_id=zeros)


def _stats(**kw):
    base = dict(target_logprob=None, lse=None, entropy=None, max_logprob=None)
    base.update(kw)
    return LMHeadStats(**base)


def test_every_module_has_a_complete_default_config():
    for cfg in (dft.default_config(), asft.default_config(), otr.default_config(),
                token_weighted.default_config(), token_weighted.default_config("ref_confidence"),
                objectives.ul2.objective_config()):
        assert {"name", "normalization", "impl"} <= set(cfg.keys())
        objectives.get(cfg.name)  # registered


# ---------------------------------------------------------------- DFT
@pytest.mark.parametrize("impl", ["xla_naive", "xla_chunked"])
def test_dft_worked_example_value_and_logit_gradient(impl):
    def loss(z):
        return dft.dft_token_loss(fused_lm_head(z, EYE, jnp.array([0]), impl=impl).target_logprob).sum()

    np.testing.assert_allclose(loss(Z), 0.271156, atol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(Z)[0], [-0.222695, 0.162803, 0.059892], atol=1e-6)


def test_dft_gradient_is_minus_p_grad_logp_not_grad_of_p_logp():
    z = jnp.array([[0.3, -1.2, 2.0, 0.7, -0.1]])
    y = jnp.array([3])
    lp = lambda z: jax.nn.log_softmax(z)[0, y[0]]  # noqa: E731
    got = jax.grad(lambda z: dft.dft_token_loss(lp(z)))(z)
    p = jnp.exp(lp(z))
    np.testing.assert_allclose(got, -p * jax.grad(lp)(z), rtol=1e-6)
    no_sg = jax.grad(lambda z: -jnp.exp(lp(z)) * lp(z))(z)  # same value, different gradient
    assert not np.allclose(got, no_sg, atol=1e-3)
    # Finite differences of the surrogate -sg(p) log p with p frozen.
    eps, e = 1e-3, np.eye(5)
    fd = [float(-p * (lp(z + eps * e[i]) - lp(z - eps * e[i])) / (2 * eps)) for i in range(5)]
    np.testing.assert_allclose(got[0], fd, atol=1e-4)


def test_dft_token_mean_over_response_tokens():
    # one masked prompt token, then target probabilities 0.9 and 0.1 (dft.md example 2)
    lp = jnp.log(jnp.array([[0.5, 0.9, 0.1]]))
    mask = jnp.array([[False, True, True]])
    loss = dft.token_loss(_stats(target_logprob=lp), None, dft.default_config())
    denom = objectives.normalizer(mask, "token")
    np.testing.assert_allclose(objectives.reduce_loss(loss, mask, jnp.ones(1), denom, "token"),
                               0.162541, atol=1e-6)
    sft = objectives.reduce_loss(-lp, mask, jnp.ones(1), denom, "token")
    np.testing.assert_allclose(sft, 1.203973, atol=1e-6)


# ---------------------------------------------------------------- ASFT
def _asft_loss(z, ref_hidden, kl_weight, where=None, y=None):
    y = jnp.zeros((z.shape[0],), jnp.int32) if y is None else y
    s = fused_lm_head(z, EYE, y, where=where, ref_hidden=ref_hidden, ref_weight=EYE,
                      **asft.kernel_options(asft.default_config()))
    return asft.asft_token_loss(s.target_logprob, s.kl_to_ref, kl_weight), s


def test_asft_worked_example_forward_kl():
    ref = jnp.ones((1, 3))  # uniform reference
    for lam, want in ((0.05, 0.286606), (0.1, 0.302056)):
        loss, s = _asft_loss(Z, ref, lam)
        np.testing.assert_allclose(s.kl_to_ref, [0.308994], atol=1e-6)
        np.testing.assert_allclose(loss, [want], atol=1e-6)
    dkl = jax.grad(lambda z: _asft_loss(z, ref, 1.0)[0].sum() - dft.dft_token_loss(
        fused_lm_head(z, EYE, jnp.array([0])).target_logprob).sum())(Z)
    np.testing.assert_allclose(dkl[0], [0.331908, -0.088605, -0.243303], atol=1e-6)
    assert asft.default_config().kl_weight == 0.05


def test_asft_equals_dft_at_initialization_and_masks_prompt_kl():
    loss, _ = _asft_loss(Z, Z, 0.05)  # theta == ref
    np.testing.assert_allclose(loss, [0.271156], atol=1e-6)
    g_asft = jax.grad(lambda z: _asft_loss(z, Z, 0.05)[0].sum())(Z)
    g_dft = jax.grad(lambda z: dft.dft_token_loss(
        fused_lm_head(z, EYE, jnp.array([0])).target_logprob).sum())(Z)
    np.testing.assert_allclose(g_asft, g_dft, atol=1e-6)
    # 3 prompt positions (masked) + 2 response positions: prompt KL must not contribute.
    z = jnp.concatenate([jnp.tile(Z, (3, 1)) * 5, jnp.tile(Z, (2, 1))])
    where = jnp.array([False] * 3 + [True] * 2)
    loss, s = _asft_loss(z, jnp.ones((5, 3)), 0.05, where=where)
    np.testing.assert_allclose(s.kl_to_ref[:3], 0.0)
    np.testing.assert_allclose(loss[3:], 0.286606, atol=1e-6)
    mask = where[None]
    total = objectives.reduce_loss(loss[None], mask, jnp.ones(1),
                                   objectives.normalizer(mask, "token"), "token")
    np.testing.assert_allclose(total, 0.286606, atol=1e-6)


# ---------------------------------------------------------------- OTR
def _otr_fixed(samples, beta, baseline="none"):
    """OTR loss of K fixed samples at one position (the note's K-sample average)."""
    def loss(z):
        logp = jax.nn.log_softmax(z[0])
        a = jnp.asarray(samples)
        return otr.otr_token_loss(a, logp[a], jnp.zeros_like(a), jnp.full(a.shape, logp[0]),
                                  penalty_incorrect=beta, baseline=baseline).mean()
    return loss


def test_otr_worked_examples_with_fixed_samples():
    np.testing.assert_allclose(_otr_fixed([0, 1, 0, 2], 0.1)(Z), 0.108423, atol=1e-6)
    np.testing.assert_allclose(_otr_fixed([0, 1, 0, 2], 0.0)(Z), 0.203803, atol=1e-6)
    np.testing.assert_allclose(jax.grad(_otr_fixed([0, 1, 0, 2], 0.1))(Z)[0],
                               [-0.200642, 0.135128, 0.065514], atol=1e-6)
    np.testing.assert_allclose(_otr_fixed([1, 1, 2, 2], 0.0)(Z), 0.0, atol=1e-7)
    np.testing.assert_allclose(jax.grad(_otr_fixed([1, 1, 2, 2], 0.0))(Z), 0.0, atol=1e-7)
    np.testing.assert_allclose(_otr_fixed([1, 1, 2, 2], 0.1)(Z), -0.190761, atol=1e-6)


@pytest.mark.parametrize("beta,baseline", [(0.0, "none"), (0.1, "none"), (0.1, "expected")])
def test_otr_estimator_is_unbiased_on_a_5_token_vocabulary(beta, baseline):
    """Monte Carlo over in-kernel Gumbel-max samples vs the exact expectation
    E[grad l] = (r_c + beta) * p_y * (pi - onehot(y)) = (r_c + beta) x the DFT logit gradient."""
    n, y = 40000, 2
    z = jnp.array([0.5, -0.3, 1.0, 0.2, -1.0])
    pi = jax.nn.softmax(z)
    cfg = otr.default_config()
    cfg.penalty_incorrect, cfg.baseline = beta, baseline
    targets = jnp.full((n,), y, jnp.int32)

    def loss(h):
        s = fused_lm_head(h, jnp.eye(5), targets, sample_rng=jax.random.PRNGKey(3),
                          **otr.kernel_options(cfg))
        batch = _batch(targets[None], jnp.ones((1, n), bool))
        s2 = jax.tree.map(lambda x: x[None], s)
        return otr.token_loss(s2, batch, cfg).sum(), s.sampled_token

    grads, tokens = jax.grad(loss, has_aux=True)(jnp.tile(z, (n, 1)))
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    np.testing.assert_allclose(freq, pi, atol=5 * np.sqrt(0.25 / n))  # samples follow pi
    exact = (1.0 + beta) * pi[y] * (pi - jax.nn.one_hot(y, 5))
    mean, se = grads.mean(0), grads.std(0) / np.sqrt(n)
    assert np.all(np.abs(mean - exact) < 5 * se + 1e-4), (mean, exact, se)


def test_otr_expected_baseline_reduces_variance():
    z = jnp.tile(jnp.array([0.5, -0.3, 1.0, 0.2, -1.0]), (20000, 1))
    targets = jnp.full((20000,), 2, jnp.int32)

    def per_row_grads(baseline):
        cfg = otr.default_config()
        cfg.baseline = baseline

        def loss(h):
            s = fused_lm_head(h, jnp.eye(5), targets, sample_rng=jax.random.PRNGKey(0))
            s2 = jax.tree.map(lambda x: x[None], s)
            return otr.token_loss(s2, _batch(targets[None], jnp.ones((1, 20000), bool)), cfg).sum()
        return jax.grad(loss)(z)

    assert per_row_grads("expected").var(0).sum() < per_row_grads("none").var(0).sum()


# ---------------------------------------------------------------- token weighting
def test_pkt_weights_worked_examples():
    # Example A: |K|=2, |P|=5, |O|=30 with CE 2.0 / 1.0 / 0.5 -> 56/53 (P keeps weight 1).
    key = jnp.array([[True] * 2 + [False] * 35])
    mask = jnp.ones_like(key)
    w = token_weighted.pkt_weights(key, mask, 9.0)
    np.testing.assert_allclose(w[0, :3], [9.0, 9.0, 1.0])
    ce = jnp.array([[2.0] * 2 + [1.0] * 5 + [0.5] * 30])
    w = token_weighted.renormalize_rows(w, mask)
    loss = objectives.reduce_loss(w * ce, mask, jnp.ones(1), objectives.normalizer(mask, "sequence"),
                                  "sequence")
    np.testing.assert_allclose(loss, 56 / 53, rtol=1e-6)
    # the same row with P marked and a cap that does not bind: w = |O| / |K| = 15, not 35 / 2
    param = jnp.array([[False] * 2 + [True] * 5 + [False] * 30])
    w = token_weighted.pkt_weights(key, mask, 100.0, param)
    np.testing.assert_allclose(w[0, :3], [15.0, 15.0, 1.0])
    loss = objectives.reduce_loss(token_weighted.renormalize_rows(w, mask) * ce, mask, jnp.ones(1),
                                  objectives.normalizer(mask, "sequence"), "sequence")
    np.testing.assert_allclose(loss, (15 * 4 + 5 + 15) / (30 + 5 + 30), rtol=1e-6)
    # Example B.
    k4 = jnp.array([[True] * 4 + [False] * 20])
    assert float(token_weighted.pkt_weights(k4, jnp.ones_like(k4))[0, 0]) == 5.0
    k3 = jnp.array([[True] * 3 + [False] * 3])
    assert float(token_weighted.pkt_weights(k3, jnp.ones_like(k3))[0, 0]) == 1.0


def test_key_tokens_are_first_response_token_and_answer_line():
    # positions: 0-1 prompt targets, 2-5 reasoning targets, 6-8 answer line + eos, 9 pad
    loss_mask = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], bool)
    # tokens[i] in the reasoning span for i = 2..5  (targets 1..4 are reasoning tokens... shifted)
    reasoning = jnp.array([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0]], bool)
    batch = _batch(jnp.arange(10)[None], loss_mask, reasoning)
    key = token_weighted.key_token_mask(batch)
    # target i is reasoning iff reasoning[i+1]: targets 1..4 reasoning; 1 is the first response token
    np.testing.assert_array_equal(key[0], [0, 1, 0, 0, 0, 1, 1, 1, 1, 0])
    ids = token_weighted.key_token_mask(batch, "ids", (3, 4))
    np.testing.assert_array_equal(ids[0], [0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    # through the config, targets 5, 6 as parameter tokens: |K| = 2, |P| = 2, |O| = 4 -> w_K = 2
    cfg = token_weighted.default_config()
    cfg.update(key_tokens="ids", key_token_ids=(3, 4), param_token_ids=(5, 6), renormalize=False)
    w = token_weighted.token_weights(_stats(target_logprob=jnp.zeros((1, 10))), batch, cfg)
    np.testing.assert_array_equal(w[0] * loss_mask[0], [0, 1, 1, 2, 2, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("fn", ["loss", "focal", "entropy", "ref_confidence"])
def test_weight_functions_are_detached_and_renormalized(fn):
    lp = jnp.log(jnp.array([[0.9, 0.5, 0.1, 0.3]]))
    ent = jnp.array([[0.2, 1.0, 2.0, 0.0]])
    ref_lp = jnp.log(jnp.array([[0.8, 0.4, 0.05, 0.5]]))
    mask = jnp.array([[True, True, True, False]])
    batch = _batch(jnp.zeros((1, 4), jnp.int32), mask)
    cfg = token_weighted.default_config(fn)
    stats = objectives.attach(_stats(target_logprob=lp, entropy=ent), ref_target_logprob=ref_lp)
    w = token_weighted.token_weights(stats, batch, cfg)
    raw = {"loss": -lp, "focal": (1 - jnp.exp(lp)) ** 2, "entropy": ent, "ref_confidence": jnp.exp(ref_lp)}[fn]
    want = raw[0, :3] * 3 / raw[0, :3].sum()
    np.testing.assert_allclose(w[0, :3], want, rtol=1e-5)
    # the loss gradient is -w * grad(lp): weights carry no gradient
    g = jax.grad(lambda lp: (token_weighted.token_loss(
        objectives.attach(_stats(target_logprob=lp, entropy=ent), ref_target_logprob=ref_lp),
        batch, cfg) * mask).sum())(lp)
    np.testing.assert_allclose(g[0, :3], -want, rtol=1e-5)

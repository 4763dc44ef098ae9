"""GRPO formulas on the worked numbers of ../shared/methods/grpo.md, and rollout invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from curriculax.models import ModelConfig, Transformer, decode
from curriculax.rl import grpo
from curriculax.rl.rollout import left_pad_prompts, rollout, sequences


def test_advantages_worked_numbers():
    a = grpo.advantages(jnp.array([[1.0, 0, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]]))
    np.testing.assert_allclose(a[0], [0.8660239, -0.8660239, -0.8660239, 0.8660239], rtol=1e-6)
    np.testing.assert_allclose(a[1], [1.499997, -0.499999, -0.499999, -0.499999], rtol=1e-6)
    np.testing.assert_array_equal(a[2], 0.0)  # all-equal group: no signal, no NaN
    trl = grpo.advantages(jnp.array([[1.0, 0, 0, 1]]), 1e-4)
    np.testing.assert_allclose(trl[0], [0.8658754, -0.8658754, -0.8658754, 0.8658754], rtol=1e-6)
    pop = grpo.advantages(jnp.array([[1.0, 0, 0, 1]]), std="population")
    np.testing.assert_allclose(pop[0], [0.999998, -0.999998, -0.999998, 0.999998], rtol=1e-6)
    none = grpo.advantages(jnp.array([[1.0, 0, 0, 0]]), std="none")
    np.testing.assert_allclose(none[0], [0.75, -0.25, -0.25, -0.25])
    # float32 leaves r - mean(r) ~ 1e-7 in these all-equal groups: still exactly 0, not ~0.1
    for r, g in ((3.0, 7), (1.5, 7), (0.7, 8), (0.1, 8)):
        for std in grpo.STD_MODES:
            np.testing.assert_array_equal(grpo.advantages(jnp.full((1, g), r), std=std), 0.0)
    # a group of one: mu = 0, sigma = 1 (verl)
    np.testing.assert_allclose(grpo.advantages(jnp.array([[1.0], [0.0]]))[:, 0], [1 / (1 + 1e-6), 0.0])
    np.testing.assert_array_equal(grpo.advantages(jnp.array([[2.0]]), std="none"), [[2.0]])
    with pytest.raises(ValueError, match="rl.advantage_std"):
        grpo.advantages(jnp.ones((1, 2)), std="mad")


def test_clipped_loss_worked_numbers():
    rho = jnp.array([0.7, 1.0, 1.3, 1.25, 4.0])
    logp = jnp.log(rho)[None]
    old = jnp.zeros_like(logp)

    def loss(a, **kw):
        return grpo.clipped_token_loss(logp, old, jnp.array([a]), **kw)[0]

    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    np.testing.assert_allclose(loss(1.0, **kw), [-0.7, -1.0, -1.28, -1.25, -1.28], rtol=1e-6)
    np.testing.assert_allclose(loss(-1.0, **kw), [0.8, 1.0, 1.3, 1.25, 3.0], rtol=1e-6)
    np.testing.assert_allclose(loss(-0.5, **kw), [0.4, 0.5, 0.65, 0.625, 1.5], rtol=1e-6)
    np.testing.assert_allclose(loss(1.0), [-0.7, -1.0, -1.2, -1.2, -1.2], rtol=1e-6)


def test_dual_clip_at_most_one_is_refused():
    # c <= 1 made min(l, -A c) = -A c a constant for every A < 0 token at rho ~ 1: negative
    # advantages silently stopped contributing gradient (verl asserts clip_ratio_c > 1).
    lp = jnp.zeros((1, 3))
    with pytest.raises(ValueError, match=r"rl\.dual_clip=0\.5"):
        grpo.clipped_token_loss(lp, lp, jnp.array([-1.0]), dual_clip=0.5)
    grpo.clipped_token_loss(lp, lp, jnp.array([-1.0]), dual_clip=3.0)


def test_kl_k3_worked_numbers():
    kl = grpo.kl_k3(jnp.array([-1.0, -2.0, -3.0]), jnp.array([-1.5, -1.0, -3.0]))
    np.testing.assert_allclose(kl, [0.1065307, np.e - 2, 0.0], rtol=1e-6, atol=1e-7)


def test_aggregation_worked_numbers():
    loss = jnp.array([[1.0, 1.0, 9.0, 9.0], [0.5, 0.5, 0.5, 0.5]])  # 9s are padding
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    expect = {"token_mean": 4 / 6, "seq_mean_token_mean": 0.75, "seq_mean_token_sum": 2.0,
              "dr_grpo": 0.5, "seq_sum_norm": 1.0}
    for mode, value in expect.items():
        np.testing.assert_allclose(grpo.aggregate(loss, mask, mode), value, rtol=1e-6)
    # ReLIFT's example 3: sum / T_max
    relift = jnp.array([[0.2, 0.2, 0, 0], [-0.1, -0.1, -0.1, 0]])
    rmask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    np.testing.assert_allclose(grpo.aggregate(relift, rmask, "seq_sum_norm"), 0.025, rtol=1e-6)
    # the same responses laid out as the RL step scores them: W - 1 = 5 prompt columns in front
    # (mask 0), width W + N - 1 = 9; T_max is still the response length N = 4
    wide, wmask = (jnp.pad(x, ((0, 0), (5, 0))) for x in (relift, rmask))
    np.testing.assert_allclose(grpo.aggregate(wide, wmask, "seq_sum_norm", t_max=4), 0.025, rtol=1e-6)
    np.testing.assert_allclose(grpo.aggregate(wide, wmask, "dr_grpo", t_max=4), 0.0125, rtol=1e-6)


def _reference_loss(logp, old, adv, mask, eps):
    """Plain jnp, written from the paper's per-sequence form (not the module's code)."""
    total = 0.0
    for i in range(logp.shape[0]):
        ratio = jnp.exp(logp[i] - old[i])
        surrogate = jnp.minimum(ratio * adv[i], jnp.clip(ratio, 1 - eps, 1 + eps) * adv[i])
        total = total + jnp.sum(-surrogate * mask[i])
    return total / mask.sum()


def test_grpo_gradient_matches_reference_and_reinforce():
    k = jax.random.split(jax.random.key(0), 3)
    theta = jax.random.normal(k[0], (6, 5))
    old = jax.random.normal(k[1], (6, 5)) * 0.1 + theta
    mask = jax.random.uniform(k[2], (6, 5)) > 0.3
    adv = grpo.advantages(jnp.array([[1.0, 0, 0], [0, 1, 1]])).reshape(-1)

    def module_loss(t, old, eps):
        tok = grpo.clipped_token_loss(t, old, adv, eps_low=eps, eps_high=eps)
        return grpo.aggregate(tok, mask, "token_mean")

    g = jax.grad(module_loss)(theta, old, 0.2)
    g_ref = jax.grad(_reference_loss)(theta, old, adv, mask, 0.2)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    # eps -> inf, one inner step (old = sg(logp)): REINFORCE with the group baseline.
    g_inf = jax.grad(lambda t: module_loss(t, jax.lax.stop_gradient(t), 1e9))(theta)
    reinforce = -adv[:, None] * mask / mask.sum()
    np.testing.assert_allclose(g_inf, reinforce, rtol=1e-6, atol=1e-8)


def _tiny_model():
    return Transformer(ModelConfig.tiny(hidden_size=32, intermediate_size=64, num_layers=1,
                                        head_dim=8), rngs=nnx.Rngs(0))


def test_left_pad_prompts():
    toks = jnp.array([[5, 6, 7, 1, 1], [8, 9, 1, 1, 1]])
    prompt, mask = left_pad_prompts(toks, jnp.array([3, 2]), 4, pad_id=0)
    np.testing.assert_array_equal(prompt, [[0, 5, 6, 7], [0, 0, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 1, 1]])


@pytest.mark.slow
def test_rollout_equals_decode_and_is_reproducible():
    model = _tiny_model()
    prompt, mask = left_pad_prompts(jnp.array([[5, 6, 7], [8, 9, 1]]), jnp.array([3, 2]), 3, 0)
    kw = dict(group_size=3, max_new_tokens=6, temperature=1.0, eos_id=2, pad_id=0)
    a = rollout(model, prompt, mask, jax.random.key(1), **kw)
    b = rollout(model, prompt, mask, jax.random.key(1), **kw)
    c = rollout(model, prompt, mask, jax.random.key(2), **kw)
    ref = decode(model, jnp.repeat(prompt, 3, 0), 6, temperature=1.0, rng=jax.random.key(1),
                 eos_id=2, prompt_mask=jnp.repeat(mask, 3, 0))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, ref.tokens)
    np.testing.assert_allclose(a.logprobs, ref.logprobs, rtol=1e-6)
    assert a.tokens.shape == (6, 6) and not np.array_equal(a.tokens, c.tokens)


def test_sequences_score_the_sampled_tokens():
    """Teacher-forced log-probs of the laid-out sequences equal the sampler's log-probs."""
    model = _tiny_model()
    prompt, mask = left_pad_prompts(jnp.array([[5, 6, 7], [8, 9, 1]]), jnp.array([3, 2]), 3, 0)
    gen = rollout(model, prompt, mask, jax.random.key(3), group_size=2, max_new_tokens=5,
                  temperature=1.0, eos_id=2, pad_id=0)
    seq = sequences(jnp.repeat(prompt, 2, 0), jnp.repeat(mask, 2, 0), gen)
    hidden = model(seq.tokens, positions=seq.positions, segment_ids=seq.segment_ids)
    logits = hidden @ model.lm_head_weight()
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), seq.targets[..., None], -1)[..., 0]
    scored = jnp.where(seq.loss_mask, logp, 0.0)[:, prompt.shape[1] - 1:]
    np.testing.assert_allclose(scored, gen.logprobs, atol=2e-5)

"""Input-side transforms (issue 6): Masked Thought, prefix sampling, scheduled sampling, UL2."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from curriculax import transforms
from curriculax.data.bank import Batch, ExampleBank
from curriculax.data.synthetic import arithmetic
from curriculax.data.tokenizer import ByteTokenizer
from curriculax.models import ModelConfig, Transformer
from curriculax.objectives import ul2 as ul2_lib
from curriculax.transforms import TransformContext, masked_thought as mt
from curriculax.transforms import prefix_sampling as ps
from curriculax.transforms import scheduled_sampling as ss
from curriculax.transforms.schedule import scheduled_value

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def bank():
    return ExampleBank.build(arithmetic(64, 0, min_steps=1, max_steps=2), TOK, 192).bank


def _batch(bank) -> Batch:
    return jax.tree.map(jnp.asarray, bank.gather(np.arange(bank.tokens.shape[0])))


def _ctx(name, cfg, step=0, total=100, curriculum=None):
    return TransformContext(step=jnp.asarray(step), total_steps=total, curriculum=curriculum,
                            config=cfg, mask_id=TOK.mask_id, pad_id=TOK.pad_id, bos_id=TOK.bos_id)


# ---------------------------------------------------------------- Masked Thought
def test_masked_thought_worked_example_fixed_uniforms(monkeypatch):
    tokens = jnp.array([[11, 12, 13, 21, 22, 23, 24, 2]])
    u = jnp.array([[0.0, 0.0, 0.0, 0.10, 0.55, 0.39, 0.80, 0.05]])  # prompt draws < p too
    # the row as a batch: targets are the next tokens, the response (21 .. eos) is the loss
    targets = jnp.array([[12, 13, 21, 22, 23, 24, 2, 0]])
    loss_mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 0]], bool)
    z = jnp.zeros((1,), jnp.int32)
    batch = Batch(tokens=tokens, targets=targets, loss_mask=loss_mask, reasoning_mask=~loss_mask,
                  prompt_len=z + 3, category=z, difficulty=z, example_id=z)
    np.testing.assert_array_equal(mt.response_input_mask(batch)[0], [0, 0, 0, 1, 1, 1, 1, 1])
    cfg = mt.default_config()
    cfg.update(ratio=0.4, schedule="constant", span="response", mask_id=99)
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape, *a, **k: u)  # the spec's draws
    out = mt.apply(batch, jax.random.PRNGKey(0), _ctx("masked_thought", cfg))
    np.testing.assert_array_equal(out.tokens[0], [11, 12, 13, 99, 22, 99, 24, 99])


def test_masked_thought_schedule_worked_example():
    p = lambda s, w: float(scheduled_value(0.4, s, 100, schedule="linear_warmup", warmup_ratio=w))  # noqa
    assert p(0, 0.66) == 0.0
    np.testing.assert_allclose([p(33, 0.66), p(67, 0.66), p(100, 0.66)], [0.197015, 0.4, 0.4], atol=1e-6)
    np.testing.assert_allclose([p(33, 2 / 3), p(67, 2 / 3)], [0.195074, 0.396059], atol=1e-6)


@pytest.mark.parametrize("selection", ["independent", "exact_count"])
def test_masked_thought_only_touches_reasoning_and_hits_the_ratio(bank, selection):
    batch = _batch(bank)
    cfg = mt.default_config()
    cfg.update(ratio=0.3, schedule="constant", selection=selection)
    total_masked = total_span = 0
    for seed in range(8):
        out = mt.apply(batch, jax.random.PRNGKey(seed), _ctx("masked_thought", cfg))
        changed = np.asarray(out.tokens != batch.tokens)
        span = np.asarray(batch.reasoning_mask)
        assert not np.any(changed & ~span)  # prompt, answer line, eos, pad untouched
        assert not np.any(changed & (np.asarray(batch.tokens) == ord("#")))  # the "####" line
        assert np.all(np.asarray(out.tokens)[changed] == TOK.mask_id)
        np.testing.assert_array_equal(out.targets, batch.targets)  # targets stay original
        np.testing.assert_array_equal(out.loss_mask, batch.loss_mask)
        total_masked += changed.sum()
        total_span += span.sum()
    rate, sd = total_masked / total_span, np.sqrt(0.3 * 0.7 / total_span)
    assert abs(rate - 0.3) < 5 * sd, (rate, sd)
    # the prompt and the answer line are never in the span
    prompt = np.arange(batch.tokens.shape[1])[None] < np.asarray(batch.prompt_len)[:, None]
    assert not np.any(span & prompt)
    cfg.ratio = 1.0
    full = mt.apply(batch, jax.random.PRNGKey(0), _ctx("masked_thought", cfg))
    np.testing.assert_array_equal(np.asarray(full.tokens) == TOK.mask_id, span)


def test_masked_thought_selections_agree_outside_the_unit_interval():
    """A curriculum-supplied ratio outside [0, 1] saturates both rules (exact_count masked
    nothing at ratio 1.5, where independent masks the whole span)."""
    span = jnp.asarray(np.random.default_rng(0).random((4, 16)) < 0.6)
    for ratio, want in ((1.5, span), (-0.5, jnp.zeros_like(span))):
        for selection in mt.SELECTIONS:
            got = mt.select_positions(span, jax.random.PRNGKey(1), ratio, selection)
            np.testing.assert_array_equal(got, want, err_msg=f"{selection} at {ratio}")


def test_masked_thought_ratio_from_curriculum_and_random_replacement(bank):
    batch = _batch(bank)
    cfg = mt.default_config()
    cfg.update(from_curriculum="mask_ratio", replace_rate=1.0, vocab_size=256)
    out = mt.apply(batch, jax.random.PRNGKey(1), _ctx("masked_thought", cfg,
                                                       curriculum={"mask_ratio": jnp.asarray(0.0)}))
    np.testing.assert_array_equal(out.tokens, batch.tokens)
    out = mt.apply(batch, jax.random.PRNGKey(1), _ctx("masked_thought", cfg,
                                                       curriculum={"mask_ratio": jnp.asarray(1.0)}))
    changed = np.asarray(out.tokens != batch.tokens)
    assert changed.mean() > 0 and np.all(np.asarray(out.tokens)[changed] < 256)
    assert not np.any(np.asarray(out.tokens) == TOK.mask_id)


# ---------------------------------------------------------------- prefix sampling
def test_prefix_sampling_keeps_a_response_prefix_and_cuts_the_rest(bank):
    batch = _batch(bank)
    cfg = ps.default_config()
    # linear 0.25 -> 1.0 over half the run
    fr = lambda s: float(ps.from_config(cfg, "ratio", _ctx("p", cfg, step=s, total=100)))  # noqa
    np.testing.assert_allclose([fr(0), fr(25), fr(50), fr(90)], [0.25, 0.625, 1.0, 1.0], atol=1e-6)
    out = ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", cfg, step=0))
    n = np.asarray(batch.loss_mask.sum(-1))
    k = np.asarray(out.loss_mask.sum(-1))
    np.testing.assert_array_equal(k, np.maximum(1, np.ceil(0.25 * n - 1e-6)))
    for r in range(batch.tokens.shape[0]):
        kept = np.flatnonzero(out.loss_mask[r])
        resp = np.flatnonzero(batch.loss_mask[r])
        np.testing.assert_array_equal(kept, resp[: len(kept)])  # a prefix
        last = kept[-1]
        np.testing.assert_array_equal(out.tokens[r, : last + 1], batch.tokens[r, : last + 1])
        assert np.all(np.asarray(out.tokens[r, last + 1:]) == TOK.pad_id)
        assert np.all(np.asarray(out.targets[r, last + 1:]) == TOK.pad_id)
    done = ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", cfg, step=60))
    np.testing.assert_array_equal(done.loss_mask, batch.loss_mask)
    cfg.sampling = "uniform"
    rnd = ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", cfg, step=60))
    frac = np.asarray(rnd.loss_mask.sum(-1)) / n
    assert 0.3 < frac.mean() < 0.7 and frac.min() > 0


# ---------------------------------------------------------------- scheduled sampling
def test_scheduled_sampling_decays_and_mixes_worked_examples():
    d = lambda kind, i, **kw: float(ss.bengio_decay(kind, i, **kw))  # noqa: E731
    np.testing.assert_allclose([d("exponential", i, k=0.9999) for i in (0, 1000, 10000)],
                               [1.0, 0.904833, 0.367861], atol=1e-5)
    np.testing.assert_allclose([d("inverse_sigmoid", i, k=2000) for i in (0, 10000, 20000)],
                               [0.9995, 0.93092, 0.083242], atol=1e-5)
    np.testing.assert_allclose([d("linear_decay", i, k=1, c=1e-5, limit=0.1) for i in (0, 50000, 100000)],
                               [1.0, 0.5, 0.1], atol=1e-6)
    # through the config: per-decay default k, and inverse sigmoid refuses k < 1
    cfg = ss.default_config()
    p_at = lambda step, **kw: float(ss.p_gold_at(ml_collections.ConfigDict({**cfg.to_dict(), **kw}),  # noqa: E731
                                                 _ctx("s", cfg, step=step)))
    np.testing.assert_allclose(p_at(10000, decay="inverse_sigmoid"), 0.93092, atol=1e-5)
    np.testing.assert_allclose(p_at(10000, decay="exponential"), 0.367861, atol=1e-5)
    np.testing.assert_allclose(p_at(50000, decay="linear_decay"), 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="k >= 1"):
        p_at(1, decay="inverse_sigmoid", k=0.9999)
    table = jnp.array([[1.0, 0], [0, 1], [1, 1]])

    class Stub:  # pass-1 logits [2, 1, 0] at position 0 of a 2-token row
        embed = table

        def __call__(self, tokens):
            return jnp.zeros(tokens.shape + (2,))

        def logits(self, hidden):
            return jnp.broadcast_to(jnp.array([2.0, 1, 0]), hidden.shape[:2] + (3,))

    row = Batch(*(jnp.zeros((1, 2), jnp.int32),) * 2, jnp.ones((1, 2), bool), jnp.zeros((1, 2), bool),
                *(jnp.zeros((1,), jnp.int32),) * 4)
    pred = ss.predicted_embeddings(Stub(), row, jax.random.PRNGKey(0), ml_collections.ConfigDict(
        dict(prediction="soft", temperature=1.0)))
    np.testing.assert_array_equal(pred[0, 0], 0.0)  # nothing predicts the first input
    soft = pred[0, 1]  # the prediction made at position 0 is the input at 1
    np.testing.assert_allclose(soft, [0.755272, 0.334759], atol=1e-6)
    gold, use = jnp.array([[[0.0, 1.0]]]), jnp.array([[True]])
    np.testing.assert_allclose(ss.mix_embeddings(gold, soft[None, None], use, "mean")[0, 0],
                               [0.377636, 0.667380], atol=1e-6)
    np.testing.assert_allclose(ss.mix_embeddings(gold, soft[None, None], use, "gate", 0.3)[0, 0],
                               [0.528690, 0.534331], atol=1e-6)
    np.testing.assert_allclose(ss.mix_embeddings(gold, soft[None, None], ~use, "mean"), gold)


def _tiny_model():
    cfg = ModelConfig.tiny(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=128)
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_model_inputs_embeds_matches_token_lookup(bank):
    model = _tiny_model()
    tokens = jnp.asarray(bank.tokens[:2])
    run = nnx.jit(lambda m, t, e: (m(t, inputs_embeds=e), m(t)))
    with_embeds, plain = run(model, tokens, jnp.take(model.embed[...], tokens, axis=0))
    np.testing.assert_allclose(with_embeds, plain, atol=1e-6)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(tokens, inputs_embeds=jnp.zeros((2, 3, 32)))


@pytest.mark.parametrize("prediction", ["sample", "argmax", "soft"])
def test_scheduled_sampling_embed_hook(bank, prediction):
    model = _tiny_model()
    batch = jax.tree.map(lambda x: x[:4], _batch(bank))
    gold = jnp.take(model.embed[...], batch.tokens, axis=0)
    cfg = ss.default_config()
    cfg.update(prediction=prediction, schedule="constant", p_gold=1.0)
    np.testing.assert_array_equal(ss.embed(model, batch, jax.random.PRNGKey(0), _ctx("s", cfg)), gold)
    cfg.update(p_gold=0.0, mix="replace")
    out = ss.embed(model, batch, jax.random.PRNGKey(0), _ctx("s", cfg))
    changed = np.any(np.asarray(out != gold), -1)
    resp_in = np.asarray(mt.response_input_mask(batch))
    assert not np.any(changed & ~resp_in)  # prompt inputs stay gold
    assert changed.mean() > 0
    if prediction == "argmax":  # the prediction made at t-1 is the input at t
        pred = jnp.argmax(model.logits(model(batch.tokens)), -1)
        want = jnp.take(model.embed[...], pred[:, :-1], axis=0)
        np.testing.assert_allclose(np.asarray(out[:, 1:])[resp_in[:, 1:]],
                                   np.asarray(want)[resp_in[:, 1:]], atol=1e-6)


# ---------------------------------------------------------------- UL2
def test_ul2_span_counts_match_the_worked_example():
    for (rate, mu, noise, spans) in ((0.15, 3, 15, 5), (0.5, 64, 50, 1), (0.15, 8, 15, 2)):
        m, sid, nn, ns = ul2_lib.random_spans_noise_mask(100, jax.random.PRNGKey(0), corruption_rate=rate,
                                                          mean_span=mu, size=128)
        assert (int(nn), int(ns)) == (noise, spans)
        assert int(m.sum()) == noise and int(sid.max()) + 1 == spans
        assert not m[0] and m[99] and not m[100:].any()  # starts clean, ends noisy


def test_ul2_spans_cover_the_requested_corruption_rate():
    for rate, mu in ((0.15, 3.0), (0.5, 8.0), (0.25, 2.0)):
        def one(n, key):
            return ul2_lib.random_spans_noise_mask(n, key, corruption_rate=rate, mean_span=mu, size=160)
        ns = jnp.asarray(np.random.default_rng(0).integers(8, 150, 256))
        m, sid, nn, nsp = jax.vmap(one)(ns, jax.random.split(jax.random.PRNGKey(1), 256))
        np.testing.assert_array_equal(m.sum(-1), np.clip(np.round(np.asarray(ns) * rate), 1, np.asarray(ns) - 1))
        np.testing.assert_allclose(float(m.sum() / ns.sum()), rate, atol=0.01)
        # spans are contiguous runs: number of runs == num_spans, mean length ~ mu
        runs = np.sum(np.diff(np.asarray(m).astype(int), axis=-1) == 1, -1)
        np.testing.assert_array_equal(runs, nsp)


def _decode_row(tokens, targets, loss_mask, sentinels):
    """Rebuild the corrupted document from a UL2 row with unique sentinels."""
    seq = list(np.asarray(tokens)) + [int(targets[-1])]
    tgt_start = int(np.flatnonzero(loss_mask)[0]) + 1
    inputs, tgt = seq[:tgt_start], [int(targets[i]) for i in np.flatnonzero(loss_mask)]
    spans, cur = {}, None
    for t in tgt[:-1]:  # drop the final eos
        if t in sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs:
        out.extend(spans[t] if t in sentinels else [t])
    return out, tgt[-1]


@pytest.mark.parametrize("denoiser", ["R:3:0.15", "X:8:0.5"])
def test_ul2_rows_decode_back_to_the_original(bank, denoiser):
    batch = _batch(bank)
    sentinels = tuple(range(300, 340))
    cfg = ul2_lib.default_config()
    cfg.update(sentinel_ids=sentinels, denoisers=(denoiser,), weights=(1.0,))
    model_vocab_rows = batch.tokens.shape[1]
    out = jax.jit(lambda b, r: transforms.get("ul2").apply(b, r, _ctx("ul2", cfg)))(batch, jax.random.PRNGKey(0))
    mode = {"R": 261, "X": 263}[denoiser[0]]  # [NLU] for R, [NLG] for X (default mode_token_ids)
    assert cfg.mode_token_ids == (261, 262, 263) and bank.info.num_truncated == 0
    for r in range(16):
        n_valid = int(np.flatnonzero(batch.loss_mask[r])[-1]) + 1
        original = list(np.asarray(batch.tokens[r, :n_valid])) + [int(batch.targets[r, n_valid - 1])]
        pl = int(batch.prompt_len[r])
        doc, eos = _decode_row(out.tokens[r], out.targets[r], out.loss_mask[r], set(sentinels))
        assert doc[pl] == mode and doc[:pl] == original[:pl]  # prompt kept, then the mode token
        assert doc[pl + 1:] == original[pl:-1] and eos == TOK.eos_id
    assert model_vocab_rows == out.tokens.shape[1]


@pytest.mark.parametrize("bos", [True, False])
def test_ul2_s_denoiser_prefix_lm_loss_region(bos):
    # seq = [bos] 10..17 eos ; region "all" -> prefix [bos], then [S2S], doc, eos.  Without a BOS
    # (Qwen2-style rows) the prefix is empty: 10 is a document token like the others.
    t = 16
    head = [TOK.bos_id] if bos else []
    seq = np.full(t + 1, TOK.pad_id, np.int32)
    seq[:len(head) + 9] = head + list(range(10, 18)) + [TOK.eos_id]
    tokens, targets = seq[:-1][None], seq[1:][None]
    loss_mask = np.zeros((1, t), bool)
    loss_mask[0, :len(head) + 8] = True
    zeros = jnp.zeros((1,), jnp.int32)
    batch = Batch(tokens=jnp.asarray(tokens), targets=jnp.asarray(targets), loss_mask=jnp.asarray(loss_mask),
                  reasoning_mask=jnp.zeros((1, t), bool), prompt_len=zeros + len(head), category=zeros,
                  difficulty=zeros, example_id=zeros)
    cfg = ul2_lib.default_config()
    cfg.update(denoisers=("S",), weights=(1.0,), region="all")
    seen = set()
    apply = jax.jit(lambda b, r: transforms.get("ul2").apply(b, r, _ctx("ul2", cfg)))
    for seed in range(40):
        out = apply(batch, jax.random.PRNGKey(seed))
        np.testing.assert_array_equal(out.tokens[0, :len(head) + 10], head + [262] + list(range(10, 18)) + [TOK.eos_id])
        tgt = np.asarray(out.targets[0])[np.asarray(out.loss_mask[0])]
        m = len(tgt) - 1  # pivot (targets = doc[8-m:] + eos)
        np.testing.assert_array_equal(tgt, list(range(18 - m, 18)) + [TOK.eos_id])
        seen.add(m)
    assert seen <= set(range(1, 9)) and len(seen) > 4


def test_ul2_apply_prob_zero_is_identity(bank):
    batch = _batch(bank)
    cfg = ul2_lib.default_config()
    cfg.apply_prob = 0.0
    out = jax.jit(lambda b, r: transforms.get("ul2").apply(b, r, _ctx("ul2", cfg)))(batch, jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, out, batch)


def test_shared_schedules_and_composition(bank):
    from curriculax.curriculum import schedules

    for s in (0, 30, 60, 100):
        np.testing.assert_allclose(
            scheduled_value(0.5, s, 100, schedule="zerosearch", schedule_kwargs={"base": 4.0}),
            schedules.zerosearch(s, 100, 0.0, 0.5, 4.0), rtol=1e-6)
        np.testing.assert_allclose(scheduled_value(0.4, s, 100, schedule="cosine", warmup_ratio=0.5),
                                   schedules.cosine(min(s, 50), 50, 0.0, 0.4), rtol=1e-6)
    # prefix sampling then Masked Thought: masking stays inside the kept reasoning prefix
    batch = _batch(bank)
    pcfg, mcfg = ps.default_config(), mt.default_config()
    mcfg.update(ratio=1.0, schedule="constant")
    cut = ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", pcfg, step=10))
    out = mt.apply(cut, jax.random.PRNGKey(1), _ctx("masked_thought", mcfg, step=10))
    masked = np.asarray(out.tokens == TOK.mask_id)
    np.testing.assert_array_equal(masked, np.asarray(cut.reasoning_mask))
    assert not np.any(masked & ~np.asarray(batch.reasoning_mask))


def test_prefix_sampling_keeps_the_key_tokens_of_the_kept_targets(bank):
    """token_weighted's answer key tokens read reasoning_mask[i + 1] for target i: the cut must
    not turn the last kept reasoning target into a key token."""
    from curriculax.objectives import token_weighted

    batch = _batch(bank)
    cut = ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", ps.default_config(), step=0))
    want = token_weighted.key_token_mask(batch) & cut.loss_mask
    np.testing.assert_array_equal(token_weighted.key_token_mask(cut), want)


def test_partial_transform_config_keeps_the_module_defaults(bank):
    """A config that sets only some fields keeps the module's other defaults (prefix sampling's
    linear warmup, not the schedule helper's constant fallback); unknown keys are errors."""
    batch = _batch(bank)
    partial = ml_collections.ConfigDict(dict(ratio=1.0, start=0.25))
    full = ps.default_config()
    full.update(ratio=1.0, start=0.25)
    a = ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", partial, step=0))
    b = ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", full, step=0))
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert a.loss_mask.sum() < batch.loss_mask.sum()  # the warmup starts at a quarter
    with pytest.raises(ValueError, match=r"config.transform_config.prefix_sampling has keys \['ratoi'\]"):
        ps.apply(batch, jax.random.PRNGKey(0), _ctx("prefix_sampling", ml_collections.ConfigDict(dict(ratoi=1.0))))


def test_scheduled_sampling_gold_embeddings_clip_out_of_range_ids_like_the_model(bank):
    """A pad id beyond the model's vocabulary (a tokenizer's added [PAD]) is clipped by the
    model's own lookup; the embed hook's gold embeddings must not read NaN there (0-probability
    attention to a NaN value spreads it to every real token)."""
    model = _tiny_model()
    batch = jax.tree.map(lambda x: x[:2], _batch(bank))
    vocab = model.config.vocab_size
    pad = np.asarray(batch.tokens) == TOK.pad_id
    assert pad.any()
    batch = batch.replace(tokens=jnp.where(jnp.asarray(pad), vocab + 5, batch.tokens))
    cfg = ss.default_config()
    cfg.update(prediction="argmax", schedule="constant", p_gold=1.0)
    out = ss.embed(model, batch, jax.random.PRNGKey(0), _ctx("s", cfg))
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(out, jnp.take(model.embed[...], jnp.minimum(batch.tokens, vocab - 1), axis=0))
    hidden = model(batch.tokens, inputs_embeds=out)
    np.testing.assert_allclose(hidden, model(batch.tokens), atol=1e-6)


@pytest.mark.parametrize("p_gold", [1.0, 0.0])
def test_scheduled_sampling_bf16_embedding_gradient_accumulates_in_float32(bank, p_gold):
    """The hook's lookups (gold and predicted tokens) are the trained pass's embedding path: a
    bfloat16 table's scatter-add gradient for a token seen ~600 times must not stagnate in bf16."""
    model = _tiny_model()
    graphdef, state = nnx.split(model)
    batch = jax.tree.map(lambda x: x[:4], _batch(bank))
    rng = np.random.default_rng(0)
    frequent = jnp.asarray(rng.random(batch.tokens.shape) < 0.8)
    batch = batch.replace(tokens=jnp.where(frequent, 7, batch.tokens))
    cfg = ss.default_config()
    cfg.update(prediction="argmax", schedule="constant", p_gold=p_gold, mix="replace")
    c = jax.random.normal(jax.random.key(1), batch.tokens.shape + (32,)) + 1.0

    def embed_grad(dtype):
        st = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(dtype), state)

        def loss(st):
            out = ss.embed(nnx.merge(graphdef, st), batch, jax.random.PRNGKey(0), _ctx("s", cfg))
            return jnp.sum(out.astype(jnp.float32) * c)
        return jax.grad(loss)(st)["embed"][...]

    g16, g32 = embed_grad(jnp.bfloat16), embed_grad(jnp.float32)
    row = int(jnp.argmax(jnp.linalg.norm(g32, axis=-1)))  # the most used row
    rel = float(jnp.linalg.norm(g16[row].astype(jnp.float32) - g32[row]) / jnp.linalg.norm(g32[row]))
    assert rel < 1e-2, rel

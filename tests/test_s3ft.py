"""S3FT target selection (curriculax.rl.s3ft) and its decoding-based builder."""

import numpy as np
import pytest
from flax import nnx

from curriculax.data.bank import ExampleBank
from curriculax.data.synthetic import arithmetic
from curriculax.data.tokenizer import ByteTokenizer
from curriculax.models import ModelConfig, Transformer, generate
from curriculax.rl import s3ft

GOLD = "She earns 3 * 6 = 18 dollars.\n#### 18"


def _rec(i, answer="18", response=GOLD, **extra):
    return {"id": f"r{i}", "prompt": f"question {i}", "response": response, "answer": answer,
            "category": "mixed", "difficulty": 2, **extra}


def test_worked_example_1_math_judge():
    recs = [_rec(0), _rec(1), _rec(2)]
    yhat = ["3 times 6 is 18, so she earns $18.", "3 * 6 = 20", "3 * 6 = 20"]
    para = [None, "She makes 3 * 6 = 18", "She makes 3 * 6 = 16"]
    out, counts = s3ft.select(recs, yhat, s3ft.answer_judge, para)
    assert [r["s3ft_source"] for r in out] == ["self", "paraphrase", "gold"]
    assert [r["response"] for r in out] == [yhat[0], para[1], GOLD]
    assert counts == {"self": 1, "paraphrase": 1, "gold": 1}
    for src, r in zip(recs, out):  # every other field is kept, the input is not mutated
        assert {k: v for k, v in r.items() if k not in ("response", "s3ft_source")} == \
            {k: v for k, v in src.items() if k != "response"}
    assert recs[1]["response"] == GOLD and "s3ft_source" not in recs[1]


def test_worked_example_2_counts():
    outcomes = [(True, None), (False, True), (False, False), (True, None), (False, True)]
    recs = [_rec(i) for i in range(5)]
    yhat = ["ok" if y else "bad" for y, _ in outcomes]
    para = [None if p is None else ("ok" if p else "bad") for _, p in outcomes]
    calls = []

    def judge(text, rec):
        calls.append(rec["id"])
        return text == "ok"

    out, counts = s3ft.select(recs, yhat, judge, para)
    assert counts == {"self": 2, "paraphrase": 2, "gold": 1}
    assert [r["s3ft_source"] for r in out] == ["self", "paraphrase", "gold", "self", "paraphrase"]
    assert len(calls) == 5 + 3  # once per response, once per paraphrase of a failure
    out, counts = s3ft.select(recs, yhat, judge, para, use_paraphrase=False)
    assert counts == {"self": 2, "paraphrase": 0, "gold": 3}
    assert [r["response"] for r in out] == ["ok", GOLD, GOLD, "ok", GOLD]
    _, counts = s3ft.select(recs, yhat, judge)  # no paraphrases at all
    assert counts == {"self": 2, "paraphrase": 0, "gold": 3}


def test_select_checks_lengths():
    with pytest.raises(ValueError, match="2 records, 1 responses"):
        s3ft.select([_rec(0), _rec(1)], ["x"], s3ft.answer_judge)


def test_answer_judge():
    assert s3ft.answer_judge("#### 18", _rec(0))
    assert s3ft.answer_judge(r"so \boxed{18}", _rec(0))
    assert s3ft.answer_judge("#### 1,000", _rec(0, answer="1000.0"))
    assert not s3ft.answer_judge("#### 17", _rec(0))
    assert not s3ft.answer_judge("", _rec(0))
    cd = _rec(0, answer="56", response="#### (3 + 5) * 7", numbers=[3, 5, 7])
    assert s3ft.answer_judge("8 * 7 = 56\n#### (3 + 5) * 7", cd)
    assert not s3ft.answer_judge("#### 56", cd)  # the target is not an expression
    assert not s3ft.answer_judge("#### 7 * 7 + 7", cd)  # 7 used three times


def test_paraphrase_record():
    r = s3ft.paraphrase_record(_rec(0))
    assert r["prompt"].startswith("question 0") and GOLD in r["prompt"] and r["response"] == ""
    assert s3ft.paraphrase_record(_rec(0), "P:{prompt}|{response}")["prompt"] == f"P:question 0|{GOLD}"


# --------------------------------------------------------------- decoding with a tiny model

TOK = ByteTokenizer()
NEW = 6


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.tiny(max_seq_len=1024), rngs=nnx.Rngs(0))


def _manual(model, rec):
    """One prompt alone, decoded without any batching or padding."""
    bank = ExampleBank.build([rec], TOK, 512)
    prompts, mask = bank.prompts()
    out = np.asarray(generate(model, prompts, NEW, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                              prompt_mask=mask))[0]
    out = list(out[: list(out).index(TOK.eos_id)] if TOK.eos_id in out else out)
    return TOK.decode([t for t in out if t != TOK.pad_id])


def test_generate_responses_match_single_prompt_decoding(model):
    recs = arithmetic(4, 0)
    texts = s3ft.generate_responses(model, TOK, recs, max_new_tokens=NEW, batch_size=3)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert texts == [_manual(model, r) for r in recs]  # order and padding do not change outputs
    assert s3ft.generate_responses(model, TOK, [], max_new_tokens=NEW) == []


def test_build_end_to_end(model):
    recs = arithmetic(4, 0)
    out, counts = s3ft.build(model, TOK, recs, max_new_tokens=NEW, batch_size=3)
    assert sum(counts.values()) == 4 and set(counts) == {"self", "paraphrase", "gold"}
    assert [r["id"] for r in out] == [r["id"] for r in recs]
    for src, r in zip(recs, out):
        assert r["s3ft_source"] in s3ft.SOURCES and isinstance(r["response"], str)
        assert r["prompt"] == src["prompt"] and r["answer"] == src["answer"]
        if r["s3ft_source"] == "gold":
            assert r["response"] == src["response"]
    # A random model misses every answer in 6 bytes: all gold here.
    assert counts == {"self": 0, "paraphrase": 0, "gold": 4}

    # A judge that rejects the own answers and accepts the paraphrases: the targets are the
    # greedy completions of the paraphrase prompts.
    calls = []

    def second_round(text, rec):
        calls.append(text)
        return len(calls) > len(recs)

    out, counts = s3ft.build(model, TOK, recs, max_new_tokens=NEW, batch_size=3, judge=second_round)
    assert counts == {"self": 0, "paraphrase": 4, "gold": 0}
    expected = s3ft.generate_responses(model, TOK, [s3ft.paraphrase_record(r) for r in recs],
                                       max_new_tokens=NEW, batch_size=3)
    assert [r["response"] for r in out] == expected

    out, counts = s3ft.build(model, TOK, recs, max_new_tokens=NEW, batch_size=3,
                             judge=lambda text, rec: True)
    assert counts == {"self": 4, "paraphrase": 0, "gold": 0}
    assert [r["response"] for r in out] == s3ft.generate_responses(model, TOK, recs, max_new_tokens=NEW,
                                                                   batch_size=3)


def test_prepare_rerun_after_a_crash_while_writing_the_counts(tmp_path, monkeypatch):
    """A run killed while writing s3ft_counts.json must not leave s3ft_train.jsonl in place
    without its counts: the rerun used to reuse the targets and fail reading the counts."""
    import pathlib
    import types

    from curriculax.train import quickstart_config, setup

    recs = [_rec(0), _rec(1)]
    exp = types.SimpleNamespace(graphdef=None, model_params=lambda p: p, tokenizer=None,
                                init_state=lambda: types.SimpleNamespace(params=None),
                                train_data=types.SimpleNamespace(records=recs), mesh=object(),
                                rules=())
    monkeypatch.setattr(setup, "build", lambda cfg: exp)
    monkeypatch.setattr(nnx, "merge", lambda *a: None)

    def fake_build(model, tok, records, **kw):
        assert kw["mesh"] is exp.mesh  # decoding splits the rows over the run's mesh
        return [{**r, "s3ft_source": "gold"} for r in records], {"self": 0, "paraphrase": 0, "gold": 2}

    monkeypatch.setattr(s3ft, "build", fake_build)

    class Killed(BaseException):
        pass

    write_text = pathlib.Path.write_text
    calls = []

    def dying_write_text(self, *a, **kw):
        if self.name.startswith("s3ft_counts") and not calls:
            calls.append(self)
            raise Killed
        return write_text(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", dying_write_text)
    cfg = quickstart_config()
    with pytest.raises(Killed):
        s3ft.prepare(cfg, tmp_path)
    sft, counts = s3ft.prepare(cfg, tmp_path)  # the rerun
    assert counts == {"self": 0, "paraphrase": 0, "gold": 2}
    assert sft.data.path == str(tmp_path / "s3ft_train.jsonl")
    assert len((tmp_path / "s3ft_train.jsonl").read_text().splitlines()) == 2

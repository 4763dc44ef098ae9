"""Answer extraction and matching, and the decoding-based evaluator."""

import numpy as np
import pytest
from flax import nnx

from curriculax import eval as ev
from curriculax.data.bank import ExampleBank
from curriculax.data.tokenizer import ByteTokenizer
from curriculax.models import ModelConfig, Transformer


@pytest.mark.parametrize("text,expected", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("so\n#### 1,234\nextra", "1,234"),
    (r"thus $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    ("the answer is 42.", "42"),
    ("first 3 then -5", "-5"),
    ("no digits", None),
])
def test_extract_answer(text, expected):
    assert ev.extract_answer(text) == expected


def test_answers_match_numeric_and_text():
    assert ev.answers_match("1,000", "1000")
    assert ev.answers_match("12.0", "12")
    assert not ev.answers_match("13", "12")
    assert ev.answers_match(r"\frac{1}{2}", r"\frac{1}{2}")
    assert not ev.answers_match(None, "1")


def test_summarize_groups():
    out = ev.summarize(np.array([1, 0, 1, 1], bool), np.array([0, 0, 1, 1]), np.array([1, 2, 1, 2]),
                       ("a", "b"))
    assert out["accuracy"] == 0.75
    assert out["accuracy/category/a"] == 0.5 and out["accuracy/category/b"] == 1.0
    assert out["accuracy/difficulty/1"] == 1.0 and out["accuracy/difficulty/2"] == 0.5


def test_evaluate_counts_exact_matches_of_decoded_text():
    # A model whose greedy output is known: compare evaluate() with a manual decode.
    tok = ByteTokenizer()
    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    recs = [{"id": str(i), "prompt": f"q{i}", "response": "#### 1", "answer": "1",
             "category": "c", "difficulty": 1} for i in range(3)]
    data = ExampleBank.build(recs, tok, seq_len=16)
    out = ev.evaluate(model, data, tok, batch_size=2, max_new_tokens=4)
    assert set(out) >= {"accuracy", "accuracy/category/c", "accuracy/difficulty/1"}
    from curriculax.models import generate
    prompts, mask = data.prompts()
    gen = np.asarray(generate(model, prompts, 4, eos_id=tok.eos_id, pad_id=tok.pad_id, prompt_mask=mask))
    expected = np.mean([ev.answers_match(ev.extract_answer(tok.decode(list(g))), "1") for g in gen])
    assert out["accuracy"] == pytest.approx(expected)

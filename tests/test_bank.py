"""Example bank layout: masks, spans, overflow handling, prompts for decoding."""

import numpy as np
import pytest

from curriculax.data import synthetic
from curriculax.data.bank import ExampleBank
from curriculax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
REC = {"id": "a", "prompt": "1+2?", "response": "1 + 2 = 3\n#### 3", "answer": "3",
       "category": "add", "difficulty": 1}


def _text(ids):
    return bytes(int(i) for i in ids if i < 256).decode()


def test_row_layout_masks_and_spans():
    bank = ExampleBank.build([REC], TOK, seq_len=40).bank
    toks, tgts = bank.tokens[0], bank.targets[0]
    n_prompt = 1 + len("1+2?\n")  # bos + prompt line
    assert bank.prompt_len[0] == n_prompt
    assert toks[0] == TOK.bos_id and _text(toks[1:n_prompt]) == "1+2?\n"
    np.testing.assert_array_equal(toks[1:20], tgts[:19])  # targets are inputs shifted by one
    # The loss covers exactly the response tokens and the EOS.
    assert _text(tgts[bank.loss_mask[0]]) == "1 + 2 = 3\n#### 3"
    assert tgts[bank.loss_mask[0]][-1] == TOK.eos_id
    # The reasoning span is the worked step, not the prompt and not the '####' answer line.
    assert _text(toks[bank.reasoning_mask[0]]) == "1 + 2 = 3\n"
    n = len("1+2?\n1 + 2 = 3\n#### 3") + 2  # + bos + eos - 1 shift + 1
    assert (toks[n - 1:] == TOK.pad_id).all() and not bank.loss_mask[0, n - 1:].any()


def test_overflow_truncate_and_drop_are_counted():
    long = dict(REC, id="b", response="9 + 9 = 18\n" * 10 + "#### 18")
    hopeless = dict(REC, id="c", prompt="x" * 100)
    trunc = ExampleBank.build([REC, long, hopeless], TOK, seq_len=40)
    assert trunc.ids == ["a", "b"]
    assert (trunc.info.num_truncated, trunc.info.num_dropped) == (1, 1)
    assert trunc.bank.loss_mask[1].sum() == 40 - trunc.bank.prompt_len[1] + 1
    drop = ExampleBank.build([REC, long, hopeless], TOK, seq_len=40, overflow="drop")
    assert drop.ids == ["a"] and drop.info.num_dropped == 2
    with pytest.raises(ValueError, match="seq_len"):
        ExampleBank.build([hopeless], TOK, seq_len=40)
    with pytest.raises(ValueError, match="data.template"):
        ExampleBank.build([REC], TOK, seq_len=40, template="fancy")


def test_streamed_pools_follow_the_overflow_rule():
    """A pool cannot drop rows: a row the bank would drop keeps no loss; prompts are clamped."""
    from curriculax.data.pipeline import pool_at, pool_dataset

    long = dict(REC, id="b", response="9 + 9 = 18\n" * 10 + "#### 18")
    hopeless = dict(REC, id="c", prompt="x" * 100)
    recs = [REC, long, hopeless]
    for overflow, live in (("truncate", {0, 1}), ("drop", {0})):
        pools, info = pool_dataset(recs, TOK, seq_len=40, pool_size=3, seed=0, overflow=overflow)
        pool = pool_at(pools, info, 0)
        by_id = {int(e): i for i, e in enumerate(pool.example_id)}
        assert {e for e, i in by_id.items() if pool.loss_mask[i].any()} == live, overflow
        assert pool.prompt_len.max() <= 40 and info.num_truncated == -1
    with pytest.raises(ValueError, match="data.overflow"):
        pool_dataset(recs, TOK, seq_len=40, pool_size=3, seed=0, overflow="wrap")


def test_meta_categories_and_left_padded_prompts():
    recs = synthetic.arithmetic(50, 0, max_steps=4)
    data = ExampleBank.build(recs, TOK, seq_len=320)
    assert data.info.category_names == tuple(sorted({r["category"] for r in recs}))
    assert (data.info.difficulty_min, data.info.difficulty_max) == (1, 4)
    meta = data.bank.meta()
    assert meta.num_examples == 50 and meta.num_categories == len(data.info.category_names)
    prompts, mask = data.prompts([0, 1])
    for r, i in enumerate([0, 1]):
        row = prompts[r][mask[r]]
        assert _text(row[1:]) == recs[i]["prompt"] + "\n"
        assert not mask[r, : prompts.shape[1] - len(row)].any()


def test_chat_template_prompt():
    data = ExampleBank.build([REC], TOK, seq_len=64, template="chat")
    prompt = _text(data.bank.tokens[0, 1:data.bank.prompt_len[0]])
    assert prompt == TOK.apply_chat_template([{"role": "user", "content": REC["prompt"]}])

"""RL rewards (curriculax.rl.rewards) and Curr-ReFT stage rewards / record recasting."""

import logging

import numpy as np
import pytest

from curriculax.data.synthetic import arithmetic, countdown, verify_countdown
from curriculax.rl import curr_reft as cr
from curriculax.rl import rewards as rw

ARITH = {"id": "a", "prompt": "q", "response": "9 * 2 = 18\n#### 18", "answer": "18",
         "category": "mul", "difficulty": 1}
CD = {"id": "c", "prompt": "q", "response": "3 + 5 = 8\n8 * 7 = 56\n#### (3 + 5) * 7", "answer": "56",
      "category": "countdown", "difficulty": 3, "numbers": [3, 5, 7]}


# ------------------------------------------------------------------------------ base rewards


@pytest.mark.parametrize("text,answer,expected", [
    ("9 * 2 = 18\n#### 18", "18", 1.0),
    ("#### 17", "18", 0.0),
    (r"so the total is $\boxed{18}$.", "18", 1.0),
    (r"$\boxed{17}$", "18", 0.0),
    ("#### 1,000", "1000.0", 1.0),
    ("#### 1,000", "1001", 0.0),
    ("#### 18\nthen 5 more", "18", 1.0),  # the first line after #### is the answer
    ("she earns $18.", "18", 1.0),  # the evaluator's last-number fallback
    ("", "18", 0.0),
    ("no number at all", "18", 0.0),
    ("####   \n", "18", 0.0),
])
def test_math_answer(text, answer, expected):
    assert rw.math_answer(text, {**ARITH, "answer": answer}) == expected


@pytest.mark.parametrize("text,expected", [
    ("#### (3 + 5) * 7", 1.0),
    ("steps\n#### (3 + 5) * 7 = 56\nmore text", 1.0),
    ("#### 56\nno wait\n#### 7 * (5 + 3)", 1.0),  # the last #### counts
    ("#### 7 * (5 + 3)\nno wait\n#### 56", 0.0),
    ("#### 56", 0.0),  # echoing the target is not a solution
    ("#### 7 * 8", 0.0),  # 8 is not one of the numbers
    ("#### (3 + 5) * 7 + 5 - 5", 0.0),  # 5 used three times
    ("#### 3 + 5 * 7", 0.0),  # wrong value (38)
    ("(3 + 5) * 7", 0.0),  # no #### line
    ("####", 0.0),
    ("", 0.0),
    ("#### __import__('os')", 0.0),
])
def test_countdown(text, expected):
    assert rw.countdown(text, CD) == expected


def test_countdown_number_used_twice():
    rec = {**CD, "numbers": [5, 3], "answer": "15"}
    assert rw.countdown("#### 5 * 3", rec) == 1.0
    assert rw.countdown("#### 5 + 5 + 5", rec) == 0.0


def test_final_answer_dispatches_on_numbers():
    assert rw.final_answer("#### (3 + 5) * 7", CD) == 1.0
    assert rw.final_answer("#### 56", CD) == 0.0
    assert rw.final_answer("#### 18", ARITH) == 1.0


@pytest.mark.parametrize("text,expected", [
    ("a\n#### 5", 1.0), ("  #### x", 1.0), ("####5", 1.0),
    ("####", 0.0), ("#### \n5", 0.0), ("", 0.0), ("the answer is 5", 0.0), ("a #### 5", 0.0),
])
def test_hash_format(text, expected):
    assert rw.hash_format(text, ARITH) == expected


@pytest.mark.parametrize("text,expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  <think>multi\nline</think>\n\n<answer>\n7\n</answer>\n", 1.0),
    ("<think>a</think> <answer>b</answer> trailing", 0.0),
    ("preamble <think>a</think><answer>b</answer>", 0.0),
    ("<answer>b</answer>", 0.0),
    ("<think>a</think>", 0.0),
    ("", 0.0),
])
def test_think_answer_format(text, expected):
    assert rw.think_answer_format(text, ARITH) == expected


def test_registry_names_and_unknown():
    assert set(rw.names()) >= {"math_answer", "countdown", "hash_format", "think_answer_format",
                               "judge", "choice", "iou", "set_overlap", "final_answer"}
    assert rw.get("judge") is cr.judge_reward
    with pytest.raises(ValueError, match="rl.rewards"):
        rw.get("nope")


def test_combine_weights():
    fn = rw.combine([("math_answer", 1.0), ("hash_format", 0.5)])
    assert fn("#### 18", ARITH) == pytest.approx(1.5)
    assert fn("#### 17", ARITH) == pytest.approx(0.5)
    assert fn("the answer is 18", ARITH) == pytest.approx(1.0)
    assert fn("", ARITH) == 0.0
    custom = rw.combine([(lambda text, rec: len(text), 2.0), ("math_answer", -1.0)])
    assert custom("#### 18", ARITH) == pytest.approx(2 * 7 - 1)
    assert rw.combine({"math_answer": 3.0})("#### 18", ARITH) == pytest.approx(3.0)


def test_combine_rejects_bad_specs():
    with pytest.raises(ValueError, match=r"config\.rl\.rewards.*math_answer"):
        rw.combine([("nope", 1.0)])
    with pytest.raises(ValueError, match="empty"):
        rw.combine([])
    with pytest.raises(ValueError, match="finite"):
        rw.combine([("math_answer", float("nan"))])


@pytest.mark.parametrize("spec", [("math_answer", 1.0), "math_answer", [("math_answer",)]])
def test_combine_names_the_field_for_a_spec_that_is_not_pairs(spec):
    # ("math_answer", 1.0) without the outer tuple used to fail with "TypeError: 'float' object
    # is not iterable" (the CLI prints ValueErrors only), a bare name with an unpacking error.
    with pytest.raises(ValueError, match=r"config\.rl\.rewards.*\(name, weight\) pairs"):
        rw.combine(spec)


def test_score_values_and_dtype():
    out = rw.score(rw.math_answer, ["#### 18", "#### 17", r"\boxed{18}"], [ARITH] * 3)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        rw.score(rw.math_answer, ["a", "b"], [ARITH])


def test_score_counts_raising_reward_as_zero_and_warns_once(caplog):
    def flaky_reward(text, record):
        if "boom" in text:
            raise KeyError("missing field")
        return float("nan") if "nan" in text else 2.0

    with caplog.at_level(logging.WARNING, logger=rw.__name__):
        out = rw.score(flaky_reward, ["ok", "boom", "boom again", "ok"], [ARITH] * 4)
    np.testing.assert_array_equal(out, [2.0, 0.0, 0.0, 2.0])
    warnings = [r for r in caplog.records if "flaky_reward" in r.getMessage()]
    assert len(warnings) == 1 and "KeyError" in warnings[0].getMessage()
    np.testing.assert_array_equal(rw.score(flaky_reward, ["nan", "ok"], [ARITH] * 2), [0.0, 2.0])


# ------------------------------------------------------------------------- Curr-ReFT rewards


@pytest.mark.parametrize("completion,solution,expected", [
    ("<answer>True</answer>", "yes", 1.0),  # worked example 1
    ("<answer>Yes</answer>", "no", 0.0),
    ("<answer>maybe</answer>", "yes", 0.0),
    ("<answer>maybe</answer>", "maybe", 0.0),  # None never matches
    ("<think>no idea</think><answer>Correct.</answer>", "<answer>yes</answer>", 1.0),
    ("<answer>incorrect</answer>", "no", 1.0),  # "incorrect" is not a standalone "correct"
    ("<answer>FALSE</answer>", "no", 1.0),
    ("<answer>yesterday</answer>", "yes", 0.0),
    ("18 = 18\n#### yes", "yes", 1.0),  # our #### answer line
    ("18 != 20\n#### no", "yes", 0.0),
    ("yes", "yes", 1.0),  # no tags, no ####: the whole completion
    ("", "yes", 0.0),
])
def test_judge_reward(completion, solution, expected):
    assert cr.judge_reward(completion, {"answer": solution}) == expected


@pytest.mark.parametrize("completion,solution,expected", [
    ("<answer>A, C</answer>", "<answer>A,C</answer>", 1.0),  # worked example 1
    ("<answer>C and A</answer>", "A,C", 0.0),  # "C,A": order-sensitive as in their code
    ("<answer>(B)</answer>", "B", 1.0),
    ("<answer>B. 17, B</answer>", "B", 1.0),  # de-duplicated
    ("<answer>b</answer>", "B", 0.0),  # capitals only
    ("<answer>F</answer>", "F", 0.0),  # only A-E; empty never matches
    ("<answer>AB</answer>", "A,B", 0.0),  # not standalone
    ("17 is option B.\n#### B", "B", 1.0),
    ("#### D", "B", 0.0),
    ("", "B", 0.0),
])
def test_choice_reward(completion, solution, expected):
    assert cr.choice_reward(completion, {"answer": solution}) == expected


def test_iou_worked_numbers():
    assert cr.iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert cr.iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(0.1428571, abs=1e-7)
    assert cr.iou([0, 0, 10, 10], [0, 0, 10, 8]) == pytest.approx(0.8)
    assert cr.iou([0, 0, 10, 10], [2, 2, 12, 12]) == pytest.approx(0.4705882, abs=1e-7)
    assert cr.iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert cr.iou([0, 0, 10, 10], [9, 0, 19, 10]) == 0.0  # 1-pixel overlap: their strict "<"
    assert cr.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union, no ZeroDivisionError


@pytest.mark.parametrize("completion,gt,expected", [
    ("<answer>{[5, 5, 15, 15]}</answer>", [0, 0, 10, 10], 0.0),
    ("<answer>{\"bbox\": [0, 0, 10, 8]}</answer>", [0, 0, 10, 10], 1.0),
    ("<answer>[2,2,12,12]</answer>", "[0, 0, 10, 10]", 0.0),
    ("<answer>[0.0, 0.0, 10.0, 9.5]</answer>", "[0, 0, 10, 10]", 1.0),
    ("<answer>no box</answer>", [0, 0, 10, 10], 0.0),
])
def test_iou_reward(completion, gt, expected):
    assert cr.iou_reward(completion, {"answer": gt}) == expected


def test_set_overlap_reward():
    assert cr.set_overlap_reward("<answer>cat, dog</answer>", {"answer": "dog, car"}) == pytest.approx(1 / 3)
    assert cr.set_overlap_reward("<answer>Dog,cat</answer>", {"answer": ["cat", "dog"]}) == 1.0
    assert cr.set_overlap_reward("<answer>bird</answer>", {"answer": "cat"}) == 0.0
    assert cr.set_overlap_reward("", {"answer": ""}) == 0.0


def test_stage_reward_specs():
    assert cr.stage_reward("judge") == (("judge", 1.0), ("hash_format", 1.0))
    assert cr.stage_reward("choice") == (("choice", 1.0), ("hash_format", 1.0))
    assert cr.stage_reward("open") == (("final_answer", 1.0), ("hash_format", 1.0))
    with pytest.raises(ValueError, match="judge"):
        cr.stage_reward("essay")


# ------------------------------------------------------------------------ record recasting


RECORDS = arithmetic(40, 3) + countdown(40, 3, min_numbers=2, max_numbers=4)


@pytest.mark.parametrize("stage", cr.STAGES)
def test_gold_responses_score_full_reward(stage):
    fn = rw.combine(cr.stage_reward(stage))
    recs = cr.stage_records(RECORDS, stage, seed=0)
    np.testing.assert_array_equal(rw.score(fn, [r["response"] for r in recs], recs), 2.0)
    for src, r in zip(RECORDS, recs):  # every field kept, the source answer remembered
        assert r["id"] == src["id"] and r["category"] == src["category"]
        assert r["curr_reft_stage"] == stage and r["source_answer"] == src["answer"]
        assert r["response"].endswith(f"#### {r['answer']}" if stage != "open" else src["response"])


def test_recasting_is_deterministic_per_id_and_seed():
    for stage in ("judge", "choice"):
        a = cr.stage_records(RECORDS, stage, seed=0)
        assert a == cr.stage_records(RECORDS, stage, seed=0)
        assert a[5:9] == cr.stage_records(RECORDS[5:9], stage, seed=0)  # independent of neighbours
        assert a != cr.stage_records(RECORDS, stage, seed=1)


def test_judge_is_balanced_and_candidates_match_the_verdict():
    recs = [cr.as_judge(r, np.random.default_rng(i)) for i, r in enumerate(RECORDS * 3)]
    yes = [r["answer"] == "yes" for r in recs]
    assert 0.35 < np.mean(yes) < 0.65
    for r, y in zip(recs, yes):
        if "numbers" in r:
            assert verify_countdown(r["candidate"], r["numbers"], r["source_answer"]) == y
        else:
            assert (r["candidate"] == r["source_answer"]) == y
        assert f"Is the answer {r['candidate']}?" in r["prompt"] or f"Is {r['candidate']} a" in r["prompt"]


def test_choice_options():
    for i, rec in enumerate(RECORDS):
        r = cr.as_choice(rec, np.random.default_rng(i), num_options=4)
        opts = r["options"]
        assert len(opts) == 4 and len(set(opts)) == 4
        pos = "ABCD".index(r["answer"])
        if "numbers" in rec:
            ok = [verify_countdown(o, rec["numbers"], rec["answer"]) for o in opts]
        else:
            ok = [o == rec["answer"] for o in opts]
            assert all(int(o) >= 0 for o in opts)
        assert ok == [k == pos for k in range(4)]
        for k, o in enumerate(opts):
            assert f"\n{'ABCD'[k]}. {o}\n" in r["prompt"]
    five = cr.as_choice(ARITH, np.random.default_rng(0), num_options=5)
    assert len(set(five["options"])) == 5 and five["answer"] in "ABCDE"
    with pytest.raises(ValueError, match="num_options"):
        cr.as_choice(ARITH, np.random.default_rng(0), num_options=6)


def test_numeric_distractors():
    rng = np.random.default_rng(0)
    zero = cr.numeric_distractors("0", 4, rng)
    assert len(set(zero)) == 4 and all(int(d) > 0 for d in zero)
    dec = cr.numeric_distractors("2.5", 3, rng)
    assert all(len(d.split(".")[1]) == 1 and d != "2.5" for d in dec)
    assert cr.canonical_number("1,000") == "1000" and cr.canonical_number("$18") == "18"
    rec = cr.as_choice({**ARITH, "answer": "1,000", "response": "#### 1,000"}, rng)
    assert "1000" in rec["options"]  # gold formatted like the distractors
    with pytest.raises(ValueError, match="numeric answer"):
        cr.as_judge({**ARITH, "answer": r"\frac{1}{2}"}, rng)


def test_countdown_distractors_with_two_numbers_fall_back_to_offsets():
    got = cr.countdown_distractors("5 + 3", 8, 4, np.random.default_rng(0))
    values = [eval(g) for g in got]  # noqa: S307 -- our own generated arithmetic
    assert len(set(values)) == 4 and 8 not in values
    assert {"5 - 3", "5 * 3"} <= set(got)  # the two other operators come first


def test_open_stage_is_unchanged():
    out = cr.stage_records([ARITH, CD], "open", seed=0)
    for src, r in zip([ARITH, CD], out):
        assert {k: v for k, v in r.items() if k not in ("curr_reft_stage", "source_answer")} == src
    with pytest.raises(ValueError, match="stage"):
        cr.stage_records([ARITH], "essay", seed=0)

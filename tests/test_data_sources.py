"""Tests for curriculax.data: records, synthetic tasks, JSONL loaders, TFDS source."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import ml_collections
import pytest

from curriculax.data import jsonl, synthetic
from curriculax.data.records import FIELDS, DataError, validate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STEP = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")


def _shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent (expected at <repo>/../shared/data)")
    return path


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _assert_names(err: pytest.ExceptionInfo, path: Path | str | None, line: int | None, field: str | None) -> None:
    message = str(err.value)
    if path is not None:
        assert str(path) in message
    if line is not None:
        assert f"line {line}" in message and err.value.line == line
    if field is not None:
        assert f"field {field!r}" in message and err.value.field == field
    assert "Fix:" in message


GOOD = {"id": "a-1", "prompt": "1+1?", "response": "1 + 1 = 2\n#### 2", "answer": "2",
        "category": "addsub", "difficulty": 1}


# ---------------------------------------------------------------- records

def test_validate_accepts_good_and_extras_and_coerces_numpy_int():
    assert validate(GOOD) is GOOD
    assert validate({**GOOD, "stage": 2, "numbers": [1, 2]})["numbers"] == [1, 2]
    out = validate({**GOOD, "difficulty": np.int64(4)})
    assert type(out["difficulty"]) is int and out["difficulty"] == 4
    assert isinstance(DataError("x"), ValueError)


@pytest.mark.parametrize("change, field", [
    ({"answer": None}, "answer"), ({"prompt": 3}, "prompt"), ({"id": "  "}, "id"),
    ({"difficulty": "3"}, "difficulty"), ({"difficulty": True}, "difficulty"),
    ({"difficulty": -1}, "difficulty"), ({"stage": 1.5}, "stage"),
])
def test_validate_rejects_naming_source_line_field(change, field):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(DataError) as err:
        validate(bad, source="data/x.jsonl", line=7)
    _assert_names(err, "data/x.jsonl", 7, field)


def test_validate_rejects_non_mapping():
    with pytest.raises(DataError, match="JSON object"):
        validate(["not", "a", "dict"])


# ---------------------------------------------------------------- synthetic: arithmetic

def _check_arith(rec: dict, max_value: int) -> None:
    *steps, final = rec["response"].splitlines()
    assert final == f"#### {rec['answer']}"
    assert len(steps) == rec["difficulty"]
    allowed = {"addsub": "+-", "mul": "*", "mixed": "+-*"}[rec["category"]]
    prompt_numbers = [int(x) for x in re.findall(r"\d+", rec["prompt"])]
    value = prompt_numbers[0]
    for k, line in enumerate(steps):
        a, op, b, c = STEP.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert a == value and op in allowed
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op], line
        assert b == prompt_numbers[k + 1]  # operands appear in the prompt in order
        assert 1 <= c <= max_value
        value = c
    assert int(rec["answer"]) == value


def test_arithmetic_answers_recompute():
    recs = synthetic.arithmetic(600, seed=3)
    for rec in recs:
        validate(rec)
        _check_arith(rec, 10_000)
    assert len({r["id"] for r in recs}) == len(recs) and recs[5]["id"] == "arith-3-5"
    assert {r["difficulty"] for r in recs} == set(range(1, 9))
    assert Counter(r["category"] for r in recs).keys() == {"addsub", "mul", "mixed"}
    assert {op for r in recs if r["category"] == "mixed" for op in re.findall(r" ([+\-*]) ", r["response"])} \
        == {"+", "-", "*"}


def test_arithmetic_options_and_determinism():
    recs = synthetic.arithmetic(200, seed=1, min_steps=8, max_steps=8, categories=("mul",), max_value=600)
    for rec in recs:
        _check_arith(rec, 600)
    assert {r["difficulty"] for r in recs} == {8}
    assert synthetic.arithmetic(10, seed=9) == synthetic.arithmetic(10, seed=9)
    assert synthetic.arithmetic(10, seed=9)[:4] == synthetic.arithmetic(4, seed=9)
    assert synthetic.arithmetic(5, seed=9) != synthetic.arithmetic(5, seed=10)
    with pytest.raises(ValueError):
        synthetic.arithmetic(3, 0, categories=("div",))
    with pytest.raises(ValueError):
        synthetic.arithmetic(3, 0, min_steps=4, max_steps=2)


# ---------------------------------------------------------------- synthetic: countdown

def test_countdown_solutions_are_valid():
    recs = synthetic.countdown(400, seed=5)
    for rec in recs:
        validate(rec)
        numbers, target = rec["numbers"], int(rec["answer"])
        assert len(numbers) == rec["difficulty"] and rec["category"] == "countdown"
        assert all(str(x) in rec["prompt"] for x in numbers) and str(target) in rec["prompt"]
        *steps, final = rec["response"].splitlines()
        pool = Counter(numbers)
        for line in steps:  # each step consumes two available values and adds its result
            a, op, b, c = (int(x) if x.isdigit() else x for x in STEP.match(line).groups())
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 1
            used = Counter([a, b])
            assert all(pool[v] >= n for v, n in used.items()), line
            pool -= used
            pool[c] += 1
        assert +pool == Counter([target]) and len(steps) == len(numbers) - 1
        assert final.startswith("#### ")
        assert synthetic.verify_countdown(final[5:], numbers, rec["answer"])
    assert {r["difficulty"] for r in recs} == {2, 3, 4, 5}
    assert synthetic.countdown(6, seed=5) == recs[:6]


@pytest.mark.parametrize("expr, ok", [
    ("(3 + 5) * 7", True), (" 7*(5+3) = 56 ", True), ("3 * 7 + 5 * 7", False),  # 7 used twice
    ("(3 + 5) * 7 - 0", False), ("56", False), ("8 * 7", False), ("(3 + 5) * 7 + 1", False),
    ("(3 + 5) / 7 * 49", False), ("-3 + 59", False), ("2 ** 5", False), ("True * 56", False),
    ("__import__('os').system('true')", False), ("x * 7", False), ("(3 + 5) * 7.0", False),
    ("", False), ("3 +", False), ("(" * 400 + "3" + ")" * 400, False), ("9" * 5000 + " * 7", False),
])
def test_verify_countdown(expr, ok):
    assert synthetic.verify_countdown(expr, [3, 5, 7, 2], 56) is ok


# ---------------------------------------------------------------- jsonl: generic reader / writer

def test_read_jsonl_errors_name_file_line_field(tmp_path):
    with pytest.raises(DataError) as err:
        list(jsonl.read_jsonl(tmp_path / "nope.jsonl"))
    _assert_names(err, tmp_path / "nope.jsonl", None, None)
    empty = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty") as err:
        list(jsonl.read_jsonl(empty))
    _assert_names(err, empty, None, None)
    cases = {  # file lines, expected (line, field)
        "badjson": (['{"q": "a"}', "", '{"q": "b",}'], 3, None),
        "array": (['{"q": "a"}', "[1, 2]"], 2, None),
        "missing": (['{"q": "a"}', '{"q": "b"}', '{"z": "c"}'], 3, "q"),
        "blank": (['{"q": "   "}'], 1, "q"),
    }
    for name, (lines, line, field) in cases.items():
        path = _write_lines(tmp_path / f"{name}.jsonl", lines)
        with pytest.raises(DataError) as err:
            list(jsonl.read_jsonl(path, required=("q",)))
        _assert_names(err, path, line, field)
    with pytest.raises(DataError, match="cannot open it") as err:  # a directory
        list(jsonl.read_jsonl(tmp_path))
    _assert_names(err, tmp_path, None, None)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"q": "a"}\n{"q": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*save the file as UTF-8") as err:
        list(jsonl.read_jsonl(latin, required=("q",)))
    _assert_names(err, latin, 2, None)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + '{"q": "a"}\n'.encode())
    assert list(jsonl.read_jsonl(bom)) == [{"q": "a"}]


def test_write_jsonl_roundtrip_and_atomic(tmp_path):
    recs = [{**GOOD, "id": f"r{i}", "prompt": "Ünïcödé ✓ 数学"} for i in range(3)]
    out = jsonl.write_jsonl(recs, tmp_path / "sub" / "out.jsonl")
    assert list(jsonl.read_jsonl(out, required=FIELDS)) == recs
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would make it, not mkstemp's 0600
    before = out.read_bytes()
    bad = recs[:2] + [{**GOOD, "difficulty": "hard"}]
    with pytest.raises(DataError) as err:
        jsonl.write_jsonl(iter(bad), out)
    _assert_names(err, out, 3, "difficulty")
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no temp file left


# ---------------------------------------------------------------- jsonl: gsm8k

GSM_LINES = [
    json.dumps({"question": "Ann has 2 boxes of 1,000 pens. How many?",
                "answer": "Each box: 1,000 pens.\n\nSo 2 * 1000 = <<2*1000=2000>>2,000 pens.\n#### 2,000"}),
    json.dumps({"question": "Q2", "answer": "1+1=<<1+1=2>>2\n#### 2"}),
]


def test_gsm8k_inline(tmp_path):
    path = _write_lines(tmp_path / "mini.jsonl", GSM_LINES)
    first, second = jsonl.gsm8k(path)
    assert first == {"id": "gsm8k-mini-1", "prompt": "Ann has 2 boxes of 1,000 pens. How many?",
                     "response": "Each box: 1,000 pens.\nSo 2 * 1000 = 2,000 pens.\n#### 2000",
                     "answer": "2000", "category": "gsm8k", "difficulty": 2}
    assert second["difficulty"] == 1 and second["id"] == "gsm8k-mini-2"
    kept = jsonl.gsm8k(path, keep_calc=True, limit=1, category="gsm")
    assert len(kept) == 1 and "<<2*1000=2000>>" in kept[0]["response"] and kept[0]["category"] == "gsm"


def test_gsm8k_missing_final_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [GSM_LINES[0], json.dumps({"question": "Q", "answer": "no end"})])
    with pytest.raises(DataError) as err:
        jsonl.gsm8k(path)
    _assert_names(err, path, 2, "answer")
    path = _write_lines(tmp_path / "bad2.jsonl", [json.dumps({"question": "", "answer": "#### 1"})])
    with pytest.raises(DataError) as err:
        jsonl.gsm8k(path)
    _assert_names(err, path, 1, "question")


def test_gsm8k_shared_test_split():
    recs = jsonl.gsm8k(_shared("gsm8k", "test.jsonl"))
    assert len(recs) == 1319 and len({r["id"] for r in recs}) == 1319
    janet = recs[0]
    assert janet["id"] == "gsm8k-test-1" and janet["prompt"].startswith("Janet’s ducks")
    assert janet["difficulty"] == 2 and janet["answer"] == "18"
    assert janet["response"].splitlines() == [
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer’s market.", "#### 18"]
    assert not any("<<" in r["response"] for r in recs)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", r["answer"]) for r in recs)
    assert all(r["difficulty"] == len(r["response"].splitlines()) - 1 for r in recs)
    assert min(r["difficulty"] for r in recs) >= 2 and max(r["difficulty"] for r in recs) >= 8


# ---------------------------------------------------------------- jsonl: MATH

def _math_line(solution: str, level: str = "Level 3", subject: str = "Algebra") -> str:
    return json.dumps({"problem": "P", "level": level, "type": subject, "solution": solution})


@pytest.mark.parametrize("solution, answer", [
    (r"So $x=\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"First $\boxed{3}$, corrected: $\boxed{\left(\tfrac{3}{2}, -\tfrac{5}{2}\right)}$",
     r"\left(\tfrac{3}{2}, -\tfrac{5}{2}\right)"),
    (r"The answer is $\boxed 5$.", "5"),
    (r"Thus \fbox{7}.", "7"),
])
def test_last_boxed(solution, answer):
    assert jsonl.last_boxed(solution) == answer


def test_math_inline(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [
        _math_line(r"Hence $\boxed{\sqrt{2}}$", "Level 5", "Geometry"), _math_line(r"$\boxed{4}$", "Level 1")])
    first, second = jsonl.math(path)
    assert first == {"id": "math-m-1", "prompt": "P", "response": r"Hence $\boxed{\sqrt{2}}$",
                     "answer": r"\sqrt{2}", "category": "Geometry", "difficulty": 5}
    assert second["difficulty"] == 1 and len(jsonl.math(path, limit=1)) == 1


@pytest.mark.parametrize("line2, field", [
    (_math_line("no boxed answer here"), "solution"),
    (_math_line(r"$\boxed{\frac{1}{2}$"), "solution"),  # unbalanced
    (_math_line(r"$\boxed{ }$"), "solution"),  # empty
    (_math_line(r"$\boxed{1}$", "Level ?"), "level"),
    (json.dumps({"problem": "P", "level": "Level 2", "solution": r"\boxed{1}"}), "type"),
])
def test_math_errors(tmp_path, line2, field):
    path = _write_lines(tmp_path / "m.jsonl", [_math_line(r"\boxed{1}"), line2])
    with pytest.raises(DataError) as err:
        jsonl.math(path)
    _assert_names(err, path, 2, field)


def test_math_skip_unknown_level(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [_math_line(r"\boxed{1}", "Level ?"), _math_line(r"\boxed{2}")])
    (rec,) = jsonl.math(path, unknown_level="skip")
    assert rec["answer"] == "2" and rec["id"] == "math-m-2"


def test_math_shared_subset():
    path = _shared("math", "test1000.jsonl")
    recs = jsonl.math(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == len(raw) == 1000
    assert [r["difficulty"] for r in recs] == [int(r["level"].split()[1]) for r in raw]
    assert len({r["category"] for r in recs}) == 7 and "Number Theory" in {r["category"] for r in recs}
    by_id = {r["id"]: r for r in recs}
    assert by_id["math-test1000-428"]["answer"] == r"\frac{\sqrt{3}}{9}"  # nested braces
    assert by_id["math-test1000-176"]["answer"] == r"\frac{639}{40}"  # last of two boxed answers
    assert by_id["math-test1000-1"]["answer"] == "1000000"


# ---------------------------------------------------------------- tfds over JSONL

def test_tfds_roundtrip(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from curriculax.data import tfds_source

    train = synthetic.arithmetic(12, seed=0) + [{**GOOD, "id": "u", "prompt": "Ünïcödé ✓ 数学"}]
    test = synthetic.countdown(5, seed=0)  # has an extra 'numbers' field, not stored
    jsonl.write_jsonl(train, tmp_path / "train.jsonl")
    jsonl.write_jsonl(test, tmp_path / "test.jsonl")
    builder = tfds_source.build_jsonl_dataset(
        {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}, tmp_path / "tfds")
    assert builder.info.splits["train"].num_examples == len(train)
    (tmp_path / "train.jsonl").unlink()  # reading needs only the prepared files
    source = tfds_source.data_source(tmp_path / "tfds", "train")
    assert len(source) == len(train) and isinstance(source[3]["prompt"], bytes)
    assert tfds_source.records_from_source(source) == train  # same records, same order
    by_name = tfds.data_source("curriculax_jsonl/default", data_dir=str(tmp_path / "tfds"), split="test")
    assert tfds_source.records_from_source(by_name) == [{k: r[k] for k in FIELDS} for r in test]
    from curriculax.data.sources import SOURCES  # config.data.path / eval_path = DIR[:SPLIT]
    c = ml_collections.ConfigDict(dict(source="tfds", path=str(tmp_path / "tfds"), num_train=0, num_eval=0,
                                       eval_path=f"{tmp_path / 'tfds'}:test", min_difficulty=0, max_difficulty=99,
                                       eval_min_difficulty=0, eval_max_difficulty=99))
    assert SOURCES["tfds"](c, 0, train=True) == train
    assert SOURCES["tfds"](c, 0, train=False) == [{k: r[k] for k in FIELDS} for r in test]
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules
    with pytest.raises(FileNotFoundError, match="build_jsonl_dataset"):
        tfds_source.data_source(tmp_path / "elsewhere", "train")
    bad = _write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "difficulty": "x"})])
    with pytest.raises(DataError) as err:
        tfds_source.build_jsonl_dataset({"train": bad}, tmp_path / "tfds_bad")
    _assert_names(err, bad.resolve(), 2, "difficulty")


# ---------------------------------------------------------------- package

def test_package_import_is_fast_and_lazy():
    code = ("import sys, time; t = time.perf_counter(); import curriculax.data as d; "
            "print(time.perf_counter() - t, 'tensorflow_datasets' in sys.modules, "
            "d.records is sys.modules['curriculax.data.records'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert float(out[0]) < 1.0 and out[1:] == ["False", "True"]


def test_one_file_split_needs_a_held_out_count(tmp_path):
    from curriculax.data.sources import load_records
    from curriculax.train import quickstart_config

    rows = [{"id": f"x{i}", "prompt": f"p{i}", "response": "r", "answer": "a", "category": "c", "difficulty": 1}
            for i in range(6)]
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    c = quickstart_config().data
    c.update(source="jsonl", path=str(path), eval_path="", num_train=0, num_eval=2)
    train, held_out = load_records(c, 0)
    assert [r["prompt"] for r in held_out] == ["p4", "p5"] and len(train) == 4
    c.num_eval = 0  # train[:-0] used to empty the training set
    with pytest.raises(ValueError, match="config.data.num_eval=0"):
        load_records(c, 0)


def test_generated_held_out_set_is_full_and_disjoint():
    """Countdown at one difficulty repeats problems: the held-out draw grows until num_eval
    prompts are not training prompts (4x over-draw once gave 49 of 96)."""
    from curriculax.data.sources import load_records
    from curriculax.train import quickstart_config

    c = quickstart_config().data
    c.update(source="countdown", num_train=4000, num_eval=96, min_difficulty=2, max_difficulty=2,
             eval_min_difficulty=2, eval_max_difficulty=2)
    train, held_out = load_records(c, 0)
    assert len(held_out) == 96 and not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_difficulty_filter_is_logged_and_an_empty_result_names_the_range(tmp_path, caplog):
    """Records outside [min_difficulty, max_difficulty] used to vanish without a word; when none
    was left the error blamed num_eval ("leaves no training data out of 0 records")."""
    from curriculax.data.sources import load_records
    from curriculax.train import quickstart_config

    rows = [{**GOOD, "id": f"x{i}", "prompt": f"p{i}", "difficulty": i % 4} for i in range(12)]
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    c = quickstart_config().data  # difficulty 1..2
    c.update(source="jsonl", path=str(path), eval_path="", num_train=0, num_eval=2)
    with caplog.at_level("WARNING", logger="curriculax.data.sources"):
        train, held_out = load_records(c, 0)
    assert len(train) + len(held_out) == 6
    assert "6 of 12 records" in caplog.text and "config.data.min_difficulty" in caplog.text
    c.update(min_difficulty=5, max_difficulty=9)
    with pytest.raises(ValueError, match=r"config.data.min_difficulty=5.*max_difficulty=9.*0\.\.3"):
        load_records(c, 0)


def test_num_eval_zero_reads_the_whole_eval_file(tmp_path):
    """data.num_eval=0 with an eval file means all of it (like num_train=0), as the file loader
    intends; it used to be cut to nothing ("ExampleBank.build got no records")."""
    from curriculax.data.sources import load_records
    from curriculax.train import quickstart_config

    rows = [{**GOOD, "id": f"x{i}", "prompt": f"p{i}"} for i in range(6)]
    train_path = _write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in rows[:4]])
    eval_path = _write_lines(tmp_path / "test.jsonl", [json.dumps(r) for r in rows[4:]])
    c = quickstart_config().data
    c.update(source="jsonl", path=str(train_path), eval_path=str(eval_path), num_train=0, num_eval=0)
    train, held_out = load_records(c, 0)
    assert len(train) == 4 and [r["prompt"] for r in held_out] == ["p4", "p5"]
    c.update(source="arithmetic", path="", eval_path="", num_train=8)
    with pytest.raises(ValueError, match="config.data.num_eval=0"):
        load_records(c, 0)


def test_default_config_data_loads_and_generator_errors_name_config_fields():
    """default_config() paired max_difficulty=8 with max_value=100, which 'mul' chains cannot
    fit, so get_config("default") failed with the generator's own argument names."""
    from curriculax.data.sources import load_records
    from curriculax.train import default_config, quickstart_config

    train, held_out = load_records(default_config().data, 0)
    assert len(train) == 2000 and len(held_out) == 128 and max(r["difficulty"] for r in train) == 8
    assert quickstart_config().data.max_value == 100  # the quickstart's data is unchanged
    c = default_config().data
    c.max_value = 100
    with pytest.raises(ValueError, match=r"max_value=100 is too small.*max_steps is config\.data\.max_difficulty"
                                         r".*max_value is config\.data\.max_value"):
        load_records(c, 0)

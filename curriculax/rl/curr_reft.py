"""Curr-ReFT: curriculum reinforcement fine-tuning over question formats (judge -> choice -> open).

Paper: Deng, Zou, Ma, Luo, Cao, Kang, "Boosting the Generalization and Reasoning of Vision Language
Models with Curriculum Reinforcement Learning", 2025 (arXiv 2503.07065); code ``ding523/Curr_REFT``.

The same tasks are trained with GRPO in three stages whose *question format* gets harder, each
stage starting from the previous stage's checkpoint:

1. ``judge``  -- "Is the answer N?"; the answer is yes/no.
2. ``choice`` -- multiple choice with options A-E.
3. ``open``   -- the original open-ended task.

Rewards (total = accuracy + format, weight 1 each, so R in [0, 2])::

    judge : 1 iff yesno(pred) == yesno(solution) != None, where yesno(t) = "yes" if t (lower-cased)
            has a standalone yes|true|correct, else "no" if no|false|incorrect, else None
    choice: 1 iff letters(pred) == letters(solution) != "", letters = standalone A-E in order of
            first occurrence, de-duplicated, joined with "," (order-sensitive: "C,A" != "A,C")
    iou   : 1 iff IoU(pred box, gt box) > 0.5; boxes "[x1, y1, x2, y2]"; intersection width with
            their inclusive-pixel convention (min(x2)-1) - max(x1) + 1, counted only when
            max(x1) < min(x2)-1 (so a 1-pixel overlap is 0), union from plain areas (x2-x1)(y2-y1)
    set_overlap: |pred ∩ gt| / |pred ∪ gt| over comma-separated class names (stripped, lower-cased)

``pred`` is the text inside the first ``<answer>...</answer>``; without tags we read the ``####``
answer line, else the whole completion (our SFT data answers with ``#### X``). The solution
(``record["answer"]``) is read the same way.

Substitutions for our text tasks (documented deviations): the format reward is ``hash_format``
(a ``#### X`` line) instead of ``think_answer_format``, because our warm-up data answers with
``####``; the open-stage accuracy is ``final_answer`` (the evaluator's answer match, or the
countdown verifier) instead of math-verify + their lenient substring fallback (which a
completion listing many numbers could game). Numeric-answer records (arithmetic, GSM8K,
countdown) are recast into the three formats by :func:`as_judge`, :func:`as_choice`,
:func:`as_open`; countdown candidates are *expressions* (the target is already in the prompt).

Recast records keep every field and add ``curr_reft_stage``, ``source_answer`` and
``candidate`` (judge) or ``options`` (choice); record i of a stage depends only on (its id, seed).
Their warm-up responses keep the worked steps and end with ``#### yes``/``#### no``/``#### B``.
The four rewards above are registered in :mod:`curriculax.rl.rewards` as ``judge``, ``choice``,
``iou`` and ``set_overlap``.

Defaults (their scripts + TRL 0.15 ``GRPOConfig``; :data:`STAGE_DEFAULTS`, :data:`RL_DEFAULTS`):
group size (num_generations) 4 / 2 / 4 and epochs 1 / 1 / 2 for judge / choice / open; beta 0.04
(k3 KL to the stage's initial model), lr 1e-6, max completion length 256, temperature 1.0;
advantages ``(R - mean) / (std_bessel + 1e-4)`` per group, one update per batch, no clipping.
Recasting: 50/50 yes/no judge questions, 4 choice options (A-D).

Usage::

    for stage in curr_reft.STAGES:
        recs = curr_reft.stage_records(train_records, stage, seed=0)
        reward = rewards.combine(curr_reft.stage_reward(stage))
        ...  # GRPO on recs, starting from the previous stage's checkpoint
"""

from __future__ import annotations

import ast
import itertools
import re
import zlib
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

from curriculax.data.synthetic import verify_countdown

STAGES: tuple[str, ...] = ("judge", "choice", "open")
LETTERS = "ABCDE"
STAGE_DEFAULTS: dict[str, dict[str, int]] = {
    "judge": dict(num_generations=4, epochs=1),
    "choice": dict(num_generations=2, epochs=1),
    "open": dict(num_generations=4, epochs=2),
}
RL_DEFAULTS: dict[str, float] = dict(beta=0.04, learning_rate=1e-6, max_completion_length=256,
                                     temperature=1.0, advantage_eps=1e-4)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_YES = re.compile(r"\b(?:yes|true|correct)\b")
_NO = re.compile(r"\b(?:no|false|incorrect)\b")
_LETTER = re.compile(r"\b[A-E]\b")
_NUM = r"\s*(-?\d*\.?\d+)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


# ---------------------------------------------------------------------------------- rewards


def answer_text(text: str) -> str:
    """Inside the first ``<answer>`` tags, else the ``####`` answer line, else all of ``text``."""
    m = _ANSWER_TAG.search(text)
    if m:
        return m.group(1)
    cut = text.rfind("####")
    if cut >= 0:
        rest = text[cut + 4:].strip()
        return rest.splitlines()[0] if rest else ""
    return text


def yes_no(text: str) -> str | None:
    """Stage-1 mapping: "yes" before "no" (so "not correct" reads as yes, as in their code)."""
    t = text.lower()
    if _YES.search(t):
        return "yes"
    if _NO.search(t):
        return "no"
    return None


def letters(text: str) -> str:
    """Standalone capitals A-E, first-occurrence order, de-duplicated, joined with ","."""
    return ",".join(dict.fromkeys(_LETTER.findall(text)))


def judge_reward(completion: str, record: dict) -> float:
    pred = yes_no(answer_text(completion))
    return float(pred is not None and pred == yes_no(answer_text(str(record["answer"]))))


def choice_reward(completion: str, record: dict) -> float:
    pred = letters(answer_text(completion))
    return float(pred != "" and pred == letters(answer_text(str(record["answer"]))))


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with their convention (see module docstring); 0.0 for an empty union."""
    x1, y1 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x2, y2 = min(box_a[2] - 1, box_b[2] - 1), min(box_a[3] - 1, box_b[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    union = ((box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
             + (box_b[2] - box_b[0]) * (box_b[3] - box_b[1]) - inter)
    return float(inter) / union if union > 0 else 0.0


def parse_box(text: str) -> list[float] | None:
    """The first ``[x1, y1, x2, y2]`` in ``text``."""
    m = _BOX.search(text)
    return [float(v) for v in m.groups()] if m else None


def iou_reward(completion: str, record: dict) -> float:
    pred = parse_box(answer_text(completion))
    gt = record["answer"]
    gt = parse_box(answer_text(gt)) if isinstance(gt, str) else [float(v) for v in gt]
    return float(pred is not None and gt is not None and iou(pred, gt) > 0.5)


def _classes(value: str | Sequence[str]) -> set[str]:
    items = value.split(",") if isinstance(value, str) else value
    return {c.strip().lower() for c in items if c.strip()}


def set_overlap_reward(completion: str, record: dict) -> float:
    pred = _classes(answer_text(completion))
    gt = record["answer"]
    gt = _classes(answer_text(gt) if isinstance(gt, str) else gt)
    union = pred | gt
    return len(pred & gt) / len(union) if union else 0.0


def stage_reward(stage: str) -> tuple[tuple[str, float], ...]:
    """The reward spec (for ``rewards.combine``): stage accuracy + ``hash_format``, weight 1 each."""
    accuracy = {"judge": "judge", "choice": "choice", "open": "final_answer"}[_check_stage(stage)]
    return ((accuracy, 1.0), ("hash_format", 1.0))


# --------------------------------------------------------------------------- record recasting


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"Curr-ReFT stage {stage!r}: choose one of {STAGES}.")
    return stage


def record_rng(record: dict, seed: int) -> np.random.Generator:
    """A generator fixed by (record id, seed); crc32, not ``hash``, so it is stable across runs."""
    return np.random.default_rng([seed, zlib.crc32(str(record["id"]).encode())])


def _reasoning(response: str) -> str:
    """The response without its final ``####`` line (the original worked steps)."""
    cut = response.rfind("####")
    return (response[:cut] if cut >= 0 else response).rstrip()


def _is_countdown(record: dict) -> bool:
    return "numbers" in record


def _numeric(answer: str) -> Decimal:
    try:
        value = Decimal(str(answer).strip().rstrip(".").replace(",", "").replace("$", ""))
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise ValueError(f"Curr-ReFT recasting needs a numeric answer (or a countdown record); "
                         f"got answer={answer!r}.")
    return value


def _places(value: Decimal) -> int:
    return max(0, -int(value.as_tuple().exponent))


def canonical_number(answer: str) -> str:
    """``answer`` as the options show it ("1,000" -> "1000", "$18" -> "18"), so the gold option
    is not given away by keeping its original formatting while the distractors are plain."""
    value = _numeric(answer)
    return _format(value, _places(value))


def numeric_distractors(answer: str, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` distinct wrong numbers near ``answer``: offsets of +-1..spread in its last decimal
    place, spread = max(k + 1, 10% of |answer|); non-negative answers get non-negative ones."""
    value = _numeric(answer)
    places = _places(value)
    unit = Decimal(1).scaleb(-places)
    scaled = int(value / unit)
    spread = max(k + 1, int(abs(scaled) * 0.1))
    pool = [scaled + d for d in range(-spread, spread + 1) if d != 0 and (scaled < 0 or scaled + d >= 0)]
    picks = rng.choice(len(pool), size=k, replace=False)
    return [_format(Decimal(pool[int(i)]) * unit, places) for i in picks]


def _format(value: Decimal, places: int) -> str:
    return f"{value:.{places}f}"


def _eval_expression(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp):
        a, b = _eval_expression(node.left), _eval_expression(node.right)
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
    raise ValueError(f"not a countdown expression node: {type(node).__name__}")


def countdown_distractors(expression: str, target: int, k: int,
                          rng: np.random.Generator) -> list[str]:
    """``k`` wrong expressions with distinct values: the gold expression with its operators
    reassigned (same numbers, value != target), then ``gold +- d`` when those run out."""
    expression = expression.split("=")[0].strip()
    tree = ast.parse(expression, mode="eval")
    ops = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp)]
    by_value: dict[int, str] = {}
    for assignment in itertools.product((ast.Add, ast.Sub, ast.Mult), repeat=len(ops)):
        for node, op in zip(ops, assignment):
            node.op = op()
        value = _eval_expression(tree.body)
        if value != int(target):
            by_value.setdefault(value, ast.unparse(tree))
    candidates = sorted(by_value.items())  # sorted: the rng alone decides the pick
    picks = [candidates[int(i)][1] for i in rng.permutation(len(candidates))[:k]]
    d = 1
    while len(picks) < k:  # e.g. two numbers: at most two other operators
        for text, value in ((f"{expression} + {d}", int(target) + d),
                            (f"{expression} - {d}", int(target) - d)):
            if len(picks) < k and value not in by_value:
                by_value[value] = text
                picks.append(text)
        d += 1
    return picks


def _gold_expression(record: dict) -> str:
    cut = record["response"].rfind("####")
    if cut < 0:
        raise ValueError(f"countdown record {record['id']!r} has no '#### <expression>' line.")
    rest = record["response"][cut + 4:].strip()
    expression = rest.splitlines()[0].split("=")[0].strip() if rest else ""
    if not verify_countdown(expression, record["numbers"], record["answer"]):
        raise ValueError(f"countdown record {record['id']!r}: gold expression {expression!r} "
                         f"does not reach {record['answer']} from {record['numbers']}.")
    return expression


def _countdown_question(record: dict) -> str:
    shown = ", ".join(str(x) for x in record["numbers"])
    return (f"Using the numbers {shown}, make {record['answer']}. "
            "You may use +, - and *, each number at most once.")


def _recast(record: dict, stage: str, prompt: str, response: str, answer: str, **extra) -> dict:
    """Keeps every field (id, category, difficulty, numbers, ...) and records the source answer."""
    return {**record, "prompt": prompt, "response": response, "answer": answer,
            "curr_reft_stage": stage, "source_answer": str(record["answer"]), **extra}


def as_judge(record: dict, rng: np.random.Generator) -> dict:
    """"Is the answer N?" with N the true answer or a nearby distractor (50/50); answer yes/no.

    The warm-up response keeps the worked steps, states the check, then ``#### yes``/``#### no``.
    Countdown records ask whether an expression is a correct solution instead.
    """
    correct = bool(rng.random() < 0.5)
    if _is_countdown(record):
        gold = _gold_expression(record)
        shown = gold if correct else countdown_distractors(gold, int(record["answer"]), 1, rng)[0]
        value = _eval_expression(ast.parse(shown.split("=")[0].strip(), mode="eval").body)
        prompt = (f"{_countdown_question(record)}\nIs {shown} a correct solution? "
                  "Answer yes or no after ####.")
        steps = f"{shown} = {value}"
    else:
        gold = canonical_number(record["answer"])
        shown = gold if correct else numeric_distractors(gold, 1, rng)[0]
        prompt = f"{record['prompt']}\nIs the answer {shown}? Answer yes or no after ####."
        steps = "\n".join(s for s in (_reasoning(record["response"]),
                                      f"{gold} {'=' if correct else '!='} {shown}") if s)
    verdict = "yes" if correct else "no"
    return _recast(record, "judge", prompt, f"{steps}\n#### {verdict}", verdict, candidate=shown)


def as_choice(record: dict, rng: np.random.Generator, num_options: int = 4) -> dict:
    """Options A.. with distinct distractors near the answer; the answer is the correct letter.

    The warm-up response keeps the worked steps, names the option, then ``#### <letter>``.
    """
    if not 2 <= num_options <= len(LETTERS):
        raise ValueError(f"num_options={num_options}: Curr-ReFT uses 2..{len(LETTERS)} (A-E).")
    position = int(rng.integers(num_options))
    if _is_countdown(record):
        gold = _gold_expression(record)
        wrong = countdown_distractors(gold, int(record["answer"]), num_options - 1, rng)
        question = _countdown_question(record) + "\nWhich expression is a correct solution?"
    else:
        gold = canonical_number(record["answer"])
        wrong = numeric_distractors(gold, num_options - 1, rng)
        question = record["prompt"]
    options = wrong[:position] + [gold] + wrong[position:]
    letter = LETTERS[position]
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    prompt = f"{question}\n{listed}\nAnswer with the letter of the correct option after ####."
    steps = "\n".join(s for s in (_reasoning(record["response"]), f"{gold} is option {letter}.") if s)
    return _recast(record, "choice", prompt, f"{steps}\n#### {letter}", letter, options=options)


def as_open(record: dict) -> dict:
    """The original task, unchanged apart from the stage tag."""
    return {**record, "curr_reft_stage": "open", "source_answer": str(record["answer"])}


def stage_records(records: Sequence[dict], stage: str, seed: int, *,
                  num_options: int = 4) -> list[dict]:
    """All records recast for ``stage``; record i depends only on (its id, seed)."""
    _check_stage(stage)
    if stage == "open":
        return [as_open(r) for r in records]
    if stage == "judge":
        return [as_judge(r, record_rng(r, seed)) for r in records]
    return [as_choice(r, record_rng(r, seed), num_options) for r in records]


def recast(records: Sequence[dict], stage: str, seed: int) -> list[dict]:
    """``stage_records``, plus ``"mixed"``: record i takes stage ``STAGES[i % 3]`` (a warm-up
    that teaches all three answer formats before the staged RL)."""
    if stage != "mixed":
        return stage_records(records, stage, seed)
    per_stage = {s: stage_records(records, s, seed) for s in STAGES}
    return [per_stage[STAGES[i % len(STAGES)]][i] for i in range(len(records))]

"""Synthetic tasks with exact answers and a controllable difficulty.

Both generators are deterministic: record ``i`` of ``seed`` is drawn from its own
``numpy.random.Generator`` seeded with ``(seed, i)``, so it does not depend on
``n`` (``arithmetic(10, s)[:5] == arithmetic(5, s)``).

* :func:`arithmetic` -- multi-step integer word problems.
  ``difficulty`` = number of steps, ``category`` = operation family.
* :func:`countdown` -- reach a target from given numbers with ``+ - *``.
  ``difficulty`` = how many numbers, ``category`` = ``"countdown"``;
  :func:`verify_countdown` checks a proposed expression (an RL reward).
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curriculax.data.records import Record

ARITH_CATEGORIES: tuple[str, ...] = ("addsub", "mul", "mixed")
_OPS_BY_CATEGORY = {"addsub": ("+", "-"), "mul": ("*",), "mixed": ("+", "-", "*")}
_NAMES = (("Tom", "He"), ("Ana", "She"), ("Ravi", "He"), ("Mia", "She"), ("Leo", "He"), ("Zoe", "She"))
_ITEMS = ("apples", "marbles", "coins", "stickers", "books", "cards", "shells", "stamps")
_MAX_ADDEND = 99
_MAX_FACTOR = 9
_MAX_MUL_START = 12  # small start values leave room for factors above 2


def _rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i])


def _clause(op: str, b: int) -> str:
    return {"+": f"gets {b} more", "-": f"gives away {b}", "*": f"ends up with {b} times as many"}[op]


def _arith_step(rng: np.random.Generator, ops: Sequence[str], value: int, max_value: int,
                steps_left: int) -> tuple[str, int]:
    """Pick one feasible (op, operand) keeping the value in [1, max_value].

    For pure-multiplication chains ``steps_left`` reserves room for a factor of
    at least 2 in every remaining step.
    """
    reserve = 2 ** steps_left if ops == ("*",) else 1
    feasible = [op for op, ok in (("+", value < max_value), ("-", value >= 2),
                                  ("*", value * 2 * reserve <= max_value)) if op in ops and ok]
    op = str(rng.choice(feasible))
    if op == "+":
        b = int(rng.integers(1, min(_MAX_ADDEND, max_value - value) + 1))
    elif op == "-":
        b = int(rng.integers(1, min(_MAX_ADDEND, value - 1) + 1))
    else:
        b = int(rng.integers(2, min(_MAX_FACTOR, max_value // (value * reserve)) + 1))
    return op, b


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_record(rng: np.random.Generator, rid: str, steps: int, category: str, max_value: int) -> Record:
    ops = _OPS_BY_CATEGORY[category]
    hi = min(_MAX_MUL_START, max_value // 2 ** steps) if ops == ("*",) else _MAX_ADDEND
    value = int(rng.integers(2, hi + 1))
    name, pronoun = _NAMES[int(rng.integers(len(_NAMES)))]
    item = _ITEMS[int(rng.integers(len(_ITEMS)))]
    start, clauses, lines = value, [], []
    for k in range(steps):
        op, b = _arith_step(rng, ops, value, max_value, steps - k - 1)
        new = _apply(op, value, b)
        clauses.append(_clause(op, b))
        lines.append(f"{value} {op} {b} = {new}")
        value = new
    prompt = (f"{name} has {start} {item}. {pronoun} " + ", then ".join(clauses)
              + f". How many {item} does {pronoun.lower()} have?")
    lines.append(f"#### {value}")
    return {"id": rid, "prompt": prompt, "response": "\n".join(lines), "answer": str(value),
            "category": category, "difficulty": steps}


def arithmetic(n: int, seed: int, *, min_steps: int = 1, max_steps: int = 8,
               categories: Sequence[str] = ARITH_CATEGORIES, max_value: int = 10_000) -> list[Record]:
    """Multi-step integer word problems ("Tom has 12 apples. He gets 5 more, ...").

    The response is one worked step per line (``12 + 5 = 17``) and a final
    ``#### <answer>`` line.  ``difficulty`` is the number of steps, drawn
    uniformly from ``[min_steps, max_steps]``; ``category`` is the operation
    family drawn uniformly from ``categories``: ``addsub`` (+, -), ``mul``
    (only *, factors 2..9) or ``mixed`` (+, -, *).  Every intermediate value
    stays in ``[1, max_value]``; addends are at most 99, ``mul`` chains start
    at most at 12 and reserve room for a factor >= 2 in every step.
    """
    unknown = set(categories) - set(ARITH_CATEGORIES)
    if unknown or not categories:
        raise ValueError(f"categories must be a non-empty subset of {ARITH_CATEGORIES}, got {categories!r}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if max_value < 100 or ("mul" in categories and max_value < 2 * 2 ** max_steps):
        raise ValueError(f"max_value={max_value} is too small: need >= 100 and >= 2 * 2**max_steps for 'mul'")
    records = []
    for i in range(n):
        rng = _rng(seed, i)
        steps = int(rng.integers(min_steps, max_steps + 1))
        category = str(categories[int(rng.integers(len(categories)))])
        records.append(_arith_record(rng, f"arith-{seed}-{i}", steps, category, max_value))
    return records


@dataclass(frozen=True)
class _Node:
    """An expression tree node: a leaf number (op is None) or ``left op right``."""

    value: int
    op: str | None = None
    left: _Node | None = None
    right: _Node | None = None


_PREC = {"+": 1, "-": 1, "*": 2}


def _expr(node: _Node) -> str:
    """Render with the fewest parentheses that keep the meaning."""
    if node.op is None:
        return str(node.value)

    def side(child: _Node, right: bool) -> str:
        text = _expr(child)
        if child.op and (_PREC[child.op] < _PREC[node.op] or (right and node.op == "-" and _PREC[child.op] == 1)):
            return f"({text})"
        return text

    return f"{side(node.left, False)} {node.op} {side(node.right, True)}"


def _combine(rng: np.random.Generator, a: _Node, b: _Node, max_target: int) -> _Node | None:
    """Join two sub-expressions with a random feasible op (results stay in 1..max_target)."""
    if a.value < b.value:
        a, b = b, a
    ops = [op for op, ok in (("+", a.value + b.value <= max_target), ("-", a.value > b.value),
                             ("*", b.value > 1 and a.value * b.value <= max_target)) if ok]
    if not ops:
        return None
    op = str(rng.choice(ops))
    return _Node(_apply(op, a.value, b.value), op, a, b)


def _countdown_tree(rng: np.random.Generator, numbers: list[int], max_target: int) -> list[_Node] | None:
    """Randomly combine all numbers; return the internal nodes in solving order."""
    pool, steps = [_Node(x) for x in numbers], []
    while len(pool) > 1:
        i, j = (int(x) for x in rng.choice(len(pool), size=2, replace=False))
        node = _combine(rng, pool[i], pool[j], max_target)
        if node is None:
            return None
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [node]
        steps.append(node)
    return steps


def _countdown_record(rng: np.random.Generator, rid: str, k: int, max_number: int, max_target: int) -> Record:
    while True:  # resample until a tree fits in max_target (almost always the first try)
        numbers = [int(x) for x in rng.integers(1, max_number + 1, size=k)]
        steps = _countdown_tree(rng, numbers, max_target)
        if steps is not None:
            break
    target = steps[-1].value
    lines = [f"{s.left.value} {s.op} {s.right.value} = {s.value}" for s in steps]
    lines.append(f"#### {_expr(steps[-1])}")
    shown = ", ".join(str(x) for x in numbers)
    prompt = (f"Using the numbers {shown}, make {target}. You may use +, - and *, each number at most once. "
              "Show your steps, then write the final expression after ####.")
    return {"id": rid, "prompt": prompt, "response": "\n".join(lines), "answer": str(target),
            "category": "countdown", "difficulty": k, "numbers": numbers}


def countdown(n: int, seed: int, *, min_numbers: int = 2, max_numbers: int = 5, max_number: int = 25,
              max_target: int = 1000) -> list[Record]:
    """Countdown puzzles: reach ``answer`` (the target) from ``numbers`` with + - *.

    Each puzzle is made by combining all its numbers in a random expression
    tree, so a solution exists.  The response lists the steps one per line
    (``a op b = c``) and ends with ``#### <expression>``, e.g. ``#### (3 + 5) * 7``:
    the final line is the *expression*, not the target, so a reward can check it
    with :func:`verify_countdown` and cannot be gamed by echoing the target.
    ``difficulty`` = how many numbers (uniform in ``[min_numbers, max_numbers]``);
    ``category`` = ``"countdown"``; the extra field ``numbers`` lists the numbers.
    Intermediate values stay in ``[1, max_target]``.
    """
    if not 2 <= min_numbers <= max_numbers:
        raise ValueError(f"need 2 <= min_numbers <= max_numbers, got {min_numbers}, {max_numbers}")
    if max_number < 2 or max_target < 2 * max_number:
        raise ValueError(f"need max_number >= 2 and max_target >= 2 * max_number, got {max_number}, {max_target}")
    records = []
    for i in range(n):
        rng = _rng(seed, i)
        k = int(rng.integers(min_numbers, max_numbers + 1))
        records.append(_countdown_record(rng, f"countdown-{seed}-{i}", k, max_number, max_target))
    return records


_MAX_EXPRESSION_CHARS = 500
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def _eval_node(node: ast.AST) -> int:
    """Evaluate a whitelisted AST (ints, + - *); anything else raises ValueError."""
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        return _apply(_AST_OPS[type(node.op)], _eval_node(node.left), _eval_node(node.right))
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def verify_countdown(expression: str, numbers: Sequence[int], target: int | str) -> bool:
    """True iff ``expression`` uses only ``numbers`` (each at most once), + - * and
    parentheses, and equals ``target``.

    Never raises on bad input (it is used as a reward): anything unparsable or
    outside the whitelist is ``False``.  Nothing is ``eval``-ed: the text is
    parsed with :mod:`ast` and only integer constants and ``+ - *`` nodes are
    evaluated.  A trailing ``= <value>`` is ignored.
    """
    try:
        text = str(expression).split("=")[0].strip()
        if not text or len(text) > _MAX_EXPRESSION_CHARS:
            return False
        tree = ast.parse(text, mode="eval")
        # Check the leaves before computing, so huge literals never get multiplied.
        leaves = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
        if Counter(leaves) - Counter(int(x) for x in numbers):
            return False
        return _eval_node(tree) == int(target)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError, OverflowError):
        return False

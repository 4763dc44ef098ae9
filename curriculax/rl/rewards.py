"""Host-side reward functions for RL: ``fn(completion: str, record: dict) -> float``.

A reward reads one decoded completion and the record it answers (``answer``, and for countdown
``numbers``) and returns a float. Rewards are registered by name (config field ``rl.rewards``);
:func:`combine` turns a spec of ``(name_or_callable, weight)`` pairs into one reward::

    R(completion, record) = sum_k weight_k * reward_k(completion, record)

and :func:`score` applies it to a batch of completions, returning ``float32 [N]``.

Built-in rewards (all in {0, 1} except ``set_overlap``, which is in [0, 1]):

* ``math_answer`` -- 1 iff the final answer equals ``record["answer"]``, with the evaluator's
  extraction and comparison (:func:`curriculax.eval.extract_answer` /
  :func:`~curriculax.eval.answers_match`: a ``#### N`` line, else the last ``\\boxed{}``, else
  the last number; ``1,000`` == ``1000.0``). Using the evaluator's rule means the RL signal is
  exactly the accuracy that is reported.
* ``countdown`` -- 1 iff the first line after the last ``####`` is an expression that
  :func:`curriculax.data.synthetic.verify_countdown` accepts (numbers used at most once, value ==
  target). Echoing the target scores 0: the answer line must be the expression.
* ``final_answer`` -- ``countdown`` for records with ``numbers``, ``math_answer`` otherwise, so a
  mixed arithmetic + countdown set needs one reward.
* ``hash_format`` -- 1 iff some line is ``#### <something>``: the answer format of our SFT data.
* ``think_answer_format`` -- 1 iff the stripped completion fully matches
  ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL): the R1 / Curr-ReFT format reward.
* ``judge``, ``choice``, ``iou``, ``set_overlap`` -- the Curr-ReFT stage rewards
  (:mod:`curriculax.rl.curr_reft`).

A reward that raises inside :func:`score` counts as 0.0 (one warning per reward function), so a
malformed completion or a buggy custom reward never stops a run.

Usage::

    fn = rewards.combine([("math_answer", 1.0), ("hash_format", 0.1)])
    r = rewards.score(fn, texts, records)        # np.float32 [len(texts)]
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
import numpy as np

from curriculax.data.synthetic import verify_countdown
from curriculax.eval import answers_match, extract_answer
from curriculax.registry import Registry
from curriculax.rl import curr_reft

RewardFn = Callable[[str, dict], float]
RewardSpec = Sequence[tuple[str | RewardFn, float]] | Mapping[str, float]

log = logging.getLogger(__name__)

_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*\S", re.MULTILINE)
_THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def answer_line(text: str) -> str | None:
    """First line of the text after the last ``####`` (stripped), or ``None`` if absent/empty."""
    cut = text.rfind("####")
    if cut < 0:
        return None
    rest = text[cut + 4:].strip()
    return rest.splitlines()[0].strip() if rest else None


def math_answer(completion: str, record: dict) -> float:
    return float(answers_match(extract_answer(completion), str(record["answer"])))


def countdown(completion: str, record: dict) -> float:
    expression = answer_line(completion)
    if expression is None:
        return 0.0
    return float(verify_countdown(expression, record["numbers"], record["answer"]))


def final_answer(completion: str, record: dict) -> float:
    return countdown(completion, record) if "numbers" in record else math_answer(completion, record)


def hash_format(completion: str, record: dict) -> float:
    del record
    return float(_HASH_LINE.search(completion) is not None)


def think_answer_format(completion: str, record: dict) -> float:
    del record
    return float(_THINK_ANSWER.fullmatch(completion.strip()) is not None)


_REGISTRY: Registry[RewardFn] = Registry("reward", "rl.rewards")
register = _REGISTRY.register
get = _REGISTRY.get
names = _REGISTRY.names

for _name, _fn in (("math_answer", math_answer), ("countdown", countdown),
                   ("final_answer", final_answer), ("hash_format", hash_format),
                   ("think_answer_format", think_answer_format),
                   ("judge", curr_reft.judge_reward), ("choice", curr_reft.choice_reward),
                   ("iou", curr_reft.iou_reward), ("set_overlap", curr_reft.set_overlap_reward)):
    register(_name, _fn)


def _resolve(item: str | RewardFn) -> RewardFn:
    if callable(item):
        return item
    if item not in _REGISTRY:
        raise ValueError(f"Unknown reward {item!r} in config.rl.rewards; registered: {names()}.")
    return get(item)


def combine(spec: RewardSpec) -> RewardFn:
    """Weighted sum of rewards; ``spec`` = ``[(name_or_callable, weight), ...]`` or ``{name: w}``."""
    # hasattr, not isinstance(Mapping): an ml_collections ConfigDict is not a Mapping.
    if hasattr(spec, "items"):
        pairs = list(spec.items())
    else:
        if isinstance(spec, str):
            spec = (spec,)
        pairs = [tuple(p) if isinstance(p, (list, tuple)) else (p,) for p in spec]
        bad = [p for p in pairs if len(p) != 2]
        if bad:  # e.g. ("math_answer", 1.0) without the outer tuple
            raise ValueError(f"config.rl.rewards={spec!r}: expected (name, weight) pairs, e.g. "
                             f"(('math_answer', 1.0),); got {bad[0]!r}.")
    if not pairs:
        raise ValueError(f"config.rl.rewards is empty; name at least one of {names()}.")
    parts = []
    for item, weight in pairs:
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"config.rl.rewards: weight of {item!r} is {weight}; must be finite.")
        parts.append((_resolve(item), weight))

    def combined(completion: str, record: dict) -> float:
        return sum(w * fn(completion, record) for fn, w in parts if w != 0.0)

    combined.__name__ = "+".join(f"{w:g}*{getattr(fn, '__name__', 'reward')}" for fn, w in parts)
    return combined


_WARNED: set[str] = set()


def _warn_once(fn: RewardFn, message: str) -> None:
    name = getattr(fn, "__name__", repr(fn))  # combine() names its sums by their parts
    key = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}:{name}"
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("reward %s: %s; counted as 0.0 (further failures are not logged).", name, message)


def score(fn: RewardFn, completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
    """``float32 [N]`` rewards; a reward that raises or returns a non-finite value gives 0.0."""
    if len(completions) != len(records):
        raise ValueError(f"score: {len(completions)} completions but {len(records)} records.")
    out = np.zeros(len(completions), np.float32)
    for i, (text, record) in enumerate(zip(completions, records)):
        try:
            value = float(fn(text, record))
        except Exception as e:  # noqa: BLE001 -- a reward bug must not stop training
            _warn_once(fn, f"raised {type(e).__name__}: {e}")
            continue
        if not math.isfinite(value):
            _warn_once(fn, f"returned {value}")
            continue
        out[i] = value
    return out

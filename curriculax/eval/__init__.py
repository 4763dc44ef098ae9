"""Exact-match evaluation: batched greedy decoding with the KV cache, then answer extraction.

Answers are taken, in order of preference, from a ``#### N`` line (GSM8K / synthetic), the last
``\\boxed{...}`` (MATH), or the last number in the text. Numbers compare numerically
(``1,000`` == ``1000.0``); other answers compare after whitespace normalization.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable

import numpy as np
from flax import nnx

from curriculax.data.bank import ExampleBank
from curriculax.data.jsonl import last_boxed
from curriculax.models.generate import generate

_HASH = re.compile(r"####\s*(.+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The model's final answer in ``text`` or ``None``."""
    m = _HASH.findall(text)
    if m and m[-1].strip():  # "####" then only whitespace such as "\r" counts as no answer
        return m[-1].strip().splitlines()[0].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def _as_number(s: str) -> float | None:
    s = s.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        return float(s)
    except ValueError:
        return None


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return " ".join(predicted.split()) == " ".join(reference.split())


def evaluate(model: nnx.Module, data: ExampleBank, tokenizer, *, batch_size: int = 64,
             max_new_tokens: int = 64, limit: int | None = None,
             judge: Callable[[str, dict], bool] | None = None) -> dict[str, float]:
    """Greedy exact-match accuracy overall, per category and per difficulty.

    ``judge(text, record) -> bool`` replaces the final-answer comparison (e.g. a countdown
    verifier, whose answer is an expression rather than the target number).
    """
    n = len(data) if limit is None else min(limit, len(data))
    correct = np.zeros(n, bool)
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(lo + batch_size, n)))
        prompts, mask = data.prompts(idx)
        if len(idx) < batch_size:  # fixed shapes: one compilation for every batch
            pad = batch_size - len(idx)
            prompts = np.pad(prompts, ((0, pad), (0, 0)), constant_values=data.info.pad_id)
            mask = np.pad(mask, ((0, pad), (0, 0)))
            mask[len(idx):, -1] = True
        out = np.asarray(generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id,
                                  pad_id=data.info.pad_id, prompt_mask=mask))
        for r, i in enumerate(idx):
            text = tokenizer.decode([int(t) for t in out[r] if t != data.info.pad_id])
            correct[i] = (judge(text, data.records[i]) if judge is not None
                          else answers_match(extract_answer(text), data.answers[i]))
    return summarize(correct, data.bank.category[:n], data.bank.difficulty[:n],
                     data.info.category_names)


def summarize(correct, category, difficulty, category_names) -> dict[str, float]:
    out = {"accuracy": float(np.mean(correct)) if len(correct) else 0.0}
    groups = collections.defaultdict(list)
    for ok, c, d in zip(correct, category, difficulty):
        groups[f"category/{category_names[c]}"].append(ok)
        groups[f"difficulty/{d}"].append(ok)
    out.update({f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(groups.items())})
    return out

"""Exact-match evaluation: batched greedy decoding with the KV cache, then answer extraction.

Answers are taken, in order of preference, from a ``#### N`` line (GSM8K / synthetic), the last
``\\boxed{...}`` (MATH), or the last number in the text. Numbers compare numerically
(``1,000`` == ``1000.0``, ``$5`` == ``5``, ``50%`` == ``50``; ``3,5`` is not ``35``), and a numeric
reference also matches an answer holding exactly one number (``#### 18 dollars``, ``#### **18**``;
not ``(5, 3)``, nor ``\\sqrt{2}``, ``2\\pi``, ``x^2`` or ``5!``, whose value is another).
Other answers compare after the MATH normalization of Hendrycks et al.'s ``strip_string``
(:func:`normalize_tex`: ``\\dfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, ``1/2`` ->
``\\frac{1}{2}``, no spaces, ``\\left`` / ``\\right``, degrees, ``\\text{}``, ``\\$``, ``\\%``; a unit such as
``5\\text{ inches}`` is dropped on either side).
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
from curriculax.sharding import DEFAULT_RULES

_HASH = re.compile(r"####\s*(.+)")
_NUMBER = re.compile(r"-?\d+(?:,\d+)*(?:\.\d+)?|-?\.\d+")  # "18, so": no trailing comma


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


_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _as_number(s: str) -> float | None:
    s = s.strip().rstrip(".")
    for unit in ("\\$", "$", "\\%", "%", "\\!"):  # MATH writes 10,\!080 for 10,080
        s = s.replace(unit, "")
    s = s.strip()
    if _THOUSANDS.fullmatch(s):  # 1,234 but not 3,5 (two answers) or 1,2,3
        s = s.replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


# TeX that only formats or names a unit; any other command (\\sqrt, \\pi, \\frac, \\pm) changes the value
_FORMATTING = re.compile(r"\\(?:text\w*|math(?:rm|bf|it|sf)|mbox|boxed|fbox|displaystyle|left|right|"
                         r"[$%,;! ])|\^\{?\\circ\}?")


def _single_number(text: str) -> float | None:
    """The value of the one number in ``text`` when the rest is only words and formatting
    (``18 dollars``, ``**18**``, ``\\text{18 apples}``); ``None`` for ``\\sqrt{2}``, ``2\\pi``,
    ``x^2``, ``2i``, ``5!`` or ``\\frac{1}{x}``, whose one number is not their value (a unit
    per time, ``60 km/h``, still counts)."""
    found = list(_NUMBER.finditer(text))
    if len(found) != 1:
        return None
    m = found[0]
    before, after = text[:m.start()], text[m.end():]
    if re.search(r"[A-Za-z\\]$", before) or re.match(r"[A-Za-z\\]", _FORMATTING.sub("", after)):
        return None  # 2i, 2x, x2, 2\pi: the number is a coefficient or an index
    rest = _FORMATTING.sub("", before + " " + after)
    if re.search(r"\\|[\^_!]", rest):  # a TeX command, a power, a subscript, a factorial
        return None
    return _as_number(m.group(0))


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` / ``\frac1{2}`` / ``\frac{1}2`` -> ``\frac{1}{2}`` (single-character arguments)."""
    out, parts = [], s.split("\\frac")
    out.append(parts[0])
    for part in parts[1:]:
        args = []
        for _ in range(2):
            if part.startswith("{"):
                depth = 0
                for i, ch in enumerate(part):
                    depth += (ch == "{") - (ch == "}")
                    if depth == 0:
                        args.append(part[: i + 1])
                        part = part[i + 1:]
                        break
                else:
                    return s  # unbalanced: leave it alone
            elif part:
                args.append("{" + part[0] + "}")
                part = part[1:]
        out.append("\\frac" + "".join(args) + part)
    return "".join(out)


def normalize_tex(s: str) -> str:
    """A MATH answer in canonical form (after Hendrycks et al.'s ``strip_string``)."""
    s = s.strip().rstrip(".")
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("\\%", ""), ("\\!", ""),
                     ("\\,", ""), ("\\;", "")):
        s = s.replace(old, new)
    s = s.replace("{.", "{0.").replace(" .", " 0.")
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs) <= 2:  # "x = 5", "k=\frac12": a named short answer
        s = rhs
    s = "".join(s.split())
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if s.startswith("."):
        s = "0" + s
    return "\\frac{1}{2}" if s == "0.5" else s  # strip_string's one decimal-fraction rule


def _strip_units(s: str) -> str:
    r"""``5\text{ inches}`` -> ``5``: a ``\text{`` that opens with a space after the answer names
    its unit (Hendrycks et al.'s ``_remove_right_units``; MATH writes ``65 \text{ children tickets }``,
    ``\frac{68}{3}\text{ pounds}``)."""
    head, sep, _ = s.partition("\\text{ ")
    return head if sep and head.strip() else s


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    predicted, reference = _strip_units(predicted), _strip_units(reference)
    a, b = _as_number(predicted), _as_number(reference)
    if a is None and b is not None:  # "18 dollars", "**18**": the one number in the text
        a = _single_number(predicted)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return normalize_tex(predicted) == normalize_tex(reference)


def evaluate(model: nnx.Module, data: ExampleBank, tokenizer, *, batch_size: int = 64,
             max_new_tokens: int = 64, limit: int | None = None,
             judge: Callable[[str, dict], bool] | None = None, mesh=None,
             rules=DEFAULT_RULES) -> dict[str, float]:
    """Greedy exact-match accuracy overall, per category and per difficulty.

    ``judge(text, record) -> bool`` replaces the final-answer comparison (e.g. a countdown
    verifier, whose answer is an expression rather than the target number). ``mesh``/``rules``:
    the model's own, so decoding splits the rows over the batch axes (see ``generate``).
    """
    n = len(data) if limit is None else min(limit, len(data))
    correct = np.zeros(n, bool)
    width = int(data.bank.prompt_len[:n].max()) if n else 0
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(lo + batch_size, n)))
        prompts, mask = data.prompts(idx)
        # fixed [batch_size, width] shapes: one compilation for every batch
        pad = batch_size - len(idx), width - prompts.shape[1]
        prompts = np.pad(prompts, ((0, pad[0]), (pad[1], 0)), constant_values=data.info.pad_id)
        mask = np.pad(mask, ((0, pad[0]), (pad[1], 0)))
        mask[len(idx):, -1] = True
        out = np.asarray(generate(model, prompts, max_new_tokens, eos_id=tokenizer.stop_ids,
                                  pad_id=data.info.pad_id, prompt_mask=mask, mesh=mesh,
                                  rules=rules))
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

"""JSONL sources: a generic reader/writer plus GSM8K and MATH loaders.

Every malformed input raises one :class:`~curriculax.data.records.DataError`
naming the file, the 1-based line and the field, with a fix.  Blank lines are
skipped (but still counted, so line numbers match an editor's).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from curriculax.data.records import DataError, Record, validate

PathLike = str | os.PathLike


def read_jsonl_numbered(path: PathLike,
                        required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` (1-based) for each non-blank line of a JSONL
    file, checking ``required`` fields are present and non-empty."""
    src = str(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", source=src, fix="check the path (JSONL: one JSON object per line)") from None
    except OSError as err:  # a directory, no permission, ...
        raise DataError(f"cannot open it ({err.strerror})", source=src,
                        fix="point to a readable JSONL file (one JSON object per line)") from None
    with handle:
        seen = False
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})", source=src,
                                line=number, fix="save the file as UTF-8") from None
            if not text.strip():
                continue
            seen = True
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON ({err.msg} at column {err.colno})", source=src, line=number,
                                fix="make the line a single complete JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", source=src, line=number,
                                fix="write each line as {\"field\": value, ...}")
            for name in required:
                value = obj.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise DataError("missing" if value is None else "empty", source=src, line=number,
                                    field=name, fix=f"give every line a non-empty {name!r}")
            yield number, obj
    if not seen:
        raise DataError("file is empty", source=src, fix="add at least one JSON object line")


def read_jsonl(path: PathLike, required: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Iterate the JSON objects of a JSONL file, checking ``required`` fields are present and non-empty."""
    for _, obj in read_jsonl_numbered(path, required):
        yield obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(records: Iterable[Record], path: PathLike) -> Path:
    """Validate and write records as JSONL, atomically.

    Writes to a temporary file in the same directory and renames it over
    ``path`` only when every record was written, so an error (e.g. an invalid
    record; its 1-based output line is named) leaves any existing file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the data owner-only
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for number, record in enumerate(records, start=1):
                out.write(json.dumps(validate(record, source=str(target), line=number), ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k(path: PathLike, *, keep_calc: bool = False, limit: int | None = None,
          category: str = "gsm8k") -> list[Record]:
    """Load GSM8K (``question``, ``answer`` = reasoning lines + ``#### N``).

    prompt = question; response = the non-blank reasoning lines (``<<48/2=24>>``
    calculator annotations stripped unless ``keep_calc``) then ``#### N``;
    answer = N without thousands commas; difficulty = number of reasoning lines
    (a proxy for steps, 2..11 in the real data); id = ``gsm8k-{stem}-{line}``.
    """
    src, stem, records = str(path), Path(path).stem, []
    for number, obj in read_jsonl_numbered(path, ("question", "answer")):
        if limit is not None and len(records) >= limit:
            break
        reasoning, sep, final = str(obj["answer"]).rpartition("####")
        answer = final.strip().replace(",", "")
        if not sep or not answer:
            raise DataError("no final '#### N' line", source=src, line=number, field="answer",
                            fix="end the answer with a line '#### <number>'")
        lines = [ln.strip() for ln in reasoning.splitlines() if ln.strip()]
        if not keep_calc:
            lines = [_CALC.sub("", ln) for ln in lines]
        records.append(validate({
            "id": f"gsm8k-{stem}-{number}", "prompt": str(obj["question"]).strip(),
            "response": "\n".join([*lines, f"#### {answer}"]), "answer": answer,
            "category": category, "difficulty": len(lines)}, source=src, line=number))
    return records


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces ok) or ``\\boxed x`` in ``text``.

    ``\\fbox{...}`` counts too (as in the MATH reference code).  Returns ``None``
    when there is none or its braces are unbalanced.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest.startswith(" "):  # "\boxed 5$": up to the next $ or whitespace
        value = re.split(r"[\s$]", rest.lstrip(" "), maxsplit=1)[0]
        return value or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None


_LEVEL = re.compile(r"^\s*Level\s+([1-5])\s*$")


def math(path: PathLike, *, limit: int | None = None,
         unknown_level: Literal["error", "skip"] = "error") -> list[Record]:
    """Load MATH (``problem``, ``level`` "Level 1".."Level 5", ``type``, ``solution``).

    prompt = problem; response = solution; answer = content of the last
    ``\\boxed{...}``; difficulty = the level (1-5); category = the subject
    (``type``, e.g. "Number Theory"); id = ``math-{stem}-{line}``.  A level that is
    not 1-5 (MATH's train set has "Level ?") raises a DataError, or the line is
    skipped with ``unknown_level="skip"``.  A solution without a boxed answer is
    always a DataError.
    """
    src, stem, records = str(path), Path(path).stem, []
    for number, obj in read_jsonl_numbered(path, ("problem", "level", "type", "solution")):
        if limit is not None and len(records) >= limit:
            break
        level = _LEVEL.match(str(obj["level"]))
        if level is None:
            if unknown_level == "skip":
                continue
            raise DataError(f"level {obj['level']!r} is not 'Level 1'..'Level 5'", source=src, line=number,
                            field="level", fix="fix the level in the file (read_math(..., unknown_level='skip') drops such lines "
                                "when you call it yourself)")
        answer = (last_boxed(str(obj["solution"])) or "").strip()
        if not answer:
            raise DataError("no \\boxed{...} answer (or unbalanced braces)", source=src, line=number,
                            field="solution", fix="put the final answer in \\boxed{...} in the solution")
        records.append(validate({
            "id": f"math-{stem}-{number}", "prompt": str(obj["problem"]), "response": str(obj["solution"]),
            "answer": answer, "category": str(obj["type"]).strip(), "difficulty": int(level.group(1))},
            source=src, line=number))
    return records

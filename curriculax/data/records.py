"""The record: the one data shape every curriculax source produces.

A record is a plain ``dict`` (cheap to pickle, to write as JSONL and to hand
to Grain) with these fields:

``id`` (str, non-empty)
    Unique within a data set; sources build it from the file name and line.
``prompt`` (str, non-empty)
    What the model is asked.
``response`` (str, may be empty)
    A worked target completion (for SFT); empty for prompt-only RL data.
``answer`` (str, may be empty)
    The short final answer a reward or an evaluator compares against.
``category`` (str, non-empty)
    A task family (e.g. a MATH subject, an arithmetic operation family): the
    arms a curriculum can sample between.
``difficulty`` (int >= 0)
    An ordinal difficulty proxy *within* a source (steps, level, ...); only
    comparable between records of the same source.

Optional: ``stage`` (int or str), a curriculum stage assigned later, and any
extra fields a source wants to carry (e.g. countdown's ``numbers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any

FIELDS: tuple[str, ...] = ("id", "prompt", "response", "answer", "category", "difficulty")
STRING_FIELDS: tuple[str, ...] = ("id", "prompt", "response", "answer", "category")
NON_EMPTY_FIELDS: tuple[str, ...] = ("id", "prompt", "category")

Record = dict[str, Any]


class DataError(ValueError):
    """Malformed input data, with where it is and how to fix it.

    ``str(err)`` reads like ``data/train.jsonl, line 12, field 'answer':
    missing. Fix: ...`` so a user can go straight to the bad line.  The parts
    are also kept as attributes (``source``, ``line`` 1-based, ``field``).
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem, self.source, self.line, self.field, self.fix = problem, source, line, field, fix
        where = [str(source) if source is not None else None]
        where.append(f"line {line}" if line is not None else None)
        where.append(f"field {field!r}" if field is not None else None)
        prefix = ", ".join(w for w in where if w)
        message = f"{prefix}: {problem}" if prefix else problem
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)


def validate(record: Any, *, source: str | None = None, line: int | None = None) -> Record:
    """Check that ``record`` has every field of :data:`FIELDS` with the right type.

    Returns the record (a copy only when ``difficulty`` had to be turned into a
    plain ``int``, e.g. from ``numpy.int64``).  Raises :class:`DataError` naming
    ``source``/``line`` and the field otherwise.
    """

    def fail(field: str | None, problem: str, fix: str) -> DataError:
        return DataError(problem, source=source, line=line, field=field, fix=fix)

    if not isinstance(record, Mapping):
        raise fail(None, f"a record must be a JSON object / dict, got {type(record).__name__}",
                   "make each record an object with fields " + ", ".join(FIELDS))
    for name in STRING_FIELDS:
        if name not in record or record[name] is None:
            raise fail(name, "missing", f"add a string {name!r} to the record")
        if not isinstance(record[name], str):
            raise fail(name, f"must be a string, got {type(record[name]).__name__}",
                       f"write {name!r} as a JSON string")
        if name in NON_EMPTY_FIELDS and not record[name].strip():
            raise fail(name, "empty", f"give {name!r} a non-empty value")
    difficulty = record.get("difficulty")
    if difficulty is None:
        raise fail("difficulty", "missing", "add an integer 'difficulty' (>= 0)")
    if isinstance(difficulty, bool) or not isinstance(difficulty, Integral):
        raise fail("difficulty", f"must be an integer, got {difficulty!r}",
                   "write 'difficulty' as a JSON integer such as 3")
    if difficulty < 0:
        raise fail("difficulty", f"must be >= 0, got {difficulty}", "use a non-negative integer")
    stage = record.get("stage")
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, (int, str))):
        raise fail("stage", f"must be an int or a string, got {stage!r}", "drop 'stage' or make it an int")
    if type(difficulty) is not int:
        return {**record, "difficulty": int(difficulty)}
    return record if isinstance(record, dict) else dict(record)

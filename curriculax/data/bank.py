"""The example bank: a tokenized fine-tuning set that lives on the devices.

Each record becomes one fixed-length row (``T = seq_len``)::

    sequence = [bos] prompt_text  reasoning  answer_line  eos
    tokens   = sequence[:-1]   (inputs, padded with pad_id)
    targets  = sequence[1:]    (next tokens)
    loss_mask[i]      = targets[i] belongs to the response (reasoning, answer line or eos)
    reasoning_mask[i] = tokens[i] belongs to the worked steps (what Masked Thought may mask)

``prompt_text`` comes from a template: ``"plain"`` (``prompt + "\\n"``) or ``"chat"``
(the tokenizer's chat template with ``add_generation_prompt=True``). The response is split at
its final ``####`` line (GSM8K/synthetic) so the answer line is never part of the reasoning span.
Segments are tokenized separately so span boundaries are exact.

The curriculum samples row indices inside the jitted step, so the whole set is one sharded
pytree (rows split over the ``data``/``fsdp`` mesh axes) and no batch crosses the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import jax
import numpy as np
from flax import struct

from curriculax.curriculum.base import BankMeta

TEMPLATES = ("plain", "chat")
OVERFLOW = ("truncate", "drop")


@struct.dataclass
class Batch:
    """The step's batch, whether it came from the bank or a streamed pool: ``[B,T]`` / ``[B]``."""

    tokens: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    reasoning_mask: jax.Array
    prompt_len: jax.Array
    category: jax.Array
    difficulty: jax.Array
    example_id: jax.Array


@struct.dataclass
class Bank(Batch):
    """All rows; ``meta`` (static) says what a curriculum may know about them."""

    info: "BankInfo" = struct.field(pytree_node=False, default=None)

    @property
    def num_examples(self) -> int:
        return self.tokens.shape[0]

    def meta(self) -> BankMeta:
        i = self.info
        return BankMeta(self.category, self.difficulty, num_examples=self.num_examples,
                        category_names=i.category_names, difficulty_min=i.difficulty_min,
                        difficulty_max=i.difficulty_max)

    def gather(self, indices) -> Batch:
        fields = {f.name: getattr(self, f.name)[indices] for f in dataclasses.fields(Batch)}
        return Batch(**fields)


@dataclasses.dataclass(frozen=True)
class BankInfo:
    """Static facts about a bank; hashable so it can ride along as pytree aux data."""

    seq_len: int
    category_names: tuple[str, ...]
    difficulty_min: int
    difficulty_max: int
    num_truncated: int
    num_dropped: int
    pad_id: int
    mask_id: int | None = None  # the tokenizer's mask token, for input-masking transforms
    bos_id: int | None = None  # the tokenizer's BOS (rows may or may not start with it)


@dataclasses.dataclass
class ExampleBank:
    """Host-side bank: numpy rows plus the per-row strings (ids, answers) eval needs."""

    bank: Bank  # host numpy arrays; the trainer places them on the mesh
    ids: list[str]
    answers: list[str]
    records: list[dict] = dataclasses.field(default_factory=list)  # source record of each row

    @property
    def info(self) -> BankInfo:
        return self.bank.info

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """Hash of which example sits in which row (id, prompt, category, difficulty): per-row
        curriculum state restored from a checkpoint is only meaningful for the same rows.
        Tokenization settings (seq_len, template, tokenizer) do not enter it."""
        h = hashlib.sha256()
        cats = self.info.category_names
        for r, rid in enumerate(self.ids):
            prompt = self.records[r].get("prompt", "") if self.records else ""
            h.update(json.dumps([rid, prompt, cats[int(self.bank.category[r])],
                                 int(self.bank.difficulty[r])]).encode())
        return h.hexdigest()[:16]

    @classmethod
    def build(cls, records: Sequence[dict], tokenizer, seq_len: int, *, template: str = "plain",
              overflow: str = "truncate", add_bos: bool = True,
              category_names: Sequence[str] | None = None) -> "ExampleBank":
        """Tokenizes ``records`` into fixed-length rows (see module docstring).

        ``overflow="truncate"`` cuts the response end of too-long rows (rows whose prompt
        alone does not fit are dropped); ``"drop"`` drops every too-long row. Both are counted
        in ``info``. ``category_names`` fixes the category index order (e.g. to match a
        training bank); by default it is the sorted set of categories.
        """
        if template not in TEMPLATES:
            raise ValueError(f"data.template={template!r}: choose one of {TEMPLATES}.")
        if overflow not in OVERFLOW:
            raise ValueError(f"data.overflow={overflow!r}: choose one of {OVERFLOW}.")
        if not records:
            raise ValueError("ExampleBank.build got no records: check the data source and filters.")
        cats = tuple(category_names or sorted({r["category"] for r in records}))
        cat_index = {c: i for i, c in enumerate(cats)}
        rows, ids, answers, kept = [], [], [], []
        truncated = dropped = 0
        for rec in records:
            if rec["category"] not in cat_index:
                raise ValueError(f"record {rec['id']!r} has category {rec['category']!r} not in {cats}.")
            row = tokenize_record(rec, tokenizer, template, add_bos)
            if len(row[0]) - 1 > seq_len:
                if overflow == "drop" or row[2] >= seq_len:
                    dropped += 1
                    continue
                truncated += 1
            rows.append((row, cat_index[rec["category"]], int(rec["difficulty"])))
            ids.append(str(rec["id"]))
            answers.append(str(rec.get("answer", "")))
            kept.append(rec)
        if not rows:
            raise ValueError(
                f"All {len(records)} records are longer than data.seq_len={seq_len}; raise it."
            )
        arrays = pack_rows(rows, seq_len, tokenizer.pad_id)
        diffs = arrays["difficulty"]
        info = BankInfo(seq_len=seq_len, category_names=cats, difficulty_min=int(diffs.min()),
                        difficulty_max=int(diffs.max()), num_truncated=truncated,
                        num_dropped=dropped, pad_id=int(tokenizer.pad_id),
                        mask_id=getattr(tokenizer, "mask_id", None), bos_id=getattr(tokenizer, "bos_id", None))
        return cls(Bank(**arrays, info=info), ids, answers, kept)

    def prompts(self, indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompt tokens ``[N,P]`` and their mask, for decoding."""
        indices = range(len(self)) if indices is None else indices
        lens = self.bank.prompt_len[np.asarray(indices)]
        width = int(lens.max())
        toks = np.full((len(lens), width), self.info.pad_id, np.int32)
        mask = np.zeros((len(lens), width), bool)
        for r, (i, n) in enumerate(zip(indices, lens)):
            toks[r, width - n:] = self.bank.tokens[i, :n]
            mask[r, width - n:] = True
        return toks, mask


def _split_response(response: str) -> tuple[str, str]:
    """``(reasoning, answer_line)``: the answer line is the last line starting with ``####``."""
    cut = response.rfind("####")
    if cut < 0:
        return response, ""
    return response[:cut], response[cut:]


def tokenize_record(rec, tokenizer, template, add_bos):
    """Returns ``(ids, kinds, prompt_len)``; kind 0 = prompt, 1 = reasoning, 2 = answer/eos."""
    if template == "chat":
        prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                                    add_generation_prompt=True)
    else:
        prompt_text = rec["prompt"] + "\n"
    reasoning, answer_line = _split_response(rec["response"])
    prompt_ids = tokenizer.encode(prompt_text)
    # chat templates of Llama-3, Gemma, Mistral render {{ bos_token }} themselves: one BOS only
    if (add_bos and getattr(tokenizer, "add_bos", True) and tokenizer.bos_id is not None
            and prompt_ids[:1] != [tokenizer.bos_id]):
        prompt_ids = [tokenizer.bos_id] + prompt_ids
    reasoning_ids = tokenizer.encode(reasoning) if reasoning else []
    answer_ids = (tokenizer.encode(answer_line) if answer_line else []) + [tokenizer.eos_id]
    ids = prompt_ids + reasoning_ids + answer_ids
    kinds = [0] * len(prompt_ids) + [1] * len(reasoning_ids) + [2] * len(answer_ids)
    return ids, kinds, len(prompt_ids)


def pack_rows(rows, seq_len, pad_id) -> dict[str, np.ndarray]:
    """``[(tokenize_record output, category index, difficulty), ...]`` → fixed-length arrays."""
    n = len(rows)
    out = {
        "tokens": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((n, seq_len), bool),
        "reasoning_mask": np.zeros((n, seq_len), bool),
        "prompt_len": np.zeros((n,), np.int32),
        "category": np.zeros((n,), np.int32),
        "difficulty": np.zeros((n,), np.int32),
        "example_id": np.arange(n, dtype=np.int32),
    }
    for r, ((ids, kinds, prompt_len), cat, diff) in enumerate(rows):
        ids = np.asarray(ids[: seq_len + 1], np.int32)
        kinds = np.asarray(kinds[: seq_len + 1], np.int32)
        t = len(ids) - 1
        out["tokens"][r, :t] = ids[:-1]
        out["targets"][r, :t] = ids[1:]
        out["loss_mask"][r, :t] = kinds[1:] > 0
        out["reasoning_mask"][r, :t] = kinds[:-1] == 1
        out["prompt_len"][r] = min(prompt_len, seq_len)
        out["category"][r] = cat
        out["difficulty"][r] = diff
    return out

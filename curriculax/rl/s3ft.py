"""S3FT: Selective Self-to-Supervised Fine-Tuning -- train on the model's own correct answers.

Paper: Gupta, Nandwani, Yehudai, Khandelwal, Raghu, Joshi, "Selective Self-to-Supervised
Fine-Tuning for Generalization in Large Language Models", 2025 (arXiv 2502.08130). No official
code was found; the selection below follows the abstract (see ``shared/methods/s3ft.md``).

Gold answers often have low likelihood under the model; fitting their wording over-specializes
it. S3FT builds the SFT targets once, offline, with the original model ``M0``::

    yhat_i = M0(x_i)                                        (greedy)
    target_i = yhat_i                    if judge(yhat_i, i)                  "self"
             = ytilde_i = M0(paraphrase(x_i, y_i))  elif judge(ytilde_i, i)   "paraphrase"
             = y_i                       otherwise                            "gold"

then plain SFT (token-mean cross-entropy on response tokens, no KL, no per-source weights) on
``(x_i, target_i)``. The paraphrase is generated only for examples whose own answer failed.

Defaults: greedy decoding for both ``yhat`` and the paraphrase; ``use_paraphrase=True``;
judge :func:`answer_judge` (final-answer match with the evaluator's rule -- a ``#### N`` line,
``\\boxed{}`` or the last number, numerically compared -- or the countdown verifier for records
with ``numbers``). Prompts are built exactly as :class:`curriculax.data.bank.ExampleBank` builds
them for training (same template, BOS), so ``M0`` answers the prompts it will be trained on.
Training hyper-parameters: those of the plain-SFT baseline (paper values unverified).

Usage::

    records, counts = s3ft.build(model, tokenizer, train_records, max_new_tokens=256)
    # counts == {"self": ..., "paraphrase": ..., "gold": ...}; then ordinary SFT on records
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from curriculax.data.bank import ExampleBank, tokenize_record
from curriculax.models.generate import generate
from curriculax.rl import rewards
from curriculax.sharding import DEFAULT_RULES

Judge = Callable[[str, dict], bool]
SOURCES: tuple[str, ...] = ("self", "paraphrase", "gold")
PARAPHRASE_PROMPT = (
    "{prompt}\n\nHere is a correct solution:\n{response}\n\n"
    "Rewrite this solution in your own words. Keep every step and end with the same final "
    "answer line (#### ...)."
)


def answer_judge(response: str, record: dict) -> bool:
    """True iff ``response`` reaches the record's final answer (countdown: a valid expression)."""
    return rewards.final_answer(response, record) > 0.0


def _select(records: Sequence[dict], responses: Sequence[str], self_ok: Sequence[bool],
            paraphrases: Sequence[str | None],
            para_ok: Sequence[bool]) -> tuple[list[dict], dict[str, int]]:
    out, counts = [], dict.fromkeys(SOURCES, 0)
    for rec, yhat, ok, ytilde, pok in zip(records, responses, self_ok, paraphrases, para_ok):
        source, target = (("self", yhat) if ok else ("paraphrase", ytilde) if pok
                          else ("gold", rec["response"]))
        counts[source] += 1
        out.append({**rec, "response": target, "s3ft_source": source})
    return out, counts


def select(records: Sequence[dict], responses: Sequence[str], judge: Judge,
           paraphrases: Sequence[str | None] | None = None,
           use_paraphrase: bool = True) -> tuple[list[dict], dict[str, int]]:
    """New records with ``response`` = the chosen target and ``s3ft_source`` in
    ``{"self", "paraphrase", "gold"}``, plus the counts of each source.

    ``paraphrases[i]`` may be ``None`` (not generated, e.g. because ``responses[i]`` passed);
    paraphrases are ignored when ``use_paraphrase`` is False. ``judge`` is called at most once
    per response and per paraphrase.
    """
    n = len(records)
    if len(responses) != n or (paraphrases is not None and len(paraphrases) != n):
        raise ValueError(f"s3ft.select: {n} records, {len(responses)} responses, "
                         f"{None if paraphrases is None else len(paraphrases)} paraphrases.")
    self_ok = [bool(judge(y, r)) for y, r in zip(responses, records)]
    paras = list(paraphrases) if use_paraphrase and paraphrases is not None else [None] * n
    para_ok = [not ok and p is not None and bool(judge(p, r))
               for ok, p, r in zip(self_ok, paras, records)]
    return _select(records, responses, self_ok, paras, para_ok)


def _text(row: np.ndarray, tokenizer, pad_id: int) -> str:
    """Decoded tokens before the first stop id (generate fills the rest with pad)."""
    ids = [int(t) for t in row]
    ends = [k for k, t in enumerate(ids) if t in tokenizer.stop_ids]
    if ends:
        ids = ids[:ends[0]]
    return tokenizer.decode([t for t in ids if t != pad_id])


def generate_responses(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int,
                       batch_size: int = 32, template: str = "plain", mesh=None,
                       rules=DEFAULT_RULES) -> list[str]:
    """Greedy completions of the records' prompts, in order (``response`` is ignored);
    ``mesh``/``rules``: the model's, so the rows are split over the batch axes.

    All batches share one ``[batch, P]`` shape (P = longest prompt; the last batch padded with
    dummy rows as in :func:`curriculax.eval.evaluate`), so decoding compiles once.
    """
    if not records:
        return []
    prompt_only = [{**r, "response": ""} for r in records]
    # Rows are [bos] prompt eos: a seq_len of the longest such row minus one cuts no prompt.
    seq_len = max(len(tokenize_record(r, tokenizer, template, True)[0]) for r in prompt_only) - 1
    bank = ExampleBank.build(prompt_only, tokenizer, seq_len, template=template)
    pad_id = bank.info.pad_id
    prompts, mask = bank.prompts()
    n, bs = len(records), min(batch_size, len(records))
    extra = -n % bs
    if extra:
        prompts = np.pad(prompts, ((0, extra), (0, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, extra), (0, 0)))
        mask[n:, -1] = True  # a dummy row needs one real token
    texts = []
    for lo in range(0, n, bs):
        out = np.asarray(generate(model, prompts[lo:lo + bs], max_new_tokens,
                                  eos_id=tokenizer.stop_ids, pad_id=pad_id,
                                  prompt_mask=mask[lo:lo + bs], mesh=mesh, rules=rules))
        texts.extend(_text(row, tokenizer, pad_id) for row in out[:n - lo])
    return texts


def paraphrase_record(record: dict, paraphrase_prompt: str | None = None) -> dict:
    """The record whose prompt asks to restate its gold solution (``{prompt}``/``{response}``)."""
    template = PARAPHRASE_PROMPT if paraphrase_prompt is None else paraphrase_prompt
    return {**record, "prompt": template.format(prompt=record["prompt"], response=record["response"]),
            "response": ""}


def build(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int, batch_size: int = 32,
          template: str = "plain", judge: Judge = answer_judge, use_paraphrase: bool = True,
          paraphrase_prompt: str | None = None, mesh=None,
          rules=DEFAULT_RULES) -> tuple[list[dict], dict[str, int]]:
    """Generate ``yhat``, paraphrase the gold of the failures, and select (see module docstring)."""
    decode = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, template=template,
                  mesh=mesh, rules=rules)
    responses = generate_responses(model, tokenizer, records, **decode)
    self_ok = [bool(judge(y, r)) for y, r in zip(responses, records)]
    paraphrases: list[str | None] = [None] * len(records)
    if use_paraphrase:
        failed = [i for i, ok in enumerate(self_ok) if not ok]
        texts = generate_responses(model, tokenizer,
                                   [paraphrase_record(records[i], paraphrase_prompt) for i in failed],
                                   **decode)
        for i, text in zip(failed, texts):
            paraphrases[i] = text
    para_ok = [p is not None and bool(judge(p, r)) for p, r in zip(paraphrases, records)]
    return _select(records, responses, self_ok, paraphrases, para_ok)


def prepare(cfg, workdir) -> tuple[Any, dict[str, int]]:
    """Builds the S3FT training set with the config's *starting* model and returns the SFT
    config that trains on it (``data.source="jsonl"``), plus the source counts.

    The targets are written once to ``<workdir>/s3ft_train.jsonl`` (atomically; a rerun
    reuses the file) with ``s3ft_counts.json`` beside it, so the selection is inspectable and
    the SFT run is an ordinary resumable run. Uses ``cfg.eval.max_new_tokens`` /
    ``cfg.eval.batch_size`` for the greedy decoding and ``cfg.rl.s3ft_paraphrase``.
    """
    import json
    import pathlib

    from flax import nnx

    from curriculax.train import setup

    if not cfg.data.eval_path and cfg.data.source in ("gsm8k", "math", "jsonl", "tfds"):
        raise ValueError("S3FT rewrites the training file, so it needs a separate held-out "
                         "file: set config.data.eval_path.")
    root = pathlib.Path(workdir)
    path, counts_path = root / "s3ft_train.jsonl", root / "s3ft_counts.json"
    if not path.exists():
        exp = setup.build(cfg)
        model = nnx.merge(exp.graphdef, exp.model_params(exp.init_state().params))
        records, counts = build(model, exp.tokenizer, exp.train_data.records,
                                max_new_tokens=cfg.eval.max_new_tokens,
                                batch_size=cfg.eval.batch_size, template=cfg.data.template,
                                use_paraphrase=bool(cfg.rl.get("s3ft_paraphrase", True)),
                                mesh=exp.mesh, rules=exp.rules)
        root.mkdir(parents=True, exist_ok=True)
        # counts first: a run killed between the two writes must not leave the targets without
        # their counts (a rerun reuses the targets and reads the counts)
        tmp_counts = counts_path.with_suffix(".json.tmp")
        tmp_counts.write_text(json.dumps(counts, indent=2))
        tmp_counts.replace(counts_path)
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        tmp.replace(path)
    counts = json.loads(counts_path.read_text())
    sft = cfg.copy_and_resolve_references()
    sft.data.eval_source = sft.data.eval_source or sft.data.source  # held-out set unchanged
    sft.data.source, sft.data.path, sft.data.num_train = "jsonl", str(path), 0
    return sft, counts

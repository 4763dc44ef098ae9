"""Synthetic fact editing: invented subjects, their attributes, and edits that change them.

A counterfactual-editing set in the style of zsRE / COUNTERFACT (Meng et al., ROME, NeurIPS 2022),
small enough for a byte-level model: every *fact* is ``(subject, relation, old, new)`` with a
made-up subject ("Zorvia") and made-up one-word attributes ("Quell"). Each relation has two
templates, the edit prompt and a paraphrase::

    capital   "The capital of Zorvia is"   /  "Zorvia has its capital in"
    language  "The language of Zorvia is"  /  "In Zorvia, people speak"
    river     "The river of Zorvia is"     /  "Zorvia lies on the river"
    ruler     "The ruler of Zorvia is"     /  "Zorvia is ruled by"

Records follow :mod:`curriculax.data.records` with ``response = "#### <answer>"`` (so the stock
evaluator's ``####`` extraction and exact match judge them) and ``category`` one of:

* ``"edit"``: the edit prompt, answer = the *new* attribute (edit success / reliability);
* ``"paraphrase"``: the other template, answer = the new attribute (generalization);
* ``"locality"``: a fact about an *unrelated* subject, answer = its unchanged attribute
  (locality / specificity: it should not move when the edits are learned);
* ``"knowledge"``: the pre-edit world (old attributes, both templates) that a base model is
  trained on first, so that there is something to edit and something to preserve.

:func:`edit_records` gives ``(edits, paraphrases, locality)``; :func:`knowledge_records` the
world before editing; :func:`edit_metrics` measures an edited model (greedy decoding, the answer
cut at the first newline / ``.`` as the LocFT evaluation's stop words, exact match):
edit success and paraphrase accuracy against the new targets, and locality as the share of
unrelated prompts whose greedy answer is *unchanged* from before editing (``pre_answers``).

Everything is deterministic in ``seed``; subjects are distinct. Prompts stay within 30 bytes and
answers within 10, so a whole record fits ``data.seq_len=48`` with the byte tokenizer and a
greedy answer needs 16 new tokens (``"#### "``, the answer, EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curriculax.data.records import Record

RELATIONS: dict[str, tuple[str, str]] = {
    "capital": ("The capital of {s} is", "{s} has its capital in"),
    "language": ("The language of {s} is", "In {s}, people speak"),
    "river": ("The river of {s} is", "{s} lies on the river"),
    "ruler": ("The ruler of {s} is", "{s} is ruled by"),
}
CATEGORIES: tuple[str, ...] = ("edit", "paraphrase", "locality", "knowledge")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr",
           "th", "qu", "st", "dr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_SUBJECT_ENDS = ("ia", "or", "en", "and", "ar", "is")
_WORD_ENDS = ("l", "n", "r", "s", "th", "x", "m")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    old: str  # the attribute before editing (what a base model is taught)
    new: str  # the counterfactual target of the edit (!= old)


def _syllables(rng: np.random.Generator, k: int) -> str:
    return "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(k))


def _subject(rng) -> str:
    return (_syllables(rng, 2) + _SUBJECT_ENDS[rng.integers(len(_SUBJECT_ENDS))]).capitalize()


def _word(rng) -> str:
    return (_syllables(rng, int(rng.integers(1, 3))) + _WORD_ENDS[rng.integers(len(_WORD_ENDS))]
            ).capitalize()


def world(n: int, seed: int) -> list[Fact]:
    """``n`` facts about distinct subjects, drawn in sequence from one generator seeded with
    ``seed`` (so ``world(10, s)[:5] == world(5, s)``); ``old != new`` always."""
    rng = np.random.default_rng([seed, 0xFAC7])
    relations = tuple(RELATIONS)
    seen, out = set(), []
    while len(out) < n:
        subject = _subject(rng)
        relation = relations[int(rng.integers(len(relations)))]
        old, new = _word(rng), _word(rng)
        if subject in seen or old == new:
            continue
        seen.add(subject)
        out.append(Fact(subject, relation, old, new))
    return out


def _record(fact: Fact, template: int, answer: str, category: str, rid: str) -> Record:
    return {"id": rid, "prompt": RELATIONS[fact.relation][template].format(s=fact.subject),
            "response": f"#### {answer}", "answer": answer, "category": category,
            "difficulty": 1, "subject": fact.subject, "relation": fact.relation}


def _split(n: int, seed: int, locality_per_edit: int) -> tuple[list[Fact], list[Fact]]:
    facts = world(n * (1 + locality_per_edit), seed)
    return facts[:n], facts[n:]


def edit_records(n: int, seed: int, *, locality_per_edit: int = 1
                 ) -> tuple[list[Record], list[Record], list[Record]]:
    """``(edits, paraphrases, locality)``: ``n`` edits (edit template -> new attribute), their
    ``n`` paraphrases (other template -> new attribute), and ``n * locality_per_edit`` facts
    about other subjects (edit template -> their unchanged attribute)."""
    edited, others = _split(n, seed, locality_per_edit)
    edits = [_record(f, 0, f.new, "edit", f"facts-{seed}-{i}-edit") for i, f in enumerate(edited)]
    paraphrases = [_record(f, 1, f.new, "paraphrase", f"facts-{seed}-{i}-para")
                   for i, f in enumerate(edited)]
    locality = [_record(f, 0, f.old, "locality", f"facts-{seed}-{i}-loc")
                for i, f in enumerate(others)]
    return edits, paraphrases, locality


def knowledge_records(n: int, seed: int, *, locality_per_edit: int = 1) -> list[Record]:
    """The world before the ``n`` edits of :func:`edit_records` (same ``seed``): every fact (the
    edited subjects and the locality subjects) with its *old* attribute, in both templates."""
    edited, others = _split(n, seed, locality_per_edit)
    return [_record(f, t, f.old, "knowledge", f"facts-{seed}-{i}-know{t}")
            for i, f in enumerate(edited + others) for t in (0, 1)]


def interleave(*groups: Sequence[Record]) -> list[Record]:
    """Round-robin over ``groups`` (edit 0, paraphrase 0, locality 0, edit 1, ...), so that a
    prefix keeps every category."""
    out, longest = [], max((len(g) for g in groups), default=0)
    for i in range(longest):
        out.extend(g[i] for g in groups if i < len(g))
    return out


# Evaluation -------------------------------------------------------------------------------------

def answer_of(text: str) -> str:
    """The greedy answer in a completion: after ``####`` when present, cut at the first newline
    or ``.`` (the stop words of the LocFT evaluation), whitespace-normalized."""
    cut = text.rfind("####")
    text = text[cut + 4:] if cut >= 0 else text
    text = text.split("\n", 1)[0].split(".", 1)[0]
    return " ".join(text.split())


def greedy_answers(model, tokenizer, records: Sequence[Record], *, template: str = "plain",
                   max_new_tokens: int = 16, batch_size: int = 64, seq_len: int = 128
                   ) -> list[str]:
    """``answer_of`` the greedy completion of each record's prompt (formatted with
    ``template`` as in training)."""
    from curriculax.data.bank import ExampleBank
    from curriculax.models.generate import generate

    if not records:
        return []
    data = ExampleBank.build(records, tokenizer, seq_len, template=template)
    if len(data) != len(records):
        raise ValueError(f"{len(records) - len(data)} prompts do not fit seq_len={seq_len}.")
    out = []
    for lo in range(0, len(data), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(data))))
        prompts, mask = data.prompts(idx)
        pad = batch_size - len(idx)
        if pad:  # fixed shapes: one compilation for every batch
            prompts = np.pad(prompts, ((0, pad), (0, 0)), constant_values=data.info.pad_id)
            mask = np.pad(mask, ((0, pad), (0, 0)))
            mask[len(idx):, -1] = True
        toks = np.asarray(generate(model, prompts, max_new_tokens, eos_id=tokenizer.stop_ids,
                                   pad_id=data.info.pad_id, prompt_mask=mask))
        for r in range(len(idx)):
            out.append(answer_of(tokenizer.decode(
                [int(t) for t in toks[r] if t != data.info.pad_id])))
    return out


def edit_metrics(model, tokenizer, edits: Sequence[Record], paraphrases: Sequence[Record],
                 locality: Sequence[Record], pre_answers: Sequence[str], **decode_kw
                 ) -> dict[str, float]:
    """Edit success (greedy answer == new target on the edit prompts), paraphrase
    generalization (the same on the paraphrases), locality (share of ``locality`` prompts whose
    greedy answer equals ``pre_answers``, the unedited model's, from :func:`greedy_answers`) and
    ``locality_gold`` (locality answers equal to the records' gold ``answer``)."""
    if len(pre_answers) != len(locality):
        raise ValueError(f"pre_answers has {len(pre_answers)} entries for {len(locality)} "
                         "locality records.")
    got = greedy_answers(model, tokenizer, [*edits, *paraphrases, *locality], **decode_kw)
    e, p = len(edits), len(paraphrases)

    def rate(pred, ref):
        return float(np.mean([a == b for a, b in zip(pred, ref)])) if len(ref) else 0.0

    loc = got[e + p:]
    return {"edit_success": rate(got[:e], [r["answer"] for r in edits]),
            "paraphrase": rate(got[e:e + p], [r["answer"] for r in paraphrases]),
            "locality": rate(loc, [answer_of(a) for a in pre_answers]),
            "locality_gold": rate(loc, [r["answer"] for r in locality])}

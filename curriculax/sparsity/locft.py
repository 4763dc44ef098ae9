"""LocFT-BF — localized, breadth-first fine-tuning for model editing.

Paper: Yang, Sun, Tang, Zang, Su, Cao, Wang, Shen, Cheng, "Fine-tuning Done Right in Model
Editing" (arXiv 2509.22072, 2025; ICLR 2026); code ``github.com/ICT-STAR/LocFT``.

Rule: plain fine-tuning edits knowledge well once it is run the *standard* way, not per edit:

* **Localized**: only the MLP output (down) projection ``W_down`` of the chosen layer(s) trains
  (our ``layers/{i}/mlp/down``, ``[intermediate, hidden]``); every other parameter is frozen
  bitwise (no update, no weight decay, no optimizer state: the sparse-state transform of
  :mod:`curriculax.sparsity.lift` with whole-leaf plans, as ``select``).
* **Breadth-first**: all edits are mixed in mini-batches and the set is passed over for several
  epochs (``epochs x num_edits / batch`` steps), instead of the depth-first editing pipeline
  that optimizes one edit to convergence before the next. :func:`breadth_first_config` sets
  this up with the ``ordering`` curriculum (``kind="random"``: a seeded permutation walked
  ``batch`` rows per step, wrapping around once per epoch), so each edit is seen exactly
  ``epochs`` times when ``epochs * num_edits`` is a multiple of the batch.
* Loss: cross-entropy on the target tokens only, EOS appended (our SFT objective on
  ``"#### target"`` responses; the official code averages per sequence, then over the batch:
  ``config.objective.normalization="sequence"``).

Defaults (official ``hparams/*.yaml`` and ``fine-tune.py``, read for this module):

* one layer, ``module="mlp/down"``: Llama-3-8B-Instruct layer 22 of 32, Qwen2.5-7B-Instruct
  layer 6 of 28 (Mistral-7B: the whole layer 23). The layer is chosen per model by the paper's
  location analysis; ``layers=""`` here takes ``int(0.7 * num_layers)`` (22 for 32 layers: the
  Llama-3 choice as a depth fraction; our choice, **not from the paper**: set ``layers`` for
  your model). ``layers`` accepts an int, ``"4"``, ``"4-6"`` (inclusive), ``"2,5-6"`` or a list.
* Adam (``torch.optim.Adam``, betas 0.9/0.999), **constant** lr ``5e-4`` (Mistral: ``5e-5``), no
  warmup, no clipping, weight decay 0; batch 100; 25 epochs (``num_steps: 25`` counts epochs),
  edits reshuffled every epoch. Here: clip + AdamW of ``config.optimizer`` (``weight_decay=None``
  takes its value; set ``0.0`` to match the paper); :func:`breadth_first_config` sets epochs,
  batch, a constant learning rate and leaves ``lr`` to the caller. Not reproduced: the
  official loop skips a batch update when its loss is below ``1e-2`` and stops once an epoch's
  mean loss is below ``1e-2``; our ``ordering`` permutation is drawn once, not per epoch.

Usage::

    from curriculax import sparsity
    from curriculax.sparsity import locft
    c.sparsity = sparsity.config("locft", layers="2")
    c = locft.breadth_first_config(c, num_edits=64, epochs=25, batch_size=16)
"""

from __future__ import annotations

import copy
import math
import re

import jax

from curriculax.sparsity import base, select

DEFAULT_DEPTH = 0.7  # layers="" -> int(0.7 * num_layers): Llama-3-8B's 22 of 32 as a fraction
PAPER = dict(lr=5e-4, batch_size=100, epochs=25)  # official hparams (Llama-3 / Qwen2.5 7-8B)


def default_config() -> dict:
    return dict(layers="", module="mlp/down", weight_decay=None)


def num_layers(abstract_params) -> int:
    """Blocks in the params tree (``layers/{i}/...`` paths)."""
    found = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(abstract_params):
        m = re.match(r"layers/(\d+)/", base.path_str(path))
        if m:
            found.add(int(m.group(1)))
    return max(found) + 1 if found else 0


def parse_layers(spec, total: int) -> tuple[int, ...]:
    """Sorted layer indices from ``spec``: ``""``/``None`` (the default depth), an int,
    ``"4"``, ``"4-6"`` (inclusive), ``"2,5-6"``, or a list/tuple of those."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        if total <= 0:
            raise ValueError("locft: the model has no layers/{i}/ parameters.")
        return (min(total - 1, int(DEFAULT_DEPTH * total)),)
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out = set()
    for item in items:
        if isinstance(item, int):
            out.add(item)
            continue
        for part in str(item).replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise ValueError(f"sparsity.layers={spec!r}: use an int, 'a', 'a-b' or a "
                                 "comma-separated list of them (non-negative indices).")
            a, b = int(lo), int(hi) if dash else int(lo)
            if b < a:
                raise ValueError(f"sparsity.layers={spec!r}: range {part!r} is empty.")
            out.update(range(a, b + 1))
    bad = sorted(i for i in out if not 0 <= i < total)
    if bad or not out:
        raise ValueError(f"sparsity.layers={spec!r}: layers {bad} outside 0..{total - 1}.")
    return tuple(sorted(out))


def pattern(abstract_params, cfg) -> str:
    """The path regex of the trained leaves: ``^layers/(i|j|..)/(module)$``."""
    layers = parse_layers(cfg.layers, num_layers(abstract_params))
    return rf"^layers/({'|'.join(map(str, layers))})/({cfg.module})$"


def trained_paths(abstract_params, config) -> list[str]:
    """Paths of the parameters LocFT trains under ``config`` (``config.sparsity``)."""
    pat = pattern(abstract_params, base.method_config(config))
    return [base.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_params)
            if base.matches(pat, base.path_str(p))]


def trained_count(abstract_params, config) -> int:
    chosen = set(trained_paths(abstract_params, config))
    return sum(math.prod(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)
               if base.path_str(p) in chosen)


def build(config, abstract_params) -> base.Sparsity:
    cfg = base.method_config(config)
    return select.selection(config, abstract_params, pattern(abstract_params, cfg),
                            what=f"sparsity.module={cfg.module!r} in sparsity.layers",
                            weight_decay=cfg.weight_decay)


base.register("locft", build, default_config)


def breadth_first_config(cfg, num_edits: int, epochs: int = PAPER["epochs"],
                         batch_size: int = PAPER["batch_size"], *, constant_lr: bool = True):
    """A copy of the experiment ``cfg`` that passes over ``num_edits`` training rows ``epochs``
    times in shuffled mini-batches of ``min(batch_size, num_edits)``:
    ``steps = ceil(epochs * num_edits / batch)``, curriculum ``ordering`` (``kind="random"``,
    seeded with ``cfg.seed``). Every edit is seen exactly ``epochs`` times when
    ``epochs * num_edits`` is a multiple of the batch (else the last step wraps into the next
    pass: some edits once more). ``constant_lr`` (the paper's): no warmup, no decay. The bank
    must hold exactly the edits (``data.source="facts"``: ``data.num_train`` is set to
    ``num_edits`` here). ``config.sparsity`` is left as it is (LocFT-BF: ``"locft"``)."""
    if num_edits <= 0 or epochs <= 0 or batch_size <= 0:
        raise ValueError(f"breadth_first_config needs positive num_edits, epochs, batch_size; "
                         f"got {num_edits}, {epochs}, {batch_size}.")
    cfg = copy.deepcopy(cfg)
    batch = min(batch_size, num_edits)  # the paper's chunks: one batch of everything if fewer
    cfg.batch_size = batch
    cfg.steps = -(-epochs * num_edits // batch)
    cfg.stop_at = 0
    if cfg.data.source == "facts":
        cfg.data.num_train = num_edits
    from curriculax.curriculum import ordering

    cur = ordering.default_config()
    cur.kind, cur.seed = "random", int(cfg.seed)
    cfg.curriculum = cur
    if constant_lr:
        cfg.optimizer.warmup_steps = 0
        cfg.optimizer.end_lr_factor = 1.0
    return cfg

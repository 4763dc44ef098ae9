"""CLIMB vocabulary curriculum: input ids beyond a growing cutoff become ``<unk>`` in-step.

Martinez et al., "CLIMB: Curriculum Learning for Infant-inspired Model Building" (BabyLM 2023;
code ``codebyzeb/CLIMB``, ``vocabulary_map``). At step ``t`` the pacing value ``g(t)``
(:func:`curriculax.curriculum.climb.pacing_fn`) sets the cutoff ``g(t) * V``; every id above it
is replaced by ``unk_id`` (CLIMB's ``token_ids`` map: lower BPE ids come from earlier merges and
are more frequent). Special ids (``>= special_min_id`` or in ``special_ids``) are never
replaced. By default only the model inputs (``tokens``) are rewritten, so the loss still
targets the real next tokens; ``fields=("tokens", "targets")`` maps both (which fields CLIMB
maps is unverified).

Config (``config.transform_config.vocab_curriculum``; these defaults when absent, set for the
byte tokenizer: bytes 0..255, specials 256..260 with ``<unk>`` = 260):
``kind="linear", start_frac=0.0625, end_frac=0.875, b=0.1, max=1.0, vocab_size=256,
unk_id=260, special_min_id=256, special_ids=(), fields=("tokens",)``.
"""

from __future__ import annotations

import ml_collections

from curriculax.curriculum import climb, sampling
from curriculax.transforms.base import Transform, TransformContext, register


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "linear"  # CLIMB pacing kind: linear | quad | root | step | exp | log | none
    c.start_frac = 0.0625
    c.end_frac = 0.875
    c.b = 0.1
    c.max = 1.0
    c.vocab_size = 256  # V of the cutoff g(t) * V
    c.unk_id = 260
    c.special_min_id = 256  # ids >= this are special (never replaced); -1: none
    c.special_ids = ()
    c.fields = ("tokens",)  # batch fields to map
    return c


def cutoff_fraction(ctx: TransformContext, cfg):
    return climb.pacing_fn(cfg.kind, ctx.step, ctx.total_steps, cfg.start_frac, cfg.end_frac,
                           cfg.b, cfg["max"])


def apply(batch, rng, ctx: TransformContext):
    del rng
    cfg = sampling.with_defaults(ctx.config, default_config(),
                                 field="config.transform_config.vocab_curriculum")
    g = cutoff_fraction(ctx, cfg)
    special_min = None if int(cfg.special_min_id) < 0 else int(cfg.special_min_id)
    updates = {f: climb.vocab_map(getattr(batch, f), g, int(cfg.vocab_size), int(cfg.unk_id),
                                  special_min, tuple(cfg.special_ids)) for f in cfg.fields}
    return batch.replace(**updates)


vocab_curriculum = register("vocab_curriculum", Transform(apply))

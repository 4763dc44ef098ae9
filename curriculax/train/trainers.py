"""Trainers: which step function a config runs (``config.trainer``), looked up by name.

A trainer turns a built :class:`curriculax.train.setup.Experiment` into the pure
``step(state, bank) -> (state, metrics)`` the loop jits, and says what extra state it keeps:

- ``"sft"``: supervised fine-tuning with any objective (:mod:`curriculax.train.step`);
- ``"rl"``: on-policy RL with G rollouts per prompt and a policy loss (``rl.loss``: GRPO, NFT),
  optionally with ReLIFT's interleaved SFT (:mod:`curriculax.rl.step`);
- ``"dpo"``: preference pairs with a frozen reference (:mod:`curriculax.rl.preference`);
- ``"spin"``: self-play fine-tuning (:mod:`curriculax.rl.preference`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from curriculax.registry import Registry


class Trainer(NamedTuple):
    make_step: Callable[[Any], Callable]  # (experiment) -> step(state, bank)
    init_extra: Callable[[Any], Any] = lambda cfg: None  # TrainState.rl
    needs_ref: Callable[[Any], bool] = lambda cfg: False  # keep a frozen copy of the start
    check: Callable[[Any], None] = lambda cfg: None  # config validation for this trainer
    # (train ExampleBank, tokenizer, cfg) -> (device data pytree with .meta(), ExampleBank):
    # what the step consumes when it is not the plain bank (DPO's chosen/rejected pairs).
    make_bank: Callable | None = None
    # Tokens one step processes, for the logged tokens_per_s (default: batch x seq_len).
    tokens_per_step: Callable[[Any], int] = lambda cfg: cfg.batch_size * cfg.data.seq_len
    # Optimizer updates one step makes; the lr schedule advances once per step regardless.
    updates_per_step: Callable[[Any], int] = lambda cfg: 1


_REGISTRY: Registry[Trainer] = Registry("trainer", "trainer")
register = _REGISTRY.register
names = _REGISTRY.names


def get(name: str) -> Trainer:
    from curriculax.rl import trainers as _rl  # noqa: F401  (registers "rl" and "spin")

    return _REGISTRY.get(name)


def _sft_step(exp):
    from curriculax.train.step import make_train_step

    return make_train_step(graphdef=exp.graphdef, curriculum=exp.curriculum,
                           objective=exp.objective, optimizer=exp.optimizer,
                           lr_schedule=exp.lr_schedule, config=exp.config, mesh=exp.mesh,
                           rules=exp.rules, sparsity=exp.sparsity)


register("sft", Trainer(_sft_step))

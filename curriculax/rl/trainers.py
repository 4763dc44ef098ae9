"""Registers the RL trainers (``config.trainer``): ``rl`` (GRPO/NFT, + ReLIFT), ``dpo``, ``spin``."""

from __future__ import annotations

import jax
import numpy as np

from curriculax.rl import base, preference, relift, step
from curriculax.rl import rewards as rewards_lib
from curriculax.train.trainers import Trainer, register


def _check(cfg):
    if cfg.data.pool_size:
        raise ValueError(f"config.trainer={cfg.trainer!r} needs the resident example bank "
                         f"(rewards look up each row's record): set config.data.pool_size=0.")
    if jax.process_count() > 1:
        raise ValueError(f"config.trainer={cfg.trainer!r} computes rewards in a host callback, "
                         f"which runs in one process: multi-process RL is not supported yet.")
    ignored = [f"{name}={value!r}" for name, value, default in (
        ("grad_accum", cfg.grad_accum, 1), ("transforms", tuple(cfg.transforms), ()))
        if value != default]
    if ignored:  # these steps never read them: refuse rather than silently train without them
        raise ValueError(f"config.trainer={cfg.trainer!r} does not support {', '.join(ignored)}: "
                         f"set config.grad_accum=1 (use rl.minibatches to split an RL update) "
                         f"and config.transforms=().")
    if not cfg.rl.temperature > 0:  # scoring divides the hidden states by it
        raise ValueError(f"config.rl.temperature={cfg.rl.temperature} must be > 0 (greedy decoding "
                         f"has no log-probs to train on; use a small value such as 0.01).")


def _model_fn(exp):
    return exp.forward_params  # LoRA unmerged, as in the RL step


def prompt_width(exp) -> int:
    """The widest prompt of the training bank: the static width of left-padded prompts."""
    return int(np.max(exp.train_data.bank.prompt_len))


def _rl_step(exp):
    cfg = exp.config
    reward_fn = rewards_lib.combine(cfg.rl.rewards)
    host = step.reward_callback(exp.train_data.records, exp.tokenizer, reward_fn,
                                int(cfg.rl.group_size))
    head = step.head_options(cfg, exp.mesh, exp.rules)
    interleave = relift.make_interleave(graphdef=exp.graphdef, optimizer=exp.optimizer,
                                        config=cfg, to_model=_model_fn(exp),
                                        head=head) if cfg.rl.relift else None
    return step.make_rl_step(graphdef=exp.graphdef, curriculum=exp.curriculum,
                             optimizer=exp.optimizer, lr_schedule=exp.lr_schedule, config=cfg,
                             host_reward=host, prompt_width=prompt_width(exp),
                             eos_id=exp.tokenizer.stop_ids, pad_id=exp.train_data.info.pad_id,
                             sparsity=exp.sparsity, interleave=interleave, mesh=exp.mesh,
                             rules=exp.rules)


def _rollout_tokens(cfg) -> int:
    return cfg.batch_size * cfg.rl.group_size * cfg.rl.max_new_tokens


def _rl_extra(cfg):
    return relift.init(int(cfg.rl.relift_capacity)) if cfg.rl.relift else None


def _rl_check(cfg):
    _check(cfg)
    if cfg.rl.relift and cfg.rl.relift_capacity < max(cfg.batch_size, cfg.rl.relift_sft_size):
        raise ValueError(f"config.rl.relift_capacity={cfg.rl.relift_capacity} must hold at least "
                         f"batch_size={cfg.batch_size} and rl.relift_sft_size="
                         f"{cfg.rl.relift_sft_size} rows.")
    rewards_lib.combine(cfg.rl.rewards)  # unknown names fail here, before any compile
    base.get(cfg.rl.loss)


register("rl", Trainer(_rl_step, init_extra=_rl_extra, needs_ref=lambda c: c.rl.kl_coef > 0,
                       check=_rl_check, tokens_per_step=_rollout_tokens,
                       updates_per_step=lambda c: int(c.rl.inner_steps) * int(c.rl.minibatches)))


def _pair_check(cfg):
    _check(cfg)
    if cfg.sparsity.name != "none":
        raise ValueError(f"config.trainer={cfg.trainer!r} does not support parameter selection "
                         f"yet: set config.sparsity.name='none'.")


def _spin_step(exp):
    return preference.make_spin_step(
        graphdef=exp.graphdef, curriculum=exp.curriculum, optimizer=exp.optimizer,
        lr_schedule=exp.lr_schedule, config=exp.config, prompt_width=prompt_width(exp),
        eos_id=exp.tokenizer.stop_ids, pad_id=exp.train_data.info.pad_id, mesh=exp.mesh,
        rules=exp.rules)


def _dpo_step(exp):
    return preference.make_dpo_step(graphdef=exp.graphdef, curriculum=exp.curriculum,
                                    optimizer=exp.optimizer, lr_schedule=exp.lr_schedule,
                                    config=exp.config, mesh=exp.mesh, rules=exp.rules)


register("spin", Trainer(_spin_step, needs_ref=lambda c: True, check=_pair_check,
                         tokens_per_step=lambda c: c.batch_size * (
                             c.data.seq_len + c.rl.max_new_tokens)))
register("dpo", Trainer(_dpo_step, needs_ref=lambda c: True, check=_pair_check,
                        make_bank=preference.pair_bank,
                        tokens_per_step=lambda c: 2 * c.batch_size * c.data.seq_len))

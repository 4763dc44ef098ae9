"""Curriculum comparison on synthetic arithmetic (experiments/compare_curricula.py).

A tiny byte-level model (hidden 64, 2 layers, seq_len 208) trained for 250 steps of batch 16
on 2000 word problems with 1-3 steps (difficulty) in three operation families (category); every
method gets the same step budget, model, data and optimizer. Sized so that 11 methods x 3 seeds
run in about 18 minutes on 2 CPU cores (mean 32 s per run in experiments/results/curricula_arith.md).
Select the method with the config argument:

    curriculax train --config=configs/curricula_arith.py:sec --workdir=runs/arith_sec

Methods: uniform, pacing, anti, cyclical, sec, skill_it, self_paced, stat_sel, stat_sel_rel,
interleaved, blocked (see METHODS). ``total_steps`` is left to the trainer (= config.steps).
"""

from curriculax import curriculum as curricula
from curriculax.models import ModelConfig
from curriculax.train.config import model_fields, quickstart_config

METHODS = {
    "uniform": {"name": "uniform"},
    "pacing": {"name": "pacing", "kind": "linear", "start": 0.2, "ramp": 0.8},
    "anti": {"name": "pacing", "kind": "linear", "start": 0.2, "ramp": 0.8, "anti": True},
    "cyclical": {"name": "cyclical"},
    "sec": {"name": "sec"},
    "skill_it": {"name": "skill_it"},
    "self_paced": {"name": "self_paced"},
    "stat_sel": {"name": "stat_sel"},
    "stat_sel_rel": {"name": "stat_sel", "failure": "relative"},
    "interleaved": {"name": "ordering", "kind": "interleaved"},
    "blocked": {"name": "ordering", "kind": "blocked"},
}


def get_config(method: str = "uniform"):
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {sorted(METHODS)}")
    c = quickstart_config()
    c.steps = 250
    c.batch_size = 16
    c.model.update(model_fields(ModelConfig.tiny(
        hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_seq_len=208)))
    c.data.num_train = 2000
    c.data.num_eval = 150
    c.data.max_difficulty = 3
    c.data.eval_max_difficulty = 3
    c.data.seq_len = 208
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.log_every = 10
    c.eval_every = 250
    c.checkpoint_every = 250
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 48
    c.mesh.num_devices = 1
    c.mesh.data = 1
    c.progress_bar = False
    c.curriculum = curricula.config(**METHODS[method])  # every key: CLI-overridable
    return c

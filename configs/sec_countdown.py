"""Self-Evolving Curriculum on RL (GRPO) for countdown puzzles with a tiny byte-level model.

Two phases, as in experiments/sec_rl.py:

    curriculax train --config=configs/sec_countdown.py:warmup --workdir=runs/cd_warmup
    curriculax train --config=configs/sec_countdown.py:sec --workdir=runs/cd_sec \\
        --config.model.init_from=runs/cd_warmup

``warmup`` is SFT on worked countdown solutions (the model must solve some puzzles before RL
has any reward to work with). The RL phase samples 8 completions per prompt, rewards a valid
final expression (``rewards.countdown``) and hands the mean |advantage| per prompt to the
curriculum. Arms are the puzzle sizes (2-4 numbers = difficulty). Curricula: ``sec``
(the paper: TD(0) on mean |A|, Boltzmann tau 1, alpha 0.5), ``uniform`` (random) and
``ordered`` (easy to hard: linear pacing over difficulty).
"""

from curriculax import curriculum as curricula
from curriculax.models import ModelConfig
from curriculax.train.config import model_fields, quickstart_config

CURRICULA = {
    "uniform": {"name": "uniform"},
    "ordered": {"name": "pacing", "kind": "linear", "start": 0.34, "ramp": 0.8},
    "sec": {"name": "sec", "arms": "difficulty", "reward": "advantage", "alpha": 0.5, "tau": 1.0},
}


def base(source: str = "countdown", min_difficulty: int = 2, max_difficulty: int = 4):
    c = quickstart_config()
    c.model.update(model_fields(ModelConfig.tiny(
        hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=32, max_seq_len=288)))
    c.data.source = source
    c.data.num_train = 4000
    c.data.num_eval = 96
    c.data.min_difficulty = c.data.eval_min_difficulty = min_difficulty
    c.data.max_difficulty = c.data.eval_max_difficulty = max_difficulty
    c.data.seq_len = 288
    c.eval.reward = source if source == "countdown" else "math_answer"
    c.eval.batch_size = 96
    c.eval.max_new_tokens = 96
    c.rl.rewards = ((source if source == "countdown" else "math_answer", 1.0),)
    return c


def warmup(c):
    c.steps = 600
    c.batch_size = 32
    c.optimizer.lr = 3e-3
    c.eval_every = c.checkpoint_every = 200
    return c


def rl(c, curriculum: str):
    c.trainer = "rl"
    c.steps = 60
    c.batch_size = 8  # prompts per step; x group_size = 64 completions
    c.rl.group_size = 8
    c.rl.max_new_tokens = 96
    c.rl.temperature = 1.0
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_steps = 5
    c.optimizer.end_lr_factor = 1.0
    c.optimizer.weight_decay = 0.0
    c.curriculum = curricula.config(**CURRICULA[curriculum])  # every key: CLI-overridable
    c.log_every = 5
    c.eval_every = c.checkpoint_every = 30
    c.eval_at_start = True
    c.required_fields = ("model.init_from",)
    return c


def get_config(arg: str = "sec"):
    if arg == "warmup":
        return warmup(base())
    if arg not in CURRICULA:
        raise ValueError(f"configs/sec_countdown.py:{arg}: choose warmup or one of {sorted(CURRICULA)}.")
    return rl(base(), arg)

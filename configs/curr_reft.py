"""Curr-ReFT: GRPO over three question formats of the same problems, judge -> choice -> open.

Deng et al., 2025 (arXiv 2503.07065; :mod:`curriculax.rl.curr_reft`). Each stage is one run
that starts from the previous stage's weights (``model.init_from``), with that stage's
records (``data.curr_reft_stage``), rewards (accuracy + format) and group size:

    curriculax train --config=configs/curr_reft.py:warmup --workdir=runs/cr_warmup
    curriculax train --config=configs/curr_reft.py:judge  --workdir=runs/cr_judge \\
        --config.model.init_from=runs/cr_warmup
    curriculax train --config=configs/curr_reft.py:choice --workdir=runs/cr_choice \\
        --config.model.init_from=runs/cr_judge
    curriculax train --config=configs/curr_reft.py:open   --workdir=runs/cr_open \\
        --config.model.init_from=runs/cr_choice

The paper starts from an instruct VLM that already follows each format; the tiny byte-level
model here first gets an SFT warm-up on all three formats (``warmup``: ``curr_reft_stage=mixed``).
Their second phase (SFT on GPT-4o-filtered rejection samples) is not included.
Defaults from their scripts + TRL 0.15: groups 4 / 2 / 4, beta 0.04, advantage eps 1e-4,
per-sequence token mean, one update per batch; lr and steps are sized for the tiny model.
"""

import ml_collections  # noqa: F401  (configs are ml_collections files)

from curriculax.rl import curr_reft
from curriculax.train.config import quickstart_config

ACCURACY_REWARD = {"judge": "judge", "choice": "choice", "open": "final_answer"}


def base():
    c = quickstart_config()
    c.data.max_difficulty = c.data.eval_max_difficulty = 2
    c.data.num_train = 3000
    c.data.num_eval = 96
    c.data.seq_len = 224
    c.model.max_seq_len = 256
    c.eval.batch_size = 96
    return c


def get_config(stage: str = "judge"):
    c = base()
    if stage == "warmup":
        c.data.curr_reft_stage = "mixed"
        c.steps = 400
        return c
    if stage not in curr_reft.STAGES:
        raise ValueError(f"configs/curr_reft.py:{stage}: choose warmup or one of {curr_reft.STAGES}.")
    c.data.curr_reft_stage = stage
    c.trainer = "rl"
    c.rl.rewards = curr_reft.stage_reward(stage)
    c.rl.success_threshold = 2.0  # accuracy and format both earned
    c.rl.group_size = curr_reft.STAGE_DEFAULTS[stage]["num_generations"]
    c.rl.kl_coef = 0.04
    c.rl.advantage_eps = 1e-4
    c.rl.aggregation = "seq_mean_token_mean"
    c.rl.max_new_tokens = 64
    c.eval.reward = ACCURACY_REWARD[stage]
    c.batch_size = 8
    c.steps = 40 if stage != "open" else 80  # their epochs 1 / 1 / 2
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_steps = 5
    c.optimizer.end_lr_factor = 1.0
    c.optimizer.weight_decay = 0.0
    c.log_every = 5
    c.eval_every = c.checkpoint_every = 20
    c.eval_at_start = True
    c.required_fields = ("model.init_from",)
    return c

"""ReFT stage 2: online RL on the warm-up's own questions (see ``configs/reft_sft.py``).

The paper trains PPO with a value head and GAE; here the policy update is GRPO (group
baseline instead of a learned value: the issue's "or GRPO"), with the paper's KL to the
warm-up model (k3 estimator, coefficient 0.01) and answer-match reward. The training
questions are exactly the warm-up's (same data config and seed). Required:
``--config.model.init_from`` = the warm-up run's workdir.
"""

from curriculax.train.config import sibling_config


def get_config(setting: str = "tiny"):
    c = sibling_config(__file__, "reft_sft", setting)
    c.trainer = "rl"
    c.grad_accum = 1  # gsm8k_sft.py's 4 is an SFT setting; the RL step has no accumulation
    c.rl.rewards = (("math_answer", 1.0),)
    c.rl.kl_coef = 0.01
    c.rl.group_size = 8
    if setting == "tiny":
        c.steps = 60
        c.batch_size = 8
        c.rl.max_new_tokens = 64
        c.optimizer.lr = 2e-4
        c.optimizer.warmup_steps = 5
        c.optimizer.end_lr_factor = 1.0
        c.optimizer.weight_decay = 0.0
        c.eval_every = c.checkpoint_every = 30
        c.log_every = 5
    else:
        c.steps = 1000
        c.batch_size = 16
        c.rl.max_new_tokens = 300
        c.optimizer.lr = 3e-7
    c.eval_at_start = True
    c.required_fields = tuple(c.required_fields) + ("model.init_from",)
    return c

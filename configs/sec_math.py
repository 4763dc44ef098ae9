"""Self-Evolving Curriculum on MATH with GRPO (the paper's main setting), for a HF model.

Arms are MATH levels 1-5 (``curriculum.arms="difficulty"``); ``--config.curriculum.arms=category``
uses the 7 subjects and ``joint`` their product. Required: ``--config.model.hf_path`` and
``--config.data.tokenizer`` (an instruct model's directory). The shared file is a 1000-problem
subset of the MATH *test* set, so the defaults train on its first 800 problems and evaluate on
the last 200: a smoke/demo setting; point ``data.path`` at MATH train (and ``data.eval_path`` at
MATH test) for a real run.

    curriculax train --config=configs/sec_math.py --workdir=runs/sec_math \\
        --config.model.hf_path=/models/qwen2.5-0.5b-instruct \\
        --config.data.tokenizer=/models/qwen2.5-0.5b-instruct

Paper settings (SEC, arXiv 2505.14970, verl): GRPO, rollout n 8, alpha 0.5, lr 1e-6, and tau 0.4
for its Math runs (the README commands; 1.0 on Countdown, 0.2 on the 2-D puzzle).
"""

from curriculax import curriculum as curricula
from curriculax.train.config import default_config


def get_config(curriculum: str = "sec"):
    c = default_config()
    c.trainer = "rl"
    c.steps = 200
    c.batch_size = 16  # prompts per step
    c.model.dtype = "bfloat16"  # compute; the weights the optimizer updates stay float32
    c.model.hf_path = ""
    c.data.source = "math"
    c.data.tokenizer = ""
    c.data.path = "../shared/data/math/test1000.jsonl"
    c.data.eval_path = ""  # the last num_eval problems of data.path, held out from training
    c.data.template = "chat"
    c.data.seq_len = 1024
    c.data.num_train = 0
    c.data.num_eval = 200
    c.data.min_difficulty = c.data.eval_min_difficulty = 1
    c.data.max_difficulty = c.data.eval_max_difficulty = 5
    c.rl.group_size = 8
    c.rl.max_new_tokens = 512
    c.rl.rewards = (("math_answer", 1.0),)
    c.rl.kl_coef = 0.0
    c.optimizer.lr = 1e-6
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.curriculum = curricula.config(  # every key: CLI-overridable
        **({"name": "sec", "arms": "difficulty", "reward": "advantage", "alpha": 0.5, "tau": 0.4}
           if curriculum == "sec" else {"name": curriculum}))
    c.eval.max_new_tokens = 512
    c.eval.batch_size = 32
    c.eval_every = c.checkpoint_every = 50
    c.required_fields = ("model.hf_path", "data.tokenizer")
    return c

"""ReFT stage 1: SFT warm-up (Luong et al., "ReFT: Reasoning with Reinforced Fine-Tuning", ACL 2024).

ReFT warms the model up with a few epochs of SFT on (question, chain-of-thought) pairs, then
continues with online RL on the *same questions*, sampling reasoning paths and rewarding the
final answer (``configs/reft_rl.py``). Default: the tiny byte-level model on 1-3 step
arithmetic; ``:gsm8k`` is the paper's GSM8K setting for a HF model (required
``--config.model.hf_path`` and ``--config.data.tokenizer``).

    curriculax train --config=configs/reft_sft.py --workdir=runs/reft_sft
    curriculax train --config=configs/reft_rl.py --workdir=runs/reft_rl \\
        --config.model.init_from=runs/reft_sft

Paper defaults (GSM8K, Galactica/CodeLlama 7B): warm-up 1-2 epochs (lr 1e-5), RL lr 3e-7,
PPO with a value head, KL coefficient 0.01 (0.05 for CodeLlama), answer reward 1 / partial 0.1.
"""

from curriculax.train.config import quickstart_config, sibling_config

SHARED = {"data.num_train": 3000, "data.max_difficulty": 3, "data.eval_max_difficulty": 3,
          "data.num_eval": 96}


def tiny():
    c = quickstart_config()
    for key, value in SHARED.items():
        section, field = key.split(".")
        c[section][field] = value
    c.steps = 400
    c.eval.batch_size = 96
    return c


def gsm8k():
    c = sibling_config(__file__, "gsm8k_sft")
    c.steps = 2 * 7473 // c.batch_size  # ~2 epochs of warm-up, as in the paper
    return c


def get_config(setting: str = "tiny"):
    builders = {"tiny": tiny, "gsm8k": gsm8k}
    if setting not in builders:
        raise ValueError(f"configs/reft_sft.py:{setting}: choose one of {sorted(builders)}.")
    return builders[setting]()

"""SFT of a Hugging Face checkpoint on GSM8K.

Required: ``--config.model.hf_path=/path/to/hf_model_dir`` and
``--config.data.tokenizer=/path/to/hf_model_dir`` (its tokenizer.json), plus
``--config.data.path`` / ``--config.data.eval_path`` pointing at GSM8K JSONL files.
"""

from curriculax.train.config import default_config


def get_config():
    c = default_config()
    c.steps = 2000
    c.batch_size = 64
    c.grad_accum = 4
    c.model.dtype = "bfloat16"  # compute; the weights the optimizer updates stay float32
    c.model.hf_path = ""  # required
    c.data.source = "gsm8k"
    c.data.tokenizer = ""  # required: the model's tokenizer directory
    c.data.path = "../shared/data/gsm8k/train.jsonl"
    c.data.eval_path = "../shared/data/gsm8k/test.jsonl"
    c.data.template = "chat"
    c.data.seq_len = 512
    c.data.num_train = 0  # all
    c.data.num_eval = 256
    c.data.min_difficulty = 0
    c.data.max_difficulty = 100
    c.data.eval_min_difficulty = 0
    c.data.eval_max_difficulty = 100
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.0
    c.eval.max_new_tokens = 256
    c.eval.batch_size = 32
    c.required_fields = ("model.hf_path", "data.tokenizer")
    return c

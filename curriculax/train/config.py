"""Default experiment configuration (ml_collections) and its validation.

Every experiment file in ``configs/`` starts from :func:`default_config` and overrides fields;
command-line overrides (``--config.steps=200``) may only touch existing keys, so a typo fails
with a message naming the key instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from curriculax.models.config import ModelConfig
from curriculax.sharding import DEFAULT_RULES


def model_fields(model: ModelConfig) -> dict:
    d = dataclasses.asdict(model)
    d["rope_scaling"] = d["rope_scaling"] or {}
    return d


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000  # schedules (LR, pacing) are planned for this many steps
    c.stop_at = 0  # > 0: stop after this step as a preemption would (checkpoint, then exit)
    c.batch_size = 32  # global examples per optimizer step
    c.grad_accum = 1  # micro-batches per step (batch_size must divide evenly); same update as 1
    c.steps_per_dispatch = 1  # train steps fused into one jitted lax.scan

    # Model: `hf_path` loads a Hugging Face checkpoint; otherwise the fields below build one. With
    # `hf_path` the architecture comes from its config.json and only `dtype` (compute) and
    # `param_dtype` (the stored weights the optimizer updates; float32 keeps AdamW's small updates
    # that bfloat16 weights would round away) are read from here.
    c.model = ml_collections.ConfigDict(model_fields(ModelConfig.tiny()))
    c.model.hf_path = ""
    c.model.init_from = ""  # workdir of an earlier run: start from its latest params (RL after SFT)

    c.data = ml_collections.ConfigDict()
    c.data.source = "arithmetic"  # arithmetic | countdown | gsm8k | math | jsonl | tfds
    c.data.path = ""  # file (gsm8k, math, jsonl) or TFDS data_dir[:split] (tfds; split train)
    c.data.eval_path = ""  # held-out file; empty: split `num_eval` records off the training set
    c.data.eval_source = ""  # the held-out set's source when it differs (S3FT's rewritten file)
    c.data.num_train = 2000  # synthetic sources: how many records; files: a limit (0 = all)
    c.data.num_eval = 128
    c.data.min_difficulty = 1
    c.data.max_difficulty = 8
    c.data.eval_min_difficulty = 1
    c.data.eval_max_difficulty = 8
    c.data.max_value = 1000  # synthetic arithmetic value bound ('mul' needs >= 2 * 2**max_difficulty)
    c.data.tokenizer = "byte"  # "byte" or a local HF tokenizer directory / tokenizer.json
    c.data.template = "plain"  # plain | chat
    c.data.seq_len = 128
    c.data.overflow = "truncate"  # truncate | drop
    # > 0: stream candidate pools of this many rows with Grain instead of keeping the whole
    # training set on the devices; the curriculum samples each batch from the current pool.
    c.data.pool_size = 0
    # Curr-ReFT stage (judge | choice | open | mixed): recast every record as that question
    # format ("mixed": each record gets one of the three, for a warm-up on all formats).
    c.data.curr_reft_stage = ""

    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.name = "uniform"

    # Input-side transforms applied in-step, in order (names from curriculax.transforms);
    # `transform_config.<name>` holds each one's settings (module defaults when absent).
    c.transforms = ()
    c.transform_config = ml_collections.ConfigDict()

    c.trainer = "sft"  # sft | rl | dpo | spin (curriculax.train.trainers)
    c.rl = rl_config()

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "sft"
    c.objective.normalization = "token"  # token | sequence | batch | constant
    c.objective.impl = "auto"  # fused LM-head kernel: auto | xla_chunked | xla_naive | pallas_*
    # Multi-device meshes: run the kernel under shard_map (rows over batch axes, vocab over
    # `tensor`): auto (Pallas impls only) | always | never (leave partitioning to XLA).
    c.objective.shard_map = "auto"
    # Rows per backward group of the fused head: None (one group, d_W rounded once) | "auto" |
    # int. Smaller groups shrink the float32 d_hidden accumulator (see kernels/lm_head.py).
    c.objective.bwd_rows = None
    # CCE-style gradient filtering of the Pallas backward: None (exact) | "auto" (CCE's
    # default, 2**-12 in bf16) | eps.
    # Skips the GEMM work of logit tiles whose probabilities are all < eps; approximate.
    c.objective.grad_filter_eps = None

    # Parameter selection (curriculax.sparsity): none | lift | hft | lt_sft | lora | loramoe |
    # prefix | locft | select.
    # Settings sit next to `name`; `curriculax.sparsity.config("lift", ...)` fills in defaults.
    c.sparsity = ml_collections.ConfigDict(dict(name="none"))

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.end_lr_factor = 0.1  # cosine decay to lr * end_lr_factor at `steps`
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip = 1.0

    # Mesh axis sizes; one may be -1 to absorb the rest. num_devices=0 uses every device.
    # dcn_data / dcn_fsdp > 1: that axis spans this many TPU slices or GPU hosts over DCN
    # (multi-slice); sizes stay global (data = dcn_data x devices per slice). docs/scale.md.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0,
                                            dcn_data=1, dcn_fsdp=1))
    c.sharding_rules = tuple((k, v) for k, v in DEFAULT_RULES)

    c.log_every = 10
    c.eval_every = 200
    c.eval_at_start = False  # also evaluate the untrained model at step 0
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.plots = True
    c.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 64
    # How a greedy answer is judged: a reward name from curriculax.rl.rewards (correct iff the
    # reward >= 1), e.g. "countdown" to verify expressions; "math_answer" compares final answers.
    c.eval.reward = "math_answer"

    c.required_fields = ()  # dotted names a config file requires to be set (non-empty)
    return c


def rl_config() -> ml_collections.ConfigDict:
    """Settings of ``trainer="rl"`` (GRPO by default; ``docs/rl.md``). ``batch_size`` = prompts."""
    return ml_collections.ConfigDict(dict(
        group_size=8,  # G completions per prompt
        max_new_tokens=64,
        temperature=1.0,
        top_p=1.0,
        loss="grpo",  # grpo | nft (curriculax.rl.base registry)
        clip_eps_low=0.2,
        clip_eps_high=0.2,  # DAPO clip-higher: 0.28
        dual_clip=0.0,  # > 0: verl's dual clip c for negative advantages (3.0)
        kl_coef=0.0,  # beta of the k3 KL to the starting model
        aggregation="token_mean",  # token_mean | seq_mean_token_mean | seq_mean_token_sum | dr_grpo | seq_sum_norm
        advantage_std="bessel",  # bessel | population | none (Dr. GRPO)
        advantage_eps=1e-6,
        inner_steps=1,  # optimizer passes over each rollout batch
        minibatches=1,  # optimizer steps per pass
        rewards=(("math_answer", 1.0),),  # (name, weight) pairs from curriculax.rl.rewards
        success_threshold=1.0,  # reward >= this counts as solved
        # NFT (loss="nft")
        nft_eps_neg=1.0,
        nft_neg_weight=1.0,
        nft_max_log_ratio=10.0,
        nft_r_min=0.02,
        nft_r_max=0.98,
        # ReLIFT: SFT on the demonstrations of prompts no rollout solved, interleaved with RL.
        relift=False,
        relift_sft_size=8,  # SFT batch: taken once this many hardest prompts are buffered
        relift_capacity=64,
        relift_entropy_coef=0.0,
        # DPO (trainer="dpo"): records carry a "rejected" response next to "response"
        dpo_beta=0.1,
        dpo_label_smoothing=0.0,
        dpo_kind="sigmoid",  # sigmoid | hinge | ipo
        # S3FT (`curriculax s3ft`): also try the model's paraphrase of the gold response
        s3ft_paraphrase=True,
        # SPIN (trainer="spin")
        spin_beta=0.1,
        spin_steps_per_iteration=100,
        spin_loss="sigmoid",
    ))


def quickstart_config() -> ml_collections.ConfigDict:
    """A small byte-level model learning 1-2 step arithmetic on 2 CPU cores in minutes."""
    c = default_config()
    c.steps = 300
    c.batch_size = 32
    c.model.update(model_fields(ModelConfig.tiny(
        hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=32, max_seq_len=160)))
    c.data.num_train = 4000
    c.data.num_eval = 128
    c.data.max_value = 100
    c.data.max_difficulty = 2
    c.data.eval_max_difficulty = 2
    c.data.seq_len = 160
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.eval_every = 100
    c.checkpoint_every = 100
    c.eval_at_start = True
    c.eval.max_new_tokens = 40
    return c


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    fields = {k: v for k, v in c.model.items() if k not in ("hf_path", "init_from")}
    fields["rope_scaling"] = dict(fields["rope_scaling"]) or None
    return ModelConfig.from_dict(fields)


def validate(c: ml_collections.ConfigDict) -> None:
    """Cross-field checks; each error names the field and the fix."""
    for name in c.required_fields:
        value = c
        for part in name.split("."):
            value = value[part]
        if value in ("", None):
            raise ValueError(f"config.{name} is required by this config: pass --config.{name}=...")
    for name, value in (("steps", c.steps), ("batch_size", c.batch_size), ("grad_accum", c.grad_accum),
                        ("eval.batch_size", c.eval.batch_size)):
        if value <= 0:
            raise ValueError(f"config.{name}={value} must be positive.")
    for name in ("num_train", "num_eval"):
        if c.data[name] < 0:
            raise ValueError(f"config.data.{name}={c.data[name]} must be >= 0 (0: all records of a file).")
    if c.batch_size % c.grad_accum:
        raise ValueError(
            f"config.batch_size={c.batch_size} must be divisible by config.grad_accum={c.grad_accum}."
        )
    if c.stop_at < 0 or c.stop_at > c.steps:
        raise ValueError(f"config.stop_at={c.stop_at} must be in [0, steps={c.steps}] (0 = no stop).")
    for name in ("log_every", "eval_every", "checkpoint_every", "steps_per_dispatch"):
        if c[name] <= 0:
            raise ValueError(f"config.{name}={c[name]} must be positive.")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        if c[name] % c.steps_per_dispatch:
            raise ValueError(
                f"config.{name}={c[name]} must be a multiple of config.steps_per_dispatch="
                f"{c.steps_per_dispatch} (actions run between dispatches)."
            )


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    """Entry point for ``--config=.../config.py:NAME`` (absl ``config_flags``)."""
    builders = {"default": default_config, "quickstart": quickstart_config}
    if name not in builders:
        raise ValueError(f"Unknown built-in config {name!r}; choose one of {sorted(builders)}.")
    return builders[name]()


def sibling_config(config_file: str, name: str, arg: str | None = None):
    """``get_config(arg)`` of ``<dir of config_file>/<name>.py``: config files build on one
    another (``configs/reft_rl.py`` on ``reft_sft.py``) without ``configs/`` being a package."""
    import importlib.util
    import pathlib

    path = pathlib.Path(config_file).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_curriculax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)

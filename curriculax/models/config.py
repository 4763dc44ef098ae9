"""Model configuration for the Llama / Qwen2 / Qwen3 decoder family.

One dataclass covers the three families; they differ only in a few switches:

| family | qkv_bias | qk_norm | tie_embeddings (small sizes) | rope_scaling |
| ------ | -------- | ------- | ---------------------------- | ------------ |
| Llama-3.x | False | False | True (1B/3B) | llama3 |
| Qwen2 / 2.5 | True | False | True (0.5B) | none |
| Qwen3 | False | True | True (0.6B) | none |

Two optional parameter-efficient modules are switched on here (both off by default, so existing
checkpoints and Hugging Face parity are untouched):

- ``loramoe_experts > 0``: LoRAMoE (:mod:`curriculax.peft.loramoe`), N LoRA experts and a softmax
  router on the FFN projections in ``loramoe_targets``, plus the localized balancing constraint
  (``loramoe_lbc_*``) computed when the forward pass is given per-example categories;
- ``prefix_len > 0``: prefix tuning (:mod:`curriculax.peft.prefix`), learned keys/values that
  every attention layer prepends to each sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (``rope_type="llama3"`` in HF)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_seq_len: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"
    rope_scaling: RopeScaling | None = None
    remat: bool = False
    # LoRAMoE (curriculax.peft.loramoe); 0 experts = off.
    loramoe_experts: int = 0
    loramoe_rank: int = 4
    loramoe_alpha: float = 32.0
    loramoe_targets: tuple[str, ...] = ("gate", "up", "down")
    loramoe_lbc_weight: float = 0.0  # beta; 0 = no balancing loss (the official script's value)
    loramoe_lbc_delta: float = 0.0  # delta of the coefficient matrix Q
    loramoe_lbc_form: str = "code"  # "code": Var_ddof1(Z) / Mean(Z)^2; "paper": Var(Z) / Mean(Z)
    # Category indices (the bank's ``category``) whose examples have type 1; () = odd indices.
    loramoe_type1_categories: tuple[int, ...] = ()
    # Prefix tuning (curriculax.peft.prefix): learned key/value vectors per layer; 0 = off.
    prefix_len: int = 0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)."
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE.")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        # Tuples, not lists (e.g. from JSON): the config is hashed as part of the model graph.
        object.__setattr__(self, "loramoe_targets", tuple(self.loramoe_targets))
        object.__setattr__(self, "loramoe_type1_categories",
                           tuple(int(c) for c in self.loramoe_type1_categories))
        if self.loramoe_experts:
            self._check_loramoe()
        if self.prefix_len < 0:
            raise ValueError(f"ModelConfig.prefix_len={self.prefix_len} must be >= 0 (0 = off).")

    def _check_loramoe(self):
        bad = sorted(set(self.loramoe_targets) - {"gate", "up", "down"})
        if bad or not self.loramoe_targets:
            raise ValueError(f"ModelConfig.loramoe_targets={self.loramoe_targets}: choose among "
                             f"the FFN projections 'gate', 'up', 'down'.")
        if self.loramoe_experts < 0 or self.loramoe_rank < 1:
            raise ValueError(f"ModelConfig.loramoe_experts={self.loramoe_experts} and "
                             f"loramoe_rank={self.loramoe_rank} must be positive.")
        if self.loramoe_lbc_form not in ("code", "paper"):
            raise ValueError(f"ModelConfig.loramoe_lbc_form={self.loramoe_lbc_form!r}; expected "
                             f"'code' or 'paper'.")
        if self.loramoe_lbc_weight and self.loramoe_experts % 2:
            raise ValueError(f"ModelConfig.loramoe_experts={self.loramoe_experts} must be even: "
                             f"the balancing loss splits the experts into two halves.")

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**d)

    # Presets -----------------------------------------------------------------

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A 2-layer model for tests and the CPU quickstart (vocab fits the byte tokenizer)."""
        base = dict(
            vocab_size=264, hidden_size=64, intermediate_size=192, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_embeddings=False, max_seq_len=256,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def small_50m(cls, **overrides) -> "ModelConfig":
        """~50M parameters (with a 32k vocabulary): the CPU benchmark size."""
        base = dict(
            vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=10,
            num_heads=8, num_kv_heads=4, head_dim=64, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_embeddings=True, max_seq_len=1024,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def llama3_2_1b(cls, **overrides) -> "ModelConfig":
        base = dict(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
            num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
            rms_norm_eps=1e-5, tie_embeddings=True, max_seq_len=131072,
            rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), dtype="bfloat16",
            param_dtype="bfloat16",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def qwen2_5_0_5b(cls, **overrides) -> "ModelConfig":
        base = dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
            num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True, max_seq_len=32768,
            dtype="bfloat16", param_dtype="bfloat16",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def qwen3_0_6b(cls, **overrides) -> "ModelConfig":
        base = dict(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
            num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_embeddings=True, qk_norm=True, max_seq_len=40960,
            dtype="bfloat16", param_dtype="bfloat16",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        presets = {
            "tiny": cls.tiny, "small_50m": cls.small_50m, "llama3.2-1b": cls.llama3_2_1b,
            "qwen2.5-0.5b": cls.qwen2_5_0_5b, "qwen3-0.6b": cls.qwen3_0_6b,
        }
        if name not in presets:
            raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(presets)}.")
        return presets[name](**overrides)


def num_params(config: ModelConfig) -> int:
    """Parameter count from the shapes alone (no allocation)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if config.qkv_bias else 0)
    attn += 2 * config.head_dim if config.qk_norm else 0
    block = attn + 3 * d * f + 2 * d
    if config.loramoe_experts:  # per target: A [E,in,r], B [E,r,out], router [in,E]
        e, r = config.loramoe_experts, config.loramoe_rank
        dims = {"gate": (d, f), "up": (d, f), "down": (f, d)}
        block += sum(e * r * (m + n) + m * e for m, n in map(dims.get, config.loramoe_targets))
    block += 2 * config.prefix_len * kv  # prefix keys and values
    head = 0 if config.tie_embeddings else d * v
    return v * d + config.num_layers * block + d + head

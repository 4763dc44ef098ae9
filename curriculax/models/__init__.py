"""Flax NNX decoder-only transformers (Llama, Qwen2, Qwen3) and decoding."""

from curriculax.models.config import ModelConfig, RopeScaling, num_params
from curriculax.models.generate import Generation, decode, generate
from curriculax.models.hf import load_hf, save_hf
from curriculax.models.layers import AuxLoss
from curriculax.models.transformer import KVCache, Transformer

__all__ = [
    "AuxLoss", "Generation", "KVCache", "ModelConfig", "RopeScaling", "Transformer", "decode",
    "generate", "load_hf", "num_params", "save_hf",
]

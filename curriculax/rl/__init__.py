"""RL and preference fine-tuning: rollouts, rewards, GRPO and relatives, inside the jitted step."""

from curriculax.rl import grpo, nft, rollout  # noqa: F401  (register the "grpo", "nft" losses)
from curriculax.rl.base import PolicyLoss, Signals, get, names, register

__all__ = ["PolicyLoss", "Signals", "get", "grpo", "names", "nft", "register", "rollout"]

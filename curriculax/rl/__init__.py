"""RL and preference fine-tuning: rollouts, rewards, GRPO and relatives, inside the jitted step."""

from curriculax.rl import grpo, rollout  # noqa: F401  (registers the "grpo" loss)
from curriculax.rl.base import PolicyLoss, Signals, get, names, register

__all__ = ["PolicyLoss", "Signals", "get", "grpo", "names", "register", "rollout"]

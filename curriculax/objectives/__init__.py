"""Training objectives as thin formulas over fused LM-head statistics, looked up by name."""

from curriculax.objectives import sft
from curriculax.objectives.base import (NORMALIZATIONS, Objective, get, lm_head_stats, names,
                                        normalizer, reduce_loss, register)

__all__ = ["NORMALIZATIONS", "Objective", "get", "lm_head_stats", "names", "normalizer",
           "reduce_loss", "register", "sft"]

"""Training objectives as thin formulas over fused LM-head statistics, looked up by name."""

from curriculax.objectives import asft, dft, otr, sft, token_weighted, ul2
from curriculax.objectives.base import (NORMALIZATIONS, Objective, get, lm_head_stats, names,
                                        normalizer, reduce_loss, register)
from curriculax.objectives.stats import ExtendedStats, attach

__all__ = ["NORMALIZATIONS", "ExtendedStats", "Objective", "asft", "attach", "dft", "get",
           "lm_head_stats", "names", "normalizer", "otr", "reduce_loss", "register", "sft",
           "token_weighted", "ul2"]

"""Fused kernels.  ``fused_lm_head``: LM-head statistics without ``[N, V]`` logits."""

from curriculax.kernels.lm_head import IMPLS, LMHeadStats, fused_lm_head, resolve_impl

__all__ = ["IMPLS", "LMHeadStats", "fused_lm_head", "resolve_impl"]

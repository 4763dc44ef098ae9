"""Statistics beyond the kernel's :class:`~curriculax.kernels.LMHeadStats`, attached by the step.

``ref_target_logprob`` (``log pi_ref(y_t)``) is requested by objectives that declare
``needs=("ref_logprob",)`` (reference-confidence token weights). Until the fused kernel
returns it natively, the train step computes it with a second, gradient-free kernel pass over
the reference head and attaches it here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax

from curriculax.kernels import LMHeadStats


@flax.struct.dataclass
class ExtendedStats(LMHeadStats):
    ref_target_logprob: Optional[jax.Array] = None


def attach(stats, **extras) -> ExtendedStats:
    """``stats`` with extra per-token fields (see :class:`ExtendedStats`)."""
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    fields.update(extras)
    return ExtendedStats(**fields)

"""Input-side transforms (Masked Thought, prefix sampling, ...), looked up by name."""

from curriculax.transforms.base import Transform, TransformContext, get, names, register

__all__ = ["Transform", "TransformContext", "get", "names", "register"]

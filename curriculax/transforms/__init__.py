"""Input-side transforms (Masked Thought, prefix sampling, ...), looked up by name."""

from curriculax.transforms.base import Transform, TransformContext, get, names, register
from curriculax.transforms import masked_thought  # noqa: E402  (registers "masked_thought")
from curriculax.transforms import prefix_sampling  # noqa: E402  (registers "prefix_sampling")
from curriculax.transforms import scheduled_sampling  # noqa: E402  (registers "scheduled_sampling")
from curriculax.transforms import ul2  # noqa: E402  (registers "ul2")
from curriculax.transforms import vocab_curriculum  # noqa: E402  (registers "vocab_curriculum")

__all__ = ["Transform", "TransformContext", "get", "masked_thought", "names", "prefix_sampling",
           "register", "scheduled_sampling", "ul2", "vocab_curriculum"]

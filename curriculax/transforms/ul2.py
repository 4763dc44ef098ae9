"""The ``ul2`` transform: UL2 mixture-of-denoisers rows (see :mod:`curriculax.objectives.ul2`)."""

from curriculax.objectives.ul2 import default_config, ul2_transform
from curriculax.transforms.base import Transform, register

__all__ = ["default_config", "ul2_transform"]

ul2 = register("ul2", Transform(ul2_transform))

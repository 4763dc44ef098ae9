"""Parameter-efficient fine-tuning: re-parameterizations trained through ``config.sparsity``.

Registered (``config.sparsity.name``): ``lora`` (:mod:`curriculax.peft.lora`). :mod:`corda` builds
CorDA LoRA initialisations from input covariances.
"""

from curriculax.peft import corda, lora

__all__ = ["corda", "lora"]

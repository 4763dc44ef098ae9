"""Parameter-efficient fine-tuning: re-parameterizations trained through ``config.sparsity``.

Registered (``config.sparsity.name``): ``lora`` (:mod:`curriculax.peft.lora`), ``loramoe``
(:mod:`curriculax.peft.loramoe`, routed LoRA experts inside the model) and ``prefix``
(:mod:`curriculax.peft.prefix`, prefix tuning). :mod:`corda` builds CorDA LoRA initialisations
from input covariances.
"""

from curriculax.peft import corda, lora, loramoe, prefix

__all__ = ["corda", "lora", "loramoe", "prefix"]

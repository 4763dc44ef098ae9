"""Parameter selection: masks over the params that decide which entries an optimizer step moves.

Registered (``config.sparsity.name``): ``none`` (full fine-tuning), ``lift`` (LIFT principal
weights, sparse-state Adam), ``hft`` (Half Fine-Tuning), ``lt_sft`` (Lottery-Ticket sparse FT),
``lora`` (:mod:`curriculax.peft.lora`, a re-parameterization through the same protocol),
``select`` (a fixed set of whole parameters by path: embedding-only tuning by default),
``loramoe`` and ``prefix`` (:mod:`curriculax.peft.loramoe`, :mod:`curriculax.peft.prefix`:
modules added to the model, switched on through ``model_overrides``), ``locft`` (LocFT-BF:
one layer range's MLP down projections, for model editing).
Each module's ``default_config()`` lists its settings; ``config.sparsity`` overrides them.
See :mod:`curriculax.sparsity.base` for the protocol.
"""

from curriculax.sparsity import base
from curriculax.sparsity.base import (Sparsity, build, config, forward_fn, get, method_config, names,
                                      register)
from curriculax.sparsity import graft, hft, lift, locft, lottery, select  # noqa: E402  (registering)
from curriculax.peft import lora as _lora  # noqa: E402,F401  (registers lora, loramoe, prefix)

__all__ = ["Sparsity", "base", "build", "config", "forward_fn", "get", "graft", "hft", "lift", "locft",
           "lottery", "method_config", "names", "register", "select"]

"""``TrainState``: everything that changes during training, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    rng: jax.Array  # raw uint32[2] key (raw so checkpoints stay plain arrays)
    params: Any  # pure-dict pytree of model weights
    opt_state: Any  # optax state
    curriculum: Any  # the curriculum's state pytree
    masks: Any = None  # sparse-update masks (parameter selection methods)
    ref_params: Any = None  # frozen reference weights (KL anchors, SPIN's opponent)
    rl: Any = None  # the trainer's own state (ReLIFT's buffer of hardest prompts)

"""Training: ``TrainState``, the jitted step, the loop, checkpoints, metrics and plots."""

from curriculax.train.config import default_config, get_config, quickstart_config
from curriculax.train.loop import evaluate, train
from curriculax.train.setup import Experiment, build
from curriculax.train.state import TrainState
from curriculax.train.step import make_train_step, multi_step

__all__ = ["Experiment", "TrainState", "build", "default_config", "evaluate", "get_config",
           "make_train_step", "multi_step", "quickstart_config", "train"]

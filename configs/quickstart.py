"""Tiny byte-level model on synthetic 1-3 step arithmetic (the `make quickstart` run)."""

from curriculax.train.config import quickstart_config


def get_config():
    return quickstart_config()

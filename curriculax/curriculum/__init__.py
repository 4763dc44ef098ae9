"""Curricula: pure ``init / sample / update`` namespaces over pytree state, looked up by name.

Registered (``config.curriculum.name``): ``uniform``, ``pacing``, ``cyclical``, ``sec``,
``skill_it``, ``ordering``, ``reweight``, ``self_paced``, ``stat_sel``, ``climb``. Each module has
``default_config()``; :mod:`schedules` holds step schedules for transforms/objectives and
:mod:`designer` builds staged ``ordering`` configs from model embeddings.
"""

import copy
import importlib

import ml_collections

from curriculax.curriculum import uniform
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, get, names, register
from curriculax.curriculum import sampling, schedules  # noqa: E402
from curriculax.curriculum import (  # noqa: E402  (each registers its curriculum)
    climb,
    cyclical,
    ordering,
    pacing,
    reweight,
    sec,
    self_paced,
    skill_it,
    stat_sel,
)
from curriculax.curriculum import designer  # noqa: E402


def config(name: str, **overrides) -> ml_collections.ConfigDict:
    """A full ``config.curriculum`` for ``name``: its module's ``default_config()``, then
    ``overrides`` (so that ``--config.curriculum.<key>=...`` can reach every setting, as config
    files that list only a few keys would otherwise refuse the rest as unknown)."""
    module = importlib.import_module(get(name).init.__module__)
    defaults = module.default_config().to_dict() if hasattr(module, "default_config") else {}
    unknown = sorted(set(overrides) - set(defaults) - {"total_steps"})
    if unknown:
        raise ValueError(f"Unknown settings {unknown} for curriculum {name!r}; known: "
                         f"{sorted(defaults)}.")
    return ml_collections.ConfigDict({**defaults, **overrides, "name": name})


def with_total_steps(config):
    """A copy of the experiment ``config`` whose ``curriculum.total_steps`` is ``config.steps``
    when it is 0 or absent (schedules plan for the run's length); ``config`` is not changed."""
    if config.curriculum.get("total_steps", 0):
        return config
    config = copy.deepcopy(config)
    with config.unlocked():
        config.curriculum.total_steps = config.steps
    return config


__all__ = ["BankMeta", "Curriculum", "Feedback", "climb", "config", "cyclical", "designer", "get", "names",
           "ordering", "pacing", "register", "reweight", "sampling", "schedules", "sec",
           "self_paced", "skill_it", "stat_sel", "uniform", "with_total_steps"]

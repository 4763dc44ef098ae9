"""Curricula: pure ``init / sample / update`` namespaces over pytree state, looked up by name."""

from curriculax.curriculum import uniform
from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, get, names, register

__all__ = ["BankMeta", "Curriculum", "Feedback", "get", "names", "register", "uniform"]

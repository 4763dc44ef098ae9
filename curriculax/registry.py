"""Name → implementation tables behind every config ``name`` field (no ``if name ==`` chains)."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``register`` once per name; ``get`` fails with the config field and the known names."""

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered.")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"Unknown {self.field}={name!r}; registered: {self.names()}.")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

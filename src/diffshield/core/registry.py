"""Name -> implementation registries, so that the CLI and the benchmarks find methods by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from diffshield.core.errors import DiffshieldError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection: ``@REG.register("uce")`` on a class or function, ``REG.get("uce")`` to find it.

    Args:
        kind: what the entries are, for error messages (e.g. "erasure method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise DiffshieldError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items



#: Named model folders (``"toy:t2i"`` -> its folder), registered by the packages that ship models (the toy world
#: registers its own when ``diffshield`` is imported); :func:`diffshield.core.loading.resolve_model_path` reads it.
MODEL_NAMES: Registry[Path] = Registry("named model")

"""A registry of one kind of optimizer part (base directions, curvature estimators, rate rules), selected by name."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class Registry(dict[str, type[T]]):
    """``name -> class`` of one kind of part; :meth:`register` is the class decorator that adds a class by its
    ``name``, :meth:`create` builds one, naming the valid values when the name is not registered."""

    def __init__(self, argument: str) -> None:
        super().__init__()
        #: the argument that selects a part of this kind (``base``, ``curvature``, ``rate_rule``)
        self.argument = argument

    def register(self, cls: type[T]) -> type[T]:
        self[cls.name] = cls  # type: ignore[attr-defined]
        return cls

    def create(self, name: str, **kwargs: Any) -> T:
        if name not in self:
            raise ValueError(f"{self.argument}={name!r} is not valid; valid values: {list(self)}")
        return self[name](**kwargs)

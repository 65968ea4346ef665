"""Registered classes by name: the one way training aids, reconstruction terms and model families are named, as
timm's and SAELens's registries name models and architectures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry(dict):
    """``name -> class`` of the subclasses of ``base`` registered with :meth:`register` (each class gets its
    ``name``); ``kind`` names them in errors ("training aid", "model family")."""

    def __init__(self, kind: str, base: type) -> None:
        super().__init__()
        self.kind, self.base = kind, base

    def register(self, name: str, decorator: str) -> Callable[[type], type]:
        """A class decorator (``decorator``: its public name, for errors) registering a subclass under ``name``."""

        def decorate(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{decorator}({name!r}) decorates a {self.base.__name__} subclass, got {cls!r}")
            if name in self and self[name] is not cls:
                raise ValueError(f"a {self.kind} named {name!r} is already registered "
                                 f"({self[name].__module__}.{self[name].__qualname__})")
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self)

    def get_class(self, name: Any) -> type:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self[name]

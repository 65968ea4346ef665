"""Name -> encoder-head class registry: ``register_encoder``, ``create_encoder``, ``list_encoders``.

Heads shipped in other packages register through the ``sae_zoo.encoders`` entry-point group:
each entry point names a module that is imported the first time the registry is consulted.
"""

from __future__ import annotations

import fnmatch
from importlib import metadata
from typing import Any, Callable, TypeVar

from .._signature import check_kwargs
from .base import EncoderHead
from .interop import register_architectures

ENTRY_POINT_GROUP = "sae_zoo.encoders"

_REGISTRY: dict[str, type[EncoderHead]] = {}
_entry_points_loaded = False

H = TypeVar("H", bound=type[EncoderHead])


def register_encoder(name: str) -> Callable[[H], H]:
    """Class decorator that makes a head available to :func:`create_encoder` and recipes by ``name``."""

    def decorator(cls: H) -> H:
        if not (isinstance(cls, type) and issubclass(cls, EncoderHead)):
            raise TypeError(f"@register_encoder({name!r}) must decorate an EncoderHead subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"encoder name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        register_architectures(cls)
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def list_encoders(filter: str = "*") -> list[str]:
    """Registered head names matching the shell-style pattern ``filter``, sorted."""
    _load_entry_points()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, filter))


def get_encoder_class(name: str) -> type[EncoderHead]:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; registered encoders: {', '.join(list_encoders())}") from None


def create_encoder(name: str, *, d_model: int, n_latents: int, **kwargs: Any) -> EncoderHead:
    """Build the head registered as ``name``; bad or missing hyper-parameters raise a ``ValueError``
    that lists the head's valid arguments."""
    cls = get_encoder_class(name)
    check_kwargs(cls.__init__, kwargs, what=f"encoder {name!r}", skip=("d_model", "n_latents"))
    return cls(d_model=d_model, n_latents=n_latents, **kwargs)

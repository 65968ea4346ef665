"""The datamodules a recipe's ``data.name`` chooses from: registered by name, as encoder heads are, so that a
user's data source joins through a recipe's ``imports:`` without editing the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import SparseCodingData

D = TypeVar("D", bound=type[SparseCodingData])

#: ``data.name`` -> datamodule class (each a :class:`~sae_zoo.data.base.SparseCodingData`)
DATAMODULES: dict[str, type[SparseCodingData]] = {}


def register_datamodule(name: str) -> Callable[[D], D]:
    """Class decorator: make a :class:`~sae_zoo.data.base.SparseCodingData` recipe's ``data.name: NAME``."""

    def add(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, SparseCodingData)):
            raise TypeError(f"register_datamodule({name!r}): {cls!r} is not a SparseCodingData subclass")
        if DATAMODULES.get(name, cls) is not cls:
            raise ValueError(f"register_datamodule: {name!r} is already {DATAMODULES[name].__qualname__}")
        DATAMODULES[name] = cls
        return cls

    return add


def get_datamodule_class(name: str) -> type[SparseCodingData]:
    if name not in DATAMODULES:
        raise ValueError(f"unknown datamodule {name!r}; choices: {', '.join(sorted(DATAMODULES))}")
    return DATAMODULES[name]


def list_datamodules() -> list[str]:
    return sorted(DATAMODULES)


def create_datamodule(name: str, **kwargs: Any) -> SparseCodingData:
    """The datamodule registered as ``name``, built from ``kwargs`` (a recipe's ``data`` section, less its name)."""
    return get_datamodule_class(name)(**kwargs)


def language_model_data_class(data: dict[str, Any], where: str, why: str) -> type[SparseCodingData]:
    """The class of a recipe's ``data`` section (``name`` and arguments) when it reads a language model's
    activations (a :class:`~sae_zoo.data.base.LanguageModelData`); ``where`` and ``why`` word the refusal."""
    from .base import LanguageModelData

    name = data.get("name")
    cls = DATAMODULES.get(name)
    if cls is None or not issubclass(cls, LanguageModelData):
        raise ValueError(f"{where}: the run trained on data.name={name!r}, {why}")
    return cls

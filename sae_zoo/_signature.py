"""Checks keyword arguments against a callable's signature (names and annotated types), with errors
that name the argument or recipe key and list the valid ones."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import OmegaConf
from typeguard import CollectionCheckStrategy, TypeCheckError, check_type


def keyword_parameters(fn: Callable, skip: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
    skip = {"self", *skip}
    return {k: p for k, p in inspect.signature(fn).parameters.items()
            if k not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


class UnknownArgumentError(ValueError):
    """An argument (or recipe key) that the configured callable does not take; ``names`` lists them."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


def check_kwargs(fn: Callable, kwargs: dict[str, Any], *, what: str, skip: Iterable[str] = (),
                 key_prefix: str = "") -> None:
    """Raise ``ValueError`` if ``kwargs`` holds a name ``fn`` does not take, lacks one it requires, or
    gives a value of a type its annotation excludes.

    ``what`` names the thing being configured (``"encoder 'mlp'"``) and ``key_prefix`` the recipe
    section (``"encoder."``), so that the message names the offending key as the user wrote it.
    """
    params = keyword_parameters(fn, skip)
    valid = ", ".join(f"{key_prefix}{k}={p.default!r}" if p.default is not p.empty else f"{key_prefix}{k} (required)"
                      for k, p in params.items()) or "none"
    noun = "key" if key_prefix else "argument"
    unknown = [key_prefix + k for k in sorted(set(kwargs) - set(params))]
    if unknown:
        raise UnknownArgumentError(f"unknown {noun}(s) {', '.join(unknown)} for {what}; valid: {valid}", unknown)
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ValueError(f"missing {noun}(s) {', '.join(key_prefix + k for k in missing)} for {what}; valid: {valid}")
    check_types(fn, kwargs, what=what, key_prefix=key_prefix)


def _hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be resolved here: nothing to check against
        return {}


def check_types(fn: Callable, kwargs: dict[str, Any], *, what: str, key_prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first argument whose value does not fit ``fn``'s annotation
    (an int accepts no string or float; a float accepts an int; ``list[int]`` checks every item)."""
    hints = _hints(fn)
    noun = "key" if key_prefix else "argument"
    for name, value in kwargs.items():
        if name not in hints:
            continue
        try:
            check_type(value, hints[name], collection_check_strategy=CollectionCheckStrategy.ALL_ITEMS)
        except TypeCheckError:
            hint = hints[name]
            expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ValueError(f"{noun} {key_prefix}{name}={value!r} for {what} has type {type(value).__name__}; "
                             f"expected {expected}") from None


def section_kwargs(section: Any) -> dict[str, Any]:
    """A recipe section (an OmegaConf node, resolved, or a mapping) as a plain dict of keyword arguments."""
    return dict(OmegaConf.to_container(section, resolve=True)) if OmegaConf.is_config(section) else dict(section)

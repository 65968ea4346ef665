"""Checks keyword arguments against a callable's signature, with errors that list the valid ones."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any


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
    """Raise ``ValueError`` if ``kwargs`` holds a name ``fn`` does not take, or lacks one it requires.

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

"""The reconstruction term of the loss, as a registered piece: how a batch's codes are decoded and scored against
the target. ``mse`` (the default) and ``matryoshka`` (every prefix of the latents reconstructs on its own) are
built in; a method that changes the term (another distance, another weighting of the samples) is a registered
subclass and its test, named by a recipe's ``model.reconstruction``, with no edit to ``SparseCoder``::

    @register_reconstruction("my_term")
    class MyTerm(ReconstructionTerm):
        def __call__(self, dictionary, codes, target): ...   # (loss, x_hat)

``model.matryoshka_widths: [...]``, the flat key that recipes and saved models write, is
``model.reconstruction: {name: matryoshka, widths: [...]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ._registry import Registry
from ._signature import check_kwargs
from .encoders import SparseCodes
from .objectives import check_matryoshka_widths, reconstruction_loss

class ReconstructionTerm:
    """The loss's reconstruction term: ``term(dictionary, codes, target) -> (loss, x_hat)``, ``codes`` being the
    head's training codes (a tensor, or :class:`~sae_zoo.encoders.SparseCodes` to decode sparsely) and ``x_hat``
    the reconstruction that the aids and the logged L0 see. ``config()`` rebuilds it. The loss is logged as
    ``train/mse`` whatever the term (the name the logs and reports read)."""

    #: the registry name (set by :func:`register_reconstruction`)
    name: ClassVar[str] = ""

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def setup(self, n_latents: int) -> None:
        """Once, when the term joins a model of ``n_latents`` latents (check the options against it)."""

    def __call__(self, dictionary: nn.Module, codes: Tensor | SparseCodes, target: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReconstructionTerm) and self.config() == other.config()


def decoded(dictionary: nn.Module, codes: Tensor | SparseCodes) -> Tensor:
    """The reconstruction of ``codes``: dense ones, or a top-k head's sparse ones decoded from their atoms alone."""
    return dictionary.decode_sparse(*codes) if isinstance(codes, SparseCodes) else dictionary.decode(codes)


#: the registered reconstruction terms, by name
RECONSTRUCTIONS = Registry("reconstruction term", ReconstructionTerm)


def register_reconstruction(name: str):
    """Class decorator: register a :class:`ReconstructionTerm` under ``name`` (a recipe's
    ``model.reconstruction.name``)."""
    return RECONSTRUCTIONS.register(name, "register_reconstruction")


def create_reconstruction(spec: str | dict[str, Any] | ReconstructionTerm) -> ReconstructionTerm:
    """The term of ``spec``: a registered name, ``{"name": ..., **options}``, or a term as it is."""
    if isinstance(spec, ReconstructionTerm):
        return spec
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = options.pop("name", None)
    try:
        term = RECONSTRUCTIONS.get_class(name)
    except ValueError as e:
        raise ValueError(f"reconstruction: {e}") from None
    check_kwargs(term.__init__, options, what=f"reconstruction term {name!r}",
                 key_prefix="reconstruction.")
    return term(**options)


@register_reconstruction("mse")
class MeanSquaredError(ReconstructionTerm):
    """The mean squared error of the full reconstruction (over every element), the paper's and the field's."""

    def __call__(self, dictionary: nn.Module, codes: Tensor | SparseCodes, target: Tensor) -> tuple[Tensor, Tensor]:
        return reconstruction_loss(dictionary, codes, target)


@register_reconstruction("matryoshka")
class Matryoshka(ReconstructionTerm):
    """Matryoshka SAEs (Bussmann et al. 2025; Nabeshima 2024): the sum of the MSEs of every prefix's
    reconstruction (latents ``[0, w)`` alone, for each of ``widths``, the last being every latent), so that the
    first latents learn the general features on their own."""

    def __init__(self, widths: Sequence[int]) -> None:
        self.widths = [int(w) for w in widths]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "widths": self.widths}

    def setup(self, n_latents: int) -> None:
        self.widths = check_matryoshka_widths(self.widths, n_latents)

    def __call__(self, dictionary: nn.Module, codes: Tensor | SparseCodes, target: Tensor) -> tuple[Tensor, Tensor]:
        return reconstruction_loss(dictionary, codes, target, self.widths)

"""Other libraries' SAEs, as heads see them: one layout for every checkpoint, and the table of which
head converts which architecture.

A format reader (:mod:`sae_zoo.hub.formats`) reads a checkpoint's files into a :class:`ForeignSAE`
and looks its ``architecture`` up in this table; a head declares the architectures it reproduces
(``EncoderHead.architectures``), and :func:`~sae_zoo.encoders.register_encoder` enters them here. So
a new head takes part in loading and export without any edit to the readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class UnsupportedConversion(ValueError):
    """A checkpoint (or head) that no head converts; the message says why. Readers then load the decoder alone."""


@dataclass
class ForeignSAE:
    """Another library's SAE in one layout, whatever its files looked like.

    ``architecture`` is the field's name for the encoder (SAELens's: ``standard``, ``topk``,
    ``jumprelu``, ``gated``, ...). Matrices use sae_zoo's orientation, ``(n_latents, d_model)``, and the
    decoder rows keep the norms they were saved with. ``config`` holds the hyper-parameters a head needs
    (``k``, ``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm``, ...), ``params`` any further
    tensors (``threshold``, ...), and ``source`` names the file, for errors.

    A transcoder (``transcoder=True``) reads inputs of width :attr:`d_in` (``W_enc``'s) and writes outputs of
    width :attr:`d_model` (``W_dec``'s); a skip-transcoder adds ``x @ W_skip.T`` (``W_skip``: ``(d_out, d_in)``).
    """

    architecture: str
    W_dec: Tensor
    b_dec: Tensor | None = None
    W_enc: Tensor | None = None
    b_enc: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Tensor] = field(default_factory=dict)
    source: str = "<checkpoint>"
    transcoder: bool = False
    W_skip: Tensor | None = None

    @classmethod
    def of_dictionary(cls, architecture: str, dictionary: Any, *, W_enc: Tensor | None = None,
                      b_enc: Tensor | None = None, config: dict[str, Any] | None = None,
                      params: dict[str, Tensor] | None = None) -> "ForeignSAE":
        """For export: ``dictionary``'s atoms (norms included) and bias as the decoder, beside the given
        encoder tensors, each detached, float32 and on the CPU."""
        def exported(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().float().cpu()

        return cls(architecture, W_dec=exported(dictionary.atoms), b_dec=exported(dictionary.bias),
                   W_enc=exported(W_enc), b_enc=exported(b_enc), config=dict(config or {}),
                   params={name: exported(t) for name, t in (params or {}).items()})

    @property
    def n_latents(self) -> int:
        return int(self.W_dec.shape[0])

    @property
    def d_model(self) -> int:
        """The decoder's width: what the SAE reconstructs (a transcoder: its output)."""
        return int(self.W_dec.shape[1])

    @property
    def d_in(self) -> int:
        """The encoder's input width: :attr:`d_model`, except for a transcoder's."""
        return int(self.W_enc.shape[1]) if self.W_enc is not None else self.d_model

    @property
    def decoder_norms(self) -> Tensor:
        return self.W_dec.detach().float().norm(dim=1)

    @property
    def keeps_norms(self) -> bool:
        """Whether the source's codes decode through the saved rows ``W_dec`` (the dictionary then keeps
        their norms), rather than through unit atoms: ``config["unit_atom_codes"]``, set where the source
        multiplies its pre-activations by the norms (SAELens's ``rescale_acts_by_decoder_norm``) or its own
        loader folds them into the encoder (dictionary_learning's ``AutoEncoder``)."""
        return not self.config.get("unit_atom_codes", False)

    def folded_encoder(self, bias: str = "b_enc") -> tuple[Tensor, Tensor]:
        """``(W_enc, b_enc)`` whose codes are the source's: times the decoder norms when the codes are
        those of unit atoms (see :attr:`keeps_norms`)."""
        tensors = self.require("W_enc", bias)
        if self.keeps_norms:
            return tensors["W_enc"], tensors[bias]
        norms = self.decoder_norms
        return tensors["W_enc"] * norms[:, None], tensors[bias] * norms

    def require(self, *names: str) -> dict[str, Tensor]:
        """The encoder tensors ``names`` (``W_enc``, ``b_enc`` or a ``params`` key), checked to be present
        and shaped: ``W_enc`` ``(n_latents, d_model)``, the others one value per latent (a ``threshold``
        may be one value for all)."""
        found = {"W_enc": self.W_enc, "b_enc": self.b_enc, **self.params}
        missing = [n for n in names if found.get(n) is None]
        if missing:
            raise ValueError(f"{self.source}: missing tensor{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(repr, missing))} (a {self.architecture} SAE's encoder needs them)")
        for name in names:
            shape = tuple(found[name].shape)
            expected = (self.n_latents, self.d_in) if name == "W_enc" else (self.n_latents,)
            if shape != expected and not (name == "threshold" and found[name].numel() == 1):
                raise ValueError(f"{self.source}: tensor {name!r} has shape {shape}, expected {expected} "
                                 f"(the decoder has {self.n_latents} latents of width {self.d_model}, the "
                                 f"encoder reads width {self.d_in})")
        return {n: found[n].detach().float() for n in names}


_CONVERTERS: dict[str, type] = {}


def register_architectures(cls: type) -> None:
    for architecture in cls.architectures:
        existing = _CONVERTERS.get(architecture)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"architecture {architecture!r} is already converted by {existing.__qualname__}")
        _CONVERTERS[architecture] = cls


def converter_for(architecture: str) -> type | None:
    """The head class that reproduces ``architecture``, or None."""
    return _CONVERTERS.get(architecture)


def list_architectures() -> list[str]:
    return sorted(_CONVERTERS)

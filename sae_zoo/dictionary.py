"""The decoder: a dictionary of unit-norm atoms shared by every encoder head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._signature import check_types


class Dictionary(nn.Module):
    """A dictionary of ``n_latents`` atoms in ``d_model`` dimensions.

    Atoms are the rows of ``weight`` (shape ``(n_latents, d_model)``) and are kept at unit L2 norm,
    so that the scale of a latent lives in its code, not in its atom. ``decode(codes)`` returns
    ``codes @ weight (+ bias)``. A trainable dictionary is renormalised after every optimiser step
    by :class:`~sae_zoo.SparseCoder`; a frozen one keeps the atoms it was given.

    ``atom_norms=True`` keeps a fixed norm per atom (a buffer, ``atom_norms``) beside the unit
    directions, and decodes ``codes @ (atom_norms * weight)``: another library's decoder whose rows are
    not unit-norm then keeps its own units, so a head loaded with it gives that library's codes exactly.
    :attr:`atoms` is the matrix a code multiplies: the directions scaled by the norms.

    ``provenance`` says where the atoms came from (e.g. the SAELens checkpoint they were loaded from);
    it travels into ``config.json`` and the model card when the model is saved.
    """

    def __init__(self, n_latents: int, d_model: int, *, trainable: bool = True, bias: bool = False,
                 atom_norms: bool = False) -> None:
        super().__init__()
        check_types(Dictionary.__init__, {"n_latents": n_latents, "d_model": d_model, "atom_norms": atom_norms},
                    what="the dictionary")
        if n_latents < 1 or d_model < 1:
            raise ValueError(f"Dictionary needs n_latents >= 1 and d_model >= 1, got ({n_latents}, {d_model})")
        self.n_latents = int(n_latents)
        self.d_model = int(d_model)
        self.weight = nn.Parameter(torch.randn(n_latents, d_model), requires_grad=trainable)
        self.bias = nn.Parameter(torch.zeros(d_model), requires_grad=trainable) if bias else None
        self.register_buffer("atom_norms", torch.ones(n_latents) if atom_norms else None)
        self.provenance: dict[str, Any] = {}
        self.normalize_()

    @classmethod
    def from_tensor(cls, atoms: Tensor, *, trainable: bool = False, bias: Tensor | None = None,
                    provenance: dict[str, Any] | None = None, keep_norms: bool = False) -> "Dictionary":
        """A dictionary whose atoms are the rows of ``atoms``: renormalised to unit norm, or, with
        ``keep_norms``, split into unit directions and fixed ``atom_norms`` (decoding is then unchanged)."""
        if atoms.ndim != 2:
            raise ValueError(f"atoms must have shape (n_latents, d_model), got {tuple(atoms.shape)}")
        dictionary = cls(*atoms.shape, trainable=trainable, bias=bias is not None, atom_norms=keep_norms)
        dictionary.set_atoms(atoms, bias=bias)
        dictionary.provenance = dict(provenance or {})
        return dictionary

    @property
    def trainable(self) -> bool:
        return self.weight.requires_grad

    @property
    def atoms(self) -> Tensor:
        """The ``(n_latents, d_model)`` matrix a code multiplies: unit rows, times ``atom_norms`` if kept."""
        return self.weight if self.atom_norms is None else self.weight * self.atom_norms[:, None]

    @torch.no_grad()
    def set_atoms(self, atoms: Tensor, *, bias: Tensor | None = None) -> None:
        """Copy ``atoms`` (and ``bias``) into the dictionary, renormalising each atom to unit norm (and
        keeping its norm in ``atom_norms`` when the dictionary has them)."""
        if tuple(atoms.shape) != tuple(self.weight.shape):
            raise ValueError(f"atoms have shape {tuple(atoms.shape)}, dictionary expects {tuple(self.weight.shape)}")
        if not atoms.is_floating_point() or not torch.isfinite(atoms).all():
            bad = torch.nonzero(~torch.isfinite(atoms).all(dim=1)).flatten().tolist() if atoms.is_floating_point() else []
            raise ValueError(f"atoms must be finite floating-point values; got dtype {atoms.dtype}"
                             + (f", with NaN or Inf in atoms {bad[:10]}" if bad else ""))
        norms = atoms.norm(dim=1)
        if not torch.all(norms > 0):
            raise ValueError(f"atoms {torch.nonzero(norms == 0).flatten().tolist()} have zero norm")
        self.weight.copy_(atoms)
        if self.atom_norms is not None:
            self.atom_norms.copy_(norms)
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != (self.d_model,):
                raise ValueError(f"bias must have shape ({self.d_model},) on a dictionary built with bias=True")
            self.bias.copy_(bias)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Rescale every atom to unit L2 norm, in place."""
        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def decode(self, codes: Tensor) -> Tensor:
        if codes.ndim == 0 or codes.shape[-1] != self.n_latents:
            raise ValueError(f"codes have {codes.shape[-1] if codes.ndim else 0} latents, dictionary has "
                             f"{self.n_latents} (codes of shape {tuple(codes.shape)})")
        x_hat = codes @ self.atoms
        return x_hat if self.bias is None else x_hat + self.bias

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """``decode`` of codes given by their non-zero ``values`` at ``indices`` (``(..., k)`` each):
        gathers the k atoms per sample instead of a dense ``n_latents``-wide product, forward and backward."""
        lead, k = values.shape[:-1], values.shape[-1]
        if self.atom_norms is not None:
            values = values * self.atom_norms[indices]
        x_hat = F.embedding_bag(indices.reshape(-1, k), self.weight, per_sample_weights=values.reshape(-1, k).to(
            self.weight.dtype), mode="sum").reshape(*lead, self.d_model)
        return x_hat if self.bias is None else x_hat + self.bias

    def forward(self, codes: Tensor) -> Tensor:
        return self.decode(codes)

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this dictionary's shape (weights travel separately)."""
        config = {"n_latents": self.n_latents, "d_model": self.d_model, "trainable": self.trainable,
                  "bias": self.bias is not None}
        return {**config, "atom_norms": True} if self.atom_norms is not None else config

    def extra_repr(self) -> str:
        return (f"n_latents={self.n_latents}, d_model={self.d_model}, trainable={self.trainable}, "
                f"bias={self.bias is not None}" + (", atom_norms=True" if self.atom_norms is not None else ""))

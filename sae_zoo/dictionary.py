"""The decoder: a dictionary of atoms (unit directions, with norms of their own if asked) shared by every
encoder head."""

from __future__ import annotations

import math
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._signature import check_types


class Dictionary(nn.Module):
    """A dictionary of ``n_latents`` atoms in ``d_model`` dimensions.

    ``weight`` (shape ``(n_latents, d_model)``) holds each atom's unit direction. ``decode(codes)`` returns
    ``codes @ atoms (+ bias)``. A trainable dictionary's directions are renormalised after every optimiser
    step by :class:`~sae_zoo.SparseCoder`; a frozen one keeps the atoms it was given.

    ``atom_norms`` says whether an atom also has a norm of its own (``atom_norms``, one per latent):

    * ``False``: unit atoms, so the scale of a latent lives in its code alone.
    * ``True``: a fixed norm per atom (a buffer). Another library's decoder whose rows are not unit-norm
      keeps its own units, so a head loaded with it gives that library's codes exactly.
    * ``"learned"``: a trained norm per atom (a parameter, starting at 1): each latent's output scale
      learns apart from its selection, which runs on the encoder's pre-activations. It decodes as SAELens's
      SAEs trained with ``rescale_acts_by_decoder_norm: false`` do (there each decoder row is free), and
      recovers the true features of SynthSAEBench far better than unit atoms (see :attr:`norm_lr_scale`).
      L1-type penalties then weigh each code by its atom's norm, so a latent cannot dodge the penalty by
      growing its atom.

    :attr:`atoms` is the matrix a code multiplies (the directions scaled by the norms);
    :attr:`directions` are the unit rows, which the metrics that match atoms to features compare.

    ``provenance`` says where the atoms came from (e.g. the SAELens checkpoint they were loaded from);
    it travels into ``config.json`` and the model card when the model is saved.
    """

    #: the smallest a learned norm may become (the projection after each step keeps it positive)
    MIN_NORM = 1e-6

    def __init__(self, n_latents: int, d_model: int, *, trainable: bool = True, bias: bool = False,
                 atom_norms: Union[bool, Literal["learned"]] = False) -> None:
        super().__init__()
        check_types(Dictionary.__init__, {"n_latents": n_latents, "d_model": d_model, "atom_norms": atom_norms},
                    what="the dictionary")
        if n_latents < 1 or d_model < 1:
            raise ValueError(f"Dictionary needs n_latents >= 1 and d_model >= 1, got ({n_latents}, {d_model})")
        self.n_latents = int(n_latents)
        self.d_model = int(d_model)
        self.weight = nn.Parameter(torch.randn(n_latents, d_model), requires_grad=trainable)
        self.bias = nn.Parameter(torch.zeros(d_model), requires_grad=trainable) if bias else None
        if atom_norms == "learned":
            if not trainable:
                raise ValueError("atom_norms='learned' trains a norm per atom, but the dictionary is frozen "
                                 "(trainable=False) and has no norms to learn; use atom_norms=True to keep fixed "
                                 "norms, or train the dictionary")
            self.atom_norms = nn.Parameter(torch.ones(n_latents))
        else:
            self.register_buffer("atom_norms", torch.ones(n_latents) if atom_norms else None)
        self.provenance: dict[str, Any] = {}
        self.normalize_()

    @classmethod
    def from_tensor(cls, atoms: Tensor, *, trainable: bool = False, bias: Tensor | None = None,
                    provenance: dict[str, Any] | None = None,
                    keep_norms: Union[bool, Literal["learned"]] = False) -> "Dictionary":
        """A dictionary whose atoms are the rows of ``atoms``: renormalised to unit norm, or, with
        ``keep_norms``, split into unit directions and ``atom_norms`` (decoding is then unchanged), fixed
        (``True``) or, in a trainable dictionary, trained from there on (``"learned"``)."""
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
    def learns_norms(self) -> bool:
        """Whether each atom's norm is trained (``atom_norms="learned"``, and the dictionary not frozen since)."""
        return isinstance(self.atom_norms, nn.Parameter) and self.atom_norms.requires_grad

    @property
    def norm_lr_scale(self) -> float:
        """How much faster than the model's learning rate learned norms take their Adam steps: ``sqrt(d_model)``.

        A free decoder row (SAELens's ``rescale_acts_by_decoder_norm: false``) changes its norm by up to
        ``sqrt(d_model) * lr`` a step, since each of its ``d_model`` coordinates steps by about ``lr``; a
        norm held as one number moves ``sqrt(d_model)`` times slower at the same rate, and then barely
        moves in a short run. At this scale each latent's output scale keeps up with its encoder, and
        feature recovery rises (SynthSAEBench cpu2k, Matryoshka BatchTopK: F1 0.63 at the model's rate,
        0.77 at this one)."""
        return math.sqrt(self.d_model)

    @property
    def directions(self) -> Tensor:
        """The unit atoms ``(n_latents, d_model)``: what metrics matching atoms to features compare."""
        return self.weight

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
        """Rescale every direction to unit L2 norm, in place (and keep learned norms positive)."""
        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if self.learns_norms:
            self.atom_norms.clamp_(min=self.MIN_NORM)

    def decode(self, codes: Tensor) -> Tensor:
        if codes.ndim == 0 or codes.shape[-1] != self.n_latents:
            raise ValueError(f"codes have {codes.shape[-1] if codes.ndim else 0} latents, dictionary has "
                             f"{self.n_latents} (codes of shape {tuple(codes.shape)})")
        x_hat = codes @ self.atoms
        return x_hat if self.bias is None else x_hat + self.bias

    def gathered_norms(self, indices: Tensor) -> Tensor:
        """``atom_norms[indices]`` by ``index_select``, whose backward (``index_add_``) sums a learned norm's
        gradient in a fixed order; advanced indexing's backward accumulates with several CPU threads in an
        order that varies from run to run, so training was not bitwise reproducible."""
        return self.atom_norms.index_select(0, indices.reshape(-1)).reshape(indices.shape)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """``decode`` of codes given by their non-zero ``values`` at ``indices`` (``(..., k)`` each):
        gathers the k atoms per sample instead of a dense ``n_latents``-wide product, forward and backward."""
        lead, k = values.shape[:-1], values.shape[-1]
        if self.atom_norms is not None:
            values = values * self.gathered_norms(indices)
        x_hat = F.embedding_bag(indices.reshape(-1, k), self.weight, per_sample_weights=values.reshape(-1, k).to(
            self.weight.dtype), mode="sum").reshape(*lead, self.d_model)
        return x_hat if self.bias is None else x_hat + self.bias

    def decode_sparse_prefixes(self, values: Tensor, indices: Tensor, widths: list[int]) -> Tensor:
        """The reconstructions ``(..., len(widths), d_model)`` from the latents ``[0, w)`` of sparse codes, for
        each of the increasing ``widths`` (Matryoshka prefixes), bias included. One gather of the codes' atoms
        serves every prefix: each sample's codes are summed per group of latents, then accumulated."""
        lead, k, groups = values.shape[:-1], values.shape[-1], len(widths)
        flat_values, flat_indices = values.reshape(-1, k), indices.reshape(-1, k)
        samples = flat_values.shape[0]
        group = torch.bucketize(flat_indices, flat_indices.new_tensor(widths), right=True)  # latent i: group of i
        key = (torch.arange(samples, device=values.device)[:, None] * groups + group).reshape(-1)
        order = key.argsort(stable=True)
        counts = torch.bincount(key, minlength=samples * groups)
        atoms, weights = flat_indices.reshape(-1)[order], flat_values.reshape(-1)[order]
        if self.atom_norms is not None:
            weights = weights * self.gathered_norms(atoms)
        parts = F.embedding_bag(atoms, self.weight, counts.cumsum(0) - counts, mode="sum",
                                per_sample_weights=weights.to(self.weight.dtype))
        prefixes = parts.reshape(samples, groups, self.d_model).cumsum(1).reshape(*lead, groups, self.d_model)
        return prefixes if self.bias is None else prefixes + self.bias

    def forward(self, codes: Tensor) -> Tensor:
        return self.decode(codes)

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this dictionary's shape (weights travel separately)."""
        config = {"n_latents": self.n_latents, "d_model": self.d_model, "trainable": self.trainable,
                  "bias": self.bias is not None}
        return {**config, "atom_norms": self.norms_kind} if self.atom_norms is not None else config

    @property
    def norms_kind(self) -> bool | str:
        """The ``atom_norms`` argument that rebuilds this dictionary: False, True (fixed) or ``"learned"``."""
        return "learned" if self.learns_norms else self.atom_norms is not None

    def extra_repr(self) -> str:
        return (f"n_latents={self.n_latents}, d_model={self.d_model}, trainable={self.trainable}, "
                f"bias={self.bias is not None}" + (f", atom_norms={self.norms_kind!r}" if self.atom_norms is not None else ""))

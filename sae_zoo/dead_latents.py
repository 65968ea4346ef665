"""Dead latents, and what training does about them: the AuxK loss (Gao et al. 2024) and Anthropic's
resampling (2023).

A latent is dead once it has not fired for ``dead_tokens`` training tokens. :class:`DeadLatents` counts the
tokens since each latent last fired (from every training batch's codes), adds the AuxK term to the loss,
and resamples the dead latents every ``resample_every`` steps. It is a training aid (:mod:`sae_zoo.training`);
``SparseCoder`` builds one from its ``auxk_coeff``, ``auxk_k``, ``dead_tokens`` and ``resample_every``
(``model.dead_latents``). A run that asks for neither keeps no counts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import any_rank, summed, world_size
from .encoders import EncoderHead, SparseCodes
from .objectives import auxk_loss, fired_latents
from .training import LossTerm, TrainingAid, register_training_aid


@register_training_aid("dead_latents")
class DeadLatents(TrainingAid):
    """``auxk_coeff`` weighs the AuxK loss (the ``auxk_k`` largest pre-activations among the dead latents
    reconstruct what the live ones leave; default ``d_model // 2``); ``resample_every`` steps, every dead
    latent is resampled (:meth:`resample`). The counts are a buffer, saved in checkpoints."""

    def __init__(self, auxk_coeff: float = 0.0, auxk_k: int | None = None, dead_tokens: int = 10_000_000,
                 resample_every: int = 0) -> None:
        super().__init__()
        for name, value in {"auxk_coeff": auxk_coeff, "resample_every": resample_every}.items():
            if not value >= 0:
                raise ValueError(f"SparseCoder needs {name} >= 0, got {name}={value!r}")
        for name, value in {"dead_tokens": dead_tokens, "auxk_k": auxk_k}.items():
            if value is not None and not value > 0:
                raise ValueError(f"SparseCoder needs {name} > 0, got {name}={value!r}")
        self.auxk_coeff, self.dead_tokens, self.resample_every = float(auxk_coeff), int(dead_tokens), int(resample_every)
        self.auxk_k_option, self.auxk_k = auxk_k, auxk_k
        self.register_buffer("tokens_since_fired", None, persistent=False)

    @property
    def tracks(self) -> bool:
        """Whether this run counts firings at all (it does when it uses AuxK or resampling)."""
        return self.auxk_coeff > 0 or self.resample_every > 0

    @property
    def active(self) -> bool:
        return self.tracks

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "auxk_coeff": self.auxk_coeff, "auxk_k": self.auxk_k_option,
                "dead_tokens": self.dead_tokens, "resample_every": self.resample_every}

    def setup(self, model: nn.Module) -> None:
        self.auxk_k = self.auxk_k_option or max(1, model.dictionary.d_model // 2)
        if self.tracks:
            self.tokens_since_fired = torch.zeros(model.dictionary.n_latents, device=model.dictionary.weight.device)

    def before_batch(self, model: nn.Module, x: Tensor) -> None:
        if self.resample_due(model.global_step):
            model.resample_dead_latents(x)

    def loss_terms(self, model: nn.Module, x: Tensor, codes: Tensor | SparseCodes,
                   x_hat: Tensor, target: Tensor | None = None) -> dict[str, LossTerm]:
        self.observe(codes)
        auxk = self.auxk(model.encoder, model.dictionary, x, x_hat, target)
        return {} if auxk is None else {"auxk": LossTerm(auxk, self.auxk_coeff)}

    def log_values(self) -> dict[str, Tensor]:
        return {"dead_fraction": self.dead().float().mean()} if self.tracks else {}

    def save_state(self, state: dict[str, Any]) -> None:
        if self.tracks:
            state["tokens_since_fired"] = self.tokens_since_fired.cpu()

    def load_state(self, state: dict[str, Any]) -> None:
        if self.tracks and "tokens_since_fired" in state:
            self.tokens_since_fired.copy_(state["tokens_since_fired"])

    def dead(self) -> Tensor:
        """Boolean ``(n_latents,)``: the latents that have not fired for ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    def observe(self, codes: Tensor | SparseCodes) -> None:
        """Count one training batch: a latent that fired in it is reset to 0, every other ages by its tokens. In a
        multi-device run the batch is the global one: a latent is dead only if it fired on no rank, and it ages by
        every rank's tokens, so every rank keeps the counts one process would."""
        if not self.tracks:
            return
        values = codes.values if isinstance(codes, SparseCodes) else codes
        fired = any_rank(fired_latents(codes, self.tokens_since_fired.shape[0]))
        n_tokens: int | Tensor = values[..., 0].numel()
        if world_size() > 1:
            n_tokens = summed(torch.tensor(float(n_tokens), device=self.tokens_since_fired.device))
        self.tokens_since_fired.copy_(torch.where(fired, 0, self.tokens_since_fired + n_tokens))

    def auxk(self, head: EncoderHead, dictionary: nn.Module, x: Tensor, x_hat: Tensor,
             target: Tensor | None = None) -> Tensor | None:
        """The AuxK loss of this batch (unweighted), or None when the run has no AuxK."""
        if self.auxk_coeff == 0:
            return None
        return auxk_loss(head, dictionary, x, x_hat, self.dead(), self.auxk_k, target)

    def resample_due(self, step: int) -> bool:
        return bool(self.resample_every) and step > 0 and step % self.resample_every == 0

    @torch.no_grad()
    def resample(self, head: EncoderHead, dictionary: nn.Module, x: Tensor, x_hat: Tensor,
                 optimizer: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None) -> int:
        """Anthropic's resampling (2023): every dead latent gets the direction of an input of ``x`` drawn with
        probability proportional to its squared reconstruction error (``x_hat``'s), as its atom (if the
        dictionary trains) and encoder row; its ``optimizer`` state is cleared. The draw uses ``generator``
        (the default one if None). Returns how many were resampled."""
        dead = self.dead().nonzero().squeeze(-1)
        x, x_hat = x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x.shape[-1])
        if dead.numel() == 0 or x.shape[0] == 0:
            return 0
        error = (x_hat - x).square().sum(-1).double()
        if not error.sum() > 0:
            return 0
        picks = torch.multinomial(error / error.sum(), dead.numel(), replacement=dead.numel() > x.shape[0],
                                  generator=generator)
        centred = x[picks] - (dictionary.bias if dictionary.bias is not None else 0)
        directions = F.normalize(centred.to(dictionary.weight.dtype), dim=-1)
        touched = list(head.reset_latents(dead, directions))  # the head says which rows it reset
        if dictionary.trainable:
            dictionary.weight[dead] = directions
            touched.append(dictionary.weight)
        if dictionary.learns_norms:
            dictionary.atom_norms[dead] = 1.0
            touched.append(dictionary.atom_norms)
        for parameter in touched if optimizer is not None else ():
            for value in optimizer.state.get(parameter, {}).values():
                if isinstance(value, Tensor) and value.shape[:1] == parameter.shape[:1]:
                    value[dead] = 0
        self.tokens_since_fired[dead] = 0
        return dead.numel()

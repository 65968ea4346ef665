"""``SparseCoder``: the LightningModule that pairs one encoder head with one dictionary."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanSquaredError, MetricCollection

from .dictionary import Dictionary
from .encoders import EncoderHead, create_encoder
from .metrics import MCC, L0, L1, DeadLatents, DictionaryMCC, FractionOfVarianceUnexplained

Batch = Tensor | tuple[Tensor, ...] | list[Tensor]


def unpack_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """``x`` or ``(x, true_codes)`` -> ``(x, true_codes or None)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if len(batch) == 1:
        return batch[0], None
    return batch[0], batch[1]


def sparse_coding_loss(x_hat: Tensor, x: Tensor, codes: Tensor, l1_coeff: float) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's loss, ``MSE(x_hat, x) + l1_coeff * mean|codes|`` (both element means); returns
    ``(loss, mse, l1)``."""
    mse = F.mse_loss(x_hat, x)
    l1 = codes.abs().mean()
    return mse + l1_coeff * l1, mse, l1


def latent_cosine_loss(codes: Tensor, true_codes: Tensor) -> Tensor:
    """The paper's supervised (known-codes) loss: minus the mean over latents of the cosine
    similarity between each inferred latent and its true latent, across the batch."""
    return -F.cosine_similarity(codes.T, true_codes.T, dim=-1).mean()


class SparseCoder(L.LightningModule):
    """One encoder head in front of one dictionary, trained with the paper's loss and Adam.

    The paper's three settings follow from two choices:

    * **known dictionary**: a frozen :class:`Dictionary` (``trainable=False``) holding the true atoms;
      only the encoder trains.
    * **unknown codes and dictionary**: a trainable dictionary, renormalised to unit-norm atoms after
      every optimiser step.
    * **known codes**: ``supervised=True``; the encoder is trained to match the batch's true codes
      (``(x, true_codes)`` batches) with a per-latent cosine loss.

    Validation and test log MCC (when the batch carries true codes), FVU, MSE, L0, L1 and the dead
    fraction; dictionary MCC too when ``true_dictionary`` is given.

    ``encoder`` and ``dictionary`` may also be given as their ``config()`` dicts, which is how
    ``SparseCoder.load_from_checkpoint`` rebuilds them.
    """

    def __init__(self, encoder: EncoderHead | dict[str, Any], dictionary: Dictionary | dict[str, Any], *,
                 l1_coeff: float = 0.01, lr: float = 1e-3, supervised: bool = False,
                 true_dictionary: Tensor | None = None) -> None:
        super().__init__()
        encoder = create_encoder(**encoder) if isinstance(encoder, dict) else encoder
        dictionary = Dictionary(**dictionary) if isinstance(dictionary, dict) else dictionary
        if (encoder.d_model, encoder.n_latents) != (dictionary.d_model, dictionary.n_latents):
            raise ValueError(f"encoder {encoder.name!r} maps {encoder.d_model} -> {encoder.n_latents} latents, but the "
                             f"dictionary has shape (n_latents={dictionary.n_latents}, d_model={dictionary.d_model})")
        self.encoder, self.dictionary = encoder, dictionary
        self.l1_coeff, self.lr, self.supervised = float(l1_coeff), float(lr), bool(supervised)
        self.save_hyperparameters({"encoder": encoder.config(), "dictionary": dictionary.config(),
                                   "l1_coeff": self.l1_coeff, "lr": self.lr, "supervised": self.supervised})
        if true_dictionary is not None and tuple(true_dictionary.shape[1:]) != (dictionary.d_model,):
            raise ValueError(f"true_dictionary must have shape (n, {dictionary.d_model}), got {tuple(true_dictionary.shape)}")
        self.register_buffer("true_dictionary", true_dictionary, persistent=False)

        n_latents, d_model = dictionary.n_latents, dictionary.d_model
        # an over- or under-complete dictionary is scored against the true latents it should recover
        n_true = n_latents if true_dictionary is None else true_dictionary.shape[0]
        for stage in ("val", "test"):
            setattr(self, f"{stage}_metrics", MetricCollection({
                "fvu": FractionOfVarianceUnexplained(d_model), "mse": MeanSquaredError(), "l0": L0(), "l1": L1(),
                "dead_latents": DeadLatents(n_latents)}, prefix=f"{stage}/"))
            setattr(self, f"{stage}_mcc", MCC(n_latents, n_true))
            if true_dictionary is not None:
                setattr(self, f"{stage}_dictionary_mcc", DictionaryMCC(n_latents, n_true))

    @property
    def setting(self) -> str:
        """The paper's name for what is known: ``known_codes``, ``known_dictionary`` or ``unknown``."""
        if self.supervised:
            return "known_codes"
        return "unknown" if self.dictionary.trainable else "known_dictionary"

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x, self.dictionary)

    def decode(self, codes: Tensor) -> Tensor:
        return self.dictionary.decode(codes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x -> (x_hat, codes)``."""
        codes = self.encode(x)
        return self.decode(codes), codes

    def loss(self, x: Tensor, x_hat: Tensor, codes: Tensor, true_codes: Tensor | None) -> dict[str, Tensor]:
        if self.supervised:
            if true_codes is None:
                raise ValueError("supervised (known-codes) training needs (x, true_codes) batches")
            return {"loss": latent_cosine_loss(codes, true_codes)}
        loss, mse, l1 = sparse_coding_loss(x_hat, x, codes, self.l1_coeff)
        return {"loss": loss, "mse": mse, "l1": l1}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, true_codes = unpack_batch(batch)
        x_hat, codes = self(x)
        losses = self.loss(x, x_hat, codes, true_codes)
        if self._logging_step():
            self.log_dict({f"train/{k}": v for k, v in losses.items()})
            self.log("loss", losses["loss"], prog_bar=True, logger=False)
        return losses["loss"]

    def _logging_step(self) -> bool:
        """Whether the trainer writes logs after this step. Logging costs more than a small model's
        whole step, so training metrics are only computed for the steps that are written."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        if self.dictionary.trainable:
            self.dictionary.normalize_()

    def _evaluate(self, stage: str, batch: Batch) -> None:
        x, true_codes = unpack_batch(batch)
        x_hat, codes = self(x)
        metrics = getattr(self, f"{stage}_metrics")
        metrics["fvu"].update(x_hat, x)
        metrics["mse"].update(x_hat, x)
        for name in ("l0", "l1", "dead_latents"):
            metrics[name].update(codes)
        self.log_dict(metrics)
        if true_codes is not None:
            mcc = getattr(self, f"{stage}_mcc")
            mcc.update(codes, true_codes)
            self.log(f"{stage}/mcc", mcc, prog_bar=True)

    def _log_dictionary_mcc(self, stage: str) -> None:
        if self.true_dictionary is not None:
            metric = getattr(self, f"{stage}_dictionary_mcc")
            metric.update(self.dictionary.atoms, self.true_dictionary)
            self.log(f"{stage}/dictionary_mcc", metric)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_dictionary_mcc("val")

    def on_test_epoch_end(self) -> None:
        self._log_dictionary_mcc("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the encoder has no parameters and the dictionary is frozen")
        return torch.optim.Adam(params, lr=self.lr)

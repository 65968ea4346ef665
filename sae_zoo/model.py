"""``SparseCoder``: the LightningModule that pairs one encoder head with one dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin
from torch import Tensor

from ._io import atomic_directory, atomic_write_json, read_safetensors
from .data.base import Batch
from .dictionary import Dictionary
from .encoders import EncoderHead, create_encoder
from .metrics import SparseCodingMetrics
from .pretrained import model_card
from .pretrained.config import (CONFIG_NAME, WEIGHTS_NAME, build_dictionary, build_encoder, load_state, model_config,
                                read_model_config, save_weights)
from .pretrained.files import resolve_file


class Reconstruction(NamedTuple):
    """What :class:`SparseCoder` returns: the reconstruction and the codes it decodes from."""

    x_hat: Tensor
    codes: Tensor


def unpack_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """``x`` or ``(x, true_codes)`` -> ``(x, true_codes or None)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if len(batch) == 1:
        return batch[0], None
    return batch[0], batch[1]


def sparse_coding_loss(x_hat: Tensor, x: Tensor, codes: Tensor, l1_coeff: float,
                       nonnegative: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's loss, ``MSE(x_hat, x) + l1_coeff * mean|codes|`` (both element means); returns
    ``(loss, mse, l1)``. ``nonnegative``: the codes are known to be >= 0, so ``|codes| = codes``."""
    mse = F.mse_loss(x_hat, x)
    l1 = codes.mean() if nonnegative else codes.abs().mean()
    return mse + l1_coeff * l1, mse, l1


def latent_cosine_loss(codes: Tensor, true_codes: Tensor) -> Tensor:
    """The paper's supervised (known-codes) loss: minus the mean over latents of the cosine
    similarity between each inferred latent and its true latent, across the batch."""
    return -F.cosine_similarity(codes.T, true_codes.T, dim=-1).mean()


class SparseCoder(ModelHubMixin, L.LightningModule, library_name="sae_zoo", license="apache-2.0",
                  tags=["sparse-autoencoder", "sparse-coding", "interpretability"],
                  paper_url="https://arxiv.org/abs/2411.13117"):
    """One encoder head in front of one dictionary, trained with the paper's loss and Adam.

    The paper's three settings follow from two choices:

    * **known dictionary**: a frozen :class:`Dictionary` (``trainable=False``) holding the true atoms;
      only the encoder trains.
    * **unknown codes and dictionary**: a trainable dictionary, renormalised to unit-norm atoms after
      every optimiser step.
    * **known codes**: ``supervised=True``; the encoder is trained to match the batch's true codes
      (``(x, true_codes)`` batches) with a per-latent cosine loss.

    Validation and test log MCC (when the batch carries true codes; ``code_recovery=False`` drops it,
    and its ``n_latents`` x ``n_latents`` state, for data without them), FVU, MSE, L0, L1 and the dead
    fraction; dictionary MCC too when ``true_dictionary`` is given. ``sparse_decode`` lets a top-k head
    decode from its k atoms per sample in training.

    ``encoder`` and ``dictionary`` may also be given as their ``config()`` dicts, which is how
    ``SparseCoder.load_from_checkpoint`` rebuilds them.

    ``save_pretrained(dir)``, ``push_to_hub(repo_id)`` and ``SparseCoder.from_pretrained(repo_or_dir,
    revision=...)`` (Hugging Face's ``ModelHubMixin``) store ``config.json``, ``model.safetensors`` and a
    model card ``README.md``, written and read by :mod:`sae_zoo.pretrained`; pushing to a branch, other
    libraries' formats and run directories are in :mod:`sae_zoo.hub`.
    """

    def __init__(self, encoder: EncoderHead | dict[str, Any], dictionary: Dictionary | dict[str, Any], *,
                 l1_coeff: float = 0.01, lr: float = 1e-3, supervised: bool = False,
                 true_dictionary: Tensor | None = None, sparse_decode: bool = True,
                 code_recovery: bool = True) -> None:
        super().__init__()
        if not lr > 0 or not l1_coeff >= 0:
            raise ValueError(f"SparseCoder needs lr > 0 and l1_coeff >= 0, got lr={lr!r}, l1_coeff={l1_coeff!r}")
        encoder = create_encoder(**encoder) if isinstance(encoder, dict) else encoder
        dictionary = Dictionary(**dictionary) if isinstance(dictionary, dict) else dictionary
        if (encoder.d_model, encoder.n_latents) != (dictionary.d_model, dictionary.n_latents):
            raise ValueError(f"encoder {encoder.name!r} maps {encoder.d_model} -> {encoder.n_latents} latents, but the "
                             f"dictionary has shape (n_latents={dictionary.n_latents}, d_model={dictionary.d_model})")
        if encoder.subtract_decoder_bias and dictionary.bias is None:
            raise ValueError(f"encoder {encoder.name!r} subtracts the decoder bias (subtract_decoder_bias=True), "
                             "but the dictionary has none; build it with bias=True")
        self.encoder, self.dictionary = encoder, dictionary
        self.l1_coeff, self.lr, self.supervised = float(l1_coeff), float(lr), bool(supervised)
        self.sparse_decode, self.code_recovery = bool(sparse_decode), bool(code_recovery)
        self.save_hyperparameters({"encoder": encoder.config(), "dictionary": dictionary.config(),
                                   "l1_coeff": self.l1_coeff, "lr": self.lr, "supervised": self.supervised,
                                   "sparse_decode": self.sparse_decode, "code_recovery": self.code_recovery})
        if true_dictionary is not None and tuple(true_dictionary.shape[1:]) != (dictionary.d_model,):
            raise ValueError(f"true_dictionary must have shape (n, {dictionary.d_model}), got {tuple(true_dictionary.shape)}")
        self.register_buffer("true_dictionary", true_dictionary, persistent=False)

        self.val_metrics, self.test_metrics = self.new_metrics(), self.new_metrics()

    def new_metrics(self, sync_on_compute: bool = True) -> SparseCodingMetrics:
        """The metrics an evaluation of this model reports (fresh state); see :meth:`update_metrics`.
        ``sync_on_compute=False``: computed by one process on what it saw, without the other ranks."""
        # an over- or under-complete dictionary is scored against the true latents it should recover
        n_true = None if self.true_dictionary is None else self.true_dictionary.shape[0]
        return SparseCodingMetrics(self.dictionary.d_model, self.dictionary.n_latents, num_true_latents=n_true,
                                   code_recovery=self.code_recovery,
                                   dictionary_recovery=self.true_dictionary is not None,
                                   sync_on_compute=sync_on_compute).to(self.device)

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

    def forward(self, x: Tensor) -> Reconstruction:
        """``x -> Reconstruction(x_hat, codes)``."""
        codes = self.encode(x)
        return Reconstruction(self.decode(codes), codes)

    def loss(self, x: Tensor, x_hat: Tensor, codes: Tensor, true_codes: Tensor | None) -> dict[str, Tensor]:
        if self.supervised:
            if true_codes is None:
                raise ValueError("supervised (known-codes) training needs (x, true_codes) batches")
            return {"loss": latent_cosine_loss(codes, true_codes)}
        loss, mse, l1 = sparse_coding_loss(x_hat, x, codes, self.l1_coeff, self.encoder.nonnegative_codes)
        return {"loss": loss, "mse": mse, "l1": l1}

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The objective of one training batch (``loss``, and ``mse``/``l1`` when unsupervised). A head
        with a sparse form (top-k) is decoded from its k atoms per sample when ``sparse_decode``."""
        x, true_codes = unpack_batch(batch)
        sparse = None if self.supervised or not self.sparse_decode else self.encoder.sparse_forward(x, self.dictionary)
        if sparse is None:
            x_hat, codes = self(x)
            return self.loss(x, x_hat, codes, true_codes)
        values, indices = sparse
        mse = F.mse_loss(self.dictionary.decode_sparse(values, indices), x)
        l1 = values.abs().sum() / (values[..., 0].numel() * self.dictionary.n_latents)  # mean over all codes
        return {"loss": mse + self.l1_coeff * l1, "mse": mse, "l1": l1}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        losses = self.training_losses(batch)
        if self._logging_step():  # the values are read for the log anyway, so checking them costs no extra sync
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"the training loss is {losses['loss'].item()} at step {self.global_step}: "
                                         "check the inputs for NaN/Inf, or lower the learning rate")
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

    def update_metrics(self, metrics: SparseCodingMetrics, batch: Batch) -> None:
        """Add one held-out batch to ``metrics`` (the one way every evaluation scores a model)."""
        x, true_codes = unpack_batch(batch)
        x_hat, codes = self(x)
        metrics.update(x_hat, x, codes, true_codes if self.code_recovery else None)

    def update_dictionary_metrics(self, metrics: SparseCodingMetrics) -> None:
        if self.true_dictionary is not None:
            metrics.update_dictionary(self.dictionary.atoms, self.true_dictionary)

    def _evaluate(self, stage: str, batch: Batch) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        self.update_metrics(metrics, batch)
        for name, metric in metrics.updated().items():
            if name != "dictionary_mcc":
                self.log(f"{stage}/{name}", metric, prog_bar=name == "mcc")

    def _log_dictionary_mcc(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        if self.true_dictionary is not None:
            self.update_dictionary_metrics(metrics)
            self.log(f"{stage}/dictionary_mcc", metrics.metrics["dictionary_mcc"])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_dictionary_mcc("val")

    def on_test_epoch_end(self) -> None:
        self._log_dictionary_mcc("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["decoder_provenance"] = self.dictionary.provenance

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.dictionary.provenance = dict(checkpoint.get("decoder_provenance") or {})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the encoder has no parameters and the dictionary is frozen")
        return torch.optim.Adam(params, lr=self.lr)

    # ---- Hugging Face Hub (ModelHubMixin): sae_zoo's files in sae_zoo.pretrained, transport in sae_zoo.hub ----

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> str | None:
        """The mixin's ``save_pretrained`` (``config.json``, ``model.safetensors``, ``README.md``), made
        atomic: the files are written into a staging folder that then replaces ``save_directory`` whole."""
        if config is not None:
            raise TypeError("config.json is built from the model itself; save_pretrained takes no config")
        with atomic_directory(save_directory, replaces=(CONFIG_NAME,)) as staging:
            super().save_pretrained(staging, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self, save_directory / WEIGHTS_NAME)
        atomic_write_json(save_directory / CONFIG_NAME, model_config(self))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "SparseCoder":
        """The mixin's ``from_pretrained``: a folder or Hub repo (``revision=`` a branch, tag or commit)
        written by ``save_pretrained``/``push_to_hub``. ``config.json`` is read and checked first, so a
        missing, corrupt or foreign one is reported by name before the mixin reads it. Further keyword
        arguments may set ``l1_coeff``, ``lr``, ``true_dictionary``, ``sparse_decode`` and ``map_location``;
        the head and dictionary come from ``config.json``. Returns the model in eval mode."""
        download = {k: kwargs[k] for k in ("revision", "cache_dir", "force_download", "token", "local_files_only")
                    if k in kwargs}
        read_model_config(pretrained_model_name_or_path, **download)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu", **model_kwargs: Any) -> "SparseCoder":
        download = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download, "token": token,
                    "local_files_only": local_files_only}
        config, config_path = read_model_config(model_id, **download)
        overrides = {k: v for k, v in model_kwargs.items() if k in PRETRAINED_OVERRIDES}
        # the mixin passes config.json's values for the __init__ arguments it names: those are not overrides
        unexpected = sorted(k for k, v in model_kwargs.items()
                            if k not in PRETRAINED_OVERRIDES and not (k in config and config[k] == v)
                            and k not in ("proxies", "resume_download"))
        if unexpected:
            raise TypeError(f"from_pretrained got unexpected arguments {', '.join(unexpected)}; the head and dictionary "
                            "come from config.json (to pair a pretrained head with another dictionary, use "
                            "sae_zoo.pretrained.load_encoder)")
        model = cls(build_encoder(config, config_path), build_dictionary(config, config_path),
                    supervised=bool(config.get("supervised", False)), code_recovery=bool(config.get("code_recovery", True)),
                    **{"l1_coeff": config.get("l1_coeff", 0.01), "lr": config.get("lr", 1e-3), **overrides})
        model.to(getattr(torch, config["dtype"]))
        weights_path = resolve_file(model_id, WEIGHTS_NAME, **download)
        load_state(model, read_safetensors(weights_path), weights_path, config_path)
        return model.to(map_location).eval()

    def generate_model_card(self, **card_kwargs: Any) -> ModelCard:
        """The model card (``README.md``), rendered from ``model_cards/sae_zoo.md``; ``card_kwargs`` are
        those of :func:`sae_zoo.pretrained.model_card` (test ``metrics``, the ``recipe``, ``repo_id``)."""
        return model_card(self, **card_kwargs)


#: what ``from_pretrained`` may set beside config.json (for further training, or the device)
PRETRAINED_OVERRIDES = ("l1_coeff", "lr", "true_dictionary", "sparse_decode")

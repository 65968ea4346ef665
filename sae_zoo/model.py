"""``SparseCoder``: the LightningModule that pairs one encoder head with one dictionary."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, ModelCard, ModelHubMixin
from torch import Tensor
from torchmetrics import MeanSquaredError, MetricCollection

from ._io import atomic_directory
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
    model card ``README.md`` (see :mod:`sae_zoo.hub`).
    """

    def __init__(self, encoder: EncoderHead | dict[str, Any], dictionary: Dictionary | dict[str, Any], *,
                 l1_coeff: float = 0.01, lr: float = 1e-3, supervised: bool = False,
                 true_dictionary: Tensor | None = None, sparse_decode: bool = True,
                 code_recovery: bool = True) -> None:
        super().__init__()
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

        n_latents, d_model = dictionary.n_latents, dictionary.d_model
        # an over- or under-complete dictionary is scored against the true latents it should recover
        n_true = n_latents if true_dictionary is None else true_dictionary.shape[0]
        for stage in ("val", "test"):
            setattr(self, f"{stage}_metrics", MetricCollection({
                "fvu": FractionOfVarianceUnexplained(d_model), "mse": MeanSquaredError(), "l0": L0(), "l1": L1(),
                "dead_latents": DeadLatents(n_latents)}, prefix=f"{stage}/"))
            if self.code_recovery:  # its state is n_latents x n_true: skip it where there are no true codes
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
        if true_codes is not None and self.code_recovery:
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["decoder_provenance"] = self.dictionary.provenance

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.dictionary.provenance = dict(checkpoint.get("decoder_provenance") or {})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the encoder has no parameters and the dictionary is frozen")
        return torch.optim.Adam(params, lr=self.lr)

    # ---- Hugging Face Hub: save_pretrained / from_pretrained / push_to_hub (ModelHubMixin) ----

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> str | None:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` (the model card) to
        ``save_directory``. Files are written beside it first and moved in only when all succeeded."""
        from .hub.serialization import model_config

        if config is not None:
            raise TypeError("config.json is built from the model itself; save_pretrained takes no config")
        with atomic_directory(save_directory) as staging:
            super().save_pretrained(staging, config=model_config(self), model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        from .hub.serialization import WEIGHTS_NAME, save_weights

        save_weights(self, save_directory / WEIGHTS_NAME)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload sae_zoo model", private: bool | None = None,
                    token: str | None = None, branch: str | None = None, create_pr: bool | None = None,
                    model_card_kwargs: dict[str, Any] | None = None, **upload_kwargs: Any) -> str:
        """Save, then upload in one commit to ``repo_id`` (created if needed) on ``branch`` (created from
        main if needed). Returns the commit URL; its ``.oid`` pins this version for ``from_pretrained``.
        Nothing reaches the Hub unless the whole model saved."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "model", model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})})
            api = HfApi(token=token)
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if branch not in (None, "main"):
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=Path(tmp) / "model", commit_message=commit_message,
                                     revision=branch, create_pr=create_pr, **upload_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, force_download: bool = False,
                        token: str | bool | None = None, local_files_only: bool = False,
                        map_location: str | torch.device = "cpu", **overrides: Any) -> "SparseCoder":
        """Load a model saved by ``save_pretrained`` or pushed by ``push_to_hub``: a local directory or
        a Hub repo id, at ``revision`` (branch, tag or commit). ``overrides`` may set ``l1_coeff``,
        ``lr``, ``true_dictionary`` and ``sparse_decode`` for further training; the head and dictionary come from
        ``config.json``. Returns the model in eval mode."""
        from .hub.serialization import (build_dictionary, build_encoder, check_config, load_state, read_json,
                                        read_safetensors, resolve_model_files)

        unknown = sorted(set(overrides) - {"l1_coeff", "lr", "true_dictionary", "sparse_decode"})
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments {', '.join(unknown)}; the head and dictionary "
                            "come from config.json (to pair a pretrained head with another dictionary, use "
                            "sae_zoo.hub.load_encoder)")
        config_path, weights_path = resolve_model_files(
            pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, force_download=force_download,
            token=token, local_files_only=local_files_only)
        config = check_config(read_json(config_path), config_path)
        model = cls(build_encoder(config, config_path), build_dictionary(config, config_path),
                    supervised=bool(config.get("supervised", False)), code_recovery=bool(config.get("code_recovery", True)),
                    **{"l1_coeff": config.get("l1_coeff", 0.01), "lr": config.get("lr", 1e-3), **overrides})
        model.to(getattr(torch, config["dtype"]))
        load_state(model, read_safetensors(weights_path), weights_path, config_path)
        return model.to(map_location).eval()

    def generate_model_card(self, **card_kwargs: Any) -> ModelCard:
        """The model card (``README.md``), rendered from ``model_cards/sae_zoo.md``; ``card_kwargs`` are
        those of :func:`sae_zoo.hub.card.model_card` (test ``metrics``, the ``recipe``, ``repo_id``)."""
        from .hub.card import model_card

        return model_card(self, **card_kwargs)


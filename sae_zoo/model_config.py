"""One config object per saved model: everything that rebuilds a :class:`~sae_zoo.SparseCoder`, which
``save_pretrained`` (``config.json``), Lightning checkpoints (their hyper-parameters) and the model card all read.

It is written flat, with the names saved models have always had (``{"encoder": {...}, "dictionary": {...},
"transcoder": true, "skip_connection": false, "l1_coeff": 0.01, "lr": 0.001, ...}``), so that folders and
checkpoints written before it load unchanged, and ``SparseCoder(**config.to_dict())`` rebuilds the model (which is
how ``load_from_checkpoint`` calls it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .families import Autoencoder, ModelFamily, family_from_config
from .training_config import FIELDS, TrainingConfig

#: keys a saved file holds beside the model's config (``config.json``'s own; ``code_recovery``: evaluation's, which
#: models saved before scoring left the model kept)
FILE_KEYS = frozenset({"library", "format_version", "sae_zoo_version", "decoder_provenance", "setting", "dtype",
                       "code_recovery"})
#: the keys families have written (:meth:`ModelFamily.config`)
FAMILY_KEYS = frozenset({"family", "transcoder", "skip_connection", "train_skip"})


@dataclass
class ModelConfig:
    """``encoder`` and ``dictionary`` (their ``config()`` dicts), the ``family`` and the ``training`` config."""

    encoder: dict[str, Any]
    dictionary: dict[str, Any]
    family: ModelFamily = field(default_factory=Autoencoder)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": dict(self.encoder), "dictionary": dict(self.dictionary), **self.family.config(),
                **self.training.to_dict()}

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "the model's config") -> ModelConfig:
        """The config of :meth:`to_dict`, of a ``config.json`` (its file keys left aside) or of a checkpoint's
        hyper-parameters, from any sae_zoo version; a key that is none of these is refused by name (``where``)."""
        missing = [key for key in ("encoder", "dictionary") if key not in config]
        if missing:
            raise ValueError(f"{where}: no {' or '.join(map(repr, missing))}: it does not describe a sparse coder")
        unknown = sorted(set(config) - {"encoder", "dictionary"} - set(FIELDS) - FAMILY_KEYS - FILE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a model's config holds "
                             f"'encoder', 'dictionary', its family's keys and training options ({', '.join(FIELDS)})")
        try:
            training = TrainingConfig(**{key: config[key] for key in FIELDS if key in config})
            family = family_from_config(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        return cls(dict(config["encoder"]), dict(config["dictionary"]), family, training)

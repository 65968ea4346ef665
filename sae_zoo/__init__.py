"""sae_zoo: sparse autoencoders and sparse-coding encoder heads, as a PyTorch Lightning model zoo.

One :class:`Dictionary` (the decoder) is paired with an interchangeable encoder head in a
:class:`SparseCoder` LightningModule. Heads live in a registry: :func:`list_encoders`,
:func:`create_encoder`, :func:`register_encoder`; so do training aids (:class:`TrainingAid`,
:func:`register_training_aid`, :func:`list_training_aids`) and model families (:class:`ModelFamily`,
:func:`register_family`, :func:`list_families`). Public SAEs load by name:
:func:`list_pretrained`, :func:`load_sae`.
"""

from importlib.metadata import version

from .clt import CrossLayerTranscoder
from .dictionary import Dictionary
from .encoders import EncoderHead, create_encoder, list_encoders, register_encoder
from .families import ModelFamily, list_families, register_family
from .hub import list_pretrained, load_sae
from .model import SparseCoder
from .model_config import ModelConfig
from .training import TrainingAid, list_training_aids, register_training_aid
from .training_config import TrainingConfig

__version__ = version("sae_zoo")

__all__ = ["CrossLayerTranscoder", "Dictionary", "EncoderHead", "ModelConfig", "ModelFamily", "SparseCoder", "TrainingAid", "TrainingConfig",
           "create_encoder", "list_encoders", "list_families", "list_pretrained", "list_training_aids", "load_sae",
           "register_encoder", "register_family", "register_training_aid", "__version__"]

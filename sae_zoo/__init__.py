"""sae_zoo: sparse autoencoders and sparse-coding encoder heads, as a PyTorch Lightning model zoo.

One :class:`Dictionary` (the decoder) is paired with an interchangeable encoder head in a
:class:`SparseCoder` LightningModule. Heads live in a registry: :func:`list_encoders`,
:func:`create_encoder`, :func:`register_encoder`. Public SAEs load by name:
:func:`list_pretrained`, :func:`load_sae`.
"""

from importlib.metadata import version

from .dictionary import Dictionary
from .encoders import EncoderHead, create_encoder, list_encoders, register_encoder
from .hub import list_pretrained, load_sae
from .model import SparseCoder

__version__ = version("sae_zoo")

__all__ = ["Dictionary", "EncoderHead", "SparseCoder", "create_encoder", "list_encoders", "list_pretrained",
           "load_sae", "register_encoder", "__version__"]

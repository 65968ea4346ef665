"""Encoder heads, their registry, and the table of other libraries' architectures they convert.

Importing this package imports every module in it, which registers the built-in heads: a new head is
its own file (and its test), with no line to add here.
"""

import importlib
import pkgutil

from .base import EncoderHead, SparseCodes, TrainingCodes
from .interop import ForeignSAE, UnsupportedConversion, converter_for, list_architectures
from .ista import FISTAEncoder, ISTAEncoder
from .ito import ITOEncoder
from .iterative import IterativeHead
from .lca import LCAEncoder
from .linear import LinearEncoder
from .lista import LISTAEncoder
from .mlp import MLPEncoder
from .registry import create_encoder, get_encoder_class, list_encoders, register_encoder
from .sparse_coding import SparseCodingEncoder
from .support_search import SupportSearchEncoder
from .topk import TopKEncoder

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EncoderHead", "IterativeHead", "SparseCodes", "TrainingCodes", "ForeignSAE", "UnsupportedConversion",
           "FISTAEncoder", "ISTAEncoder", "ITOEncoder", "LCAEncoder", "LISTAEncoder", "LinearEncoder", "MLPEncoder",
           "SparseCodingEncoder", "SupportSearchEncoder", "TopKEncoder", "converter_for", "create_encoder",
           "get_encoder_class", "list_architectures", "list_encoders", "register_encoder"]

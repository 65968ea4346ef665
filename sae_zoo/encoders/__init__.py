"""Encoder heads and their registry. Importing this package registers the built-in heads."""

from .base import EncoderHead
from .registry import create_encoder, get_encoder_class, list_encoders, register_encoder
from . import ista, ito, lca, linear, lista, mlp, sparse_coding, support_search, topk  # noqa: F401  (registers the built-in heads)
from .ista import FISTAEncoder, ISTAEncoder
from .ito import ITOEncoder
from .iterative import IterativeHead
from .lca import LCAEncoder
from .lista import LISTAEncoder
from .linear import LinearEncoder
from .mlp import MLPEncoder
from .sparse_coding import SparseCodingEncoder
from .support_search import SupportSearchEncoder
from .topk import TopKEncoder

__all__ = ["EncoderHead", "IterativeHead", "FISTAEncoder", "ISTAEncoder", "ITOEncoder", "LCAEncoder", "LISTAEncoder",
           "SparseCodingEncoder", "SupportSearchEncoder",
           "LinearEncoder", "MLPEncoder", "TopKEncoder", "create_encoder",
           "get_encoder_class", "list_encoders", "register_encoder"]

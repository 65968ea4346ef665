"""Encoder heads and their registry. Importing this package registers the built-in heads."""

from .base import EncoderHead
from .registry import create_encoder, get_encoder_class, list_encoders, register_encoder
from . import linear, mlp, topk  # noqa: F401  (registers the built-in heads)
from .linear import LinearEncoder
from .mlp import MLPEncoder
from .topk import TopKEncoder

__all__ = ["EncoderHead", "LinearEncoder", "MLPEncoder", "TopKEncoder", "create_encoder",
           "get_encoder_class", "list_encoders", "register_encoder"]

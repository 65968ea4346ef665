"""Datamodules: the paper's synthetic data, SynthSAEBench (SAELens's generator), and activations of a
language model (cached, or read while it runs). Each is registered by its recipe ``data.name``
(:func:`register_datamodule`), so a user's own joins through a recipe's ``imports:``."""

from .activations import ActivationDataModule, ShardedActivations
from .base import Batch, LanguageModelData, Pair, SparseCodingData
from .live import LiveActivations
from .registry import DATAMODULES, create_datamodule, get_datamodule_class, list_datamodules, register_datamodule
from .synthetic import PAPER_SEED, SyntheticSparseDataModule, generate_sparse_data
from .synthsaebench import SynthSAEBenchDataModule

__all__ = ["Batch", "DATAMODULES", "LanguageModelData", "LiveActivations", "Pair", "SparseCodingData", "PAPER_SEED",
           "ActivationDataModule", "ShardedActivations", "SyntheticSparseDataModule", "SynthSAEBenchDataModule",
           "create_datamodule", "generate_sparse_data", "get_datamodule_class", "list_datamodules",
           "register_datamodule"]

"""Datamodules: the paper's synthetic data, and activations of a language model."""

from .activations import ActivationDataModule, ShardedActivations
from .synthetic import PAPER_SEED, SyntheticSparseDataModule, generate_sparse_data

#: recipe ``data.name`` -> datamodule
DATAMODULES = {"synthetic": SyntheticSparseDataModule, "activations": ActivationDataModule}

__all__ = ["DATAMODULES", "PAPER_SEED", "ActivationDataModule", "ShardedActivations", "SyntheticSparseDataModule",
           "generate_sparse_data"]

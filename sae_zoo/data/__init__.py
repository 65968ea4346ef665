"""Datamodules: the paper's synthetic data, SynthSAEBench (SAELens's generator), and activations of a
language model."""

from .activations import ActivationDataModule, ShardedActivations
from .base import Batch, Pair, SparseCodingData
from .synthetic import PAPER_SEED, SyntheticSparseDataModule, generate_sparse_data
from .synthsaebench import SynthSAEBenchDataModule

#: recipe ``data.name`` -> datamodule (each a :class:`SparseCodingData`)
DATAMODULES: dict[str, type[SparseCodingData]] = {"synthetic": SyntheticSparseDataModule,
                                                  "synthsaebench": SynthSAEBenchDataModule,
                                                  "activations": ActivationDataModule}

__all__ = ["Batch", "DATAMODULES", "Pair", "SparseCodingData", "PAPER_SEED", "ActivationDataModule", "ShardedActivations",
           "SyntheticSparseDataModule", "SynthSAEBenchDataModule", "generate_sparse_data"]

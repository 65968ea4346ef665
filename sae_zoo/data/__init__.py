"""Datamodules: the paper's synthetic data (language-model activations to follow)."""

from .synthetic import PAPER_SEED, SyntheticSparseDataModule, generate_sparse_data

DATAMODULES = {"synthetic": SyntheticSparseDataModule}

__all__ = ["DATAMODULES", "PAPER_SEED", "SyntheticSparseDataModule", "generate_sparse_data"]

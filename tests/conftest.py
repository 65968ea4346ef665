import warnings

import pytest
import torch

from sae_zoo.data import generate_sparse_data


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    yield


@pytest.fixture
def small_data():
    """(codes, x, dictionary) from the paper's generator at a small size."""
    return generate_sparse_data(256, n_latents=12, d_model=6, k=3, seed=7)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)

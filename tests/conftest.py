import atexit
import os
import shutil
import sys
import tempfile
import warnings

from hub_server import LoopbackHub

# huggingface_hub reads its endpoint and cache folder once, at import: point it at a loopback Hub
# (tests/hub_server.py) and a throw-away cache before anything imports it. Subprocesses inherit this.
if "huggingface_hub" in sys.modules:
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could point it at the loopback Hub")
HUB = LoopbackHub()
_HF_HOME = tempfile.mkdtemp(prefix="sae-zoo-test-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ.update({"HF_ENDPOINT": HUB.url, "HF_TOKEN": "hf_loopback_test_token", "HF_HOME": _HF_HOME,
                   "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
os.environ.pop("HF_HUB_OFFLINE", None)
# pytest-xdist runs one worker per core (the Makefile's `-n auto`): each keeps to one thread, as do the processes
# it starts, or the workers' thread pools contend for the same cores and every test runs many times slower
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)

from sae_zoo.data import generate_sparse_data  # noqa: E402


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


@pytest.fixture
def hub() -> LoopbackHub:
    """The loopback Hub every huggingface_hub call in the tests goes to."""
    return HUB


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    """``(a tiny random Llama's folder, a glob of text files)`` (:mod:`lm_fixtures`), written once per test module."""
    from lm_fixtures import write_corpus, write_tiny_llama

    root = tmp_path_factory.mktemp("lm")
    return write_tiny_llama(root / "model"), write_corpus(root / "text")

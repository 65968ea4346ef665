"""SynthSAEBench (Chanin & Garriga-Alonso 2026) as training data, drawn by SAELens's own generator.

The benchmark is a ``sae_lens.synthetic.SyntheticModel``: ground-truth feature directions, Zipfian
firing probabilities, a hierarchy, low-rank correlations and per-feature magnitudes. This module
uses SAELens's code for all of it (install ``sae_zoo[synthsaebench]``), so the data are the
benchmark's and not a look-alike.

* The generator is named by ``model`` (a folder SAELens saved, or a Hub id such as
  ``decoderesearch/synth-sae-bench-16k-v2``, optionally ``repo:subfolder``) or built from ``config``
  (the keys of ``SyntheticModelConfig.to_dict()``) and saved, into ``model`` when that folder does
  not exist yet, else into the cache. Every folder sae_zoo saves holds ``sae_zoo_sha256.json``, the
  sha256 of each file; loading checks them and refuses a file that changed.
* Samples: SAELens's sampler is the bottleneck on a CPU (``benchmarks/synthsaebench_sampler.py``
  measures it against the training step), so by default ``n_train`` training samples and ``n_test``
  held-out ones are drawn once, seeded, and cached as safetensors shards that every run of a suite
  reads (:class:`~sae_zoo.data.ShardedActivations`). ``stream=True`` draws fresh training samples
  every step instead (seeded by ``seed``, the epoch and the rank), as SAELens's runner does.
* Held-out batches carry the true feature activations, so recovery is scored: the latents as
  feature detectors (F1), decoder MCC against the true directions, uniqueness and shrinkage.
"""

from __future__ import annotations

import logging
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from filelock import FileLock
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .._io import atomic_directory, atomic_write_json, cache_key, read_json, read_safetensors
from .activations import ShardedActivations, save_shard
from .base import Batch, SparseCodingData
from .registry import register_datamodule

log = logging.getLogger(__name__)

#: beside the generator's files: the sha256 of each, checked on every load
SHA256_RECORD = "sae_zoo_sha256.json"
#: the sample cache's layout; a cache in another layout is not reused
SAMPLES_FORMAT = "synthsaebench-samples-1"
#: the sections of a SynthSAEBench config that SAELens parses into their own classes
CONFIG_SECTIONS = ("firing_probability", "hierarchy", "orthogonalization", "correlation", "std_firing_magnitudes",
                   "mean_firing_magnitudes")


def _synthetic():
    try:
        from sae_lens import synthetic
    except ImportError as e:
        raise ImportError(f"data.name=synthsaebench draws its data with SAELens's generator, which is not installed "
                          f"({e}): pip install 'sae_zoo[synthsaebench]'") from None
    return synthetic


def model_config(config: dict[str, Any]) -> Any:
    """SAELens's ``SyntheticModelConfig`` of ``config``; a config SAELens rejects raises ``ValueError``
    with SAELens's message and the ``data.config`` key at fault."""
    synthetic = _synthetic()
    full = {"firing_probability": synthetic.ZipfianFiringProbabilityConfig().to_dict(), **config}
    try:
        return synthetic.SyntheticModelConfig.from_dict(full)
    except (TypeError, ValueError, KeyError) as e:
        error = e
    key = f"data.config.{_section_at_fault(synthetic, full, config)}".rstrip(".")
    raise ValueError(f"{key}: SAELens rejects this SynthSAEBench config: {type(error).__name__}: {error}")


def _section_at_fault(synthetic: Any, full: dict[str, Any], config: dict[str, Any]) -> str:
    """The key of ``config`` SAELens refuses: a top-level key its message names, or the one nested section that
    fails alone beside valid top-level keys; "" when neither can be told."""
    default = synthetic.ZipfianFiringProbabilityConfig().to_dict()
    top = {k: v for k, v in full.items() if k not in CONFIG_SECTIONS}
    try:
        synthetic.SyntheticModelConfig.from_dict({**top, "firing_probability": default})
    except (TypeError, ValueError, KeyError) as e:
        return next((k for k in top if str(e).startswith(k) or f"'{k}'" in str(e)), "")
    for section in CONFIG_SECTIONS:
        if isinstance(config.get(section), dict):
            try:
                synthetic.SyntheticModelConfig.from_dict({**top, "firing_probability": default,
                                                          section: config[section]})
            except (TypeError, ValueError, KeyError):
                return section
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: Any, path: str | Path) -> Path:
    """Save a SAELens ``SyntheticModel`` (its own files) with ``sae_zoo_sha256.json``, written in a staging
    folder and renamed, so a folder is either complete or absent."""
    path = Path(path)
    with atomic_directory(path, replaces=(SHA256_RECORD,)) as staging:
        model.save(staging)
        files = {f.name: _sha256(f) for f in sorted(staging.iterdir()) if f.is_file()}
        atomic_write_json(staging / SHA256_RECORD, {"files": files})
    return path


def verify_model_folder(path: Path) -> None:
    """Check every file of ``path`` against ``sae_zoo_sha256.json`` (when the folder has one)."""
    record_path = path / SHA256_RECORD
    if not record_path.exists():
        return
    record = read_json(record_path).get("files", {})
    for name, expected in record.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file}: missing, but {record_path} records it; the model folder is incomplete")
        actual = _sha256(file)
        if actual != expected:
            raise ValueError(f"{file}: sha256 {actual} does not match its record {expected} in {record_path}; the "
                             "file changed since it was saved: restore it, or delete the folder to rebuild it")


def load_model(source: str, device: str = "cpu") -> Any:
    """A SAELens ``SyntheticModel`` from a folder (checked against its sha256 record) or the Hub."""
    synthetic = _synthetic()
    path = Path(source).expanduser()
    if path.exists():
        if not (path / synthetic.SYNTHETIC_MODEL_CONFIG_FILENAME).is_file():
            raise ValueError(f"data.model: {path} holds no {synthetic.SYNTHETIC_MODEL_CONFIG_FILENAME}; it is not a "
                             "SynthSAEBench model folder")
        verify_model_folder(path)
        return synthetic.SyntheticModel.load_from_disk(path, device=device)
    try:
        return synthetic.SyntheticModel.load_from_source(source, device=device)
    except (OSError, ValueError) as e:  # the Hub client's errors (offline, no such repo or file; a bad repo id)
        raise ValueError(f"data.model: {source!r} is neither a folder nor a SynthSAEBench model the Hub serves "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def fingerprint(model: Any) -> str:
    """sha256 of what defines the generator's data: its config and its saved tensors."""
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    tensors = [model.feature_dict.feature_vectors, model.feature_dict.bias,
               model.activation_generator.firing_probabilities]
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _seed(*parts: int) -> int:
    """One 60-bit seed from several integers (the data seed, a shard, an epoch, a rank)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


#: samples SAELens draws at once: its sampler works on dense (n, num_features) tensors, so blocks keep memory
#: bounded; on a CPU blocks of 1,024 to 4,096 run at about the same speed, 16,384 at half
#: (``benchmarks/synthsaebench_sampler.py``). Changing it changes the draws.
DRAW_BLOCK = 4096


def _blocks(model: Any, n: int, seed: int, *more: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(start, x, true feature activations)`` for ``n`` samples in blocks of :data:`DRAW_BLOCK`, drawn in that
    order from one generator seeded by ``(seed, *more)``. SAELens's sampler draws from torch's global
    generator, so it runs under a forked one."""
    devices = [model.device] if str(model.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_seed(seed, *more))
        for start in range(0, n, DRAW_BLOCK):
            yield start, *model.sample_with_features(min(DRAW_BLOCK, n - start))


def draw(model: Any, n: int, seed: int, *more: int) -> tuple[Tensor, Tensor]:
    """``(x, true feature activations)`` for ``n`` samples of ``model``, seeded: the same arguments give the
    same samples."""
    blocks = list(_blocks(model, n, seed, *more))
    return torch.cat([x for _, x, _ in blocks]), torch.cat([codes for _, _, codes in blocks])


def draw_sparse(model: Any, n: int, seed: int, *more: int) -> tuple[Tensor, Tensor, Tensor]:
    """The samples of :func:`draw` as ``(x, indices, values)`` on the CPU: the true feature activations as the
    (row, feature) indices of their nonzeros, rows in order, and their values; no ``(n, num_features)`` tensor
    is ever held."""
    xs, indices, values = [], [], []
    for start, x, codes in _blocks(model, n, seed, *more):
        nonzero = codes.nonzero()
        xs.append(x.float().cpu())
        values.append(codes[nonzero[:, 0], nonzero[:, 1]].float().cpu())
        indices.append(nonzero.cpu().to(torch.int64) + torch.tensor([start, 0]))
    return torch.cat(xs), torch.cat(indices), torch.cat(values)


def densify(indices: Tensor, values: Tensor, rows: int, columns: int, first_row: int = 0) -> Tensor:
    """The dense ``(rows, columns)`` block starting at ``first_row`` of sparse ``(indices, values)``."""
    dense = torch.zeros(rows, columns)
    dense[indices[:, 0] - first_row, indices[:, 1]] = values
    return dense


class StreamedSamples(IterableDataset):
    """``n_batches`` fresh batches of ``model``'s samples per pass, seeded by the seed, the pass and the rank."""

    def __init__(self, model: Any, n_batches: int, batch_size: int, seed: int, rank: int = 0) -> None:
        self.model, self.n_batches, self.batch_size, self.seed, self.rank = model, n_batches, batch_size, seed, rank
        self.epoch = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[Tensor]:
        self.epoch += 1
        for i in range(self.n_batches):
            yield draw(self.model, self.batch_size, self.seed, self.epoch, self.rank, i)[0]


class HeldOutBatches(IterableDataset):
    """The held-out batches ``(x, true feature activations)`` one at a time, every ``world``-th from ``rank``."""

    def __init__(self, datamodule: "SynthSAEBenchDataModule", rank: int = 0, world: int = 1) -> None:
        self.datamodule, self.rank, self.world = datamodule, rank, world

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return itertools.islice(self.datamodule.held_out_batches(), self.rank, None, self.world)


@register_datamodule("synthsaebench")
class SynthSAEBenchDataModule(SparseCodingData):
    """SynthSAEBench samples; see the module docstring. Held-out batches are ``(x, true feature activations)``.

    ``model``/``config``: the generator (one of them, or both: ``config`` builds ``model`` when that folder
    does not exist, and must match it when it does). ``n_train``/``n_test``: training and held-out samples
    (``n_train`` per epoch when streamed). ``seed``: the samples' seed (the generator has its own, in
    ``config.seed``). ``cache_dir``: where built generators and drawn samples go (default
    ``runs/synthsaebench``). ``device``: where SAELens samples (``cuda`` when streaming on a GPU).
    """

    ground_truth = True
    #: cached samples per shard file
    SHARD_ROWS: ClassVar[int] = 131_072

    def __init__(self, model: str | None = None, config: dict[str, Any] | None = None, *, n_train: int = 1_000_000,
                 n_test: int = 16_384, batch_size: int = 1024, seed: int = 0, stream: bool = False,
                 cache_dir: str | None = None, shuffle_buffer: int = 262_144, device: str = "cpu") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_arguments(self.hparams)
        self.cache_root = Path(cache_dir) if cache_dir else Path("runs") / "synthsaebench"
        self.generator = self._generator()
        self.fingerprint = fingerprint(self.generator)
        self.dictionary = self.generator.feature_dict.feature_vectors.detach().float().cpu()
        self.n_latents = int(self.dictionary.shape[0])
        self._held_out_cache: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def check_arguments(cls, kwargs: dict[str, Any]) -> None:
        """The checks made before anything is built or drawn."""
        model, config = kwargs.get("model"), kwargs.get("config")
        if model is None and config is None:
            raise ValueError("data.model or data.config must be given: a SynthSAEBench model folder or Hub id, or the "
                             "config to build one from")
        for name in ("n_train", "n_test", "batch_size"):
            value = kwargs.get(name, 1)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if config is not None:
            model_config(dict(config))

    def _generator(self) -> Any:
        h = self.hparams
        if h.config is None:
            return load_model(h.model, device=h.device)
        cfg = model_config(dict(h.config))
        key = cache_key(cfg.to_dict())
        folder = Path(h.model) if h.model is not None else self.cache_root / "models" / key
        synthetic = _synthetic()
        if not folder.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder) + ".lock"):
                if not folder.exists():
                    log.info("building the SynthSAEBench model (%d features in %d dimensions) into %s",
                             cfg.num_features, cfg.hidden_dim, folder)
                    save_model(synthetic.SyntheticModel(cfg), folder)
        saved = read_json(folder / synthetic.SYNTHETIC_MODEL_CONFIG_FILENAME) if folder.is_dir() else None
        if saved is not None and saved != json.loads(json.dumps(cfg.to_dict())):
            differing = sorted(k for k in {**saved, **cfg.to_dict()} if saved.get(k) != cfg.to_dict().get(k))
            raise ValueError(f"data.model: {folder} holds a SynthSAEBench model of another config (differing: "
                             f"{', '.join(differing)}); point data.model elsewhere or drop data.config")
        return load_model(str(folder), device=h.device)

    # ---- the contract ----

    @property
    def d_model(self) -> int:
        return int(self.dictionary.shape[1])

    @property
    def true_l0(self) -> float:
        """The mean number of true features active per held-out sample."""
        x, indices, _ = self._held_out()
        return len(indices) / len(x)

    def describe(self) -> dict[str, Any]:
        h = self.hparams
        return {"data": "synthsaebench", "synthsaebench_model": h.model or "built from data.config",
                "synthsaebench_sha256": self.fingerprint, "data_seed": h.seed}

    def held_out_batches(self) -> Iterator[Batch]:
        """``(x, true feature activations)`` batches, the activations made dense one batch at a time."""
        x, indices, values = self._held_out()
        size = self.hparams.batch_size
        rows = torch.searchsorted(indices[:, 0].contiguous(), torch.arange(0, len(x) + size, size))
        for i, start in enumerate(range(0, len(x), size)):
            batch = x[start:start + size]
            part = slice(int(rows[i]), int(rows[i + 1]))
            yield batch, densify(indices[part], values[part], len(batch), self.n_latents, first_row=start)

    @property
    def test_x(self) -> Tensor:
        return self._held_out()[0]

    @property
    def test_codes(self) -> Tensor:
        """All held-out true feature activations as one dense tensor (``n_test x num_features``: large at 16k)."""
        x, indices, values = self._held_out()
        return densify(indices, values, len(x), self.n_latents)

    # ---- samples ----

    @property
    def samples_dir(self) -> Path:
        h = self.hparams
        identity = {"model": self.fingerprint, "seed": h.seed, "n_train": 0 if h.stream else h.n_train,
                    "n_test": h.n_test, "format": SAMPLES_FORMAT}
        key = cache_key(identity)
        return self.cache_root / "samples" / key

    def prepare_data(self) -> None:
        """Draw and cache the held-out samples (and the training samples unless streamed), once."""
        folder = self.samples_dir
        if (folder / "manifest.json").exists():
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if (folder / "manifest.json").exists():
                return
            h = self.hparams
            n_train = 0 if h.stream else h.n_train
            with atomic_directory(folder, replaces=("manifest.json",)) as staging:
                x, indices, values = draw_sparse(self.generator, h.n_test, h.seed, -1)
                save_file({"x": x, "indices": indices, "values": values}, str(staging / "test.safetensors"))
                shards = math.ceil(n_train / self.SHARD_ROWS)
                for i in tqdm(range(shards), desc="drawing SynthSAEBench samples", unit="shard", disable=shards < 2):
                    rows = min(self.SHARD_ROWS, n_train - i * self.SHARD_ROWS)
                    x = torch.cat([draw_sparse(self.generator, min(DRAW_BLOCK, rows - start), h.seed, i, start)[0]
                                   for start in range(0, rows, DRAW_BLOCK)])
                    save_shard(staging / f"train-{i:05d}.safetensors", "activations", x)
                atomic_write_json(staging / "manifest.json", {"format": SAMPLES_FORMAT, "model": self.fingerprint,
                                                              "seed": h.seed, "n_train": n_train, "n_test": h.n_test,
                                                              "train_shards": shards})

    def _held_out(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, indices, values)`` of the held-out samples, their true activations sparse (rows in order)."""
        if self._held_out_cache is None:
            self.prepare_data()
            stored = read_safetensors(self.samples_dir / "test.safetensors")
            self._held_out_cache = (stored["x"], stored["indices"].long(), stored["values"])
        return self._held_out_cache

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        rank, world = self._rank()
        if h.stream:
            if h.batch_size % world:
                raise ValueError(f"data.batch_size {h.batch_size} must divide evenly across {world} devices")
            dataset = StreamedSamples(self.generator, h.n_train // h.batch_size, h.batch_size // world, h.seed, rank)
        else:
            self.prepare_data()
            files = sorted(self.samples_dir.glob("train-*.safetensors"))
            dataset = ShardedActivations(files, h.batch_size, shuffle=True, shuffle_buffer=h.shuffle_buffer,
                                         seed=h.seed, rank=rank, world_size=world)
        return DataLoader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def test_dataloader(self) -> DataLoader:
        return DataLoader(HeldOutBatches(self, *self._rank()), batch_size=None)

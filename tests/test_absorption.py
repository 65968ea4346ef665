"""Feature absorption: SAEBench's first-letter task gives SAEBench's figures. A tiny Llama whose token embeddings
carry each word's first letter, and a top-1 SAE with a latent per letter and latents of their own for some words
(which absorb the letter's), are measured by sae_zoo and by SAEBench's own code, on the same words and seed."""

import random
import string

import pytest
import torch

from sae_zoo import Dictionary, SparseCoder
from sae_zoo.encoders import create_encoder
from sae_zoo.evaluation.absorption import (LETTERS, AbsorptionSettings, absorption, alpha_words, draw_words,
                                           letter_task, prompt_activations, word_position)
from sae_zoo.lm import load_language_model, resolve_hook

WORDS_PER_LETTER = 14


def write_letter_llama(folder, seed=0):
    """A 2-block Llama over a word-level vocabulary of pseudo-words, ``WORDS_PER_LETTER`` a letter: each word's
    embedding is its first letter's direction (dimensions 0-25) plus noise; every fifth pseudo-word has a direction
    of its own too (in dimensions 26-63), for an SAE latent to absorb it. Returns ``(path, those words)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = set()
    for letter in LETTERS:
        while sum(w[0] == letter for w in words) < WORDS_PER_LETTER:
            words.add(letter + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5))))
    vocab = ["<unk>", "<s>", "</s>", ":", "has", "the", "first", "letter", *string.ascii_uppercase, *sorted(words)]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    lm = LlamaForCausalLM(config)
    with torch.no_grad():
        embed = torch.randn(len(vocab), 64) * 0.2
        for i, token in enumerate(vocab):
            if token.isalpha():
                embed[i, LETTERS.index(token[0].lower())] += 8.0
        absorbed = sorted(words)[::5]
        for word in absorbed:
            own = torch.randn(38)
            embed[vocab.index(word), 26:] += 6.0 * own / own.norm()
        lm.model.embed_tokens.weight.copy_(embed)
    lm.save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder), absorbed


def absorbing_sae(lm, tokenizer, absorbed, seed=0):
    """A top-1 SAE: a latent per letter (its direction), one for each ``absorbed`` word (its embedding's direction,
    which wins over its letter's latent on that word and loses to it on the others), and 16 random ones."""
    generator = torch.Generator().manual_seed(seed)
    n = 26 + len(absorbed) + 16
    atoms = torch.randn(n, 64, generator=generator)
    atoms[:26] = torch.eye(64)[:26]
    embed = lm.model.embed_tokens.weight.detach()
    for j, word in enumerate(absorbed):
        atoms[26 + j] = embed[tokenizer.convert_tokens_to_ids(word)]
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    dictionary = Dictionary(n, 64)
    dictionary.set_atoms(atoms)
    encoder = create_encoder("topk", d_model=64, n_latents=n, k=1, subtract_decoder_bias=False)
    with torch.no_grad():
        encoder.linear.weight.copy_(atoms)
        encoder.linear.bias.zero_()
    return SparseCoder(encoder, dictionary).eval()


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("letters")
    path, absorbed = write_letter_llama(folder / "model")
    (folder / "absorbed.txt").write_text("\n".join(absorbed))
    lm, tokenizer = load_language_model(path)
    words = alpha_words(tokenizer)
    return lm, tokenizer, resolve_hook(lm, "resid_post.1"), words, absorbing_sae(lm, tokenizer, absorbed), folder


def ours(lm, tokenizer, hook, words, sae, s):
    position = word_position(tokenizer, s.prompt_template)
    task = letter_task(tokenizer, lambda p: prompt_activations(lm, tokenizer, hook, p, position, True), s, words=words)
    return task, absorption(task, sae.encode, sae.dictionary.atoms.detach(), s)


def test_words_prompts_and_positions_are_saebenchs(letters):
    lm, tokenizer, hook, words, sae, _ = letters
    assert len(words) == 26 * WORDS_PER_LETTER + 4 + 26  # the pseudo-words, has/the/first/letter, A-Z
    assert word_position(tokenizer, "{word} has the first letter:") == -6  # SAEBench's prompt_token_pos
    drawn = draw_words(words, 100, seed=0, floor=3)
    assert {w[0].lower() for w in drawn} == set(LETTERS) and 90 <= len(drawn) <= 130
    assert drawn == [w for w in words if w in set(drawn)]  # the vocabulary's order


def test_absorption_equals_saebenchs_own_implementation(letters, monkeypatch):
    """SAEBench's k-sparse probing and feature absorption experiments (its code, on the same LM converted to
    TransformerLens and the SAE exported to SAELens) against sae_zoo's: the same words, prompts, probes, letter
    latents and figures."""
    sae_bench = pytest.importorskip("sae_bench", reason="SAEBench is a test extra (pip install --no-deps sae-bench)")
    from sae_bench.evals.absorption import common, feature_absorption, k_sparse_probing
    from sae_bench.evals.absorption.main import _aggregate_results_df
    from sae_bench.evals.absorption.vocab import get_alpha_tokens
    from sae_lens import SAE

    from sae_zoo.hooked import hooked_llama
    from sae_zoo.hub import export_saelens

    lm, tokenizer, hook, words, sae, folder = letters
    assert sorted(get_alpha_tokens(tokenizer)) == sorted(words)
    # the same words in the same order (SAEBench's order is a hash map's, another in each process)
    for module in (common, feature_absorption):
        monkeypatch.setattr(module, "get_alpha_tokens", lambda _: list(words))
    s = AbsorptionSettings()
    task, result = ours(lm, tokenizer, hook, words, sae, s)
    figures = result.figures()

    hooked = hooked_llama(lm, tokenizer, model_name="letters")
    theirs_sae = SAE.load_from_disk(str(export_saelens(sae, folder / "saelens", hook_name="blocks.1.hook_resid_post")))
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    common_args = dict(model=hooked, sae=theirs_sae, layer=1, sae_name="letters", max_k_value=s.max_k,
                       prompt_template=s.prompt_template, prompt_token_pos=-6, device="cpu",
                       probes_dir=folder / "probes", force=True)
    metrics = k_sparse_probing.run_k_sparse_probing_experiment(
        **common_args, experiment_dir=folder / "k_sparse", f1_jump_threshold=s.f1_jump, verbose=False)
    raw = feature_absorption.run_feature_absortion_experiment(
        **common_args, experiment_dir=folder / "absorption", sparse_probing_experiment_dir=folder / "k_sparse",
        feature_split_f1_jump_threshold=s.f1_jump, batch_size=10)
    aggregated = _aggregate_results_df(raw).set_index("letter")
    metrics = metrics.set_index("letter")

    # the same probe on the same test words, and the same latents for each letter
    probe = common.load_probe("letters", 1, folder / "probes", torch.float32, "cpu")
    torch.testing.assert_close(probe.weights.detach(), task.probe_weight, atol=1e-4, rtol=1e-3)
    for letter in LETTERS:
        mine = result.letters[letter]
        assert mine["probe_f1"] == pytest.approx(metrics.loc[letter, "f1_probe"], abs=1e-6)
        assert mine["latents"] == list(metrics.loc[letter, "split_feats"])
        if letter in aggregated.index:
            row = aggregated.loc[letter]
            assert mine["words"] == row["num_probe_true_positives"]
            assert mine["fraction"] == pytest.approx(row["mean_absorption_fraction"], abs=1e-6)
            assert mine["full"] == pytest.approx(row["full_absorption_rate"], abs=1e-6)
        else:
            assert mine["words"] == 0
    counted = [letter for letter in aggregated.index if metrics.loc[letter, "f1_probe"] > s.min_probe_f1]
    assert figures["absorption_letters"] == len(counted) >= 20 and figures["absorption_gate_passed"]
    theirs = {key: aggregated.loc[counted, column].mean() for key, column in
              (("mean_absorption_fraction_score", "mean_absorption_fraction"),
               ("mean_full_absorption_score", "full_absorption_rate"))}
    # an SAE that absorbs: its own-word latents take the letter's place on those words
    assert 0.02 < figures["mean_full_absorption_score"] < 0.9
    for key, value in theirs.items():
        assert figures[key] == pytest.approx(value, abs=1e-6)
    assert sae_bench is not None


def test_the_letter_latents_and_absorption_are_found(letters):
    """Without SAEBench: each letter's latent is found (with enough probe steps: the sparse probe in batches of 32),
    and the fully absorbed words are exactly those the SAE has a latent of their own for."""
    lm, tokenizer, hook, words, sae, _ = letters
    absorbed = set(letters[-1].joinpath("absorbed.txt").read_text().split())
    task, result = ours(lm, tokenizer, hook, words, sae, AbsorptionSettings(sparse_batch_size=32))
    assert [r["latents"] for r in result.letters.values()] == [[i] for i in range(26)]
    for letter, r in result.letters.items():
        right = task.absorption_words[letter]
        assert r["words"] == len(right)
        assert r["full"] == pytest.approx(sum(w in absorbed for w in right) / max(len(right), 1))
    figures = result.figures()
    assert figures["absorption_gate_passed"] and figures["mean_num_split_features"] == 1
    assert 0.1 < figures["mean_full_absorption_score"] < 0.4


def test_sae_zoo_evaluate_measures_absorption_of_a_run_and_reuses_the_task(letters, tmp_path):
    """``sae-zoo evaluate RUN --evals absorption``: a top-k SAE trained on the letter Llama's residual stream; the
    LM's side (words, activations, ground-truth probe) is cached and read back the same."""
    import json

    from lm_fixtures import sae_recipe

    from sae_zoo.cli import main
    from sae_zoo.recipe import fit, recipe_from_content

    lm, tokenizer, hook, words, sae, folder = letters
    rng = random.Random(0)
    (tmp_path / "text").mkdir()
    for i in range(3):
        lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)]
        (tmp_path / "text" / f"part-{i}.txt").write_text("\n".join(lines) + "\n")
    recipe = sae_recipe(str(folder / "model"), str(tmp_path / "text" / "*.txt"), tmp_path, n_latents=64, k=4)
    run_dir = fit(recipe_from_content(recipe), progress=False)[0]
    assert main(["evaluate", str(run_dir), "--evals", "absorption", "--no-progress"]) == 0
    first = json.loads((run_dir / "evaluation.json").read_text())["figures"]["absorption"]
    assert first["absorption_probe_letters_passing"] >= 20 and first["absorption_gate_passed"] is True
    assert set(first["absorption_per_letter"]) == set(LETTERS)
    assert 0 <= first["mean_full_absorption_score"] <= 1 and first["mean_num_split_features"] >= 1
    report = (run_dir / "evaluation.md").read_text()
    assert "(SAEBench's gate needs 20) |" in report and "mean absorption fraction" in report
    cached = list((tmp_path / "cache").glob("absorption-*/task.pt"))
    assert len(cached) == 1
    assert main(["evaluate", str(run_dir), "--evals", "absorption", "--no-progress"]) == 0
    again = json.loads((run_dir / "evaluation.json").read_text())["figures"]["absorption"]
    assert again == first

    # an upgrade measures the SAE's encoder and each candidate at its L0 the same way, paired over the letters
    assert main(["upgrade", str(run_dir), "--out", str(tmp_path / "up"), "--candidates", "mp", "--ratios", "1",
                 "--no-probing", "--evals", "absorption", "--no-progress"]) == 0
    own = json.loads((tmp_path / "up" / "evals" / "source.json").read_text())["absorption"]
    assert own == first  # the same SAE, probe and words as sae-zoo evaluate's
    mp = json.loads(next((tmp_path / "up" / "evals").glob("mp*.json")).read_text())["absorption"]
    counted = [l for l, r in own["absorption_per_letter"].items() if r["probe_f1"] > 0.6 and r["words"] > 0]
    gain = sum(mp["absorption_per_letter"][l]["fraction"] - own["absorption_per_letter"][l]["fraction"]
               for l in counted) / len(counted)
    section = (tmp_path / "up" / "comparison.md").read_text().split("## Absorption and auto-interpretability")[1]
    assert f"{mp['mean_absorption_fraction_score']:.4f} ({gain:+.4f} ± " in section
    assert len(list((tmp_path / "cache").glob("absorption-*/task.pt"))) == 1  # the task was read back, not rebuilt


def test_a_suite_evaluates_each_run_and_compares_them(letters, tmp_path):
    """``sae-zoo fit SUITE --evals absorption``: every run evaluated into its folder, compared in evaluations.md;
    a suite on other data is refused before it trains."""
    import json

    import yaml
    from lm_fixtures import sae_recipe

    from sae_zoo.cli import main

    lm, tokenizer, hook, words, sae, folder = letters
    rng = random.Random(1)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "part.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12))
                                                          for _ in range(150)) + "\n")
    base = sae_recipe(str(folder / "model"), str(tmp_path / "text" / "*.txt"), tmp_path, n_latents=64, k=4)
    base.pop("run_dir")
    suite = {"base": base, "runs": [{"name": "k4", "recipe": {"encoder": {"name": "topk", "k": 4}}},
                                    {"name": "k2", "recipe": {"encoder": {"name": "topk", "k": 2}}}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    assert main(["fit", str(tmp_path / "suite.yaml"), f"run_dir={out}", "--evals", "absorption", "--no-progress"]) == 0
    table = (out / "evaluations.md").read_text()
    for name in ("k4", "k2"):
        figures = json.loads((out / name / "evaluation.json").read_text())["figures"]["absorption"]
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert f"{figures['mean_absorption_fraction_score']:.4f} ± {figures['mean_absorption_fraction_score_se']:.4f}" in line

    base["data"] = {"name": "synthetic", "d_model": 8, "n_latents": 16}
    (tmp_path / "synthetic.yaml").write_text(yaml.safe_dump({"base": base, "runs": suite["runs"]}))
    with pytest.raises(ValueError, match="do not train on a language model's activations"):
        from sae_zoo.suite import run_suite
        run_suite(tmp_path / "synthetic.yaml", evals=("absorption",), out_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_too_few_words_for_a_letter_is_refused(letters):
    lm, tokenizer, hook, words, sae, _ = letters
    few = [w for w in words if not w.startswith("q")] + [w for w in words if w.startswith("q")][:3]
    with pytest.raises(ValueError, match=r"too few words for the letter probe of .*q \(\d+ train, \d+ test\)"):
        letter_task(tokenizer, lambda p: torch.zeros(len(p), 64), AbsorptionSettings(), words=few)


def test_a_transcoder_is_refused():
    from types import SimpleNamespace

    from sae_zoo.evaluation.absorption import datamodule_task

    with pytest.raises(ValueError, match="absorption measures an SAE.*a transcoder writes another space"):
        datamodule_task(SimpleNamespace(paired=True), AbsorptionSettings())

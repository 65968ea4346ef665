"""SynthSAEBench's metrics (latents as feature detectors, uniqueness, shrinkage): streamed, and equal to the
benchmark's own definitions, written out here as SAELens's evaluator computes them."""

import pytest
import torch
import torch.nn.functional as F

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data import SyntheticSparseDataModule
from sae_zoo.evaluation import evaluate
from sae_zoo.metrics import FeatureUniqueness, LatentDetection, Shrinkage, functional


def reference_detection(codes, true_codes, atoms, true_atoms):
    """SAELens's ClassificationMetricsCalculator: per latent, TP/FP/FN/TN against its best-matching feature."""
    cos = (F.normalize(atoms, dim=-1) @ F.normalize(true_atoms, dim=-1).T).abs()
    match = cos.argmax(dim=1)
    fires, truth = codes != 0, true_codes[:, match] > 0
    tp, fp = (fires & truth).float().sum(0), (fires & ~truth).float().sum(0)
    fn, tn = (~fires & truth).float().sum(0), (~fires & ~truth).float().sum(0)
    precision = torch.where(tp + fp > 0, tp / (tp + fp), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    return {"precision": precision.mean(), "recall": recall.mean(), "f1": f1.mean(),
            "accuracy": ((tp + tn) / (tp + fp + fn + tn)).mean()}


def example(seed=0):
    g = torch.Generator().manual_seed(seed)
    true_atoms, atoms = torch.randn(24, 10, generator=g), torch.randn(16, 10, generator=g)
    atoms[:8] = true_atoms[:8] + 0.1 * torch.randn(8, 10, generator=g)  # half the latents near a feature
    true_codes = torch.rand(300, 24, generator=g) * (torch.rand(300, 24, generator=g) < 0.2)
    codes = torch.relu(torch.randn(300, 16, generator=g)) * (torch.rand(300, 16, generator=g) < 0.3)
    codes[:, :8] = true_codes[:, :8] * (torch.rand(300, 8, generator=g) < 0.9)  # mostly right detectors
    return codes, true_codes, atoms, true_atoms


def test_latent_detection_is_synthsaebenchs_and_streams():
    codes, true_codes, atoms, true_atoms = example()
    expected = reference_detection(codes, true_codes, atoms, true_atoms)
    one_shot = functional.latent_detection(codes, true_codes, atoms, true_atoms)
    metric = LatentDetection(16)
    for part in range(3):
        rows = slice(100 * part, 100 * (part + 1))
        metric.update(codes[rows], true_codes[rows], atoms, true_atoms)
    streamed = metric.compute()
    for key in ("precision", "recall", "f1", "accuracy"):
        assert float(one_shot[key]) == pytest.approx(float(expected[key]), abs=1e-6)
        assert float(streamed[key]) == pytest.approx(float(expected[key]), abs=1e-6)
    assert 0.3 < float(expected["f1"]) < 0.9
    metric.reset()
    assert int(metric.matches[0]) == -1  # matched again after a reset: the dictionary may have moved


def test_a_tiny_code_that_is_not_zero_fires():
    codes, true_codes, atoms, true_atoms = example()
    faked = codes + 1e-12 * (codes == 0)  # "zero" to the eye, but every latent fires on every sample
    assert float(functional.latent_detection(faked, true_codes, atoms, true_atoms)["precision"]) < \
        float(functional.latent_detection(codes, true_codes, atoms, true_atoms)["precision"])
    assert float(functional.l0(faked)) == 16


def test_uniqueness_and_shrinkage():
    codes, true_codes, atoms, true_atoms = example()
    cos = (F.normalize(atoms, dim=-1) @ F.normalize(true_atoms, dim=-1).T).abs()
    assert float(functional.feature_uniqueness(atoms, true_atoms)) == pytest.approx(
        cos.argmax(1).unique().numel() / 16)
    twins = torch.cat([atoms[:8], atoms[:8]])  # every feature tracked twice
    assert float(functional.feature_uniqueness(twins, true_atoms)) == pytest.approx(
        functional.feature_uniqueness(atoms[:8], true_atoms).item() / 2)
    uniqueness = FeatureUniqueness()
    uniqueness.update(atoms, true_atoms)
    assert float(uniqueness.compute()) == pytest.approx(float(functional.feature_uniqueness(atoms, true_atoms)))

    x = torch.randn(50, 10)
    x[3] = 0  # no direction: left out, as SAELens leaves it out
    x_hat = 0.5 * x
    assert float(functional.shrinkage(x_hat, x)) == pytest.approx(0.5)
    metric = Shrinkage()
    metric.update(x_hat[:20], x[:20])
    metric.update(x_hat[20:], x[20:])
    assert float(metric.compute()) == pytest.approx(0.5) and float(metric.n) == 49


def test_codes_of_the_wrong_width_are_named():
    codes, true_codes, atoms, true_atoms = example()
    with pytest.raises(ValueError, match="codes have 15 latents, the matches 16"):
        functional.latent_detection(codes[:, :15], true_codes, atoms, true_atoms)
    with pytest.raises(ValueError, match=r"LatentDetection expects 16 latents.*atoms \(15, 10\)"):
        LatentDetection(16).update(codes, true_codes, atoms[:15], true_atoms)
    with pytest.raises(ValueError, match=r"LatentDetection expects 16 latents.*got codes \(\d+, 15\)"):
        LatentDetection(16).update(codes[:, :15], true_codes, atoms, true_atoms)
    with pytest.raises(ValueError, match=r"true codes \(n, \d+\).*got true codes \(\d+, 7\)"):
        LatentDetection(16).update(codes, true_codes[:, :7], atoms, true_atoms)


def test_every_evaluation_with_the_truth_reports_them():
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=16, d_model=8, n_train=64, n_test=256)
    model = SparseCoder(create_encoder("topk", d_model=8, n_latents=16, k=3), Dictionary.from_tensor(dm.dictionary),
                        true_dictionary=dm.dictionary)
    metrics = evaluate(model, dm)
    with torch.no_grad():
        codes = model.encode(dm.test_x)
    expected = reference_detection(codes, dm.test_codes, dm.dictionary, dm.dictionary)
    assert metrics["latent_f1"] == pytest.approx(float(expected["f1"]), abs=1e-6)
    assert metrics["uniqueness"] == 1.0  # the true dictionary: every latent matches its own feature
    assert metrics["shrinkage"] == pytest.approx(float(functional.shrinkage(model(dm.test_x).x_hat, dm.test_x)),
                                                 rel=1e-6)


def test_decoder_mcc_over_the_true_atoms_or_over_the_matches():
    """Ours counts a true atom left unmatched as 0; SynthSAEBench's (SAELens's mean_correlation_coefficient)
    averages over the matched pairs, which differs when the dictionary is narrower than the truth."""
    codes, true_codes, atoms, true_atoms = example()
    cos = (F.normalize(atoms, dim=-1) @ F.normalize(true_atoms, dim=-1).T).abs()
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(1 - cos.numpy())
    matched = float(cos[rows, cols].mean())
    assert float(functional.dictionary_mcc(atoms, true_atoms, over="matches")) == pytest.approx(matched)
    assert float(functional.dictionary_mcc(atoms, true_atoms)) == pytest.approx(matched * 16 / 24)
    with pytest.raises(ValueError, match="over must be 'true' or 'matches'"):
        functional.dictionary_mcc(atoms, true_atoms, over="latents")

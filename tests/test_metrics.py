"""Each metric against a plain numpy/scipy computation, one-shot and streamed over batches."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import pearsonr

from sae_zoo.metrics import (MCC, L0, L1, DeadLatents, DictionaryMCC, FractionOfVarianceExplained,
                             FractionOfVarianceUnexplained, functional)


def reference_mcc(true, pred):
    """The authors' definition: |Pearson r| per pair (0 where a side has variance < 1e-12),
    Hungarian matching, mean over the true latents."""
    corr = np.zeros((true.shape[1], pred.shape[1]))
    for i in range(true.shape[1]):
        for j in range(pred.shape[1]):
            if np.var(true[:, i]) >= 1e-12 and np.var(pred[:, j]) >= 1e-12:
                corr[i, j] = abs(pearsonr(true[:, i], pred[:, j])[0])
    rows, cols = linear_sum_assignment(-corr)
    return corr[rows, cols].sum() / true.shape[1]


def sparse_codes(n, width, seed, dead=()):
    g = np.random.default_rng(seed)
    codes = np.abs(g.normal(size=(n, width))) * (g.random((n, width)) < 0.3)
    codes[:, list(dead)] = 0
    return codes


def streamed(metric, batches):
    for args in batches:
        metric.update(*[torch.as_tensor(a) for a in args])
    return metric.compute().item()


@pytest.mark.parametrize("n_true, n_pred", [(10, 10), (10, 14), (10, 6)])
def test_mcc_matches_scipy_one_shot_and_streamed(n_true, n_pred):
    true = sparse_codes(300, n_true, 0, dead=[3])
    pred = np.abs(true[:, :min(n_true, n_pred)] @ np.random.default_rng(1).normal(size=(min(n_true, n_pred), n_pred)))
    pred += sparse_codes(300, n_pred, 2, dead=[1])
    pred[:, 1] = 0.0
    expected = reference_mcc(true, pred)
    assert 0.05 < expected < 0.99
    one_shot = streamed(MCC(n_pred, n_true), [(pred, true)])
    chunks = [(pred[i:i + 37], true[i:i + 37]) for i in range(0, 300, 37)]
    in_batches = streamed(MCC(n_pred, n_true), chunks)
    assert one_shot == pytest.approx(expected, abs=1e-9)
    assert in_batches == pytest.approx(expected, abs=1e-9)
    assert functional.mcc(torch.as_tensor(pred), torch.as_tensor(true)).item() == pytest.approx(expected, abs=1e-9)


def test_mcc_is_one_for_permuted_and_rescaled_codes():
    true = sparse_codes(200, 8, 3)
    pred = true[:, ::-1] * np.arange(1, 9)
    assert streamed(MCC(8), [(pred, true)]) == pytest.approx(1.0)


def test_mcc_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"codes \(n, 4\) and true codes \(n, 4\)"):
        MCC(4).update(torch.rand(5, 3), torch.rand(5, 4))


def test_dictionary_mcc_matches_numpy():
    g = np.random.default_rng(4)
    true = g.normal(size=(9, 5))
    learned = g.normal(size=(12, 5))
    cos = np.abs((true / np.linalg.norm(true, axis=1, keepdims=True)) @
                 (learned / np.linalg.norm(learned, axis=1, keepdims=True)).T)
    rows, cols = linear_sum_assignment(-cos)
    expected = cos[rows, cols].mean()
    assert streamed(DictionaryMCC(12, 9), [(learned, true)]) == pytest.approx(expected, abs=1e-12)
    assert functional.dictionary_mcc(torch.as_tensor(learned), torch.as_tensor(true)).item() == pytest.approx(expected)
    # snapshots average: the same dictionary twice scores the same
    assert streamed(DictionaryMCC(12, 9), [(learned, true)] * 2) == pytest.approx(expected, abs=1e-12)


def test_fvu_and_explained_variance_match_numpy():
    g = np.random.default_rng(5)
    x = g.normal(size=(400, 6)) * np.arange(1, 7) + 3.0
    x_hat = x + 0.3 * g.normal(size=x.shape)
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    chunks = [(x_hat[i:i + 64], x[i:i + 64]) for i in range(0, 400, 64)]
    assert streamed(FractionOfVarianceUnexplained(6), [(x_hat, x)]) == pytest.approx(expected, rel=1e-10)
    assert streamed(FractionOfVarianceUnexplained(6), chunks) == pytest.approx(expected, rel=1e-10)
    assert streamed(FractionOfVarianceExplained(6), chunks) == pytest.approx(1 - expected, rel=1e-10)
    assert functional.fraction_of_variance_unexplained(torch.as_tensor(x_hat), torch.as_tensor(x)).item() == \
        pytest.approx(expected, rel=1e-10)


def test_sparsity_metrics_match_numpy():
    codes = sparse_codes(250, 12, 6, dead=[0, 7])
    chunks = [(codes[i:i + 40],) for i in range(0, 250, 40)]
    expected_l0 = (codes != 0).sum(1).mean()
    expected_l1 = np.abs(codes).sum(1).mean()
    expected_dead = ((codes != 0).sum(0) == 0).mean()
    assert expected_dead == pytest.approx(2 / 12)
    for batches in ([(codes,)], chunks):
        assert streamed(L0(), batches) == pytest.approx(expected_l0)
        assert streamed(L1(), batches) == pytest.approx(expected_l1)
        assert streamed(DeadLatents(12), batches) == pytest.approx(expected_dead)
    t = torch.as_tensor(codes)
    assert functional.l0(t).item() == pytest.approx(expected_l0)
    assert functional.l1(t).item() == pytest.approx(expected_l1)
    assert functional.dead_latents(t).item() == pytest.approx(expected_dead)

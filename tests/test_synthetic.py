import numpy as np
import pytest
import torch

from sae_zoo.data import SyntheticSparseDataModule, generate_sparse_data


def authors_generate_data(N, M, K, num_data, seed):
    """The authors' generator (experiments/utils.py), restated: global NumPy and torch seeds."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    S = []
    for _ in range(num_data):
        s = np.abs(np.random.normal(0, 1, N))
        mask = np.zeros(N)
        mask[np.random.choice(N, K, replace=False)] = 1
        S.append(s * mask)
    S = np.array(S)
    D = torch.randn(N, M, dtype=torch.float32)
    D /= torch.linalg.norm(D, dim=1, keepdim=True)
    return torch.tensor(S, dtype=torch.float32), torch.tensor(S, dtype=torch.float32) @ D, D


def test_generator_reproduces_the_authors_data_bit_for_bit():
    codes, x, dictionary = generate_sparse_data(300, 16, 8, 3, seed=20240625)
    ref_codes, ref_x, ref_dictionary = authors_generate_data(16, 8, 3, 300, 20240625)
    assert torch.equal(codes, ref_codes) and torch.equal(dictionary, ref_dictionary) and torch.equal(x, ref_x)


def test_codes_are_k_sparse_half_normal_and_atoms_unit_norm():
    codes, x, dictionary = generate_sparse_data(2000, 20, 6, 4, seed=1)
    assert ((codes != 0).sum(1) == 4).all() and (codes >= 0).all()
    torch.testing.assert_close(dictionary.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(x, codes @ dictionary)
    active = codes[codes != 0]
    assert active.mean().item() == pytest.approx(np.sqrt(2 / np.pi), abs=0.03)  # mean of |N(0,1)|
    assert (codes != 0).float().mean(0).std().item() < 0.03  # supports uniform over latents


def test_data_seed_is_kept_apart_from_the_global_rng():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = SyntheticSparseDataModule(seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(123)
    b = SyntheticSparseDataModule(seed=5)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.dictionary, b.dictionary)
    assert not torch.equal(SyntheticSparseDataModule(seed=6).train_x, a.train_x)


def test_split_is_one_draw_train_first():
    dm = SyntheticSparseDataModule(n_train=100, n_test=50, seed=3)
    codes, x, _ = generate_sparse_data(150, 16, 8, 3, seed=3)
    assert torch.equal(dm.train_codes, codes[:100]) and torch.equal(dm.test_x, x[100:])


def test_full_batch_and_minibatch_loaders():
    dm = SyntheticSparseDataModule(n_train=100, n_test=40, steps_per_epoch=7)
    batches = list(dm.train_dataloader())
    assert len(batches) == 7 and torch.equal(batches[0][0], dm.train_x)
    dm = SyntheticSparseDataModule(n_train=100, n_test=40, batch_size=32)
    assert [len(b[0]) for b in dm.train_dataloader()] == [32, 32, 32, 4]
    assert sum(len(b[0]) for b in dm.test_dataloader()) == 40


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k=17"):
        generate_sparse_data(10, 16, 8, 17)

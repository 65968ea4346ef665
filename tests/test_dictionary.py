import pytest
import torch

from sae_zoo import Dictionary


def test_atoms_start_at_unit_norm():
    d = Dictionary(20, 5)
    torch.testing.assert_close(d.weight.norm(dim=1), torch.ones(20))
    assert d.trainable and d.weight.requires_grad


def test_from_tensor_renormalises_and_freezes():
    atoms = torch.randn(7, 3) * 5
    d = Dictionary.from_tensor(atoms)
    assert not d.trainable
    torch.testing.assert_close(d.weight, atoms / atoms.norm(dim=1, keepdim=True))


def test_decode_is_codes_times_atoms_plus_bias():
    d = Dictionary.from_tensor(torch.randn(4, 3), bias=torch.tensor([1.0, -2.0, 0.5]))
    codes = torch.rand(10, 4)
    torch.testing.assert_close(d.decode(codes), codes @ d.weight + torch.tensor([1.0, -2.0, 0.5]))


def test_normalize_after_an_update():
    d = Dictionary(6, 4)
    with torch.no_grad():
        d.weight.mul_(torch.arange(1, 7).float()[:, None])
    d.normalize_()
    torch.testing.assert_close(d.weight.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("bad, match", [(torch.randn(5, 3), r"\(5, 3\).*\(4, 3\)"), (torch.zeros(4, 3), "zero norm")])
def test_set_atoms_rejects_bad_tensors(bad, match):
    with pytest.raises(ValueError, match=match):
        Dictionary(4, 3).set_atoms(bad)


def test_decode_rejects_wrong_width():
    with pytest.raises(ValueError, match="5 latents, dictionary has 4"):
        Dictionary(4, 3).decode(torch.rand(2, 5))


def test_kept_atom_norms_decode_like_the_rows_and_survive_save_and_load(tmp_path):
    from sae_zoo import SparseCoder, create_encoder

    rows = torch.randn(7, 5) * torch.linspace(0.2, 3.0, 7)[:, None]
    dictionary = Dictionary.from_tensor(rows, bias=torch.randn(5), keep_norms=True)
    torch.testing.assert_close(dictionary.weight.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(dictionary.atoms, rows)
    codes = torch.relu(torch.randn(4, 7))
    torch.testing.assert_close(dictionary.decode(codes), codes @ rows + dictionary.bias)
    values, indices = codes.topk(3, dim=-1)
    torch.testing.assert_close(dictionary.decode_sparse(values, indices),
                               torch.zeros_like(codes).scatter(-1, indices, values) @ rows + dictionary.bias)
    assert dictionary.config()["atom_norms"] is True
    model = SparseCoder(create_encoder("linear", d_model=5, n_latents=7), dictionary)
    model.save_pretrained(tmp_path / "m")
    reloaded = SparseCoder.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(reloaded.dictionary.atoms, rows)
    x = torch.randn(3, 5)
    torch.testing.assert_close(reloaded(x).x_hat, model(x).x_hat)

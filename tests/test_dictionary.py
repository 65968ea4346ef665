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


def test_learned_atom_norms_train_beside_unit_directions_and_reload_exactly(tmp_path):
    from sae_zoo import SparseCoder, create_encoder

    dictionary = Dictionary(7, 5, bias=True, atom_norms="learned")
    assert dictionary.learns_norms and isinstance(dictionary.atom_norms, torch.nn.Parameter)
    torch.testing.assert_close(dictionary.atom_norms.detach(), torch.ones(7))
    assert dictionary.config()["atom_norms"] == "learned"
    with torch.no_grad():
        dictionary.atom_norms.copy_(torch.linspace(0.5, 2.0, 7))
        dictionary.weight.mul_(3.0)
    dictionary.normalize_()  # the directions go back to unit norm, the norms stay
    torch.testing.assert_close(dictionary.directions.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(dictionary.atoms.norm(dim=1), torch.linspace(0.5, 2.0, 7))
    model = SparseCoder(create_encoder("topk", d_model=5, n_latents=7, k=2), dictionary)
    model.save_pretrained(tmp_path / "m")
    reloaded = SparseCoder.from_pretrained(tmp_path / "m")
    assert reloaded.dictionary.learns_norms
    x = torch.randn(4, 5)
    torch.testing.assert_close(reloaded(x).x_hat, model(x).x_hat)
    # frozen later (a head trained on this decoder): the norms are then fixed, and say so in the config
    dictionary.requires_grad_(False)
    assert not dictionary.learns_norms and dictionary.config()["atom_norms"] is True


def test_learned_norms_on_a_frozen_dictionary_are_refused():
    with pytest.raises(ValueError, match="frozen.*no norms to learn"):
        Dictionary(4, 3, trainable=False, atom_norms="learned")
    with pytest.raises(ValueError, match="frozen.*no norms to learn"):
        Dictionary.from_tensor(torch.randn(4, 3), keep_norms="learned")


def test_learned_norms_step_faster_than_the_model_learning_rate_and_weigh_the_l1_penalty():
    import math

    from sae_zoo import SparseCoder, create_encoder
    from sae_zoo.model import l1_penalty

    dictionary = Dictionary(6, 16, atom_norms="learned")
    model = SparseCoder(create_encoder("linear", d_model=16, n_latents=6), dictionary, lr=1e-3)
    optimizer = model.configure_optimizers()
    (group,) = [g for g in optimizer.param_groups if any(p is dictionary.atom_norms for p in g["params"])]
    assert group["lr"] == pytest.approx(1e-3 * math.sqrt(16)) and len(group["params"]) == 1
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups if g is not group)
    with torch.no_grad():
        dictionary.atom_norms.copy_(torch.arange(1.0, 7.0))
    codes = torch.rand(3, 6)
    torch.testing.assert_close(l1_penalty(codes, dictionary), (codes * torch.arange(1.0, 7.0)).mean())
    values, indices = codes.topk(2, dim=-1)
    from sae_zoo.encoders import SparseCodes
    torch.testing.assert_close(l1_penalty(SparseCodes(values, indices), dictionary),
                               (values * torch.arange(1.0, 7.0)[indices]).sum() / codes.numel())
    # unit atoms: the plain mean |code|
    torch.testing.assert_close(l1_penalty(-codes, Dictionary(6, 16)), codes.mean())


def test_learned_norms_get_the_same_gradient_every_time_on_several_threads():
    """The learned norms' gradient is summed in a fixed order (index_select's backward): with advanced indexing,
    several CPU threads summed it in an order that varied, and training runs were not bitwise reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        dictionary = Dictionary(512, 16, atom_norms="learned")
        with torch.no_grad():
            dictionary.atom_norms.uniform_(0.5, 2)
        indices, values = torch.randint(0, 512, (4096, 20)), torch.randn(4096, 20)
        grads = []
        for _ in range(10):
            dictionary.zero_grad()
            dictionary.decode_sparse(values, indices).square().sum().backward()
            grads.append(dictionary.atom_norms.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads)

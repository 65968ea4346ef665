"""Every registered head, built from its ``example_kwargs``: the checks a head gets without a line of its
own. The list comes from the registry, so a new head is covered once its module is imported."""

import pytest
import torch

from sae_zoo import Dictionary, SparseCoder, create_encoder, flops, list_encoders
from sae_zoo.data import SyntheticSparseDataModule, generate_sparse_data
from sae_zoo.encoders import get_encoder_class

D_MODEL, N_LATENTS = 6, 12
HEADS = list_encoders()


def example(name: str):
    torch.manual_seed(0)
    return create_encoder(name, d_model=D_MODEL, n_latents=N_LATENTS, **get_encoder_class(name).example_kwargs)


@pytest.fixture(scope="module")
def data():
    _, x, atoms = generate_sparse_data(16, N_LATENTS, D_MODEL, 3, seed=3)
    return x, Dictionary.from_tensor(atoms)


@pytest.mark.parametrize("name", HEADS)
def test_round_trips_through_save_and_load(tmp_path, name, data):
    x, dictionary = data
    model = SparseCoder(example(name), dictionary).eval()
    with torch.no_grad():
        model.encode(x)  # heads that set themselves up on first use (LISTA) have done so
        model.save_pretrained(tmp_path / name)
        assert torch.equal(SparseCoder.from_pretrained(tmp_path / name).encode(x), model.encode(x))
    clone = create_encoder(**model.encoder.config())
    assert clone.config() == model.encoder.config()


@pytest.mark.parametrize("name", HEADS)
def test_counts_its_flops(name):
    head = example(name)
    matmul, elementwise = head.encode_flops()
    assert matmul >= 0 and elementwise >= 0
    assert flops.inference_flops(head) >= flops.decode_flops(D_MODEL, N_LATENTS) + matmul
    assert flops.training_step_flops(head, learn_dictionary=True) > 0


@pytest.mark.parametrize("name", HEADS)
def test_trains_on_the_papers_data(name):
    """A head with weights lowers the paper's loss in 100 steps (known dictionary, or free codes for sparse coding)."""
    head = example(name)
    if head.trained_part() is None or not any(p.requires_grad for p in head.trained_part().parameters()):
        pytest.skip(f"{name} has nothing to train on a frozen dictionary")
    n_train = head.example_kwargs.get("n_train", 128)
    dm = SyntheticSparseDataModule(n_latents=N_LATENTS, d_model=D_MODEL, n_train=n_train, n_test=32)
    model = SparseCoder(head, Dictionary.from_tensor(dm.dictionary), lr=5e-2)
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(100):
        loss = model.training_losses((dm.train_x, dm.train_codes))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("name", HEADS)
def test_agrees_on_bad_and_odd_inputs(name, data):
    x, dictionary = data
    head = example(name).eval()  # in eval mode sparse_coding encodes new inputs by ITO, like the iterative heads
    assert head(x[:0], dictionary).shape == (0, N_LATENTS)  # an empty batch: empty codes
    torch.testing.assert_close(head(x.double(), dictionary), head(x, dictionary))  # float64 is cast
    with pytest.raises(TypeError, match="floating-point inputs, got torch.int64"):
        head(x.long(), dictionary)
    with pytest.raises(TypeError, match=f"{name} head expects a torch.Tensor, got numpy.ndarray; convert with "
                                        r"torch.as_tensor\(x, dtype=torch.float32\)"):
        head(x.numpy(), dictionary)
    bad = x.clone()
    bad[3, 2] = float("nan")
    bad[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 NaN or infinite input value\(s\)"):
        head(bad, dictionary)
    with pytest.raises(ValueError, match=f"width {D_MODEL}"):
        head(x[:, :-1], dictionary)


def test_a_head_must_implement_forward_and_encode_flops():
    from sae_zoo.encoders import EncoderHead

    class NoFlops(EncoderHead):
        def forward(self, x, dictionary=None):
            return x

    with pytest.raises(TypeError, match="abstract method.*encode_flops"):
        NoFlops(d_model=2, n_latents=3)


@pytest.mark.parametrize("name", HEADS)
def test_a_head_with_firing_thresholds_starts_and_ends_on_a_target_l0(name):
    """start_at_l0 puts the codes at the head's start (a multiple of the target), calibrate_l0 on the target;
    a head without thresholds (top-k, iterative solvers) says so and is left alone."""
    from sae_zoo.sparsity import calibrate_l0, start_at_l0

    head = example(name).eval()
    _, x, atoms = generate_sparse_data(4096, N_LATENTS, D_MODEL, 3, seed=4)
    dictionary = Dictionary.from_tensor(atoms, bias=torch.full((D_MODEL,), 0.1))
    if head.firing_margins(x, dictionary) is None:
        before = {k: v.clone() for k, v in head.state_dict().items()}
        assert not start_at_l0(head, x, dictionary, 3.0) and calibrate_l0(head, x, dictionary, 3.0) is None
        assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
        return
    with torch.no_grad():
        assert start_at_l0(head, x, dictionary, 2.0)
        started = float((head(x, dictionary) != 0).sum(-1).float().mean())
        assert started == pytest.approx(2.0 * head.l0_start_factor, rel=0.02)
        report = calibrate_l0(head, x, dictionary, 3.0)
        ended = float((head(x, dictionary) != 0).sum(-1).float().mean())
    assert ended == pytest.approx(3.0, rel=0.02) and report["l0_after"] == pytest.approx(ended, rel=1e-6)
    assert report["l0_before"] == pytest.approx(started, rel=1e-6)


@pytest.mark.parametrize("name", HEADS)
def test_encodes_for_a_transcoder_or_says_why_not(name):
    """An amortised head encodes for a transcoder (a dictionary that writes another width, a skip term); a head
    that reconstructs its input through the dictionary is refused, with the reason."""
    head = example(name)
    dictionary = Dictionary(N_LATENTS, 4, bias=True)
    if head.reads_dictionary:
        with pytest.raises(ValueError, match=rf"encoder '{name}' cannot encode for a transcoder: it finds its codes"):
            SparseCoder(head, dictionary, transcoder=True)
        return
    model = SparseCoder(head, dictionary, transcoder=True, skip_connection=True)
    x, y = torch.randn(32, D_MODEL), torch.randn(32, 4)
    from sae_zoo.data import Pair

    losses = model.training_losses(Pair(x, y))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.skip.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert model.eval()(x).x_hat.shape == (32, 4)

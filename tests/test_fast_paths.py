"""Each optimised path gives the plain path's results: sparse top-k decoding, mixed precision
(autocast, ``trainer.precision``), ``torch.compile`` (``compile: true``)."""

import pytest
import torch
import torch.nn.functional as F

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.encoders import SparseCodes
from sae_zoo.recipe import RecipeError, fit, load_recipe


def topk_model(sparse_decode: bool, seed: int = 0) -> SparseCoder:
    torch.manual_seed(seed)
    head = create_encoder("topk", d_model=24, n_latents=96, k=6, subtract_decoder_bias=True)
    dictionary = Dictionary(96, 24, bias=True)
    with torch.no_grad():
        dictionary.bias.normal_()
    return SparseCoder(head, dictionary, l1_coeff=0.05, sparse_decode=sparse_decode)


def test_sparse_topk_decode_equals_the_dense_decode_forward_and_backward():
    x = torch.randn(2, 50, 24, generator=torch.Generator().manual_seed(1))  # leading dims are kept
    losses, grads = [], []
    for sparse in (True, False):
        model = topk_model(sparse)
        out = model.training_losses(x)
        out["loss"].backward()
        losses.append({k: v.item() for k, v in out.items()})
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
    assert grads[0]["dictionary.weight"].abs().sum() > 0


def test_heads_without_a_sparse_form_use_the_dense_path():
    model = SparseCoder(create_encoder("mlp", d_model=8, n_latents=16, hidden=8), Dictionary(16, 8))
    x = torch.randn(32, 8)
    x_hat, codes = model(x)
    expected = torch.nn.functional.mse_loss(x_hat, x) + 0.01 * codes.abs().mean()
    assert model.training_losses(x)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_bf16_autocast_stays_close_to_float32():
    x = torch.randn(256, 24, generator=torch.Generator().manual_seed(2))
    plain = topk_model(True).training_losses(x)["loss"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = topk_model(True).training_losses(x)["loss"].item()
    assert mixed == pytest.approx(plain, rel=2e-2)


def short_run(tmp_path, name, *overrides):
    cfg = load_recipe("recipes/synthetic/known_dictionary.yaml",
                      ["encoder.name=topk", "encoder.k=3", "trainer.max_steps=40", "data.steps_per_epoch=40",
                       f"run_dir={tmp_path / name}", *overrides])
    return fit(cfg, progress=False)[1]["test"]


def test_mixed_precision_training_tracks_float32_training(tmp_path):
    plain = short_run(tmp_path, "fp32")
    mixed = short_run(tmp_path, "bf16", "trainer.precision=bf16-mixed")
    assert mixed["fvu"] == pytest.approx(plain["fvu"], rel=0.05)
    assert mixed["mse"] != plain["mse"]  # it did run in lower precision


def test_compiled_training_equals_eager_training(tmp_path):
    eager = short_run(tmp_path, "eager")
    compiled = short_run(tmp_path, "compiled", "compile=true")
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-7)


def test_matmul_precision_is_checked_and_restored(tmp_path):
    with pytest.raises(RecipeError, match="matmul_precision: 'tf32' is not one of highest, high, medium"):
        load_recipe("recipes/synthetic/known_dictionary.yaml", ["matmul_precision=tf32"])
    before = torch.get_float32_matmul_precision()
    short_run(tmp_path, "high", "matmul_precision=high")
    assert torch.get_float32_matmul_precision() == before


def test_the_sparse_topk_encoder_backward_equals_plain_autograd():
    from sae_zoo.encoders.topk import SparseTopKLinear

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 24, generator=g, requires_grad=True)
    weight = torch.randn(96, 24, generator=g, requires_grad=True)
    bias = torch.randn(96, generator=g, requires_grad=True)
    upstream = torch.randn(3, 40, 6, generator=g)
    values, indices = SparseTopKLinear.apply(x, weight, bias, 6)
    (values * upstream).sum().backward()
    fast = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    plain_values, plain_indices = torch.nn.functional.linear(x, weight, bias).topk(6, dim=-1, sorted=False)
    assert torch.equal(indices, plain_indices)
    (torch.relu(plain_values) * upstream).sum().backward()
    for a, t in zip(fast, (x, weight, bias)):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("widths", [None, [8, 40, 96]])
@pytest.mark.parametrize("norms", [False, "learned"])
def test_sparse_batchtopk_and_matryoshka_equal_the_dense_path_forward_and_backward(widths, norms):
    """BatchTopK's batch-wide top-k, found from each sample's largest pre-activations and decoded from its
    kept atoms alone (Matryoshka prefixes from one gather), gives the dense path's losses, gradients and
    running threshold, AuxK included."""
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1)) * 3
    x[:4] *= 20  # a few samples keep far more than 4k latents: the candidates must widen to stay exact
    results = []
    for sparse in (True, False):
        torch.manual_seed(0)
        dictionary = Dictionary(96, 24, bias=True, atom_norms=norms)
        with torch.no_grad():
            dictionary.bias.normal_()
            if norms:
                dictionary.atom_norms.uniform_(0.5, 2.0)
        model = SparseCoder(create_encoder("batchtopk", d_model=24, n_latents=96, k=3, subtract_decoder_bias=True),
                            dictionary, matryoshka_widths=widths, auxk_coeff=0.5, dead_tokens=1, sparse_decode=sparse)
        out = model.training_losses(x)
        out["loss"].backward()
        results.append(({k: v.item() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()},
                        model.encoder.threshold.item()))
    (sparse_losses, sparse_grads, sparse_threshold), (dense_losses, dense_grads, dense_threshold) = results
    assert sparse_losses == pytest.approx(dense_losses, rel=1e-5) and dense_losses["l0"] == 3.0
    assert sparse_threshold == dense_threshold
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], atol=1e-5, rtol=1e-5)


def test_batch_topk_keeps_exactly_the_batch_wide_top_values():
    from sae_zoo.encoders.topk import batch_topk

    pre = torch.randn(32, 50, generator=torch.Generator().manual_seed(2))
    pre[0] += 5  # one sample holds most of the batch's largest values
    values, indices = batch_topk(pre, 2)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    kept = pre.relu().reshape(-1).topk(64)
    expected = torch.zeros(pre.numel()).scatter(0, kept.indices, kept.values).reshape(pre.shape)
    torch.testing.assert_close(dense, expected)
    assert (dense[0] > 0).sum() > 8  # more than the first candidates (4k) of that sample


@pytest.mark.parametrize("with_bias", [True, False])
def test_centred_linear_gives_the_plain_values_and_gradients(with_bias):
    """The decoder bias's gradient through a zero bias term equals autograd of ``x - b_dec`` (which forms
    the dense input gradient), and so do the values and the other gradients."""
    torch.manual_seed(0)
    head = create_encoder("linear", d_model=6, n_latents=10, subtract_decoder_bias=True, bias=with_bias)
    dictionary = Dictionary(10, 6, bias=True)
    with torch.no_grad():
        dictionary.bias.normal_()
    x, grad = torch.randn(5, 6), torch.randn(5, 10)
    params = [head.linear.weight, dictionary.bias] + ([head.linear.bias] if with_bias else [])

    fast = head.centred_linear(x, dictionary, head.linear.weight, head.linear.bias)
    fast_grads = torch.autograd.grad(fast, params, grad)
    plain = F.linear(x - dictionary.bias, head.linear.weight, head.linear.bias)
    plain_grads = torch.autograd.grad(plain, params, grad)
    torch.testing.assert_close(fast, plain)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b)
    assert fast_grads[1].abs().sum() > 0


@pytest.mark.parametrize("norms", [False, "learned"])
def test_gated_training_codes_give_the_plain_formulas_values_and_gradients(norms):
    """The gated head's fused training path (GatedFunction, GatePathLosses) against the paper's formulas
    written with plain autograd: codes, sparsity, auxiliary loss, and every parameter's gradient."""
    torch.manual_seed(0)
    head = create_encoder("gated", d_model=6, n_latents=12, subtract_decoder_bias=True)
    dictionary = Dictionary(12, 6, bias=True, atom_norms=norms)
    with torch.no_grad():
        for p in (head.b_gate, head.r_mag, head.b_mag, dictionary.bias):
            p.normal_(0, 0.5)
        if norms:
            dictionary.atom_norms.uniform_(0.5, 2)
    x, weights = torch.randn(9, 6), torch.randn(9, 12)
    params = [p for p in (*head.parameters(), *dictionary.parameters()) if p.requires_grad]

    def objective(codes, sparsity, aux):
        return (codes * weights).sum() + 0.3 * sparsity + 1.7 * aux

    out = head.training_codes(x, dictionary)
    fast = [out.codes, out.sparsity, out.aux_loss]
    fast_grads = torch.autograd.grad(objective(*fast), params, allow_unused=True)

    z = F.linear(x - dictionary.bias, head.linear.weight)
    gate = z + head.b_gate
    codes = (gate > 0) * F.relu(z * head.r_mag.exp() + head.b_mag)
    gate_acts = F.relu(gate)
    sparsity = (gate_acts * dictionary.atom_norms if norms else gate_acts).mean()
    aux = F.mse_loss(gate_acts @ dictionary.atoms.detach() + dictionary.bias.detach(), x)
    plain_grads = torch.autograd.grad(objective(codes, sparsity, aux), params, allow_unused=True)

    for a, b in zip(fast, [codes, sparsity, aux]):
        torch.testing.assert_close(a, b)
    for p, a, b in zip(params, fast_grads, plain_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, msg=lambda m, p=p: f"{tuple(p.shape)}: {m}")
    assert out.codes.count_nonzero() > 0 and (out.codes == 0).any()


@pytest.mark.parametrize("name, sparse", [("linear", False), ("jumprelu", False), ("gated", False),
                                          ("jumprelu", True), ("gated", True)])
def test_fused_training_paths_run_under_bf16_autocast_close_to_float32(name, sparse):
    """The heads' own autograd functions (dense, and the threshold heads' sparse ones) keep dtypes straight
    under autocast: the loss and every gradient stay close to float32's."""
    x = torch.randn(256, 24, generator=torch.Generator().manual_seed(2))

    def loss_and_grads(autocast: bool):
        if sparse:
            model = threshold_model({"name": name}, "learned", None, True)
            model.training_losses(x)  # records that few latents fire: the next batch goes the sparse way
        else:
            torch.manual_seed(0)
            head = create_encoder(name, d_model=24, n_latents=96, subtract_decoder_bias=True)
            model = SparseCoder(head, Dictionary(96, 24, bias=True, atom_norms="learned"), l1_coeff=0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert isinstance(model.encoder.training_codes(x, model.dictionary).codes, SparseCodes) == sparse
            loss = model.training_losses(x)["loss"]
        model.zero_grad()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    (plain, plain_grads), (mixed, mixed_grads) = loss_and_grads(False), loss_and_grads(True)
    assert mixed == pytest.approx(plain, rel=3e-2)
    assert torch.isfinite(mixed_grads).all() and mixed_grads.shape == plain_grads.shape
    assert torch.nn.functional.cosine_similarity(mixed_grads, plain_grads, dim=0) > 0.98


def test_padded_entries_lists_each_samples_entries_padded_to_the_widest():
    from sae_zoo.encoders.sparse_linear import padded_entries
    mask = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, False]])
    values = torch.arange(12.0).reshape(3, 4) + 1
    indices, real, (gathered,) = padded_entries(mask, values)
    assert indices.tolist() == [[1, 3, 0], [0, 0, 0], [0, 1, 2]]
    assert real.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert gathered.tolist() == [[2.0, 4.0, 0.0], [0.0, 0.0, 0.0], [9.0, 10.0, 11.0]]
    empty_indices, empty_real, _ = padded_entries(torch.zeros(2, 5, dtype=torch.bool))
    assert empty_indices.shape == (2, 1) and not empty_real.any()


def threshold_model(head: dict, norms, widths, sparse_decode: bool) -> SparseCoder:
    """A threshold head at about 1 active latent of 96 per sample, where its training goes the sparse way."""
    from sae_zoo.sparsity import calibrate_l0
    torch.manual_seed(0)
    model = SparseCoder(create_encoder(d_model=24, n_latents=96, subtract_decoder_bias=True, **head),
                        Dictionary(96, 24, bias=True, atom_norms=norms), l1_coeff=0.1, matryoshka_widths=widths,
                        sparse_decode=sparse_decode)
    with torch.no_grad():
        model.dictionary.bias.normal_(0, 0.3)
        if norms:
            model.dictionary.atom_norms.uniform_(0.5, 2)
    calibrate_l0(model.encoder, torch.randn(512, 24, generator=torch.Generator().manual_seed(3)),
                 model.dictionary, 1.0)
    if head["name"] == "jumprelu":  # a wide kernel, so that many entries near the thresholds do not fire
        model.encoder.bandwidth = 0.5
    return model


@pytest.mark.parametrize("head", [{"name": "jumprelu"}, {"name": "jumprelu", "sparsity_loss": "tanh"},
                                  {"name": "gated"}], ids=["jumprelu", "jumprelu-tanh", "gated"])
@pytest.mark.parametrize("norms, widths", [(False, None), ("learned", [8, 32, 96])], ids=["unit", "matryoshka"])
def test_threshold_heads_train_on_their_entries_with_the_dense_paths_values_and_gradients(head, norms, widths):
    """After a sparse enough batch, JumpReLU and gated train on each sample's active entries (and JumpReLU's
    kernel's): the losses and every gradient equal the dense path's."""
    x = torch.randn(200, 24, generator=torch.Generator().manual_seed(1))
    results = []
    for sparse in (True, False):
        model = threshold_model(head, norms, widths, sparse)
        model.training_losses(x)  # the first batch goes the dense way and records how many latents fired
        codes = model.encoder.training_codes(x, model.dictionary, sparse=sparse).codes
        assert isinstance(codes, SparseCodes) == sparse
        model.zero_grad()
        out = model.training_losses(x)
        out["loss"].backward()
        results.append(({k: v.item() for k, v in out.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (sparse_losses, sparse_grads), (dense_losses, dense_grads) = results
    assert 0.5 < dense_losses["l0"] < 3
    assert sparse_losses == pytest.approx(dense_losses, rel=1e-5, abs=1e-7)
    assert sparse_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    threshold = "threshold" if head["name"] == "jumprelu" else "b_gate"
    assert dense_grads[f"encoder.{threshold}"].abs().sum() > 0


def test_threshold_heads_train_densely_while_many_latents_fire():
    model = SparseCoder(create_encoder("jumprelu", d_model=24, n_latents=96), Dictionary(96, 24))
    x = torch.randn(64, 24)
    for _ in range(2):  # as built, about half fire: every batch goes the dense way
        assert model.training_losses(x)["l0"] > 96 / 48
        assert not isinstance(model.encoder.training_codes(x, model.dictionary).codes, SparseCodes)



@pytest.mark.parametrize("name", ["jumprelu", "jumprelu_uniform", "gated", "batchtopk", "batchtopk_unset"])
def test_inference_in_place_gives_the_formulas_codes_with_and_without_autograd(name):
    """The threshold heads encode in one pass over the pre-activations where no gradient is wanted; the codes
    are the formula's, bit for bit, and a gradient still flows where one is."""
    torch.manual_seed(0)
    head = create_encoder(name.split("_")[0], d_model=16, n_latents=128, subtract_decoder_bias=True,
                          **({"k": 8} if "batchtopk" in name else {}))
    dictionary = Dictionary(128, 16, bias=True)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        dictionary.bias.add_(torch.randn(16))
        if name in ("batchtopk", "jumprelu_uniform"):
            head.threshold.fill_(0.2)  # set (one threshold for every latent); "unset" keeps a new head's -1
    head.eval()
    x = torch.randn(300, 16)
    if name == "gated":
        gate, magnitude = head._paths(x, dictionary)
        formula = (gate > 0) * magnitude.relu()
    else:
        z = head.linear_map(x, dictionary)
        acts = z.relu()
        formula = acts * ((acts if "batchtopk" in name else z) > head.threshold)
    with torch.no_grad():
        assert torch.equal(head(x, dictionary), formula.detach())
    x.requires_grad_()
    codes = head(x, dictionary)
    codes.sum().backward()
    assert torch.equal(codes.detach(), formula.detach()) and x.grad.abs().sum() > 0
    assert 0.05 < (formula > 0).float().mean() < 0.95  # some fire, some do not

"""The field's training aids: target L0, BatchTopK's threshold, Matryoshka prefixes, AuxK, resampling,
warm-ups and the decoder bias's starting point. Each is checked on what it is for."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data import SyntheticSparseDataModule
from sae_zoo.dead_latents import DeadLatents
from sae_zoo.encoders import SparseCodes
from sae_zoo.evaluation import evaluate
from sae_zoo.sparsity import SparsityControl
from sae_zoo.training import TrainingAid, create_training_aid, list_training_aids
from sae_zoo.objectives import auxk_loss, check_matryoshka_widths, geometric_median, lr_factor, reconstruction_loss


def fit(model, dm, steps):
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(model, dm)
    return evaluate(model, dm)


def learning_rates(model, steps=20):
    """The learning rate of each of ``steps`` training steps of ``model`` on a small synthetic set."""
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=8, d_model=4, n_train=64, n_test=32, batch_size=16, steps_per_epoch=20)
    rates = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[Record()]).fit(model, dm)
    return rates


@pytest.mark.parametrize("head", ["jumprelu", "linear", "gated"])
def test_a_target_l0_of_8_is_where_the_run_ends(head):
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=64, d_model=32, k=12, n_train=4096, n_test=2048, batch_size=256,
                                   steps_per_epoch=1000)
    model = SparseCoder(create_encoder(head, d_model=32, n_latents=64, subtract_decoder_bias=True),
                        Dictionary(64, 32, bias=True), l1_coeff=0.1, lr=3e-3, target_l0=8, tied_init=head != "gated")
    metrics = fit(model, dm, 400)
    print(f"{head}, target L0 8: held-out L0 {metrics['l0']:.2f}, FVU {metrics['fvu']:.3f}, "
          f"coefficient {model.l1_coeff:.3g}, calibration {model.l0_calibration}")
    # the data's own L0 is 12: the controller and the final shift, not the data, set it (within 3%)
    assert metrics["l0"] == pytest.approx(8, rel=0.03) and model.l0_calibration["l0_after"] == pytest.approx(8, rel=0.01)
    assert model.l0_calibration["l0_before"] == pytest.approx(8, rel=0.25)  # the controller got near on its own
    assert model.l1_coeff == pytest.approx(float(model.sparsity.coeff)) and model.l1_coeff != 0.1
    assert metrics["fvu"] < 0.5


def test_the_sparsity_controller_answers_at_once_and_integrates():
    control = SparsityControl(1.0, target_l0=8, rate=0.1)
    control.update(torch.tensor(16.0))  # twice the target: e = 1
    assert float(control.integral) == pytest.approx(0.1) and float(control.coeff) == pytest.approx(math.exp(1.1))
    control.update(torch.tensor(8.0))  # on target: the proportional part goes, the integral stays
    assert float(control.coeff) == pytest.approx(math.exp(0.1))
    control.update(torch.tensor(0.0))  # far below: e is clipped at -1
    assert float(control.coeff) == pytest.approx(math.exp(0.0 - 1.0))
    warm = SparsityControl(2.0, warmup_steps=4)
    assert [float(warm.value(s)) for s in (0, 3, 10)] == pytest.approx([0.5, 2.0, 2.0]) and float(warm.value(None)) == 2


def test_batchtopk_keeps_k_per_sample_on_average_in_training_and_its_threshold_after():
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=32, d_model=16, k=4, n_train=2048, n_test=1024, batch_size=128,
                                   steps_per_epoch=300)
    head = create_encoder("batchtopk", d_model=16, n_latents=32, k=4)
    model = SparseCoder(head, Dictionary(32, 16), l1_coeff=0.0, lr=3e-3)
    assert float(head.threshold) == -1
    metrics = fit(model, dm, 300)
    head.train()
    codes = head(dm.train_x[:128]).detach()
    assert int((codes > 0).sum()) == 4 * 128  # exactly k x batch kept in training (values are positive)
    assert (codes > 0).sum(-1).float().std() > 0  # ... shared unevenly between samples
    assert 0 < float(head.threshold) < float(codes[codes > 0].max())
    print(f"batchtopk, k 4: held-out L0 {metrics['l0']:.2f} with its threshold {float(head.threshold):.3f}")
    assert metrics["l0"] == pytest.approx(4, rel=0.25)  # the threshold gives about k per sample at inference


def test_batchtopk_threshold_on_contributions_keeps_k_per_sample_after_training():
    """With learned atom norms, the running threshold ranks the kept codes by code x norm, so that the
    threshold on contributions keeps about k latents per sample at inference."""
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=32, d_model=16, k=4, n_train=2048, n_test=1024, batch_size=128,
                                   steps_per_epoch=200)
    head = create_encoder("batchtopk", d_model=16, n_latents=32, k=4, k_train_factor=1.5, threshold_on="contribution")
    model = SparseCoder(head, Dictionary(32, 16, atom_norms="learned"), l1_coeff=0.0, lr=3e-3)
    metrics = fit(model, dm, 200)
    norms = model.dictionary.atom_norms.detach()
    assert norms.std() > 0.05  # the norms moved apart, so ranking by contribution differs from ranking by code
    assert metrics["l0"] == pytest.approx(4, rel=0.25)
    head.train()
    head.threshold_lr = 1.0  # the estimate is then this batch's alone
    for sparse in (False, True):
        with torch.no_grad():
            kept = head.training_codes(dm.train_x[:128], model.dictionary, sparse=False).codes
            head.training_codes(dm.train_x[:128], model.dictionary, sparse=sparse)
        # the smallest of the batch's k x 128 largest contributions among those kept (6 per sample in training)
        by_contribution = (kept * norms).reshape(-1).topk(4 * 128).values[-1]
        by_code = kept.reshape(-1).topk(4 * 128).values[-1]
        assert float(head.threshold) == pytest.approx(float(by_contribution), rel=1e-5)
        assert abs(float(by_code) - float(by_contribution)) > 0.05 * float(by_contribution)


def test_matryoshka_prefixes_reconstruct_on_their_own():
    widths = [4, 16, 64]
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=64, d_model=32, k=6, n_train=4096, n_test=1024, batch_size=256,
                                   steps_per_epoch=400)

    def prefix_fvu(matryoshka):
        torch.manual_seed(1)
        model = SparseCoder(create_encoder("topk", d_model=32, n_latents=64, k=6), Dictionary(64, 32), l1_coeff=0.0,
                            lr=3e-3, matryoshka_widths=widths if matryoshka else None)
        fit(model, dm, 400)
        with torch.no_grad():
            codes = model.encode(dm.test_x)
            prefix = codes[:, :16] @ model.dictionary.atoms[:16]
        return float(F.mse_loss(prefix, dm.test_x) / dm.test_x.var(0).sum() * 32)

    nested, plain = prefix_fvu(True), prefix_fvu(False)
    print(f"matryoshka: FVU of the first 16 latents alone {nested:.3f}, against {plain:.3f} without nesting")
    assert nested < 0.7 * plain  # the first 16 latents alone explain far more with nested training


def test_matryoshka_loss_is_the_sum_over_prefixes_dense_and_sparse():
    torch.manual_seed(0)
    dictionary = Dictionary(8, 5, bias=True, atom_norms=True)
    with torch.no_grad():
        dictionary.bias.normal_()
        dictionary.atom_norms.uniform_(0.5, 2)
    x, codes = torch.randn(6, 5), torch.relu(torch.randn(6, 8))
    expected = sum(F.mse_loss(codes[:, :w] @ dictionary.atoms[:w] + dictionary.bias, x) for w in (2, 5, 8))
    loss, x_hat = reconstruction_loss(dictionary, codes, x, [2, 5, 8])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x_hat, dictionary.decode(codes))
    values, indices = codes.topk(3, dim=-1)
    dense = torch.zeros_like(codes).scatter(-1, indices, values)
    sparse_loss, _ = reconstruction_loss(dictionary, SparseCodes(values, indices), x, [2, 5, 8])
    torch.testing.assert_close(sparse_loss, reconstruction_loss(dictionary, dense, x, [2, 5, 8])[0])


@pytest.mark.parametrize("widths, problem", [([4, 4, 16], "strictly increasing"), ([8, 4, 16], "strictly increasing"),
                                             ([4, 8], "must end at n_latents \\(16\\)"), ([], "must end at")])
def test_matryoshka_widths_are_checked(widths, problem):
    with pytest.raises(ValueError, match=problem):
        check_matryoshka_widths(widths, 16)
    with pytest.raises(ValueError, match=problem):
        SparseCoder(create_encoder("topk", d_model=4, n_latents=16, k=2), Dictionary(16, 4), matryoshka_widths=widths)


def test_auxk_loss_is_gao_et_als_and_trains_only_the_dead():
    torch.manual_seed(0)
    head = create_encoder("topk", d_model=6, n_latents=20, k=2, subtract_decoder_bias=True)
    dictionary = Dictionary(20, 6, bias=True)
    x = torch.randn(16, 6)
    x_hat = dictionary.decode(head(x, dictionary))
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 5, 7, 11, 13]] = True
    loss = auxk_loss(head, dictionary, x, x_hat, dead, k_aux=3)
    # by hand: the 3 largest pre-activations among the dead latents reconstruct the residual, no bias
    pre = F.linear(x - dictionary.bias, head.linear.weight, head.linear.bias)[:, dead]
    top = pre.relu().topk(3, dim=-1)
    aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    expected = F.mse_loss(aux @ dictionary.atoms[dead], (x - x_hat).detach())  # 5 dead >= k_aux: scale 1
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = head.linear.weight.grad.abs().sum(-1)
    assert (grad[~dead] == 0).all() and (grad[dead] > 0).any()
    assert float(auxk_loss(head, dictionary, x, x_hat, torch.zeros(20, dtype=torch.bool), 3)) == 0
    few = auxk_loss(head, dictionary, x, x_hat, dead, k_aux=10)  # 5 dead of k_aux 10: scaled by 1/2
    pre_all = pre.relu()
    torch.testing.assert_close(few, 0.5 * F.mse_loss(pre_all @ dictionary.atoms[dead], (x - x_hat).detach()))


def test_auxk_needs_a_head_with_pre_activations():
    model = SparseCoder(create_encoder("mlp", d_model=4, n_latents=8, hidden=4), Dictionary(8, 4), auxk_coeff=0.1,
                        dead_tokens=1)
    model.dead_latents.tokens_since_fired.fill_(5)
    with pytest.raises(ValueError, match="mlp head has no linear pre-activations, which AuxK needs"):
        model.training_losses(torch.randn(3, 4))


def test_dead_latents_are_counted_in_tokens_and_resampled():
    torch.manual_seed(0)
    head = create_encoder("topk", d_model=6, n_latents=12, k=2, subtract_decoder_bias=True)
    model = SparseCoder(head, Dictionary(12, 6, bias=True), resample_every=10, dead_tokens=100)
    x = torch.randn(32, 6)
    losses = model.training_losses(x)
    fired = torch.zeros(12, dtype=torch.bool)
    fired[head(x, model.dictionary).nonzero()[:, 1]] = True
    assert torch.equal(model.dead_latents.tokens_since_fired, torch.where(fired, 0.0, 32.0)) and losses["l0"] == 2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.training_losses(x)["loss"].backward()
    optimizer.step()
    model.dead_latents.tokens_since_fired[:4] = 100  # latents 0-3 dead
    model.optimizers = lambda: type("Wrapped", (), {"optimizer": optimizer})()
    model._trainer = object()  # resampling runs inside a fit, where the optimizer exists
    before = model.dictionary.weight.clone()
    assert model.resample_dead_latents(x) == 4
    model._trainer = None
    atoms = model.dictionary.weight
    assert torch.equal(atoms[4:], before[4:]) and not torch.allclose(atoms[:4], before[:4])
    centred = F.normalize(x - model.dictionary.bias, dim=-1)
    assert ((atoms[:4] @ centred.T).max(-1).values > 1 - 1e-5).all()  # each new atom is an input's direction
    torch.testing.assert_close(F.normalize(head.linear.weight[:4], dim=-1), atoms[:4])
    assert (head.linear.bias[:4] == 0).all() and (model.dead_latents.tokens_since_fired[:4] == 0).all()
    for parameter in (head.linear.weight, model.dictionary.weight):
        state = optimizer.state[parameter]
        assert (state["exp_avg"][:4] == 0).all() and (state["exp_avg_sq"][:4] == 0).all()
        assert (state["exp_avg"][4:] != 0).any()


@pytest.mark.parametrize("warmup", [5, 0.25], ids=["steps", "fraction"])  # 0.25 of 20 steps: 5
def test_learning_rate_and_sparsity_warm_up_and_decay(warmup):
    assert [lr_factor(s, 10, 4, 0) for s in (0, 1, 3, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert [lr_factor(s, 10, 0, 4) for s in (5, 6, 8, 9)] == [1.0, 1.0, 0.5, 0.25]
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=8, d_model=4, n_train=64, n_test=32, batch_size=16, steps_per_epoch=20)
    model = SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), lr=1e-2,
                        lr_warmup_steps=warmup, lr_decay_steps=5, sparsity_warmup_steps=10)
    rates, coefficients = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])
            coefficients.append(float(module.sparsity.value(module.global_step)))

    L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[Record()]).fit(model, dm)
    assert rates[:6] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2, 1e-2])
    assert rates[-2:] == pytest.approx([4e-3, 2e-3])
    assert coefficients[:3] == pytest.approx([0.001, 0.002, 0.003]) and coefficients[-1] == pytest.approx(0.01)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match=f"lr_warmup_steps must be a number of steps >= 0 or a fraction .* {bad}|"
                                             f"lr_warmup_steps >= 1 counts steps, so it must be a whole number, got {bad}"):
            SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), lr_warmup_steps=bad)


def test_the_fields_aids_are_registered_objects_set_by_the_flat_options():
    model = SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), auxk_coeff=0.5,
                        lr_decay_steps=0.2)
    assert [aid.name for aid in model.aids] == ["decoder_bias_init", "dead_latents", "lr_schedule"]
    assert [aid.active for aid in model.aids] == [False, True, True] and model.aids[1] is model.dead_latents
    assert {"dead_latents", "decoder_bias_init", "lr_schedule"} <= set(list_training_aids())
    for aid in model.aids:  # config() rebuilds each one
        assert create_training_aid(**aid.config()).config() == aid.config()
    assert model.dead_latents.auxk_k == 2 and model.dead_latents.tokens_since_fired.shape == (8,)
    assert "aids" not in model.hparams  # the saved hyper-parameters are the flat options, as before

    # the field's aids may be written as aids too: read into the same options, as saved; never set twice
    linear = create_encoder("linear", d_model=4, n_latents=8)
    spelled = SparseCoder(linear, Dictionary(8, 4), aids=[{"name": "auxk", "coeff": 0.03, "k": 2},
                                                          {"name": "lr_schedule", "decay_steps": 0.2},
                                                          {"name": "target_l0", "target": 3}])
    flat = SparseCoder(linear, Dictionary(8, 4), auxk_coeff=0.03, auxk_k=2, lr_decay_steps=0.2, target_l0=3)
    assert spelled.hparams == flat.hparams and "aids" not in spelled.hparams
    assert spelled.dead_latents.auxk_coeff == 0.03 and spelled.sparsity.target_l0 == 3
    assert [aid.config() for aid in spelled.aids] == [aid.config() for aid in flat.aids]
    objects = SparseCoder(linear, Dictionary(8, 4), aids=[DeadLatents(auxk_coeff=0.03, auxk_k=2)],
                          lr_decay_steps=0.2, target_l0=3)
    assert objects.hparams == flat.hparams
    with pytest.raises(ValueError, match="the 'auxk' aid sets coeff=1.0, and auxk_coeff=0.5 is given too"):
        SparseCoder(linear, Dictionary(8, 4), auxk_coeff=0.5, aids=[{"name": "auxk", "coeff": 1.0}])
    with pytest.raises(ValueError, match="the 'auxk' aid takes coeff, k, dead_tokens, got 'coef'"):
        SparseCoder(linear, Dictionary(8, 4), aids=[{"name": "auxk", "coef": 1.0}])

    # a run has one learning-rate schedule

    class Cosine(TrainingAid):
        name = "cosine_schedule"

        def config(self):
            return {"name": self.name}

        def schedule(self, optimizer, total_steps):
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, int(total_steps))

    with pytest.raises(ValueError, match="lr_schedule, cosine_schedule each set the learning-rate schedule"):
        SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), lr_warmup_steps=3,
                    aids=[Cosine()])
    with pytest.raises(ValueError, match="unknown training aid 'nope'; registered: .*dead_latents"):
        SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), aids=[{"name": "nope"}])
    with pytest.raises(TypeError, match="aids takes TrainingAid objects"):
        SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), aids=["auxk"])

    # the aid's schedule is the run's, step by step
    model = SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), lr=1e-2, aids=[Cosine()])
    assert learning_rates(model, steps=10) == pytest.approx([5e-3 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])


def test_geometric_median_resists_outliers_and_initialises_the_decoder_bias():
    torch.manual_seed(0)
    points = torch.randn(500, 3) + torch.tensor([1.0, -2.0, 0.5])
    points[:20] += 1000  # a few massive activations
    median = geometric_median(points)
    assert (median - torch.tensor([1.0, -2.0, 0.5])).norm() < 0.2 < (points.mean(0) - median).norm()
    distance = lambda c: (points - c).norm(dim=1).sum()  # noqa: E731
    assert distance(median) <= min(distance(median + 0.01 * d) for d in torch.eye(3).unbind() + (-torch.eye(3)).unbind())

    dm = SyntheticSparseDataModule(n_latents=8, d_model=4, n_train=256, n_test=32, batch_size=64, steps_per_epoch=1)
    for how, expected in (("mean", dm.train_x.mean(0)), ("geometric_median", geometric_median(dm.train_x))):
        model = SparseCoder(create_encoder("linear", d_model=4, n_latents=8, subtract_decoder_bias=True),
                            Dictionary(8, 4, bias=True), lr=1e-9, decoder_bias_init=how, bias_init_samples=256)
        fit(model, dm, 1)
        torch.testing.assert_close(model.dictionary.bias.detach(), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs a dictionary with a bias"):
        SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), decoder_bias_init="mean")


@pytest.mark.parametrize("make, message", [
    (lambda: create_encoder("topk", d_model=4, n_latents=8, k=9), "topk needs k <= n_latents \\(8\\), got k=9"),
    (lambda: create_encoder("batchtopk", d_model=4, n_latents=8, k=9), "batchtopk needs k <= n_latents \\(8\\)"),
    (lambda: create_encoder("jumprelu", d_model=4, n_latents=8, bandwidth=-0.1), "bandwidth > 0, got bandwidth=-0.1"),
    (lambda: create_encoder("jumprelu", d_model=4, n_latents=8, sparsity_loss="l1"), "sparsity_loss"),
    (lambda: SparseCoder(create_encoder("jumprelu", d_model=4, n_latents=8), Dictionary(8, 4), l1_coeff=0.0,
                         target_l0=3), "needs a starting l1_coeff > 0"),
    (lambda: SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), target_l0=-2),
     "target_l0 must be positive, got -2"),
])
def test_bad_settings_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_tanh_sparsity_and_the_gated_heads_auxiliary_terms():
    torch.manual_seed(0)
    x, dictionary = torch.randn(8, 4), Dictionary(6, 4, bias=True)
    tanh = create_encoder("jumprelu", d_model=4, n_latents=6, sparsity_loss="tanh", tanh_scale=2.0)
    out = tanh.training_codes(x, dictionary)
    torch.testing.assert_close(out.sparsity, torch.tanh(2.0 * out.codes).mean())
    gated = create_encoder("gated", d_model=4, n_latents=6)
    out = gated.training_codes(x, dictionary)
    gate = F.relu(gated.linear(x) + gated.b_gate)
    torch.testing.assert_close(out.sparsity, gate.mean())
    torch.testing.assert_close(out.aux_loss, F.mse_loss(gate @ dictionary.atoms + dictionary.bias, x))
    out.aux_loss.backward()
    assert dictionary.weight.grad is None and gated.b_gate.grad.abs().sum() > 0  # through a frozen decoder copy


def test_jumprelu_straight_through_gradients_are_saelens():
    """SAELens's JumpReLU and Step: the codes pass the step's gradient to z; the threshold gets
    -(threshold / bandwidth) K((z - threshold) / bandwidth) from the codes and -(1 / bandwidth) K(...) from
    the L0, K the rectangle of width 1."""
    from sae_zoo.encoders.jumprelu import JumpReLUFunction

    torch.manual_seed(0)
    z = torch.randn(5, 7, requires_grad=True)
    threshold = (torch.rand(7) * 0.5).requires_grad_()
    grad_codes, grad_l0, bandwidth = torch.randn(5, 7), 0.7, 0.3
    codes, l0 = JumpReLUFunction.apply(z.clone(), threshold, bandwidth)  # it overwrites its z
    torch.testing.assert_close(codes, z * (z > threshold))
    torch.testing.assert_close(l0, (z > threshold).float().mean())
    torch.autograd.backward([codes, l0], [grad_codes, torch.tensor(grad_l0)])
    kernel = (((z - threshold) / bandwidth).abs() < 0.5).float().detach()
    expected = -(threshold.detach() / bandwidth * kernel * grad_codes).sum(0) \
        - (kernel / bandwidth * grad_l0 / z.numel()).sum(0)
    torch.testing.assert_close(threshold.grad, expected)
    torch.testing.assert_close(z.grad, (z > threshold).float() * grad_codes)


@pytest.mark.parametrize("head", ["topk", "batchtopk"])
def test_k_anneal_trains_denser_first_and_ends_at_k(head):
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=32, d_model=16, k=4, n_train=1024, n_test=512, batch_size=64,
                                   steps_per_epoch=40)
    encoder = create_encoder(head, d_model=16, n_latents=32, k=3, k_anneal=4.0, k_anneal_fraction=0.5)
    model = SparseCoder(encoder, Dictionary(32, 16), l1_coeff=0.0, lr=3e-3)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append((module.encoder.training_k, float(module.training_losses(batch)["l0"])))

    L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[Record()]).fit(model, dm)
    ks = [k for k, _ in seen]
    assert ks[0] == 12 and ks[10] == 8 and ks[20:] == [3] * 20  # 4k, down linearly over the first half (7.5 at 10), then k
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    # (top-k's ReLU drops a non-positive value among the k largest now and then)
    assert seen[0][1] == pytest.approx(12, rel=0.05) and seen[-1][1] == pytest.approx(3, rel=0.05)
    model.eval()
    # inference keeps k (BatchTopK: about k, through a threshold estimated once training reached k)
    assert float((model.encode(dm.test_x[:256]) != 0).sum(-1).float().mean()) == pytest.approx(3, rel=0.3)
    with pytest.raises(ValueError, match=r"k_anneal >= 1.* got k_anneal=0.5"):
        create_encoder(head, d_model=16, n_latents=32, k=3, k_anneal=0.5)


@pytest.mark.parametrize("head", ["topk", "batchtopk"])
@pytest.mark.parametrize("sparse", [False, True])
def test_k_train_factor_trains_denser_and_infers_at_k(head, sparse):
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=32, d_model=16, k=4, n_train=1024, n_test=512, batch_size=64,
                                   steps_per_epoch=30)
    # (BatchTopK's threshold follows the last batches closely, as the model still moves in 30 steps)
    extra = {"threshold_lr": 0.5} if head == "batchtopk" else {}
    encoder = create_encoder(head, d_model=16, n_latents=32, k=3, k_train_factor=2.0, **extra)
    model = SparseCoder(encoder, Dictionary(32, 16), l1_coeff=0.0, lr=3e-3, sparse_decode=sparse)
    assert encoder.train_k == 6 and encoder.training_k == 6
    L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(model, dm)
    x = dm.test_x[:256]
    model.train()
    assert float(model.training_losses((x,))["l0"]) == pytest.approx(6, rel=0.05)
    model.eval()
    codes = model.encode(x)
    assert float((codes != 0).sum(-1).float().mean()) == pytest.approx(3, rel=0.2)
    if head == "batchtopk":  # the threshold is the (3 x samples)-th largest training value, not the 6 x samples-th
        with torch.no_grad():
            acts = encoder.linear_map(x, model.dictionary).relu().flatten()
        third, sixth = acts.topk(3 * 256).values[-1], acts.topk(6 * 256).values[-1]
        assert abs(float(encoder.threshold) - third) < abs(float(encoder.threshold) - sixth)
    with pytest.raises(ValueError, match=r"k_train_factor >= 1 .* got k_train_factor=0.5"):
        create_encoder(head, d_model=16, n_latents=32, k=3, k_train_factor=0.5)


def test_lr_decay_steps_may_be_a_fraction_of_the_run():
    model = SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), lr=1e-2, lr_decay_steps=0.25)
    rates = learning_rates(model)
    assert rates[:16] == pytest.approx([1e-2] * 16) and rates[16:] == pytest.approx([8e-3, 6e-3, 4e-3, 2e-3])
    assert model.hparams["lr_decay_steps"] == 0.25
    for bad, reason in ((1.5, " >= 1 counts steps, so it must be a whole number"), (-1, " must be a number of steps >= 0"),
                        (True, " must be a number of steps >= 0 or a fraction of the run in \\(0, 1\\), ")):
        with pytest.raises(ValueError, match=rf"lr_decay_steps{reason}.*{bad!r}"):
            SparseCoder(create_encoder("linear", d_model=4, n_latents=8), Dictionary(8, 4), lr_decay_steps=bad)


def test_iht_refine_in_training_trains_the_dictionary_on_refined_codes():
    """The model's loss reconstructs from the IHT solve started at the warm head's codes (so the dictionary
    learns from refined codes), and the warm head learns only from its own reconstruction through a frozen
    copy of the decoder."""
    torch.manual_seed(0)
    head = create_encoder("iht", d_model=16, n_latents=32, steps=5, refine_in_training=True,
                          warm_start={"name": "batchtopk", "k": 3, "subtract_decoder_bias": True})
    dictionary = Dictionary(32, 16, bias=True)
    x = torch.randn(64, 16)
    out = head.training_codes(x, dictionary)
    warm = head.warm_start.training_codes(x, dictionary, sparse=False).codes
    with torch.no_grad():
        expected, _ = head.solve(x - dictionary.bias, dictionary.atoms, warm)
    torch.testing.assert_close(out.codes, expected)
    assert not out.codes.requires_grad and not torch.equal(out.codes, warm)
    torch.testing.assert_close(out.aux_loss, F.mse_loss(warm @ dictionary.atoms + dictionary.bias, x))
    out.aux_loss.backward()
    assert dictionary.weight.grad is None and head.warm_start.linear.weight.grad.abs().sum() > 0
    head.eval()  # inference is the usual warm start, then the solve
    torch.testing.assert_close(head(x, dictionary), head.solve(x - dictionary.bias, dictionary.atoms,
                                                               head.warm_start(x, dictionary))[0])


def test_iht_refine_in_training_needs_a_trainable_warm_start():
    with pytest.raises(ValueError, match="refine_in_training=True refines the warm-start head's codes"):
        create_encoder("iht", d_model=8, n_latents=16, threshold=0.1, refine_in_training=True)
    frozen = create_encoder("batchtopk", d_model=8, n_latents=16, k=2).requires_grad_(False)
    with pytest.raises(ValueError, match="this warm start is frozen"):
        create_encoder("iht", d_model=8, n_latents=16, warm_start=frozen, refine_in_training=True)


def test_resampling_leaves_the_batchtopk_threshold_and_the_mode_as_training_left_them():
    torch.manual_seed(0)
    head = create_encoder("batchtopk", d_model=6, n_latents=12, k=2, threshold_lr=0.5)
    model = SparseCoder(head, Dictionary(12, 6), resample_every=10, dead_tokens=100)
    model.training_losses(torch.randn(32, 6))  # the first training batch sets the threshold
    threshold = head.threshold.clone()
    model.dead_latents.tokens_since_fired[:4] = 100
    assert model.resample_dead_latents(3 * torch.randn(32, 6)) == 4  # a batch whose kept values differ
    assert torch.equal(head.threshold, threshold) and model.training


def test_resampling_clears_the_optimizer_state_of_the_rows_it_reset_only():
    """A residual MLP whose hidden layer is as wide as its latents: resampling resets its linear map's rows, and
    the hidden layer's Adam state (rows of the same count, other units) is kept."""
    torch.manual_seed(0)
    head = create_encoder("residual_mlp", d_model=6, n_latents=12, hidden=12)
    model = SparseCoder(head, Dictionary(12, 6, bias=True), resample_every=10, dead_tokens=100)
    x = torch.randn(32, 6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # the correction's output layer starts at zero: the hidden layer learns from the second step
        optimizer.zero_grad()
        model.training_losses(x)["loss"].backward()
        optimizer.step()
    hidden = head.correction[0].weight
    kept = {k: v.clone() for k, v in optimizer.state[hidden].items()}
    model.dead_latents.tokens_since_fired[:4] = 100
    model.optimizers = lambda: type("Wrapped", (), {"optimizer": optimizer})()
    model._trainer = object()
    assert model.resample_dead_latents(x) == 4
    model._trainer = None
    for name, value in kept.items():
        torch.testing.assert_close(optimizer.state[hidden][name], value, msg=name)
    assert (optimizer.state[hidden]["exp_avg"][:4] != 0).any()
    assert (optimizer.state[head.linear.weight]["exp_avg_sq"][:4] == 0).all()


class RowsSeen(TrainingAid):
    """A test aid with a persistent buffer: the training rows it has seen."""

    name = "test_rows_seen"

    def setup(self, model):
        self.register_buffer("rows", torch.zeros(()))

    def config(self):
        return {"name": self.name}

    def before_batch(self, model, x):
        self.rows += x.shape[0]


def test_an_aids_persistent_buffer_is_training_state_not_a_weight(tmp_path, monkeypatch):
    """An aid's buffer stays out of ``model.safetensors`` (so ``from_pretrained`` reads the file), and a checkpoint
    keeps it, under the aid's name, for a resumed run."""
    from sae_zoo.training import TRAINING_AIDS

    monkeypatch.setitem(TRAINING_AIDS, RowsSeen.name, RowsSeen)
    torch.manual_seed(0)
    dm = SyntheticSparseDataModule(n_latents=8, d_model=4, n_train=64, n_test=32, batch_size=16, steps_per_epoch=20)
    model = SparseCoder(create_encoder("topk", d_model=4, n_latents=8, k=2), Dictionary(8, 4),
                        aids=[{"name": RowsSeen.name}])
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    rows = model.aids[-1].rows.clone()
    assert rows == 10 * 16

    model.save_pretrained(tmp_path / "pretrained")
    from safetensors.torch import load_file
    assert not [k for k in load_file(tmp_path / "pretrained" / "model.safetensors") if "aid" in k or "rows" in k]
    loaded = SparseCoder.from_pretrained(tmp_path / "pretrained")
    torch.testing.assert_close(loaded(dm.test_x).x_hat, model.eval()(dm.test_x).x_hat)

    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert not [k for k in saved["state_dict"] if k.startswith("aids")]
    assert torch.equal(saved["training_aids"][RowsSeen.name]["buffers"]["rows"], rows)
    restored = SparseCoder.load_from_checkpoint(tmp_path / "run.ckpt")
    assert isinstance(restored.aids[-1], RowsSeen) and torch.equal(restored.aids[-1].rows, rows)
    assert restored.double().aids[-1].rows.dtype == torch.float64  # the aids move and cast with the model


def test_the_reconstruction_term_is_a_registered_piece():
    """``matryoshka_widths`` is the ``matryoshka`` term written flat: both give the same loss; a term that is not
    registered, or an option it does not take, is named; a term and widths together are refused."""
    from sae_zoo.reconstruction import Matryoshka, create_reconstruction

    torch.manual_seed(0)
    head = create_encoder("topk", d_model=4, n_latents=8, k=2)
    x = torch.randn(16, 4)
    flat = SparseCoder(head, Dictionary(8, 4), l1_coeff=0.0, matryoshka_widths=[2, 8])
    named = SparseCoder(head, Dictionary(8, 4), l1_coeff=0.0, reconstruction={"name": "matryoshka", "widths": [2, 8]})
    named.dictionary.load_state_dict(flat.dictionary.state_dict())
    plain = SparseCoder(head, Dictionary(8, 4), l1_coeff=0.0)
    plain.dictionary.load_state_dict(flat.dictionary.state_dict())
    assert isinstance(flat.reconstruction, Matryoshka) and flat.reconstruction == named.reconstruction
    losses = [m.training_losses(x)["mse"] for m in (flat, named, plain)]
    assert losses[0] == losses[1] and losses[0] > losses[2]  # the prefix of 2 latents adds its own error
    with pytest.raises(ValueError, match="unknown reconstruction term 'nope'; registered: matryoshka, mse"):
        create_reconstruction("nope")
    with pytest.raises(ValueError, match="reconstruction.width"):
        create_reconstruction({"name": "matryoshka", "width": [8]})
    with pytest.raises(ValueError, match="give one"):
        SparseCoder(head, Dictionary(8, 4), matryoshka_widths=[2, 8], reconstruction="mse")
    with pytest.raises(ValueError, match="matryoshka_widths must end at n_latents"):
        SparseCoder(head, Dictionary(8, 4), reconstruction={"name": "matryoshka", "widths": [2, 6]})

"""Transcoders: one decoder that writes a target (an MLP's output) from codes of the input (its input), with
an optional skip term, trained with the SAE machinery (Matryoshka prefixes, AuxK, a target L0)."""

import pytest
import torch
import torch.nn.functional as F

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data import Pair
from sae_zoo.training import TrainingAid, register_training_aid


def transcoder(**kwargs):
    torch.manual_seed(0)
    head = create_encoder("topk", d_model=8, n_latents=16, k=3)
    return SparseCoder(head, Dictionary(16, 5, bias=True), transcoder=True, **kwargs)


def test_the_output_is_the_decoded_codes_plus_the_skip_term():
    model = transcoder(skip_connection=True)
    with torch.no_grad():
        model.skip.weight.normal_()
    x = torch.randn(10, 8)
    codes = model.encode(x)
    expected = codes @ model.dictionary.atoms + model.dictionary.bias + x @ model.skip.weight.T  # SAELens's formula
    torch.testing.assert_close(model(x).x_hat, expected)
    assert model.hparams["skip_connection"] is True and model.hparams["transcoder"] is True


def test_the_loss_reconstructs_the_target_with_every_prefix_and_auxk_reads_the_targets_residual():
    model = transcoder(skip_connection=True, matryoshka_widths=[4, 16], auxk_coeff=0.5, auxk_k=2, dead_tokens=1,
                       sparse_decode=False)
    with torch.no_grad():
        model.skip.weight.normal_()
    x, y = torch.randn(12, 8), torch.randn(12, 5)
    model.dead_latents.tokens_since_fired[:8] = 100  # latents 0-7 dead
    losses = model.training_losses(Pair(x, y))
    codes, atoms, bias, skip = model.encode(x), model.dictionary.atoms, model.dictionary.bias, x @ model.skip.weight.T
    prefix = codes[:, :4] @ atoms[:4] + bias + skip
    full = codes @ atoms + bias + skip
    torch.testing.assert_close(losses["mse"], F.mse_loss(prefix, y) + F.mse_loss(full, y))
    dead = model.dead_latents.dead().nonzero().squeeze(-1)
    pre = (x @ model.encoder.linear.weight[dead].T + model.encoder.linear.bias[dead]).relu()
    values, picks = pre.topk(2, dim=-1)
    residual_hat = torch.zeros(12, 16).scatter(1, dead[picks], values) @ atoms
    torch.testing.assert_close(losses["auxk"], F.mse_loss(residual_hat, y - full))


def test_a_skip_transcoder_learns_a_linear_map_that_sparse_codes_only_approximate():
    """Targets that are a dense linear map of the input: the skip term learns it (FVU near 0); three codes of
    sixteen per sample only approximate it piecewise (here FVU about 0.04, hundreds of times worse)."""
    torch.manual_seed(1)
    mixing = torch.randn(5, 8) / 8 ** 0.5
    x = torch.randn(512, 8)
    y = x @ mixing.T

    def trained_fvu(**kwargs):
        model = transcoder(**kwargs)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            model.training_losses(Pair(x, y))["loss"].backward()
            optimizer.step()
        metrics = model.new_metrics(sync_on_compute=False)
        with torch.no_grad():
            model.eval().update_metrics(metrics, Pair(x, y))
        return float(metrics.compute()["fvu"])

    with_skip, without = trained_fvu(skip_connection=True, l1_coeff=0.0), trained_fvu(l1_coeff=0.0)
    assert with_skip < 1e-3 and without > 20 * with_skip


def test_a_transcoder_saves_and_reloads_its_skip_term(tmp_path):
    model = transcoder(skip_connection=True, train_skip=False)
    assert not model.skip.weight.requires_grad
    with torch.no_grad():
        model.skip.weight.normal_()
    model.save_pretrained(tmp_path / "tc")
    again = SparseCoder.from_pretrained(tmp_path / "tc")
    x = torch.randn(6, 8)
    assert again.transcoder and torch.equal(again(x).x_hat, model.eval()(x).x_hat)
    assert not again.skip.weight.requires_grad  # a frozen skip term stays frozen when trained further


@pytest.mark.parametrize("make, message", [
    (lambda: SparseCoder(create_encoder("topk", d_model=8, n_latents=16, k=3, subtract_decoder_bias=True),
                         Dictionary(16, 5, bias=True), transcoder=True), "decoder bias lies in the target's space"),
    (lambda: transcoder(tied_init=True), "cannot take tied_init=True: a tied start copies the decoder"),
    (lambda: transcoder(resample_every=10), "cannot take resample_every=10: resampling points dead atoms"),
    (lambda: transcoder(decoder_bias_init="mean"), "cannot take decoder_bias_init='mean'"),
    (lambda: transcoder(true_dictionary=torch.randn(16, 5)), "cannot take true_dictionary=tensor"),
    (lambda: SparseCoder(create_encoder("topk", d_model=8, n_latents=16, k=3), Dictionary(16, 5)),
     "an SAE reconstructs its input \\(a transcoder, family='transcoder', may write a width other than it reads"),
    (lambda: SparseCoder(create_encoder("topk", d_model=8, n_latents=16, k=3), Dictionary(16, 8), skip_connection=True),
     "skip_connection=True adds a linear map of the input to the output: a transcoder's"),
])
def test_what_a_transcoder_cannot_take_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_batches_say_what_is_learned_and_an_aid_must_know_the_target():
    model = transcoder()
    with pytest.raises(ValueError, match="a transcoder learns from Pair\\(x, target\\) batches"):
        model.training_losses(torch.randn(4, 8))
    sae = SparseCoder(create_encoder("topk", d_model=8, n_latents=16, k=3), Dictionary(16, 8))
    with pytest.raises(ValueError, match="a Pair\\(x, target\\) batch is a transcoder's"):
        sae.training_losses(Pair(torch.randn(4, 8), torch.randn(4, 8)))

    @register_training_aid("input_only_test_aid")
    class InputOnly(TrainingAid):
        def config(self):
            return {"name": self.name}

        def loss_terms(self, model, x, codes, x_hat):
            return {}

    with pytest.raises(ValueError, match="'input_only_test_aid' has no target argument in loss_terms"):
        transcoder(aids=[InputOnly()])

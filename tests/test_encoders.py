import pytest
import torch

import sae_zoo
from sae_zoo import Dictionary, create_encoder, list_encoders


def test_builtin_heads_are_registered():
    assert {"linear", "topk", "mlp"} <= set(list_encoders())
    assert list_encoders("top*") == ["topk"]


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="registered encoders: .*linear.*mlp.*topk"):
        create_encoder("lienar", d_model=4, n_latents=8)


def test_bad_kwarg_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) hiden for encoder 'mlp'; valid: hidden=256, bias=True"):
        create_encoder("mlp", d_model=4, n_latents=8, hiden=3)
    with pytest.raises(ValueError, match=r"missing argument\(s\) k for encoder 'topk'"):
        create_encoder("topk", d_model=4, n_latents=8)


def test_linear_is_relu_of_affine_map():
    head = create_encoder("linear", d_model=5, n_latents=9)
    x = torch.randn(13, 5)
    expected = torch.clamp(x @ head.linear.weight.T + head.linear.bias, min=0)
    torch.testing.assert_close(head(x, None), expected)


def test_topk_keeps_the_k_largest_pre_activations():
    head = create_encoder("topk", d_model=5, n_latents=9, k=3)
    x = torch.randn(50, 5)
    pre = head.linear(x)
    codes = head(x)
    assert ((codes != 0).sum(-1) <= 3).all()
    for row_pre, row_codes in zip(pre, codes):
        top = set(row_pre.topk(3).indices.tolist())
        kept = {i for i in range(9) if row_codes[i] != 0}
        assert kept <= top  # ReLU may zero a negative top-k value
        for i in top:
            assert row_codes[i] == max(row_pre[i].item(), 0.0)


def test_mlp_layers_follow_hidden_widths():
    head = create_encoder("mlp", d_model=4, n_latents=10, hidden=[16, 8], bias=False)
    shapes = [tuple(m.weight.shape) for m in head.net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(16, 4), (8, 16), (10, 8)]
    assert (head(torch.randn(3, 4)) >= 0).all()


@pytest.mark.parametrize("name, kwargs", [("linear", {}), ("topk", {"k": 2}), ("mlp", {"hidden": 7})])
def test_config_rebuilds_an_equivalent_head(name, kwargs):
    head = create_encoder(name, d_model=6, n_latents=11, **kwargs)
    config = head.config()
    assert config["name"] == name and config["d_model"] == 6 and config["n_latents"] == 11
    clone = create_encoder(**config)
    clone.load_state_dict(head.state_dict())
    x = torch.randn(20, 6)
    torch.testing.assert_close(clone(x), head(x))


def test_heads_survive_copy_and_pickle():
    import copy
    import io

    head = create_encoder("mlp", d_model=4, n_latents=8, hidden=5)
    buffer = io.BytesIO()
    torch.save(head, buffer)
    buffer.seek(0)
    x = torch.randn(3, 4)
    for clone in (copy.deepcopy(head), torch.load(buffer, weights_only=False)):
        assert clone.config() == head.config()
        torch.testing.assert_close(clone(x), head(x))


def test_wrong_input_width_names_the_shape():
    with pytest.raises(ValueError, match=r"width 6, got shape \(2, 5\)"):
        create_encoder("linear", d_model=6, n_latents=3)(torch.randn(2, 5))


def test_heads_accept_the_dictionary():
    d = Dictionary(8, 4)
    head = create_encoder("linear", d_model=4, n_latents=8)
    x = torch.randn(3, 4)
    torch.testing.assert_close(head(x, d), head(x))


def test_registering_a_non_head_is_refused():
    with pytest.raises(TypeError, match="EncoderHead subclass"):
        sae_zoo.register_encoder("nope")(object)

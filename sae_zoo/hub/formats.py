"""Other libraries' SAEs as pretrained dictionaries (and, where one matches, encoder heads), and export
to SAELens.

=====================  ==========================================  =====================================
format                 files                                       encoder reproduced as
=====================  ==========================================  =====================================
``saelens``            ``cfg.json`` + ``sae_weights.safetensors``  ``standard`` -> ``linear``, ``topk`` -> ``topk``
``sparsify``           ``cfg.json`` + ``sae.safetensors``          ``topk`` activation -> ``topk``
``dictionary_learning``  ``config.json`` + ``ae.pt``               ``AutoEncoder`` -> ``linear``, ``AutoEncoderTopK`` -> ``topk``
``sae_zoo``            ``config.json`` + ``model.safetensors``     the saved head
``sae_zoo_run``        ``config.yaml`` + ``model.ckpt``            the run's head (a ``sae-zoo fit`` run)
=====================  ==========================================  =====================================

The three libraries encode ``x - b_dec`` (SAELens when ``apply_b_dec_to_input``), which the heads
reproduce with ``subtract_decoder_bias=True``; ``b_dec`` becomes the dictionary's bias. sae_zoo keeps
atoms at unit norm, so a decoder with other row norms is renormalised and, for ReLU encoders, the norms
are folded into the encoder (as dictionary_learning's own loader does): reconstructions stay the
same and each code is the source's code times its atom's norm. Other encoders (JumpReLU, gated,
batch top-k, ...) load their decoder only; :attr:`PretrainedSAE.encoder_unavailable` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .. import __version__
from .._io import atomic_directory, atomic_write_json
from ..dictionary import Dictionary
from ..encoders import EncoderHead, LinearEncoder, TopKEncoder, create_encoder
from .files import (check_shape, list_files, read_json, read_safetensors, read_torch_state, require_keys,
                    resolve_file)

if TYPE_CHECKING:
    from ..model import SparseCoder

#: format -> (config file, weights file); load_sae recognises a format by these two files
FORMAT_FILES = {
    "sae_zoo": ("config.json", "model.safetensors"),
    "sae_zoo_run": ("config.yaml", "model.ckpt"),  # a run directory written by sae-zoo fit
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.pt"),
}
#: a top-k encoder's decoder must be unit-norm to this tolerance: rescaling would change the selection
UNIT_NORM_ATOL = 1e-4
#: the SAELens cfg.json layout export_saelens writes (SAELens >= 6 reads it as its own)
SAELENS_FORMAT_VERSION = "6.0.0"


@dataclass
class PretrainedSAE:
    """A loaded SAE: its decoder as a :class:`Dictionary` and, when a sae_zoo head reproduces its
    encoder, that head (else ``None``, with the reason in ``encoder_unavailable``)."""

    dictionary: Dictionary
    encoder: EncoderHead | None
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    encoder_unavailable: str | None = None

    def model(self, encoder: EncoderHead | None = None, **kwargs: Any) -> "SparseCoder":
        """A :class:`~sae_zoo.SparseCoder` of ``encoder`` (default: the source's own) and this dictionary."""
        from ..model import SparseCoder

        encoder = encoder if encoder is not None else self.encoder
        if encoder is None:
            raise ValueError(f"no sae_zoo head reproduces this {self.format} SAE's encoder ({self.encoder_unavailable}); "
                             "pass encoder=create_encoder(...) to pair another head with its dictionary")
        return SparseCoder(encoder, self.dictionary, **kwargs)


def detect_format(names: list[str], where: str) -> str:
    found = [fmt for fmt, files in FORMAT_FILES.items() if set(files) <= set(names)]
    if len(found) != 1:
        expected = "; ".join(f"{fmt}: {' + '.join(files)}" for fmt, files in FORMAT_FILES.items())
        problem = "matches several formats" if found else "holds no known SAE format"
        raise ValueError(f"{where} {problem} (files: {', '.join(names) or 'none'}); expected one of {expected}. "
                         "Pass format=... to choose")
    return found[0]


def load_sae(source: str | Path, *, format: str | None = None, subfolder: str | None = None,
             revision: str | None = None, trainable: bool = False, token: str | bool | None = None,
             cache_dir: str | Path | None = None, force_download: bool = False,
             local_files_only: bool = False) -> PretrainedSAE:
    """Load an SAE saved by SAELens, sparsify, dictionary_learning or sae_zoo from a local directory or
    a Hub repo (``subfolder`` picks one SAE of a repo that holds several). The format is detected from
    the files unless ``format`` names it. ``trainable`` decides whether the dictionary trains further."""
    if format is not None and format not in FORMAT_FILES:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMAT_FILES)}")
    where = f"{source}/{subfolder}" if subfolder else str(source)
    if format is None:
        format = detect_format(list_files(source, subfolder=subfolder, revision=revision, token=token), where)
    download = {"subfolder": subfolder, "revision": revision, "token": token, "cache_dir": cache_dir,
                "force_download": force_download, "local_files_only": local_files_only}
    if format in ("sae_zoo", "sae_zoo_run"):
        from ..model import SparseCoder
        from .run import load_run

        if subfolder:
            raise ValueError("subfolder applies to SAELens, sparsify and dictionary_learning repos")
        model = (load_run(source)[0] if format == "sae_zoo_run" else
                 SparseCoder.from_pretrained(source, **{k: v for k, v in download.items() if k != "subfolder"}))
        model.dictionary.requires_grad_(trainable)
        return PretrainedSAE(model.dictionary, model.encoder, format, dict(model.dictionary.provenance))
    config_path, weights_path = (resolve_file(source, name, **download) for name in FORMAT_FILES[format])
    provenance = {"format": format, "source": str(source), "subfolder": subfolder, "revision": revision}
    loader = {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning}[format]
    return loader(config_path, weights_path, trainable, {k: v for k, v in provenance.items() if v is not None})


def _assemble(fmt: str, weights_path: Path, *, W_dec: Tensor, b_dec: Tensor | None, kind: str | None,
              W_enc: Tensor | None = None, b_enc: Tensor | None = None, k: int | None = None,
              subtract_decoder_bias: bool = True, selection_uses_unit_atoms: bool = False, trainable: bool,
              provenance: dict[str, Any], unavailable: str | None = None) -> PretrainedSAE:
    """The dictionary of unit-norm atoms ``W_dec`` rows and, for ``kind`` ``linear``/``topk``, the head
    with encoder rows ``W_enc`` (``(n_latents, d_model)``) whose codes decode through it exactly."""
    W_dec = W_dec.detach().float()
    norms = W_dec.norm(dim=1)
    if not torch.all(norms > 0):
        raise ValueError(f"{weights_path}: decoder atoms {torch.nonzero(norms == 0).flatten().tolist()[:10]} have zero "
                         "norm, so they have no direction")
    b_dec = None if b_dec is None else b_dec.detach().float()
    dictionary = Dictionary.from_tensor(W_dec, trainable=trainable, bias=b_dec, provenance=provenance)
    n_latents, d_model = W_dec.shape
    unit = torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=UNIT_NORM_ATOL)
    if unavailable is None and kind == "topk" and not (unit or selection_uses_unit_atoms):
        unavailable = (f"its decoder atoms are not unit-norm (norms {norms.min():.4g}..{norms.max():.4g}), and folding "
                       "the norms into a top-k encoder would change which latents it selects")
    if unavailable is not None or kind is None:
        return PretrainedSAE(dictionary, None, fmt, provenance, unavailable or f"no {fmt} encoder")
    encoder = create_encoder(kind, d_model=d_model, n_latents=n_latents, bias=True,
                             subtract_decoder_bias=subtract_decoder_bias, **({"k": int(k)} if kind == "topk" else {}))
    weight, bias = W_enc.detach().float(), b_enc.detach().float()
    if kind == "linear" or selection_uses_unit_atoms:
        # ReLU(n z) = n ReLU(z) for n > 0: scaling latent i's encoder row by its atom's norm makes
        # code_i * unit_atom_i equal the source's code_i * W_dec_i
        weight, bias = weight * norms[:, None], bias * norms
    with torch.no_grad():
        encoder.linear.weight.copy_(weight)
        encoder.linear.bias.copy_(bias)
    return PretrainedSAE(dictionary, encoder, fmt, provenance)


def _saelens(cfg_path: Path, weights_path: Path, trainable: bool, provenance: dict[str, Any]) -> PretrainedSAE:
    """SAELens 6 (``metadata`` block, ``architecture``) and earlier (flat keys, ``activation_fn``) configs."""
    cfg = read_json(cfg_path)
    require_keys(cfg_path, cfg, ["d_in", "d_sae"])
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    meta = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else cfg
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    architecture, k = cfg.get("architecture") or "standard", cfg.get("k")
    if activation == "topk":  # SAELens < 6 wrote top-k SAEs as a standard SAE with a top-k activation
        architecture, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    normalize = cfg.get("normalize_activations") or "none"
    normalize = {True: "expected_average_only_in", False: "none"}.get(normalize, normalize)
    tensors = read_safetensors(weights_path)
    require_keys(weights_path, tensors, ["W_dec", "b_dec"], what="tensor")
    check_shape(weights_path, "W_dec", tensors["W_dec"], (d_sae, d_in), f"d_sae={d_sae}, d_in={d_in} in {cfg_path.name}")
    check_shape(weights_path, "b_dec", tensors["b_dec"], (d_in,), f"d_in={d_in} in {cfg_path.name}")
    scaling = tensors.get("scaling_factor")
    unavailable = None
    if architecture not in ("standard", "topk"):
        unavailable = f"no sae_zoo head reproduces SAELens's {architecture!r} encoder"
    elif activation not in ("relu", "topk"):
        unavailable = f"no sae_zoo head reproduces the activation_fn {activation!r}"
    elif normalize in ("constant_norm_rescale", "layer_norm"):
        unavailable = (f"normalize_activations={normalize!r} rescales every input and output, which an encoder "
                       "head and a dictionary cannot reproduce")
    elif scaling is not None and not torch.all(scaling == 1):
        unavailable = "its finetuning scaling_factor rescales the codes"
    kind = {"standard": "linear", "topk": "topk"}.get(architecture)
    if unavailable is None:
        require_keys(weights_path, tensors, ["W_enc", "b_enc"], what="tensor")
        check_shape(weights_path, "W_enc", tensors["W_enc"], (d_in, d_sae), f"d_in={d_in}, d_sae={d_sae} in {cfg_path.name}")
        check_shape(weights_path, "b_enc", tensors["b_enc"], (d_sae,), f"d_sae={d_sae} in {cfg_path.name}")
        if kind == "topk" and k is None:
            raise ValueError(f"{cfg_path}: a top-k SAE needs 'k'")
    provenance.update({
        "architecture": architecture, "hook_name": meta.get("hook_name") or meta.get("hook_point"),
        "model_name": meta.get("model_name"), "sae_lens_version": meta.get("sae_lens_version"),
        "dtype": cfg.get("dtype"), "normalize_activations": normalize})
    if normalize == "expected_average_only_in":
        provenance["note"] = ("trained on inputs scaled by a dataset-wide factor; like SAELens's own loader from "
                              "disk, the loaded model applies no scaling")
    return _assemble("saelens", weights_path, W_dec=tensors["W_dec"], b_dec=tensors["b_dec"], kind=kind,
                     W_enc=tensors["W_enc"].T if "W_enc" in tensors else None, b_enc=tensors.get("b_enc"), k=k,
                     subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", True)),
                     selection_uses_unit_atoms=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                     trainable=trainable, provenance={k_: v for k_, v in provenance.items() if v is not None},
                     unavailable=unavailable)


def _sparsify(cfg_path: Path, weights_path: Path, trainable: bool, provenance: dict[str, Any]) -> PretrainedSAE:
    cfg = read_json(cfg_path)
    require_keys(cfg_path, cfg, ["d_in"])
    if cfg.get("transcode"):
        raise ValueError(f"{cfg_path}: 'transcode' is true: a transcoder predicts another layer's output, so its "
                         "decoder is not a dictionary of its input")
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    tensors = read_safetensors(weights_path)
    require_keys(weights_path, tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], what="tensor")
    because = f"d_in={d_in} and {n} latents in {cfg_path.name}"
    for name, shape in {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}.items():
        check_shape(weights_path, name, tensors[name], shape, because)
    activation = cfg.get("activation", "topk")
    unavailable = None
    if activation != "topk":
        unavailable = f"no sae_zoo head reproduces sparsify's {activation!r} activation"
    elif cfg.get("skip_connection") or "W_skip" in tensors:
        unavailable = "its skip connection adds x @ W_skip^T to the reconstruction, outside the dictionary"
    provenance.update({"k": cfg.get("k"), "hookpoint": provenance.get("subfolder") or cfg_path.parent.name})
    return _assemble("sparsify", weights_path, W_dec=tensors["W_dec"], b_dec=tensors["b_dec"], kind="topk",
                     W_enc=tensors["encoder.weight"], b_enc=tensors["encoder.bias"], k=cfg.get("k", 32),
                     trainable=trainable, provenance=provenance, unavailable=unavailable)


def _dictionary_learning(cfg_path: Path, weights_path: Path, trainable: bool,
                         provenance: dict[str, Any]) -> PretrainedSAE:
    config = read_json(cfg_path)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise ValueError(f"{cfg_path}: missing key 'trainer.dict_class' (dictionary_learning writes it)")
    dict_class = trainer["dict_class"]
    state = read_torch_state(weights_path)
    if isinstance(state.get("ae"), dict):  # a mid-training backup: {"step", "ae", "optimizer", ...}
        state = state["ae"]
    if "W_dec" in state:
        W_dec = state["W_dec"]
    elif "decoder.weight" in state:
        W_dec = state["decoder.weight"].T
    else:
        raise ValueError(f"{weights_path}: no decoder ('W_dec' or 'decoder.weight'); found {', '.join(sorted(state))}")
    bias_key = next((k for k in ("b_dec", "bias", "decoder_bias", "decoder.bias") if k in state), None)
    n, d = W_dec.shape
    for name, shape in {"dict_size": n, "activation_dim": d}.items():
        if name in trainer and int(trainer[name]) != shape:
            raise ValueError(f"{weights_path}: the decoder has {name} {shape}, but {cfg_path.name} says "
                             f"trainer.{name}={trainer[name]}")
    kind = {"AutoEncoder": "linear", "AutoEncoderTopK": "topk"}.get(dict_class)
    unavailable = None if kind else f"no sae_zoo head reproduces dictionary_learning's {dict_class} encoder"
    k = None
    if kind:
        require_keys(weights_path, state, ["encoder.weight", "encoder.bias"], what="tensor")
        check_shape(weights_path, "encoder.weight", state["encoder.weight"], (n, d), "the decoder's shape")
        if bias_key is None:
            raise ValueError(f"{weights_path}: {dict_class} needs its decoder bias ('bias' or 'b_dec')")
        k = int(state["k"]) if "k" in state else trainer.get("k")
        if kind == "topk" and k is None:
            raise ValueError(f"{cfg_path}: an AutoEncoderTopK needs 'trainer.k'")
    provenance.update({key: trainer.get(key) for key in ("dict_class", "trainer_class", "lm_name", "layer",
                                                          "submodule_name", "norm_factor") if trainer.get(key) is not None})
    if trainer.get("lm_name"):
        provenance["model_name"] = trainer["lm_name"]
    return _assemble("dictionary_learning", weights_path, W_dec=W_dec, b_dec=state.get(bias_key) if bias_key else None,
                     kind=kind, W_enc=state.get("encoder.weight"), b_enc=state.get("encoder.bias"), k=k,
                     trainable=trainable, provenance=provenance, unavailable=unavailable)


def export_saelens(model: "SparseCoder", out_dir: str | Path, *, hook_name: str | None = None,
                   model_name: str | None = None, decoder_only: bool = False) -> Path:
    """Write ``model`` as a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) that SAELens's
    ``SAE.load_from_disk`` reads. ``linear`` heads export as ``standard`` SAEs and ``topk`` heads as
    ``topk`` ones, with identical codes; ``decoder_only=True`` exports any head's dictionary with a
    tied encoder ``W_enc = W_dec^T`` (SAELens has no iterative or MLP encoders)."""
    encoder, dictionary = model.encoder, model.dictionary
    if not decoder_only and not isinstance(encoder, (LinearEncoder, TopKEncoder)):
        raise ValueError(f"SAELens has no encoder like sae_zoo's {encoder.name!r} head; export a linear or topk head, "
                         "or pass decoder_only=True to export the dictionary with a tied encoder (W_enc = W_dec^T)")
    W_dec = dictionary.weight.detach().float().cpu()
    n_latents, d_model = W_dec.shape
    b_dec = (dictionary.bias.detach().float().cpu() if dictionary.bias is not None else torch.zeros(d_model))
    if decoder_only:
        W_enc, b_enc, subtract, architecture = W_dec.T, torch.zeros(n_latents), dictionary.bias is not None, "standard"
    else:
        linear = encoder.linear
        W_enc = linear.weight.detach().float().cpu().T
        b_enc = linear.bias.detach().float().cpu() if linear.bias is not None else torch.zeros(n_latents)
        subtract = encoder.subtract_decoder_bias
        architecture = "topk" if isinstance(encoder, TopKEncoder) else "standard"
    cfg: dict[str, Any] = {
        "architecture": architecture, "d_in": d_model, "d_sae": n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": bool(subtract), "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                     "model_name": model_name or dictionary.provenance.get("model_name"),
                     "hook_name": hook_name or dictionary.provenance.get("hook_name"),
                     "exported_by": f"sae_zoo {__version__}",
                     "sae_zoo_encoder": "tied (decoder only)" if decoder_only else encoder.name}}
    if architecture == "topk":
        cfg.update({"k": encoder.k, "rescale_acts_by_decoder_norm": False})
    tensors = {"W_enc": W_enc.contiguous(), "b_enc": b_enc.contiguous(), "W_dec": W_dec.contiguous(),
               "b_dec": b_dec.contiguous()}
    with atomic_directory(out_dir) as staging:
        save_file({k: v.clone() for k, v in tensors.items()}, str(staging / FORMAT_FILES["saelens"][1]))
        atomic_write_json(staging / FORMAT_FILES["saelens"][0], cfg)
    return Path(out_dir)

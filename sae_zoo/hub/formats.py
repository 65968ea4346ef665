"""Other libraries' SAEs as pretrained dictionaries with their own encoders, and export to SAELens.

=======================  ==========================================  ===========================================
format                   files                                       encoder reproduced as
=======================  ==========================================  ===========================================
``saelens``              ``cfg.json`` + ``sae_weights.safetensors``  ``standard`` -> ``linear``, ``topk`` -> ``topk``,
                                                                     ``jumprelu`` -> ``jumprelu`` (also BatchTopK and
                                                                     Matryoshka SAEs saved for inference),
                                                                     ``gated`` -> ``gated``,
                                                                     ``matching_pursuit`` -> ``mp``
``sparsify``             ``cfg.json`` + ``sae.safetensors``          ``topk`` activation -> ``topk``
``dictionary_learning``  ``config.json`` + ``ae.pt``                 ``AutoEncoder`` -> ``linear``, ``AutoEncoderTopK``
                                                                     -> ``topk``, ``BatchTopKSAE`` and
                                                                     ``MatryoshkaBatchTopKSAE`` -> ``batchtopk``,
                                                                     ``JumpReluAutoEncoder`` -> ``jumprelu``,
                                                                     ``GatedAutoEncoder`` -> ``gated``
``gemma_scope``          ``params.npz``                              ``jumprelu``
``sae_zoo``              ``config.json`` + ``model.safetensors``     the saved head
``sae_zoo_run``          ``config.yaml`` + ``model.ckpt``            the run's head (a ``sae-zoo fit`` run)
=======================  ==========================================  ===========================================

The heads give the source's codes exactly, and the reconstructions too. SAELens, sparsify and
dictionary_learning encode ``x - b_dec`` (SAELens when ``apply_b_dec_to_input``), which the heads
reproduce with ``subtract_decoder_bias=True``; ``b_dec`` becomes the dictionary's bias. A decoder whose
rows are not unit-norm keeps its norms (``Dictionary(atom_norms=True)``), so the codes stay in the
source's units, as Neuronpedia shows them and as thresholds are set. Where the source's codes are those
of unit atoms (SAELens's ``rescale_acts_by_decoder_norm``; dictionary_learning's ``AutoEncoder``, whose own
loader folds the norms into the encoder), the dictionary holds unit atoms and the head the folded encoder.

Each reader turns its library's files into one layout, a :class:`~sae_zoo.encoders.ForeignSAE` named by
the field's architecture (``standard``, ``topk``, ...), and the head registered for that architecture
converts it (``EncoderHead.from_foreign``; ``to_foreign`` exports). This module holds no per-head
code: a new head that declares an architecture loads and exports without any edit here. Checkpoints
whose architecture no head declares load their decoder only; :attr:`PretrainedSAE.encoder_unavailable`
says why.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from .._io import (atomic_directory, atomic_write_json, check_shape, read_json, read_npz, read_safetensors,
                   read_torch_state, require_keys)
from ..dictionary import Dictionary
from ..encoders import EncoderHead, ForeignSAE, UnsupportedConversion, converter_for
from ..model import SparseCoder
from ..pretrained.files import is_local, list_files, resolve_file
from .catalogue import close_releases, find_entry
from .run import load_run

#: format -> its files (config, then weights); load_sae recognises a format by them
FORMAT_FILES = {
    "sae_zoo": ("config.json", "model.safetensors"),
    "sae_zoo_run": ("config.yaml", "model.ckpt"),  # a run directory written by sae-zoo fit
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.pt"),
    "gemma_scope": ("params.npz",),
}
#: how each library is named in messages
LIBRARY_NAMES = {"saelens": "SAELens", "sparsify": "sparsify", "dictionary_learning": "dictionary_learning",
                 "gemma_scope": "Gemma Scope"}
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

    def model(self, encoder: EncoderHead | None = None, **kwargs: Any) -> SparseCoder:
        """A :class:`~sae_zoo.SparseCoder` of ``encoder`` (default: the source's own) and this dictionary, in
        eval mode (as ``from_pretrained`` returns models: a BatchTopK head then applies its threshold)."""
        encoder = encoder if encoder is not None else self.encoder
        if encoder is None:
            raise ValueError(f"no sae_zoo head reproduces this {self.format} SAE's encoder ({self.encoder_unavailable}); "
                             "pass encoder=create_encoder(...) to pair another head with its dictionary")
        return SparseCoder(encoder, self.dictionary, **kwargs).eval()


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
    a Hub repo (``subfolder`` picks one SAE of a repo that holds several), or a catalogue entry
    ``"release/sae_id"`` (:func:`list_pretrained`), whose LM, hook and normalisation then come with it.
    The format is detected from the files unless ``format`` names it. ``trainable`` decides whether the
    dictionary trains further."""
    if format is not None and format not in FORMAT_FILES:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMAT_FILES)}")
    entry = None if is_local(source) else find_entry(str(source))
    if entry is not None:
        if subfolder or format:
            raise ValueError(f"{source!r} is a catalogue entry: it names its own repo folder and format")
        sae = load_sae(entry.repo_id, format=entry.format, subfolder=entry.path, revision=revision,
                       trainable=trainable, token=token, cache_dir=cache_dir, force_download=force_download,
                       local_files_only=local_files_only)
        sae.metadata.update(entry.provenance())
        sae.dictionary.provenance.update(entry.provenance())
        return sae
    if not is_local(source) and str(source).count("/") > 1:  # a Hub repo id has one '/' at most
        raise FileNotFoundError(f"no local folder {str(source)!r} exists, and it is neither a Hub repo id (one '/' "
                                f"at most) nor a catalogue entry{close_releases(str(source))} (see "
                                "sae_zoo.list_pretrained())")
    where = f"{source}/{subfolder}" if subfolder else str(source)
    if format is None:
        try:
            names = list_files(source, subfolder=subfolder, revision=revision, token=token)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}{close_releases(str(source))}") from None
        format = detect_format(names, where)
    download = {"subfolder": subfolder, "revision": revision, "token": token, "cache_dir": cache_dir,
                "force_download": force_download, "local_files_only": local_files_only}
    if format in ("sae_zoo", "sae_zoo_run"):
        if subfolder:
            raise ValueError("subfolder applies to SAELens, sparsify and dictionary_learning repos")
        model = (load_run(source)[0] if format == "sae_zoo_run" else
                 SparseCoder.from_pretrained(source, **{k: v for k, v in download.items() if k != "subfolder"}))
        model.dictionary.requires_grad_(trainable)
        return PretrainedSAE(model.dictionary, model.encoder, format, dict(model.dictionary.provenance))
    paths = [resolve_file(source, name, **download) for name in FORMAT_FILES[format]]
    provenance = {k: v for k, v in {"format": format, "source": str(source), "subfolder": subfolder,
                                    "revision": revision}.items() if v is not None}
    sae, unavailable = READERS[format](*paths, provenance)
    return _assemble(format, sae, trainable, provenance, unavailable)


def _assemble(fmt: str, sae: ForeignSAE, trainable: bool, provenance: dict[str, Any],
              unavailable: str | None) -> PretrainedSAE:
    """The dictionary of ``sae``'s decoder (its row norms kept where the codes need them) and, where a
    registered head converts its architecture, that head, whose codes are the source's."""
    norms = sae.decoder_norms
    if not torch.all(norms > 0):
        raise ValueError(f"{sae.source}: decoder atoms {torch.nonzero(norms == 0).flatten().tolist()[:10]} have zero "
                         "norm, so they have no direction")
    b_dec = None if sae.b_dec is None else sae.b_dec.detach().float()
    unit = torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    dictionary = Dictionary.from_tensor(sae.W_dec.detach().float(), trainable=trainable, bias=b_dec,
                                        provenance=provenance, keep_norms=sae.keeps_norms and not unit)
    encoder = None
    if unavailable is None:
        head_class = converter_for(sae.architecture)
        if head_class is None:
            unavailable = f"no sae_zoo head reproduces {LIBRARY_NAMES[fmt]}'s {sae.architecture!r} encoder"
        else:
            try:
                encoder = head_class.from_foreign(sae)
            except UnsupportedConversion as e:
                unavailable = str(e)
    return PretrainedSAE(dictionary, encoder, fmt, provenance, unavailable)


# ---- readers: one library's files -> ForeignSAE (and why its encoder cannot be reproduced, if so) ----

#: a reader takes the format's files (FORMAT_FILES order) and the provenance to fill in
Reader = Callable[..., tuple[ForeignSAE, "str | None"]]


def _saelens(cfg_path: Path, weights_path: Path, provenance: dict[str, Any]) -> tuple[ForeignSAE, str | None]:
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
    if "W_enc" in tensors:
        check_shape(weights_path, "W_enc", tensors["W_enc"], (d_in, d_sae), f"d_in={d_in}, d_sae={d_sae} in {cfg_path.name}")
    if "b_enc" in tensors:
        check_shape(weights_path, "b_enc", tensors["b_enc"], (d_sae,), f"d_sae={d_sae} in {cfg_path.name}")
    scaling = tensors.get("scaling_factor")
    unavailable = None
    if activation not in ("relu", "topk"):
        unavailable = f"no sae_zoo head reproduces the activation_fn {activation!r}"
    elif normalize in ("constant_norm_rescale", "layer_norm", "covariance_whitening"):
        unavailable = (f"normalize_activations={normalize!r} rescales every input and output, which an encoder "
                       "head and a dictionary cannot reproduce")
    elif scaling is not None and not torch.all(scaling == 1):
        unavailable = "its finetuning scaling_factor rescales the codes"
    provenance.update({key: value for key, value in {
        "architecture": architecture, "hook_name": meta.get("hook_name") or meta.get("hook_point"),
        "model_name": meta.get("model_name"), "sae_lens_version": meta.get("sae_lens_version"),
        "dtype": cfg.get("dtype"), "normalize_activations": normalize}.items() if value is not None})
    if normalize == "expected_average_only_in":
        provenance["note"] = ("trained on inputs scaled by a dataset-wide factor; like SAELens's own loader from "
                              "disk, the loaded model applies no scaling")
    params = {name: t for name, t in tensors.items() if name not in ("W_enc", "b_enc", "W_dec", "b_dec")}
    config = {"k": k, "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
              "unit_atom_codes": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
              **{key: cfg[key] for key in ("max_iterations", "residual_threshold", "stop_on_duplicate_support")
                 if key in cfg}}
    W_enc = tensors["W_enc"].T if "W_enc" in tensors else None
    return ForeignSAE(architecture, W_dec=tensors["W_dec"], b_dec=tensors["b_dec"], W_enc=W_enc,
                      b_enc=tensors.get("b_enc"), config=config, params=params, source=str(weights_path)), unavailable


def _sparsify(cfg_path: Path, weights_path: Path, provenance: dict[str, Any]) -> tuple[ForeignSAE, str | None]:
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
    unavailable = None
    if cfg.get("skip_connection") or "W_skip" in tensors:
        unavailable = "its skip connection adds x @ W_skip^T to the reconstruction, outside the dictionary"
    provenance.update({"k": cfg.get("k"), "hookpoint": provenance.get("subfolder") or cfg_path.parent.name})
    sae = ForeignSAE(cfg.get("activation", "topk"), W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
                     W_enc=tensors["encoder.weight"], b_enc=tensors["encoder.bias"],
                     config={"k": cfg.get("k", 32), "apply_b_dec_to_input": True}, source=str(weights_path))
    return sae, unavailable


#: dictionary_learning's classes -> (the field's architecture, its state-dict names -> ForeignSAE names)
DICTIONARY_LEARNING_CLASSES: dict[str, tuple[str, dict[str, str]]] = {
    "AutoEncoder": ("standard", {"bias": "b_dec"}),
    "AutoEncoderTopK": ("topk", {}),
    "BatchTopKSAE": ("batchtopk", {}),
    "MatryoshkaBatchTopKSAE": ("matryoshka_batchtopk", {}),
    "JumpReluAutoEncoder": ("jumprelu", {}),
    "GatedAutoEncoder": ("gated", {"decoder_bias": "b_dec", "gate_bias": "b_gate", "mag_bias": "b_mag"}),
}


def _dictionary_learning(cfg_path: Path, weights_path: Path,
                         provenance: dict[str, Any]) -> tuple[ForeignSAE, str | None]:
    """Its classes keep the encoder as ``encoder.weight`` ``(n, d)`` or ``W_enc`` ``(d, n)``, the decoder as
    ``decoder.weight`` ``(d, n)`` or ``W_dec`` ``(n, d)``. Each class's own ``encode``/``decode`` is reproduced;
    for ``AutoEncoder`` that is what its ``from_pretrained`` gives (the decoder normalised, the norms folded
    into the encoder)."""
    config = read_json(cfg_path)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise ValueError(f"{cfg_path}: missing key 'trainer.dict_class' (dictionary_learning writes it)")
    dict_class = trainer["dict_class"]
    if dict_class not in DICTIONARY_LEARNING_CLASSES:
        raise ValueError(f"{cfg_path}: trainer.dict_class {dict_class!r} is not a dictionary_learning class sae_zoo "
                         f"reads (known: {', '.join(DICTIONARY_LEARNING_CLASSES)})")
    architecture, renames = DICTIONARY_LEARNING_CLASSES[dict_class]
    state = read_torch_state(weights_path)
    if isinstance(state.get("ae"), dict):  # a mid-training backup: {"step", "ae", "optimizer", ...}
        state = state["ae"]
    state = {renames.get(name, name): value for name, value in state.items()}
    if "W_dec" in state:
        W_dec = state["W_dec"]
    elif "decoder.weight" in state:
        W_dec = state["decoder.weight"].T
    else:
        raise ValueError(f"{weights_path}: no decoder ('W_dec' or 'decoder.weight'); found {', '.join(sorted(state))}")
    n, d = W_dec.shape
    for name, shape in {"dict_size": n, "activation_dim": d}.items():
        if name in trainer and int(trainer[name]) != shape:
            raise ValueError(f"{weights_path}: the decoder has {name} {shape}, but {cfg_path.name} says "
                             f"trainer.{name}={trainer[name]}")
    if "W_enc" in state:
        check_shape(weights_path, "W_enc", state["W_enc"], (d, n), "the decoder's shape, transposed")
        W_enc, b_enc = state["W_enc"].T, state.get("b_enc")
    else:
        W_enc, b_enc = state.get("encoder.weight"), state.get("encoder.bias")
    if W_enc is not None:
        check_shape(weights_path, "encoder", W_enc, (n, d), "the decoder's shape")
    if "b_dec" not in state:
        raise ValueError(f"{weights_path}: {dict_class} needs its decoder bias ('b_dec', 'bias' or 'decoder_bias')")
    k = int(state["k"]) if "k" in state else trainer.get("k")
    if architecture in ("topk", "batchtopk", "matryoshka_batchtopk") and k is None:
        raise ValueError(f"{cfg_path}: a {dict_class} needs 'k' (in the state dict or trainer.k)")
    provenance.update({key: trainer.get(key) for key in ("dict_class", "trainer_class", "lm_name", "layer",
                                                          "submodule_name", "norm_factor") if trainer.get(key) is not None})
    if "group_sizes" in state:
        provenance["group_sizes"] = [int(g) for g in state["group_sizes"]]
    if trainer.get("lm_name"):
        provenance["model_name"] = trainer["lm_name"]
    params = {name: state[name] for name in ("threshold", "b_gate", "r_mag", "b_mag") if name in state}
    sae = ForeignSAE(architecture, W_dec=W_dec, b_dec=state["b_dec"], W_enc=W_enc, b_enc=b_enc, params=params,
                     config={"k": k, "apply_b_dec_to_input": architecture != "jumprelu",
                             "unit_atom_codes": dict_class == "AutoEncoder"},
                     source=str(weights_path))
    return sae, None


#: the arrays of a Gemma Scope ``params.npz``: name -> shape in terms of (n_latents, d_model)
GEMMA_SCOPE_ARRAYS = {"W_enc": ("d", "n"), "W_dec": ("n", "d"), "b_enc": ("n",), "b_dec": ("d",), "threshold": ("n",)}


def _gemma_scope(params_path: Path, provenance: dict[str, Any]) -> tuple[ForeignSAE, str | None]:
    """Google DeepMind's own layout: JumpReLU SAEs, ``codes = ReLU(z) * (z > threshold)`` with
    ``z = x @ W_enc + b_enc`` (no decoder bias subtracted), ``x_hat = codes @ W_dec + b_dec``."""
    arrays = read_npz(params_path)
    require_keys(params_path, arrays, list(GEMMA_SCOPE_ARRAYS), what="array")
    n, d = arrays["W_dec"].shape if arrays["W_dec"].ndim == 2 else (0, 0)
    sizes = {"n": n, "d": d}
    for name, dims in GEMMA_SCOPE_ARRAYS.items():
        check_shape(params_path, name, arrays[name], tuple(sizes[dim] for dim in dims),
                    f"W_dec has shape {tuple(arrays['W_dec'].shape)}: (n_latents, d_model)")
    # Gemma Scope's repos name each SAE's folder layer_L/width_W/average_l0_N
    layer = re.search(r"layer_(\d+)", provenance.get("subfolder") or str(params_path.parent))
    provenance.update({"architecture": "jumprelu", **({"layer": int(layer.group(1))} if layer else {})})
    sae = ForeignSAE("jumprelu", W_dec=arrays["W_dec"], b_dec=arrays["b_dec"], W_enc=arrays["W_enc"].T,
                     b_enc=arrays["b_enc"], params={"threshold": arrays["threshold"]},
                     config={"apply_b_dec_to_input": False}, source=str(params_path))
    return sae, None


READERS: dict[str, Reader] = {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning,
                              "gemma_scope": _gemma_scope}


def fold_input_scale(sae: ForeignSAE, scale: float) -> ForeignSAE:
    """``sae``, trained on inputs multiplied by ``scale`` (a run with ``normalize: true``), as an SAE of the raw
    inputs with the same codes: ``W_enc`` times ``scale``, ``W_dec`` and ``b_dec`` over it (then
    ``(x - b_dec / s) (s W_enc)^T = (s x - b_dec) W_enc^T``, and the reconstruction is the scaled one over
    ``s``). SAELens's own ``normalize_activations`` cannot say this: its loaders apply no scale. Matching
    pursuit takes ``r . w`` as a code, so its codes change with the scale of the input and cannot be kept."""
    if sae.architecture == "matching_pursuit":
        raise ValueError(f"this run was trained on activations scaled by {scale:g} (data.normalize: true), and "
                         "SAELens's matching pursuit's codes scale with its input, so no export gives this model's "
                         "codes on raw activations; train with data.normalize=false to export it")
    if sae.config.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"cannot fold the input scale {scale:g} into an SAE that rescales its codes by the decoder "
                         "norms (rescale_acts_by_decoder_norm)")
    return dataclasses.replace(sae, W_enc=None if sae.W_enc is None else sae.W_enc * scale, W_dec=sae.W_dec / scale,
                               b_dec=None if sae.b_dec is None else sae.b_dec / scale)


def export_saelens(model: SparseCoder, out_dir: str | Path, *, hook_name: str | None = None,
                   model_name: str | None = None, decoder_only: bool = False) -> Path:
    """Write ``model`` as a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) that SAELens's
    ``SAE.load_from_disk`` reads, through the head's ``to_foreign``, with identical codes (on raw activations,
    for a run trained on normalised ones: :func:`fold_input_scale`): ``linear`` heads
    export as ``standard`` SAEs, ``topk``, ``jumprelu`` and ``gated`` as themselves, ``mp`` as
    ``matching_pursuit``, ``batchtopk`` as the ``jumprelu`` SAE SAELens saves for inference.
    ``decoder_only=True`` exports any head's dictionary with a tied encoder ``W_enc = W_dec^T`` (SAELens
    has no MLP or FISTA encoders)."""
    encoder, dictionary = model.encoder, model.dictionary
    if decoder_only:
        sae = ForeignSAE.of_dictionary("standard", dictionary, W_enc=dictionary.atoms,
                                       b_enc=torch.zeros(dictionary.n_latents),
                                       config={"apply_b_dec_to_input": dictionary.bias is not None})
    else:
        try:
            sae = encoder.to_foreign(dictionary)
        except UnsupportedConversion as e:
            raise ValueError(f"SAELens has no encoder like sae_zoo's {encoder.name!r} head ({e}); export a head that "
                             "converts (see sae_zoo.encoders.list_architectures), or pass decoder_only=True to export "
                             "the dictionary with a tied encoder (W_enc = W_dec^T)") from None
    scale = float(dictionary.provenance.get("input_scale", 1.0))
    if scale != 1.0:
        sae = fold_input_scale(sae, scale)
    cfg: dict[str, Any] = {
        "architecture": sae.architecture, "d_in": sae.d_model, "d_sae": sae.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": bool(sae.config.get("apply_b_dec_to_input", False)),
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                     "model_name": model_name or dictionary.provenance.get("model_name"),
                     "hook_name": hook_name or dictionary.provenance.get("hook_name"),
                     "exported_by": f"sae_zoo {version('sae_zoo')}",
                     "sae_zoo_encoder": "tied (decoder only)" if decoder_only else encoder.name,
                     **({"sae_zoo_input_scale_folded": scale} if scale != 1.0 else {})}}
    cfg.update({k: v for k, v in sae.config.items() if k != "apply_b_dec_to_input"})
    tensors = {"W_dec": sae.W_dec, "b_dec": torch.zeros(sae.d_model) if sae.b_dec is None else sae.b_dec, **sae.params}
    if sae.W_enc is not None:  # matching pursuit's encoder is its decoder
        tensors["W_enc"] = sae.W_enc.T
    if sae.b_enc is not None:  # a gated SAE has b_gate and b_mag instead
        tensors["b_enc"] = sae.b_enc
    with atomic_directory(out_dir, replaces=FORMAT_FILES["saelens"]) as staging:
        save_file({k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()},
                  str(staging / FORMAT_FILES["saelens"][1]))
        atomic_write_json(staging / FORMAT_FILES["saelens"][0], cfg)
    return Path(out_dir)

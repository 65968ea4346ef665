"""Other libraries' SAEs as pretrained dictionaries with their own encoders, and export to SAELens.

=======================  ==========================================  ===========================================
format                   files                                       encoder reproduced as
=======================  ==========================================  ===========================================
``saelens``              ``cfg.json`` + ``sae_weights.safetensors``  ``standard`` -> ``linear``, ``topk`` -> ``topk``,
                                                                     ``jumprelu`` -> ``jumprelu`` (also BatchTopK and
                                                                     Matryoshka SAEs saved for inference),
                                                                     ``gated`` -> ``gated``,
                                                                     ``matching_pursuit`` -> ``mp``; transcoders:
                                                                     ``(skip_)transcoder`` -> ``linear``,
                                                                     ``jumprelu_(skip_)transcoder`` -> ``jumprelu``
``sparsify``             ``cfg.json`` + ``sae.safetensors``          ``topk`` activation -> ``topk`` (SAEs,
                                                                     transcoders and skip-transcoders)
``dictionary_learning``  ``config.json`` + ``ae.pt``                 ``AutoEncoder`` -> ``linear``, ``AutoEncoderTopK``
                                                                     -> ``topk``, ``BatchTopKSAE`` and
                                                                     ``MatryoshkaBatchTopKSAE`` -> ``batchtopk``,
                                                                     ``JumpReluAutoEncoder`` -> ``jumprelu``,
                                                                     ``GatedAutoEncoder`` -> ``gated``
``gemma_scope``          ``params.npz``                              ``jumprelu``
``gemma_scope_2``        ``config.json`` + ``params.safetensors``    ``jumprelu`` (SAEs and transcoders, with their
                                                                     affine skip connection)
``circuit_tracer``       ``config.yaml`` + ``layer_{N}.safetensors`` per-layer transcoders: ReLU -> ``linear``,
                                                                     JumpReLU -> ``jumprelu`` (``layer=N`` picks one)
``sae_zoo``              ``config.json`` + ``model.safetensors``     the saved head
``sae_zoo_run``          ``config.yaml`` + ``model.ckpt``            the run's head (a ``sae-zoo fit`` run)
=======================  ==========================================  ===========================================

The heads give the source's codes exactly, and the reconstructions too. A transcoder loads as a
:class:`~sae_zoo.SparseCoder` with ``transcoder=True`` (its dictionary writes the target's width) and its
skip term, if any (:attr:`PretrainedSAE.skip`); ``export_saelens`` writes SAELens's transcoder formats. SAELens, sparsify and
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
                   read_torch_state, read_yaml, require_keys)
from ..dictionary import Dictionary
from ..encoders import EncoderHead, ForeignSAE, UnsupportedConversion, converter_for
from ..clt import CrossLayerTranscoder
from ..families import create_family
from ..model import SparseCoder
from ..pretrained.files import is_local, list_files, resolve_file
from .catalogue import close_releases, find_entry
from .clt import (CLT_FORMAT_FILES, PretrainedCLT, check_circuit_tracer_thresholds, detect_clt_format, file_pattern,
                  holds_clt, load_clt_files, load_clt_run)
from .run import load_run

#: format -> its files (config, then weights); load_sae recognises a format by them
FORMAT_FILES = {
    "sae_zoo": ("config.json", "model.safetensors"),
    "sae_zoo_run": ("config.yaml", "model.ckpt"),  # a run directory written by sae-zoo fit
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.pt"),
    "gemma_scope": ("params.npz",),
    "gemma_scope_2": ("config.json", "params.safetensors"),
    "circuit_tracer": ("config.yaml", "layer_{layer}.safetensors"),  # one transcoder per layer: load_sae(layer=N)
}
#: how each library is named in messages
LIBRARY_NAMES = {"saelens": "SAELens", "sparsify": "sparsify", "dictionary_learning": "dictionary_learning",
                 "gemma_scope": "Gemma Scope", "gemma_scope_2": "Gemma Scope 2", "circuit_tracer": "circuit-tracer"}
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
    #: a transcoder's: its dictionary writes the target (an MLP's output) from codes of the input
    transcoder: bool = False
    #: a skip-transcoder's linear term of the input, ``(d_out, d_in)``, applied as ``x @ skip.T``
    skip: torch.Tensor | None = None

    @classmethod
    def of_model(cls, model: SparseCoder, fmt: str) -> PretrainedSAE:
        """A sae_zoo model's decoder, head and (a transcoder's) skip term, as loaded from ``fmt``."""
        skip = None if model.skip is None else model.skip.weight.detach()
        return cls(model.dictionary, model.encoder, fmt, dict(model.dictionary.provenance),
                   transcoder=model.transcoder, skip=skip)

    def model(self, encoder: EncoderHead | None = None, frozen_skip: bool = False, **kwargs: Any) -> SparseCoder:
        """A :class:`~sae_zoo.SparseCoder` of ``encoder`` (default: the source's own) and this dictionary (and a
        transcoder's skip term, frozen where ``frozen_skip``), in eval mode (as ``from_pretrained`` returns
        models: a BatchTopK head then applies its threshold); ``kwargs`` are SparseCoder's."""
        encoder = encoder if encoder is not None else self.encoder
        if encoder is None:
            raise ValueError(f"no sae_zoo head reproduces this {self.format} SAE's encoder ({self.encoder_unavailable}); "
                             "pass encoder=create_encoder(...) to pair another head with its dictionary")
        if self.transcoder:
            kwargs = {"family": create_family("transcoder", skip_connection=self.skip is not None,
                                              train_skip=not frozen_skip), **kwargs}
        model = SparseCoder(encoder, self.dictionary, **kwargs)
        if model.skip is not None and self.skip is not None:
            with torch.no_grad():
                model.skip.weight.copy_(self.skip)
        return model.eval()


def _names_file(pattern: str, names: list[str]) -> bool:
    """Whether ``names`` hold the file ``pattern`` names (``{layer}``: any layer number)."""
    regex = file_pattern(pattern)
    return any(regex.fullmatch(name) for name in names)


def detect_format(names: list[str], where: str) -> str:
    found = [fmt for fmt, files in FORMAT_FILES.items() if all(_names_file(f, names) for f in files)]
    if len(found) != 1:
        expected = "; ".join(f"{fmt}: {' + '.join(files)}" for fmt, files in FORMAT_FILES.items())
        problem = "matches several formats" if found else "holds no known SAE format"
        raise ValueError(f"{where} {problem} (files: {', '.join(names) or 'none'}); expected one of {expected}. "
                         "Pass format=... to choose")
    return found[0]


def load_sae(source: str | Path, *, format: str | None = None, subfolder: str | None = None,
             revision: str | None = None, trainable: bool = False, token: str | bool | None = None,
             cache_dir: str | Path | None = None, force_download: bool = False,
             local_files_only: bool = False, layer: int | None = None) -> PretrainedSAE | PretrainedCLT:
    """Load an SAE saved by SAELens, sparsify, dictionary_learning or sae_zoo from a local directory or
    a Hub repo (``subfolder`` picks one SAE of a repo that holds several), or a catalogue entry
    ``"release/sae_id"`` (:func:`list_pretrained`), whose LM, hook and normalisation then come with it.
    The format is detected from the files unless ``format`` names it. ``trainable`` decides whether the
    dictionary trains further. ``layer`` picks one transcoder of a folder that holds one per layer
    (circuit-tracer's ``layer_{N}.safetensors``). A cross-layer transcoder (circuit-tracer's ``W_enc_{N}``/``W_dec_{N}``
    files, Gemma Scope 2's ``params_layer_{N}``, a saved :class:`~sae_zoo.CrossLayerTranscoder`) loads whole, as a
    :class:`~sae_zoo.hub.clt.PretrainedCLT` whose ``model()`` gives its features and outputs."""
    if format is not None and format not in FORMAT_FILES and format not in CLT_FORMAT_FILES:
        raise ValueError(f"format={format!r} is not one of {', '.join([*FORMAT_FILES, *CLT_FORMAT_FILES])}")
    entry = None if is_local(source) else find_entry(str(source))
    if entry is not None:
        if subfolder or format:
            raise ValueError(f"{source!r} is a catalogue entry: it names its own repo folder and format")
        sae = load_sae(entry.repo_id, format=entry.format, subfolder=entry.path, revision=revision,
                       trainable=trainable, token=token, cache_dir=cache_dir, force_download=force_download,
                       local_files_only=local_files_only)
        sae.metadata.update(entry.provenance())
        (sae.clt if isinstance(sae, PretrainedCLT) else sae.dictionary).provenance.update(entry.provenance())
        return sae
    if not is_local(source) and str(source).count("/") > 1:  # a Hub repo id has one '/' at most
        raise FileNotFoundError(f"no local folder {str(source)!r} exists, and it is neither a Hub repo id (one '/' "
                                f"at most) nor a catalogue entry{close_releases(str(source))} (see "
                                "sae_zoo.list_pretrained())")
    where = f"{source}/{subfolder}" if subfolder else str(source)
    clt_run = load_clt_run(source) if is_local(source) and not subfolder and format is None else None
    if clt_run is not None:  # a CLT recipe's run folder: its model/ folder
        return PretrainedCLT(clt_run.requires_grad_(trainable), "sae_zoo", dict(clt_run.provenance))
    names = None
    if format is None or format in CLT_FORMAT_FILES:
        try:
            names = list_files(source, subfolder=subfolder, revision=revision, token=token)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}{close_releases(str(source))}") from None
        format = format or detect_clt_format(names) or detect_format(names, where)
    download = {"subfolder": subfolder, "revision": revision, "token": token, "cache_dir": cache_dir,
                "force_download": force_download, "local_files_only": local_files_only}
    if format in CLT_FORMAT_FILES:  # a cross-layer transcoder: every layer's files at once
        if layer is not None:
            raise ValueError(f"{where} is a cross-layer transcoder, one model over all its layers: drop layer={layer}")
        provenance = {k: v for k, v in {"format": format, "source": str(source), "subfolder": subfolder,
                                        "revision": revision}.items() if v is not None}
        loaded = load_clt_files(source, format, names, download, provenance)
        loaded.clt.requires_grad_(trainable)
        return loaded
    if format == "sae_zoo" and holds_clt(resolve_file(source, FORMAT_FILES["sae_zoo"][0], **download)):
        clt = CrossLayerTranscoder.from_pretrained(source, **{k: v for k, v in download.items() if k != "subfolder"})
        return PretrainedCLT(clt.requires_grad_(trainable), format, dict(clt.provenance))
    if format in ("sae_zoo", "sae_zoo_run"):
        if subfolder:
            raise ValueError("subfolder applies to SAELens, sparsify and dictionary_learning repos")
        model = (load_run(source)[0] if format == "sae_zoo_run" else
                 SparseCoder.from_pretrained(source, **{k: v for k, v in download.items() if k != "subfolder"}))
        model.dictionary.requires_grad_(trainable)
        return PretrainedSAE.of_model(model, format)
    per_layer = any("{layer}" in name for name in FORMAT_FILES[format])
    if per_layer != (layer is not None):
        raise ValueError(f"{where}: {LIBRARY_NAMES[format]}'s folders hold one transcoder per layer "
                         f"({' + '.join(FORMAT_FILES[format])}): pass layer=N" if per_layer else
                         f"layer={layer!r} picks one transcoder of a per-layer folder (circuit-tracer's); {where} is "
                         f"a {LIBRARY_NAMES.get(format, format)} folder")
    paths = [resolve_file(source, name.format(layer=layer), **download) for name in FORMAT_FILES[format]]
    provenance = {k: v for k, v in {"format": format, "source": str(source), "subfolder": subfolder,
                                    "revision": revision, "layer": layer}.items() if v is not None}
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
    skip = None if sae.W_skip is None else sae.W_skip.detach().float()
    if skip is not None and tuple(skip.shape) != (sae.d_model, sae.d_in):
        raise ValueError(f"{sae.source}: the skip matrix has shape {tuple(skip.shape)}, expected "
                         f"{(sae.d_model, sae.d_in)} (d_out, d_in)")
    return PretrainedSAE(dictionary, encoder, fmt, provenance, unavailable, sae.transcoder, skip)


# ---- readers: one library's files -> ForeignSAE (and why its encoder cannot be reproduced, if so) ----

#: a reader takes the format's files (FORMAT_FILES order) and the provenance to fill in
Reader = Callable[..., tuple[ForeignSAE, "str | None"]]


#: SAELens's transcoder architectures -> (the encoder's architecture, whether it has a skip term)
SAELENS_TRANSCODERS = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
                       "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


def _saelens(cfg_path: Path, weights_path: Path, provenance: dict[str, Any]) -> tuple[ForeignSAE, str | None]:
    """SAELens 6 (``metadata`` block, ``architecture``) and earlier (flat keys, ``activation_fn``) configs."""
    cfg = read_json(cfg_path)
    require_keys(cfg_path, cfg, ["d_in", "d_sae"])
    if cfg.get("architecture") in SAELENS_TRANSCODERS:
        return _saelens_transcoder(cfg, cfg_path, weights_path, provenance)
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


def _saelens_transcoder(cfg: dict[str, Any], cfg_path: Path, weights_path: Path,
                        provenance: dict[str, Any]) -> tuple[ForeignSAE, None]:
    """SAELens's four transcoders: ``h = x @ W_enc + b_enc`` (no ``b_dec`` subtracted: its config refuses
    ``apply_b_dec_to_input``), ``relu(h)`` (JumpReLU: masked by ``h > threshold``), the output
    ``codes @ W_dec + b_dec``, plus ``x @ W_skip.T`` of the raw input for the skip variants."""
    architecture = cfg["architecture"]
    encoder, has_skip = SAELENS_TRANSCODERS[architecture]
    d_in, d_sae, d_out = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg.get("d_out") or cfg["d_in"])
    if cfg.get("apply_b_dec_to_input"):
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input is true, which SAELens's transcoders refuse (b_dec lies in "
                         "the output's space)")
    tensors = read_safetensors(weights_path)
    names = ["W_enc", "b_enc", "W_dec", "b_dec", *(["W_skip"] if has_skip else []),
             *(["threshold"] if encoder == "jumprelu" else [])]
    require_keys(weights_path, tensors, names, what="tensor")
    because = f"d_in={d_in}, d_sae={d_sae}, d_out={d_out} in {cfg_path.name}"
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,),
              "W_skip": (d_out, d_in), "threshold": (d_sae,)}
    for name in names:
        check_shape(weights_path, name, tensors[name], shapes[name], because)
    meta = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else cfg
    provenance.update({key: value for key, value in {
        "architecture": architecture, "hook_name": meta.get("hook_name"), "hook_name_out": meta.get("hook_name_out"),
        "model_name": meta.get("model_name"), "sae_lens_version": meta.get("sae_lens_version")}.items()
        if value is not None})
    params = {"threshold": tensors["threshold"]} if encoder == "jumprelu" else {}
    return ForeignSAE(encoder, W_dec=tensors["W_dec"], b_dec=tensors["b_dec"], W_enc=tensors["W_enc"].T,
                      b_enc=tensors["b_enc"], config={"apply_b_dec_to_input": False}, params=params,
                      source=str(weights_path), transcoder=True, W_skip=tensors.get("W_skip")), None


def _sparsify(cfg_path: Path, weights_path: Path, provenance: dict[str, Any]) -> tuple[ForeignSAE, str | None]:
    """sparsify's SAEs, transcoders (``transcode``: the input's own ``b_dec`` not subtracted) and
    skip-transcoders (``+ x @ W_skip.T``). A config that predates the ``transcode`` key but has a skip term is
    read as a skip-transcoder: sparsify trained skip terms only when transcoding, with ``transcode`` then a
    training option that the file did not keep."""
    cfg = read_json(cfg_path)
    require_keys(cfg_path, cfg, ["d_in"])
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    tensors = read_safetensors(weights_path)
    require_keys(weights_path, tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], what="tensor")
    unknown = sorted(set(tensors) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"})
    if unknown:  # e.g. input/output normalisation buffers: applying them by guess would not give sparsify's outputs
        raise ValueError(f"{weights_path}: tensors {', '.join(unknown)} are not part of the sparsify format sae_zoo "
                         "reads exactly (encoder.weight, encoder.bias, W_dec, b_dec, W_skip)")
    because = f"d_in={d_in} and {n} latents in {cfg_path.name}"
    for name, shape in {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}.items():
        check_shape(weights_path, name, tensors[name], shape, because)
    skip = tensors.get("W_skip")
    if cfg.get("skip_connection") and skip is None:
        raise ValueError(f"{weights_path}: {cfg_path.name} sets skip_connection, but the file has no 'W_skip' tensor")
    if skip is not None:
        check_shape(weights_path, "W_skip", skip, (d_in, d_in), because)
    transcoder = bool(cfg["transcode"]) if "transcode" in cfg else skip is not None
    if skip is not None and not transcoder:
        raise ValueError(f"{cfg_path}: 'transcode' is false, but the file has a skip term 'W_skip': an SAE with a skip "
                         "term is not a format sparsify writes")
    provenance.update({"k": cfg.get("k"), "hookpoint": provenance.get("subfolder") or cfg_path.parent.name,
                       **({"transcoder": True} if transcoder else {})})
    if transcoder and "transcode" not in cfg:
        provenance["note"] = ("cfg.json predates sparsify's 'transcode' key; its skip term makes it a skip-transcoder "
                              "(the input's b_dec is not subtracted)")
    sae = ForeignSAE(cfg.get("activation", "topk"), W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
                     W_enc=tensors["encoder.weight"], b_enc=tensors["encoder.bias"],
                     config={"k": cfg.get("k", 32), "apply_b_dec_to_input": not transcoder}, source=str(weights_path),
                     transcoder=transcoder, W_skip=skip)
    return sae, None


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


def _gemma_scope_2(config_path: Path, params_path: Path, provenance: dict[str, Any]) -> tuple[ForeignSAE, None]:
    """Gemma Scope 2's SAEs and transcoders (``config.json`` + ``params.safetensors``), as Google's example code
    computes them: ``z = x @ w_enc + b_enc``, ``codes = ReLU(z) * (z > threshold)``, the output
    ``codes @ w_dec + b_dec``, plus ``x @ affine_skip_connection`` where ``affine_connection`` is set. That
    reading of the skip matrix (not its transpose) is circuit-tracer's too; the public loaders disagree, and
    no real weights could be checked here."""
    cfg = read_json(config_path)
    tensors = read_safetensors(params_path)
    require_keys(params_path, tensors, ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"], what="tensor")
    d_in, width = tensors["w_enc"].shape if tensors["w_enc"].ndim == 2 else (0, 0)
    d_out = int(tensors["w_dec"].shape[-1]) if tensors["w_dec"].ndim == 2 else 0
    because = f"w_enc has shape {tuple(tensors['w_enc'].shape)}: (d_in, width)"
    for name, shape in {"w_dec": (width, d_out), "b_enc": (width,), "b_dec": (d_out,), "threshold": (width,)}.items():
        check_shape(params_path, name, tensors[name], shape, because)
    transcoder = cfg.get("type", "sae") == "transcoder"
    skip = None
    if cfg.get("affine_connection"):
        require_keys(params_path, tensors, ["affine_skip_connection"], what="tensor")
        check_shape(params_path, "affine_skip_connection", tensors["affine_skip_connection"], (d_in, d_out),
                    "it is applied as x @ affine_skip_connection: (d_in, d_out)")
        skip = tensors["affine_skip_connection"].T  # x @ A = x @ (A^T)^T: sae_zoo's skip weight is A^T
    if skip is not None and not transcoder:
        raise ValueError(f"{config_path}: affine_connection is set, but type is {cfg.get('type')!r}, not 'transcoder'")
    provenance.update({key: value for key, value in {
        "architecture": "jumprelu", "model_name": cfg.get("model_name"), "hook_name": cfg.get("hf_hook_point_in"),
        "hook_name_out": cfg.get("hf_hook_point_out") if transcoder else None, "l0": cfg.get("l0"),
        **({"transcoder": True} if transcoder else {})}.items() if value is not None})
    return ForeignSAE("jumprelu", W_dec=tensors["w_dec"], b_dec=tensors["b_dec"], W_enc=tensors["w_enc"].T,
                      b_enc=tensors["b_enc"], params={"threshold": tensors["threshold"]},
                      config={"apply_b_dec_to_input": False}, source=str(params_path), transcoder=transcoder,
                      W_skip=skip), None


#: circuit-tracer's per-layer transcoder tensors -> their shapes, from (d_transcoder, d_in, d_out)
CIRCUIT_TRACER_TENSORS = {"W_enc": lambda n, i, o: (n, i), "W_dec": lambda n, i, o: (n, o),
                          "b_enc": lambda n, i, o: (n,), "b_dec": lambda n, i, o: (o,),
                          "W_skip": lambda n, i, o: (o, i), "activation_function.threshold": lambda n, i, o: (n,)}


def _circuit_tracer(config_path: Path, weights_path: Path, provenance: dict[str, Any]) -> tuple[ForeignSAE, None]:
    """circuit-tracer's per-layer transcoders (``SingleLayerTranscoder``): ``W_enc`` stored ``(d_transcoder, d_in)``,
    codes ``f(x @ W_enc.T + b_enc)``, output ``codes @ W_dec + b_dec + x @ W_skip.T``; ``f`` is ReLU, or, where the
    file has ``activation_function.threshold``, circuit-tracer's JumpReLU ``z * (z > threshold)``, which has no
    ReLU: it equals sae_zoo's (and SAELens's) ``jumprelu`` while every threshold is >= 0, and a file with a
    negative one is refused rather than given other codes."""
    cfg = read_yaml(config_path)
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise ValueError(f"{config_path}: model_kind {kind!r}; sae_zoo reads circuit-tracer's per-layer transcoders "
                         "(model_kind: transcoder_set)")
    tensors = read_safetensors(weights_path)
    require_keys(weights_path, tensors, ["W_enc", "W_dec", "b_enc", "b_dec"], what="tensor")
    unknown = sorted(set(tensors) - set(CIRCUIT_TRACER_TENSORS))
    if unknown:
        raise ValueError(f"{weights_path}: tensors {', '.join(unknown)} are not part of circuit-tracer's per-layer "
                         f"transcoder ({', '.join(CIRCUIT_TRACER_TENSORS)})")
    if tensors["W_enc"].ndim != 2 or tensors["b_dec"].ndim != 1:
        raise ValueError(f"{weights_path}: W_enc must be (d_transcoder, d_in) and b_dec (d_out,), got "
                         f"{tuple(tensors['W_enc'].shape)} and {tuple(tensors['b_dec'].shape)}")
    sizes = (*tensors["W_enc"].shape, tensors["b_dec"].shape[0])
    for name, tensor in tensors.items():
        check_shape(weights_path, name, tensor, CIRCUIT_TRACER_TENSORS[name](*sizes),
                    f"W_enc is (d_transcoder, d_in) = {tuple(tensors['W_enc'].shape)} and b_dec (d_out,)")
    threshold = tensors.get("activation_function.threshold")
    check_circuit_tracer_thresholds(threshold, weights_path)
    layer = provenance.get("layer")
    hooks = {"hook_name": cfg.get("feature_input_hook"), "hook_name_out": cfg.get("feature_output_hook")}
    provenance.update({key: value for key, value in {
        "architecture": "jumprelu" if threshold is not None else "standard", "transcoder": True,
        "model_name": cfg.get("model_name"), "scan": cfg.get("scan"),
        **{k: f"blocks.{layer}.{v}" for k, v in hooks.items() if v}}.items() if value is not None})
    return ForeignSAE("jumprelu" if threshold is not None else "standard", W_dec=tensors["W_dec"],
                      b_dec=tensors["b_dec"], W_enc=tensors["W_enc"], b_enc=tensors["b_enc"],
                      params={} if threshold is None else {"threshold": threshold},
                      config={"apply_b_dec_to_input": False}, source=str(weights_path), transcoder=True,
                      W_skip=tensors.get("W_skip")), None


READERS: dict[str, Reader] = {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning,
                              "gemma_scope": _gemma_scope, "gemma_scope_2": _gemma_scope_2,
                              "circuit_tracer": _circuit_tracer}


def fold_input_scale(sae: ForeignSAE, scale: float, target_scale: float | None = None) -> ForeignSAE:
    """``sae``, trained on inputs multiplied by ``scale`` (a run with ``normalize: true``), as an SAE of the raw
    inputs with the same codes: ``W_enc`` times ``scale``, ``W_dec`` and ``b_dec`` over it (then
    ``(x - b_dec / s) (s W_enc)^T = (s x - b_dec) W_enc^T``, and the reconstruction is the scaled one over
    ``s``). A transcoder's targets have their own scale ``t``: ``W_dec`` and ``b_dec`` go over ``t``, and the skip
    matrix is times ``s / t``. SAELens's own ``normalize_activations`` cannot say this: its loaders apply no
    scale. Matching pursuit takes ``r . w`` as a code, so its codes change with the scale of the input and
    cannot be kept."""
    if sae.architecture == "matching_pursuit":
        raise ValueError(f"this run was trained on activations scaled by {scale:g} (data.normalize: true), and "
                         "SAELens's matching pursuit's codes scale with its input, so no export gives this model's "
                         "codes on raw activations; train with data.normalize=false to export it")
    if sae.transcoder and target_scale is None:
        raise ValueError(f"cannot fold the input scale {scale:g} into a transcoder without its targets' scale: its "
                         "input and its target are scaled apart")
    out = scale if target_scale is None else target_scale
    return dataclasses.replace(sae, W_enc=None if sae.W_enc is None else sae.W_enc * scale, W_dec=sae.W_dec / out,
                               b_dec=None if sae.b_dec is None else sae.b_dec / out,
                               W_skip=None if sae.W_skip is None else sae.W_skip * (scale / out))


def _as_saelens_transcoder(sae: ForeignSAE, model: SparseCoder) -> ForeignSAE:
    """A transcoder's export: SAELens's ``transcoder``/``skip_transcoder`` (a ReLU head) or
    ``jumprelu_transcoder``/``jumprelu_skip_transcoder`` (JumpReLU, and BatchTopK at inference), with ``d_out``
    and ``W_skip``; SAELens has no other transcoder encoder."""
    kinds = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}
    if sae.architecture not in kinds or sae.config.get("apply_b_dec_to_input"):
        raise ValueError(f"SAELens's and circuit-tracer's transcoders have ReLU or JumpReLU encoders that read the raw "
                         f"input; sae_zoo's {model.encoder.name!r} head exports as {sae.architecture!r}, which neither "
                         "has a transcoder of")
    skip = None if model.skip is None else model.skip.weight.detach().float().cpu()
    kind = kinds[sae.architecture].replace("transcoder", "skip_transcoder") if skip is not None else kinds[sae.architecture]
    return dataclasses.replace(sae, architecture=kind, transcoder=True, W_skip=skip)


def exported_foreign(model: SparseCoder, decoder_only: bool = False) -> tuple[ForeignSAE, float, float | None]:
    """``(model as a ForeignSAE of raw activations, input scale, target scale)`` for export: the head's
    ``to_foreign`` (or, ``decoder_only``, the dictionary with a tied encoder), a transcoder as SAELens's transcoder
    architectures, and the data's scales folded in (:func:`fold_input_scale`)."""
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
    target_scale = float(dictionary.provenance.get("target_scale", scale)) if model.transcoder else None
    if model.transcoder:
        sae = _as_saelens_transcoder(sae, model)
    if scale != 1.0 or target_scale not in (None, 1.0):
        sae = fold_input_scale(sae, scale, target_scale)
    return sae, scale, target_scale


def export_saelens(model: SparseCoder, out_dir: str | Path, *, hook_name: str | None = None,
                   model_name: str | None = None, decoder_only: bool = False) -> Path:
    """Write ``model`` as a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) that SAELens's
    ``SAE.load_from_disk`` reads, through the head's ``to_foreign``, with identical codes (on raw activations,
    for a run trained on normalised ones: :func:`fold_input_scale`): ``linear`` heads
    export as ``standard`` SAEs, ``topk``, ``jumprelu`` and ``gated`` as themselves, ``mp`` as
    ``matching_pursuit``, ``batchtopk`` as the ``jumprelu`` SAE SAELens saves for inference.
    ``decoder_only=True`` exports any head's dictionary with a tied encoder ``W_enc = W_dec^T`` (SAELens
    has no MLP or FISTA encoders)."""
    sae, scale, target_scale = exported_foreign(model, decoder_only=decoder_only)
    dictionary = model.dictionary
    cfg: dict[str, Any] = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": bool(sae.config.get("apply_b_dec_to_input", False)),
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                     "model_name": model_name or dictionary.provenance.get("model_name"),
                     "hook_name": hook_name or dictionary.provenance.get("hook_name"),
                     **({"hook_name_out": dictionary.provenance.get("hook_name_out")} if model.transcoder else {}),
                     "exported_by": f"sae_zoo {version('sae_zoo')}",
                     "sae_zoo_encoder": "tied (decoder only)" if decoder_only else model.encoder.name,
                     **({"sae_zoo_input_scale_folded": scale} if scale != 1.0 else {}),
                     **({"sae_zoo_target_scale_folded": target_scale} if target_scale not in (None, 1.0) else {})}}
    cfg.update({k: v for k, v in sae.config.items() if k != "apply_b_dec_to_input"})
    tensors = {"W_dec": sae.W_dec, "b_dec": torch.zeros(sae.d_model) if sae.b_dec is None else sae.b_dec, **sae.params}
    if sae.transcoder:
        cfg["d_out"] = sae.d_model
        if sae.W_skip is not None:
            tensors["W_skip"] = sae.W_skip
    if sae.W_enc is not None:  # matching pursuit's encoder is its decoder
        tensors["W_enc"] = sae.W_enc.T
    if sae.b_enc is not None:  # a gated SAE has b_gate and b_mag instead
        tensors["b_enc"] = sae.b_enc
    with atomic_directory(out_dir, replaces=FORMAT_FILES["saelens"]) as staging:
        save_file({k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()},
                  str(staging / FORMAT_FILES["saelens"][1]))
        atomic_write_json(staging / FORMAT_FILES["saelens"][0], cfg)
    return Path(out_dir)

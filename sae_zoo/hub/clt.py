"""Cross-layer transcoders in other libraries' files: circuit-tracer's folders (``W_enc_{i}`` and ``W_dec_{i}``
safetensors per source layer, with a ``config.yaml`` naming the hooks on the Hub) and Gemma Scope 2's
(``params_layer_{i}.safetensors`` per layer), read into a :class:`~sae_zoo.CrossLayerTranscoder` that gives their
features and outputs; and :func:`export_circuit_tracer_clt`, which writes circuit-tracer's folder.

circuit-tracer's JumpReLU is ``z * (z > threshold)``, with no ReLU: it is sae_zoo's ``jumprelu`` head while every
threshold is >= 0, and a file with a negative one is refused. Gemma Scope 2's is ``ReLU(z) * (z > threshold)``
(Google's example code), the ``jumprelu`` head itself. Its skip matrix is applied as ``x @ affine_skip_connection``
(Google's example code and circuit-tracer's loader; see ``sae_zoo.hub.formats``), and its file ``i`` is source layer
``i``: ``w_dec[:, i:]`` holds the decoders to layer ``i`` and later, and what it holds for earlier layers is unused
(circuit-tracer reads the same slice). circuit-tracer's loader walks ``range(max(layer))``, which leaves out the last
layer's file; here every file from 0 to the last is read, and a gap is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .._io import atomic_directory, check_shape, read_json, read_safetensors, read_yaml, require_keys
from ..clt import CrossLayerDecoder, CrossLayerTranscoder
from ..encoders import create_encoder
from ..pretrained.files import resolve_file

#: format -> the per-layer file patterns that identify it (``{layer}``: the source layer)
CLT_FORMAT_FILES = {"circuit_tracer_clt": ("W_enc_{layer}.safetensors", "W_dec_{layer}.safetensors"),
                    "gemma_scope_2_clt": ("params_layer_{layer}.safetensors",)}
CIRCUIT_TRACER_CONFIG = "config.yaml"


@dataclass
class PretrainedCLT:
    """A loaded cross-layer transcoder (``model()`` gives it, as ``load_sae(...).model()`` gives an SAE)."""

    clt: CrossLayerTranscoder
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    transcoder: bool = True

    def model(self) -> CrossLayerTranscoder:
        return self.clt.eval()

    def _not_one_dictionary(self, what: str) -> ValueError:
        source = self.metadata.get("source", "this model")
        return ValueError(f"{source} is a cross-layer transcoder ({self.format}): it has one encoder and decoders per "
                          f"source layer, so no single {what}; use it whole, load_sae(...).model() (a "
                          "CrossLayerTranscoder)")

    @property
    def dictionary(self) -> Any:  # what an SAE's or per-layer transcoder's reader asks for first
        raise self._not_one_dictionary("dictionary")

    @property
    def encoder(self) -> Any:
        raise self._not_one_dictionary("encoder")


def file_pattern(pattern: str) -> re.Pattern:
    """A file name pattern (``{layer}``: a number, captured) as a regular expression."""
    return re.compile(re.escape(pattern).replace(re.escape("{layer}"), r"(\d+)"))


def layer_files(names: list[str], pattern: str) -> dict[int, str]:
    """``{layer: file name}`` of the names matching ``pattern`` (``{layer}``: a number)."""
    regex = file_pattern(pattern)
    return {int(m.group(1)): name for name in names if (m := regex.fullmatch(name))}


def detect_clt_format(names: list[str]) -> str | None:
    """The CLT format whose per-layer files ``names`` hold, or None."""
    found = [fmt for fmt, patterns in CLT_FORMAT_FILES.items() if all(layer_files(names, p) for p in patterns)]
    return found[0] if len(found) == 1 else None


def check_layer_files(names: list[str], fmt: str, where: str) -> int:
    """The number of layers of a CLT folder: every pattern of ``fmt`` must have one file per layer 0..n-1."""
    n_layers = 0
    for pattern in CLT_FORMAT_FILES[fmt]:
        found = layer_files(names, pattern)
        n_layers = max(n_layers, max(found) + 1)
    for pattern in CLT_FORMAT_FILES[fmt]:
        missing = [pattern.format(layer=i) for i in range(n_layers) if i not in layer_files(names, pattern)]
        if missing:
            raise ValueError(f"{where}: a cross-layer transcoder of {n_layers} layers needs one file per layer, and "
                             f"{', '.join(missing[:5])} {'is' if len(missing) == 1 else 'are'} missing")
    return n_layers


def check_circuit_tracer_thresholds(threshold: torch.Tensor | None, source: str | Path) -> None:
    """circuit-tracer's JumpReLU has no ReLU: a file with a negative threshold gives negative codes, which no sae_zoo
    head gives, so it is refused (its per-layer transcoders' and its CLTs')."""
    if threshold is not None and bool((threshold < 0).any()):
        raise ValueError(f"{source}: {int((threshold < 0).sum())} thresholds are below 0; circuit-tracer's JumpReLU "
                         "(z * (z > threshold), no ReLU) then gives negative codes, which no sae_zoo head gives")


def _assemble(layers: list[dict[str, torch.Tensor]], head: str, skip: list[torch.Tensor] | None,
              provenance: dict[str, Any]) -> CrossLayerTranscoder:
    """A CLT of per-layer ``{W_enc (d_tc, d_in), b_enc, b_dec, W_dec (d_tc, n - i, d_out), threshold?}``."""
    n_layers = len(layers)
    d_tc, d_in = layers[0]["W_enc"].shape
    d_out = layers[0]["b_dec"].shape[0]
    heads = [create_encoder(head, d_model=d_in, n_latents=d_tc) for _ in range(n_layers)]
    with torch.device("meta"):  # the decoders, which grow with the square of the layers, take the files' tensors
        decoder = CrossLayerDecoder(n_layers, d_tc, d_out)
    decoder.load_state_dict({**{f"W_dec.{i}": layer["W_dec"].float().contiguous() for i, layer in enumerate(layers)},
                             "b_dec": torch.stack([layer["b_dec"] for layer in layers]).float()}, assign=True)
    clt = CrossLayerTranscoder(heads, decoder, skip_connection=skip is not None, provenance=provenance)
    with torch.no_grad():
        for layer, encoder in zip(layers, heads):
            encoder.linear.weight.copy_(layer["W_enc"])
            encoder.linear.bias.copy_(layer["b_enc"])
            if head == "jumprelu":
                encoder.threshold.copy_(layer["threshold"].reshape(-1).expand(d_tc))
        if skip is not None:
            clt.W_skip.copy_(torch.stack(skip))
    return clt.eval()


def read_circuit_tracer_clt(paths: dict[str, Path], provenance: dict[str, Any]) -> CrossLayerTranscoder:
    """circuit-tracer's CLT folder (``paths``: file name -> local path): per source layer ``i``, ``W_enc_{i}``
    ``(d_transcoder, d_model)``, ``b_enc_{i}``, ``b_dec_{i}`` and ``threshold_{i}`` (JumpReLU) in
    ``W_enc_{i}.safetensors``, and ``W_dec_{i}`` ``(d_transcoder, n_layers - i, d_model)`` in ``W_dec_{i}``'s."""
    names = list(paths)
    where = provenance.get("source", "the folder")
    n_layers = check_layer_files(names, "circuit_tracer_clt", where)
    if CIRCUIT_TRACER_CONFIG in paths:
        config = read_yaml(paths[CIRCUIT_TRACER_CONFIG])
        kind = config.get("model_kind", "cross_layer_transcoder")
        if kind != "cross_layer_transcoder":
            raise ValueError(f"{paths[CIRCUIT_TRACER_CONFIG]}: model_kind {kind!r}, but the folder holds a cross-layer "
                             "transcoder's W_enc_N/W_dec_N files")
        provenance.update({k: v for k, v in {"hook_name": config.get("feature_input_hook"),
                                             "hook_name_out": config.get("feature_output_hook"),
                                             "model_name": config.get("model_name")}.items() if v})
    layers, head = [], None
    for i in range(n_layers):
        enc_path, dec_path = paths[f"W_enc_{i}.safetensors"], paths[f"W_dec_{i}.safetensors"]
        enc, dec = read_safetensors(enc_path), read_safetensors(dec_path)
        require_keys(enc_path, enc, [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"], what="tensor")
        require_keys(dec_path, dec, [f"W_dec_{i}"], what="tensor")
        W_enc = enc[f"W_enc_{i}"]
        if W_enc.ndim != 2:
            raise ValueError(f"{enc_path}: W_enc_{i} must be (d_transcoder, d_model), got {tuple(W_enc.shape)}")
        d_tc, d_model = W_enc.shape
        if i == 0:
            first = (d_tc, d_model)
        elif (d_tc, d_model) != first:
            raise ValueError(f"{enc_path}: W_enc_{i} has shape {(d_tc, d_model)}, layer 0's {first}")
        because = f"W_enc_{i} is (d_transcoder, d_model) = {(d_tc, d_model)}, and the folder has {n_layers} layers"
        check_shape(enc_path, f"b_enc_{i}", enc[f"b_enc_{i}"], (d_tc,), because)
        check_shape(enc_path, f"b_dec_{i}", enc[f"b_dec_{i}"], (d_model,), because)
        check_shape(dec_path, f"W_dec_{i}", dec[f"W_dec_{i}"], (d_tc, n_layers - i, d_model),
                    f"source layer {i} writes layers {i}..{n_layers - 1}: (d_transcoder, n_layers - {i}, d_model); "
                    + because)
        threshold = enc.get(f"threshold_{i}")
        check_circuit_tracer_thresholds(threshold, enc_path)
        layer_head = "linear" if threshold is None else "jumprelu"
        if head is not None and layer_head != head:
            raise ValueError(f"{enc_path}: layer {i} has {'no ' if threshold is None else ''}threshold_{i}, unlike "
                             "layer 0: one activation for every layer")
        head = layer_head
        layers.append({"W_enc": W_enc, "b_enc": enc[f"b_enc_{i}"], "b_dec": enc[f"b_dec_{i}"],
                       "W_dec": dec[f"W_dec_{i}"], "threshold": threshold})
    provenance.update({"architecture": f"clt_{head}", "transcoder": True})
    return _assemble(layers, head, None, provenance)


def read_gemma_scope_2_clt(paths: dict[str, Path], provenance: dict[str, Any]) -> CrossLayerTranscoder:
    """Gemma Scope 2's CLT: ``params_layer_{i}.safetensors`` per layer, each with ``w_enc`` ``(d_in, d_sae)``,
    ``w_dec`` ``(d_sae, n_layers, d_out)`` (of which ``[:, i:]`` is used), ``b_enc``, ``b_dec``, ``threshold`` and,
    with an affine connection, ``affine_skip_connection`` ``(d_in, d_out)``, applied as ``x @ A``."""
    where = provenance.get("source", "the folder")
    n_layers = check_layer_files(list(paths), "gemma_scope_2_clt", where)
    if "config.json" in paths:
        config = read_json(paths["config.json"])
        provenance.update({k: v for k, v in {"model_name": config.get("model_name"), "l0": config.get("l0"),
                                             "hook_name": config.get("hf_hook_point_in"),
                                             "hook_name_out": config.get("hf_hook_point_out")}.items() if v})
    layers, skips = [], []
    for i in range(n_layers):
        path = paths[f"params_layer_{i}.safetensors"]
        t = read_safetensors(path)
        require_keys(path, t, ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"], what="tensor")
        if t["w_enc"].ndim != 2:
            raise ValueError(f"{path}: w_enc must be (d_in, d_sae), got {tuple(t['w_enc'].shape)}")
        d_in, d_sae = t["w_enc"].shape
        d_out = t["b_dec"].shape[-1]
        because = f"w_enc is (d_in, d_sae) = {(d_in, d_sae)}, and the folder has {n_layers} layers"
        for name, shape in {"w_dec": (d_sae, n_layers, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                            "threshold": (d_sae,)}.items():
            check_shape(path, name, t[name], shape, because)
        if "affine_skip_connection" in t:
            check_shape(path, "affine_skip_connection", t["affine_skip_connection"], (d_in, d_out),
                        "it is applied as x @ affine_skip_connection: (d_in, d_out)")
        skips.append(t.get("affine_skip_connection"))
        layers.append({"W_enc": t["w_enc"].T, "b_enc": t["b_enc"], "b_dec": t["b_dec"], "W_dec": t["w_dec"][:, i:],
                       "threshold": t["threshold"]})
    has_skip = {s is not None for s in skips}
    if len(has_skip) > 1:
        raise ValueError(f"{where}: some layers have affine_skip_connection and some do not")
    provenance.update({"architecture": "clt_jumprelu", "transcoder": True})
    return _assemble(layers, "jumprelu", skips if True in has_skip else None, provenance)


CLT_READERS = {"circuit_tracer_clt": read_circuit_tracer_clt, "gemma_scope_2_clt": read_gemma_scope_2_clt}
#: the files beside the per-layer ones that a format's reader reads where they exist
CLT_EXTRA_FILES = {"circuit_tracer_clt": (CIRCUIT_TRACER_CONFIG,), "gemma_scope_2_clt": ("config.json",)}


def load_clt_files(source: str | Path, fmt: str, names: list[str], download: dict[str, Any],
                   provenance: dict[str, Any]) -> PretrainedCLT:
    """The CLT in ``source`` (a folder or Hub repo, ``download`` as ``load_sae``'s) whose files are ``names``."""
    wanted = [n for n in names if any(layer_files([n], p) for p in CLT_FORMAT_FILES[fmt])]
    wanted += [n for n in CLT_EXTRA_FILES[fmt] if n in names]
    paths = {name: resolve_file(source, name, **download) for name in wanted}
    clt = CLT_READERS[fmt](paths, provenance)
    clt.requires_grad_(False)
    return PretrainedCLT(clt, fmt, dict(provenance))


def _export_head(clt: CrossLayerTranscoder) -> str:
    """``relu`` or ``jump_relu``: circuit-tracer's activation that gives this CLT's codes; others are refused."""
    name = clt.encoders[0].name
    if name == "linear":
        return "relu"
    if name in ("jumprelu", "batchtopk") and all(not getattr(h, "subtract_decoder_bias", False) for h in clt.encoders):
        return "jump_relu"  # BatchTopK at inference: ReLU and one threshold on the code, a JumpReLU
    raise ValueError(f"circuit-tracer's CLTs have ReLU or JumpReLU encoders; sae_zoo's {name!r} head has no such form "
                     "(a top-k head keeps the k largest per token, which no threshold gives)")


def _thresholds(head: Any) -> torch.Tensor:
    threshold = head.threshold.detach().float().clamp_min(0)
    return threshold.expand(head.n_latents).clone() if threshold.numel() == 1 else threshold


def export_circuit_tracer_clt(clt: CrossLayerTranscoder, out_dir: str | Path, *,
                              feature_input_hook: str | None = None, feature_output_hook: str | None = None,
                              model_name: str | None = None) -> Path:
    """Write ``clt`` as circuit-tracer's CLT folder (``W_enc_{i}``/``W_dec_{i}`` safetensors, as its
    ``to_safetensors`` writes them, and a ``config.yaml`` with ``model_kind: cross_layer_transcoder`` and the hooks),
    which its ``load_clt`` reads back with the same features and outputs on raw activations: the data's scales per
    layer (``input_scales``, ``target_scales`` in the provenance) are folded into the weights. circuit-tracer's format
    holds no skip term, so a CLT with one is refused."""
    if clt.W_skip is not None:
        raise ValueError("circuit-tracer's CLT files hold no skip term (its to_safetensors writes none and load_clt "
                         "reads none): this CLT has one, so its outputs could not be kept")
    activation = _export_head(clt)
    provenance = clt.provenance
    scales = provenance.get("input_scales") or [1.0] * clt.n_layers
    target_scales = provenance.get("target_scales") or [1.0] * clt.n_layers
    hooks = {"feature_input_hook": feature_input_hook or provenance.get("feature_input_hook", "hook_resid_mid"),
             "feature_output_hook": feature_output_hook or provenance.get("feature_output_hook", "hook_mlp_out")}
    out = torch.tensor(target_scales, dtype=torch.float32)
    with atomic_directory(out_dir, replaces=(CIRCUIT_TRACER_CONFIG,)) as staging:
        for i, head in enumerate(clt.encoders):
            enc = {f"W_enc_{i}": head.linear.weight.detach().float() * scales[i],
                   f"b_enc_{i}": head.linear.bias.detach().float(),
                   f"b_dec_{i}": clt.decoder.b_dec[i].detach().float() / out[i]}
            if activation == "jump_relu":
                enc[f"threshold_{i}"] = _thresholds(head)
            W_dec = clt.decoder.W_dec[i].detach().float() / out[i:, None]
            save_file({k: v.contiguous() for k, v in enc.items()}, str(staging / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": W_dec.contiguous()}, str(staging / f"W_dec_{i}.safetensors"))
        config = {"model_kind": "cross_layer_transcoder", **hooks,
                  "model_name": model_name or provenance.get("model_name"), "layers": clt.layers}
        (staging / CIRCUIT_TRACER_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(out_dir)


def holds_clt(config_path: Path) -> bool:
    """Whether a sae_zoo ``config.json`` describes a cross-layer transcoder (its ``family``)."""
    return read_json(config_path).get("family") == "clt"


def load_clt_run(run_dir: str | Path) -> CrossLayerTranscoder | None:
    """The cross-layer transcoder a run folder holds (``model/``, written by a CLT recipe), or None."""
    config = Path(run_dir) / "model" / "config.json"
    if not config.is_file() or not holds_clt(config):
        return None
    return CrossLayerTranscoder.from_pretrained(Path(run_dir) / "model")

"""Export a transcoder to circuit-tracer's per-layer format, which its ``TranscoderSet`` reads: a folder with one
``layer_{N}.safetensors`` per layer and a ``config.yaml`` listing them with the hooks the features read and write.
Exporting the transcoders of several layers into one folder builds the set layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .._io import atomic_write, read_yaml
from ..clt import CrossLayerTranscoder
from ..model import SparseCoder
from .clt import export_circuit_tracer_clt
from .formats import exported_foreign

CONFIG = "config.yaml"


def _tl_name(hook: str | None, layer: int) -> str | None:
    """``blocks.{layer}.NAME`` -> ``NAME``, the per-layer hook circuit-tracer's config names; None otherwise."""
    prefix = f"blocks.{layer}."
    return hook[len(prefix):] if hook and hook.startswith(prefix) else None


def export_circuit_tracer(model: SparseCoder | CrossLayerTranscoder, out_dir: str | Path, layer: int | None = None, *,
                          feature_input_hook: str | None = None, feature_output_hook: str | None = None,
                          model_name: str | None = None) -> Path:
    """Write ``model`` (a transcoder) as circuit-tracer's ``layer_{layer}.safetensors`` in ``out_dir`` and add it to
    the folder's ``config.yaml`` (``model_kind: transcoder_set``), with the same outputs on raw activations: the
    data's scales folded in, ``W_enc`` stored ``(d_transcoder, d_in)``, a JumpReLU head's thresholds as
    ``activation_function.threshold`` (circuit-tracer's JumpReLU has no ReLU; the thresholds, kept >= 0, make it
    the same), a ReLU head's as a file without thresholds. ``feature_input_hook``/``feature_output_hook``:
    circuit-tracer's per-layer hook names (TransformerLens's, e.g. ``ln2.hook_normalized``, ``hook_mlp_out``);
    by default the model's own hooks where they are named ``blocks.{layer}.NAME``. A cross-layer transcoder is written
    whole, as circuit-tracer's CLT folder (:func:`~sae_zoo.hub.clt.export_circuit_tracer_clt`; no ``layer``)."""
    if isinstance(model, CrossLayerTranscoder):
        if layer is not None:
            raise ValueError(f"layer={layer}: a cross-layer transcoder is written whole, every layer in one folder")
        return export_circuit_tracer_clt(model, out_dir, feature_input_hook=feature_input_hook,
                                         feature_output_hook=feature_output_hook, model_name=model_name)
    if layer is None:
        raise ValueError("circuit-tracer's per-layer files name their layer: pass layer=N (the block whose MLP the "
                         "transcoder replaces)")
    if not model.transcoder:
        raise ValueError("circuit-tracer's per-layer files hold transcoders; this model reconstructs its input")
    sae, _, _ = exported_foreign(model)  # a ReLU or JumpReLU transcoder (any other head is refused there)
    threshold = sae.params.get("threshold")
    if threshold is not None and bool((threshold < 0).any()):
        raise ValueError("a threshold is below 0: circuit-tracer's JumpReLU, which has no ReLU, would give other codes")
    provenance = model.dictionary.provenance
    hooks = {"feature_input_hook": feature_input_hook or _tl_name(provenance.get("hook_name"), layer),
             "feature_output_hook": feature_output_hook or _tl_name(provenance.get("hook_name_out"), layer)}
    missing = [key for key, value in hooks.items() if not value]
    if missing:
        raise ValueError(f"{' and '.join(missing)}: circuit-tracer names the hooks per layer (e.g. "
                         f"ln2.hook_normalized, hook_mlp_out); this model's hooks ({provenance.get('hook_name')}, "
                         f"{provenance.get('hook_name_out')}) are not blocks.{layer}.NAME, so pass them")
    out = Path(out_dir)
    config_path, name = out / CONFIG, f"layer_{layer}.safetensors"
    config: dict[str, Any] = read_yaml(config_path) if config_path.exists() else {}
    clash = {k: (config[k], v) for k, v in hooks.items() if k in config and config[k] != v}
    if config.get("model_kind", "transcoder_set") != "transcoder_set" or clash:
        raise ValueError(f"{config_path} describes another transcoder set ({clash or config.get('model_kind')}); "
                         "export into another folder")
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc,
               "b_dec": torch.zeros(sae.d_model) if sae.b_dec is None else sae.b_dec}
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    if threshold is not None:
        tensors["activation_function.threshold"] = threshold
    atomic_write(out / name, lambda tmp: save_file({k: v.detach().float().cpu().contiguous() for k, v in
                                                    tensors.items()}, str(tmp)))
    listed = sorted({*config.get("transcoders", []), name}, key=lambda f: int(Path(f).stem.split("_")[-1]))
    config.update({"model_kind": "transcoder_set", **hooks, "transcoders": listed,
                   "model_name": model_name or config.get("model_name") or provenance.get("model_name")})
    atomic_write(config_path, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))
    return out

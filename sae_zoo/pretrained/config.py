"""sae_zoo's own format: ``config.json`` (everything that rebuilds the model) and ``model.safetensors``.

``config.json``::

    {"library": "sae_zoo", "format_version": 1, "sae_zoo_version": "0.1.0",
     "encoder": {"name": "linear", "d_model": 8, "n_latents": 16, ...},   # create_encoder(**encoder)
     "dictionary": {"n_latents": 16, "d_model": 8, "trainable": false, "bias": false},
     "decoder_provenance": {...},        # where the atoms came from
     "setting": "known_dictionary", "dtype": "float32",
     "l1_coeff": 0.01, "lr": 0.001, "supervised": false, ...}   # the training config (sae_zoo.TrainingConfig)
     # and a transcoder's "transcoder": true, "skip_connection": ..., "train_skip": ... (sae_zoo.families)

``model.safetensors`` holds the SparseCoder's state dict (``encoder.*``, ``dictionary.*``).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .._io import check_shape, read_json, read_safetensors, require_keys
from ..dictionary import Dictionary
from ..encoders import EncoderHead, create_encoder
from .files import resolve_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
REQUIRED_KEYS = ["library", "format_version", "encoder", "dictionary", "dtype"]
ENCODER_PREFIX = "encoder."


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """The ``config.json`` of a :class:`~sae_zoo.SparseCoder`: its config (``model.config()``, a
    :class:`~sae_zoo.model_config.ModelConfig`) with the file's own keys."""
    return {"library": "sae_zoo", "format_version": FORMAT_VERSION, "sae_zoo_version": version("sae_zoo"),
            **model.config().to_dict(), "decoder_provenance": model.dictionary.provenance, "setting": model.setting,
            "dtype": str(model.dictionary.weight.dtype).removeprefix("torch.")}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    # clone: safetensors refuses tensors that share memory, and a head may reuse a parameter
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(path))


def check_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    require_keys(path, config, REQUIRED_KEYS)
    if config["library"] != "sae_zoo":
        raise ValueError(f"{path}: 'library' is {config['library']!r}, not 'sae_zoo'; for other libraries' SAEs "
                         "use sae_zoo.hub.load_sae")
    if config["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: 'format_version' {config['format_version']} is newer than this sae_zoo reads "
                         f"({FORMAT_VERSION}); upgrade sae_zoo")
    if not hasattr(torch, str(config["dtype"])) or not isinstance(getattr(torch, config["dtype"]), torch.dtype):
        raise ValueError(f"{path}: 'dtype' {config['dtype']!r} is not a torch dtype")
    return config


def build_encoder(config: dict[str, Any], path: Path) -> EncoderHead:
    spec = dict(config["encoder"]) if isinstance(config["encoder"], dict) else None
    if spec is None or "name" not in spec:
        raise ValueError(f"{path}: 'encoder' must be an object with a 'name', got {config['encoder']!r}")
    try:
        return create_encoder(**spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'encoder' cannot be built: {e}") from None


def build_dictionary(config: dict[str, Any], path: Path) -> Dictionary:
    try:
        dictionary = Dictionary(**config["dictionary"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'dictionary' cannot be built: {e}") from None
    dictionary.provenance = dict(config.get("decoder_provenance") or {})
    return dictionary


def load_state(module: torch.nn.Module, tensors: dict[str, Tensor], path: Path, config_path: Path) -> None:
    """Copy ``tensors`` into ``module`` after checking every name, shape and dtype against it."""
    expected = module.state_dict()
    require_keys(path, tensors, sorted(expected), what="tensor")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: tensors {', '.join(map(repr, unexpected))} are not part of the model that "
                         f"{config_path.name} describes")
    for name, tensor in tensors.items():
        check_shape(path, name, tensor, tuple(expected[name].shape), because=f"as {config_path.name} describes")
        if tensor.dtype != expected[name].dtype:
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}, {config_path.name} says {expected[name].dtype}")
    module.load_state_dict(tensors)


def read_model_config(source: str | Path, **download: Any) -> tuple[dict[str, Any], Path]:
    """``(config, path)`` of the ``config.json`` of a local folder or Hub repo, read and checked."""
    path = resolve_file(source, CONFIG_NAME, **download)
    return check_config(read_json(path), path), path


def load_encoder(source: str | Path, **download: Any) -> EncoderHead:
    """The encoder head alone (in eval mode), from a saved or pushed :class:`~sae_zoo.SparseCoder`, ready
    to be paired with another dictionary of the same width (``SparseCoder(load_encoder(repo), dictionary)``)."""
    config, config_path = read_model_config(source, **download)
    weights_path = resolve_file(source, WEIGHTS_NAME, **download)
    encoder = build_encoder(config, config_path).to(getattr(torch, config["dtype"]))
    tensors = read_safetensors(weights_path)
    load_state(encoder, {k[len(ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)},
               weights_path, config_path)
    return encoder.eval()

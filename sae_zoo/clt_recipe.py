"""Recipes that train a cross-layer transcoder (``model.family: clt``) from one LM pass over every layer it spans.

``model.layers: [6, 7, 8, 9]`` (consecutive blocks, or ``all``) reads each block's MLP input and output
(``mlp_in.L``, ``mlp_out.L``); ``data.hooks`` may name the ``[input, output]`` pairs instead, one per layer in order.
``encoder`` is every layer's head, ``dictionary.n_latents`` the latents per layer, and ``model`` takes
:class:`~sae_zoo.CrossLayerTranscoder`'s options (``skip_connection``, ``lr``, ``sparsity_coeff``, ``tanh_scale``,
``target_l0`` as a summed L0, ``auxk_coeff``, ``dead_tokens``, ``lr_warmup_steps``, ``lr_decay_steps``). The run
folder holds the recipe, the model in sae_zoo's format (``model/``: ``load_sae`` reads it), the training log and
``metrics.json``: FVU of every layer's MLP output and CE-loss recovered with every MLP of the span replaced at once
(:mod:`sae_zoo.evaluation.replacement`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ._signature import check_kwargs, section_kwargs
from .clt import CrossLayerTranscoder, check_layers, hook_layer
from .data.activations import ActivationDataModule
from .data.multi_hook import MultiHookData, check_hooks, hook_name
from .encoders import get_encoder_class
from .evaluation.replacement import replacement_ce, replacement_fvu
from .lm import find_blocks

#: the ``model`` keys a CLT recipe takes
MODEL_KEYS = ("family", "layers", "skip_connection",
              *[k for k in inspect.signature(CrossLayerTranscoder.__init__).parameters
                if k not in ("self", "encoders", "decoder", "skip_connection", "layers", "provenance")])


def is_clt_recipe(cfg: DictConfig) -> bool:
    return cfg.model.get("family") == "clt"


def clt_hooks(cfg: DictConfig, n_model_layers: int | None = None) -> tuple[list[int] | str, list[tuple[str, str]]]:
    """``(layers, [(input hook, output hook)] per layer)`` of a CLT recipe; ``layers: all`` needs ``n_model_layers``
    (else the hooks are left empty until the LM is read)."""
    layers, hooks = cfg.model.get("layers"), cfg.data.get("hooks")
    if (layers is None) == (hooks is None):
        raise ValueError("model.layers: a cross-layer transcoder names the layers it spans (model.layers: [6, 7, 8, "
                         "9], or all), or data.hooks their [input, output] pairs; give one of them")
    if hooks is not None:
        pairs = check_hooks(OmegaConf.to_container(hooks) if OmegaConf.is_config(hooks) else hooks)
        if any(out is None for _, out in pairs):
            raise ValueError("data.hooks: a cross-layer transcoder reads [input, output] pairs, one per layer")
        numbers = [hook_layer(h) for h, _ in pairs]
        if None in numbers:
            raise ValueError(f"data.hooks: {pairs[numbers.index(None)][0]!r} names no block number")
        return check_layers(numbers, n_model_layers), pairs
    if layers == "all":
        if n_model_layers is None:
            return "all", []
        layers = list(range(n_model_layers))
    if not isinstance(layers, (list, tuple)) and not OmegaConf.is_list(layers):
        raise ValueError(f"model.layers: {layers!r} is neither a list of blocks nor 'all'")
    layers = check_layers(list(layers), n_model_layers)
    return layers, [(f"mlp_in.{layer}", f"mlp_out.{layer}") for layer in layers]


def check_clt_recipe(cfg: DictConfig) -> None:
    """Refuse, by key, what a CLT recipe cannot train with."""
    if cfg.setting != "unknown":
        raise ValueError(f"setting: a cross-layer transcoder learns its decoders (setting=unknown), not "
                         f"{cfg.setting!r}")
    data = section_kwargs(cfg.data)
    if data.pop("name", None) != "activations":
        raise ValueError("data.name: a cross-layer transcoder reads a language model's activations (activations)")
    given = [k for k in ("hook", "hook_out") if k in data]
    if given:
        raise ValueError(f"data.{given[0]}: a cross-layer transcoder reads every layer's MLP input and output "
                         "(model.layers, or data.hooks); drop it")
    data.pop("hooks", None)
    check_kwargs(ActivationDataModule.__init__, {**data, "hook": "mlp_in.0"}, what="data 'activations'",
                 key_prefix="data.")
    clt_hooks(cfg)
    encoder = section_kwargs(cfg.encoder)
    head = get_encoder_class(encoder.pop("name", None))
    if head.reads_dictionary:
        raise ValueError(f"encoder.name: {head.name!r} is iterative: it finds its codes by reconstructing its input "
                         "through the dictionary, and a CLT's decoders write later layers' MLP outputs, unknown at "
                         "inference. Use an amortised head (jumprelu, topk, batchtopk, linear)")
    check_kwargs(head.__init__, encoder, what=f"encoder {head.name!r}", skip=("d_model", "n_latents"),
                 key_prefix="encoder.")
    dictionary = section_kwargs(cfg.dictionary)
    if set(dictionary) != {"n_latents"}:
        raise ValueError(f"dictionary: a cross-layer transcoder takes dictionary.n_latents (latents per layer) alone, "
                         f"got {', '.join(sorted(dictionary)) or 'nothing'}")
    unknown = sorted(set(section_kwargs(cfg.model)) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"model.{unknown[0]}: not an option of a cross-layer transcoder ({', '.join(MODEL_KEYS)})")


def clt_data(cfg: DictConfig) -> tuple[MultiHookData, list[int]]:
    """The data a CLT recipe trains on (one part per layer, read from one LM pass; every layer checked against the LM
    before any forward pass) and the blocks it spans."""
    check_clt_recipe(cfg)
    data_kwargs = {k: v for k, v in section_kwargs(cfg.data).items() if k not in ("name", "hooks")}
    layers, hooks = clt_hooks(cfg)
    if layers == "all":
        probe = ActivationDataModule(**data_kwargs, hook="mlp_in.0", hook_out="mlp_out.0")
        blocks = find_blocks(probe.language_model()[0])
        if blocks is None:
            raise ValueError("model.layers: all needs a model with a stack of blocks; name the layers")
        layers, hooks = clt_hooks(cfg, len(blocks[1]))
    parts = {}
    for hook, hook_out in hooks:
        name = hook_name([hook, hook_out])
        kwargs = dict(data_kwargs)
        if kwargs.get("cache_dir"):
            kwargs["cache_dir"] = str(Path(kwargs["cache_dir"]) / name)
        parts[name] = ActivationDataModule(**kwargs, hook=hook, hook_out=hook_out)
    data = MultiHookData(parts)
    data.check_hooks()
    return data, layers


def build_clt(cfg: DictConfig) -> tuple[MultiHookData, CrossLayerTranscoder]:
    """The data (:func:`clt_data`) and the CLT a recipe describes."""
    data, layers = clt_data(cfg)
    first = data.first
    model = {k: v for k, v in section_kwargs(cfg.model).items() if k not in ("family", "layers")}
    clt = CrossLayerTranscoder.create(len(layers), first.d_model, int(cfg.dictionary.n_latents),
                                      section_kwargs(cfg.encoder), d_out=first.d_out, layers=layers, **model)
    return data, clt


def describe_clt(clt: CrossLayerTranscoder, data: MultiHookData) -> None:
    """Record where the CLT's data came from (the per-layer scales, which export folds in) in its provenance."""
    parts = list(data.parts.values())
    first = parts[0].describe()
    clt.provenance.update({"model_name": first.get("model_name"), "dataset": first.get("dataset"),
                           "hooks": [[p.hparams.hook, p.hparams.hook_out] for p in parts],
                           "input_scales": [float(p.scale) for p in parts],
                           "target_scales": [float(p.target_scale) for p in parts]})


def evaluate_clt(models: dict[str, Any], data: MultiHookData) -> dict[str, dict[str, Any]]:
    """Each model's (a CLT or a list of per-layer transcoders) held-out FVU per layer and summed L0, and CE-loss
    recovered with every MLP of the span replaced, measured on the same tokens and contexts."""
    ce = replacement_ce(models, data)
    return {name: {**replacement_fvu(model, data), **ce[name]} for name, model in models.items()}

"""Cross-layer transcoders (CLTs): one encoder per layer reading that layer's MLP input, each of whose latents writes,
through a decoder of its own per target layer, to its layer's MLP output and to every later one (Anthropic's
"Circuit Tracing", 2025; circuit-tracer's ``CrossLayerTranscoder``).

Source layer ``i`` has decoders ``W_dec[i]`` of shape ``(d_transcoder, n_layers - i, d_out)``, stored as circuit-tracer
stores them, so the output at layer ``L`` is ``sum_{i <= L} codes_i @ W_dec[i][:, L - i] + b_dec[L]`` (plus
``x_L @ W_skip[L]`` with a skip term). The decoders grow with the square of the number of layers: with ``n`` layers
they hold ``d_transcoder * d_out * n (n + 1) / 2`` weights against the encoders' ``n * d_transcoder * d_in``, so at
4 layers they are 2.5x the encoders, at 16 layers 8.5x; Adam keeps two more copies of each. Codes that are sparse (a
top-k head's in training; any head's at inference) are decoded sparse: each latent's decoders are gathered and
weighed (``F.embedding_bag``), which costs ``L0 x (n - i) x d_out`` per token instead of the dense product.

Each layer's encoder is any amortised head of the registry (``jumprelu``, ``topk``, ``batchtopk``, ``linear``),
built per layer. The loss sums every layer's reconstruction of its MLP output (an MSE per layer); the sparsity
penalty is Anthropic's, ``tanh(tanh_scale * code * ||decoders||)`` summed over latents and layers (each latent's
decoders' norms summed over its target layers), unless the head fixes its L0 (top-k, BatchTopK). ``target_l0`` tunes
the penalty's coefficient towards a summed L0 (:class:`~sae_zoo.sparsity.SparsityControl`); ``auxk_coeff`` adds
AuxK per layer for top-k heads; ``lr_warmup_steps``/``lr_decay_steps`` shape the learning rate; ``across_layers``
(BatchTopK heads) selects the batch's top codes over every layer at once instead of per layer; ``matryoshka_widths``
adds the loss of each prefix of every layer's latents alone (Matryoshka SAEs' nested groups, per layer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors.torch import save_file
from torch import Tensor, nn

from ._io import atomic_directory, atomic_write_json, read_json, read_safetensors
from .data.base import Pair
from .distributed import any_rank, summed, world_size
from .encoders import EncoderHead, SparseCodes, create_encoder
from .encoders.topk import batch_topk
from .families import ModelFamily, register_family
from .model import logging_step, training_progress
from .objectives import adam, check_matryoshka_widths, fired_latents
from .pretrained.config import load_state
from .pretrained.files import resolve_file
from .schedules import steps_or_fraction
from .sparsity import SparsityControl
from .training import LRSchedule

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
#: a share of codes above which a dense decode is cheaper than gathering each code's decoders
SPARSE_DECODE_BELOW = 0.05


class CLTOutput(NamedTuple):
    """What :class:`CrossLayerTranscoder` returns: every layer's output ``(batch, n_layers, d_out)`` and codes
    ``(batch, n_layers, d_transcoder)``."""

    outputs: Tensor
    codes: Tensor


def check_layers(layers: Sequence[int], n_model_layers: int | None = None) -> list[int]:
    """``layers`` as a list of consecutive block indices, refused by name when they are not, or when the model
    (``n_model_layers`` blocks) lacks one."""
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError("layers: a cross-layer transcoder spans at least one layer, got []")
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"layers: {layers} are not consecutive; a cross-layer transcoder spans a run of consecutive "
                         f"layers (e.g. {list(range(layers[0], layers[0] + len(layers)))})")
    if layers[0] < 0 or (n_model_layers is not None and layers[-1] >= n_model_layers):
        raise ValueError(f"layers: {layers} asks for block {layers[0] if layers[0] < 0 else layers[-1]}, and the "
                         f"model has blocks 0..{n_model_layers - 1 if n_model_layers else '?'}")
    return layers


def hook_layer(hook: str) -> int | None:
    """The block a hook such as ``mlp_in.6``, ``blocks.6.ln2.hook_normalized`` or ``model.layers.6.mlp`` names."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", hook)
    return int(match.group(1)) if match else None


@register_family("clt")
class CrossLayer(ModelFamily):
    """The cross-layer transcoder's family: paired data (each layer's MLP input and output), amortised heads only.
    It is built as :class:`CrossLayerTranscoder` (one head per layer, decoders to every later layer), not as a
    :class:`~sae_zoo.SparseCoder`."""

    paired = True

    def check(self, encoder: EncoderHead, dictionary: Any, training: Any, scoring: Any = None) -> None:
        raise ValueError("a cross-layer transcoder has one encoder per layer and decoders to every later layer: build "
                         "it with sae_zoo.CrossLayerTranscoder.create(...), not SparseCoder")

    @staticmethod
    def check_head(head: EncoderHead, layer: int) -> None:
        """Refuse, by name, a head that cannot encode one layer of a CLT."""
        if head.reads_dictionary:
            raise ValueError(f"encoder {head.name!r} (layer {layer}) is iterative: it finds its codes by "
                             "reconstructing its input through the dictionary, and a CLT's decoders write later "
                             "layers' MLP outputs, unknown at inference. Use an amortised head (jumprelu, topk, "
                             "batchtopk, linear)")
        if head.subtract_decoder_bias:
            raise ValueError(f"encoder {head.name!r} (layer {layer}) subtracts the decoder bias, which lies in the "
                             "outputs' space; set subtract_decoder_bias=False")


class CrossLayerDecoder(nn.Module):
    """The decoders of a CLT: ``W_dec[i]`` ``(d_transcoder, n_layers - i, d_out)`` per source layer ``i`` and a bias
    ``b_dec`` ``(n_layers, d_out)``. Started as Anthropic starts them: uniform in ``+-1/sqrt(n_layers * d_out)``."""

    def __init__(self, n_layers: int, d_transcoder: int, d_out: int) -> None:
        super().__init__()
        self.n_layers, self.d_transcoder, self.d_out = int(n_layers), int(d_transcoder), int(d_out)
        bound = (n_layers * d_out) ** -0.5
        self.W_dec = nn.ParameterList([
            nn.Parameter(torch.empty(d_transcoder, n_layers - i, d_out).uniform_(-bound, bound))
            for i in range(n_layers)])
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out))

    def norms(self) -> Tensor:
        """``(n_layers, d_transcoder)``: each latent's decoder norms summed over the layers it writes."""
        return torch.stack([w.norm(dim=-1).sum(-1) for w in self.W_dec])

    def norms_by_target(self, layer: int) -> Tensor:
        """``(d_transcoder, n_layers)``: source layer ``layer``'s latents' decoder norm at each target layer (0 before
        ``layer``, which they cannot write)."""
        norms = self.W_dec[layer].detach().norm(dim=-1)
        return torch.cat([norms.new_zeros(self.d_transcoder, layer), norms], dim=1)

    def forward(self, codes: Sequence[Tensor | SparseCodes]) -> Tensor:
        """Every layer's output ``(batch, n_layers, d_out)`` from each source layer's codes (dense ``(batch,
        d_transcoder)``, or :class:`SparseCodes`)."""
        first = codes[0].values if isinstance(codes[0], SparseCodes) else codes[0]
        out = self.b_dec.expand(first.shape[0], -1, -1).clone()
        for i, layer_codes in enumerate(codes):
            out[:, i:] += self.decode_layer(i, layer_codes).view(-1, self.n_layers - i, self.d_out)
        return out

    def decode_layer(self, layer: int, codes: Tensor | SparseCodes) -> Tensor:
        """Source layer ``layer``'s contribution ``(batch, (n_layers - layer) * d_out)`` to the layers it writes, from
        its codes: :class:`SparseCodes`, or dense ``(batch, m)``, the first ``m`` latents' (all, or a prefix)."""
        if isinstance(codes, SparseCodes):
            weight = self.W_dec[layer].flatten(1)
            return F.embedding_bag(codes.indices, weight, per_sample_weights=codes.values.to(weight.dtype), mode="sum")
        weight = self.W_dec[layer][:codes.shape[-1]].flatten(1)
        if not torch.is_grad_enabled():
            rows, latents = codes.nonzero(as_tuple=True)
            if rows.numel() < SPARSE_DECODE_BELOW * codes.numel():  # sparse codes: gather their decoders alone
                offsets = torch.searchsorted(rows, torch.arange(codes.shape[0], device=rows.device))
                values = codes[rows, latents].to(weight.dtype)
                return F.embedding_bag(latents, weight, offsets, per_sample_weights=values, mode="sum")
        return codes.to(weight.dtype) @ weight


class CrossLayerTranscoder(ModelHubMixin, L.LightningModule, library_name="sae_zoo", license="apache-2.0",
                           tags=["cross-layer-transcoder", "transcoder", "interpretability"]):
    """A cross-layer transcoder (see the module's docstring): ``encoders`` (one head per layer, all reading ``d_in``
    and giving ``d_transcoder`` latents) and ``decoder``. ``model(x)`` with ``x`` ``(batch, n_layers, d_in)`` returns
    :class:`CLTOutput`. ``layers``: the model's blocks it spans (for its hooks); ``provenance``: where it came from
    (the data's scales ``input_scales``/``target_scales`` per layer among them). Build one with :meth:`create`."""

    def __init__(self, encoders: Sequence[EncoderHead], decoder: CrossLayerDecoder, *, skip_connection: bool = False,
                 layers: Sequence[int] | None = None, lr: float = 1e-3, sparsity_coeff: float = 1e-3,
                 tanh_scale: float = 4.0, target_l0: float | None = None, auxk_coeff: float = 0.0,
                 dead_tokens: int = 10_000_000, lr_warmup_steps: int | float = 0, lr_decay_steps: int | float = 0,
                 across_layers: bool = False, matryoshka_widths: Sequence[int] | None = None,
                 provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        if len(encoders) != decoder.n_layers:
            raise ValueError(f"{len(encoders)} encoders for a decoder of {decoder.n_layers} layers: give one per layer")
        for i, head in enumerate(encoders):
            CrossLayer.check_head(head, i)
            if head.n_latents != decoder.d_transcoder:
                raise ValueError(f"encoder {i} has {head.n_latents} latents, the decoder {decoder.d_transcoder}")
        if len({head.d_model for head in encoders}) != 1:
            raise ValueError(f"the encoders read different widths {[h.d_model for h in encoders]}; one d_in for all")
        forced = {head.forced_l0 is not None for head in encoders}
        if target_l0 is not None and True in forced:
            raise ValueError(f"target_l0={target_l0}: the {encoders[0].name!r} head fixes its L0 (k), so there is no "
                             "penalty to tune; set k instead")
        if across_layers and not all(h.name == "batchtopk" for h in encoders):
            raise ValueError(f"across_layers=True selects a BatchTopK over every layer's latents at once; the "
                             f"{encoders[0].name!r} head is not batchtopk")
        if auxk_coeff and not all(hasattr(h, "linear") for h in encoders):
            raise ValueError(f"auxk_coeff={auxk_coeff}: AuxK needs heads built on one linear map")
        for name, value in {"lr": lr, "tanh_scale": tanh_scale}.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {name}={value!r}")
        self.encoders = nn.ModuleList(encoders)
        self.decoder = decoder
        self.n_layers, self.d_transcoder, self.d_out = decoder.n_layers, decoder.d_transcoder, decoder.d_out
        self.d_in = encoders[0].d_model
        self.layers = check_layers(layers) if layers is not None else list(range(self.n_layers))
        if len(self.layers) != self.n_layers:
            raise ValueError(f"layers: {self.layers} names {len(self.layers)} layers, the model has {self.n_layers}")
        self.W_skip = nn.Parameter(torch.zeros(self.n_layers, self.d_in, self.d_out)) if skip_connection else None
        self.options = {"lr": float(lr), "sparsity_coeff": float(sparsity_coeff), "tanh_scale": float(tanh_scale),
                        "target_l0": target_l0, "auxk_coeff": float(auxk_coeff), "dead_tokens": int(dead_tokens),
                        "lr_warmup_steps": steps_or_fraction(lr_warmup_steps, "lr_warmup_steps"),
                        "lr_decay_steps": steps_or_fraction(lr_decay_steps, "lr_decay_steps"),
                        "across_layers": bool(across_layers),
                        "matryoshka_widths": (check_matryoshka_widths(matryoshka_widths, decoder.d_transcoder)
                                              if matryoshka_widths else None)}
        self.penalised = True not in forced
        self.sparsity = SparsityControl(sparsity_coeff if self.penalised else 1.0, target_l0)
        self.register_buffer("tokens_since_fired", torch.zeros(self.n_layers, self.d_transcoder), persistent=False)
        self.provenance = dict(provenance or {})

    # ---- building ----

    @classmethod
    def create(cls, n_layers: int, d_in: int, d_transcoder: int, encoder: str | dict[str, Any] = "jumprelu", *,
               d_out: int | None = None, **options: Any) -> "CrossLayerTranscoder":
        """A new CLT of ``n_layers`` layers, each with the head ``encoder`` (a registered name, or ``{"name": ...,
        **hyper-parameters}``); ``options`` are :class:`CrossLayerTranscoder`'s."""
        spec = {"name": encoder} if isinstance(encoder, str) else dict(encoder)
        name = spec.pop("name")
        heads = [create_encoder(name, d_model=d_in, n_latents=d_transcoder, **spec) for _ in range(n_layers)]
        return cls(heads, CrossLayerDecoder(n_layers, d_transcoder, d_out or d_in), **options)

    @property
    def skip_connection(self) -> bool:
        return self.W_skip is not None

    def config(self) -> dict[str, Any]:
        """What :meth:`from_config` rebuilds it from (``config.json``)."""
        head = self.encoders[0].config()
        return {"family": "clt", "n_layers": self.n_layers, "d_in": self.d_in, "d_out": self.d_out,
                "d_transcoder": self.d_transcoder, "layers": self.layers, "skip_connection": self.skip_connection,
                "encoder": {k: v for k, v in head.items() if k not in ("d_model", "n_latents")},
                "training": self.options, "provenance": self.provenance}

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config") -> "CrossLayerTranscoder":
        missing = [k for k in ("n_layers", "d_in", "d_transcoder", "encoder") if k not in config]
        if missing or config.get("family") != "clt":
            raise ValueError(f"{where}: not a cross-layer transcoder's config (family {config.get('family')!r}; "
                             f"missing {', '.join(missing) or 'nothing'})")
        return cls.create(config["n_layers"], config["d_in"], config["d_transcoder"], config["encoder"],
                          d_out=config.get("d_out"), skip_connection=config.get("skip_connection", False),
                          layers=config.get("layers"), provenance=config.get("provenance"),
                          **config.get("training", {}))

    def _save_pretrained(self, save_directory: Path) -> None:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(save_directory / WEIGHTS_NAME))
        atomic_write_json(save_directory / CONFIG_NAME, self.config())

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Any:
        """``config.json`` and ``model.safetensors`` in ``save_directory``, written whole or not at all."""
        with atomic_directory(save_directory, replaces=(CONFIG_NAME, WEIGHTS_NAME)) as staging:
            super().save_pretrained(staging, **{k: v for k, v in kwargs.items() if k != "push_to_hub"})
        if kwargs.get("push_to_hub"):
            return self.push_to_hub(kwargs.get("repo_id") or Path(save_directory).name)
        return None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False, token: Any = None,
                         map_location: str = "cpu", **_: Any) -> "CrossLayerTranscoder":
        download = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download, "token": token,
                    "local_files_only": local_files_only}
        config_path = resolve_file(model_id, CONFIG_NAME, **download)
        model = cls.from_config(read_json(config_path), str(config_path))
        weights_path = resolve_file(model_id, WEIGHTS_NAME, **download)
        load_state(model, read_safetensors(weights_path), weights_path, config_path)  # names, shapes, dtypes checked
        return model.to(map_location).eval()

    def generate_model_card(self, repo_id: str | None = None, **_: Any) -> ModelCard:
        """The Hub's ``README.md``: what the CLT spans and reads, and how to load it."""
        head = self.encoders[0].config()
        hyper = ", ".join(f"{k}={v}" for k, v in head.items() if k not in ("name", "d_model", "n_latents"))
        source = self.provenance
        lines = [
            "---", "library_name: sae_zoo", "license: apache-2.0",
            "tags: [cross-layer-transcoder, transcoder, interpretability, sae_zoo]",
            *([f"base_model: {source['model_name']}"] if isinstance(source.get("model_name"), str)
              and "/" in source["model_name"] else []), "---", "",
            f"# A cross-layer transcoder over blocks {self.layers[0]}-{self.layers[-1]}", "",
            f"{self.n_layers} layers, {self.d_transcoder} latents per layer ({self.n_layers * self.d_transcoder} in "
            f"all), each layer's encoder a `{head['name']}` head ({hyper or 'default hyper-parameters'}); each latent "
            f"writes its own layer's output and every later one's"
            f"{', with a skip term per layer' if self.W_skip is not None else ''}.",
            "", f"- language model: `{source.get('model_name', 'not recorded')}`",
            f"- hooks (input, output) per layer: {source.get('hooks', 'not recorded')}",
            f"- training: {self.options}", "", "```python", "import sae_zoo", "",
            f'clt = sae_zoo.load_sae("{repo_id or "REPO_ID"}").model()  # a CrossLayerTranscoder',
            "# x: (batch, n_layers, d_in), each layer's activations times its input_scales (in clt.provenance)",
            "outputs, codes = clt(x)",
            "```", ""]
        return ModelCard("\n".join(lines))

    # ---- the model ----

    def check_input(self, x: Tensor, what: str = "x") -> Tensor:
        want = (self.n_layers, self.d_in if what == "x" else self.d_out)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(f"a CLT of {self.n_layers} layers expects {what} of shape (batch, {want[0]}, {want[1]}), "
                             f"got {tuple(x.shape)}")
        return x

    def encode(self, x: Tensor) -> Tensor:
        """Codes ``(batch, n_layers, d_transcoder)`` of inputs ``(batch, n_layers, d_in)``."""
        x = self.check_input(x)
        return torch.stack([head(x[:, i]) for i, head in enumerate(self.encoders)], dim=1)

    def skip(self, x: Tensor) -> Tensor | None:
        return None if self.W_skip is None else torch.einsum("bld,lde->ble", x.to(self.W_skip.dtype), self.W_skip)

    def decode(self, codes: Tensor | Sequence[Tensor | SparseCodes], x: Tensor | None = None) -> Tensor:
        """Outputs ``(batch, n_layers, d_out)`` of codes (``(batch, n_layers, d_transcoder)``, or one per layer),
        plus the skip term of the inputs ``x`` where the model has one."""
        out = self.decoder(list(codes.unbind(1)) if isinstance(codes, Tensor) else codes)
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this CLT has a skip term: decode(codes, x) needs the inputs")
            out = out + self.skip(x)
        return out

    def forward(self, x: Tensor) -> CLTOutput:
        codes = self.encode(x)
        return CLTOutput(self.decode(codes, x), codes)

    # ---- training ----

    @staticmethod
    def stack_batch(batch: Pair | dict[str, Pair] | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(x, target)`` ``(batch, n_layers, width)`` of a batch: a :class:`Pair` of such tensors, or a mapping
        (hook -> Pair, in layer order: one LM pass's several hooks)."""
        if isinstance(batch, dict):
            pairs = list(batch.values())
            return torch.stack([p.x for p in pairs], 1), torch.stack([p.target for p in pairs], 1)
        x, target = batch
        return x, target

    def loss_terms(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each term of the training loss, and what is logged beside it."""
        self.check_input(x)
        self.check_input(target, "target")
        codes = (self._codes_across_layers(x) if self.options["across_layers"] else
                 [head.training_codes(x[:, i], None).codes for i, head in enumerate(self.encoders)])
        out = self.decode(codes, x)
        per_layer = ((out - target) ** 2).mean(dim=(0, 2))
        terms = {"mse": per_layer.sum()}
        for width in (self.options["matryoshka_widths"] or [])[:-1]:  # each prefix of every layer's latents alone
            prefix = [SparseCodes(c.values * (c.indices < width), c.indices) if isinstance(c, SparseCodes)
                      else c[:, :width] for c in codes]
            terms["mse"] = terms["mse"] + ((self.decode(prefix, x) - target) ** 2).mean(dim=(0, 2)).sum()
        l0s = torch.stack([(c.values > 0).sum(-1).float().mean() if isinstance(c, SparseCodes)
                           else (c > 0).sum(-1).float().mean() for c in codes])
        if self.penalised:
            norms = self.decoder.norms()
            penalty = x.new_zeros(())
            for i, c in enumerate(codes):
                scaled = c.values * norms[i][c.indices] if isinstance(c, SparseCodes) else c * norms[i]
                penalty = penalty + torch.tanh(self.options["tanh_scale"] * scaled).sum() / x.shape[0]
            trainer = self._trainer  # outside training (a loss measured by hand) the coefficient has no step
            coeff = (self.sparsity.value(None) if trainer is None
                     else self.sparsity.value(self.global_step, trainer.estimated_stepping_batches))
            terms["sparsity"] = coeff * penalty
        if self.options["auxk_coeff"]:
            terms["auxk"] = self.options["auxk_coeff"] * self._auxk(x, target - out.detach(), codes)
        return {**terms, "l0": l0s.sum().detach(), "per_layer_mse": per_layer.detach()}

    def _codes_across_layers(self, x: Tensor) -> list[Tensor]:
        """BatchTopK over every layer's latents at once (as ``utahnlp/crosslayer-coding`` trains): the batch keeps its
        ``k x n_layers x samples`` largest codes wherever they are, so a layer may use more of the budget than
        another. Every head's inference threshold follows the smallest kept code of all layers."""
        pre = torch.stack([head.linear_map(x[:, i], None) for i, head in enumerate(self.encoders)], 1).relu()
        first = self.encoders[0]
        values, indices = batch_topk(pre.flatten(1), first.training_k * self.n_layers)
        codes = torch.zeros_like(pre.flatten(1)).scatter(1, indices, values).view_as(pre)
        kept = values.detach() > 0
        for head in self.encoders:
            head._update_threshold(values.detach()[kept], indices[kept] % self.d_transcoder, len(x), None)
        return list(codes.unbind(1))

    def _auxk(self, x: Tensor, residual: Tensor, codes: list[Tensor | SparseCodes]) -> Tensor:
        """AuxK per source layer (Gao et al. 2024): the dead latents' top ``d_out / 2`` pre-activations reconstruct
        the residual of the layers they write, scaled by that residual's squared norm."""
        with torch.no_grad():
            for i, c in enumerate(codes):
                # every rank counts the global batch, so that all ranks agree on which latents are dead
                self.tokens_since_fired[i] += x.shape[0] * world_size()
                self.tokens_since_fired[i][any_rank(fired_latents(c, self.d_transcoder))] = 0
        losses = []
        for i, head in enumerate(self.encoders):
            dead = (self.tokens_since_fired[i] > self.options["dead_tokens"]).nonzero().flatten()
            if not len(dead):
                continue
            k = min(len(dead), max(1, self.d_out // 2))
            values, slots = head.pre_activations(x[:, i], None, dead).topk(k, dim=-1)
            aux = F.embedding_bag(dead[slots], self.decoder.W_dec[i].flatten(1), per_sample_weights=values.relu(),
                                  mode="sum").view(x.shape[0], self.n_layers - i, self.d_out)
            target = residual[:, i:]
            losses.append(((aux - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-12))
        return torch.stack(losses).mean() if losses else x.new_zeros(())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        progress = training_progress(self.trainer)
        for head in self.encoders:
            head.on_train_progress(progress, self.global_step)
        x, target = self.stack_batch(batch)
        terms = self.loss_terms(x, target)
        loss = sum(v for k, v in terms.items() if k not in ("l0", "per_layer_mse"))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the CLT's loss is {float(loss)} at step {self.global_step} "
                                     f"({ {k: float(v) for k, v in terms.items() if v.ndim == 0} })")
        if self.sparsity.targets_l0:  # the global batch's L0: every rank takes the same coefficient
            self.sparsity.update(summed(terms["l0"]) / world_size())
        if self._trainer is not None and logging_step(self._trainer):  # logging costs more than a small step
            self.log_dict({"train/loss": loss.detach(), "train/mse": terms["mse"].detach(), "train/l0": terms["l0"],
                           **{f"train/mse_layer_{layer}": v for layer, v in zip(self.layers, terms["per_layer_mse"])},
                           **({"train/sparsity_coeff": self.sparsity.coeff} if self.penalised else {})},
                          prog_bar=False, on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = adam([{"params": [p for p in self.parameters() if p.requires_grad]}], lr=self.options["lr"])
        schedule = LRSchedule(self.options["lr_warmup_steps"], self.options["lr_decay_steps"]).schedule(
            optimizer, self.trainer.estimated_stepping_batches)
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what a resumed run needs beside the weights: the controller's state and how long each latent has been dead
        checkpoint["clt_sparsity"] = {"coeff": float(self.sparsity.coeff), "integral": float(self.sparsity.integral)}
        checkpoint["clt_tokens_since_fired"] = self.tokens_since_fired.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "clt_sparsity" in checkpoint:
            self.sparsity.restore(**checkpoint["clt_sparsity"])
        if "clt_tokens_since_fired" in checkpoint:
            self.tokens_since_fired.copy_(checkpoint["clt_tokens_since_fired"])

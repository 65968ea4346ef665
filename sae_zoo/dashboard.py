"""Feature dashboards: a static HTML folder that shows what a run's latents respond to.

:func:`dashboard` (``sae-zoo dashboard RUN_DIR``) reads windows of the run's own text (a few from each
document, evenly spaced through it: :func:`~sae_zoo.data.windows.read_windows`) through its language model,
encodes them, and writes ``index.html`` (every selected latent: firing frequency, largest activation, the
tokens its atom promotes, its top context) and one page per latent:

* its top-activating contexts and a few from lower activation quantiles (of the peak activations of the
  windows where it fires: the 50-75%, 25-50% and 0-25% quantiles), each token shaded by the latent's activation;
* a histogram of its non-zero activations, and its firing frequency;
* the tokens its decoder atom promotes and suppresses through the LM's unembedding (the final norm's
  weight folded in, as TransformerLens folds it), where the hook's width is the unembedding's.

A transcoder's latents are shown with the contexts of the input they read (``data.hook``); its atoms write
``data.hook_out`` (an MLP's output, in the residual stream's width), which the logit lens reads. A cross-layer
transcoder's are shown one source layer at a time (``layer``), each page with a bar chart of the latent's decoder norm
at every layer it writes, and the logit lens of its decoders summed over those layers.

``compare``: a second run with the same decoder (two heads on one frozen dictionary, such as an SAE and the
MLP head trained on its decoder). Each page then puts the same atom's two code streams side by side: each
head's own top contexts, and under every context the other head's activations on the same tokens.

Pages are rendered with Jinja2 templates (``sae_zoo/templates``); the histograms are Plotly figures whose
library is copied into the folder (``plotly.min.js``), so the pages open from disk with no server and no
network. The folder is written beside its final place and renamed into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_directory, read_yaml
from .clt import CrossLayerTranscoder
from .data.base import LanguageModelData
from .data.registry import language_model_data_class
from .data.windows import Windows, columns, encode_windows, read_windows, token_text
from .hub import load_run
from .hub.clt import load_clt_run
from .model import SparseCoder

#: bands below the top contexts: quantiles of the peak activations of the windows where the latent fires
BANDS = ((0.5, 0.75), (0.25, 0.5), (0.0, 0.25))
#: files a dashboard folder holds, so that an existing one may be replaced and nothing else is
MARKER = "index.html"


@dataclass
class Head:
    """A run's model, its name on the pages, and its codes of the selected latents ``(windows, tokens, latents)``."""

    name: str
    model: SparseCoder
    codes: Tensor | None = None


def parse_latents(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--latents: {text!r} is not a comma-separated list of latent indices") from None


class CLTLayer(torch.nn.Module):
    """One source layer of a cross-layer transcoder, shown as a head: its layer's encoder, and as atoms each latent's
    decoders summed over the layers it writes (its whole write to the residual stream, which the logit lens reads)."""

    def __init__(self, clt: CrossLayerTranscoder, index: int) -> None:
        super().__init__()
        self.clt, self.index = clt, index
        self.dictionary = SimpleNamespace(n_latents=clt.d_transcoder,
                                          atoms=clt.decoder.W_dec[index].detach().sum(1))

    @property
    def device(self) -> torch.device:
        return self.clt.decoder.b_dec.device

    def encode(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.clt.encoders[self.index](x)

    def norms_html(self, latent: int) -> str:
        """A bar chart of the latent's decoder norm at its own layer and at every later one."""
        import plotly.graph_objects as go
        import plotly.io as pio

        norms = self.clt.decoder.norms_by_target(self.index)[latent, self.index:].tolist()
        layers = [str(layer) for layer in self.clt.layers[self.index:]]
        fig = go.Figure(go.Bar(x=layers, y=norms))
        fig.update_layout(height=220, margin={"l": 40, "r": 10, "t": 30, "b": 40}, xaxis_title="layer it writes",
                          yaxis_title="decoder norm", title=f"latent {latent}: decoder norm at each layer it writes")
        return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"norms-{latent}")


def load_head(run_dir: str | Path, layer: int | None = None) -> tuple[Head, dict[str, Any]]:
    """The run's model and its data settings; a run without language-model activations is refused. A CLT run's
    head is one source layer (``layer``, a block of its span; its first by default), read at that layer's hook."""
    run_dir = Path(run_dir)
    clt = load_clt_run(run_dir)
    if clt is not None:
        if layer is not None and layer not in clt.layers:
            raise ValueError(f"--layer {layer}: {run_dir}'s cross-layer transcoder spans blocks {clt.layers}")
        index = 0 if layer is None else clt.layers.index(layer)
        data = dict(read_yaml(run_dir / "config.yaml").get("data") or {})
        data.pop("hooks", None)
        data["hook"], data["hook_out"] = clt.provenance["hooks"][index]
        return Head(f"CLT layer {clt.layers[index]} ({run_dir.name})", CLTLayer(clt.eval(), index)), data
    if layer is not None:
        raise ValueError(f"--layer picks a source layer of a cross-layer transcoder; {run_dir} holds none")
    model, recipe, _ = load_run(run_dir)
    data = dict(recipe.get("data") or {})
    language_model_data_class(data, str(run_dir), "which has no text; a dashboard shows the text a latent fires on, "
                              "so it needs a run on language-model activations (data.name=activations)")
    return Head(f"{model.encoder.name} ({Path(run_dir).name})", model.eval()), data


def check_comparable(run_dir: Path, data: dict[str, Any], head: Head, other_dir: Path, other_data: dict[str, Any],
                     other: Head) -> None:
    """Two heads compare on one page only when they read the same activations and decode with the same atoms."""
    keys = ("model", "gguf_file", "hook", "hook_out", "normalize")
    differ = [k for k in keys if data.get(k) != other_data.get(k)]
    if differ:
        raise ValueError(f"--compare: {other_dir} reads other activations than {run_dir} (they differ in "
                         f"{', '.join(f'data.{k}' for k in differ)})")
    a, b = head.model.dictionary.atoms, other.model.dictionary.atoms
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-6):
        raise ValueError(f"--compare: {other_dir} does not decode with the atoms of {run_dir} ({tuple(b.shape)} "
                         f"against {tuple(a.shape)}{'' if a.shape != b.shape else ', different values'}); compare "
                         "heads trained on one frozen decoder (dictionary.pretrained)")


def select_latents(latents: list[int] | None, n_latents: int, fired: Tensor, count: int, seed: int,
                   run_dir: Path) -> list[int]:
    """The latents asked for (checked), or ``count`` latents drawn at random from those that fire under every
    head (``fired``: ``(heads, n_latents)``), then, if too few do, from those that fire under any."""
    if latents is not None:
        bad = [i for i in latents if not 0 <= i < n_latents]
        if bad:
            raise ValueError(f"--latents: {', '.join(map(str, bad))} out of range: {run_dir} has {n_latents} latents "
                             f"(0..{n_latents - 1})")
        return list(dict.fromkeys(latents))
    generator = torch.Generator().manual_seed(seed)
    every, some = fired.all(0), fired.any(0)
    if not some.any():
        raise ValueError(f"{run_dir}: no latent fires on the dashboard's text")
    chosen: list[int] = []
    for pool in (every, some & ~every):
        live = torch.nonzero(pool).flatten()
        chosen += live[torch.randperm(len(live), generator=generator)[:count - len(chosen)]].tolist()
    return sorted(chosen)


def logit_lens(datamodule: LanguageModelData, atoms: Tensor, top: int = 10) -> tuple[list | None, str]:
    """Per atom, the ``top`` tokens its direction promotes and suppresses through the unembedding, with the
    final norm's weight folded in where the LM has one, and how they were read; None with the reason when the
    hook's width is not the unembedding's."""
    lm, tokenizer, _ = datamodule.language_model()
    unembed = lm.get_output_embeddings()
    if unembed is None or unembed.weight.shape[1] != atoms.shape[1]:
        return None, ("not shown: the hook's width differs from the unembedding's, so its atoms are not "
                      "directions in the residual stream")
    base = lm.base_model
    norm = next((getattr(base, n) for n in ("norm", "ln_f", "final_layernorm", "final_layer_norm")
                 if hasattr(base, n)), None)
    weight = unembed.weight.detach().float().cpu()
    folded = norm is not None and getattr(norm, "weight", None) is not None
    if folded:
        weight = weight * norm.weight.detach().float().cpu()
    logits = atoms.detach().float().cpu() @ weight.T  # (atoms, vocab)
    out = []
    for row in logits:
        up, down = row.topk(top), (-row).topk(top)
        out.append({"promoted": [(token_text(tokenizer, int(i)), float(v)) for v, i in zip(up.values, up.indices)],
                    "suppressed": [(token_text(tokenizer, int(i)), -float(v))
                                   for v, i in zip(down.values, down.indices)]})
    return out, ("through the unembedding, the final norm's weight folded in" if folded else
                 "through the unembedding alone (no final norm with a weight was found to fold in)")


def example(windows: Windows, row: int, position: int, streams: list[Tensor], outliers: Tensor, scale: list[float],
            token_texts: dict[int, str], before: int, after: int) -> dict[str, Any]:
    """One context around ``position`` of window ``row``: its tokens with each stream's activations there, as
    fractions of the stream's largest activation (the shading)."""
    offset = windows.tokens.shape[1] - windows.activations.shape[1]  # BOS, left out of the activations
    lo, hi = max(0, position - before), min(streams[0].shape[1], position + after + 1)
    tokens = windows.tokens[row, lo + offset:hi + offset].tolist()
    lines = []
    for stream, peak in zip(streams, scale):
        values = stream[row, lo:hi].tolist()
        lines.append([{"text": token_texts[t], "value": v, "alpha": min(1.0, v / peak) if peak > 0 else 0.0,
                       "peak": lo + j == position, "outlier": bool(outliers[row, lo + j])}
                      for j, (t, v) in enumerate(zip(tokens, values))])
    return {"window": row, "document": int(windows.documents[row]), "max": float(streams[0][row].max()),
            "lines": lines}


def latent_examples(codes: Tensor, others: list[Tensor], windows: Windows, outliers: Tensor,
                    token_texts: dict[int, str], top: int, per_band: int, seed: int, before: int,
                    after: int) -> dict[str, Any]:
    """One latent under one head: top contexts and a few from each lower band, with the other heads' streams."""
    peak_per_window, position = codes.max(dim=1)
    peak = float(peak_per_window.max())
    scales = [peak] + [float(o.max()) for o in others]
    order = torch.argsort(peak_per_window, descending=True)
    chosen = [int(r) for r in order[:top] if peak_per_window[r] > 0]
    generator = torch.Generator().manual_seed(seed)
    firing = peak_per_window[peak_per_window > 0]
    bands = []
    for lo, hi in BANDS:
        if len(firing) == 0:
            break
        low, high = (float(torch.quantile(firing, q)) for q in (lo, hi))
        inside = (peak_per_window >= low if lo == 0 else peak_per_window > low) & (peak_per_window <= high)
        pool = [int(r) for r in torch.nonzero(inside & (peak_per_window > 0)).flatten() if int(r) not in chosen]
        picks = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:per_band].tolist()]
        bands.append({"label": f"between the {lo:.0%} and {hi:.0%} quantiles of its peaks ({low:.3g} to {high:.3g})",
                      "count": len(pool),
                      "examples": [example(windows, r, int(position[r]), [codes, *others], outliers, scales,
                                           token_texts, before, after) for r in sorted(picks)]})
    values = codes[~outliers]
    return {"frequency": float((values > 0).float().mean()), "max": peak,
            "mean_active": float(values[values > 0].mean()) if (values > 0).any() else 0.0,
            "top": [example(windows, r, int(position[r]), [codes, *others], outliers, scales, token_texts, before,
                            after) for r in chosen],
            "bands": bands, "histogram": values[values > 0].tolist()}


def histogram_html(series: list[tuple[str, list[float]]], latent: int) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio

    fig = go.Figure([go.Histogram(x=values, name=name, opacity=0.6, nbinsx=40) for name, values in series])
    fig.update_layout(barmode="overlay", height=260, margin={"l": 40, "r": 10, "t": 30, "b": 40},
                      title=f"latent {latent}: non-zero activations", xaxis_title="activation",
                      yaxis={"title": "tokens", "type": "log", "dtick": 1}, legend={"orientation": "h", "y": -0.3})
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"histogram-{latent}")


def dashboard(run_dir: str | Path, out: str | Path | None = None, latents: list[int] | None = None,
              compare: str | Path | None = None, n_latents: int = 16, contexts: int = 512, per_document: int = 2,
              top: int = 10, per_band: int = 3, before: int = 24, after: int = 8, seed: int = 0,
              layer: int | None = None) -> Path:
    """Write the dashboard of ``run_dir``'s latents (see the module docstring); returns its folder. A CLT run shows
    the latents of its source layer ``layer``, with each one's decoder norm at every layer it writes."""
    run_dir = Path(run_dir)
    head, data = load_head(run_dir, layer)
    heads = [head]
    if compare is not None and isinstance(head.model, CLTLayer):
        raise ValueError("--compare: a cross-layer transcoder's latents are shown alone (no other head shares its "
                         "decoders)")
    if compare is not None:
        other, other_data = load_head(compare)
        check_comparable(run_dir, data, head, Path(compare), other_data, other)
        heads.append(other)
    n_total = head.model.dictionary.n_latents
    if latents is not None:  # a bad index fails before any text is read
        select_latents(latents, n_total, torch.ones(1, n_total, dtype=torch.bool), 0, seed, run_dir)
    default = (f"dashboard-vs-{Path(compare).name}" if compare is not None else
               "dashboard" if layer is None else f"dashboard-layer-{layer}")
    out = Path(out) if out else run_dir / default

    kwargs = {k: v for k, v in data.items() if k != "name"}
    datamodule = language_model_data_class(data, str(run_dir), "")(**kwargs)
    datamodule.prepare_data()  # the input scale and outlier norm come from the cache
    windows = read_windows(datamodule, "dashboard", datamodule.documents(), per_document, limit=contexts,
                           identity={k: data.get(k) for k in ("dataset", "dataset_config", "data_files", "split",
                                                              "text_column")})
    all_codes = []
    for h in heads:
        codes, outliers = encode_windows(h.model.to(datamodule.device), windows, datamodule.scale,
                                         datamodule.outlier_norm)
        all_codes.append(codes)
    fired = torch.zeros(len(heads), n_total, dtype=torch.bool)
    for i, codes in enumerate(all_codes):
        fired[i, codes.indices()[1][codes.values() > 0]] = True
    chosen = select_latents(latents, n_total, fired, n_latents, seed, run_dir)
    for h, codes in zip(heads, all_codes):
        h.codes = columns(codes, chosen, outliers.shape)
    del all_codes
    lens, lens_note = logit_lens(datamodule, head.model.dictionary.atoms[chosen])
    _, tokenizer, _ = datamodule.language_model()
    token_texts = {t: token_text(tokenizer, t) for t in torch.unique(windows.tokens).tolist()}

    pages = []
    for j, latent in enumerate(chosen):
        page_columns = []
        for h in heads:
            others = [o.codes[..., j] for o in heads if o is not h]
            examples = latent_examples(h.codes[..., j], others, windows, outliers, token_texts, top, per_band,
                                       seed + latent, before, after)
            page_columns.append({"name": h.name, "streams": [h.name, *(o.name for o in heads if o is not h)],
                                 **examples})
        pages.append({"latent": latent, "file": f"latent-{latent:05d}.html", "columns": page_columns,
                      "lens": lens[j] if lens else None,
                      "decoder_norms": head.model.norms_html(latent) if isinstance(head.model, CLTLayer) else None,
                      "agreement": correlation(*(h.codes[..., j][~outliers] for h in heads)),
                      "histogram": histogram_html([(c["name"], c.pop("histogram")) for c in page_columns], latent)})
    n_tokens = int((~outliers).sum())
    context = {"title": f"Latents of {run_dir.name}" + (f" against {Path(compare).name}" if compare else ""),
               "heads": [h.name for h in heads], "run": str(run_dir), "compare": str(compare) if compare else None,
               "n_latents": n_total, "n_windows": len(windows.tokens),
               "n_documents": len(torch.unique(windows.documents)),
               "n_tokens": n_tokens, "lm": data.get("model"), "lens_note": lens_note,
               "hook": data["hook"] + (f", a transcoder writing {data['hook_out']}" if data.get("hook_out") else ""),
               "dataset": data.get("data_files") or data.get("dataset")}
    render(out, pages, context)
    return out


def correlation(*streams: Tensor) -> float | None:
    """Pearson correlation of two heads' code streams of one latent; None for one head or a constant stream."""
    if len(streams) != 2 or not (streams[0].std() > 0 and streams[1].std() > 0):
        return None
    return float(torch.corrcoef(torch.stack(streams))[0, 1])


def render(out: Path, pages: list[dict[str, Any]], context: dict[str, Any]) -> None:
    """The index and one page per latent from the templates, with Plotly's library beside them; the folder
    is written aside and swapped in whole."""
    from jinja2 import Environment, PackageLoader, select_autoescape
    from plotly.offline import get_plotlyjs

    env = Environment(loader=PackageLoader("sae_zoo", "templates"), autoescape=select_autoescape(["html", "j2"]))
    with atomic_directory(out, replaces=(MARKER,)) as staging:
        (staging / "plotly.min.js").write_text(get_plotlyjs())
        (staging / MARKER).write_text(env.get_template("index.html.j2").render(pages=pages, **context))
        for page in pages:
            (staging / page["file"]).write_text(env.get_template("latent.html.j2").render(page=page, **context))


__all__ = ["dashboard", "parse_latents"]

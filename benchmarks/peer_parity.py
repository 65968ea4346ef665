"""Side by side with the libraries themselves: SAEs built and saved by SAELens and dictionary_learning,
loaded by sae_zoo, give those libraries' own codes and reconstructions; sae_zoo's exports, loaded by
SAELens's own loader, give sae_zoo's. Every decoder has rows of random norms (but matching pursuit's,
whose codes are projections only on unit rows).

    pip install sae-lens dictionary-learning      # beside sae_zoo, in a separate environment
    python benchmarks/peer_parity.py

Prints the largest absolute difference in codes and in reconstructions for each architecture (float32:
differences of a few 1e-6 are rounding), then the difference between SAELens's SynthSAEBench evaluator
and sae_zoo's metrics on the same codes (in the "codes" column; the value in the "L0" column). A
library that is not installed is skipped, with the reason.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.hub import export_saelens, load_sae

D, N, K = 24, 96, 8


def report(label: str, codes: torch.Tensor, x_hat: torch.Tensor, ours: SparseCoder, x: torch.Tensor) -> None:
    with torch.no_grad():
        o_hat, o_codes = ours(x)
    print(f"{label:58s} {ours.encoder.name:9s} {float((codes - o_codes).abs().max()):9.1e} "
          f"{float((x_hat - o_hat).abs().max()):9.1e} {float((codes > 0).sum(-1).float().mean()):6.1f}")


def randomise(module: torch.nn.Module, decoder: str | None = None) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
            if "threshold" in name:
                p.abs_()
        if decoder is not None:
            getattr(module, decoder).mul_(0.3 + torch.rand(N, 1))  # rows of other norms than 1


def saelens(tmp: Path, x: torch.Tensor) -> None:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    cases = {"standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=N)),
             "standard, apply_b_dec_to_input=False": StandardSAE(StandardSAEConfig(d_in=D, d_sae=N,
                                                                                   apply_b_dec_to_input=False)),
             "topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K)),
             "topk, rescale_acts_by_decoder_norm": TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K,
                                                                         rescale_acts_by_decoder_norm=True)),
             "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N)),
             "gated": GatedSAE(GatedSAEConfig(d_in=D, d_sae=N))}
    for label, sae in cases.items():
        randomise(sae, "W_dec")
        sae.save_model(tmp / label)
        with torch.no_grad():
            codes = sae.encode(x)
            report(f"SAELens {label}", codes, sae.decode(codes), load_sae(tmp / label).model(), x)
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE, MatchingPursuitSAEConfig

    pursuit = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=D, d_sae=N, max_iterations=K, residual_threshold=0.5))
    randomise(pursuit)
    with torch.no_grad():
        pursuit.W_dec.div_(pursuit.W_dec.norm(dim=1, keepdim=True))  # its codes are projections on unit rows
    pursuit.save_model(tmp / "matching_pursuit")
    with torch.no_grad():
        codes = pursuit.encode(x)
        report("SAELens matching_pursuit (unit rows)", codes, pursuit.decode(codes),
               load_sae(tmp / "matching_pursuit").model(), x)
    for rescale in (False, True):  # trained as BatchTopK, saved for inference (as JumpReLU)
        train = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K,
                                                                rescale_acts_by_decoder_norm=rescale))
        randomise(train, "W_dec")
        train.topk_threshold.fill_(0.4)
        path = tmp / f"batchtopk-{rescale}"
        train.save_inference_model(path)
        sae = SAE.load_from_disk(path)
        with torch.no_grad():
            codes = sae.encode(x)
            report(f"SAELens batchtopk saved for inference, rescale={rescale}", codes, sae.decode(codes),
                   load_sae(path).model(), x)
    for name, kwargs in [("linear", {}), ("topk", {"k": K}), ("jumprelu", {}), ("gated", {}), ("batchtopk", {"k": K}),
                         ("mp", {"k": K})]:
        head = create_encoder(name, d_model=D, n_latents=N, **kwargs,
                              **({} if name == "mp" else {"subtract_decoder_bias": True}))
        randomise(head)
        if name == "batchtopk":
            head.threshold.fill_(0.1)
        atoms = torch.randn(N, D) * (0.3 + torch.rand(N, 1))
        model = SparseCoder(head, Dictionary.from_tensor(atoms, bias=torch.randn(D), keep_norms=name != "mp")).eval()
        sae = SAE.load_from_disk(export_saelens(model, tmp / f"export-{name}"))
        with torch.no_grad():
            codes = sae.encode(x)
            report(f"sae_zoo {name} exported, read by SAELens ({type(sae).__name__})", codes, sae.decode(codes),
                   model, x)


def dictionary_learning(tmp: Path, x: torch.Tensor) -> None:
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    cases = {"AutoEncoder": AutoEncoder(D, N), "AutoEncoderTopK": AutoEncoderTopK(D, N, K),
             "BatchTopKSAE": BatchTopKSAE(D, N, K),
             "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE(D, N, K, [16, 32, 48]),
             "JumpReluAutoEncoder": JumpReluAutoEncoder(D, N), "GatedAutoEncoder": GatedAutoEncoder(D, N)}
    for name, ae in cases.items():
        randomise(ae)
        if hasattr(ae, "threshold"):
            with torch.no_grad():
                ae.threshold.copy_(ae.threshold.abs() + 0.05)
        path = tmp / name
        path.mkdir(parents=True)
        torch.save(ae.state_dict(), path / "ae.pt")  # as its trainSAE saves, beside the trainer's config
        (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": name, "k": K}}))
        theirs = AutoEncoder.from_pretrained(path / "ae.pt") if name == "AutoEncoder" else ae  # its own loader
        with torch.no_grad():
            codes = theirs.encode(x)
            report(f"dictionary_learning {name}", codes, theirs.decode(codes), load_sae(path).model(), x)


def synthetic_metrics(tmp: Path, x: torch.Tensor) -> None:
    """SAELens's SynthSAEBench evaluator functions against sae_zoo's metrics, on the same codes."""
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic.evals import (ShrinkageCalculator, compute_classification_metrics, feature_uniqueness,
                                          mean_correlation_coefficient)

    from sae_zoo.metrics import functional

    g = torch.Generator().manual_seed(1)
    true_atoms, atoms = torch.randn(3 * N, D, generator=g), torch.randn(N, D, generator=g)
    atoms[: N // 2] = true_atoms[: N // 2] + 0.3 * torch.randn(N // 2, D, generator=g)
    true_codes = torch.rand(2048, 3 * N, generator=g) * (torch.rand(2048, 3 * N, generator=g) < 0.05)
    codes = torch.relu(true_codes[:, :N] + 0.05 * torch.randn(2048, N, generator=g) - 0.02)
    x, x_hat = true_codes @ true_atoms, codes @ atoms
    theirs = compute_classification_metrics(codes, true_codes, atoms, true_atoms)
    ours = functional.latent_detection(codes, true_codes, atoms, true_atoms)
    shrink, variance = ShrinkageCalculator(), ExplainedVarianceCalculator()
    shrink.add_batch(x_hat, x)
    variance.add_batch(x_hat, x)
    decoder_mcc = functional.dictionary_mcc(atoms, true_atoms, over="matches")
    pairs = {"precision": (theirs.precision, ours["precision"]), "recall": (theirs.recall, ours["recall"]),
             "F1": (theirs.f1_score, ours["f1"]), "accuracy": (theirs.accuracy, ours["accuracy"]),
             "MCC (decoder)": (mean_correlation_coefficient(atoms, true_atoms), decoder_mcc),
             "uniqueness": (feature_uniqueness(atoms, true_atoms), functional.feature_uniqueness(atoms, true_atoms)),
             "shrinkage": (shrink.compute(), functional.shrinkage(x_hat, x)),
             "explained variance": (variance.compute(), 1 - functional.fraction_of_variance_unexplained(x_hat, x))}
    for name, (a, b) in pairs.items():
        print(f"{'SAELens synthetic evaluator: ' + name:58s} {'':9s} {abs(float(a) - float(b)):9.1e} "
              f"{'':9s} {float(a):6.3f}")


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, D)
    print(f"{'checkpoint':58s} {'head':9s} {'codes':>9s} {'x_hat':>9s} {'L0':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for library in (saelens, dictionary_learning, synthetic_metrics):
            try:
                library(Path(tmp) / library.__name__, x)
            except ImportError as e:
                print(f"{library.__name__}: skipped ({e})")


if __name__ == "__main__":
    main()

"""CE-loss recovered: the language model's next-token loss with a hook's activations replaced by a
sparse coder's reconstruction."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.activations import ActivationDataModule
from ..lm import next_token_loss
from ..model import SparseCoder
from .bootstrap import bootstrap_se


@torch.no_grad()
def ce_loss_recovered(coder: SparseCoder, datamodule: ActivationDataModule) -> dict[str, float]:
    """CE-loss recovered on the datamodule's ``ce_contexts`` held-out contexts: the LM's next-token loss
    with the hook's activations replaced by ``coder``'s reconstruction, against the clean loss and the
    loss with them zeroed: ``1 - (CE_recon - CE_clean) / (CE_zero - CE_clean)``, with its standard error
    by bootstrap over contexts. Positions left out of the data (BOS, outlier tokens) keep their own
    activations in both the spliced and the zeroed runs."""
    tokens, scale, keep_first = datamodule.ce_batches()
    lm, _, hook = datamodule.language_model()
    device = next(coder.parameters(), torch.empty(0)).device
    chunks = tokens.split(datamodule.hparams.model_batch_size)
    outlier_norm = datamodule.outlier_norm

    def spliced(fn):
        def replace(acts: Tensor) -> Tensor:
            new = fn(acts)
            keep = torch.zeros(acts.shape[:-1], dtype=torch.bool, device=acts.device)
            if keep_first:  # BOS positions were not in the data: leave them as they were
                keep[:, 0] = True
            if outlier_norm is not None:
                keep |= acts.float().norm(dim=-1) * scale > outlier_norm
            return torch.where(keep[..., None], acts, new)
        return replace

    def reconstruct(acts: Tensor) -> Tensor:
        x_hat, _ = coder((acts.float() * scale).to(device))
        return (x_hat / scale).to(acts.dtype).to(acts.device)

    losses = {"ce_clean": [], "ce_zero_ablation": [], "ce_spliced": []}
    was_training = coder.training
    coder.eval()  # inference behaviour (an iterative head solves instead of returning its warm start)
    try:
        for chunk in chunks:
            losses["ce_clean"].append(next_token_loss(lm, chunk))
            losses["ce_zero_ablation"].append(next_token_loss(lm, chunk, hook, spliced(torch.zeros_like)))
            losses["ce_spliced"].append(next_token_loss(lm, chunk, hook, spliced(reconstruct)))
    finally:
        coder.train(was_training)
    per_context = {k: torch.cat(v).double().cpu() for k, v in losses.items()}  # (contexts,) each
    clean, zero, spliced_ = per_context["ce_clean"], per_context["ce_zero_ablation"], per_context["ce_spliced"]

    def recovered(weights: Tensor) -> Tensor:
        return 1 - (weights @ (spliced_ - clean)) / (weights @ (zero - clean))

    means = {k: float(v.mean()) for k, v in per_context.items()}
    gap = means["ce_zero_ablation"] - means["ce_clean"]
    means["ce_loss_recovered"] = float(recovered(torch.ones_like(clean))) if gap else float("nan")
    means["ce_loss_recovered_se"] = bootstrap_se(recovered, len(clean)) if gap else float("nan")
    means["ce_contexts"] = len(clean)
    return means

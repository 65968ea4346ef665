"""CE-loss recovered: the language model's next-token loss with a hook's activations replaced by a
sparse coder's reconstruction."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.activations import ActivationDataModule
from ..lm import next_token_loss
from ..model import SparseCoder


@torch.no_grad()
def ce_loss_recovered(coder: SparseCoder, datamodule: ActivationDataModule) -> dict[str, float]:
    """CE-loss recovered on the datamodule's ``ce_contexts`` held-out contexts: the LM's next-token loss
    with the hook's activations replaced by ``coder``'s reconstruction, against the clean loss and the
    loss with them zeroed: ``1 - (CE_recon - CE_clean) / (CE_zero - CE_clean)``."""
    tokens, scale, keep_first = datamodule.ce_batches()
    lm, _, hook = datamodule.language_model()
    device = next(coder.parameters(), torch.empty(0)).device
    chunks = tokens.split(datamodule.hparams.model_batch_size)

    def spliced(fn):
        def replace(acts: Tensor) -> Tensor:
            new = fn(acts)
            if keep_first:  # BOS positions were not in the data: leave them as they were
                new = torch.cat([acts[:, :1], new[:, 1:]], dim=1)
            return new
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
    weights = torch.tensor([len(c) for c in chunks], dtype=torch.float64)
    means = {k: float((torch.stack(v).double().cpu() * weights).sum() / weights.sum()) for k, v in losses.items()}
    gap = means["ce_zero_ablation"] - means["ce_clean"]
    means["ce_loss_recovered"] = 1 - (means["ce_spliced"] - means["ce_clean"]) / gap if gap else float("nan")
    return means

"""The metrics synchronise across processes: two gloo ranks, each seeing half the data, compute
the one-shot result."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_zoo.metrics import MCC, L0, DeadLatents, FractionOfVarianceUnexplained, LatentDetection, Shrinkage, functional


def _data():
    g = torch.Generator().manual_seed(11)
    true = torch.rand(200, 8, generator=g) * (torch.rand(200, 8, generator=g) < 0.4)
    codes = torch.relu(true @ torch.randn(8, 8, generator=g) + 0.1 * torch.randn(200, 8, generator=g))
    codes[:, 2] = 0
    x = torch.randn(200, 5, generator=g)
    atoms, true_atoms = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    return true, codes, x, x + 0.2 * torch.randn(200, 5, generator=g), atoms, true_atoms


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    true, codes, x, x_hat, atoms, true_atoms = _data()
    shard = slice(0, 120) if rank == 0 else slice(120, 200)  # unequal shards on purpose
    metrics = {"mcc": MCC(8), "fvu": FractionOfVarianceUnexplained(5), "l0": L0(), "dead": DeadLatents(8),
               "shrinkage": Shrinkage()}
    metrics["mcc"].update(codes[shard], true[shard])
    metrics["fvu"].update(x_hat[shard], x[shard])
    metrics["l0"].update(codes[shard])
    metrics["dead"].update(codes[shard])
    metrics["shrinkage"].update(x_hat[shard], x[shard])
    detection = LatentDetection(8)
    detection.update(codes[shard], true[shard], atoms, true_atoms)
    values = [m.compute().item() for m in metrics.values()] + [v.item() for v in detection.compute().values()]
    out[rank] = torch.tensor(values, dtype=torch.float64)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_metrics_sync_across_two_gloo_ranks():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    true, codes, x, x_hat, atoms, true_atoms = _data()
    detection = functional.latent_detection(codes, true, atoms, true_atoms)
    expected = np.array([functional.mcc(codes, true).item(), functional.fraction_of_variance_unexplained(x_hat, x).item(),
                         functional.l0(codes).item(), functional.dead_latents(codes).item(),
                         functional.shrinkage(x_hat, x).item(), *(v.item() for v in detection.values())])
    for rank in (0, 1):
        np.testing.assert_allclose(out[rank].numpy(), expected, rtol=1e-9)

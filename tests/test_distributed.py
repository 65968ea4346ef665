"""What ranks must agree on, reduced over two gloo processes, equals what one process computes on the global batch:
the k-th largest value, the gathered rows, BatchTopK's batch-wide top-k and threshold (sparse and dense ways, at
1.5k) and the dead-latent counts."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_zoo import Dictionary, create_encoder
from sae_zoo.dead_latents import DeadLatents
from sae_zoo.distributed import gathered_rows, kth_largest
from sae_zoo.encoders import SparseCodes

ROWS = (37, 27)  # each rank's slice of the global batch: unequal, as a last batch may be


def dense(codes):
    if isinstance(codes, SparseCodes):
        return torch.zeros(*codes.values.shape[:-1], 48).scatter_add(-1, codes.indices, codes.values)
    return codes


def compute(x: torch.Tensor) -> dict:
    """What each rank (or the one process) computes on its rows ``x``."""
    torch.manual_seed(0)
    dictionary = Dictionary(48, 8, bias=True)
    out = {"kth": kth_largest(x, 100), "gathered": gathered_rows(x)}
    for sparse in (True, False):
        torch.manual_seed(1)
        head = create_encoder("batchtopk", d_model=8, n_latents=48, k=3, k_train_factor=1.5, threshold_lr=1.0,
                              subtract_decoder_bias=True).train()
        dead = DeadLatents(auxk_coeff=0.1, dead_tokens=1000)
        dead.setup(type("Model", (), {"dictionary": dictionary})())
        codes = head.training_codes(x, dictionary, sparse=sparse).codes
        dead.observe(codes)
        out[f"codes_{sparse}"], out[f"threshold_{sparse}"] = dense(codes).detach(), head.threshold.clone()
        out[f"dead_{sparse}"] = dead.tokens_since_fired.clone()
    return out


def rank_main(rank: int, port: int, x: torch.Tensor, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        start = sum(ROWS[:rank])
        torch.save(compute(x[start:start + ROWS[rank]]), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    x = torch.randn(sum(ROWS), 8, generator=torch.Generator().manual_seed(2))
    out = tmp_path_factory.mktemp("ranks")
    # forked, not spawned: the children need not import torch and sae_zoo again
    mp.start_processes(rank_main, args=(free_port(), x, out), nprocs=2, join=True, start_method="fork")
    return x, compute(x), [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


def test_two_ranks_agree_with_one_process_on_the_global_batch(ranks):
    x, one, (first, second) = ranks
    for rank in (first, second):
        torch.testing.assert_close(rank["kth"], x.flatten().topk(100).values.min())
        torch.testing.assert_close(rank["gathered"], x)
    for sparse in (True, False):
        codes = torch.cat([first[f"codes_{sparse}"], second[f"codes_{sparse}"]])
        torch.testing.assert_close(codes, one[f"codes_{sparse}"])
        assert (codes != 0).sum() == 5 * sum(ROWS)  # the global batch's top 1.5k x samples (train k 5)
        for rank in (first, second):
            torch.testing.assert_close(rank[f"threshold_{sparse}"], one[f"threshold_{sparse}"])
            torch.testing.assert_close(rank[f"dead_{sparse}"], one[f"dead_{sparse}"])
        assert one[f"threshold_{sparse}"] > 0 and set(one[f"dead_{sparse}"].tolist()) == {0.0, float(sum(ROWS))}

"""Lamb and Lamb16 under PyTorch's own data parallelism: two gloo processes on the CPU."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lamb16 import Lamb, Lamb16

OPTIMIZERS = {"lamb16": Lamb16, "lamb": Lamb}
STEPS = 4


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(64, 12, generator=gen), torch.randn(64, 3, generator=gen)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def ddp_worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, x, y = model_and_data()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = OPTIMIZERS[name](ddp.parameters(), lr=1e-2, weight_decay=0.01)
        half = len(x) // world  # each rank its share of the global batch
        train(ddp, optimizer, x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])
        torch.save([p.detach() for p in model.parameters()], Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_on_two_processes_matches_one_process_with_the_global_batch(name, tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), name, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks))  # every rank took the same step
    model, x, y = model_and_data()
    train(model, OPTIMIZERS[name](model.parameters(), lr=1e-2, weight_decay=0.01), x, y)
    for single, distributed in zip(model.parameters(), ranks[0]):
        torch.testing.assert_close(distributed, single.detach(), rtol=1e-4, atol=1e-5)

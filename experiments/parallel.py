"""Training across processes: one rank of a torchrun job, data-parallel (DDP) or sharded (FSDP2).

    torchrun --nproc-per-node 2 cli.py train --optimizer lamb16 --batch-size 1024 --lr 0.02
    torchrun --nproc-per-node 2 cli.py train --optimizer lamb16 --fsdp ...

Each global batch is split across the ranks, and each rank's loss is its
share of the global batch's mean, so that the gradients the ranks average
are the single process's. Rank 0 writes the run's files; checkpoints hold
whole (unsharded) tensors, so a run resumes on any number of processes.
A `Parallel` with one process makes every function here a no-op.
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lamb16._common import is_dtensor  # the library's test, which imports no DTensor module

from .errors import UserError

MODES = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """How this process trains: alone, or as rank `rank` of `world` processes."""

    mode: str = "single"
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Parallel()


def launched_processes() -> int:
    """How many processes torchrun started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process is rank 0 of its job (or the only process)."""
    return launched_rank() == 0


def rank_prefix() -> str:
    """"[rank N] " under torchrun, to tell the processes' lines apart; "" otherwise."""
    return f"[rank {launched_rank()}] " if launched_processes() > 1 else ""


@contextlib.contextmanager
def process_group(fsdp: bool, device: torch.device) -> Iterator[Parallel]:
    """This process's place in the job: SINGLE without torchrun; under torchrun,
    a process group (nccl on GPUs, gloo on the CPU) for the command's duration."""
    world = launched_processes()
    if world == 1:
        if fsdp:
            raise UserError("--fsdp shards over several processes; start them with "
                            "torchrun --nproc-per-node N cli.py train --fsdp ...")
        yield SINGLE
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Parallel("fsdp" if fsdp else "ddp", dist.get_rank(), dist.get_world_size())
        # Every rank done before any tears the group down: a rank whose peer had
        # already gone sometimes aborted in gloo's teardown (1 run in about 12).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_batch(batch_size: int, parallel: Parallel) -> None:
    if batch_size < parallel.world:
        raise UserError(f"--batch-size {batch_size} is smaller than the {parallel.world} processes it is split "
                        f"across; use at least {parallel.world}")


def wrap(model: nn.Module, parallel: Parallel) -> nn.Module:
    """The model as this mode trains it: itself, under DDP, or sharded by FSDP2
    (each layer with weights its own unit, then the whole)."""
    if parallel.mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if parallel.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.children():
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def share(index: Tensor, parallel: Parallel) -> Tensor:
    """This rank's consecutive part of a global batch (sizes differ by at most one)."""
    return index.tensor_split(parallel.world)[parallel.rank] if parallel.distributed else index


def mean_over_ranks(value: Tensor, parallel: Parallel) -> Tensor:
    """The ranks' values averaged (every rank gets the same), in place."""
    if parallel.distributed:
        dist.all_reduce(value)  # SUM: gloo has no AVG
        value.div_(parallel.world)
    return value


def sum_over_ranks(value: Tensor, parallel: Parallel) -> Tensor:
    if parallel.distributed:
        dist.all_reduce(value)
    return value


def any_rank(flag: bool, device: torch.device, parallel: Parallel) -> bool:
    """Whether any rank says so: every rank stops at the same batch, or none waits forever for another."""
    if not parallel.distributed:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(value: Any, parallel: Parallel) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not parallel.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(parallel: Parallel) -> None:
    if parallel.distributed:
        dist.barrier()


def shard_rows(tensor: Tensor, parallel: Parallel) -> Tensor:
    """A tensor split by rows over all the processes, as FSDP2 splits a parameter
    (a DTensor placed Shard(0) on a 1-D mesh); itself in a single process."""
    if not parallel.distributed:
        return tensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(tensor.device.type, (parallel.world,))
    return distribute_tensor(tensor, mesh, [Shard(0)], src_data_rank=None)


# ------------------------------------------------------------ checkpoints ----


def whole(value: Any) -> Any:
    """A DTensor gathered into the whole tensor (every rank takes part), any other value as it is.
    fp8 travels as bytes: gloo gathers no float8."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import DTensor

    if value.dtype.itemsize == 1 and value.is_floating_point():
        as_bytes = DTensor.from_local(value.to_local().view(torch.uint8), value.device_mesh, value.placements,
                                      shape=value.shape, stride=value.stride())
        return as_bytes.full_tensor().view(value.dtype)
    return value.full_tensor()


def like(value: Any, param: Tensor) -> Any:
    """A whole tensor cut to this rank's piece of a DTensor parameter, if it is
    one and the value is per-element state; any other value as it is. No
    communication: every rank holds the whole tensor."""
    if not (is_dtensor(param) and isinstance(value, Tensor) and value.shape == param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def whole_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state_dicts with whole tensors, as one
    process would have them (every rank takes part; rank 0 saves them)."""
    model_state = {key: whole(value) for key, value in unwrapped(model).state_dict().items()}
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {
        index: {key: whole(value) for key, value in state.items()}
        for index, state in optimizer_state["state"].items()
    }
    return model_state, optimizer_state


def load_whole_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                     optimizer_state: dict) -> None:
    """Load whole-tensor state_dicts, each rank keeping its pieces of sharded tensors."""
    inner = unwrapped(model)
    params = dict(inner.named_parameters())
    inner.load_state_dict({key: like(value, params[key]) if key in params else value
                           for key, value in model_state.items()})
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer_state = dict(optimizer_state, state={
        index: {key: like(value, ordered[index]) for key, value in state.items()}
        for index, state in optimizer_state["state"].items()
    })
    optimizer.load_state_dict(optimizer_state)

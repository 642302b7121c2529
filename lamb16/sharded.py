"""Steps on sharded parameters (DTensors, as FSDP2's fully_shard and tensor
parallelism make them): each process updates its own piece of each tensor.

The trust ratio and the fp8 scales are reductions over the whole tensor, so a
step runs in the pieces the reference is written in: pass 1 on each local
piece gives its partial sums and maxima; one all-gather per process group
(per parameter group and step, not per tensor) brings every piece's partials
to every process, which combine them in the same order and so agree exactly;
the whole tensor's statistics are finished from them; pass 2 writes each local
piece. The passes run on the same fast paths as unsharded tensors (the CPU
kernels, the Triton kernels on GPUs, or the compiled reference).
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from types import ModuleType

from . import triton_kernels
from ._common import Job
from .dispatch import PATH_NAMES, by_kernels, counted, run_reference

def all_gather(output: Tensor, input: Tensor, group: Any) -> None:
    """Every process's `input`, one after another along dim 0 of `output`
    (all_gather_single from torch 2.12, all_gather_into_tensor before)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def sharding_groups(param: Tensor) -> list[Any]:
    """The process groups over which a parameter's pieces differ: one per mesh
    dimension that shards it (on a Replicate dimension every process holds the same)."""
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    return [mesh.get_group(dim) for dim, placement in enumerate(param.placements) if isinstance(placement, Shard)]


def combine_vectors(vectors: list[Tensor], maxima: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Each parameter's vector of partials combined over the processes holding
    its pieces: element by element the largest where its `maxima` mask is set,
    else the sum. One all_gather per process group, for all the vectors of the
    parameters sharded over it (they may differ in length)."""
    by_group: dict[Any, list[int]] = {}
    for index, param in enumerate(params):
        for group in sharding_groups(param):
            by_group.setdefault(group, []).append(index)
    vectors = list(vectors)
    for group, indices in by_group.items():
        mine = torch.cat([vectors[i] for i in indices])
        largest = torch.cat([maxima[i] for i in indices])
        gathered = mine.new_empty((dist.get_world_size(group) * len(mine),))
        all_gather(gathered, mine, group=group)
        gathered = gathered.view(-1, len(mine))  # (processes, values)
        # Every process reduces the same gathered values in the same order: all get the same bits.
        combined = torch.where(largest, gathered.amax(0), gathered.sum(0))
        for i, part in zip(indices, combined.split([len(vectors[i]) for i in indices])):
            vectors[i] = part
    return vectors


def combine_over_shards(partials: Tensor, params: list[Tensor], combine: tuple[str, ...]) -> Tensor:
    """Each tensor's partials (a row of `partials`) combined over the processes
    holding its pieces: a sum or a max per column, as `combine` says."""
    columns = torch.tensor([how == "max" for how in combine], device=partials.device)
    return torch.stack(combine_vectors(list(partials), [columns] * len(params), params))


def split_piece(param: Tensor, block_size: int) -> tuple[int, int] | None:
    """Where this process's piece of a sharded 1-D tensor begins, as (its first
    block, the elements of that block before it), for block scales (whose
    blocks such a cut may split); None for any other tensor."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if param.dim() != 1 or not any(isinstance(p, Shard) for p in param.placements):
        return None

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0] // block_size, offset[0] % block_size


def on_kernels(jobs: list[Job], fused: bool | None, entry: str, rows: list[int] | None = None
               ) -> dict[ModuleType, list[int]]:
    """The jobs (of `rows`, or all) that kernels take through `entry`, by
    kernels; an empty piece needs none."""
    rows = range(len(jobs)) if rows is None else rows
    return by_kernels(jobs, fused, entry, [i for i in rows if jobs[i][0][0].numel()])


def first_pass(
    reference: Callable[..., Tensor], entry: str, jobs: list[Job], fused: bool | None,
    taken: dict[ModuleType, list[int]], width: int, **kwargs: Any,
) -> Tensor:
    """Pass 1 on every job's local tensors: a (jobs, width) tensor of partials,
    those of the jobs `taken` from their kernels' `entry` (kernels that cannot
    run here leave theirs to the reference, and are dropped from `taken`). An
    empty piece (uneven sharding leaves some) adds nothing: zeros."""
    partials = torch.zeros(len(jobs), width, device=jobs[0][0][0].device)
    for kernels, rows in list(taken.items()):
        try:
            partials[rows] = getattr(kernels, entry)([jobs[i] for i in rows], **kwargs).to(partials.device)
        except triton_kernels.Unavailable:
            del taken[kernels]
            continue
        counted(PATH_NAMES[kernels], len(rows))
    done = {i for rows in taken.values() for i in rows}
    for i, (inputs, _, extra) in enumerate(jobs):
        if i not in done and inputs[0].numel():
            partials[i] = run_reference(reference, inputs, fused, **kwargs, **extra)
    return partials


def second_pass(
    reference: Callable[..., None], entry: str, jobs: list[Job], fused: bool | None,
    taken: dict[ModuleType, list[int]], finished: Tensor, apply_columns: list[int], **kwargs: Any,
) -> None:
    """Pass 2 on every job's local tensors. Row i of `finished` holds job i's
    results (its outputs', in order), then what its writes take: the columns
    `apply_columns` are the reference's extra arguments. The kernels write
    their jobs' results themselves; the others are copied here."""
    done: set[int] = set()
    for kernels, rows in taken.items():
        try:
            getattr(kernels, entry)([jobs[i] for i in rows], finished[rows], **kwargs)
        except triton_kernels.Unavailable:
            continue
        done.update(rows)
    for i, (inputs, outputs, extra) in enumerate(jobs):
        if i in done:
            continue
        if inputs[0].numel():
            run_reference(reference, inputs + tuple(finished[i, apply_columns].unbind()), fused, **kwargs, **extra)
        for k, output in enumerate(outputs):
            output.copy_(finished[i, k])

"""Launching the Triton kernels for a parameter group: the table of its
tensors' addresses, the programs that share them out, and each step as its
passes, with the little arithmetic between passes (the norms, the trust ratio,
the scales of a tensor) done by lamb16.updates' own functions on a tensor of
the group's values.

A group's tensors go in a few launches whatever their number: every pass is
one launch over all of them, each program a tile of one tensor (4096
elements, or as many whole blocks), and each tensor's programs' partial sums
are combined in one more (segments). The only memory a step takes beyond the
state is that of the tables and partials: a few bytes per 4096 elements.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
from torch import Tensor

from .._common import Job
from ..updates import (
    bounded_scales,
    lamb16_finish,
    lamb16_trust_ratio,
    next_stats_from,
    norms_and_trust,
)
from .arithmetic import COLUMNS
from .block_apply import block_apply_kernel
from .block_partials import block_partials_kernel
from .block_single_pass import block_single_pass_kernel
from .segments import segments_kernel
from .tensor_apply import tensor_apply_kernel
from .tensor_partials import tensor_partials_kernel
from .tensor_single_pass import tensor_single_pass_kernel
from .tile_reduce import tile_reduce_kernel

TILE = 4096  # elements a program walks (or whole blocks of about as many)
SEGMENT_CHUNK = 1024  # partials a segments program adds at a time (a 1 B tensor has 262,144)
MAX_LAYOUTS = 64  # layouts kept (a layout per group of shapes)
launches: dict[str, int] = {}  # kernel launches by name: what bench checks ran


def launch(kernel, programs: int, *args: Any, **constexprs: Any) -> None:
    """Launch `kernel` on `programs` programs, without multiply-add contraction:
    every GPU rounds each operation as the reference does."""
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    launches[name] = launches.get(name, 0) + 1
    kernel[(programs,)](*args, **constexprs, enable_fp_fusion=False)


@dataclass(frozen=True)
class Layout:
    """How a group of tensors of given shapes is shared out: programs (P, 2)
    holding (tensor, first block or element), each tensor's range of programs
    (T, 2), and each tensor's element count (T,), on the group's device."""

    programs: Tensor
    ranges: Tensor
    numel: Tensor
    geometry: tuple[tuple[int, int, int, int], ...]  # per tensor: numel, row length, blocks a row, blocks

    @property
    def count(self) -> int:
        return self.programs.shape[0]


def lanes(block_size: int) -> int:
    return triton.next_power_of_2(block_size)


def blocks_per_program(block_size: int) -> int:
    return max(1, TILE // lanes(block_size))


def geometry(job: Job, block_size: int) -> tuple[int, int, int, int]:
    """(numel, row length, blocks a row, blocks) of a job's tensor: its block
    scales' grid gives the rows (one scale a tensor: one row of one block)."""
    param, m_scales = job[0][0], job[0][4]
    numel = param.numel()
    if not block_size:
        return numel, numel, 1, 1
    rows, per_row = m_scales.shape
    return numel, numel // rows, per_row, rows * per_row


@functools.lru_cache(maxsize=MAX_LAYOUTS)
def cached_layout(device: torch.device, shapes: tuple[tuple[int, int, int, int], ...], block_size: int) -> Layout:
    programs, ranges = [], []
    for tensor, (numel, _, _, blocks) in enumerate(shapes):
        if block_size:
            starts = range(0, blocks, blocks_per_program(block_size))
        else:
            starts = range(0, numel, TILE)
        ranges.append((len(programs), len(starts)))
        programs += [(tensor, start) for start in starts]
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.int64).to(device)  # noqa: E731
    numel = torch.tensor([float(shape[0]) for shape in shapes], dtype=torch.float32).to(device)
    return Layout(as_tensor(programs), as_tensor(ranges), numel, shapes)


def layout(jobs: list[Job], block_size: int) -> Layout:
    return cached_layout(jobs[0][0][0].device, tuple(geometry(job, block_size) for job in jobs), block_size)


def table(jobs: list[Job], where: Layout) -> Tensor:
    """A row a tensor: the addresses of its weights, gradient, codes and scales, then its geometry."""
    rows = []
    for (param, grad, exp_avg, exp_avg_sq, m_scale, v_scale, *_), _, _ in jobs:
        rows.append([param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                     m_scale.data_ptr(), v_scale.data_ptr()])
    for row, shape in zip(rows, where.geometry):
        row += shape
    assert len(rows[0]) == COLUMNS
    return torch.tensor(rows, dtype=torch.int64).to(jobs[0][0][0].device, non_blocking=True)


def segments(partials: Tensor, where: Layout, maxima: int = 0) -> Tensor:
    """Each tensor's (T, width) reductions from its programs' partials: sums,
    or the largest for the columns whose bit `maxima` sets."""
    width = partials.shape[1]
    out = torch.empty(len(where.geometry), width, device=partials.device)
    launch(segments_kernel, len(where.geometry), partials, where.ranges, out, WIDTH=width,
           COLUMNS=triton.next_power_of_2(width), MAXIMA=maxima, CHUNK=SEGMENT_CHUNK)
    return out


def moments(beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple[float, ...]:
    """The kernels' scalar arguments, rounded to float32 as the reference's are."""
    return float(beta1), 1 - float(beta1), float(beta2), 1 - float(beta2), float(eps), float(weight_decay)


def block_constants(block_size: int) -> dict[str, int]:
    return dict(BLOCKS=blocks_per_program(block_size), LANES=lanes(block_size), BLOCK_SIZE=block_size)


def write_outputs(jobs: list[Job], first: int, values: list[Tensor]) -> None:
    """values[k][t] into output first + k of job t (0-dim state tensors), in one launch."""
    outputs = [job[1][first + k] for job in jobs for k in range(len(values))]
    torch._foreach_copy_(outputs, list(torch.stack(values, dim=1).flatten().unbind()))


# ----------------------------------------------------------- block scales


def lamb16_block_partials(jobs: list[Job], *, beta1: float, beta2: float, eps: float, weight_decay: float,
                          block_size: int) -> Tensor:
    """Pass 1: each job's clamped square sums of the weights and the update, (jobs, 2)."""
    where = layout(jobs, block_size)
    partials = torch.empty(where.count, 2, device=where.numel.device)
    launch(block_partials_kernel, where.count, table(jobs, where), where.programs, partials,
           *moments(beta1, beta2, eps, weight_decay), **block_constants(block_size))
    return segments(partials, where)


def lamb16_block_applies(jobs: list[Job], finished: Tensor, *, beta1: float, beta2: float, eps: float,
                         weight_decay: float, block_size: int) -> None:
    """Pass 2, row t of `finished` holding job t's weight_norm, adam_norm,
    trust_ratio and step size: each block's new scales, the codes, the weights;
    then the first three into the job's 0-dim state tensors."""
    where = layout(jobs, block_size)
    finished = finished.to(device=where.numel.device, dtype=torch.float32)
    launch(block_apply_kernel, where.count, table(jobs, where), where.programs, finished[:, 3].contiguous(),
           *moments(beta1, beta2, eps, weight_decay), **block_constants(block_size))
    write_outputs(jobs, 2, list(finished[:, :3].unbind(1)))


def lamb16_block_steps(jobs: list[Job], *, lr, trust_lr, beta1: float, beta2: float, eps: float,
                       weight_decay: float, trust_scale: float, block_size: int) -> None:
    """lamb16_block_update() of many tensors: pass 1, the norms and trust ratios, pass 2."""
    moments_of = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, block_size=block_size)
    sums = lamb16_block_partials(jobs, **moments_of)
    numel = layout(jobs, block_size).numel
    weight_norm, adam_norm, trust = norms_and_trust(sums[:, 0], sums[:, 1], numel, trust_lr, trust_scale)
    lamb16_block_applies(jobs, torch.stack([weight_norm, adam_norm, trust, trust * lr], dim=1), **moments_of)


def carried(jobs: list[Job]) -> tuple[Tensor, Tensor]:
    """The single-pass jobs' carries (T, 4) and last update norms (T,)."""
    return torch.stack([job[0][6] for job in jobs]), torch.stack([job[0][7] for job in jobs])


def lamb16_block_single_pass_steps(jobs: list[Job], *, lr, trust_lr, beta1: float, beta2: float, eps: float,
                                   weight_decay: float, trust_scale: float, block_size: int) -> None:
    """lamb16_block_single_pass_update() of many tensors, in one pass (and one
    launch to add up what the next step starts from)."""
    where = layout(jobs, block_size)
    carries, last_norms = carried(jobs)
    trust = lamb16_trust_ratio(carries[:, 0], last_norms, trust_lr, trust_scale)
    partials = torch.empty(where.count, 2, device=where.numel.device)
    launch(block_single_pass_kernel, where.count, table(jobs, where), where.programs, (trust * lr).contiguous(),
           partials, *moments(beta1, beta2, eps, weight_decay), **block_constants(block_size))
    sums = segments(partials, where)
    norms = sums.sqrt() / where.numel[:, None]  # the new update's, the new weights'
    zero = torch.zeros_like(trust)
    new_carries = torch.stack([norms[:, 1], zero, zero, torch.ones_like(trust)], dim=1)
    write_outputs(jobs, 2, [carries[:, 0], norms[:, 0], trust])
    torch._foreach_copy_([job[1][5] for job in jobs], list(new_carries.unbind(0)))


# ----------------------------------------------------- a scale per tensor


def lamb16_partials(jobs: list[Job], *, beta1: float, beta2: float, eps: float, weight_decay: float,
                    scaling: str) -> Tensor:
    """Pass 1: each job's lamb16_partials(), (jobs, 4)."""
    where = layout(jobs, 0)
    partials = torch.empty(where.count, 4, device=where.numel.device)
    launch(tensor_partials_kernel, where.count, table(jobs, where), where.programs, partials,
           *moments(beta1, beta2, eps, weight_decay), SEED=scaling == "seed", TILE=TILE)
    return segments(partials, where, maxima=0 if scaling == "seed" else 0b0011)


def lamb16_applies(jobs: list[Job], finished: Tensor, *, beta1: float, beta2: float, eps: float,
                   weight_decay: float, scaling: str) -> None:
    """Pass 2, row t of `finished` holding job t's new m scale, new v scale,
    weight_norm, adam_norm, trust_ratio and step size; the first five then go
    into its 0-dim state tensors (the old scales read first)."""
    where = layout(jobs, 0)
    finished = finished.to(device=where.numel.device, dtype=torch.float32)
    launch(tensor_apply_kernel, where.count, table(jobs, where), where.programs, finished[:, :2].contiguous(),
           finished[:, 5].contiguous(), *moments(beta1, beta2, eps, weight_decay), SEED=scaling == "seed",
           TILE=TILE)
    write_outputs(jobs, 0, list(finished[:, :5].unbind(1)))


def lamb16_steps(jobs: list[Job], *, lr, trust_lr, beta1: float, beta2: float, eps: float, weight_decay: float,
                 trust_scale: float, scaling: str) -> None:
    """lamb16_update() of many tensors: pass 1, the scales, norms and trust ratios, pass 2."""
    moments_of = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scaling=scaling)
    partials = lamb16_partials(jobs, **moments_of)
    results = lamb16_finish(partials, layout(jobs, 0).numel, trust_lr=trust_lr, eps=eps, trust_scale=trust_scale,
                            scaling=scaling)
    lamb16_applies(jobs, torch.stack([*results, results[4] * lr], dim=1), **moments_of)


def tile_reduce(jobs: list[Job], gradient_absmax: bool, eps: float = 0.0) -> Tensor:
    """Each job's largest |g| (of its usable gradient), or its weights' clamped square sum: (jobs,)."""
    where = layout(jobs, 0)
    partials = torch.empty(where.count, 1, device=where.numel.device)
    launch(tile_reduce_kernel, where.count, table(jobs, where), where.programs, partials, float(eps),
           GRADIENT_ABSMAX=gradient_absmax, TILE=TILE)
    return segments(partials, where, maxima=1 if gradient_absmax else 0)[:, 0]


def lamb16_single_pass_steps(jobs: list[Job], *, lr, trust_lr, beta1: float, beta2: float, eps: float,
                             weight_decay: float, trust_scale: float, scaling: str) -> None:
    """lamb16_single_pass_update() of many tensors: for absmax scales a read of
    the gradients for their largest |g| first, then one pass."""
    where = layout(jobs, 0)
    carries, last_norms = carried(jobs)
    if scaling == "seed":
        m_scale, v_scale = carries[:, 1], carries[:, 2]
    else:
        m_scale, v_scale = bounded_scales(carries[:, 1], carries[:, 2], tile_reduce(jobs, True), beta1, beta2)
    trust = lamb16_trust_ratio(carries[:, 0], last_norms, trust_lr, trust_scale)
    partials = torch.empty(where.count, 4, device=where.numel.device)
    launch(tensor_single_pass_kernel, where.count, table(jobs, where), where.programs,
           torch.stack([m_scale, v_scale], dim=1).contiguous(), (trust * lr).contiguous(), partials,
           *moments(beta1, beta2, eps, weight_decay), SEED=scaling == "seed", TILE=TILE)
    sums = segments(partials, where, maxima=0 if scaling == "seed" else 0b1100)
    norms = sums[:, :2].sqrt() / where.numel[:, None]  # the new update's, the new weights'
    stats = next_stats_from(sums[:, 2], sums[:, 3], m_scale, v_scale, where.numel, eps, scaling)
    new_carries = torch.stack([norms[:, 1], *stats, torch.ones_like(trust)], dim=1)
    write_outputs(jobs, 0, [m_scale, v_scale, carries[:, 0], norms[:, 0], trust])
    torch._foreach_copy_([job[1][5] for job in jobs], list(new_carries.unbind(0)))


def lamb16_weight_norms(jobs: list[Job], *, eps: float, block_size: int = 0) -> None:
    """Each single-pass job's weight norm (of the weights as they are) into its carry."""
    norms = tile_reduce(jobs, False, eps).sqrt() / layout(jobs, 0).numel
    torch._foreach_copy_([job[0][6][0] for job in jobs], list(norms.unbind()))


KERNELS: dict[str, Callable[..., Any]] = {
    "lamb16_steps": lamb16_steps, "lamb16_single_pass_steps": lamb16_single_pass_steps,
    "lamb16_block_steps": lamb16_block_steps, "lamb16_block_single_pass_steps": lamb16_block_single_pass_steps,
    "lamb16_partials": lamb16_partials, "lamb16_applies": lamb16_applies,
    "lamb16_block_partials": lamb16_block_partials, "lamb16_block_applies": lamb16_block_applies,
    "lamb16_weight_norms": lamb16_weight_norms,
}

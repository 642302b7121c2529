"""The one place that picks how updates run: the CPU kernels (lamb16.native),
the Triton kernels on GPUs (lamb16.triton_kernels), the compiled reference
(other devices, and where the kernels cannot run), or the eager reference.

Both sets of kernels take a parameter group's jobs in one call under the
same entry points (`lamb16_block_steps`, `lamb16_partials`, ...)."""

from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import compiled, native, triton_kernels
from ._common import Job

# The compiled path as it was before groups compiled as one: a call (and its
# results' copies) per tensor. Kept so that `bench` can time both in one run.
compile_per_tensor = False

KERNELS: tuple[ModuleType, ...] = (native, triton_kernels)
PATH_NAMES = {native: "cpu kernels", triton_kernels: "triton kernels"}
# How many updates each path has run (a benchmark checks that the one it names ran).
paths: dict[str, int] = {}


def counted(path: str, count: int = 1) -> None:
    paths[path] = paths.get(path, 0) + count


def kernels_for(job: Job, fused: bool | None, entry: str) -> ModuleType | None:
    """The kernels that take `job` through `entry`, or None."""
    for kernels in KERNELS:
        if hasattr(kernels, entry) and kernels.usable(job, fused):
            return kernels
    return None


def by_kernels(jobs: list[Job], fused: bool | None, entry: str, rows: list[int] | None = None
               ) -> dict[ModuleType, list[int]]:
    """The jobs (of `rows`, or all) that kernels take through `entry`, by kernels."""
    taken: dict[ModuleType, list[int]] = {}
    for i in range(len(jobs)) if rows is None else rows:
        kernels = kernels_for(jobs[i], fused, entry)
        if kernels is not None:
            taken.setdefault(kernels, []).append(i)
    return taken


def run_reference(update: Callable, inputs: tuple, fused: bool | None, **kwargs: Any) -> Any:
    """One tensor's `update` (a reference function): compiled off the CPU, else eager."""
    if compiled.usable(inputs, fused):
        result = compiled.run_compiled(update, inputs, **kwargs)
        counted("compiled" if compiled._unavailable is None else "reference")
        return result
    counted("reference")
    return update(*inputs, **kwargs)


def run_updates(update: Callable, entry: str, jobs: list[Job], fused: bool | None, **hyper: Any) -> int:
    """Run a parameter group's updates: all those that kernels take in one call
    of `entry` a set of kernels; all those off the CPU in one compiled call of
    `update`, the reference; each other one through the reference eagerly, its
    results copied into the job's state tensors. Returns how many took the CPU kernels."""
    rest, on_native = list(range(len(jobs))), 0
    for kernels, rows in by_kernels(jobs, fused, entry).items():
        try:
            getattr(kernels, entry)([jobs[i] for i in rows], **hyper)
        except triton_kernels.Unavailable:  # they could not run here: the next paths take these jobs
            continue
        taken = set(rows)
        rest = [i for i in rest if i not in taken]
        on_native += len(rows) if kernels is native else 0
        counted(PATH_NAMES[kernels], len(rows))
    on_compiled = []
    for i in rest:
        inputs, outputs, extra = jobs[i]
        if compiled.group_usable(inputs, fused) and not compile_per_tensor:
            on_compiled.append(jobs[i])
        else:
            for output, result in zip(outputs, run_reference(update, inputs, fused, **hyper, **extra)):
                output.copy_(result)
    if on_compiled:
        compiled.run_group(update, on_compiled, **hyper)
        counted("compiled" if compiled._unavailable is None else "reference", len(on_compiled))
    return on_native

"""The one place that picks how updates run: the CPU kernels, the compiled
reference (off the CPU), or the eager reference."""

from collections.abc import Callable
from typing import Any

from . import compiled, native
from ._common import Job


def run_reference(update: Callable, inputs: tuple, fused: bool | None, **kwargs: Any) -> Any:
    """One tensor's `update` (a reference function): compiled off the CPU, else eager."""
    if compiled.usable(inputs, fused):
        return compiled.run_compiled(update, inputs, **kwargs)
    return update(*inputs, **kwargs)


def run_updates(
    update: Callable, native_updates: Callable, jobs: list[Job], fused: bool | None, **hyper: Any
) -> None:
    """Run a parameter group's updates: all those the CPU kernels can take in one
    call to `native_updates`; each other one through `update`, the reference
    (compiled off the CPU), its results copied into the job's state tensors."""
    on_native = []
    for job in jobs:
        inputs, outputs, extra = job
        if native.usable(job, fused):
            on_native.append(job)
            continue
        results = run_reference(update, inputs, fused, **hyper, **extra)
        for output, result in zip(outputs, results):
            output.copy_(result)
    if on_native:
        native_updates(on_native, **hyper)

"""The one place that picks how updates run: the CPU kernels, the compiled
reference (off the CPU), or the eager reference."""

from collections.abc import Callable
from typing import Any

from . import compiled, native
from ._common import Job

# The compiled path as it was before groups compiled as one: a call (and its
# results' copies) per tensor. Kept so that `bench` can time both in one run.
compile_per_tensor = False


def run_reference(update: Callable, inputs: tuple, fused: bool | None, **kwargs: Any) -> Any:
    """One tensor's `update` (a reference function): compiled off the CPU, else eager."""
    if compiled.usable(inputs, fused):
        return compiled.run_compiled(update, inputs, **kwargs)
    return update(*inputs, **kwargs)


def run_updates(
    update: Callable, native_updates: Callable, jobs: list[Job], fused: bool | None, **hyper: Any
) -> int:
    """Run a parameter group's updates: all those the CPU kernels can take in one
    call to `native_updates`; all those off the CPU in one compiled call of
    `update`, the reference; each other one through the reference eagerly, its
    results copied into the job's state tensors. Returns how many took the kernels."""
    on_native, on_compiled = [], []
    for job in jobs:
        inputs, outputs, extra = job
        if native.usable(job, fused):
            on_native.append(job)
        elif compiled.group_usable(inputs, fused) and not compile_per_tensor:
            on_compiled.append(job)
        else:
            for output, result in zip(outputs, run_reference(update, inputs, fused, **hyper, **extra)):
                output.copy_(result)
    if on_native:
        native_updates(on_native, **hyper)
    if on_compiled:
        compiled.run_group(update, on_compiled, **hyper)
    return len(on_native)

"""The one place that picks how an update runs: the CPU kernels, the compiled
reference (off the CPU), or the eager reference."""

from collections.abc import Callable
from typing import Any

from torch import Tensor

from . import compiled, native


def run_update(
    update: Callable, native_update: Callable, tensors: tuple[Tensor, ...], fused: bool | None, **hyper: Any
) -> Any:
    """Run `update` (the reference) or its CPU-kernel twin `native_update`, which
    takes the same arguments and returns the same results."""
    if native.usable(tensors, fused):
        return native_update(*tensors, **hyper)
    if compiled.usable(tensors, fused):
        return compiled.run_compiled(update, tensors, **hyper)
    return update(*tensors, **hyper)

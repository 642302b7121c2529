"""The fast path off the CPU: the reference per-tensor updates, compiled once by torch.compile.

Each update runs on flat (1-D) aliases with dynamic shapes and with its
hyperparameters as 0-dim tensors, so one compiled graph serves every tensor,
every step and every learning rate (Inductor makes one for tensors of up to
4096 elements and one for larger). With aggressive fusion, Inductor turns the
reference's two passes into exactly two loops over memory (Triton kernels on CUDA,
C++ on the CPU): one for all the reductions, one for all the writes. Where it
cannot compile (no C compiler, an unsupported device), the optimizer falls back
to the reference with one warning.
"""

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._common import same_dense_layout

_compiled: dict[Callable, Callable] = {}
_unavailable: str | None = None  # why compilation failed, once it has
_scalars: dict[tuple[float, torch.device], Tensor] = {}  # hyperparameters as graph inputs


def can_compile(tensors: tuple[Tensor, ...]) -> bool:
    """Whether an update's tensors can go through the compiled path: laid out as
    flat arrays alike, and the parameter has more than one element
    (torch.compile specializes sizes 0 and 1)."""
    return _unavailable is None and tensors[0].numel() > 1 and same_dense_layout(tensors)


def as_input(value: Any, like: Tensor) -> Any:
    """Numbers become 0-dim float32 tensors (graph inputs, not constants to guard on)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        key = (float(value), like.device)
        if key not in _scalars:
            if len(_scalars) > 256:  # a scheduler makes a new lr every step
                _scalars.clear()
            _scalars[key] = torch.tensor(float(value), dtype=torch.float32, device=like.device)
        return _scalars[key]
    return value


def flat_alias(t: Tensor) -> Tensor:
    """A 1-D tensor on the same memory as dense `t`, in memory order. Not a view:
    torch.compile would guard on a view's base shape and recompile for every
    parameter shape."""
    if t.dim() == 0:
        return t
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def run_compiled(update: Callable, reference_args: tuple[Tensor, ...], **hyper: Any) -> Any:
    """Call `update` compiled, on flat aliases of its tensor arguments; `hyper`
    holds numbers (made 0-dim tensors) and static options (strings and bools)."""
    global _unavailable
    if _unavailable is not None:  # already warned
        return update(*reference_args, **hyper)
    flat = tuple(flat_alias(t) for t in reference_args)
    like = reference_args[0]
    kwargs = {k: as_input(v, like) for k, v in hyper.items()}
    compiled = _compiled.get(update)
    if compiled is None:
        compiled = _compiled[update] = torch.compile(
            update, dynamic=True, fullgraph=True, options={"aggressive_fusion": True}
        )
    try:
        return compiled(*flat, **kwargs)
    except Exception as error:  # a compiler or device that torch.compile cannot use
        _unavailable = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"lamb16: compiling the fused step failed ({_unavailable}); using the reference "
            "implementation (pass fused=False to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        return update(*reference_args, **hyper)


def compiles_on(device: torch.device) -> bool:
    """Where this path serves: every device but the CPU, where lamb16.native is faster."""
    return device.type != "cpu"


def usable(tensors: tuple[Tensor, ...], fused: bool | None) -> bool:
    """Whether this update runs compiled: fused not False, off the CPU, and
    tensors the compiled graphs take."""
    return fused is not False and compiles_on(tensors[0].device) and can_compile(tensors)

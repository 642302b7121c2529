"""Lamb16's fast path on GPUs: Triton kernels for its steps on CUDA tensors,
block scales and a scale per tensor, exact and single pass, a parameter
group's tensors in a few launches.

Bytes an element a step moves (float32 weights and gradient, fp8 codes):
the exact step reads everything twice, the weights, gradient and codes for
its sums (10), then again for its writes (10 read, 6 written): 26, against
Adam fused's 28; the single pass reads and writes once: 16 (with a scale
per tensor, 4 more to find the gradient's largest first). Nothing else is
allocated but a few bytes of partial sums per 4096 elements.

The entry points take the jobs lamb16.dispatch gives them, as lamb16.native's
do on the CPU, under the same names. Every launch rounds as the reference
does (see arithmetic.py); the fp8 codes are found by integer operations
(fp8.py), so every GPU writes the same codes as the CPU. Where Triton or a
GPU cannot run them, the first failure warns once and the steps go the
compiled path from then on.

Kernels are compiled on first use (a few seconds each) and cached by Triton.
Under Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) they run on CPU tensors, which is how the tests hold them to the
reference without a GPU.
"""

import importlib.util
import os
import warnings
from typing import Any

import torch

from .._common import ELEMENTWISE, Job, same_dense_layout

MAX_LANES = 8192  # the largest block a program's tile holds (block_size up to this)
_unavailable: str | None = None


class Unavailable(RuntimeError):
    """The kernels failed to compile or launch here: the step goes another path."""


def importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Where the kernels serve: CUDA devices (and, under the interpreter, the CPU, for the tests)."""
    return device.type == "cuda"


def usable(job: Job, fused: bool | None) -> bool:
    """Whether a job runs on these kernels: fused not False, Triton here, a
    device they serve, float32 weights and gradient laid out as the moments,
    float32 scales on the same device (block scales of at most MAX_LANES
    elements), and something to step."""
    inputs, outputs, _ = job
    param, grad = inputs[0], inputs[1]
    device = param.device
    if fused is False or _unavailable is not None or not runs_on(device) or param.numel() == 0:
        return False
    if param.dtype != torch.float32 or grad.dtype != torch.float32 or not same_dense_layout(inputs[:ELEMENTWISE]):
        return False
    scales = inputs[4:6]
    if any(t.device != device or t.dtype != torch.float32 or not t.is_contiguous() for t in inputs[4:] + outputs):
        return False
    if scales[0].dim() == 2 and param.numel() % scales[0].shape[0]:  # not whole rows (a cut 1-D piece)
        return False
    return importable()


def call(kernel: str, jobs: list[Job], *args: Any, **hyper: Any) -> Any:
    """Run the named entry point of lamb16.triton_kernels.launch on `jobs`;
    a compile or launch failure warns once and raises Unavailable, after which
    `usable` says no."""
    global _unavailable
    if hyper.get("block_size", 0) > MAX_LANES:  # blocks larger than a program's tile: this group goes another path
        raise Unavailable(f"block_size {hyper['block_size']} above {MAX_LANES}")
    try:
        from . import launch

        return launch.KERNELS[kernel](jobs, *args, **hyper)
    except Exception as error:  # a GPU or Triton version that cannot compile them
        if isinstance(error, (KeyboardInterrupt, MemoryError)):
            raise
        _unavailable = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"lamb16: the Triton kernels failed ({_unavailable}); using the compiled step (pass "
                      "fused=False for the reference)", RuntimeWarning, stacklevel=4)
        raise Unavailable(_unavailable) from error


def lamb16_steps(jobs: list[Job], **hyper: Any) -> None:
    call("lamb16_steps", jobs, **hyper)


def lamb16_single_pass_steps(jobs: list[Job], **hyper: Any) -> None:
    call("lamb16_single_pass_steps", jobs, **hyper)


def lamb16_block_steps(jobs: list[Job], **hyper: Any) -> None:
    call("lamb16_block_steps", jobs, **hyper)


def lamb16_block_single_pass_steps(jobs: list[Job], **hyper: Any) -> None:
    call("lamb16_block_single_pass_steps", jobs, **hyper)


def lamb16_partials(jobs: list[Job], **moments: Any) -> torch.Tensor:
    return call("lamb16_partials", jobs, **moments)


def lamb16_applies(jobs: list[Job], finished: torch.Tensor, **moments: Any) -> None:
    call("lamb16_applies", jobs, finished, **moments)


def lamb16_block_partials(jobs: list[Job], **moments: Any) -> torch.Tensor:
    return call("lamb16_block_partials", jobs, **moments)


def lamb16_block_applies(jobs: list[Job], finished: torch.Tensor, **moments: Any) -> None:
    call("lamb16_block_applies", jobs, finished, **moments)


def lamb16_weight_norms(jobs: list[Job], **options: Any) -> None:
    call("lamb16_weight_norms", jobs, **options)

"""The CPU fast path: csrc/cpu_kernels.cpp, built once per machine and called through ctypes.

The kernels are the reference updates written as two vectorized, multi-threaded
loops (one for the reductions, one for the writes). They include no torch
headers, so the first use builds them in about two seconds with the system's
C++ compiler (`$CXX`, else `c++`) and caches the library under
`$LAMB16_CACHE_DIR` (default `~/.cache/lamb16`); a call costs a few
microseconds, where a torch.compile'd update costs a hundred. Where no compiler
can build them, the optimizers warn once and use the reference.
"""

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ._common import same_dense_layout

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
# Without OpenMP (Apple's clang has none by default) the kernels run on one thread.
OPENMP_FLAGS = [["-fopenmp"], []]

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why building failed, once it has

_f, _i, _i64, _ptr = ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {
    # param, grad, exp_avg, exp_avg_sq, n, m scale, v scale, lr, beta1, beta2,
    # 1 - beta1, 1 - beta2, eps, weight_decay, trust_scale, seed, threads, out
    "lamb16_step": [_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr] + [_f] * 8 + [_i, _i, _ptr],
    # param, grad, exp_avg, exp_avg_sq, n, lr, beta1, beta2, 1 - beta1, 1 - beta2,
    # eps, weight_decay, bias_correction, 1 - beta1**step, 1 - beta2**step, adam,
    # max_weight_norm, threads, out
    "lamb_step": [_ptr, _ptr, _ptr, _ptr, _i64] + [_f] * 7 + [_i, _f, _f, _i, _f, _i, _ptr],
    "encode_e4m3_array": [_ptr, _ptr, _i64],
    "encode_e5m2_array": [_ptr, _ptr, _i64],
    "decode_e4m3_array": [_ptr, _ptr, _i64],
    "decode_e5m2_array": [_ptr, _ptr, _i64],
}


def cache_dir() -> Path:
    if "LAMB16_CACHE_DIR" in os.environ:
        return Path(os.environ["LAMB16_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lamb16"


def machine_id() -> str:
    """-march=native builds for this processor: a cache shared by several
    machines (a network home) must not hand one's build to another."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def build(compiler: str) -> Path:
    """Compile the kernels (or find them built) and return the library's path."""
    source = SOURCE.read_bytes()
    variants = []
    for openmp in OPENMP_FLAGS:
        flags = FLAGS + openmp
        key = hashlib.sha256(source + " ".join([compiler, *flags, machine_id()]).encode()).hexdigest()[:16]
        variants.append((flags, cache_dir() / f"cpu_kernels-{key}.so"))
    for _, path in variants:  # a machine without OpenMP builds, and then finds, the second
        if path.exists():
            return path
    errors = []
    for flags, path in variants:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name and rename: two processes may build at once.
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            command = [compiler, *flags, str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                os.replace(built, path)
                return path
            stderr = result.stderr.strip()
            errors.append(stderr.splitlines()[0] if stderr else f"exit status {result.returncode}")
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors[0]}")


def library() -> ctypes.CDLL | None:
    """The built kernels, or None (after one warning) where they cannot be built."""
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    try:
        lib = ctypes.CDLL(str(build(os.environ.get("CXX", "c++"))))
        for name, argtypes in SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
        _library = lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _unavailable = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"lamb16: building the CPU kernels failed ({_unavailable}); using the reference "
            "implementation (install a C++ compiler, or pass fused=False to silence this)",
            RuntimeWarning,
            stacklevel=4,
        )
    return _library


def usable(tensors: tuple[Tensor, ...], fused: bool | None) -> bool:
    """Whether this update runs on the CPU kernels: fused not False, the kernels
    built (or buildable), and tensors they can walk as flat arrays: on the CPU,
    float32 weights and gradient, every per-element tensor in the parameter's
    own dense layout (raw pointers forgive no mismatch). Moments and scales
    have their dtypes by construction (and Lamb16.load_state_dict)."""
    param, grad = tensors[0], tensors[1]
    return (
        fused is not False
        and param.device.type == "cpu"
        and param.dtype == grad.dtype == torch.float32
        and same_dense_layout(tensors)
        and library() is not None
    )


def lamb16_step(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, trust_scale: float, scaling: str,
) -> tuple[Tensor, ...]:
    """lamb16_update() on the CPU kernels: the same in-place updates and the same
    returns (exp_avg_scale, exp_avg_sq_scale, weight_norm, adam_norm, trust_ratio)."""
    out = torch.empty(5)
    library().lamb16_step(  # type: ignore[union-attr]
        param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), param.numel(),
        exp_avg_scale.data_ptr(), exp_avg_sq_scale.data_ptr(),
        float(lr), beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay, trust_scale,
        scaling == "seed", torch.get_num_threads(), out.data_ptr(),
    )
    return out.unbind()


def lamb_step(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    *, step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    adam: bool, bias_correction: bool, max_weight_norm: float,
) -> tuple[Tensor, ...]:
    """lamb_update() on the CPU kernels; returns (weight_norm, adam_norm, trust_ratio)."""
    out = torch.empty(3)
    library().lamb_step(  # type: ignore[union-attr]
        param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), param.numel(),
        float(lr), beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay,
        bias_correction, 1 - beta1**step, 1 - beta2**step, adam, max_weight_norm,
        torch.get_num_threads(), out.data_ptr(),
    )
    return out.unbind()

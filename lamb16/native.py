"""The CPU fast path: csrc/cpu_kernels.cpp (with its headers, a file per set of
loops), built once per machine and called through ctypes.

The kernels are the reference updates written as vectorized, multi-threaded
loops (the exact step: one for the reductions, one for the writes, which with
block scales moves the weights by the update the first kept; the single pass:
one, after the gradient's absmax with a scale per tensor): by hand with AVX-512 or AVX2
intrinsics where the processor has them, else as portable loops that the
compiler vectorizes (`loops()` says which). They include no torch
headers, so the first use builds them in about two seconds with the system's
C++ compiler (`$CXX`, else `c++`) and caches the library under
`$LAMB16_CACHE_DIR` (default `~/.cache/lamb16`). One call runs a parameter
group's updates: with block scales (the default) all its tensors' chunks
shared out among the threads in one go, otherwise the small tensors several at
once on the threads and the large ones each across all of them. Where no
compiler can build the kernels, the optimizers warn once and use the reference.
"""

import _ctypes
import array
import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ._common import ELEMENTWISE, Job, same_dense_layout

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# Everything the build reads: the entry points' file and the headers it includes.
SOURCES = sorted([*SOURCE.parent.glob("*.cpp"), *SOURCE.parent.glob("*.h")])
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
# Tried in order until one builds. Without OpenMP (Apple's clang has none by
# default) the kernels run on one thread; without -march=native (a compiler
# that cannot tell this processor) they use only the baseline vector width.
VARIANTS = [["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []]

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why building failed, once it has

_f, _i, _i64, _ptr = ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {
    # table, count, lr, trust_lr (the lr the trust ratio reads), beta1, beta2,
    # 1 - beta1, 1 - beta2, eps, weight_decay, trust_scale, seed, threads
    "lamb16_steps": [_ptr, _i64] + [_f] * 9 + [_i, _i],
    "lamb16_single_pass_steps": [_ptr, _i64] + [_f] * 9 + [_i, _i],
    # table, columns, count, eps, block_size (0: scales per tensor), threads
    "lamb16_weight_norms": [_ptr, _i64, _i64, _f, _i, _i],
    # As lamb16_steps, with block_size in place of seed.
    "lamb16_block_steps": [_ptr, _i64] + [_f] * 9 + [_i, _i],
    "lamb16_block_single_pass_steps": [_ptr, _i64] + [_f] * 9 + [_i, _i],
    # table, count, beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay,
    # block_size, threads, sums out (count x 2) / finished in (count x 4)
    "lamb16_block_partials": [_ptr, _i64] + [_f] * 6 + [_i, _i, _ptr],
    "lamb16_block_applies": [_ptr, _i64] + [_f] * 6 + [_i, _i, _ptr],
    # table, count, corrections, lr, beta1, beta2, 1 - beta1, 1 - beta2, eps,
    # weight_decay, bias_correction, adam, max_weight_norm, threads
    "lamb_steps": [_ptr, _i64, _ptr] + [_f] * 7 + [_i, _i, _f, _i],
    # table, count, beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay, seed,
    # threads, partials out (count x 4) / finished in (count x 6)
    "lamb16_partials": [_ptr, _i64] + [_f] * 6 + [_i, _i, _ptr],
    "lamb16_applies": [_ptr, _i64] + [_f] * 6 + [_i, _i, _ptr],
    # table, count, corrections, beta1, beta2, 1 - beta1, 1 - beta2, eps,
    # weight_decay, bias_correction, threads, partials out (count x 2) / finished in (count x 4)
    "lamb_partials": [_ptr, _i64, _ptr] + [_f] * 6 + [_i, _i, _ptr],
    "lamb_applies": [_ptr, _i64, _ptr] + [_f] * 6 + [_i, _i, _ptr],
    "encode_e4m3_array": [_ptr, _ptr, _i64],
    "encode_e5m2_array": [_ptr, _ptr, _i64],
    "decode_e4m3_array": [_ptr, _ptr, _i64],
    "decode_e5m2_array": [_ptr, _ptr, _i64],
    "use_loops": [_i],  # LOOPS index, or -1: as it is; returns the index of the loops that run
    "traffic": [_ptr, _i64, _i64, _i, _i],  # table, columns, count, pattern, threads
    "nothing": [],  # what calls_only() calls in place of the steps
}
# The entry points a step calls, which calls_only() replaces.
STEP_KERNELS = tuple(name for name in SIGNATURES if name.endswith(("_steps", "_norms", "_partials", "_applies")))
RESULTS = {"use_loops": _i, "traffic": _i64}
LOOPS = ("portable", "avx2", "avx512")  # as the kernels number them
# A step's design, as traffic() mimics it: its passes, and its moments' dtype.
TRAFFIC_PATTERNS = {"adam": (0, torch.float32), "lamb": (1, torch.float32), "lamb16": (5, torch.uint8),
                    "lamb16-1pass": (4, torch.uint8), "lamb16-absmax": (2, torch.uint8),
                    "lamb16-absmax-1pass": (3, torch.uint8)}


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


def digest_path(library_path: Path) -> Path:
    return library_path.with_name(library_path.name + ".sha256")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(path: Path) -> bool:
    """Whether a cached library is whole and ours: its SHA-256 matches the one
    written beside it at build time. A truncated file would kill the process
    at load (SIGBUS), a foreign one lack our symbols: neither is loaded blind."""
    try:
        return digest_path(path).read_text().strip() == sha256_of(path)
    except OSError:
        return False


def build(compiler: str) -> Path:
    """Compile the kernels (or find them built and verified) and return the library's path."""
    source = b"".join(path.name.encode() + path.read_bytes() for path in SOURCES)
    variants = []
    for variant in VARIANTS:
        flags = FLAGS + variant
        key = hashlib.sha256(source + " ".join([compiler, *flags, machine_id()]).encode()).hexdigest()[:16]
        variants.append((flags, cache_dir() / f"cpu_kernels-{key}.so"))
    for _, path in variants:  # a machine that cannot build the first builds, then finds, a later one
        if path.exists() and verified(path):
            return path
    errors = []
    for flags, path in variants:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name, write its digest, then rename: a process
        # that finds the library finds its digest too, and two may build at once.
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            command = [compiler, *flags, str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                digest = Path(tmp) / digest_path(path).name
                digest.write_text(sha256_of(built) + "\n")
                os.replace(digest, digest_path(path))
                os.replace(built, path)
                return path
            stderr = result.stderr.strip()
            errors.append(stderr.splitlines()[0] if stderr else f"exit status {result.returncode}")
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors[0]}")


def load(path: Path) -> ctypes.CDLL:
    """The library with its functions typed; AttributeError if one is missing."""
    lib = ctypes.CDLL(str(path))
    try:
        for name, argtypes in SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = RESULTS.get(name)
    except AttributeError:
        # Unload it: the rebuilt library will have the same path, and the
        # loader would otherwise hand back this one.
        _ctypes.dlclose(lib._handle)
        raise
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernels, or None (after one warning) where they cannot be built.
    A cached library that fails its check or lacks a kernel is rebuilt once."""
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    compiler = os.environ.get("CXX", "c++")
    try:
        damaged = [p for p in cache_dir().glob("cpu_kernels-*.so") if not verified(p)] if cache_dir().is_dir() else []
        for path in damaged:
            path.unlink(missing_ok=True)
        path = build(compiler)
        try:
            _library = load(path)
        except (OSError, AttributeError):  # verified, yet not loadable: not ours after all
            damaged.append(path)
            path.unlink(missing_ok=True)
            _library = load(build(compiler))
        if damaged:
            warnings.warn(
                f"lamb16: cached CPU kernels in {cache_dir()} failed their checksum or load (damaged, foreign, or "
                "from a version that wrote none); rebuilt them",
                RuntimeWarning,
                stacklevel=4,
            )
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as error:
        _unavailable = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"lamb16: building the CPU kernels failed ({_unavailable}); using the reference "
            f"implementation ({remedy(error, compiler)}, or pass fused=False to silence this)",
            RuntimeWarning,
            stacklevel=4,
        )
    return _library


def remedy(error: Exception, compiler: str) -> str:
    """What to do about a failed build: the cache folder, the compiler, or the build itself."""
    if isinstance(error, FileNotFoundError) and error.filename == compiler:
        return f"install a C++ compiler, or name one in CXX (tried {compiler})"
    if isinstance(error, OSError):
        return (f"make {cache_dir()} writable, or point LAMB16_CACHE_DIR at a writable folder: the kernels are built "
                "and kept there")
    return f"check that {compiler} builds C++17 with OpenMP, or name another compiler in CXX"


def loops() -> str:
    """Which loops the CPU kernels run: "avx512" or "avx2" (hand-vectorized,
    where the processor and compiler have AVX-512 with VBMI, or AVX2 with F16C
    and FMA), "portable" (vectorized by the compiler), or "none" where they
    cannot be built."""
    lib = library()
    if lib is None:
        return "none"
    return LOOPS[lib.use_loops(-1)]


def use_loops(name: str) -> bool:
    """Run the named loops from now on (the tests hold each set to the
    reference); False, changing nothing, where this build has none of them."""
    lib = library()
    return lib is not None and LOOPS[lib.use_loops(LOOPS.index(name))] == name


def usable(job: Job, fused: bool | None) -> bool:
    """Whether a job runs on the CPU kernels: fused not False, the kernels built
    (or buildable), and tensors they can walk as flat arrays through raw
    pointers, which forgive no mismatch: float32 weights and gradient on the
    CPU, the moments in the parameter's own dense layout, every other tensor
    float32 and contiguous there (scalars, the single-pass carry of four, block
    scale grids). Moments have their dtypes by construction (and
    Lamb16.load_state_dict)."""
    inputs, outputs, _ = job
    param, grad = inputs[0], inputs[1]
    return (
        fused is not False
        and param.is_cpu
        and param.dtype == grad.dtype == torch.float32
        and same_dense_layout(inputs[:ELEMENTWISE])
        and all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() and t.dim() <= 2
                for t in inputs[ELEMENTWISE:] + outputs)
        and library() is not None
    )


def addresses(*tensors: Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def lamb16_table(jobs: list[Job]) -> array.array:
    """The kernels' table of Lamb16 jobs: a row of addresses (and the size) per tensor."""
    table = array.array("q")
    for (param, grad, exp_avg, exp_avg_sq, m_scale, v_scale), (_, _, weight_norm, adam_norm, trust), _ in jobs:
        table.extend(addresses(param, grad, exp_avg, exp_avg_sq) + [param.numel()]
                     + addresses(m_scale, v_scale, weight_norm, adam_norm, trust))
    return table


def lamb16_steps(jobs: list[Job], **hyper) -> None:
    """lamb16_update() on the CPU kernels, for many tensors in one call (a table of
    their addresses). Each job's results go into its state tensors in place; the
    new scales into the tensors that held the old ones (inputs 4 and 5), as the
    kernels read the old scales from there."""
    run_lamb16("lamb16_steps", lamb16_table(jobs), len(jobs), **hyper)


def run_lamb16(kernel: str, table: array.array, count: int, *, lr: float, trust_lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, trust_scale: float, scaling: str = "block",
               block_size: int = 0) -> None:
    """Call one of the Lamb16 step kernels (LAMB16_KERNELS) on a table of `count`
    rows: the last integer argument is the seed flag, or the block size."""
    getattr(library(), kernel)(
        table.buffer_info()[0], count, float(lr), float(trust_lr), beta1, beta2, 1 - beta1, 1 - beta2, eps,
        weight_decay, trust_scale, block_size if kernel.startswith("lamb16_block") else scaling == "seed",
        torch.get_num_threads(),
    )


def lamb16_single_pass_table(jobs: list[Job]) -> array.array:
    """A row per single-pass job: the exact step's, then the carry's address."""
    table = array.array("q")
    for (param, grad, exp_avg, exp_avg_sq, m_scale, v_scale, carry, _), (*_, weight_norm, adam_norm, trust, _), _ in jobs:
        table.extend(addresses(param, grad, exp_avg, exp_avg_sq) + [param.numel()]
                     + addresses(m_scale, v_scale, weight_norm, adam_norm, trust, carry))
    return table


def lamb16_single_pass_steps(jobs: list[Job], **hyper) -> None:
    """lamb16_single_pass_update() on the CPU kernels, for many tensors in one
    call; each job's results, the new carry among them, go into its state
    tensors in place (adam_norm is read first: it holds the last step's)."""
    run_lamb16("lamb16_single_pass_steps", lamb16_single_pass_table(jobs), len(jobs), **hyper)


def lamb16_weight_norms(jobs: list[Job], *, eps: float, block_size: int = 0) -> None:
    """Each single-pass job's weight norm written into its carry, chunk by chunk
    as the single pass sums it (so that the bits agree); block_size as the
    step's (0: scales per tensor)."""
    table, columns = (lamb16_block_table(jobs), BLOCK_COLUMNS) if block_size else (lamb16_single_pass_table(jobs), 11)
    library().lamb16_weight_norms(  # type: ignore[union-attr]
        table.buffer_info()[0], columns, len(jobs), eps, block_size, torch.get_num_threads())


# Rows of the block-scale kernels' tables: param, grad, exp_avg, exp_avg_sq,
# numel, exp_avg_scale, exp_avg_sq_scale (grids, read, then overwritten),
# weight_norm, adam_norm, trust_ratio, carry (0 where there is none), row length.
BLOCK_COLUMNS = 12


def lamb16_block_table(jobs: list[Job]) -> array.array:
    """A row per job with block scales (exact or single pass)."""
    table = array.array("q")
    for inputs, outputs, _ in jobs:
        param, grad, exp_avg, exp_avg_sq, m_scales, v_scales = inputs[:6]
        carry = inputs[6].data_ptr() if len(inputs) > 6 else 0
        table.extend(addresses(param, grad, exp_avg, exp_avg_sq) + [param.numel()]
                     + addresses(m_scales, v_scales, *outputs[2:5]) + [carry, param.numel() // m_scales.shape[0]])
    return table


def lamb16_block_steps(jobs: list[Job], **hyper) -> None:
    """lamb16_block_update() on the CPU kernels, for many tensors in one call;
    each job's results go into its state tensors in place, the new scale grids
    into the grids that held the old ones."""
    run_lamb16("lamb16_block_steps", lamb16_block_table(jobs), len(jobs), **hyper)


def lamb16_block_single_pass_steps(jobs: list[Job], **hyper) -> None:
    """lamb16_block_single_pass_update() on the CPU kernels, for many tensors in
    one call (adam_norm is read first: it holds the last step's)."""
    run_lamb16("lamb16_block_single_pass_steps", lamb16_block_table(jobs), len(jobs), **hyper)


# Each Lamb16 step kernel's table of jobs.
LAMB16_TABLES = {"lamb16_steps": lamb16_table, "lamb16_single_pass_steps": lamb16_single_pass_table,
                 "lamb16_block_steps": lamb16_block_table, "lamb16_block_single_pass_steps": lamb16_block_table}


def lamb16_block_partials(jobs: list[Job], *, beta1: float, beta2: float, eps: float, weight_decay: float,
                          block_size: int) -> Tensor:
    """The clamped square sums of the weights and the update of many tensors
    with block scales, on the CPU kernels: a (jobs, 2) tensor. Changes nothing."""
    table, out = lamb16_block_table(jobs), torch.empty(len(jobs), 2)
    library().lamb16_block_partials(  # type: ignore[union-attr]
        table.buffer_info()[0], len(jobs), beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay, block_size,
        torch.get_num_threads(), out.data_ptr(),
    )
    return out


def lamb16_block_applies(jobs: list[Job], finished: Tensor, *, beta1: float, beta2: float, eps: float,
                         weight_decay: float, block_size: int) -> None:
    """The second pass of many tensors with block scales on the CPU kernels,
    row t of `finished` holding tensor t's weight_norm, adam_norm, trust_ratio
    and step size: each block's new scales from its own moments, in place of
    the old; then the first three into the job's 0-dim state tensors."""
    table, finished = lamb16_block_table(jobs), finished.to(torch.float32).contiguous()
    library().lamb16_block_applies(  # type: ignore[union-attr]
        table.buffer_info()[0], len(jobs), beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay, block_size,
        torch.get_num_threads(), finished.data_ptr(),
    )


def lamb16_partials(jobs: list[Job], *, beta1: float, beta2: float, eps: float, weight_decay: float,
                    scaling: str) -> Tensor:
    """lamb16_partials() of many tensors on the CPU kernels: a (jobs, 4) tensor. Changes nothing."""
    table, out = lamb16_table(jobs), torch.empty(len(jobs), 4)
    library().lamb16_partials(  # type: ignore[union-attr]
        table.buffer_info()[0], len(jobs), beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay,
        scaling == "seed", torch.get_num_threads(), out.data_ptr(),
    )
    return out


def lamb16_applies(jobs: list[Job], finished: Tensor, *, beta1: float, beta2: float, eps: float,
                   weight_decay: float, scaling: str) -> None:
    """lamb16_apply() of many tensors on the CPU kernels, row t of `finished`
    holding tensor t's new m scale, new v scale, weight_norm, adam_norm,
    trust_ratio and step size; the first five then go into its 0-dim state tensors."""
    table, finished = lamb16_table(jobs), finished.to(torch.float32).contiguous()
    library().lamb16_applies(  # type: ignore[union-attr]
        table.buffer_info()[0], len(jobs), beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay,
        scaling == "seed", torch.get_num_threads(), finished.data_ptr(),
    )


def lamb_table(jobs: list[Job], beta1: float, beta2: float) -> tuple[array.array, Tensor]:
    """The kernels' table of Lamb jobs, and each one's bias corrections from its step count."""
    table = array.array("q")
    for inputs, outputs, _ in jobs:
        table.extend(addresses(*inputs) + [inputs[0].numel()] + addresses(*outputs))
    # In double, as the reference: in float32, 1 - 0.999 would lose four digits.
    corrections = torch.tensor([[1 - beta1 ** extra["step"], 1 - beta2 ** extra["step"]] for _, _, extra in jobs])
    return table, corrections


def lamb_steps(jobs: list[Job], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               adam: bool, bias_correction: bool, max_weight_norm: float) -> None:
    """lamb_update() on the CPU kernels, for many tensors in one call; each job's
    extra holds its step count, and its results go into its state tensors."""
    table, corrections = lamb_table(jobs, beta1, beta2)
    library().lamb_steps(  # type: ignore[union-attr]
        table.buffer_info()[0], len(jobs), corrections.data_ptr(), float(lr), beta1, beta2, 1 - beta1, 1 - beta2, eps,
        weight_decay, bias_correction, adam, max_weight_norm, torch.get_num_threads(),
    )


def lamb_partials(jobs: list[Job], *, beta1: float, beta2: float, eps: float, weight_decay: float,
                  bias_correction: bool) -> Tensor:
    """lamb_partials() of many tensors on the CPU kernels (it writes the moments): a (jobs, 2) tensor."""
    (table, corrections), out = lamb_table(jobs, beta1, beta2), torch.empty(len(jobs), 2)
    library().lamb_partials(  # type: ignore[union-attr]
        table.buffer_info()[0], len(jobs), corrections.data_ptr(), beta1, beta2, 1 - beta1, 1 - beta2, eps,
        weight_decay, bias_correction, torch.get_num_threads(), out.data_ptr(),
    )
    return out


def lamb_applies(jobs: list[Job], finished: Tensor, *, beta1: float, beta2: float, eps: float, weight_decay: float,
                 bias_correction: bool) -> None:
    """lamb_apply() of many tensors on the CPU kernels, row t of `finished`
    holding tensor t's weight_norm, adam_norm, trust_ratio and step size; the
    first three then go into its 0-dim state tensors."""
    (table, corrections), finished = lamb_table(jobs, beta1, beta2), finished.to(torch.float32).contiguous()
    library().lamb_applies(  # type: ignore[union-attr]
        table.buffer_info()[0], len(jobs), corrections.data_ptr(), beta1, beta2, 1 - beta1, 1 - beta2, eps,
        weight_decay, bias_correction, torch.get_num_threads(), finished.data_ptr(),
    )


@contextlib.contextmanager
def calls_only() -> Iterator[None]:
    """Within it, the kernels' step entry points take their arguments and do
    nothing (a C function that returns at once): steps do all their host work,
    check, plan and call, and change no tensor. For benchmarks: what the Python
    around the kernels costs."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"lamb16: no CPU kernels to stand in for ({_unavailable})")
    saved = {name: getattr(lib, name) for name in STEP_KERNELS}
    try:
        for name in STEP_KERNELS:
            stand_in = lib["nothing"]  # a new function object each time, typed as the step it stands in for
            stand_in.argtypes, stand_in.restype = SIGNATURES[name], None
            setattr(lib, name, stand_in)
        yield
    finally:
        for name, kernel in saved.items():
            setattr(lib, name, kernel)


def traffic(pattern: str, tensors: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> None:
    """The reads and writes alone of a step of the given design over (param,
    grad, exp_avg, exp_avg_sq) tensors, with the arithmetic left out: "adam"
    (one pass), "lamb" or "lamb16-absmax" (the kernels' two passes),
    "lamb16" (block scales' first pass, which also writes the codes and an
    update of 4 bytes an element, then the writes that read it back; for a
    tensor over 2**22 elements, as "lamb16-absmax"; grids left out, 8 /
    block_size bytes an element), "lamb16-1pass" (the second pass alone: block
    scales need nothing before it) or "lamb16-absmax-1pass" (the gradient
    alone, for its absmax, then the second pass). For benchmarks: what memory alone costs such a step.
    It leaves the gradients as they were and overwrites the rest with
    meaningless bits."""
    if pattern not in TRAFFIC_PATTERNS:
        raise ValueError(f"Invalid traffic pattern: {pattern!r}; use one of {', '.join(TRAFFIC_PATTERNS)}")
    code, moment_dtype = TRAFFIC_PATTERNS[pattern]
    table = array.array("q")
    for param, grad, exp_avg, exp_avg_sq in tensors:
        if not (param.dtype == grad.dtype == torch.float32 and exp_avg.dtype == exp_avg_sq.dtype == moment_dtype
                and param.is_cpu and same_dense_layout((param, grad, exp_avg, exp_avg_sq))):
            raise ValueError(f"Invalid tensors for {pattern} traffic: float32 param and grad, {moment_dtype} "
                             "moments, all on the CPU in one dense layout")
        table.extend(addresses(param, grad, exp_avg, exp_avg_sq) + [param.numel()])
    lib = library()
    if lib is None:
        raise RuntimeError(f"lamb16: no CPU kernels to run the traffic on ({_unavailable})")
    lib.traffic(table.buffer_info()[0], 5, len(tensors), code, torch.get_num_threads())

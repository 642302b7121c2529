"""Benchmarks (`python cli.py bench`): optimizer step times as ratios inside one
run, state bytes, where a training step's time goes, and the training loop's
throughput against a torchvision DataLoader. Everything timed takes turns in
one process, so that a slow moment of a shared machine hits all alike; every
figure is a median."""

import contextlib
import ctypes
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

import lamb16
import lamb16.compiled
import lamb16.dispatch
import lamb16.triton_kernels
from lamb16 import state_nbytes
from models import MnistCNN

from . import registry
from .errors import UserError
from .data import MNIST_MEAN, MNIST_STD, Split
from .loop import cpu_flush_denormal, make_model, train_step
from .parallel import SINGLE, Parallel, barrier, shard_rows

# What `bench` can time: a registry optimizer with implementation options.
IMPLEMENTATIONS: dict[str, tuple[str, dict]] = {
    "adam fused": ("adam", dict(fused=True)),
    "adam foreach": ("adam", dict(foreach=True)),
    "lamb": ("lamb", {}),
    "lamb16": ("lamb16", {}),
    "lamb16 1pass": ("lamb16-1pass", {}),
    "lamb16 absmax": ("lamb16-absmax", {}),
    "lamb16 absmax 1pass": ("lamb16-absmax-1pass", {}),
    "lamb16 eager": ("lamb16", dict(fused=False)),
}
DEFAULT_BENCH = tuple(IMPLEMENTATIONS)
# The compiled path (torch.compile of the reference: the fallback where no
# kernels serve), timed with the CPU and Triton kernels set aside: one call per
# parameter group, or one per tensor as before. On 150 small tensors the
# step's time is almost all host time.
COMPILED: dict[str, tuple[str, bool]] = {
    "lamb16 compiled": ("lamb16", False),
    "lamb16 compiled per tensor": ("lamb16", True),
    "lamb16 1pass compiled": ("lamb16-1pass", False),
    "lamb16 1pass compiled per tensor": ("lamb16-1pass", True),
    "lamb16 absmax compiled": ("lamb16-absmax", False),
    "lamb16 absmax 1pass compiled": ("lamb16-absmax-1pass", False),
}
SIZES = ("cnn", "10m", "100m", "gpt150", "64m", "1b")
# Bytes per element a step must move at least: parameter read and write, gradient
# read, state read and write (Adam, LAMB: two float32 moments; LAMB16: two fp8).
MIN_BYTES_PER_ELEMENT = {"adam": 4 + 4 + 4 + 16, "lamb": 4 + 4 + 4 + 16, "lamb16": 4 + 4 + 4 + 4,
                         "lamb16-1pass": 4 + 4 + 4 + 4, "lamb16-absmax": 4 + 4 + 4 + 4,
                         "lamb16-absmax-1pass": 4 + 4 + 4 + 4}


def choices() -> list[str]:
    return (list(IMPLEMENTATIONS) + list(COMPILED)
            + [name for name in registry.OPTIMIZERS if name not in IMPLEMENTATIONS])


def check_available(names: list[str]) -> list[str]:
    """Every optimizer to time can be built here (its package installed): checked before anything runs."""
    for name in names:
        registry.check_available(registry_name(name))
    return names


def registry_name(name: str) -> str:
    if name in COMPILED:
        return COMPILED[name][0]
    return IMPLEMENTATIONS.get(name, (name, {}))[0]


def build(name: str, params: list[Tensor]) -> torch.optim.Optimizer:
    options = IMPLEMENTATIONS.get(name, (name, {}))[1]
    registry.check_available(registry_name(name))
    return registry.spec(registry_name(name)).build(params, lr=1e-3, weight_decay=0.01, **options)


def design_of(name: str) -> str:
    """The algorithm a benchmarked optimizer runs, whatever its implementation."""
    return registry_name(name).removesuffix("-seed")


@contextlib.contextmanager
def compiled_path(per_tensor: bool) -> Iterator[None]:
    """Send the step down the compiled path (per group, or per tensor as
    before) instead of the kernels, for the length of one step."""
    saved = (lamb16.native.usable, lamb16.triton_kernels.usable, lamb16.compiled.compiles_on,
             lamb16.dispatch.compile_per_tensor)
    registry.quiet_compile_notices()
    lamb16.native.usable = lamb16.triton_kernels.usable = lambda job, fused: False
    lamb16.compiled.compiles_on = lambda device: True
    lamb16.dispatch.compile_per_tensor = per_tensor
    try:
        yield
    finally:
        (lamb16.native.usable, lamb16.triton_kernels.usable, lamb16.compiled.compiles_on,
         lamb16.dispatch.compile_per_tensor) = saved


def expected_path(name: str, device: torch.device) -> str | None:
    """The path a benchmarked optimizer's label names (None: not one of ours)."""
    registered = registry_name(name)
    if not registered.startswith("lamb"):
        return None
    if name in COMPILED:
        return "compiled"
    if IMPLEMENTATIONS.get(name, (name, {}))[1].get("fused") is False:
        return "reference"
    if device.type == "cpu":
        return "cpu kernels"
    return "triton kernels" if registered.startswith("lamb16") and device.type == "cuda" else "compiled"


def path_taken(step: Callable[[], object]) -> str:
    """The path that most of a step's updates ran."""
    before = dict(lamb16.dispatch.paths)
    step()
    ran = {path: count - before.get(path, 0) for path, count in lamb16.dispatch.paths.items()}
    ran = {path: count for path, count in ran.items() if count}
    return max(ran, key=ran.get) if ran else "none"


@contextlib.contextmanager
def kernel_loops(name: str | None) -> Iterator[None]:
    """The CPU kernels run the named loops (None: as they are) for the length
    of the benchmark, then the ones they ran before."""
    before = lamb16.native.loops()
    if name is not None and not lamb16.native.use_loops(name):
        raise UserError(f"no {name} loops in the CPU kernels built here (they run {before}); choose another --loops")
    try:
        yield
    finally:
        if before != "none":
            lamb16.native.use_loops(before)


def on_kernels(name: str, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's steps run on the CPU kernels (on CPU parameters)."""
    return (name not in COMPILED and isinstance(optimizer, (lamb16.Lamb, lamb16.Lamb16))
            and optimizer.defaults.get("fused") is not False)


def host_time(step: Callable[[], object], steps: int) -> float:
    """Median seconds of a step whose kernel calls do nothing: the host's part."""
    times = []
    with lamb16.native.calls_only():
        step()  # a full step may come first (a new plan); the timed ones take the kept plan
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def stepper(name: str, optimizer: torch.optim.Optimizer) -> Callable[[], object]:
    if name not in COMPILED:
        return optimizer.step

    def step() -> None:
        with compiled_path(per_tensor=COMPILED[name][1]):
            optimizer.step()

    return step


def transformer_shapes(width: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style transformer: realistic sizes and ranks for a step benchmark."""
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def parameter_sets(names: list[str]) -> dict[str, list[tuple[int, ...]]]:
    sets = {
        "cnn": [tuple(p.shape) for p in MnistCNN().parameters()],
        "10m": transformer_shapes(width=512, layers=3, vocab=800),  # 9.9 M
        "100m": transformer_shapes(width=1024, layers=8, vocab=1536),  # 102 M
        "gpt150": transformer_shapes(width=32, layers=12, vocab=64),  # 147 small tensors: host time
        "64m": [(8192, 8192)],  # one large tensor: its step-time memory a parameter is the peak's
        "1b": [(32768, 32768)],  # a GPU's: 4 GB of weights
    }
    return {name: sets[name] for name in names}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc's malloc serves a large block from memory mapped for it alone, given
# back when freed, only below a threshold it raises after each such free: set
# it, and it stays, so every large block a step frees leaves the resident set.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024


@functools.cache
def fixed_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (see above); False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def resident_bytes(field: str) -> int | None:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def transient_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """Memory a step takes beyond what was there before it, at its peak: on
    CUDA from the allocator; on the CPU from the process's resident set
    (Linux: the peak reset, then read after the step); None where it cannot
    be measured."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu" or not fixed_mmap_threshold():
        return None
    before = resident_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from now
    except OSError:
        return None
    step()
    peak = resident_bytes("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def traffic_run(pattern: str, grads: list[Tensor]) -> Callable[[], None]:
    """A step's memory traffic alone (lamb16.native.traffic) on buffers of its
    own, reading the shared gradients as the steps do."""
    moment_dtype = lamb16.native.TRAFFIC_PATTERNS[pattern][1]
    tensors = [
        (torch.zeros_like(g), g, torch.zeros(g.shape, dtype=moment_dtype), torch.zeros(g.shape, dtype=moment_dtype))
        for g in grads
    ]
    return lambda: lamb16.native.traffic(pattern, tensors)


def step_times(
    shapes: list[tuple[int, ...]], optimizers: list[str], device: torch.device, warmup: int, steps: int,
    parallel: Parallel = SINGLE,
) -> list[dict]:
    """Median step time of each optimizer on its own copy of the parameters,
    sharing one set of gradients; on the CPU also the time of the memory
    traffic alone of each design's step. Everything takes turns, one step each
    per round. Across processes the parameters and gradients are sharded as
    FSDP2 shards them (rows split over the ranks), the ranks start each step
    together, and the figures are rank 0's."""
    gen = torch.Generator(device=device).manual_seed(0)  # on the device: a 1 B tensor made on the host takes seconds
    grads = [shard_rows(torch.randn(shape, generator=gen, device=device) * 1e-2, parallel) for shape in shapes]
    runs: dict[str, Callable[[], object]] = {}
    optimizer_runs: dict[str, tuple[list[nn.Parameter], torch.optim.Optimizer]] = {}
    for name in optimizers:
        params = [nn.Parameter(shard_rows(torch.randn(shape, generator=gen, device=device) * 0.05, parallel))
                  for shape in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer_runs[name] = (params, build(name, params))
        runs[name] = stepper(name, optimizer_runs[name][1])
    if device.type == "cpu" and lamb16.native.library() is not None and not parallel.distributed:
        for pattern in dict.fromkeys(design_of(name) for name in optimizers):
            if pattern in lamb16.native.TRAFFIC_PATTERNS:
                runs[f"{pattern} traffic"] = traffic_run(pattern, grads)
    order = list(runs)
    times: dict[str, list[float]] = {name: [] for name in order}
    first_step: dict[str, float] = {}
    for round_ in range(warmup + steps):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            synchronize(device)
            barrier(parallel)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_ == 0:
                first_step[name] = elapsed
            if round_ >= warmup:
                times[name].append(elapsed)
    kernels_here = device.type == "cpu" and lamb16.native.library() is not None and not parallel.distributed
    host = {name: host_time(runs[name], steps) for name in optimizers
            if kernels_here and on_kernels(name, optimizer_runs[name][1])}
    n = sum(math.prod(shape) for shape in shapes)
    rows = []
    for name in optimizers:
        params, optimizer = optimizer_runs.pop(name)
        median = statistics.median(times[name])
        path, expected = path_taken(runs[name]), expected_path(name, device)
        traffic = times.get(f"{design_of(name)} traffic")
        min_bytes = MIN_BYTES_PER_ELEMENT.get(design_of(name))
        named = expected is None or path == expected  # a time is never labelled with a path that did not run
        row = dict(
            optimizer=name,
            path=path if expected is not None else None,
            expected_path=expected,
            parameters=n,
            median_ms=1e3 * median if named else None,
            first_step_s=first_step[name],
            state_bytes_per_parameter=state_nbytes(optimizer) / n,
            min_gb_per_s=min_bytes * n / parallel.world / median / 1e9 if min_bytes and named else None,
            traffic_ms=1e3 * statistics.median(traffic) if traffic else None,
            host_ms=1e3 * host[name] if name in host else None,
        )
        row["ratio_to_traffic"] = row["median_ms"] / row["traffic_ms"] if traffic and named else None
        transient = transient_bytes(runs[name], device)
        row["transient_bytes_per_parameter"] = None if transient is None else transient / (n / parallel.world)
        rows.append(row)
    adam = next((r["median_ms"] for r in rows if r["optimizer"] == "adam fused"), None)
    for row in rows:
        row["ratio_to_adam_fused"] = row["median_ms"] / adam if adam and row["median_ms"] else None
    return rows


def lamb16_model(device: torch.device, channels_last: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make_model(device) if channels_last else MnistCNN().to(device)
    return model, registry.build("lamb16", model.parameters(), lr=0.01, weight_decay=0.01)


def training_step_breakdown(train_data: Split, batch_size: int, batches: int, device: torch.device) -> dict[str, float]:
    """Median seconds per batch spent on data (gather), forward, backward and the optimizer step."""
    model, optimizer = lamb16_model(device)
    order = torch.randperm(len(train_data), device=device)
    phases: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    for batch in range(batches + 3):
        marks = [time.perf_counter()]

        def mark(_phase: str) -> None:
            synchronize(device)
            marks.append(time.perf_counter())

        index = order[batch * batch_size % len(train_data) :][:batch_size]
        images, labels = train_data.images[index], train_data.labels[index]
        mark("data")
        train_step(model, optimizer, images, labels, mark)
        if batch >= 3:  # after warm-up
            for phase, begin, end in zip(phases, marks, marks[1:]):
                phases[phase].append(end - begin)
    return {phase: statistics.median(values) for phase, values in phases.items()}


def throughput_tensor_loop(train_data: Split, batch_size: int, batches: int, device: torch.device) -> float:
    """Samples per second of `train`'s loop: batches sliced from a tensor held on the device."""
    model, optimizer = lamb16_model(device)
    order = torch.randperm(len(train_data), device=device)
    start, seen = 0.0, 0
    for batch in range(batches + 3):
        if batch == 3:
            synchronize(device)
            start, seen = time.perf_counter(), 0
        index = order[batch * batch_size % len(train_data) :][:batch_size]
        train_step(model, optimizer, train_data.images[index], train_data.labels[index])
        seen += len(index)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def throughput_dataloader(data_dir: Path, batch_size: int, batches: int, workers: int, device: torch.device) -> float:
    """Samples per second of the common pipeline it replaces: a DataLoader over
    torchvision's MNIST with ToTensor and Normalize, the model as defined (NCHW),
    the same optimizer and batch size."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    dataset = datasets.MNIST(str(data_dir), train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    model, optimizer = lamb16_model(device, channels_last=False)
    start, seen, batch = 0.0, 0, 0
    while batch < batches + 3:
        for images, labels in loader:
            if batch == 3:
                synchronize(device)
                start, seen = time.perf_counter(), 0
            train_step(model, optimizer, images.to(device), labels.to(device))
            seen += len(labels)
            batch += 1
            if batch == batches + 3:
                break
    synchronize(device)
    return seen / (time.perf_counter() - start)


def run(
    sizes: list[str], optimizers: list[str], steps: int, warmup: int, batches: int, train_data: Split | None,
    data_dir: Path, device: torch.device, echo: Callable[[str], None], parallel: Parallel = SINGLE,
    save: Callable[[dict], None] = lambda report: None,
) -> dict:
    """The whole benchmark, printed as markdown tables through `echo`, its
    figures given to `save` as each set is measured; returns them. Across
    processes, or without `train_data`, the optimizer steps alone (across
    processes on sharded parameters)."""
    if not parallel.is_main:
        echo = lambda line: None  # noqa: E731
    report: dict = dict(device=str(device), threads=torch.get_num_threads(), torch_version=torch.__version__, steps={},
                        processes=parallel.world)
    where = f"{device} ({torch.get_num_threads()} threads)"
    if parallel.distributed:
        where += f", parameters sharded over {parallel.world} processes as FSDP2 shards them (rank 0's times)"
    if device.type == "cpu":
        report["cpu_loops"] = lamb16.native.loops()
        where += f", Lamb16 and Lamb on the {report['cpu_loops']} kernel loops"
    echo(f"optimizer step, median of {steps} after {warmup} warm-up steps, on {where}")
    header = (
        "| parameters | optimizer | step ms | x Adam fused | traffic ms | x traffic | state bytes/param "
        "| GB/s (minimum traffic) | first step s | host ms | step-time B/param |"
    )
    echo(header)
    echo("|" + "---|" * (header.count("|") - 1))
    for set_name, shapes in parameter_sets(sizes).items():
        n = sum(math.prod(shape) for shape in shapes)
        # The eager reference shows what fusing buys; on the CPU past 20 M elements it only costs time.
        chosen = [o for o in optimizers if not (o.endswith("eager") and n > 20_000_000 and device.type == "cpu")]
        rows = step_times(shapes, chosen, device, warmup, steps, parallel)
        report["steps"][set_name] = rows
        for r in rows:
            if r["median_ms"] is None:
                echo(f"| {set_name} ({n / 1e6:.2f} M) | {r['optimizer']} | not timed: its steps ran the "
                     f"{r['path']} path, not the {r['expected_path']} its name says |")
                continue
            traffic = f"{r['traffic_ms']:.2f} | {r['ratio_to_traffic']:.2f}" if r["ratio_to_traffic"] else "- | -"
            ratio = "-" if r["ratio_to_adam_fused"] is None else f"{r['ratio_to_adam_fused']:.2f}"
            rate = "-" if r["min_gb_per_s"] is None else f"{r['min_gb_per_s']:.1f}"
            host = "-" if r["host_ms"] is None else f"{r['host_ms']:.3f}"
            transient = r["transient_bytes_per_parameter"]
            echo(
                f"| {set_name} ({n / 1e6:.2f} M) | {r['optimizer']} | {r['median_ms']:.2f} | {ratio} | {traffic} | "
                f"{r['state_bytes_per_parameter']:.3f} | {rate} | {r['first_step_s']:.1f} | {host} | "
                f"{'-' if transient is None else f'{transient:.2f}'} |"
            )
        save(report)
    if parallel.distributed or train_data is None:
        return report

    with cpu_flush_denormal(device):
        breakdown = training_step_breakdown(train_data, 128, batches, device)
        tensor_rate = throughput_tensor_loop(train_data, 1024, batches, device)
    total = sum(breakdown.values())
    report["breakdown_batch_128"] = breakdown
    echo(f"\ntraining step of the MNIST CNN with LAMB16, batch 128: {1e3 * total:.1f} ms (medians per phase)")
    echo("| phase | ms | share |\n|---|---|---|")
    for phase, seconds in breakdown.items():
        echo(f"| {phase} | {1e3 * seconds:.2f} | {100 * seconds / total:.1f}% |")

    loader_rates = {w: throughput_dataloader(data_dir, 1024, batches, w, device) for w in (0, 2)}
    report["throughput_batch_1024"] = dict(tensor_loop=tensor_rate, **{f"dataloader_{w}_workers": r for w, r in loader_rates.items()})
    echo("\ntraining throughput, batch 1024, LAMB16")
    echo("| pipeline | samples/s | x DataLoader (2 workers) |\n|---|---|---|")
    echo(f"| train's loop (tensor on device) | {tensor_rate:.0f} | {tensor_rate / loader_rates[2]:.2f} |")
    for workers, rate in loader_rates.items():
        echo(f"| DataLoader, ToTensor + Normalize, {workers} workers | {rate:.0f} | {rate / loader_rates[2]:.2f} |")
    return report

"""LAMB16 experiments: train the MNIST CNN with Adam, LAMB or LAMB16, compare them, plot, reproduce.

    python cli.py train --optimizer lamb16 --batch-size 1024 --lr 0.02
    python cli.py compare --epochs 1 --batch-size 1024 --lr 0.02
    python cli.py reproduce

Each run writes a directory with config.json, metrics.jsonl and summary.json.
"""

import contextlib
import json
import math
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import lamb16
from lamb16 import Lamb, Lamb16, state_nbytes
from lamb16.lamb16 import new_moments
from lamb16.quantize import E4M3, E5M2, E4M3_MAX, SEED_M_CLAMP, dequantize, store_absmax, store_seed
from models import MnistCNN
from plots import comparison_figure, figure_title, load_run

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# What `compare` and `reproduce` can run: an optimizer, and for LAMB16 its scaling.
VARIANTS = {
    "adam": ("adam", "absmax"),
    "lamb": ("lamb", "absmax"),
    "lamb16": ("lamb16", "absmax"),
    "lamb16-seed": ("lamb16", "seed"),
}
# The two figures of the original README: name, batch size, learning rate.
SEED_FIGURES = (("B1024L002", 1024, 0.02), ("B128L001", 128, 0.01))
SEED_CLAIMS = {"B1024L002": "99.2% in 10 epochs", "B128L001": "99.3% in 5 epochs"}


class UserError(click.ClickException):
    """A mistake the user can fix: printed as one line, exit status 1."""


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run (written to config.json)."""

    optimizer: str = "lamb16"
    batch_size: int = 64
    test_batch_size: int = 1000
    epochs: int = 10
    lr: float = 0.0025
    wd: float = 0.01
    seed: int = 1
    log_interval: int = 10
    scaling: str = "absmax"
    trust_scale: float = 0.382

    @property
    def variant(self) -> str:
        return f"{self.optimizer}-seed" if self.optimizer == "lamb16" and self.scaling == "seed" else self.optimizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    return torch.device(name)


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """A whole MNIST split, normalized, on the training device."""

    images: Tensor  # (N, 1, 28, 28) float32
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def load_mnist(data_dir: Path, train: bool, download: bool, device: torch.device) -> Split:
    """MNIST through torchvision (its download and its IDX parser), held as one tensor."""
    from torchvision.datasets import MNIST  # only the experiment side needs torchvision

    raw = data_dir / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing and not download:
        raise UserError(
            f"MNIST not found: {raw} lacks {', '.join(missing)}; point --data-dir (or LAMB16_DATA_DIR) "
            "at the folder that holds MNIST/raw, or pass --download"
        )
    try:
        dataset = MNIST(str(data_dir), train=train, download=download)
    except (AssertionError, RuntimeError, ValueError, KeyError, IndexError) as error:
        split = "train" if train else "t10k"
        raise UserError(
            f"cannot read the MNIST {split} files in {raw} (corrupt or truncated: {error or type(error).__name__}); "
            "delete them and run again with --download, or copy intact files there"
        ) from error
    except OSError as error:  # the download itself failed
        raise UserError(f"cannot download MNIST into {data_dir}: {error}; copy the files into {raw} instead") from error

    images, labels = dataset.data, dataset.targets
    if images.dim() != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(
            f"the MNIST files in {raw} do not fit together (images {tuple(images.shape)}, labels {tuple(labels.shape)}); "
            "replace them with intact copies"
        )
    normalized = (images.to(device=device, dtype=torch.float32) / 255 - MNIST_MEAN) / MNIST_STD
    return Split(images=normalized.unsqueeze(1), labels=labels.to(device=device, dtype=torch.int64))


# ---------------------------------------------------------------- training


def make_model(device: torch.device) -> nn.Module:
    """The CNN, laid out for speed: on the CPU, channels-last weights let oneDNN
    run the convolutions about 1.5x faster at batch 1024 (`cli.py bench`)."""
    model = MnistCNN().to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


@contextlib.contextmanager
def cpu_flush_denormal(device: torch.device):
    """Flush subnormal floats to zero while training on the CPU: Adam at lr 0.01
    drives ~10^5 weights below 1e-38, where x86 arithmetic runs about 3x slower.
    Values that small do not change a result; the setting is restored after."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield enabled
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.wd)
    if config.optimizer == "lamb":
        return Lamb(params, lr=config.lr, weight_decay=config.wd)
    if config.optimizer == "lamb16":
        return Lamb16(
            params, lr=config.lr, weight_decay=config.wd, trust_scale=config.trust_scale, scaling=config.scaling
        )
    raise UserError(f"unknown optimizer {config.optimizer!r}; choose one of adam, lamb, lamb16")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int) -> tuple[float, float]:
    """Mean NLL loss and accuracy over a split, in batches."""
    model.eval()
    total_loss = torch.zeros((), device=split.images.device)
    correct = torch.zeros((), device=split.images.device, dtype=torch.int64)
    for start in range(0, len(split), batch_size):
        images, labels = split.images[start : start + batch_size], split.labels[start : start + batch_size]
        output = model(images)
        total_loss += F.nll_loss(output, labels, reduction="sum")
        correct += (output.argmax(dim=1) == labels).sum()
    model.train()
    return total_loss.item() / len(split), correct.item() / len(split)


class MetricsLog:
    """metrics.jsonl: one JSON object a line, flushed as written so a crash keeps the log."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def trust_ratios(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-layer trust ratios of the last step (LAMB and LAMB16 keep them in their state)."""
    ratios = {}
    for name, param in model.named_parameters():
        value = optimizer.state.get(param, {}).get("trust_ratio")
        if value is not None:
            ratios[name] = round(float(value), 6)
    return ratios


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Split,
    config: RunConfig,
    order: Tensor,
    samples_before: int,
    log: MetricsLog,
    epoch: int,
    progress: bool,
) -> tuple[int, bool]:
    """One pass over `data` in the order `order`; returns (samples seen, diverged)."""
    n_batches = math.ceil(len(data) / config.batch_size)
    samples = samples_before
    running, batches_in_interval = torch.zeros((), device=data.images.device), 0
    bar = tqdm(range(n_batches), desc=f"{config.variant} epoch {epoch}", leave=False, disable=not progress, unit="batch")
    for batch in bar:
        index = order[batch * config.batch_size : (batch + 1) * config.batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(data.images[index]), data.labels[index])
        loss.backward()
        optimizer.step()
        samples += len(index)
        running += loss.detach()
        batches_in_interval += 1
        if batches_in_interval == config.log_interval or batch == n_batches - 1:
            mean_loss = running.item() / batches_in_interval  # one sync per interval
            if not math.isfinite(mean_loss):
                log.write(kind="diverged", epoch=epoch, samples=samples, loss=str(mean_loss))
                bar.close()
                return samples, True
            record = dict(kind="train", epoch=epoch, samples=samples, loss=mean_loss)
            ratios = trust_ratios(model, optimizer)
            if ratios:
                record["trust_ratio"] = ratios
            log.write(**record)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            running.zero_()
            batches_in_interval = 0
    bar.close()
    return samples, False


def run_metadata(config: RunConfig, device: torch.device) -> dict:
    return dict(
        asdict(config),
        variant=config.variant,
        device=str(device),
        cpu_flush_denormal=device.type == "cpu",
        channels_last=device.type == "cpu",
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        lamb16_version=lamb16.__version__,
        python_version=platform.python_version(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
    )


def train_run(
    config: RunConfig,
    run_dir: Path,
    train_data: Split,
    test_data: Split,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
) -> dict:
    """Train one model from scratch, logging into `run_dir`; returns the summary."""
    device = train_data.images.device
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "config.json").write_text(json.dumps(run_metadata(config, device), indent=2) + "\n")

    torch.manual_seed(config.seed)  # the same initial weights for every optimizer
    model = make_model(device)
    optimizer = make_optimizer(config, model.parameters())
    order_generator = torch.Generator().manual_seed(config.seed)  # the same data order too
    log = MetricsLog(run_dir / "metrics.jsonl")
    samples, diverged, epoch_times, tests = 0, False, [], []
    started = time.perf_counter()
    with cpu_flush_denormal(device), contextlib.closing(log):
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            order = torch.randperm(len(train_data), generator=order_generator).to(device)
            samples, diverged = train_epoch(
                model, optimizer, train_data, config, order, samples, log, epoch, progress
            )
            if diverged:
                echo(f"{config.variant:11s} epoch {epoch:2d}/{config.epochs}  diverged (loss is not finite)")
                break
            epoch_time = time.perf_counter() - epoch_start
            test_loss, accuracy = evaluate(model, test_data, config.test_batch_size)
            epoch_times.append(epoch_time)
            tests.append((accuracy, test_loss, epoch))
            log.write(
                kind="test",
                epoch=epoch,
                samples=samples,
                test_loss=test_loss,
                test_accuracy=accuracy,
                epoch_time=epoch_time,
                wall_time=time.perf_counter() - started,
            )
            echo(
                f"{config.variant:11s} epoch {epoch:2d}/{config.epochs}  test loss {test_loss:.4f}  "
                f"accuracy {100 * accuracy:.2f}%  {epoch_time:.1f}s"
            )

    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = state_nbytes(optimizer)
    best = max(tests, default=None)
    summary = dict(
        variant=config.variant,
        status="diverged" if diverged else "completed",
        epochs_completed=len(tests),
        final_test_accuracy=tests[-1][0] if tests else None,
        final_test_loss=tests[-1][1] if tests else None,
        best_test_accuracy=best[0] if best else None,
        best_epoch=best[2] if best else None,
        train_seconds=time.perf_counter() - started,
        median_epoch_seconds=statistics.median(epoch_times) if epoch_times else None,
        parameters=n_params,
        state_bytes=state_bytes,
        state_bytes_per_parameter=state_bytes / n_params,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- run directories


def writable_dir(path: Path) -> Path:
    """Create `path` if needed and prove it is writable, or fail with one clear line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to --out {path}: {error.strerror or error}; choose a writable folder") from error
    return path


def fresh_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... if taken: never overwrite an earlier run."""
    candidate, suffix = parent / name, 2
    while candidate.exists():
        candidate, suffix = parent / f"{name}-{suffix}", suffix + 1
    return candidate


def setting_name(config: RunConfig) -> str:
    return f"b{config.batch_size}_lr{config.lr:g}_wd{config.wd:g}_seed{config.seed}"


def compare_runs(
    base: RunConfig,
    variants: list[str],
    out_dir: Path,
    train_data: Split,
    test_data: Split,
    progress: bool = True,
) -> tuple[dict[str, dict], Path]:
    """Train each variant with the same settings, seed and data order into
    out_dir/<variant>, then draw out_dir/figure.png. A diverged run is kept
    and the comparison goes on."""
    summaries = {}
    for variant in variants:
        optimizer, scaling = VARIANTS[variant]
        config = replace(base, optimizer=optimizer, scaling=scaling)
        summaries[variant] = train_run(config, out_dir / variant, train_data, test_data, progress)
    figure = comparison_figure(
        [load_run(out_dir / v) for v in variants], out_dir / "figure.png", figure_title(asdict(base))
    )
    return summaries, figure


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def summary_table(summaries: dict[str, dict]) -> str:
    lines = ["| optimizer | status | final accuracy | best accuracy (epoch) | s/epoch | state bytes/param |", "|---|---|---|---|---|---|"]
    for variant, s in summaries.items():
        epoch_s = "-" if s["median_epoch_seconds"] is None else f"{s['median_epoch_seconds']:.1f}"
        lines.append(
            f"| {variant} | {s['status']} | {format_percent(s['final_test_accuracy'])} | "
            f"{format_percent(s['best_test_accuracy'])} ({s['best_epoch'] or '-'}) | {epoch_s} | "
            f"{s['state_bytes_per_parameter']:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- moment quantization


def moment_quantization_table(
    train_data: Split, steps: int, batch_size: int, lr: float, seed: int, layers: tuple[str, ...]
) -> list[dict]:
    """How well each scaling keeps the moments of real MNIST CNN gradients.

    A float32 LAMB trains the CNN; its gradients also feed float32 moments and,
    per scaling, a chain of fp8-stored moments updated exactly as Lamb16 does.
    Every 10 steps, the float32 moments are stored once in fp8 (`store_*`: the
    format's resolution under that scaling, with the fractions that saturate or
    flush to zero); at the end the fp8 chain is compared with them (`drift_*`:
    rounding errors accumulated through the moving averages).
    """
    torch.manual_seed(seed)
    model = MnistCNN().to(train_data.images.device)
    optimizer = Lamb(model.parameters(), lr=lr)
    beta1, beta2 = optimizer.defaults["betas"]
    eps = optimizer.defaults["eps"]
    params = dict(model.named_parameters())
    scalings = {"seed": lambda m, v, a, b: store_seed(m, v, a, b, eps), "absmax": store_absmax}
    moments = {name: (torch.zeros_like(params[name]), torch.zeros_like(params[name])) for name in layers}
    chains = {
        (s, name): [torch.zeros_like(params[name], dtype=E4M3), torch.zeros_like(params[name], dtype=E5M2), torch.ones(()), torch.ones(())]
        for s in scalings
        for name in layers
    }
    checks: dict[tuple[str, str], list[dict]] = {key: [] for key in chains}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_data), generator=generator).to(train_data.images.device)

    def relative_error(approx: Tensor, exact: Tensor) -> float:
        return float((approx - exact).norm() / exact.norm())

    for step in range(1, steps + 1):
        index = order[(step - 1) * batch_size % len(train_data) :][:batch_size]
        optimizer.zero_grad()
        F.nll_loss(model(train_data.images[index]), train_data.labels[index]).backward()
        optimizer.step()
        for name in layers:
            grad = params[name].grad
            m, v = moments[name]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            for scaling, store in scalings.items():
                chain = chains[(scaling, name)]
                chain_m, chain_v = new_moments(grad, *chain, beta1, beta2)
                chain[2], chain[3] = store(chain_m, chain_v, chain[0], chain[1])
                if step % 10 == 0:
                    m8, v8 = torch.empty_like(m, dtype=E4M3), torch.empty_like(v, dtype=E5M2)
                    m_scale, v_scale = store(m, v, m8, v8)
                    # beyond the bound, not the largest element landing on it
                    limit = (SEED_M_CLAMP if scaling == "seed" else E4M3_MAX) * (1 + 1e-6)
                    checks[(scaling, name)].append(
                        dict(
                            store_m=relative_error(dequantize(m8, m_scale), m),
                            store_v=relative_error(dequantize(v8, v_scale), v),
                            saturated_m=float(((m / m_scale).abs() > limit).float().mean()),
                            flushed_m=float(((m8.float() == 0) & (m != 0)).float().mean()),
                            flushed_v=float(((v8.float() == 0) & (v != 0)).float().mean()),
                        )
                    )
    rows = []
    for (scaling, name), found in checks.items():
        chain = chains[(scaling, name)]
        m, v = moments[name]
        row = dict(layer=name, elements=params[name].numel(), scaling=scaling)
        row.update({key: statistics.median(c[key] for c in found) for key in found[0]})
        row["drift_m"] = relative_error(dequantize(chain[0], chain[2]), m)
        row["drift_v"] = relative_error(dequantize(chain[1], chain[3]), v)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["elements"], r["scaling"] != "seed"))


# ---------------------------------------------------------------- benchmarks


def transformer_shapes(width: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style transformer: realistic sizes and ranks for a step benchmark."""
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def bench_parameter_sets(names: list[str]) -> dict[str, list[tuple[int, ...]]]:
    sets = {
        "cnn": [tuple(p.shape) for p in MnistCNN().parameters()],
        "10m": transformer_shapes(width=512, layers=3, vocab=800),  # 9.9 M
        "100m": transformer_shapes(width=1024, layers=8, vocab=1536),  # 102 M
    }
    return {name: sets[name] for name in names}


BENCH_OPTIMIZERS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "adam foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "lamb": lambda ps: Lamb(ps, lr=1e-3, weight_decay=0.01),
    "lamb16": lambda ps: Lamb16(ps, lr=1e-3, weight_decay=0.01),
    "lamb16 eager": lambda ps: Lamb16(ps, lr=1e-3, weight_decay=0.01, fused=False),
}
# Bytes per element a step must move at least: parameter read and write, gradient
# read, state read and write (Adam, LAMB: two float32 moments; LAMB16: two fp8).
MIN_BYTES_PER_ELEMENT = {"adam": 4 + 4 + 4 + 16, "lamb": 4 + 4 + 4 + 16, "lamb16": 4 + 4 + 4 + 4}


def design_of(optimizer: str) -> str:
    """The algorithm a benchmarked optimizer runs ("adam", "lamb", "lamb16"), whatever its implementation."""
    return optimizer.split()[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def traffic_run(pattern: str, grads: list[Tensor]) -> Callable[[], None]:
    """A step's memory traffic alone (lamb16.native.traffic) on buffers of its
    own, reading the shared gradients as the steps do."""
    moment_dtype = lamb16.native.TRAFFIC_PATTERNS[pattern][1]
    tensors = [
        (torch.zeros_like(g), g, torch.zeros(g.shape, dtype=moment_dtype), torch.zeros(g.shape, dtype=moment_dtype))
        for g in grads
    ]
    return lambda: lamb16.native.traffic(pattern, tensors)


def bench_step_times(
    shapes: list[tuple[int, ...]], optimizers: list[str], device: torch.device, warmup: int, steps: int
) -> list[dict]:
    """Median step time of each optimizer on its own copy of the parameters,
    sharing one set of gradients; on the CPU also the time of the memory
    traffic alone of each design's step (its "floor"). Everything takes turns,
    one step each per round, so that a slow moment of a shared machine hits all alike."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen).to(device) * 1e-2 for shape in shapes]
    runs: dict[str, Callable[[], object]] = {}
    optimizer_runs: dict[str, tuple[list[nn.Parameter], torch.optim.Optimizer]] = {}
    for name in optimizers:
        params = [nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.05) for shape in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer_runs[name] = (params, BENCH_OPTIMIZERS[name](params))
        runs[name] = optimizer_runs[name][1].step
    if device.type == "cpu" and lamb16.native.library() is not None:
        for pattern in dict.fromkeys(design_of(name) for name in optimizers):
            runs[f"{pattern} traffic"] = traffic_run(pattern, grads)
    order = list(runs)
    times: dict[str, list[float]] = {name: [] for name in order}
    first_step: dict[str, float] = {}
    for round_ in range(warmup + steps):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_ == 0:
                first_step[name] = elapsed
            if round_ >= warmup:
                times[name].append(elapsed)
    n = sum(math.prod(shape) for shape in shapes)
    rows = []
    for name in optimizers:
        params, optimizer = optimizer_runs.pop(name)
        runs.pop(name)
        median = statistics.median(times[name])
        traffic = times.get(f"{design_of(name)} traffic")
        row = dict(
            optimizer=name,
            parameters=n,
            median_ms=1e3 * median,
            first_step_s=first_step[name],
            state_bytes_per_parameter=state_nbytes(optimizer) / n,
            min_gb_per_s=MIN_BYTES_PER_ELEMENT[design_of(name)] * n / median / 1e9,
            traffic_ms=1e3 * statistics.median(traffic) if traffic else None,
        )
        row["ratio_to_traffic"] = row["median_ms"] / row["traffic_ms"] if traffic else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            optimizer.step()
            synchronize(device)
            row["peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            row["largest_tensor_mb"] = max(p.numel() for p in params) * 4 / 2**20
        rows.append(row)
    adam = next((r["median_ms"] for r in rows if r["optimizer"] == "adam fused"), None)
    for row in rows:
        row["ratio_to_adam_fused"] = row["median_ms"] / adam if adam else None
    return rows


def training_step_breakdown(train_data: Split, batch_size: int, batches: int, device: torch.device) -> dict[str, float]:
    """Median seconds per batch spent on data (gather), forward, backward and the optimizer step."""
    torch.manual_seed(0)
    model = make_model(device)
    optimizer = Lamb16(model.parameters(), lr=0.01, weight_decay=0.01)
    order = torch.randperm(len(train_data), device=device)
    phases: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    for batch in range(batches + 3):
        marks = [time.perf_counter()]
        index = order[batch * batch_size % len(train_data) :][:batch_size]
        images, labels = train_data.images[index], train_data.labels[index]
        synchronize(device)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(images), labels)
        synchronize(device)
        marks.append(time.perf_counter())
        loss.backward()
        synchronize(device)
        marks.append(time.perf_counter())
        optimizer.step()
        synchronize(device)
        marks.append(time.perf_counter())
        if batch >= 3:  # after warm-up (and compilation)
            for phase, begin, end in zip(phases, marks, marks[1:]):
                phases[phase].append(end - begin)
    return {phase: statistics.median(values) for phase, values in phases.items()}


def throughput_tensor_loop(train_data: Split, batch_size: int, batches: int, device: torch.device) -> float:
    """Samples per second of `train`'s loop: batches sliced from a tensor held on the device."""
    torch.manual_seed(0)
    model = make_model(device)
    optimizer = Lamb16(model.parameters(), lr=0.01, weight_decay=0.01)
    order = torch.randperm(len(train_data), device=device)
    start, seen = 0.0, 0
    for batch in range(batches + 3):
        if batch == 3:
            synchronize(device)
            start, seen = time.perf_counter(), 0
        index = order[batch * batch_size % len(train_data) :][:batch_size]
        optimizer.zero_grad(set_to_none=True)
        F.nll_loss(model(train_data.images[index]), train_data.labels[index]).backward()
        optimizer.step()
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
    torch.manual_seed(0)
    model = MnistCNN().to(device)
    optimizer = Lamb16(model.parameters(), lr=0.01, weight_decay=0.01)
    start, seen, batch = 0.0, 0, 0
    while batch < batches + 3:
        for images, labels in loader:
            if batch == 3:
                synchronize(device)
                start, seen = time.perf_counter(), 0
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.nll_loss(model(images), labels).backward()
            optimizer.step()
            seen += len(labels)
            batch += 1
            if batch == batches + 3:
                break
    synchronize(device)
    return seen / (time.perf_counter() - start)


# ---------------------------------------------------------------- commands

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="./data",
    envvar="LAMB16_DATA_DIR",
    show_default=True,
    show_envvar=True,
    help="Folder holding MNIST/raw (torchvision's layout).",
)
download_option = click.option(
    "--download/--no-download", default=True, show_default=True, help="Download MNIST if it is missing."
)
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where to train."
)
progress_option = click.option("--progress/--no-progress", default=True, show_default=True, help="Show tqdm bars.")


def hyperparameter_options(command):
    """The flags of the original script, with its names and defaults."""
    options = [
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Training batch size."),
        click.option("--test-batch-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Evaluation batch size."),
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Passes over the training set."),
        click.option("--lr", type=click.FloatRange(min=0), default=0.0025, show_default=True, help="Learning rate."),
        click.option("--wd", type=click.FloatRange(min=0), default=0.01, show_default=True, help="Weight decay."),
        click.option("--seed", type=int, default=1, show_default=True, help="Seed of the initial weights and data order."),
        click.option("--log-interval", type=click.IntRange(min=1), default=10, show_default=True, help="Batches between train-loss records."),
        click.option("--scaling", type=click.Choice(["absmax", "seed"]), default="absmax", show_default=True, help="LAMB16 fp8 scaling (seed: the proof-of-concept's)."),
        click.option("--trust-scale", type=click.FloatRange(min=0), default=0.382, show_default=True, help="LAMB16 trust-ratio exponent."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def experiment_options(out_help: str):
    """The options of a training command: the original script's flags, data, device, --out, progress."""

    def decorate(command):
        command = progress_option(command)
        command = click.option(
            "--out", type=click.Path(file_okay=False, path_type=Path), default="runs", show_default=True, help=out_help
        )(command)
        for option in (device_option, download_option, data_dir_option, hyperparameter_options):
            command = option(command)
        return command

    return decorate


def load_data(data_dir: Path, download: bool, device: str) -> tuple[Split, Split]:
    torch_device = resolve_device(device)
    return (load_mnist(data_dir, True, download, torch_device), load_mnist(data_dir, False, download, torch_device))


@click.group(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100))
def cli() -> None:
    """Train and compare Adam, LAMB and LAMB16 on MNIST (a 2-layer CNN)."""


@cli.command()
@click.option("--optimizer", type=click.Choice(["adam", "lamb", "lamb16"]), default="lamb16", show_default=True, help="Optimizer to train with.")
@experiment_options(out_help="Folder the run directory goes in.")
def train(optimizer, batch_size, test_batch_size, epochs, lr, wd, seed, log_interval, scaling, trust_scale, data_dir, download, device, out, progress):
    """Train the CNN with one optimizer; writes a run directory under --out.

    \b
    Example:
      python cli.py train --optimizer lamb16 --batch-size 1024 --lr 0.02 --epochs 10
    """
    config = RunConfig(optimizer, batch_size, test_batch_size, epochs, lr, wd, seed, log_interval, scaling, trust_scale)
    out = writable_dir(out)
    train_data, test_data = load_data(data_dir, download, device)
    run_dir = fresh_dir(out, f"{config.variant}_{setting_name(config)}")
    summary = train_run(config, run_dir, train_data, test_data, progress)
    click.echo(summary_table({config.variant: summary}))
    click.echo(f"run written to {run_dir}")


@cli.command()
@click.option("--optimizers", default="adam,lamb,lamb16", show_default=True, help=f"Comma-separated, from: {', '.join(VARIANTS)}.")
@experiment_options(out_help="Folder the comparison goes in.")
def compare(optimizers, batch_size, test_batch_size, epochs, lr, wd, seed, log_interval, scaling, trust_scale, data_dir, download, device, out, progress):
    """Train Adam, LAMB and LAMB16 with the same settings, seed and data order, then draw the figure.

    \b
    Example:
      python cli.py compare --epochs 1 --batch-size 1024 --lr 0.02
    """
    variants = parse_variants(optimizers)
    base = RunConfig("lamb16", batch_size, test_batch_size, epochs, lr, wd, seed, log_interval, scaling, trust_scale)
    out = writable_dir(out)
    train_data, test_data = load_data(data_dir, download, device)
    compare_dir = fresh_dir(out, f"compare_{setting_name(base)}")
    summaries, figure = compare_runs(base, variants, compare_dir, train_data, test_data, progress)
    click.echo(summary_table(summaries))
    click.echo(f"runs written to {compare_dir}, figure {figure}")


def parse_choices(text: str, choices, option: str, what: str) -> list[str]:
    """A comma-separated list, each item one of `choices`, or a usage error naming the bad ones."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        raise click.BadParameter(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(choices)}", param_hint=option
        )
    return items


def parse_variants(text: str) -> list[str]:
    return parse_choices(text, VARIANTS, "--optimizers", "optimizer")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG to write [default: figure.png beside the runs].")
@click.option("--title", default=None, help="Figure title [default: from the first run's settings].")
def plot(run_dirs, output, title):
    """Re-draw a comparison figure from saved runs, without training.

    RUN_DIRS are run directories, or a compare directory holding them.

    \b
    Example:
      python cli.py plot runs/compare_b1024_lr0.02_wd0.01_seed1
    """
    found = []
    for path in run_dirs:
        found += [path] if (path / "config.json").is_file() else sorted(p.parent for p in path.glob("*/config.json"))
    if not found:
        raise UserError(f"no runs in {', '.join(map(str, run_dirs))}: a run directory holds config.json and metrics.jsonl")
    try:
        runs = [load_run(path) for path in found]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise UserError(f"cannot read the runs ({error}); pass directories written by train or compare") from error
    output = output or found[0].parent / "figure.png"  # beside the runs: a compare directory's own
    writable_dir(output.parent)
    comparison_figure(runs, output, title or figure_title(runs[0].config))
    click.echo(f"figure written to {output}")


@cli.command()
@click.option("--optimizers", default=",".join(VARIANTS), show_default=True, help="Comma-separated variants to run.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs per run (the seed figures show 10).")
@data_dir_option
@download_option
@device_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="runs/reproduce", show_default=True, help="Folder for runs, figures and results.md.")
@progress_option
def reproduce(optimizers, epochs, data_dir, download, device, out, progress):
    """Reproduce both figures of the original README: batch 1024 / lr 0.02 and
    batch 128 / lr 0.01, weight decay 0.01, seed 1; writes their PNGs and a
    table of final and best test accuracy next to the seed's claims.

    \b
    Example:
      python cli.py reproduce --out runs/reproduce
    """
    variants = parse_variants(optimizers)
    out = writable_dir(out)
    train_data, test_data = load_data(data_dir, download, device)
    sections = []
    for name, batch_size, lr in SEED_FIGURES:
        base = RunConfig("lamb16", batch_size=batch_size, epochs=epochs, lr=lr, wd=0.01, seed=1)
        compare_dir = fresh_dir(out, name)
        summaries, figure = compare_runs(base, variants, compare_dir, train_data, test_data, progress)
        shutil.copyfile(figure, out / f"{compare_dir.name}.png")
        sections.append(f"### {figure_title(asdict(base))}\n\nSeed README: LAMB16 {SEED_CLAIMS[name]}.\n\n{summary_table(summaries)}\n")
    results = out / "results.md"
    results.write_text("\n".join(sections))
    click.echo(results.read_text())
    click.echo(f"figures and results written to {out}")


@cli.command()
@click.option("--steps", type=click.IntRange(min=10), default=300, show_default=True, help="Training steps of the gradient stream.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0), default=0.01, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@data_dir_option
@download_option
@device_option
def scaling(steps, batch_size, lr, seed, data_dir, download, device):
    """Measure how LAMB16's fp8 scalings keep the moments of real MNIST CNN
    gradients, on the 500-, 25,000- and 400,000-element weight tensors.

    \b
    Example:
      python cli.py scaling --steps 300
    """
    train_data = load_mnist(data_dir, True, download, resolve_device(device))
    rows = moment_quantization_table(train_data, steps, batch_size, lr, seed, ("conv1.weight", "conv2.weight", "fc1.weight"))
    click.echo(f"{steps} steps of LAMB, batch {batch_size}, lr {lr:g}, seed {seed}; relative errors against float32 moments")
    click.echo("| tensor | elements | scaling | store m | store v | drift m | drift v | m saturated | m flushed to 0 | v flushed to 0 |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(
            f"| {r['layer']} | {r['elements']:,} | {r['scaling']} | {r['store_m']:.3f} | {r['store_v']:.3f} | "
            f"{r['drift_m']:.3f} | {r['drift_v']:.3f} | {100 * r['saturated_m']:.1f}% | "
            f"{100 * r['flushed_m']:.2f}% | {100 * r['flushed_v']:.2f}% |"
        )


@cli.command()
@click.option("--sizes", default="cnn,10m", show_default=True, help="Parameter sets, from: cnn, 10m, 100m.")
@click.option("--optimizers", default=",".join(BENCH_OPTIMIZERS), show_default=True, help="Optimizers to time.")
@click.option("--steps", type=click.IntRange(min=3), default=30, show_default=True, help="Timed steps per optimizer.")
@click.option("--warmup", type=click.IntRange(min=1), default=5, show_default=True, help="Untimed steps first (compilation).")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True, help="Timed training batches.")
@data_dir_option
@device_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the figures to this JSON file.")
def bench(sizes, optimizers, steps, warmup, batches, data_dir, device, json_path):
    """Time optimizer steps (medians, optimizers interleaved in one process) and
    state bytes per parameter on the MNIST CNN and on ~10 M / ~100 M parameter
    transformer shapes, with ratios to Adam fused; then where a training step's
    time goes, and the training throughput of `train` against a DataLoader.

    \b
    Example:
      python cli.py bench --sizes cnn,10m --json bench.json
    """
    torch_device = resolve_device(device)
    names = parse_choices(optimizers, BENCH_OPTIMIZERS, "--optimizers", "optimizer")
    set_names = parse_choices(sizes, ("cnn", "10m", "100m"), "--sizes", "size")
    if json_path is not None:
        writable_dir(json_path.parent)
    train_data = load_mnist(data_dir, True, False, torch_device)
    report: dict = dict(device=str(torch_device), threads=torch.get_num_threads(), torch_version=torch.__version__, steps={})
    where = f"{torch_device} ({torch.get_num_threads()} threads)"
    if torch_device.type == "cpu":
        report["cpu_loops"] = lamb16.native.loops()
        where += f", Lamb16 and Lamb on the {report['cpu_loops']} kernel loops"

    click.echo(f"optimizer step, median of {steps} after {warmup} warm-up steps, on {where}")
    header = (
        "| parameters | optimizer | step ms | x Adam fused | traffic ms | x traffic | state bytes/param "
        "| GB/s (minimum traffic) | first step s |"
    )
    if torch_device.type == "cuda":
        header += " peak extra MB | largest tensor MB |"
    click.echo(header)
    click.echo("|" + "---|" * (header.count("|") - 1))
    for set_name, shapes in bench_parameter_sets(set_names).items():
        n = sum(math.prod(shape) for shape in shapes)
        # The eager reference shows what fusing buys; on the CPU past 20 M elements it only costs time.
        chosen = [o for o in names if not (o.endswith("eager") and n > 20_000_000 and torch_device.type == "cpu")]
        rows = bench_step_times(shapes, chosen, torch_device, warmup, steps)
        report["steps"][set_name] = rows
        for r in rows:
            traffic = f"{r['traffic_ms']:.2f} | {r['ratio_to_traffic']:.2f}" if r["traffic_ms"] else "- | -"
            line = (
                f"| {set_name} ({n / 1e6:.2f} M) | {r['optimizer']} | {r['median_ms']:.2f} | "
                f"{r['ratio_to_adam_fused']:.2f} | {traffic} | {r['state_bytes_per_parameter']:.3f} | "
                f"{r['min_gb_per_s']:.1f} | {r['first_step_s']:.1f} |"
            )
            if "peak_extra_mb" in r:
                line += f" {r['peak_extra_mb']:.1f} | {r['largest_tensor_mb']:.1f} |"
            click.echo(line)

    with cpu_flush_denormal(torch_device):
        breakdown = training_step_breakdown(train_data, 128, batches, torch_device)
        tensor_rate = throughput_tensor_loop(train_data, 1024, batches, torch_device)
    total = sum(breakdown.values())
    report["breakdown_batch_128"] = breakdown
    click.echo(f"\ntraining step of the MNIST CNN with LAMB16, batch 128: {1e3 * total:.1f} ms (medians per phase)")
    click.echo("| phase | ms | share |\n|---|---|---|")
    for phase, seconds in breakdown.items():
        click.echo(f"| {phase} | {1e3 * seconds:.2f} | {100 * seconds / total:.1f}% |")

    loader_rates = {w: throughput_dataloader(data_dir, 1024, batches, w, torch_device) for w in (0, 2)}
    report["throughput_batch_1024"] = dict(tensor_loop=tensor_rate, **{f"dataloader_{w}_workers": r for w, r in loader_rates.items()})
    click.echo("\ntraining throughput, batch 1024, LAMB16")
    click.echo("| pipeline | samples/s | x DataLoader (2 workers) |\n|---|---|---|")
    click.echo(f"| train's loop (tensor on device) | {tensor_rate:.0f} | {tensor_rate / loader_rates[2]:.2f} |")
    for workers, rate in loader_rates.items():
        click.echo(f"| DataLoader, ToTensor + Normalize, {workers} workers | {rate:.0f} | {rate / loader_rates[2]:.2f} |")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"\nwritten to {json_path}")


if __name__ == "__main__":
    cli()

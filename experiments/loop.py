"""The one training loop: train the MNIST CNN with one optimizer, log, checkpoint, resume.

`train_run` reads top to bottom: build the model and optimizer from the
seed, restore the last checkpoint if the run has one, then per epoch a seeded
permutation of the training set sliced into batches, a test pass, a record
and a checkpoint. Everything else that trains (the scaling study, the
benchmarks) calls `train_step` and `batch_indices` from here.
"""

import contextlib
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from lamb16 import state_nbytes
from models import MnistCNN

from . import registry
from .config import DIVERGENCE_FACTOR, RunConfig
from .data import Split
from .errors import Interrupted
from .runs import RunDir, finite_or_none, now

Echo = Callable[[str], None]


def make_model(device: torch.device) -> nn.Module:
    """The CNN, laid out for speed: on the CPU, channels-last weights let oneDNN
    run the convolutions about 1.5x faster at batch 1024 (`cli.py bench`)."""
    model = MnistCNN().to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


@contextlib.contextmanager
def cpu_flush_denormal(device: torch.device) -> Iterator[bool]:
    """Flush subnormal floats to zero while training on the CPU: Adam at lr 0.01
    drives ~10^5 weights below 1e-38, where x86 arithmetic runs about 3x slower.
    Values that small do not change a result; the setting is restored after."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield enabled
    finally:
        if enabled:
            torch.set_flush_denormal(False)


class StopRequest:
    """Set by Ctrl-C or SIGTERM (see `stop_on_signals`); the loop checks it
    between batches and ends the run cleanly."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """The first SIGINT or SIGTERM asks the running epoch to stop after its
    current batch; a second one interrupts at once (KeyboardInterrupt). The
    previous handlers come back afterwards."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach the main thread only
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.request()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    return registry.build(config.optimizer, model.parameters(), config.lr, config.wd, trust_scale=config.trust_scale)


def batch_indices(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive batches of a permutation; the last one may be smaller."""
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
    mark: Callable[[str], None] | None = None,
) -> Tensor:
    """One optimizer step on a batch; returns the batch's loss (not synchronized).
    `mark(phase)` is called as forward, backward and optimizer end (for timing)."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.nll_loss(model(images), labels)
    if mark:
        mark("forward")
    loss.backward()
    if mark:
        mark("backward")
    optimizer.step()
    if mark:
        mark("optimizer")
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int) -> tuple[float, float]:
    """Mean NLL loss and accuracy over a split, in batches."""
    model.eval()
    total_loss = torch.zeros((), device=split.images.device)
    correct = torch.zeros((), device=split.images.device, dtype=torch.int64)
    for index in batch_indices(torch.arange(len(split), device=split.images.device), batch_size):
        output = model(split.images[index])
        total_loss += F.nll_loss(output, split.labels[index], reduction="sum")
        correct += (output.argmax(dim=1) == split.labels[index]).sum()
    model.train()
    return total_loss.item() / len(split), correct.item() / len(split)


def trust_ratios(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-layer trust ratios of the last step (LAMB and LAMB16 keep them in their state)."""
    ratios = {}
    for name, param in model.named_parameters():
        value = optimizer.state.get(param, {}).get("trust_ratio")
        if value is not None:
            ratios[name] = round(float(value), 6)
    return ratios


def is_diverged(loss: float, first_loss: float) -> bool:
    """Not finite, or far above where training started."""
    return not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * first_loss


class Progress:
    """The counters a run carries across epochs and checkpoints."""

    def __init__(self) -> None:
        self.epoch = 0  # last finished epoch
        self.samples = 0
        self.first_loss: float | None = None  # the first batch's loss: the yardstick for divergence
        self.tests: list[dict] = []  # per finished epoch
        self.epoch_seconds: list[float] = []
        self.train_seconds = 0.0  # over every session of the run

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: Split, order: Tensor, config: RunConfig,
    progress: Progress, log, label: str, bars: bool | None, stop: StopRequest | None,
) -> tuple[str, float | None]:
    """One pass over `data` in `order`. Returns ("done", mean train loss),
    ("diverged", loss) or ("stopped", None), the last leaving the epoch unfinished."""
    n_batches = math.ceil(len(order) / config.batch_size)
    epoch = progress.epoch + 1
    running, in_interval, epoch_loss, epoch_batches = torch.zeros((), device=order.device), 0, 0.0, 0
    bar = tqdm(batch_indices(order, config.batch_size), total=n_batches, desc=f"{label} epoch {epoch}",
               leave=False, disable=None if bars is None else not bars, unit="batch")
    with contextlib.closing(bar):
        for batch, index in enumerate(bar):
            if stop is not None and stop.requested:
                return "stopped", None
            loss = train_step(model, optimizer, data.images[index], data.labels[index])
            if progress.first_loss is None:
                progress.first_loss = loss.item()
            progress.samples += len(index)
            running += loss
            in_interval += 1
            if in_interval == config.log_interval or batch == n_batches - 1:
                mean_loss = running.item() / in_interval  # one sync per interval
                if is_diverged(mean_loss, progress.first_loss):
                    log.write(kind="diverged", epoch=epoch, samples=progress.samples, loss=str(mean_loss))
                    return "diverged", mean_loss
                record = dict(kind="train", epoch=epoch, samples=progress.samples, loss=mean_loss)
                ratios = trust_ratios(model, optimizer)
                if ratios:
                    record["trust_ratio"] = ratios
                log.write(**record)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                epoch_loss += mean_loss * in_interval
                epoch_batches += in_interval
                running.zero_()
                in_interval = 0
    return "done", epoch_loss / epoch_batches


def train_run(
    config: RunConfig, run: RunDir, train_data: Split, test_data: Split, *,
    bars: bool | None = None, echo: Echo = print, stop: StopRequest | None = None,
) -> dict:
    """Train one model in `run`, from its last checkpoint if it has one; returns
    the summary it writes. A stop request ends it after the current batch with
    status "interrupted" (raising Interrupted); a run is "diverged" when its
    loss is not finite or exceeds DIVERGENCE_FACTOR times its first batch's."""
    device = train_data.images.device
    torch.manual_seed(config.seed)  # the same initial weights for every optimizer
    model = make_model(device)
    optimizer = build_optimizer(config, model)
    order_generator = torch.Generator().manual_seed(config.seed)  # the same data order too
    progress = Progress()
    checkpoint = run.load_checkpoint()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        order_generator.set_state(checkpoint["order_generator"])
        progress.load_state_dict(checkpoint["progress"])
    if run.metrics_path.exists():  # drop the records of an epoch cut short (or of all, with no checkpoint)
        run.rewind_metrics(progress.epoch)
    with run.log() as log:
        if checkpoint is not None:
            log.write(kind="resumed", epoch=progress.epoch, samples=progress.samples, time=now())
            echo(f"{run.path.name}: resuming after epoch {progress.epoch}")

        label = f"{config.optimizer} seed {config.seed}"
        status, diverged_loss = "completed", None
        session_start = time.perf_counter()
        try:
            with cpu_flush_denormal(device):
                while progress.epoch < config.epochs:
                    epoch_start = time.perf_counter()
                    order = torch.randperm(len(train_data), generator=order_generator).to(device)
                    outcome, train_loss = train_epoch(
                        model, optimizer, train_data, order, config, progress, log, label, bars, stop
                    )
                    if outcome != "done":
                        status, diverged_loss = ("interrupted", None) if outcome == "stopped" else (outcome, train_loss)
                        break
                    test_loss, accuracy = evaluate(model, test_data, config.test_batch_size)
                    epoch_seconds = time.perf_counter() - epoch_start
                    progress.epoch += 1
                    if is_diverged(test_loss, progress.first_loss):
                        log.write(kind="diverged", epoch=progress.epoch, samples=progress.samples, loss=str(test_loss))
                        status, diverged_loss = "diverged", test_loss
                        break
                    progress.epoch_seconds.append(epoch_seconds)
                    progress.tests.append(dict(epoch=progress.epoch, accuracy=accuracy, loss=test_loss,
                                               train_loss=train_loss))
                    log.write(kind="test", epoch=progress.epoch, samples=progress.samples, test_loss=test_loss,
                              test_accuracy=accuracy, train_loss=train_loss, epoch_time=epoch_seconds,
                              wall_time=progress.train_seconds + time.perf_counter() - session_start)
                    run.save_checkpoint(dict(
                        model=model.state_dict(), optimizer=optimizer.state_dict(),
                        order_generator=order_generator.get_state(),
                        progress=dict(progress.state_dict(),
                                      train_seconds=progress.train_seconds + time.perf_counter() - session_start),
                    ))
                    echo(f"{label:22s} epoch {progress.epoch:2d}/{config.epochs}  train loss {train_loss:.4f}  "
                         f"test loss {test_loss:.4f}  accuracy {100 * accuracy:.2f}%  {epoch_seconds:.1f}s")
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the batch loop
            status = "interrupted"
        progress.train_seconds += time.perf_counter() - session_start
        if status == "diverged":
            echo(f"{label:22s} epoch {progress.epoch + 1:2d}/{config.epochs}  diverged (loss {diverged_loss:.3g})")

    summary = summarize(config, model, optimizer, progress, status, len(train_data))
    run.write_summary(summary)
    if status == "interrupted":
        raise Interrupted(run.path)
    return summary


def summarize(
    config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, status: str,
    train_size: int,
) -> dict:
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = state_nbytes(optimizer)
    best = max(progress.tests, key=lambda t: t["accuracy"], default=None)
    final = progress.tests[-1] if progress.tests else None
    return dict(
        optimizer=config.optimizer,
        seed=config.seed,
        status=status,
        epochs_completed=progress.epoch if status != "diverged" else len(progress.tests),
        samples=progress.samples,
        final_test_accuracy=final["accuracy"] if final else None,
        final_test_loss=finite_or_none(final["loss"]) if final else None,
        final_train_loss=finite_or_none(final["train_loss"]) if final else None,
        best_test_accuracy=best["accuracy"] if best else None,
        best_epoch=best["epoch"] if best else None,
        test_accuracy_by_epoch=[t["accuracy"] for t in progress.tests],
        train_seconds=progress.train_seconds,
        median_epoch_seconds=statistics.median(progress.epoch_seconds) if progress.epoch_seconds else None,
        effective_batch_size=min(config.batch_size, train_size),
        parameters=n_params,
        state_bytes=state_bytes,
        state_bytes_per_parameter=state_bytes / n_params,
        ended=now(),
    )

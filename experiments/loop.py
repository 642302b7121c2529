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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from lamb16 import state_nbytes
from models import MnistCNN

from . import registry
from .config import DIVERGENCE_FACTOR, RunConfig
from .data import Split, hold_out
from .errors import Interrupted, UserError
from .parallel import SINGLE, Parallel, any_rank, mean_over_ranks, share, sum_over_ranks, whole_state, wrap
from .parallel import load_whole_state
from .schedules import make_scheduler
from .tensorboard import teed
from .runs import CheckpointError, RunDir, finished_epochs, finite_or_none, now

Echo = Callable[[str], None]
PROGRESS_SECONDS = 60.0  # between the lines a long epoch prints where no bar shows its progress


def make_model(device: torch.device, parallel: Parallel = SINGLE) -> nn.Module:
    """The CNN, laid out for speed: on the CPU, channels-last weights let oneDNN
    run the convolutions about 1.5x faster at batch 1024 (`cli.py bench`);
    across processes, wrapped for DDP or FSDP2 (whose shards need plain layouts)."""
    model = MnistCNN().to(device)
    if device.type == "cpu" and parallel.mode != "fsdp":
        model = model.to(memory_format=torch.channels_last)
    return wrap(model, parallel)


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


def check_checkpoint(run: RunDir, config: RunConfig, checkpoint: dict | None) -> None:
    """A checkpoint resumes the run that wrote it: one whose config.json was
    edited since, or one that was deleted after epochs had finished, is refused
    rather than trained as something else. (One finished epoch and no checkpoint
    is a run stopped before its first checkpoint was written: it restarts.)"""
    if checkpoint is None:
        finished = finished_epochs(run)
        if finished > 1:
            raise UserError(f"{run.checkpoint_path} is missing, yet metrics.jsonl records {finished} finished epochs; "
                            "restore checkpoint.pt from a copy, or start a new run")
        return
    written_with = checkpoint.get("config")
    if isinstance(written_with, dict):
        changed = sorted(k for k, v in config.to_dict().items() if k in written_with and written_with[k] != v)
        if changed:
            said = ", ".join(f"{k} {getattr(config, k)} (the checkpoint's: {written_with[k]})" for k in changed)
            raise UserError(f"{run.config_path} was edited after checkpoint.pt was written: {said}; restore "
                            "config.json, or start a new run with the new settings")


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    return registry.build(config.optimizer, model.parameters(), config.lr, config.wd, trust_scale=config.trust_scale,
                          beta1=config.beta1, beta2=config.beta2)


def batch_indices(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive batches of a permutation; the last one may be smaller."""
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
    mark: Callable[[str], None] | None = None, divisor: float | None = None,
) -> Tensor:
    """One optimizer step on a batch; returns the batch's loss (not synchronized).
    `mark(phase)` is called as forward, backward and optimizer end (for timing).
    With a `divisor` the loss is the batch's summed loss over it: a rank's share
    of a global batch's mean, times the ranks that average it (see parallel)."""
    optimizer.zero_grad(set_to_none=True)
    output = model(images)
    loss = F.nll_loss(output, labels) if divisor is None else F.nll_loss(output, labels, reduction="sum") / divisor
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
def evaluate(model: nn.Module, split: Split, batch_size: int, parallel: Parallel = SINGLE) -> tuple[float, float]:
    """Mean NLL loss and accuracy over a split, in batches (each split across the ranks)."""
    model.eval()
    totals = torch.zeros(2, device=split.images.device, dtype=torch.float64)  # loss, correct
    for index in batch_indices(torch.arange(len(split), device=split.images.device), batch_size):
        index = share(index, parallel)
        output = model(split.images[index])
        totals[0] += F.nll_loss(output, split.labels[index], reduction="sum")
        totals[1] += (output.argmax(dim=1) == split.labels[index]).sum()
    model.train()
    total_loss, correct = sum_over_ranks(totals, parallel).tolist()
    return total_loss / len(split), correct / len(split)


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


class DiscardedLog:
    """The metrics log of a rank that does not write (all but rank 0)."""

    def write(self, **record) -> None:
        pass


DISCARD = DiscardedLog()


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
    progress: Progress, log, label: str, bars: bool | None, stop: StopRequest | None, parallel: Parallel = SINGLE,
    scheduler: LRScheduler | None = None, echo: Echo = print,
) -> tuple[str, float | None]:
    """One pass over `data` in `order`. Returns ("done", mean train loss),
    ("diverged", loss) or ("stopped", None), the last leaving the epoch unfinished.
    Across processes each rank trains on its share of every batch, and all
    stop at the same batch. Without a bar (output not a terminal), a line
    every PROGRESS_SECONDS says how far a long epoch has got."""
    n_batches = math.ceil(len(order) / config.batch_size)
    epoch = progress.epoch + 1
    running, in_interval, epoch_loss, epoch_batches = torch.zeros((), device=order.device), 0, 0.0, 0
    bar = tqdm(batch_indices(order, config.batch_size), total=n_batches, desc=f"{label} epoch {epoch}",
               leave=False, disable=None if bars is None else not bars, unit="batch")
    said = time.perf_counter()
    with contextlib.closing(bar):
        for batch, index in enumerate(bar):
            if any_rank(stop is not None and stop.requested, order.device, parallel):
                return "stopped", None
            mine = share(index, parallel)
            divisor = len(index) / parallel.world if parallel.distributed else None
            lr = optimizer.param_groups[0]["lr"]  # this step's
            loss = train_step(model, optimizer, data.images[mine], data.labels[mine], divisor=divisor)
            if scheduler is not None:
                scheduler.step()
            if progress.first_loss is None:
                progress.first_loss = mean_over_ranks(loss.clone(), parallel).item()
            progress.samples += len(index)
            running += loss
            in_interval += 1
            if in_interval == config.log_interval or batch == n_batches - 1:
                mean_loss = mean_over_ranks(running, parallel).item() / in_interval  # one sync per interval
                if is_diverged(mean_loss, progress.first_loss):
                    log.write(kind="diverged", epoch=epoch, samples=progress.samples, loss=str(mean_loss))
                    return "diverged", mean_loss
                record = dict(kind="train", epoch=epoch, samples=progress.samples, loss=mean_loss, lr=float(lr))
                ratios = trust_ratios(model, optimizer)
                if ratios:
                    record["trust_ratio"] = ratios
                log.write(**record)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if bar.disable and time.perf_counter() - said >= PROGRESS_SECONDS:
                    echo(f"{label} epoch {epoch}: batch {batch + 1}/{n_batches}, loss {mean_loss:.4f}")
                    said = time.perf_counter()
                epoch_loss += mean_loss * in_interval
                epoch_batches += in_interval
                running.zero_()
                in_interval = 0
    return "done", epoch_loss / epoch_batches


def train_run(
    config: RunConfig, run: RunDir, train_data: Split, test_data: Split, *,
    bars: bool | None = None, echo: Echo = print, stop: StopRequest | None = None, parallel: Parallel = SINGLE,
    prune: Callable[[int, float | None], bool] | None = None, events: Path | None = None,
) -> dict:
    """Train one model in `run`, from its last checkpoint if it has one; returns
    the summary it writes. A stop request ends it after the current batch with
    status "interrupted" (raising Interrupted); a run is "diverged" when its
    loss is not finite or exceeds DIVERGENCE_FACTOR times its first batch's.
    `prune(epoch, validation accuracy)`, asked after each epoch but the last
    (a sweep's rule), may end it there, checkpointed, with status "pruned"; it
    resumes from there like an interrupted run. A run with no epoch yet is
    asked `prune(0, None)` first (the sweep's rule across seeds), and may end
    with status "pruned" before training at all. `events`: a folder the curves
    also go to as TensorBoard events, while it trains.
    Across processes (`parallel`) every rank calls it with the same run, and
    rank 0 alone writes to it."""
    device = train_data.images.device
    train_data, val_data = hold_out(train_data, config.val_size)
    writes = parallel.is_main
    if not writes:
        echo, bars = (lambda line: None), False
    torch.manual_seed(config.seed)  # the same initial weights for every optimizer
    model = make_model(device, parallel)
    optimizer = build_optimizer(config, model)
    # Built before the optimizer's state is loaded: a scheduler's construction sets the lr it starts from.
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup,
                               config.epochs * math.ceil(len(train_data) / config.batch_size))
    order_generator = torch.Generator().manual_seed(config.seed)  # the same data order too
    progress = Progress()
    checkpoint = run.load_checkpoint()
    check_checkpoint(run, config, checkpoint)
    if checkpoint is not None:
        load_whole_state(model, optimizer, checkpoint["model"], checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        order_generator.set_state(checkpoint["order_generator"])
        progress.load_state_dict(checkpoint["progress"])
    if writes and run.metrics_path.exists():  # drop the records of an epoch cut short (or of all, with no checkpoint)
        run.rewind_metrics(progress.epoch)
    with (run.log() if writes else contextlib.nullcontext(DISCARD)) as metrics, \
            teed(metrics, events if writes else None, progress.samples) as log:
        if checkpoint is not None:
            log.write(kind="resumed", epoch=progress.epoch, samples=progress.samples, time=now())
            echo(f"{run.path.name}: resuming after epoch {progress.epoch}")

        label = run.path.name  # its settings and seed: lines of runs side by side (a sweep's workers) tell apart
        status, diverged_loss, unsaved = "completed", None, None
        session_start = time.perf_counter()
        try:
            if prune is not None and progress.epoch == 0 and prune(0, None):
                log.write(kind="pruned", epoch=0, samples=0, time=now())
                echo(f"{label:22s} pruned before its first epoch")
                status = "pruned"
            with cpu_flush_denormal(device):
                while status != "pruned" and progress.epoch < config.epochs:
                    epoch_start = time.perf_counter()
                    order = torch.randperm(len(train_data), generator=order_generator).to(device)
                    outcome, train_loss = train_epoch(
                        model, optimizer, train_data, order, config, progress, log, label, bars, stop, parallel,
                        scheduler, echo,
                    )
                    if outcome != "done":
                        status, diverged_loss = ("interrupted", None) if outcome == "stopped" else (outcome, train_loss)
                        break
                    test_loss, accuracy = evaluate(model, test_data, config.test_batch_size, parallel)
                    validation = {}
                    if val_data is not None:
                        val_loss, val_accuracy = evaluate(model, val_data, config.test_batch_size, parallel)
                        validation = dict(val_loss=val_loss, val_accuracy=val_accuracy)
                    epoch_seconds = time.perf_counter() - epoch_start
                    progress.epoch += 1
                    if is_diverged(test_loss, progress.first_loss):
                        log.write(kind="diverged", epoch=progress.epoch, samples=progress.samples, loss=str(test_loss))
                        status, diverged_loss = "diverged", test_loss
                        break
                    progress.epoch_seconds.append(epoch_seconds)
                    progress.tests.append(dict(epoch=progress.epoch, accuracy=accuracy, loss=test_loss,
                                               train_loss=train_loss, **validation))
                    log.write(kind="test", epoch=progress.epoch, samples=progress.samples, test_loss=test_loss,
                              test_accuracy=accuracy, train_loss=train_loss, **validation, epoch_time=epoch_seconds,
                              wall_time=progress.train_seconds + time.perf_counter() - session_start)
                    if writes or parallel.mode == "fsdp":  # FSDP: every rank gathers its pieces
                        model_state, optimizer_state = whole_state(model, optimizer)
                    if writes:
                        run.save_checkpoint(dict(
                            config=config.to_dict(),
                            model=model_state, optimizer=optimizer_state, order_generator=order_generator.get_state(),
                            scheduler=scheduler.state_dict() if scheduler is not None else None,
                            progress=dict(progress.state_dict(),
                                          train_seconds=progress.train_seconds + time.perf_counter() - session_start),
                        ))
                    echo(f"{label:22s} epoch {progress.epoch:2d}/{config.epochs}  train loss {train_loss:.4f}  "
                         f"test loss {test_loss:.4f}  accuracy {100 * accuracy:.2f}%  {epoch_seconds:.1f}s")
                    if (prune is not None and validation and progress.epoch < config.epochs
                            and prune(progress.epoch, validation["val_accuracy"])):
                        log.write(kind="pruned", epoch=progress.epoch, samples=progress.samples, time=now())
                        echo(f"{label:22s} pruned after epoch {progress.epoch}: validation accuracy "
                             f"{100 * validation['val_accuracy']:.2f}% clearly below its peers'")
                        status = "pruned"
                        break
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the batch loop
            status = "interrupted"
        except CheckpointError as error:  # a full disk: the run stops at its last good checkpoint
            status, unsaved = "interrupted", error
        progress.train_seconds += time.perf_counter() - session_start
        if status == "diverged":
            echo(f"{label:22s} epoch {progress.epoch + 1:2d}/{config.epochs}  diverged (loss {diverged_loss:.3g})")

    summary = summarize(config, model, optimizer, progress, status, len(train_data), parallel)
    if unsaved is not None:
        with contextlib.suppress(OSError):  # the disk may be too full for the summary as well
            run.write_summary(dict(summary, epochs_completed=progress.epoch - 1))
        raise UserError(f"{unsaved}; {run.path} keeps epoch {progress.epoch - 1}'s checkpoint: free some space, then "
                        f"resume with: python cli.py train --resume {run.path}")
    if writes:
        run.write_summary(summary)
    if status == "interrupted":
        raise Interrupted(run.path)
    return summary


def summarize(
    config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, status: str,
    train_size: int, parallel: Parallel = SINGLE,
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
        final_val_accuracy=final.get("val_accuracy") if final else None,
        val_accuracy_by_epoch=[t["val_accuracy"] for t in progress.tests if "val_accuracy" in t],
        train_seconds=progress.train_seconds,
        median_epoch_seconds=statistics.median(progress.epoch_seconds) if progress.epoch_seconds else None,
        effective_batch_size=min(config.batch_size, train_size),
        parameters=n_params,
        state_bytes=state_bytes,  # on rank 0: its share, when sharded
        state_bytes_per_parameter=state_bytes / n_params,
        parallel=parallel.mode,
        processes=parallel.world,
        ended=now(),
    )

"""A run's curves as TensorBoard event files (TensorBoard: an optional extra).

One mapping from metrics.jsonl records to scalars serves both ways in: live,
beside the run's own log while it trains (`cli.py train/compare --tensorboard
DIR`), and replayed from a saved run's metrics.jsonl (`cli.py plot
--tensorboard DIR`). Each run writes under DIR/<run name>, so that
`tensorboard --logdir DIR` lists the runs by name. The step is the number of
training samples seen, the x-axis of the run's figures, which compares batch
sizes fairly.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

TENSORBOARD_EXTRA = "pip install 'lamb16[tensorboard]'"

# metrics.jsonl field -> TensorBoard tag, per kind of record
TAGS = {
    "train": {"loss": "train/loss", "lr": "train/lr"},
    "test": {"test_loss": "test/loss", "test_accuracy": "test/accuracy", "val_loss": "validation/loss",
             "val_accuracy": "validation/accuracy", "train_loss": "train/epoch_loss"},
}


def require() -> None:
    """The one-line error, before anything trains, when tensorboard is not installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_EXTRA}")


def summary_writer(path: Path, purge_step: int | None = None):
    """A SummaryWriter into `path`; events at or past `purge_step` that an
    earlier session wrote are dropped from TensorBoard's view (a resumed run
    trains its last unfinished epoch again)."""
    require()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The (tag, value) pairs of one metrics record: losses, accuracies, lr and
    each layer's trust ratio; nothing for events (resumed, diverged, pruned)."""
    for field, tag in TAGS.get(record.get("kind"), {}).items():
        value = record.get(field)
        if isinstance(value, (int, float)):
            yield tag, float(value)
    for layer, ratio in (record.get("trust_ratio") or {}).items():
        yield f"trust_ratio/{layer}", float(ratio)


class TeeLog:
    """A run's metrics log that also writes each record's scalars as TensorBoard events."""

    def __init__(self, log, writer) -> None:
        self.log, self.writer = log, writer

    def write(self, **record: Any) -> None:
        self.log.write(**record)
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=record["samples"])
        if record.get("kind") == "test":
            self.writer.flush()  # an epoch's curves visible as soon as it ends


@contextlib.contextmanager
def teed(log, events: Path | None, resumed_at_samples: int) -> Iterator[Any]:
    """`log`, teed into TensorBoard events under `events` when it is given."""
    if events is None:
        yield log
        return
    writer = summary_writer(events, purge_step=resumed_at_samples + 1 if resumed_at_samples else None)
    try:
        yield TeeLog(log, writer)
    finally:
        writer.close()


def export(records: list[dict], events: Path) -> int:
    """A saved run's records written as fresh events under `events` (replacing
    any written before); returns how many scalars."""
    events.mkdir(parents=True, exist_ok=True)
    for old in events.glob("events.out.tfevents.*"):
        old.unlink()
    count = 0
    with contextlib.closing(summary_writer(events)) as writer:
        for record in records:
            for tag, value in scalars(record):
                writer.add_scalar(tag, value, global_step=record["samples"])
                count += 1
    return count


def export_runs(paths: list[Path], directory: Path) -> list[Path]:
    """Saved runs' curves as events under `directory`, each named by its path
    below the runs' common folder (runs of two comparisons never share one)."""
    import os

    from .runs import read_records

    require()
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    written = []
    for path in paths:
        events = directory / path.resolve().relative_to(root)
        export(read_records(path / "metrics.jsonl")[0], events)
        written.append(events)
    return written

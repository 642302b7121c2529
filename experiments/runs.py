"""Run directories: what a run writes, how it is found again, and how it resumes.

A run directory holds
- config.json: every setting, and where and with what it ran (written once);
- metrics.jsonl: one JSON object a line, flushed as written ("train" records
  per log interval, "test" records per epoch, "diverged", "pruned" or
  "resumed" events);
- checkpoint.pt: model, optimizer, data-order generator and counters after the
  last finished epoch (replaced atomically each epoch);
- summary.json: status (completed, diverged, pruned by a sweep, or
  interrupted) and results, written when the run ends, however it ends.
"""

import contextlib
import functools
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch

import lamb16

from .config import RunConfig
from .errors import UserError
from .parallel import SINGLE, Parallel

FINISHED = ("completed", "diverged")  # statuses that a resume leaves alone (a pruned run resumes)


class CheckpointError(UserError):
    """checkpoint.pt could not be written; the last good one is kept."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write `data` (bytes, or a function writing to a file) to a temporary
    file beside `path`, then rename: a reader or a crash sees the old file or
    the new one, never half of one. The file gets the user's umask, as an
    ordinary write would (a temporary file is made 0600). A failed write (a
    full disk) leaves the old file as it was and no temporary one behind."""
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with tmp:
            if isinstance(data, bytes):
                tmp.write(data)
            else:
                data(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o666 & ~umask())
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def writable_dir(path: Path, option: str = "--out") -> Path:
    """Create `path` if needed and prove it is writable, or fail with one clear line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"cannot write to {option} {path}: {error.strerror or error}; choose a writable folder") from error
    return path


# Which command a folder belongs to, written when a command first writes there:
# no command writes into a folder that another one made.
FOLDER_RECORD = "lamb16-folder.json"
FOLDER_KINDS = {"train": "train's runs", "compare": "a comparison", "reproduce": "a reproduction",
                "sweep": "a sweep", "report": "a report of several sweeps", "runs": "run directories"}


def owner_of(path: Path) -> str | None:
    """The command whose folder `path` is: as its record says or, for a folder
    written before records, as its contents say (a sweep's database, a run's
    config.json: "run"); None for a new or unknown folder."""
    record = path / FOLDER_RECORD
    if record.is_file():
        try:
            command = json.loads(record.read_text()).get("command")
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise UserError(f"{record} is unreadable ({type(error).__name__}); delete it if {path} is yours to write "
                            "into, or choose another folder") from error
        if command in FOLDER_KINDS:
            return command
    if (path / "config.json").is_file():
        return "run"
    if (path / "sweep.db").is_file():
        return "sweep"
    if any((child / "config.json").is_file() for child in path.iterdir()):
        return "runs"  # run directories: train's or a comparison's
    return None


def claim_dir(path: Path, command: str, option: str = "--out") -> Path:
    """`path` as `command`'s folder: created and proven writable, and refused
    with one line if another command made it (or it is a run directory)."""
    owner = owner_of(path) if path.is_dir() else None
    if owner == "run":
        raise UserError(f"{option} {path} is a run directory (it holds config.json), not a folder for {command}; give "
                        f"another {option} (a run directory resumes with: python cli.py train --resume {path})")
    if owner == "runs" and command in ("train", "compare", "reproduce"):
        owner = None  # written before records: the command's own kind of folder, as far as can be told
    if owner is not None and owner != command:
        made = f" (made by {owner})" if owner != "runs" else ""
        raise UserError(f"{option} {path} holds {FOLDER_KINDS[owner]}{made}; give {command} a folder of its own with "
                        f"another {option}")
    writable_dir(path, option)
    if owner is None:
        write_json(path / FOLDER_RECORD, dict(command=command, created=now(), by=command_line()))
    return path


def fresh_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... if taken: never overwrite an earlier run."""
    candidate, suffix = parent / name, 2
    while candidate.exists():
        candidate, suffix = parent / f"{name}-{suffix}", suffix + 1
    return candidate


def free_path(path: Path) -> Path:
    """`path`, or name-2.ext, name-3.ext, ... if taken: never overwrite a file."""
    candidate, suffix = path, 2
    while candidate.exists():
        candidate, suffix = path.with_name(f"{path.stem}-{suffix}{path.suffix}"), suffix + 1
    return candidate


@functools.cache
def code_version() -> dict[str, Any]:
    """The git commit of this code and whether its tree had changes (None outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return dict(git_commit=None, git_dirty=None)
    if commit.returncode != 0:
        return dict(git_commit=None, git_dirty=None)
    return dict(git_commit=commit.stdout.strip(), git_dirty=bool(status.stdout.strip()))


@functools.cache
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_metadata(device: torch.device) -> dict[str, Any]:
    return dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        cpu_model=cpu_model(),
        hostname=socket.gethostname(),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        lamb16_version=lamb16.__version__,
        python_version=platform.python_version(),
        **code_version(),
    )


class MetricsLog:
    """metrics.jsonl, appended one JSON object a line and flushed as written."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl, and how many lines were not JSON objects
    (a crash can cut the last line short)."""
    records, skipped = [], 0
    if not path.is_file():
        return records, skipped
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


@dataclass
class RunDir:
    """One run's directory and the files in it."""

    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @classmethod
    def create(cls, path: Path, metadata: dict[str, Any]) -> "RunDir":
        path.mkdir(parents=True, exist_ok=False)
        run = cls(path)
        write_json(run.config_path, metadata)
        return run

    def config(self) -> RunConfig:
        try:
            return RunConfig.from_dict(self.metadata())
        except ValueError as error:
            raise UserError(f"{self.config_path}: {error}; restore the file as train wrote it, or start a new "
                            "run") from error

    def metadata(self) -> dict[str, Any]:
        try:
            data = json.loads(self.config_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{self.path} is not a readable run directory ({error}); pass one written by train") from error
        if not isinstance(data, dict):
            raise UserError(f"{self.config_path} holds a JSON {type(data).__name__}, not an object of settings; "
                            "restore the file as train wrote it, or start a new run")
        return data

    def summary(self) -> dict[str, Any] | None:
        """summary.json, or None where the run has not ended (or the file is damaged)."""
        try:
            summary = json.loads(self.summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return summary if isinstance(summary, dict) else None

    def status(self) -> str | None:
        summary = self.summary()
        return summary.get("status") if summary else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    @contextlib.contextmanager
    def log(self) -> Iterator[MetricsLog]:
        log = MetricsLog(self.metrics_path)
        try:
            yield log
        finally:
            log.close()

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace checkpoint.pt atomically; where it cannot be written (a full
        disk), CheckpointError, with the last good checkpoint left as it was."""
        try:
            write_atomic(self.checkpoint_path, lambda file: torch.save(state, file))
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
            raise CheckpointError(f"cannot write {self.checkpoint_path} ({reason})") from error

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last finished epoch's state, or None where the run has none yet."""
        if not self.checkpoint_path.is_file():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or foreign file
            raise UserError(
                f"cannot read {self.checkpoint_path} ({type(error).__name__}); delete it to restart this run from "
                "epoch 1, or restore it from a copy"
            ) from error

    def rewind_metrics(self, epoch: int) -> None:
        """Keep only the records of epochs up to `epoch` (those of an epoch cut
        short are trained again on resume)."""
        records, _ = read_records(self.metrics_path)
        kept = [r for r in records if r.get("epoch", 0) <= epoch]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())


@dataclass
class Run:
    """What a finished or unfinished run directory holds, as reports need it."""

    path: Path
    config: dict[str, Any]
    train: list[dict] = field(default_factory=list)  # {"epoch", "samples", "loss"}
    test: list[dict] = field(default_factory=list)  # {"epoch", "test_loss", "test_accuracy", ...}
    summary: dict[str, Any] | None = None
    skipped_lines: int = 0

    @property
    def optimizer(self) -> str:
        return self.config.get("optimizer", "?")

    @property
    def status(self) -> str:
        return (self.summary or {}).get("status", "incomplete")

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"


def load_run(path: Path) -> Run:
    """A run directory's config, metrics and summary."""
    run_dir = RunDir(path)
    records, skipped = read_records(run_dir.metrics_path)
    return Run(
        path=path,
        config=run_dir.metadata(),
        train=[r for r in records if r.get("kind") == "train" and is_number(r.get("loss"))],
        test=[r for r in records if r.get("kind") == "test" and is_number(r.get("test_accuracy"))],
        summary=run_dir.summary(),
        skipped_lines=skipped,
    )


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories (those holding config.json) at or anywhere below `paths`, sorted."""
    found: dict[Path, None] = {}
    for path in paths:
        if (path / "config.json").is_file():
            found[path] = None
        for config in sorted(path.rglob("config.json")):
            found[config.parent] = None
    return list(found)


def load_runs(paths: Iterable[Path], warn=None) -> list[Run]:
    """Every run found under `paths`; `warn(line)` hears of skipped lines,
    unreadable directories and runs that have not ended."""
    warn = warn or (lambda line: warnings.warn(line, stacklevel=2))
    runs = []
    for path in find_runs(paths):
        try:
            run = load_run(path)
        except UserError as error:
            warn(f"skipped {path}: {error}")
            continue
        if run.skipped_lines:
            warn(f"{path / 'metrics.jsonl'}: skipped {run.skipped_lines} malformed line(s)")
        if run.summary is None:
            warn(f"{path} has not ended (no summary.json): drawn as far as it got")
        runs.append(run)
    return runs


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def command_line() -> str:
    return " ".join(sys.argv)


def run_metadata(
    config: RunConfig, device: torch.device, data_dir: Path, train_size: int, parallel: Parallel = SINGLE
) -> dict[str, Any]:
    """config.json: the settings, then where, on what and with what code it ran."""
    from .data import checksums

    return dict(
        config.to_dict(),
        effective_batch_size=min(config.batch_size, train_size - config.val_size),
        train_size=train_size,
        parallel=parallel.mode,
        processes=parallel.world,
        channels_last=device.type == "cpu" and parallel.mode != "fsdp",
        cpu_flush_denormal=device.type == "cpu",
        data_dir=str(Path(data_dir).resolve()),
        data_sha256=checksums(data_dir),
        started=now(),
        command=command_line(),
        **machine_metadata(device),
    )


def check_resumable(run: RunDir, data_dir: Path, train_size: int) -> None:
    """A run resumes only on the data it began on: the same number of training
    images and, where config.json recorded them, the same files (SHA-256)."""
    from .data import checksums

    metadata = run.metadata()
    trained_on = metadata.get("train_size")
    if trained_on is not None and trained_on != train_size:
        raise UserError(f"{run.path} trained on {trained_on} images, this data has {train_size}; "
                        "resume with the same --data-dir")
    recorded = metadata.get("data_sha256")
    if isinstance(recorded, dict) and recorded:
        now_sums = checksums(data_dir)
        changed = sorted(name for name, digest in recorded.items() if now_sums.get(name) != digest)
        if changed:
            raise UserError(f"{run.path} began on other MNIST files: {', '.join(changed)} in "
                            f"{Path(data_dir) / 'MNIST' / 'raw'} differ from the SHA-256 in its config.json; "
                            "resume with the --data-dir it began on")


def finished_epochs(run: RunDir) -> int:
    """How many epochs metrics.jsonl records as finished (their test records)."""
    records, _ = read_records(run.metrics_path)
    return sum(1 for r in records if r.get("kind") == "test")

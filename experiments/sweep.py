"""Sweeps: each optimizer tuned at each batch size, each point an ordinary run
directory, run through an Optuna study; then, with confirmation seeds, each
chosen setting trained again on seeds that took no part in choosing it.

A sweep tunes over a grid (learning rates x weight decays x warmups) or, with
`trials`, over each optimizer's own search space (experiments.space: the
registry's knobs, drawn quasi-randomly), the same number of settings for every
optimizer and batch size. The study holds every point as a queued trial
(enqueue_trial, the point in its user attributes): a worker takes the next
point by popping a queued trial, which the storage does atomically, so two
workers never run the same point, on one machine or on many sharing a
database (--storage). A point stopped by Ctrl-C is queued again at once; one
whose worker died is found by Optuna's heartbeat and queued again; its run
directory resumes from its last epoch. A finished run is never trained again:
its directory is the record.

The setting is chosen per optimizer and batch size by validation accuracy
(training images held out, the same for every run), never by the test set.
Confirmation runs (out/confirm) train each choice on fresh seeds once every
tuning point has ended; the report's verdicts come from them alone, so that
the luck that made a setting win its choice does not also judge it.

A sweep run again with more of anything (optimizers, lrs, batch sizes, wds,
warmups, seeds, trials, confirmation seeds) extends the stored one: its
finished points are kept and only the new ones train.
"""

import contextlib
import itertools
import multiprocessing
import os
import signal
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl  # POSIX: a dead worker's point is found at once; elsewhere by heartbeat alone
except ImportError:
    fcntl = None  # type: ignore[assignment]

from . import registry, space
from .config import DEFAULTS, RunConfig, counted, parse_numbers, parse_seeds
from .data import Split, load_train_and_test
from .errors import Interrupted, UserError
from .loop import StopRequest, stop_on_signals, train_run
from .runs import FINISHED, RunDir, check_resumable, run_metadata

Echo = Callable[[str], None]
STUDY_NAME = "lamb16-sweep"
DATABASE = "sweep.db"  # the default storage, inside the sweep's folder
TUNING, CONFIRM = "runs", "confirm"  # the folders of a sweep's tuning and confirmation runs
# Every point trains on one thread, however many workers share the machine: a
# run's arithmetic (oneDNN's convolutions split their sums by thread) and so its
# result are then the same whatever --workers was (measured: LAMB16's 91.14%
# on two threads, 91.11% on one).
THREADS_PER_POINT = 1
HEARTBEAT_SECONDS = 30  # a running point's worker reports this often...
GRACE_SECONDS = 180  # ...and is taken for dead (its point queued again) after this long without


@dataclass(frozen=True)
class Sweep:
    """A sweep's points and the settings every point shares."""

    optimizers: tuple[str, ...]
    lrs: tuple[float, ...]  # a grid's; a search sweep's are drawn
    batch_sizes: tuple[int, ...]
    wds: tuple[float, ...] = (DEFAULTS.wd,)
    seeds: tuple[int, ...] = (1,)  # the tuning seeds
    epochs: int = DEFAULTS.epochs
    val_size: int = 10_000
    test_batch_size: int = DEFAULTS.test_batch_size
    log_interval: int = DEFAULTS.log_interval
    schedule: str = DEFAULTS.schedule  # shared by every point
    warmups: tuple[float, ...] = (DEFAULTS.warmup,)  # swept
    trials: int = 0  # above 0: a search sweep, this many settings of each optimizer's search space
    confirm_seeds: tuple[int, ...] = ()  # seeds that train each chosen setting again, apart from the choice

    @property
    def searched(self) -> bool:
        return self.trials > 0

    def base(self) -> RunConfig:
        """The settings every point shares."""
        return RunConfig(epochs=self.epochs, test_batch_size=self.test_batch_size, log_interval=self.log_interval,
                         val_size=self.val_size, schedule=self.schedule)

    def points(self) -> list[dict[str, Any]]:
        """Every tuning point, as the parameters `config` reads. Seed-major, so
        that a sweep cut short has whole grids of its first seeds; within a
        seed, the largest batches (the regime LAMB is for) first; a grid's lrs
        from its middle outwards, so that pruning meets the likely best first
        and the extremes, likely hopeless, last."""
        batch_sizes = sorted(self.batch_sizes, reverse=True)
        if self.searched:  # each trial's drawn values held in its point: read once, when it is queued
            return [dict(optimizer=o, batch_size=b, trial=t, seed=s, **space.settings(o, self.trials)[t])
                    for s, b, o, t in itertools.product(self.seeds, batch_sizes, self.optimizers, range(self.trials))]
        grid = itertools.product(self.seeds, batch_sizes, self.optimizers, middle_out(self.lrs), self.wds,
                                 self.warmups)
        return [dict(optimizer=o, batch_size=b, lr=lr, wd=wd, warmup=warmup, seed=s)
                for s, b, o, lr, wd, warmup in grid]

    def config(self, point: dict[str, Any]) -> RunConfig:
        """The run of a point: a grid's values, a search trial's drawn setting, or a confirmation's setting."""
        point = dict(point)
        trial = point.pop("trial", None)
        if trial is not None and "lr" not in point:  # queued before points held their draws
            point.update(space.settings(point["optimizer"], self.trials)[trial])
        return replace(self.base(), **point)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Sweep":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# What a point's run means: a sweep that changes any of these is another sweep.
SHARED = ("epochs", "val_size", "test_batch_size", "log_interval", "schedule")
# What a sweep run again may add to (its earlier values all kept).
EXTENDABLE = ("optimizers", "lrs", "batch_sizes", "wds", "warmups", "seeds", "confirm_seeds")


def why_not_extended(stored: Sweep, sweep: Sweep) -> str | None:
    """Why `sweep` cannot continue the `stored` one (it must keep every value
    it had and share what its points' runs mean), or None where it can."""
    changed = [name for name in SHARED if getattr(stored, name) != getattr(sweep, name)]
    if changed:
        return f"this command changes its {', '.join(changed).replace('_', ' ')}, which every point shares"
    if stored.searched != sweep.searched:
        return "one is a grid and the other a search (--trials)"
    if sweep.trials < stored.trials:
        return f"it has {stored.trials} trials and this command asks for {sweep.trials}"
    for name in EXTENDABLE:
        dropped = [v for v in getattr(stored, name) if v not in getattr(sweep, name)]
        if dropped:
            return f"this command drops its {name.replace('_', ' ')} {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in dropped)}"
    return None


def middle_out(values: tuple[float, ...]) -> list[float]:
    """Sorted values reordered from the middle outwards: 1,2,3,4,5,6 -> 3,4,2,5,1,6."""
    ordered = sorted(values)
    center = (len(ordered) - 1) / 2
    return [ordered[i] for i in sorted(range(len(ordered)), key=lambda i: (abs(i - center), i))]


# --------------------------------------------------------------- the queue --


def point_of(trial) -> dict[str, Any]:
    """A queued trial's point: in its user attributes (or, in a study written
    before they held it, its parameters, or while it waits, those it was queued with)."""
    return dict(trial.user_attrs.get("point") or trial.params or trial.system_attrs.get("fixed_params", {}))


def folder_of(trial) -> str:
    return trial.user_attrs.get("folder", TUNING)


def queue_attrs(trial) -> dict[str, Any]:
    """What queues a trial's point again: its run, point and folder."""
    attrs = dict(run=trial.user_attrs["run"], point=point_of(trial))
    if folder_of(trial) != TUNING:
        attrs["folder"] = folder_of(trial)
    return attrs


def enqueue(study, attrs: dict[str, Any]) -> None:
    study.enqueue_trial({}, user_attrs=attrs)


def latest_trials(study, folder: str = TUNING) -> dict[str, Any]:
    """Each point's latest trial in `folder`, by run name (a pruned or stopped
    point is queued again as a new trial)."""
    return {t.user_attrs["run"]: t for t in study.get_trials(deepcopy=False)
            if "run" in t.user_attrs and folder_of(t) == folder}


def queue_new(study, sweep: Sweep, points: list[dict[str, Any]], folder: str = TUNING) -> int:
    """Queue the points that the study does not hold yet; returns how many."""
    held = latest_trials(study, folder)
    count = 0
    for point in points:
        name = sweep.config(point).run_name()
        if name not in held:
            attrs = dict(run=name, point=point, **({} if folder == TUNING else dict(folder=folder)))
            enqueue(study, attrs)
            held[name] = None
            count += 1
    return count


# --prune: on the sweep's first seed, a point is stopped after an epoch when
# its validation accuracy is clearly below the best at that epoch among the
# points of the same optimizer, batch size and seed: its error more than twice
# the best's, and at least half a point more. Measured on a small grid both ways
# (README), the same lrs chosen. Later seeds are not judged by epoch: they train
# in full the settings the first seed kept, so that the choice among those is by
# the mean over every seed, and skip the ones it pruned (out of the choice either
# way). Judged seed by seed, early noise would get one chance a seed to drop a
# finalist (measured: LAMB16's best lr at batch 8192, at epoch 2 of a third seed).
# Confirmation runs are never pruned.
PRUNE_GROUP = ("optimizer", "batch_size", "seed")
PRUNE_ERROR_RATIO = 2.0
PRUNE_MARGIN = 0.005


def clearly_below(accuracy: float, best: float) -> bool:
    error, best_error = 1 - accuracy, 1 - best
    return error > max(PRUNE_ERROR_RATIO * best_error, best_error + PRUNE_MARGIN)


def best_peer(study, point: dict, name: str, epoch: int) -> float | None:
    """The best validation accuracy reported at `epoch` by the other tuning
    points of `point`'s group (every trial, running or ended, of another run)."""
    values = [t.intermediate_values[epoch] for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get("run") not in (None, name) and folder_of(t) == TUNING
              and epoch in t.intermediate_values and all(point_of(t).get(k) == point[k] for k in PRUNE_GROUP)]
    return max(values, default=None)


def setting_key(name: str) -> str:
    """A point's setting: its run name less the seed."""
    return name.rpartition("_seed")[0]


def pruned_on_first_seed(latest: dict[str, Any], first_seed: int) -> set[str]:
    """The settings that stand pruned on the sweep's first seed, from each point's latest trial."""
    import optuna

    return {setting_key(name) for name, t in latest.items()
            if t.state == optuna.trial.TrialState.PRUNED and point_of(t).get("seed") == first_seed}


def first_seed_pruned(study, name: str, first_seed: int) -> bool:
    """Whether the setting of the run `name` stands pruned on the sweep's first seed."""
    return setting_key(name) in pruned_on_first_seed(latest_trials(study), first_seed)


def should_prune(study, point: dict, name: str, epoch: int, accuracy: float | None, first_seed: int) -> bool:
    """The --prune rule for a point after `epoch` (0: before it trains, no accuracy yet)."""
    if point["seed"] != first_seed:
        return first_seed_pruned(study, name, first_seed)
    best = best_peer(study, point, name, epoch) if accuracy is not None else None
    return best is not None and clearly_below(accuracy, best)


def requeue_finalists(study, first_seed: int) -> int:
    """Points of later seeds that stand pruned though the first seed kept their
    setting (pruned before the first seed's point ended, or by an earlier rule)
    queued again, to train in full; returns how many."""
    import optuna

    latest = latest_trials(study)
    dropped = pruned_on_first_seed(latest, first_seed)
    again = [t for name, t in latest.items() if t.state == optuna.trial.TrialState.PRUNED
             and point_of(t).get("seed") != first_seed and setting_key(name) not in dropped]
    for trial in again:
        enqueue(study, queue_attrs(trial))
    return len(again)


def requeue_pruned(study) -> int:
    """Pruned points queued again (a sweep run without --prune finishes them,
    each resuming from the epoch it was pruned at); returns how many."""
    import optuna

    pruned = [t for t in latest_trials(study).values() if t.state == optuna.trial.TrialState.PRUNED]
    for trial in pruned:
        enqueue(study, queue_attrs(trial))
    return len(pruned)


# The original README's claims (LAMB16 enables much larger batches, and beats
# 8-bit AdamW at large batches), tuned: each optimizer over its search space with
# the same budget (8 trials, one seed each; AlgoPerf's external tuning gives 5)
# at each batch size from 512 to 8192 by factors of 4, each choice confirmed on
# 8 fresh seeds, 10 epochs of warmup and cosine: about 9 hours on 2 cores.
# Its grid (--lrs with the preset): half-decade lrs, 3 seeds, warmup 0.1.
PRESETS = {
    "claims": Sweep(
        optimizers=("adamw", "bnb-adamw8bit", "ao-adamw4bit", "muon", "lamb", "lamb16"),
        lrs=(0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
        batch_sizes=(512, 2048, 8192),
        seeds=(1,),
        epochs=10,
        schedule="cosine",  # as people train: a linear warmup, then a cosine to 0
        warmups=(0.1,),
        trials=8,
        confirm_seeds=tuple(range(2, 10)),
    ),
}
GRID_SEEDS = (1, 2, 3)  # a grid of the claims preset (--lrs): every point on three seeds


def from_options(
    preset: str | None, optimizers: list[str] | None, lrs: str | None, batch_sizes: str | None, wds: str | None,
    seeds: str | None, epochs: int | None, val_size: int | None, schedule: str | None = None,
    warmups: str | None = None, trials: int | None = None, confirm_seeds: str | None = None,
) -> Sweep:
    """The sweep the command line asks for: a preset (or the defaults) with
    each option given replacing its part. --lrs makes a grid, --trials a search."""
    base = PRESETS[preset] if preset else Sweep(optimizers=("adamw", "lamb", "lamb16"), lrs=(),
                                                batch_sizes=(DEFAULTS.batch_size,))
    if trials and (lrs or wds or warmups):
        given = [name for name, value in (("--lrs", lrs), ("--wds", wds), ("--warmups", warmups)) if value]
        raise UserError(f"--trials searches lr, weight decay, betas and warmup itself; drop {', '.join(given)} (or "
                        "--trials, for a grid)")
    searched = bool(trials) if trials is not None else (base.searched and not (lrs or wds or warmups))
    tuning_seeds = tuple(parse_seeds(seeds)) if seeds else (base.seeds if searched or not preset else GRID_SEEDS)
    sweep = Sweep(
        optimizers=tuple(optimizers) if optimizers else base.optimizers,
        lrs=() if searched else (parse_numbers(lrs, "--lrs") if lrs else base.lrs),
        batch_sizes=parse_numbers(batch_sizes, "--batch-sizes", int) if batch_sizes else base.batch_sizes,
        wds=() if searched else (parse_numbers(wds, "--wds", allow_zero=True) if wds else base.wds),
        seeds=tuning_seeds,
        epochs=epochs or base.epochs,
        val_size=val_size or base.val_size,
        schedule=schedule or base.schedule,
        warmups=() if searched else (parse_numbers(warmups, "--warmups", allow_zero=True) if warmups
                                     else base.warmups),
        trials=(trials or base.trials) if searched else 0,
        confirm_seeds=(parse_confirm_seeds(confirm_seeds, tuning_seeds) if confirm_seeds is not None
                       else base.confirm_seeds if seeds is None else ()),
    )
    if any(w >= 1 for w in sweep.warmups):
        raise UserError(f"invalid --warmups {warmups!r}: each is a fraction of the run, below 1 (e.g. 0,0.1)")
    if not sweep.searched and not sweep.lrs:
        raise UserError("no learning rates: give --lrs (e.g. --lrs 0.005,0.02), --trials N (a search), or a --preset")
    return sweep


def parse_confirm_seeds(text: str, tuning_seeds: tuple[int, ...]) -> tuple[int, ...]:
    """"8": the 8 seeds after the tuning seeds; "101,102": those seeds; "0": none.
    A seed that tuned may not confirm: the seeds that chose a setting never also judge it."""
    if text.strip() == "0":
        return ()
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) == 1 and "," not in text:
        try:
            count = int(items[0])
        except ValueError:
            count = -1
        if not 0 <= count <= 1000:
            raise UserError(f"invalid --confirm-seeds {text!r}: give a count (8 means the 8 seeds after the tuning "
                            "seeds) or a list such as 11,12,13")
        return tuple(range(max(tuning_seeds) + 1, max(tuning_seeds) + 1 + count))
    seeds = tuple(parse_seeds(text, "--confirm-seeds"))
    reused = sorted(set(seeds) & set(tuning_seeds))
    if reused:
        raise UserError(f"--confirm-seeds {text} reuses tuning seed{'s' if len(reused) > 1 else ''} "
                        f"{','.join(map(str, reused))}: the seeds that choose a setting must not judge it; give "
                        f"seeds outside --seeds, or a count (--confirm-seeds 8: seeds {max(tuning_seeds) + 1}-"
                        f"{max(tuning_seeds) + 8})")
    return seeds


def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(out / DATABASE).resolve()}"


def open_storage(url: str):
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # workers take turns
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.8
            # A point whose worker stopped reporting is queued again (the callback's name since Optuna 4.9, and before).
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            callback = dict(heartbeat_stale_trial_callback=retry()) if retry else dict(
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback())
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                 heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                                 **callback)
    except Exception as error:  # a URL SQLAlchemy cannot open: a driver missing, a wrong host
        raise UserError(f"cannot open --storage {url}: {str(error).splitlines()[0]}; check the URL and its "
                        "database driver") from error
    if url.startswith("sqlite"):
        serialize_sqlite_transactions(storage.engine)
    return storage


def serialize_sqlite_transactions(engine) -> None:
    """Every SQLite transaction takes the database's write lock as it begins
    (BEGIN IMMEDIATE). Optuna pops a queued trial by reading it as waiting and
    then writing it as running, with SELECT ... FOR UPDATE, which SQLite
    ignores: under its default deferred transactions two workers could both
    read the point as waiting and both run it (measured: 3 sweeps in 8 on two
    local workers). A server database (PostgreSQL, MySQL) locks the row itself."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def no_implicit_transactions(connection, _record) -> None:
        connection.isolation_level = None  # the driver's own BEGIN off: the one below instead

    @event.listens_for(engine, "begin")
    def begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners: closed, the next ones made with them


def open_study(sweep: Sweep, out: Path, storage: str | None, echo: Echo = print, pruning: bool | None = None):
    """The sweep's study, created with every point queued, or joined: then the
    command's sweep must be the stored one or extend it (the new points queued,
    the others kept). `pruning` False (a sweep without --prune): its pruned
    points queued again; True: its later seeds' pruned points whose setting the
    first seed kept."""
    import optuna

    # Errors only: a point stopped by Ctrl-C is a trial Optuna logs as failed, with
    # a traceback; the sweep says so in one line and queues it again.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)  # the runs, and the default storage
    url = storage_url(out, storage)
    # Every point is queued with its values: the sampler is never asked for one.
    study = optuna.create_study(study_name=STUDY_NAME, storage=open_storage(url), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)
    stored = study.user_attrs.get("sweep")
    if stored is not None and Sweep.from_dict(stored) != sweep:
        reason = why_not_extended(Sweep.from_dict(stored), sweep)
        if reason:
            raise UserError(f"{url} holds another sweep ({describe(Sweep.from_dict(stored))}): {reason}; to extend "
                            "it, give every value it has and add new ones, or choose another --out or --storage")
    if stored != sweep.to_dict():
        study.set_user_attr("sweep", sweep.to_dict())
    queued = queue_new(study, sweep, sweep.points())
    if stored is None:
        echo(f"sweep of {queued} points queued in {url}")
    elif queued:
        echo(f"sweep extended: {queued} new point{'s' if queued > 1 else ''} queued, its earlier points kept")
    if pruning is False and (count := requeue_pruned(study)):
        echo(f"{count} pruned point{'s' if count > 1 else ''} queued again, to resume without pruning")
    elif pruning and (count := requeue_finalists(study, sweep.seeds[0])):
        echo(f"{count} pruned point{'s' if count > 1 else ''} of later seeds queued again: the first seed kept "
             f"{'their settings' if count > 1 else 'its setting'}")
    return study


def numbers(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def describe(sweep: Sweep) -> str:
    tuned = (f"{sweep.trials} trials of each optimizer's search space" if sweep.searched else
             f"lrs {numbers(sweep.lrs)}, wds {numbers(sweep.wds)}, warmups {numbers(sweep.warmups)}")
    confirmed = f", confirmation seeds {numbers(sweep.confirm_seeds)}" if sweep.confirm_seeds else ""
    return (f"optimizers {','.join(sweep.optimizers)}, {tuned}, batch sizes {numbers(sweep.batch_sizes)}, seeds "
            f"{numbers(sweep.seeds)}{confirmed}, {counted(sweep.epochs, 'epoch')}, val size {sweep.val_size}, schedule "
            f"{sweep.schedule}")


def lock_path(out: Path, name: str, trial_number: int) -> Path:
    """The file a worker holds locked while it runs a trial's point: the
    operating system lets go of it when the worker dies, however it dies."""
    return out / ".running" / f"{name}.{trial_number}"


@contextlib.contextmanager
def holding(path: Path) -> Iterator[None]:
    """Hold `path` locked while the block runs. The file is locked before it
    gets its name (a locked temporary file renamed into place): another worker
    that finds it finds it held, never in the moment between its creation and
    its lock, when it would look abandoned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("a", dir=path.parent, prefix=".taking.", delete=False) as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        os.replace(handle.name, path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def abandoned(path: Path) -> bool:
    """Whether a point's lock file is there but nobody holds it: its worker died.
    (Opened without creating it: a file its worker has just removed stays gone.)"""
    if fcntl is None:
        return False
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


def requeue_abandoned(study, out: Path) -> None:
    """Points whose worker died on this machine (its lock let go) are queued
    again at once, without waiting for the heartbeat's grace period. Of several
    workers that notice, the one whose FAIL the storage takes queues it."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        name = trial.user_attrs.get("run")
        if name is None or not abandoned(lock_path(out, name, trial.number)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker got there first
            continue
        lock_path(out, name, trial.number).unlink(missing_ok=True)
        enqueue(study, queue_attrs(trial))


def stopped_points_first(study, out: Path) -> None:
    """Points that a stop left part-trained (their run directory exists) move
    to the head of the queue, so that a resumed sweep finishes what it had
    begun before it starts anything new: queued again at the back, they would
    leave a confirmation under way without the seeds it had nearly finished.
    Only while no worker anywhere is running: Optuna takes queued trials oldest
    first and cannot reorder them, so each is queued anew in the new order and
    the old one taken off the queue (asked, then failed). A point whose worker
    died (killed, or the machine stopped) counts as stopped: queued again first."""
    import optuna

    requeue_abandoned(study, out)
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        return

    def begun(trial) -> bool:
        return "run" in trial.user_attrs and (out / folder_of(trial) / trial.user_attrs["run"]).exists()

    order = sorted(waiting, key=lambda t: not begun(t))  # stable: each part keeps its order
    if [t.number for t in order] == [t.number for t in waiting]:
        return
    for trial in order:
        enqueue(study, queue_attrs(trial))
    with warnings.catch_warnings():  # ask() warns that a heartbeat needs optimize(): this trial beats no heart
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        for _ in waiting:  # the oldest waiting trials: the old queue
            study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)


def remaining(study, out: Path) -> int:
    """Points still queued (after queueing again those whose worker died)."""
    import optuna

    requeue_abandoned(study, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since Optuna 2.9
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def run_point(config: RunConfig, out: Path, data_dir: Path, train, test, *, echo: Echo, stop: StopRequest | None,
              bars: bool | None, folder: str = TUNING, prune: Callable[[int, float | None], bool] | None = None,
              keep_pruned: bool = False) -> dict:
    """One point's run: trained (or resumed) in out/<folder>/<name>, or read back
    if it has ended (or was pruned, with `keep_pruned`)."""
    path = out / folder / config.run_name()
    ended = FINISHED + ("pruned",) if keep_pruned else FINISHED
    if path.exists() and RunDir(path).status() in ended:
        return RunDir(path).summary()
    if path.exists():
        run = RunDir(path)
        check_resumable(run, data_dir, len(train))
    else:
        run = RunDir.create(path, run_metadata(config, train.images.device, data_dir, len(train)))
    return train_run(config, run, train, test, bars=bars, echo=echo, stop=stop, prune=prune)


def point_line(config: RunConfig, sweep: Sweep, confirming: bool) -> str:
    """"lamb16, batch 8192, lr 0.03, wd 0.01, ..., seed 1": the settings a point trains with."""
    parts = [config.optimizer, f"batch {config.batch_size}", f"lr {config.lr:g}", f"wd {config.wd:g}"]
    parts += [f"{name} {getattr(config, name):g}" for name in ("beta1", "beta2") if getattr(config, name) is not None]
    if sweep.searched or sweep.warmups != (DEFAULTS.warmup,) or confirming:
        parts.append(f"warmup {config.warmup:g}")
    return ", ".join(parts) + f", {'confirmation ' if confirming else ''}seed {config.seed}"


def work(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, train: Split, test: Split, *,
         echo: Echo = print, bars: bool | None = None, stop: StopRequest | None = None,
         worker: str = "worker", prune: bool = False) -> list[str]:
    """Take queued points one at a time until none is left; returns the run
    names of the points this worker took. Each point is a trial of the study (its heartbeat
    kept by Optuna while it runs); a point stopped by Ctrl-C is queued again.
    Each epoch's validation accuracy is reported to the trial; with `prune`, a
    tuning point clearly below its group's best at that epoch stops (Optuna's PRUNED)."""
    import optuna

    study = open_study(sweep, out, storage, echo=lambda line: None)
    first_seed = sweep.seeds[0]
    taken: list[str] = []
    while remaining(study, out):
        current: dict[str, Any] = {}

        def objective(trial) -> float:
            name = trial.user_attrs.get("run")
            if name is None:  # not a queued point: another worker took the last one first
                raise optuna.TrialPruned("no point left")
            point, folder = point_of(trial), folder_of(trial)
            current.update(attrs=queue_attrs(trial))
            config = sweep.config(point)
            confirming = folder == CONFIRM
            echo(f"[{worker}] {point_line(config, sweep, confirming)} ({remaining(study, out)} more queued)")

            def judge(epoch: int, accuracy: float | None) -> bool:
                if accuracy is not None:
                    trial.report(accuracy, epoch)
                if confirming or not prune or not should_prune(study, point, name, epoch, accuracy, first_seed):
                    return False
                if point["seed"] != first_seed:
                    echo(f"[{worker}] {name}: its setting was pruned on seed {first_seed}; not trained further")
                return True

            # Under --prune a pruned point stays so, but for a later seed's finalist (queued again to train in full).
            finalist = point["seed"] != first_seed and not first_seed_pruned(study, name, first_seed)
            with holding(lock_path(out, name, trial.number)):
                summary = run_point(config, out, data_dir, train, test, echo=echo, stop=stop, bars=bars,
                                    folder=folder, prune=judge, keep_pruned=prune and not finalist and not confirming)
            trial.set_user_attr("status", summary["status"])
            trial.set_user_attr("final_test_accuracy", summary.get("final_test_accuracy"))
            if summary["status"] == "pruned":
                raise optuna.TrialPruned(f"after epoch {summary['epochs_completed']}")
            # A diverged run scores 0: a setting that diverges on some seed is a poor choice.
            completed = summary["status"] == "completed"
            return (summary.get("final_val_accuracy") or 0.0) if completed else 0.0

        try:
            study.optimize(objective, n_trials=1, gc_after_trial=False)
        except (Interrupted, KeyboardInterrupt):
            if "attrs" in current:  # queued again for whoever comes next; its run resumes
                enqueue(study, current["attrs"])
            raise
        if "attrs" not in current:
            break
        taken.append(current["attrs"]["run"])
    return taken


def worker_process(index: int, sweep: dict, out: str, storage: str | None, data_dir: str, device: str,
                   prune: bool = False) -> None:
    """One of --workers N local processes (multiprocessing's spawn)."""
    torch.set_num_threads(THREADS_PER_POINT)
    name = f"worker {index + 1}"
    try:
        train, test = load_train_and_test(Path(data_dir), torch.device(device))
        with stop_on_signals() as stop, stop_when_orphaned(stop):
            work(Sweep.from_dict(sweep), Path(out), storage, Path(data_dir), train, test,
                 echo=lambda line: print(line, flush=True), bars=False, stop=stop, worker=name, prune=prune)
    except (Interrupted, KeyboardInterrupt):
        print(f"[{name}] stopped; its point is queued again", flush=True)
        raise SystemExit(130)
    except UserError as error:
        print(f"[{name}] error: {error}", flush=True)
        raise SystemExit(1)


@contextlib.contextmanager
def stop_when_orphaned(stop: StopRequest, every: float = 0.5) -> Iterator[None]:
    """Ask the running point to stop, as Ctrl-C would (its point queued again),
    if the process that started this worker dies without stopping it (kill -9):
    a worker never trains on unwatched."""
    import threading

    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if os.getppid() != parent:
                stop.request()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def run_workers(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, device: torch.device,
                workers: int, echo: Echo = print, prune: bool = False) -> None:
    """--workers N: N processes, a thread each, take points from the study
    until none is left. Ctrl-C stops them all, each point it stops queued again."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_process,
                                 args=(i, sweep.to_dict(), str(out), storage, str(data_dir), str(device), prune))
                 for i in range(workers)]
    for process in processes:
        process.start()

    def relay(signum, frame) -> None:  # Ctrl-C reaches every process; a SIGINT sent to this one alone is passed on
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGINT)

    # Installed explicitly: a sweep started in the background by a script inherits SIGINT ignored, and
    # Python's own Ctrl-C handler is then never set, so this process would go on waiting.
    previous = signal.signal(signal.SIGINT, relay)
    try:
        for process in processes:
            process.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    codes = [p.exitcode for p in processes]
    if any(code == 130 for code in codes):
        raise Interrupted(out)
    if any(code != 0 for code in codes):
        raise UserError(f"a sweep worker failed (exit codes {codes}); its lines above say why")


def load_sweep(out: Path, storage: str | None) -> Sweep:
    """The sweep stored in a folder's (or a storage's) study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(out, storage)
    if storage is None and not (out / DATABASE).is_file():
        raise UserError(f"{out} holds no sweep ({DATABASE} is missing); give the folder a sweep wrote, or --storage")
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(url))
    except KeyError as error:
        raise UserError(f"{url} holds no sweep; give the folder or --storage a sweep wrote") from error
    return Sweep.from_dict(study.user_attrs["sweep"])


def check_workers(workers: int | None, echo: Echo = print) -> int:
    """--workers, one per core by default; more than the cores is allowed, with a word on what it costs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers is None:
        return cores
    if workers > cores:
        echo(f"warning: --workers {workers} on {cores} CPU core{'s' if cores > 1 else ''}: each point trains on one "
             f"thread, so {workers - cores} of them wait for a core and every point runs slower; --workers {cores} "
             "finishes sooner")
    return workers


def check_sweep(sweep: Sweep) -> None:
    for name in sweep.optimizers:
        registry.check_available(name)
    for name, values in (("--optimizers", sweep.optimizers), ("--lrs", sweep.lrs),
                         ("--batch-sizes", sweep.batch_sizes), ("--wds", sweep.wds), ("--seeds", sweep.seeds),
                         ("--confirm-seeds", sweep.confirm_seeds)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"{name} lists {repeated[0]} twice; list each value once")
    reused = sorted(set(sweep.seeds) & set(sweep.confirm_seeds))
    if reused:
        raise UserError(f"confirmation seed {reused[0]} is also a tuning seed: the seeds that choose a setting must "
                        "not judge it; give --confirm-seeds outside --seeds")


def unfinished_tuning(study) -> tuple[int, int]:
    """Tuning points queued and running (by any worker, on any machine)."""
    import optuna

    states = [t.state for t in study.get_trials(deepcopy=False) if folder_of(t) == TUNING]
    return states.count(optuna.trial.TrialState.WAITING), states.count(optuna.trial.TrialState.RUNNING)


def chosen_settings(out: Path) -> list[RunConfig]:
    """Each optimizer and batch size's chosen setting, from the tuning runs."""
    from .runs import load_runs
    from .tuning import choose

    return [c.config for c in choose(load_runs([out / TUNING], warn=lambda line: None)).values()]


def confirmation_points(chosen: list[RunConfig], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """Each chosen setting on each confirmation seed, seed by seed: a
    confirmation stopped partway (days of it on a small machine) has compared
    every optimizer and batch size on the same seeds, where setting by setting
    it would hold all seeds of the first optimizers and none of the last."""
    return [dict(optimizer=c.optimizer, batch_size=c.batch_size, lr=c.lr, wd=c.wd, warmup=c.warmup, beta1=c.beta1,
                 beta2=c.beta2, seed=seed)
            for seed in seeds for c in chosen]


def queue_confirmation(sweep: Sweep, out: Path, storage: str | None, echo: Echo = print) -> int:
    """Once every tuning point has ended: each chosen setting on every
    confirmation seed, queued (those not queued before); returns how many."""
    study = open_study(sweep, out, storage, echo=lambda line: None)
    queued, running = unfinished_tuning(study)
    if queued or running:
        echo(f"confirmation waits until every tuning point has ended ({queued} queued, {running} running "
             "elsewhere); run this sweep again then")
        return 0
    count = queue_new(study, sweep, confirmation_points(chosen_settings(out), sweep.confirm_seeds), CONFIRM)
    if count:
        echo(f"{count} confirmation point{'s' if count > 1 else ''} queued: each chosen setting on seeds "
             f"{numbers(sweep.confirm_seeds)}, which took no part in choosing it")
    return count


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` while the block runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def take_points(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, train: Split, test: Split, *,
                workers: int, prune: bool, echo: Echo, bars: bool | None) -> None:
    """The queued points, on this process (`workers` 1, stopped by Ctrl-C
    between batches) or on `workers` processes."""
    if workers == 1:
        with stop_on_signals() as stop, threads(THREADS_PER_POINT):
            work(sweep, out, storage, data_dir, train, test, echo=echo, bars=bars, stop=stop, prune=prune)
    else:
        run_workers(sweep, out, storage, data_dir, train.images.device, workers, echo=echo, prune=prune)


def run(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, train: Split, test: Split, *, workers: int,
        prune: bool, retrain_chosen: bool, echo: Echo = print, bars: bool | None = None) -> None:
    """The sweep's queued points; then, with confirmation seeds, each chosen
    setting on them; with `retrain_chosen`, each chosen setting trained again
    on all the images."""
    stopped_points_first(open_study(sweep, out, storage, echo=echo, pruning=prune), out)
    take_points(sweep, out, storage, data_dir, train, test, workers=workers, prune=prune, echo=echo, bars=bars)
    if sweep.confirm_seeds and queue_confirmation(sweep, out, storage, echo):
        take_points(sweep, out, storage, data_dir, train, test, workers=workers, prune=prune, echo=echo, bars=bars)
    if retrain_chosen:
        with stop_on_signals() as stop:
            retrain(sweep, out, storage, data_dir, train, test, echo=echo, stop=stop, bars=bars)


def retrain(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, train: Split, test: Split, *,
            echo: Echo = print,
            stop: StopRequest | None = None, bars: bool | None = None) -> None:
    """Each chosen setting (per optimizer and batch size) trained again on the
    whole training set, validation images included, for every seed, into
    out/retrained: the figure a final model would get. Runs that ended are kept."""
    study = open_study(sweep, out, storage, echo=lambda line: None)
    queued, running = unfinished_tuning(study)
    if queued or running:
        echo(f"retrain waits until every point has ended ({queued} queued, {running} running); "
             "run this sweep with --retrain again then")
        return
    configs = [replace(c, seed=s, val_size=0) for c in chosen_settings(out) for s in sweep.seeds]
    for k, config in enumerate(configs, 1):
        echo(f"[retrain {k} of {len(configs)}] {config.optimizer}, batch {config.batch_size}, lr {config.lr:g}, "
             f"seed {config.seed}, on all {len(train)} training images")
        run_point(config, out, data_dir, train, test, echo=echo, stop=stop, bars=bars, folder="retrained")

"""Sweeps: optimizers x learning rates x batch sizes x weight decays x seeds,
each point an ordinary run directory, run through an Optuna study.

The study holds the grid (Optuna's GridSampler over it) and every point as a
queued trial (enqueue_trial): a worker takes the next point by popping a
queued trial, which the storage does atomically, so two workers never run the
same point, on one machine or on many sharing a database (--storage). The
GridSampler alone is not enough for that: at the end of a grid it hands
points still running elsewhere to idle workers, by design. A point stopped by
Ctrl-C is queued again at once; one whose worker died is found by Optuna's
heartbeat and queued again; its run directory resumes from its last epoch. A
finished run is never trained again: its directory is the record.

The learning rate is chosen per optimizer and batch size by validation
accuracy (training images held out, the same for every run), never by the
test set; the report gives the test accuracy of that choice.
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

from . import registry
from .config import DEFAULTS, RunConfig, parse_numbers, parse_seeds
from .data import Split, load_train_and_test
from .errors import Interrupted, UserError
from .loop import StopRequest, stop_on_signals, train_run
from .runs import FINISHED, RunDir, check_resumable, run_metadata

Echo = Callable[[str], None]
STUDY_NAME = "lamb16-sweep"
DATABASE = "sweep.db"  # the default storage, inside the sweep's folder
HEARTBEAT_SECONDS = 30  # a running point's worker reports this often...
GRACE_SECONDS = 180  # ...and is taken for dead (its point queued again) after this long without


@dataclass(frozen=True)
class Sweep:
    """A sweep's grid and the settings every point shares."""

    optimizers: tuple[str, ...]
    lrs: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    wds: tuple[float, ...] = (DEFAULTS.wd,)
    seeds: tuple[int, ...] = (1,)
    epochs: int = DEFAULTS.epochs
    val_size: int = 10_000
    test_batch_size: int = DEFAULTS.test_batch_size
    log_interval: int = DEFAULTS.log_interval
    schedule: str = DEFAULTS.schedule  # shared by every point
    warmups: tuple[float, ...] = (DEFAULTS.warmup,)  # swept

    def points(self) -> list[RunConfig]:
        """Seed-major, so that a sweep cut short has whole grids of its first seeds;
        within a seed, the largest batches (the regime LAMB is for) first; the
        lrs from the grid's middle outwards, so that pruning meets the likely
        best first and the extremes, likely hopeless, last."""
        grid = itertools.product(self.seeds, sorted(self.batch_sizes, reverse=True), self.optimizers,
                                 middle_out(self.lrs), self.wds, self.warmups)
        return [RunConfig(optimizer=o, batch_size=b, lr=lr, wd=wd, seed=s, epochs=self.epochs,
                          test_batch_size=self.test_batch_size, log_interval=self.log_interval,
                          val_size=self.val_size, schedule=self.schedule, warmup=warmup)
                for s, b, o, lr, wd, warmup in grid]

    def search_space(self) -> dict[str, list]:
        space = dict(optimizer=list(self.optimizers), batch_size=list(self.batch_sizes), lr=list(self.lrs),
                     wd=list(self.wds), seed=list(self.seeds))
        if self.warmups != (DEFAULTS.warmup,):  # a sweep without warmup keeps the grid it always had
            space["warmup"] = list(self.warmups)
        return space

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Sweep":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def middle_out(values: tuple[float, ...]) -> list[float]:
    """Sorted values reordered from the middle outwards: 1,2,3,4,5,6 -> 3,4,2,5,1,6."""
    ordered = sorted(values)
    center = (len(ordered) - 1) / 2
    return [ordered[i] for i in sorted(range(len(ordered)), key=lambda i: (abs(i - center), i))]


# --prune: on the sweep's first seed, a point is stopped after an epoch when
# its validation accuracy is clearly below the best at that epoch among the
# points of the same optimizer, batch size and seed: its error more than twice
# the best's, and at least half a point more. Measured on a small grid both ways
# (README), the same lrs chosen. Later seeds are not judged by epoch: they train
# in full the settings the first seed kept, so that the choice among those is by
# the mean over every seed, and skip the ones it pruned (out of the choice either
# way). Judged seed by seed, early noise would get one chance a seed to drop a
# finalist (measured: LAMB16's best lr at batch 8192, at epoch 2 of a third seed).
PRUNE_GROUP = ("optimizer", "batch_size", "seed")
PRUNE_ERROR_RATIO = 2.0
PRUNE_MARGIN = 0.005


def clearly_below(accuracy: float, best: float) -> bool:
    error, best_error = 1 - accuracy, 1 - best
    return error > max(PRUNE_ERROR_RATIO * best_error, best_error + PRUNE_MARGIN)


def best_peer(study, params: dict, name: str, epoch: int) -> float | None:
    """The best validation accuracy reported at `epoch` by the other points of
    `params`' group (every trial, running or ended, of another run)."""
    values = [t.intermediate_values[epoch] for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get("run") not in (None, name) and epoch in t.intermediate_values
              and all(t.params.get(k) == params[k] for k in PRUNE_GROUP)]
    return max(values, default=None)


def params_of(trial) -> dict:
    """A trial's point: its parameters, or while it waits in the queue, the ones it was queued with."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def latest_trials(study) -> dict[str, Any]:
    """Each point's latest trial, by run name (a pruned or stopped point is queued again as a new trial)."""
    return {t.user_attrs["run"]: t for t in study.get_trials(deepcopy=False) if "run" in t.user_attrs}


def setting_key(params: dict) -> tuple:
    """A point's setting: every parameter but the seed."""
    return tuple(sorted((key, value) for key, value in params.items() if key != "seed"))


def pruned_on_first_seed(latest: dict[str, Any], first_seed: int) -> set[tuple]:
    """The settings that stand pruned on the sweep's first seed, from each point's latest trial."""
    import optuna

    return {setting_key(params_of(t)) for t in latest.values()
            if t.state == optuna.trial.TrialState.PRUNED and params_of(t).get("seed") == first_seed}


def first_seed_pruned(study, params: dict, first_seed: int) -> bool:
    """Whether `params`' setting stands pruned on the sweep's first seed."""
    return setting_key(params) in pruned_on_first_seed(latest_trials(study), first_seed)


def should_prune(study, params: dict, name: str, epoch: int, accuracy: float | None, first_seed: int) -> bool:
    """The --prune rule for a point after `epoch` (0: before it trains, no accuracy yet)."""
    if params["seed"] != first_seed:
        return first_seed_pruned(study, params, first_seed)
    best = best_peer(study, params, name, epoch) if accuracy is not None else None
    return best is not None and clearly_below(accuracy, best)


def requeue_finalists(study, first_seed: int) -> int:
    """Points of later seeds that stand pruned though the first seed kept their
    setting (pruned before the first seed's point ended, or by an earlier rule)
    queued again, to train in full; returns how many."""
    import optuna

    latest = latest_trials(study)
    dropped = pruned_on_first_seed(latest, first_seed)
    again = [(name, params_of(t)) for name, t in latest.items() if t.state == optuna.trial.TrialState.PRUNED
             and params_of(t).get("seed") != first_seed and setting_key(params_of(t)) not in dropped]
    for name, params in again:
        study.enqueue_trial(params, user_attrs={"run": name})
    return len(again)


def requeue_pruned(study) -> int:
    """Pruned points queued again (a sweep run without --prune finishes them,
    each resuming from the epoch it was pruned at); returns how many."""
    import optuna

    pruned = [(name, t.params) for name, t in latest_trials(study).items() if t.state == optuna.trial.TrialState.PRUNED]
    for name, params in pruned:
        study.enqueue_trial(params, user_attrs={"run": name})
    return len(pruned)


# The original README's claims (LAMB16 enables much larger batches, and beats
# 8-bit AdamW at large batches), tuned: every batch size from 128 to 8192 by
# factors of 4, learning rates on a half-decade log grid, 3 seeds, 10 epochs.
PRESETS = {
    "claims": Sweep(
        optimizers=("adamw", "bnb-adamw8bit", "ao-adamw4bit", "muon", "lamb", "lamb16"),
        lrs=(0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
        batch_sizes=(128, 512, 2048, 8192),
        seeds=(1, 2, 3),
        epochs=10,
        schedule="cosine",  # as people train: a linear warmup over a tenth of the steps, then a cosine to 0
        warmups=(0.1,),
    ),
}


def from_options(
    preset: str | None, optimizers: list[str] | None, lrs: str | None, batch_sizes: str | None, wds: str | None,
    seeds: str | None, epochs: int | None, val_size: int | None, schedule: str | None = None,
    warmups: str | None = None,
) -> Sweep:
    """The sweep the command line asks for: a preset's grid (or the defaults)
    with each option given replacing its part."""
    base = PRESETS[preset] if preset else Sweep(optimizers=("adamw", "lamb", "lamb16"), lrs=(),
                                                batch_sizes=(DEFAULTS.batch_size,))
    sweep = Sweep(
        optimizers=tuple(optimizers) if optimizers else base.optimizers,
        lrs=parse_numbers(lrs, "--lrs") if lrs else base.lrs,
        batch_sizes=parse_numbers(batch_sizes, "--batch-sizes", int) if batch_sizes else base.batch_sizes,
        wds=parse_numbers(wds, "--wds", allow_zero=True) if wds else base.wds,
        seeds=tuple(parse_seeds(seeds)) if seeds else base.seeds,
        epochs=epochs or base.epochs,
        val_size=val_size or base.val_size,
        schedule=schedule or base.schedule,
        warmups=parse_numbers(warmups, "--warmups", allow_zero=True) if warmups else base.warmups,
    )
    if any(w >= 1 for w in sweep.warmups):
        raise UserError(f"invalid --warmups {warmups!r}: each is a fraction of the run, below 1 (e.g. 0,0.1)")
    if not sweep.lrs:
        raise UserError("no learning rates: give --lrs (e.g. --lrs 0.005,0.02) or a --preset")
    return sweep


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
    """The sweep's study, created with every point queued, or joined: then its
    grid and settings must be this sweep's. `pruning` False (a sweep without
    --prune): its pruned points queued again; True: its later seeds' pruned
    points whose setting the first seed kept."""
    import optuna

    # Errors only: a point stopped by Ctrl-C is a trial Optuna logs as failed, with
    # a traceback; the sweep says so in one line and queues it again.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)  # the runs, and the default storage
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=open_storage(storage_url(out, storage)), direction="maximize",
        sampler=optuna.samplers.GridSampler(sweep.search_space(), seed=0), load_if_exists=True,
    )
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", sweep.to_dict())
        for config in sweep.points():
            params = {k: getattr(config, k) for k in sweep.search_space()}
            study.enqueue_trial(params, user_attrs={"run": config.run_name()}, skip_if_exists=True)
        echo(f"sweep of {len(sweep.points())} points queued in {storage_url(out, storage)}")
    elif Sweep.from_dict(stored) != sweep:
        raise UserError(f"{storage_url(out, storage)} holds another sweep ({describe(Sweep.from_dict(stored))}); "
                        "join it with the same options, or choose another --out or --storage")
    elif pruning is False and (count := requeue_pruned(study)):
        echo(f"{count} pruned point{'s' if count > 1 else ''} queued again, to resume without pruning")
    elif pruning and (count := requeue_finalists(study, sweep.seeds[0])):
        echo(f"{count} pruned point{'s' if count > 1 else ''} of later seeds queued again: the first seed kept "
             f"{'their settings' if count > 1 else 'its setting'}")
    return study


def describe(sweep: Sweep) -> str:
    return (f"optimizers {','.join(sweep.optimizers)}, lrs {','.join(f'{x:g}' for x in sweep.lrs)}, batch sizes "
            f"{','.join(map(str, sweep.batch_sizes))}, wds {','.join(f'{x:g}' for x in sweep.wds)}, seeds "
            f"{','.join(map(str, sweep.seeds))}, {sweep.epochs} epochs, val size {sweep.val_size}, schedule "
            f"{sweep.schedule}, warmups {','.join(f'{x:g}' for x in sweep.warmups)}")


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
        study.enqueue_trial(trial.params, user_attrs={"run": name})


def remaining(study, out: Path) -> int:
    """Points still queued (after queueing again those whose worker died)."""
    import optuna

    requeue_abandoned(study, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since Optuna 2.9
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def run_point(config: RunConfig, out: Path, data_dir: Path, train, test, *, echo: Echo, stop: StopRequest | None,
              bars: bool | None, folder: str = "runs", prune: Callable[[int, float | None], bool] | None = None,
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


def work(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, train: Split, test: Split, *,
         echo: Echo = print, bars: bool | None = None, stop: StopRequest | None = None,
         worker: str = "worker", prune: bool = False) -> list[str]:
    """Take queued points one at a time until none is left; returns the run
    names of the points this worker took. Each point is a trial of the study (its heartbeat
    kept by Optuna while it runs); a point stopped by Ctrl-C is queued again.
    Each epoch's validation accuracy is reported to the trial; with `prune`, a
    point clearly below its group's best at that epoch stops (Optuna's PRUNED)."""
    import optuna

    study = open_study(sweep, out, storage, echo=lambda line: None)
    taken: list[str] = []
    while remaining(study, out):
        current: dict[str, Any] = {}

        def objective(trial) -> float:
            name = trial.user_attrs.get("run")
            if name is None:  # not a queued point: another worker took the last one first
                raise optuna.TrialPruned("no point left")
            params = {k: trial.suggest_categorical(k, v) for k, v in sweep.search_space().items()}
            current.update(params=params, name=name)
            config = replace(sweep.points()[0], **params)
            echo(f"[{worker}] {config.optimizer}, batch {config.batch_size}, lr {config.lr:g}, wd {config.wd:g}, "
                 + (f"warmup {config.warmup:g}, " if "warmup" in params else "")
                 + f"seed {config.seed} ({remaining(study, out)} more queued)")
            def judge(epoch: int, accuracy: float | None) -> bool:
                if accuracy is not None:
                    trial.report(accuracy, epoch)
                if not prune or not should_prune(study, params, name, epoch, accuracy, sweep.seeds[0]):
                    return False
                if params["seed"] != sweep.seeds[0]:
                    echo(f"[{worker}] {name}: its setting was pruned on seed {sweep.seeds[0]}; not trained further")
                return True

            # Under --prune a pruned point stays so, but for a later seed's finalist (queued again to train in full).
            finalist = params["seed"] != sweep.seeds[0] and not first_seed_pruned(study, params, sweep.seeds[0])
            with holding(lock_path(out, name, trial.number)):
                summary = run_point(config, out, data_dir, train, test, echo=echo, stop=stop, bars=bars,
                                    prune=judge, keep_pruned=prune and not finalist)
            trial.set_user_attr("status", summary["status"])
            trial.set_user_attr("final_test_accuracy", summary.get("final_test_accuracy"))
            if summary["status"] == "pruned":
                raise optuna.TrialPruned(f"after epoch {summary['epochs_completed']}")
            # A diverged run scores 0: a learning rate that diverges on some seed is a poor choice.
            completed = summary["status"] == "completed"
            return (summary.get("final_val_accuracy") or 0.0) if completed else 0.0

        try:
            study.optimize(objective, n_trials=1, gc_after_trial=False)
        except (Interrupted, KeyboardInterrupt):
            if "params" in current:  # queued again for whoever comes next; its run resumes
                study.enqueue_trial(current["params"], user_attrs={"run": current["name"]})
            raise
        if "name" not in current:
            break
        taken.append(current["name"])
    return taken


def worker_process(index: int, sweep: dict, out: str, storage: str | None, data_dir: str, device: str,
                   threads: int, prune: bool = False) -> None:
    """One of --workers N local processes (multiprocessing's spawn)."""
    torch.set_num_threads(threads)
    name = f"worker {index + 1}"
    try:
        train, test = load_train_and_test(Path(data_dir), torch.device(device))
        with stop_on_signals() as stop:
            work(Sweep.from_dict(sweep), Path(out), storage, Path(data_dir), train, test,
                 echo=lambda line: print(line, flush=True), bars=False, stop=stop, worker=name, prune=prune)
    except (Interrupted, KeyboardInterrupt):
        print(f"[{name}] stopped; its point is queued again", flush=True)
        raise SystemExit(130)
    except UserError as error:
        print(f"[{name}] error: {error}", flush=True)
        raise SystemExit(1)


def run_workers(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, device: torch.device,
                workers: int, echo: Echo = print, prune: bool = False) -> None:
    """--workers N: N processes split the machine's threads and take points from
    the study until none is left. Ctrl-C stops them all, each point it stops
    queued again."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_process,
                                 args=(i, sweep.to_dict(), str(out), storage, str(data_dir), str(device), threads, prune))
                 for i in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # Ctrl-C reaches every process; a SIGINT sent to this one alone is passed on
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join()
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


def check_sweep(sweep: Sweep) -> None:
    for name in sweep.optimizers:
        registry.check_available(name)
    for name, values in (("--optimizers", sweep.optimizers), ("--lrs", sweep.lrs),
                         ("--batch-sizes", sweep.batch_sizes), ("--wds", sweep.wds), ("--seeds", sweep.seeds)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"{name} lists {repeated[0]} twice; list each value once")


def run(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, train: Split, test: Split, *, workers: int,
        prune: bool, retrain_chosen: bool, echo: Echo = print, bars: bool | None = None) -> None:
    """The sweep's queued points, on this process (`workers` 1, stopped by
    Ctrl-C between batches) or on `workers` processes; then, with
    `retrain_chosen`, each chosen setting trained again on all the images."""
    open_study(sweep, out, storage, echo=echo, pruning=prune)
    if workers == 1:
        with stop_on_signals() as stop:
            work(sweep, out, storage, data_dir, train, test, echo=echo, bars=bars, stop=stop, prune=prune)
    else:
        run_workers(sweep, out, storage, data_dir, train.images.device, workers, echo=echo, prune=prune)
    if retrain_chosen:
        with stop_on_signals() as stop:
            retrain(sweep, out, storage, data_dir, train, test, echo=echo, stop=stop, bars=bars)


def retrain(sweep: Sweep, out: Path, storage: str | None, data_dir: Path, train: Split, test: Split, *,
            echo: Echo = print,
            stop: StopRequest | None = None, bars: bool | None = None) -> None:
    """Each chosen setting (per optimizer and batch size) trained again on the
    whole training set, validation images included, for every seed, into
    out/retrained: the figure a final model would get. Runs that ended are kept."""
    import optuna

    from .runs import load_runs
    from .tuning import choose

    study = open_study(sweep, out, storage, echo=lambda line: None)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if remaining(study, out) or running:
        echo(f"retrain waits until every point has ended ({remaining(study, out)} queued, {len(running)} running); "
             "run this sweep with --retrain again then")
        return
    choices = choose(load_runs([out / "runs"], warn=lambda line: None))
    configs = [replace(sweep.points()[0], optimizer=c.optimizer, batch_size=c.batch_size, lr=c.lr, wd=c.wd,
                       warmup=c.warmup, seed=s, val_size=0) for c in choices.values() for s in sweep.seeds]
    for k, config in enumerate(configs, 1):
        echo(f"[retrain {k} of {len(configs)}] {config.optimizer}, batch {config.batch_size}, lr {config.lr:g}, "
             f"seed {config.seed}, on all {len(train)} training images")
        run_point(config, out, data_dir, train, test, echo=echo, stop=stop, bars=bars, folder="retrained")

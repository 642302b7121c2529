"""Several runs at once: seeds of one optimizer (train), optimizers x seeds at
one setting (compare), and the original README's two figures (reproduce).
Each writes its runs, a figure with seed bands and results.md; given its
folder again with resume, it skips the runs that ended and resumes the others."""

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from plots import check_figure_path, comparison_figure, figure_title

from . import aggregate, registry
from .config import REPRODUCE_EPOCHS, REPRODUCE_WD, REPRODUCED_FIGURES, RunConfig, counted
from .data import Split
from .errors import UserError
from .loop import StopRequest, stop_on_signals, train_run
from .parallel import SINGLE, Parallel, check_batch, from_main, process_group
from .runs import (FINISHED, FOLDER_RECORD, RunDir, check_resumable, claim_dir, free_path, fresh_dir, load_runs, run_metadata,
                   writable_dir, write_atomic)

Echo = Callable[[str], None]


def check_optimizers(names: list[str]) -> list[str]:
    """Every name known, listed once, and buildable here: checked before any run starts."""
    if not names:
        raise UserError("no optimizer given; list at least one, e.g. --optimizers adam,lamb16")
    for name in names:
        registry.spec(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--optimizers lists {repeated[0]} more than once; list each optimizer once")
    for name in names:
        registry.check_available(name)
    return names


def check_options(config: RunConfig) -> None:
    """Options an optimizer does not take (LAMB16's --trust-scale for Adam) fail before training."""
    takes = registry.spec(config.optimizer).options
    for name in ("trust_scale", "beta1", "beta2"):
        if getattr(config, name) is not None and name not in takes:
            which = "LAMB16 only" if name == "trust_scale" else "optimizers that have it"
            raise UserError(f"--{name.replace('_', '-')} applies to {which}, not {config.optimizer}; drop it")


def plan(base: RunConfig, optimizers: list[str], seeds: list[int]) -> list[RunConfig]:
    """Seed-major: with a study cut short, every optimizer has the same seeds done."""
    return [replace(base, optimizer=o, seed=s) for s in seeds for o in optimizers]


def check_out(out: Path, resume: bool) -> None:
    """A study's folder is new, or existing only when resuming: a new study is
    never mixed into an old one's runs."""
    if out.is_dir() and any(p.name != FOLDER_RECORD for p in out.iterdir()) and not resume:
        raise UserError(f"--out {out} already holds runs; pass --resume to finish them, or choose another --out")


def comparison_dir(out: Path | None, resume: bool, base: RunConfig) -> Path:
    """compare's folder: --out, which --resume needs, else a new one named by the setting; checked as check_out."""
    if resume and out is None:
        raise UserError("--resume needs --out, the folder of the comparison to finish")
    out = out or fresh_dir(Path("runs"), f"compare_{base.setting()}")
    check_out(out, resume)
    return out


def check_same_settings(run: RunDir, config: RunConfig) -> None:
    stored = run.config()
    for name, value in config.to_dict().items():
        if getattr(stored, name) != value:
            raise UserError(
                f"{run.path} was run with {name} {getattr(stored, name)}, not {value}; resume with the settings in "
                "its config.json, or choose another --out"
            )


def run_all(
    configs: list[RunConfig], out: Path, train_data: Split, test_data: Split, data_dir: Path, *,
    name_of: Callable[[RunConfig], str], bars: bool | None, echo: Echo, tensorboard: Path | None = None,
) -> None:
    """Train each planned run in out/<name>, announcing "run k of n"; a run
    that ended is skipped, one that has begun resumes from its checkpoint.
    Ctrl-C stops the run under way after its batch (Interrupted)."""
    device = train_data.images.device
    with stop_on_signals() as stop:
        for k, config in enumerate(configs, 1):
            path = out / name_of(config)
            setting = (f"{config.optimizer}, seed {config.seed}: batch {config.batch_size}, lr {config.lr:g}, "
                       f"wd {config.wd:g}, {counted(config.epochs, 'epoch')}")
            if path.exists():
                run = RunDir(path)
                check_same_settings(run, config)
                check_resumable(run, data_dir, len(train_data))
                if run.status() in FINISHED:
                    echo(f"[run {k} of {len(configs)}] {setting}: {run.status()} before, skipped")
                    continue
            else:
                run = RunDir.create(path, run_metadata(config, device, data_dir, len(train_data)))
            echo(f"[run {k} of {len(configs)}] {setting}")
            train_run(config, run, train_data, test_data, bars=bars, echo=echo, stop=stop,
                      events=tensorboard / path.name if tensorboard else None)


def draw(runs: list[RunDir], figure: Path, title: str | None = None, log_y: bool = False,
         warn: Echo = print) -> tuple[str, str, Path]:
    """One mean curve with a seed band per optimizer and setting of `runs`
    (one run a seed); returns the results table, the title and the figure's path."""
    groups = aggregate.group_runs(runs, warn)
    seeds = max((len(g) for g in groups.values()), default=1)
    title = title or figure_title([run.config for run in runs], seeds)
    figure = comparison_figure(aggregate.all_curves(groups), figure, title, log_y)
    return aggregate.results_table(groups), title, figure


def report(out: Path, title: str | None = None, log_y: bool = False, echo: Echo = print,
           figure: Path | None = None) -> tuple[str, Path]:
    """Figure and results.md of the runs under `out`; returns the table and the figure's path."""
    runs = load_runs([out], warn=lambda line: echo(f"warning: {line}"))
    table, title, figure = draw(runs, figure or out / "figure.png", title, log_y,
                                warn=lambda line: echo(f"warning: {line}"))
    write_atomic(out / "results.md", f"## {title}\n\n{table}\n".encode())
    return table, figure


def plot(run_dirs: list[Path], output: Path | None, title: str | None, log_y: bool, force: bool,
         warn: Echo = print) -> tuple[list[RunDir], str, Path]:
    """The figure of saved runs (run directories, or folders holding them at
    any depth), into `output` or a new figure.png beside them; returns the
    runs, the results table and the figure's path. Checked before drawing."""
    runs = load_runs(run_dirs, warn=lambda line: warn(f"warning: {line}"))
    if not runs:
        raise UserError(f"no runs in {', '.join(map(str, run_dirs))}: a run directory holds config.json and metrics.jsonl")
    if output is not None and output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it, or choose another --output")
    if output is not None:
        try:
            check_figure_path(output)
        except ValueError as error:
            raise UserError(f"--output {error}") from None
    first = run_dirs[0]
    output = output or free_path((first.parent if (first / "config.json").is_file() else first) / "figure.png")
    writable_dir(output.parent, "--output")
    table, _, figure = draw(runs, output, title, log_y, warn=lambda line: warn(f"warning: {line}"))
    return runs, table, figure


def compare(
    base: RunConfig, optimizers: list[str], seeds: list[int], out: Path, train_data: Split, test_data: Split,
    data_dir: Path, *, log_y: bool = False, bars: bool | None = None, echo: Echo = print,
    tensorboard: Path | None = None,
) -> tuple[str, Path]:
    """Every optimizer with every seed at one setting, into out/<optimizer>_seed<N>;
    then the figure and results.md. Returns the table and the figure's path."""
    run_all(plan(base, optimizers, seeds), out, train_data, test_data, data_dir,
            name_of=lambda c: f"{c.optimizer}_seed{c.seed}", bars=bars, echo=echo, tensorboard=tensorboard)
    return report(out, log_y=log_y, echo=echo)


def reproduce(
    optimizers: list[str], seeds: list[int], out: Path, train_data: Split, test_data: Split, data_dir: Path, *,
    epochs: int = REPRODUCE_EPOCHS, bars: bool | None = None, echo: Echo = print,
) -> str:
    """Both figures of the original README (one compare each, into out/<name>),
    their PNGs beside results.md, which states each claim next to the measured
    mean and spread with a verdict."""
    sections, claims = [], []
    for figure in REPRODUCED_FIGURES:
        base = RunConfig(batch_size=figure["batch_size"], lr=figure["lr"], wd=REPRODUCE_WD, epochs=epochs)
        echo(f"== {figure['name']}: batch {figure['batch_size']}, lr {figure['lr']:g}")
        claim_dir(out / figure["name"], "reproduce")
        table, png = compare(base, optimizers, seeds, out / figure["name"], train_data, test_data, data_dir,
                             bars=bars, echo=echo)
        shutil.copyfile(png, out / f"{figure['name']}.png")
        groups = aggregate.group_runs(load_runs([out / figure["name"]], warn=lambda line: None))
        title = figure_title(base.to_dict(), len(seeds))
        sections.append(f"### {title}\n\n![{figure['name']}]({figure['name']}.png)\n\n{table}\n")
        setting = f"batch {figure['batch_size']}, lr {figure['lr']:g}"
        for variant in ("lamb16", "lamb16-seed"):
            row = aggregate.accuracy_claim(groups, variant, figure["claim"], min(figure["claim_epochs"], epochs))
            if row:
                claims.append(dict(row, claim=f"{setting}: {row['claim']}"))
        for other in ("adam", "lamb"):
            row = aggregate.faster_claim(groups, "lamb16", other)
            if row:
                claims.append(dict(row, claim=f"{setting}: {row['claim']}"))
    text = (
        "## Claims of the original README\n\n"
        "Verdicts from the 95% confidence interval of the mean over seeds: met (all of it at or above the "
        "claim), not met (all below), within noise (it straddles the claim).\n\n"
        f"{aggregate.claims_table(claims)}\n\n" + "\n".join(sections)
    )
    write_atomic(out / "results.md", text.encode())
    return text


def train_seeds(
    base: RunConfig, seeds: list[int], out: Path, train_data: Split, test_data: Split, data_dir: Path, *,
    bars: bool | None = None, echo: Echo = print, stop: StopRequest | None = None, parallel: Parallel = SINGLE,
    tensorboard: Path | None = None,
) -> list[Path]:
    """One optimizer, each seed a new run directory under `out` (never overwriting
    one); across processes, rank 0 makes it and every rank trains."""
    device = train_data.images.device
    paths = []
    for k, seed in enumerate(seeds, 1):
        config = replace(base, seed=seed)
        path = None
        if parallel.is_main:
            metadata = run_metadata(config, device, data_dir, len(train_data), parallel)
            path = RunDir.create(fresh_dir(out, config.run_name()), metadata).path
        run = RunDir(from_main(path, parallel))
        if len(seeds) > 1 and parallel.is_main:
            echo(f"[run {k} of {len(seeds)}] {config.optimizer}, seed {seed}")
        paths.append(run.path)
        train_run(config, run, train_data, test_data, bars=bars, echo=echo, stop=stop, parallel=parallel,
                  events=tensorboard / run.path.name if tensorboard else None)
    return paths


def resume_run(path: Path, train_data: Split, test_data: Split, data_dir: Path, *, bars: bool | None = None, echo: Echo = print,
               stop: StopRequest | None = None, parallel: Parallel = SINGLE, tensorboard: Path | None = None) -> dict:
    """Continue a run directory from its last checkpoint, on any number of processes."""
    run = RunDir(path)
    if run.status() in FINISHED:
        raise UserError(f"{path} already {run.status()}; nothing to resume (start a new run instead)")
    check_resumable(run, data_dir, len(train_data))
    return train_run(run.config(), run, train_data, test_data, bars=bars, echo=echo, stop=stop, parallel=parallel,
                     events=tensorboard / path.name if tensorboard else None)


def train(config: RunConfig, seeds: list[int], out: Path, train_data: Split, test_data: Split, data_dir: Path, *,
          fsdp: bool = False, bars: bool | None = None, echo: Echo = print, tensorboard: Path | None = None) -> None:
    """`cli.py train`: one optimizer on each seed, a new run directory each
    under `out`; started by torchrun, on all its processes (DDP, or FSDP2 with `fsdp`)."""
    out = claim_dir(out, "train")
    with process_group(fsdp, train_data.images.device) as processes, stop_on_signals() as stop:
        check_batch(config.batch_size, processes)
        paths = train_seeds(config, seeds, out, train_data, test_data, data_dir, bars=bars, echo=echo, stop=stop,
                            parallel=processes, tensorboard=tensorboard)
    if processes.is_main:
        for path in paths:
            echo(f"run written to {path}")


def resume(path: Path, train_data: Split, test_data: Split, data_dir: Path, *, fsdp: bool = False,
           bars: bool | None = None, echo: Echo = print, tensorboard: Path | None = None) -> None:
    """`cli.py train --resume`: the run at `path` continued from its last
    checkpoint, on any number of processes (check_resume_options first)."""
    with process_group(fsdp, train_data.images.device) as processes, stop_on_signals() as stop:
        summary = resume_run(path, train_data, test_data, data_dir, bars=bars, echo=echo, stop=stop,
                             parallel=processes, tensorboard=tensorboard)
    if processes.is_main:
        echo(f"{path}: {summary['status']}, final accuracy {100 * (summary['final_test_accuracy'] or 0):.2f}%")


# The options of train that a resumed run takes from its config.json instead.
RESUME_OPTIONS = {"optimizer": "--optimizer", "batch_size": "--batch-size", "test_batch_size": "--test-batch-size",
                  "epochs": "--epochs", "lr": "--lr", "wd": "--weight-decay", "seed": "--seed",
                  "log_interval": "--log-interval", "trust_scale": "--trust-scale", "schedule": "--schedule",
                  "warmup": "--warmup", "beta1": "--beta1", "beta2": "--beta2"}


def check_resume_options(path: Path, given: dict) -> None:
    """A resumed run continues as its config.json says: every option the
    command line gave must agree with it (`given`: RunConfig field -> value,
    plus "seeds" as a list and "out" as a folder)."""
    stored = RunDir(path).config()
    conflicts = []
    for name, value in given.items():
        if name == "seeds" and value != [stored.seed]:
            conflicts.append(f"--seeds {','.join(map(str, value))} (the run's seed: {stored.seed})")
        elif name == "out" and Path(value).resolve() != path.resolve().parent:
            conflicts.append(f"--out {value} (the run is in {path.resolve().parent})")
        elif name in RESUME_OPTIONS and getattr(stored, name) != value:
            conflicts.append(f"{RESUME_OPTIONS[name]} {value:g} (the run's: {getattr(stored, name)})"
                             if isinstance(value, float) else f"{RESUME_OPTIONS[name]} {value} "
                             f"(the run's: {getattr(stored, name)})")
    if conflicts:
        raise UserError(f"--resume continues {path} with the settings of its config.json, which "
                        f"{', '.join(conflicts)} contradict{'s' if len(conflicts) == 1 else ''}; drop "
                        f"{'it' if len(conflicts) == 1 else 'them'}, or start a new run without --resume")


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    return torch.device(name)

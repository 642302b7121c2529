"""A sweep's answer, from its run directories alone: per optimizer and batch
size, the setting chosen by validation accuracy on the tuning seeds, then
(experiments.verdicts) that setting on the confirmation seeds, which alone
give verdicts; results.csv (a row per run), results.md and the two figures.

Selection never looks at the test set: a setting's score is its mean final
validation accuracy over its tuning seeds, a diverged seed counting 0.
"""

import contextlib
import csv
import io
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plots import Band, Series, batch_figure, lr_figure

from . import registry
from .aggregate import cell
from .config import RunConfig, counted
from .errors import UserError
from .runs import FINISHED, Run, claim_dir, load_runs, write_atomic
from .stats import Stat, stat

Echo = Callable[[str], None]
DEFAULT_TARGET = 0.98
CSV_FIELDS = ("run", "phase", "optimizer", "batch_size", "lr", "wd", "beta1", "beta2", "schedule", "warmup", "seed",
              "epochs", "status",
              "epochs_completed",
              "final_val_accuracy", "final_test_accuracy", "best_test_accuracy", "samples", "train_seconds",
              "samples_to_target", "seconds_to_target", "state_bytes_per_parameter")


def setting_of(run: Run) -> tuple:
    """(optimizer, batch size, lr, weight decay, warmup, beta1, beta2): a point less its seed."""
    c = run.config
    return (c["optimizer"], c["batch_size"], c["lr"], c["wd"], c.get("warmup", 0.0), c.get("beta1"),
            c.get("beta2"))


def sortable(setting: tuple) -> tuple:
    """A setting that sorts (an optimizer's default, None, before any value)."""
    return tuple((value is not None, value) for value in setting)


def val_score(run: Run) -> float | None:
    """A run's score for selection: its final validation accuracy, 0 if it
    diverged, None while it has not ended."""
    if run.status == "diverged":
        return 0.0
    if run.status != "completed":
        return None
    return (run.summary or {}).get("final_val_accuracy")


def test_accuracy(run: Run) -> float | None:
    return (run.summary or {}).get("final_test_accuracy") if run.status == "completed" else None


def to_target(run: Run, target: float) -> tuple[int, float] | None:
    """Samples and seconds of training until the validation accuracy first reached `target`."""
    for record in run.test:
        if record.get("val_accuracy", 0.0) >= target:
            return record["samples"], record.get("wall_time", float("nan"))
    return None


@dataclass
class Choice:
    """The tuned setting of one optimizer at one batch size."""

    optimizer: str
    batch_size: int
    lr: float
    wd: float
    warmup: float
    val: Stat
    test: Stat | None
    runs: list[Run]
    diverged: int

    @property
    def config(self) -> RunConfig:
        """The chosen setting, as a run's settings (with its first seed)."""
        return RunConfig.from_dict(self.runs[0].config)


def settings(runs: list[Run]) -> dict[tuple, list[Run]]:
    grouped: dict[tuple, list[Run]] = {}
    for run in runs:
        grouped.setdefault(setting_of(run), []).append(run)
    return grouped


def choose(runs: list[Run]) -> dict[tuple[str, int], Choice]:
    """Per (optimizer, batch size), the (lr, wd, warmup) with the best mean
    validation score; a setting pruned on any seed (clearly behind) is out."""
    best: dict[tuple[str, int], Choice] = {}
    for (optimizer, batch_size, lr, wd, warmup, *_), members in settings(runs).items():
        val = stat([val_score(r) for r in members])
        if val is None or any(r.status == "pruned" for r in members):
            continue
        current = best.get((optimizer, batch_size))
        if current is None or val.mean > current.val.mean:
            best[(optimizer, batch_size)] = Choice(optimizer, batch_size, lr, wd, warmup, val,
                                                   stat([test_accuracy(r) for r in members]), members,
                                                   sum(r.diverged for r in members))
    return best


def grid_lrs(runs: list[Run], optimizer: str, batch_size: int) -> list[float]:
    return sorted({r.config["lr"] for r in runs if r.config["optimizer"] == optimizer
                   and r.config["batch_size"] == batch_size})


def searched(runs: list[Run]) -> bool:
    """Whether the runs come from a search (--trials: their betas drawn) rather than a grid."""
    return any(r.config.get("beta1") is not None or r.config.get("beta2") is not None for r in runs)


def edge_point(choice: Choice, runs: list[Run]) -> float | None:
    """Where a chosen lr is the lowest or highest its optimizer and batch size
    tried, the lr to add beyond it (one more step of the grid's own ratio
    there); None inside. The best lr may lie past an edge: such a choice is no
    tuned result yet."""
    grid = grid_lrs(runs, choice.optimizer, choice.batch_size)
    if len(grid) == 1:
        return choice.lr * 3
    if choice.lr == grid[0]:
        return grid[0] * grid[0] / grid[1]
    if choice.lr == grid[-1]:
        return grid[-1] * grid[-1] / grid[-2]
    return None


def confirmation_progress(confirmations: list[Run], planned: list[int], choices: int) -> tuple[list[int], int, int]:
    """The confirmation seeds (planned, or else those run), how many of its
    runs have ended, and how many it has: each of the `choices` on every seed."""
    seeds = sorted(set(planned) | {r.config["seed"] for r in confirmations})
    return seeds, sum(r.status in FINISHED for r in confirmations), len(seeds) * choices


def confirmation_line(confirmations: list[Run], planned: list[int], choices: int) -> str:
    """The confirmation seeds and, while some of its runs are still to end, how many have."""
    seeds, ended, total = confirmation_progress(confirmations, planned, choices)
    if not seeds:
        return "- Confirmation: none yet (`sweep ... --confirm-seeds 8` adds it); without it no difference gets a verdict."
    line = (f"- Confirmation: each choice trained again on seeds {', '.join(map(str, seeds))}, which took no part in "
            "choosing it; every verdict comes from them alone.")
    if ended < total:
        line += (f" Under way: {ended} of its {total} runs ended; until they all have, a verdict holds only for the "
                 "seeds that both sides have ended so far.")
    return line


def protocol_markdown(runs: list[Run], confirmations: list[Run], trials: int | None,
                      planned: list[int] | None = None) -> str:
    """How the choices were made: the search space, the budget, the seeds, the rule."""
    from . import space

    def values(key, default=None):
        return sorted({r.config.get(key, default) for r in runs}, key=str)

    configs = [r.config for r in runs]
    epochs = max(c["epochs"] for c in configs)
    steps = {b: epochs * math.ceil((c.get("train_size", 60_000) - c["val_size"]) / b)
             for c in configs for b in [c["batch_size"]]}
    optimizers = in_registry_order(values("optimizer"))
    schedules = ", ".join(f"{s}" for s in values("schedule", "constant"))
    seeds = ", ".join(map(str, sorted({c["seed"] for c in configs})))
    batches = ", ".join(map(str, sorted(values("batch_size"))))
    if trials:
        spaces: dict[str, list[str]] = {}
        for name in optimizers:
            spaces.setdefault(space.describe(name), []).append(label(name))
        space_lines = [f"- Search space, each optimizer its own knobs over the same ranges (experiments/registry.py), "
                       f"batch sizes {batches}, schedule {schedules} after the warmup:"]
        space_lines += [f"  - {', '.join(names)}: {text}." for text, names in spaces.items()]
        budget = (f"- Budget: the same for every optimizer: {trials} settings at each batch size, drawn by Optuna's "
                  f"quasi-random sampler (scrambled Sobol; the same draws for the same knobs), "
                  f"{counted(epochs, 'epoch')} each, that is ")
    else:
        warmups = ", ".join(f"{w:g}" for w in values("warmup", 0.0))
        space_lines = [f"- Search space: optimizers {', '.join(optimizers)}; lr "
                       f"{', '.join(f'{x:g}' for x in sorted(values('lr')))}; batch sizes {batches}; weight decay "
                       f"{', '.join(f'{x:g}' for x in sorted(values('wd')))}; schedule {schedules}, warmup {warmups}."]
        budget = f"- Budget: {counted(epochs, 'epoch')} a point, that is "
    seeds_per_point = statistics.median(len(members) for members in settings(runs).values())
    return "\n".join([
        "### Tuning protocol",
        "",
        *space_lines,
        budget + ", ".join(f"{n} steps at batch {b}" for b, n in sorted(steps.items())) + ".",
        f"- Tuning seeds: {seeds} ({seeds_per_point:g} per setting); the same initial weights and data order for "
        "every optimizer.",
        f"- Selection: the best mean final validation accuracy ({configs[0]['val_size']} training images held out, "
        "never trained on), the test set used only to report.",
        confirmation_line(confirmations, planned or [], len({(c["optimizer"], c["batch_size"]) for c in configs})),
        *pruning_lines(runs),
        "",
    ])


def epochs_trained(run: Run) -> int:
    return len(run.test) if run.status == "diverged" else (run.summary or {}).get("epochs_completed", len(run.test))


def pruning_lines(runs: list[Run]) -> list[str]:
    """What pruning and divergence saved of the tuning's epochs."""
    pruned = [r for r in runs if r.status == "pruned"]
    if not pruned:
        return []
    grid = sum(r.config["epochs"] for r in runs)
    trained = sum(epochs_trained(r) for r in runs)
    by_pruning = sum(r.config["epochs"] - epochs_trained(r) for r in pruned)
    untrained = sum(epochs_trained(r) == 0 for r in pruned)
    across = f" ({untrained} of them never trained: their setting was pruned on the first seed)" if untrained else ""
    return [f"- Pruning: {len(pruned)} of {len(runs)} points stopped early, clearly behind their optimizer, batch "
            f"size and seed{across}; {trained} of the tuning's {grid} epochs trained ({1 - trained / grid:.0%} saved, "
            f"{by_pruning / grid:.0%} by pruning, the rest by divergence)."]


def edges_markdown(choices: dict[tuple[str, int], Choice], runs: list[Run]) -> str:
    flagged = [(c, edge_point(c, runs)) for c in choices.values()]
    flagged = [(c, point) for c, point in flagged if point is not None]
    if not flagged:
        return "Every chosen lr lies inside the lrs tried.\n"
    if searched(runs):
        advice = ("The best lr may lie beyond the lrs drawn: these are not tuned yet. Run the same sweep command with "
                  "more --trials to draw more settings (its finished points are kept); the ranges are the registry's.")
    else:
        advice = ("The best lr may lie beyond the grid: these are not tuned yet. To extend the sweep, run the same "
                  "sweep command with the lr added to --lrs: its finished points are kept, only the new ones train.")
    lines = ["### Chosen at the edge", "", advice, ""]
    for c, point in sorted(flagged, key=lambda item: (item[0].optimizer, item[0].batch_size)):
        grid = grid_lrs(runs, c.optimizer, c.batch_size)
        where = "the only lr tried" if len(grid) == 1 else ("the lowest lr" if c.lr == grid[0] else "the highest lr")
        lines.append(f"- {label(c.optimizer)}, batch {c.batch_size}: lr {c.lr:g} is {where}"
                     + ("." if searched(runs) else f"; add lr {point:.3g}."))
    return "\n".join(lines) + "\n"


def in_registry_order(names) -> list[str]:
    order = list(registry.OPTIMIZERS)
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def csv_text(runs: list[Run], target: float, confirmations: list[Run] = ()) -> str:
    """A row per run: the tuning runs, then the confirmation runs."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    phases = [("tuning", r) for r in runs] + [("confirmation", r) for r in confirmations]
    for phase, run in sorted(phases, key=lambda item: (item[0] != "tuning", sortable(setting_of(item[1])),
                                                       item[1].config["seed"])):
        summary = run.summary or {}
        reached = to_target(run, target)
        writer.writerow(dict(
            {k: run.config.get(k) for k in ("optimizer", "batch_size", "lr", "wd", "beta1", "beta2", "seed",
                                            "epochs")},
            phase=phase,
            schedule=run.config.get("schedule", "constant"), warmup=run.config.get("warmup", 0.0),
            run=run.path.name, status=run.status,
            **{k: summary.get(k) for k in ("epochs_completed", "final_val_accuracy", "final_test_accuracy",
                                           "best_test_accuracy", "samples", "train_seconds",
                                           "state_bytes_per_parameter")},
            samples_to_target=reached[0] if reached else None, seconds_to_target=reached[1] if reached else None,
        ))
    return out.getvalue()


def tuning_markdown(choices: dict[tuple[str, int], Choice], runs: list[Run],
                    retrained_runs: list[Run] | None = None) -> str:
    """The choices on the seeds that made them: their validation and test
    accuracy there (not verdicts: their luck helped them win), and with `sweep
    --retrain`, the setting trained again on all the training images."""
    from .verdicts import setting_text

    lines = [
        "### The choice", "",
        "Per optimizer and batch size: the setting with the best mean final validation accuracy over the tuning "
        "seeds (a diverged seed counts 0), its validation and test accuracy on those seeds, mean ± std (and, with "
        "`sweep --retrain`, its test accuracy trained again on all the training images).", "",
        "| optimizer | batch | chosen setting | validation | test, tuning seeds | retrained on all | settings tried | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    retrained = settings(retrained_runs or [])
    tried = settings(runs)
    for optimizer in in_registry_order({o for o, _ in choices}):
        for batch_size in sorted(b for o, b in choices if o == optimizer):
            c = choices[(optimizer, batch_size)]
            again = stat([test_accuracy(r) for r in retrained.get(setting_of(c.runs[0]), [])])
            edge = " (edge)" if edge_point(c, runs) is not None else ""
            count = sum(1 for key in tried if key[:2] == (optimizer, batch_size))
            lines.append(f"| {label(optimizer)} | {batch_size} | {setting_text(c.config)}{edge} | {cell(c.val)} | "
                         f"{cell(c.test)} | {cell(again)} | {count} | {c.diverged}/{len(c.runs)} |")
    unfinished = sum(r.status not in ("completed", "diverged", "pruned") for r in runs)
    pruned = sum(r.status == "pruned" for r in runs)
    lines += ["", f"{len(runs)} tuning runs, {pruned} pruned, {unfinished} not ended.", ""]
    return "\n".join(lines) + "\n"


def label(optimizer: str) -> str:
    spec = registry.OPTIMIZERS.get(optimizer)
    return spec.label if spec else optimizer


def style(optimizer: str) -> dict:
    spec = registry.OPTIMIZERS.get(optimizer)
    return dict(spec.style) if spec else dict(color="black", linestyle="-", marker=".")


def band_of(points: list[tuple[float, Stat]], interval: bool = False) -> Band:
    """Means against x, the band each one's range over seeds (or, `interval`, its 95% interval)."""
    points = sorted(points, key=lambda p: p[0])
    lows, highs = [], []
    for _, s in points:
        low, high = (s.interval() or (s.mean, s.mean)) if interval else (s.low, s.high)
        lows.append(low)
        highs.append(high)
    return Band([x for x, _ in points], [s.mean for _, s in points], lows, highs)


def lr_series(runs: list[Run]) -> dict[int, list[Series]]:
    """Per batch size, per optimizer, validation accuracy over seeds against lr
    (at each lr, the best setting's); a search's settings as unjoined points."""
    by_point: dict[tuple[str, int, float], Stat] = {}
    for (optimizer, batch_size, lr, *_), members in settings(runs).items():
        val = stat([val_score(r) for r in members])
        key = (optimizer, batch_size, lr)
        if val is not None and (key not in by_point or val.mean > by_point[key].mean):
            by_point[key] = val
    points_only = dict(linestyle="none") if searched(runs) else {}
    panels: dict[int, list[Series]] = {}
    for batch_size in sorted({b for _, b, _ in by_point}):
        for optimizer in in_registry_order({o for o, b, _ in by_point if b == batch_size}):
            points = [(lr, s) for (o, b, lr), s in by_point.items() if o == optimizer and b == batch_size]
            panels.setdefault(batch_size, []).append(
                Series(label(optimizer), dict(style(optimizer), **points_only), band_of(points)))
    return panels


def batch_series(judged: dict) -> list[Series]:
    """Each optimizer's test accuracy against batch size, with its 95% interval over the judging seeds."""
    series = []
    for optimizer in in_registry_order({o for o, _ in judged}):
        points = [(b, j.test) for (o, b), j in judged.items() if o == optimizer and j.test is not None]
        if points:
            series.append(Series(label(optimizer), style(optimizer), band_of(points, interval=True)))
    return series


def sweep_runs(sweeps: list[Path], folder: str = "runs") -> list[Run]:
    """The runs under each sweep's `folder`, one of each point: the same point in
    two sweeps would count its seed twice."""
    runs = [r for r in load_runs([s / folder for s in sweeps if (s / folder).is_dir()], warn=lambda line: None)
            if "val_size" in r.config or folder != "runs"]
    where: dict[tuple, Path] = {}
    for run in runs:
        point = (*setting_of(run), run.config["seed"], run.config.get("val_size"), run.config.get("epochs"))
        if point in where:
            raise UserError(f"{run.path.name} is in {where[point].parent} and in {run.path.parent}; report sweeps "
                            "whose points differ (other batch sizes, optimizers or seeds)")
        where[point] = run.path
    return runs


def stored_sweeps(sweeps: list[Path]) -> list:
    """The Sweep each folder's study stores (those without a readable one left out)."""
    from .sweep import DATABASE, load_sweep

    found = []
    for folder in sweeps:
        if (folder / DATABASE).is_file():
            with contextlib.suppress(UserError, KeyError):
                found.append(load_sweep(folder, None))
    return found


def planned_confirm_seeds(stored: list) -> list[int]:
    """The confirmation seeds the sweeps' studies plan (empty where none says)."""
    return sorted({seed for sweep in stored for seed in sweep.confirm_seeds})


def trials_of(stored: list) -> int | None:
    """The trials of the sweeps' searches (None for grids, or where no study says)."""
    trials = max((sweep.trials for sweep in stored), default=0)
    return trials if trials > 0 else None


def write_report(sweeps: list[Path], out: Path | None, target: float = DEFAULT_TARGET) -> str:
    """The report of one sweep (into its folder, unless `out`) or of several
    (into `out`); returns its table and where it went, to print."""
    if out is None and len(sweeps) > 1:
        raise UserError(f"{len(sweeps)} sweeps: give --out, the folder their one report goes in (e.g. --out runs/claims)")
    if out is not None and not (len(sweeps) == 1 and out.resolve() == sweeps[0].resolve()):
        claim_dir(out, "report")
    out = out or sweeps[0]
    return report(out, target, sweeps=sweeps) + f"\nresults.csv, results.md and figures written to {out}"


def title_of(runs: list[Run], confirmations: list[Run], trials: int | None, planned: list[int] = (),
             choices: int = 0) -> str:
    """The sweep in a line; while its confirmation (`planned` seeds of each of
    the `choices`) is under way, how far it has come, not a seed count that
    some choices have not reached."""
    epochs = max(r.config["epochs"] for r in runs)
    seeds = sorted({r.config["seed"] for r in runs})
    tuned = (f"{trials} settings each on seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}" if trials
             else f"tuned on {counted(len(seeds), 'seed')}")
    confirm_seeds, ended, total = confirmation_progress(confirmations, planned, choices)
    if not ended:
        confirmed = ""
    elif ended < total:
        confirmed = f", confirmation under way ({ended} of {total} runs)"
    else:
        confirmed = f", confirmed on {len(confirm_seeds)} more"
    return f"MNIST CNN, {counted(epochs, 'epoch')}, {tuned}{confirmed}, validation {runs[0].config['val_size']} images"


def report(out: Path, target: float = DEFAULT_TARGET, echo: Echo = print, sweeps: list[Path] | None = None) -> str:
    """results.csv, results.md, lr.png and batch.png of the runs under out/runs
    and out/confirm, or of several `sweeps` together (written to out); returns
    the report's text."""
    from .sweep import CONFIRM, TUNING
    from .verdicts import (
        comparisons_markdown,
        confirmed_markdown,
        glance_markdown,
        judge,
    )

    sweeps = sweeps or [out]
    runs = sweep_runs(sweeps, TUNING)
    if not runs:
        raise UserError(f"{', '.join(map(str, sweeps))} hold{'s' if len(sweeps) == 1 else ''} no sweep runs (no "
                        "runs/ folder with run directories); give the --out of a sweep")
    out.mkdir(parents=True, exist_ok=True)
    confirmations = sweep_runs(sweeps, CONFIRM)
    stored = stored_sweeps(sweeps)
    trials = trials_of(stored)
    choices = choose(runs)
    planned = planned_confirm_seeds(stored)
    title = title_of(runs, confirmations, trials, planned, len(choices))
    judged = judge(choices, confirmations)
    write_atomic(out / "results.csv", csv_text(runs, target, confirmations).encode())
    text = (f"## {title}\n\n" + glance_markdown(judged, target, len(planned))
            + confirmed_markdown(judged, target, planned) + comparisons_markdown(judged, planned=len(planned))
            + "\n" + tuning_markdown(choices, runs, sweep_runs(sweeps, "retrained"))
            + "\n" + edges_markdown(choices, runs) + "\n" + protocol_markdown(runs, confirmations, trials, planned))
    figures = []
    if choices:
        drawn = ", each point a drawn setting (its other knobs vary)" if searched(runs) else ""
        figures.append(lr_figure(lr_series(runs), out / "lr.png", f"Validation accuracy against learning rate, "
                                 f"tuning seeds{drawn}\n{title}"))
        confirmed = all(j.confirmed for j in judged.values())
        spread = (" (95% intervals)" if any(j.test is not None and j.test.n > 1 for j in judged.values())
                  else ", one seed each (no interval)")
        if series := batch_series(judged):
            figures.append(batch_figure(series, out / "batch.png",
                                        f"Test accuracy at the chosen setting, "
                                        f"{'confirmation' if confirmed else 'tuning'} seeds{spread}\n{title}"))
    text += "".join(f"\n![{f.stem}]({f.name})\n" for f in figures)
    write_atomic(out / "results.md", text.encode())
    return text

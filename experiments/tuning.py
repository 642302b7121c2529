"""A sweep's answer, from its run directories alone: per optimizer and batch
size, the learning rate (and weight decay) chosen by validation accuracy, and
the test accuracy of that choice over seeds; results.csv (a row per run),
results.md and the two figures.

Selection never looks at the test set: a setting's score is its mean final
validation accuracy over seeds, a diverged seed counting 0. The test figure of
the chosen setting is then a mean ± std over its seeds with n, and the
samples (and seconds) it took to reach a target validation accuracy.
"""

import csv
import io
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plots import Band, Series, batch_figure, lr_figure

from . import registry
from .aggregate import Stat, cell, paired, stat, verdict
from .config import RunConfig
from .errors import UserError
from .runs import Run, load_runs, write_atomic

Echo = Callable[[str], None]
DEFAULT_TARGET = 0.98
CSV_FIELDS = ("run", "optimizer", "batch_size", "lr", "wd", "schedule", "warmup", "seed", "epochs", "status",
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


def edge_point(choice: Choice, runs: list[Run]) -> float | None:
    """Where a chosen lr lies at the edge of its grid, the lr to add beyond it
    (one more step of the grid's own ratio there); None inside the grid. The
    best lr may lie past an edge: such a choice is no tuned result yet."""
    grid = grid_lrs(runs, choice.optimizer, choice.batch_size)
    if len(grid) == 1:
        return choice.lr * 3
    if choice.lr == grid[0]:
        return grid[0] * grid[0] / grid[1]
    if choice.lr == grid[-1]:
        return grid[-1] * grid[-1] / grid[-2]
    return None


def protocol_markdown(runs: list[Run]) -> str:
    """How the choices were made: the search space, the budget, the seeds, the rule."""
    def values(key, default=None):
        return sorted({r.config.get(key, default) for r in runs}, key=str)

    configs = [r.config for r in runs]
    epochs = max(c["epochs"] for c in configs)
    steps = {b: epochs * math.ceil((c.get("train_size", 60_000) - c["val_size"]) / b)
             for c in configs for b in [c["batch_size"]]}
    seeds_per_point = statistics.median(len(members) for members in settings(runs).values())
    schedules = ", ".join(f"{s}" for s in values("schedule", "constant"))
    warmups = ", ".join(f"{w:g}" for w in values("warmup", 0.0))
    return "\n".join([
        "### Tuning protocol",
        "",
        f"- Search space: optimizers {', '.join(in_registry_order(values('optimizer')))}; lr "
        f"{', '.join(f'{x:g}' for x in sorted(values('lr')))}; batch sizes "
        f"{', '.join(map(str, sorted(values('batch_size'))))}; weight decay "
        f"{', '.join(f'{x:g}' for x in sorted(values('wd')))}; schedule {schedules}, warmup {warmups}.",
        f"- Budget: {epochs} epoch{'s' if epochs > 1 else ''} a point, that is "
        + ", ".join(f"{n} steps at batch {b}" for b, n in sorted(steps.items())) + ".",
        f"- Seeds: {seeds_per_point:g} per point; the same initial weights and data order for every optimizer.",
        f"- Selection: the best mean final validation accuracy ({configs[0]['val_size']} training images held out, "
        "never trained on), the test set used only to report the choice.",
        *pruning_lines(runs),
        "",
    ])


def epochs_trained(run: Run) -> int:
    return len(run.test) if run.status == "diverged" else (run.summary or {}).get("epochs_completed", len(run.test))


def pruning_lines(runs: list[Run]) -> list[str]:
    """What pruning and divergence saved of the grid's epochs."""
    pruned = [r for r in runs if r.status == "pruned"]
    if not pruned:
        return []
    grid = sum(r.config["epochs"] for r in runs)
    trained = sum(epochs_trained(r) for r in runs)
    by_pruning = sum(r.config["epochs"] - epochs_trained(r) for r in pruned)
    untrained = sum(epochs_trained(r) == 0 for r in pruned)
    across = f" ({untrained} of them never trained: their setting was pruned on the first seed)" if untrained else ""
    return [f"- Pruning: {len(pruned)} of {len(runs)} points stopped early, clearly behind their optimizer, batch "
            f"size and seed{across}; {trained} of the grid's {grid} epochs trained ({1 - trained / grid:.0%} saved, "
            f"{by_pruning / grid:.0%} by pruning, the rest by divergence)."]


def edges_markdown(choices: dict[tuple[str, int], Choice], runs: list[Run]) -> str:
    flagged = [(c, edge_point(c, runs)) for c in choices.values()]
    flagged = [(c, point) for c, point in flagged if point is not None]
    if not flagged:
        return "Every chosen lr lies inside its grid.\n"
    lines = ["### Chosen at the edge of the grid", "",
             "The best lr may lie beyond the grid: these are not tuned yet. To extend the sweep, run the same sweep "
             "command with the lr added to --lrs: its finished points are kept, only the new ones train.", ""]
    for c, point in sorted(flagged, key=lambda item: (item[0].optimizer, item[0].batch_size)):
        grid = grid_lrs(runs, c.optimizer, c.batch_size)
        where = "the only lr tried" if len(grid) == 1 else ("the lowest lr" if c.lr == grid[0] else "the highest lr")
        lines.append(f"- {label(c.optimizer)}, batch {c.batch_size}: lr {c.lr:g} is {where}; add lr {point:.3g}.")
    return "\n".join(lines) + "\n"


def in_registry_order(names) -> list[str]:
    order = list(registry.OPTIMIZERS)
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def csv_text(runs: list[Run], target: float) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in sorted(runs, key=lambda r: (sortable(setting_of(r)), r.config["seed"])):
        summary = run.summary or {}
        reached = to_target(run, target)
        writer.writerow(dict(
            {k: run.config.get(k) for k in ("optimizer", "batch_size", "lr", "wd", "seed", "epochs")},
            schedule=run.config.get("schedule", "constant"), warmup=run.config.get("warmup", 0.0),
            run=run.path.name, status=run.status,
            **{k: summary.get(k) for k in ("epochs_completed", "final_val_accuracy", "final_test_accuracy",
                                           "best_test_accuracy", "samples", "train_seconds",
                                           "state_bytes_per_parameter")},
            samples_to_target=reached[0] if reached else None, seconds_to_target=reached[1] if reached else None,
        ))
    return out.getvalue()


def reach_cell(choice: Choice, target: float) -> str:
    reached = [to_target(r, target) for r in choice.runs]
    hits = [r for r in reached if r is not None]
    if not hits:
        return f"not reached (0/{len(reached)})"
    samples = statistics.median(h[0] for h in hits)
    seconds = statistics.median(h[1] for h in hits)
    return f"{samples / 1e3:.0f}k samples, {seconds:.0f} s ({len(hits)}/{len(reached)})"


def results_markdown(choices: dict[tuple[str, int], Choice], runs: list[Run], target: float, title: str,
                     retrained_runs: list[Run] | None = None) -> str:
    lines = [
        f"## {title}",
        "",
        "Per optimizer and batch size: the learning rate (and weight decay) with the best mean final validation "
        "accuracy over seeds (a diverged seed counts 0), then the test accuracy of that choice, mean ± std over "
        f"seeds (and, with `sweep --retrain`, of that setting trained again on all the training images), and the "
        f"median samples and seconds to {100 * target:g}% validation accuracy (seeds that got there).",
        "",
        "| optimizer | batch | chosen lr | wd | warmup | validation | test | retrained on all | diverged | to target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    retrained = settings(retrained_runs or [])
    for optimizer in in_registry_order({o for o, _ in choices}):
        for batch_size in sorted(b for o, b in choices if o == optimizer):
            c = choices[(optimizer, batch_size)]
            again = stat([test_accuracy(r) for r in retrained.get(setting_of(c.runs[0]), [])])
            lr_cell = f"{c.lr:g}" + (" (grid edge)" if edge_point(c, runs) is not None else "")
            lines.append(f"| {label(optimizer)} | {batch_size} | {lr_cell} | {c.wd:g} | {c.warmup:g} | {cell(c.val)} | {cell(c.test)} "
                         f"| {cell(again)} | {c.diverged}/{len(c.runs)} | {reach_cell(c, target)} |")
    unfinished = sum(r.status not in ("completed", "diverged", "pruned") for r in runs)
    pruned = sum(r.status == "pruned" for r in runs)
    lines += ["", f"{len(runs)} runs, {pruned} pruned, {unfinished} not ended.", ""]
    return ("\n".join(lines) + "\n" + edges_markdown(choices, runs) + "\n" + protocol_markdown(runs)
            + comparisons_markdown(choices))


FOCUS = "lamb16"  # the optimizer the sweep's comparisons are about
VERDICTS = {"met": "higher", "not met": "lower", "within noise": "within noise"}


def points(diff: Stat | None) -> str:
    """"+0.52 ± 0.20 points (n=3), 95% CI +0.02 to +1.02"."""
    if diff is None:
        return "-"
    text = f"{100 * diff.mean:+.2f} ± {100 * diff.std:.2f} points (n={diff.n})"
    interval = diff.interval()
    return text + ("" if interval is None else f", 95% CI {100 * interval[0]:+.2f} to {100 * interval[1]:+.2f}")


def higher_or_lower(diff: Stat | None) -> str:
    """Whether a paired difference is above 0 with 95% confidence, below, or neither."""
    base, _, note = verdict(diff, 0.0).partition(" (")
    return VERDICTS.get(base, base) + (f" ({note}" if note else "")


def comparisons_markdown(choices: dict[tuple[str, int], Choice], focus: str = FOCUS) -> str:
    """How sure: per batch size, the focus optimizer's tuned test accuracy minus
    each other's, paired by seed (the same seed gives both the same initial
    weights and data order); and per optimizer, what going from the smallest
    batch to the largest costs it."""
    batch_sizes = sorted({b for _, b in choices})
    lines = []
    if any(o == focus for o, _ in choices) and len({o for o, _ in choices}) > 1:
        lines += ["", f"{label(focus)} minus each other optimizer, each at its own tuned learning rate, paired by seed:",
                  "", "| batch | against | test accuracy difference | verdict |", "|---|---|---|---|"]
        for batch_size in batch_sizes:
            mine = choices.get((focus, batch_size))
            for other in in_registry_order({o for o, b in choices if b == batch_size and o != focus}):
                if mine is None:
                    continue
                diff = paired(mine.runs, choices[(other, batch_size)].runs, test_accuracy)
                lines.append(f"| {batch_size} | {label(other)} | {points(diff)} | **{higher_or_lower(diff)}** |")
    if len(batch_sizes) > 1:
        small, large = batch_sizes[0], batch_sizes[-1]
        lines += ["", f"Batch {large} against batch {small}, each tuned, paired by seed:", "",
                  "| optimizer | test accuracy difference | verdict |", "|---|---|---|"]
        for optimizer in in_registry_order({o for o, _ in choices}):
            if (optimizer, small) in choices and (optimizer, large) in choices:
                diff = paired(choices[(optimizer, large)].runs, choices[(optimizer, small)].runs, test_accuracy)
                lines.append(f"| {label(optimizer)} | {points(diff)} | **{higher_or_lower(diff)}** |")
    return "\n".join(lines) + ("\n" if lines else "")


def label(optimizer: str) -> str:
    spec = registry.OPTIMIZERS.get(optimizer)
    return spec.label if spec else optimizer


def style(optimizer: str) -> dict:
    spec = registry.OPTIMIZERS.get(optimizer)
    return dict(spec.style) if spec else dict(color="black", linestyle="-", marker=".")


def band_of(points: list[tuple[float, Stat]]) -> Band:
    points = sorted(points)
    return Band([x for x, _ in points], [s.mean for _, s in points], [s.low for _, s in points],
                [s.high for _, s in points])


def lr_series(runs: list[Run]) -> dict[int, list[Series]]:
    """Per batch size, per optimizer, validation accuracy over seeds against lr
    (at each lr, the best weight decay's)."""
    by_point: dict[tuple[str, int, float], Stat] = {}
    for (optimizer, batch_size, lr, *_), members in settings(runs).items():
        val = stat([val_score(r) for r in members])
        key = (optimizer, batch_size, lr)
        if val is not None and (key not in by_point or val.mean > by_point[key].mean):
            by_point[key] = val
    panels: dict[int, list[Series]] = {}
    for batch_size in sorted({b for _, b, _ in by_point}):
        for optimizer in in_registry_order({o for o, b, _ in by_point if b == batch_size}):
            points = [(lr, s) for (o, b, lr), s in by_point.items() if o == optimizer and b == batch_size]
            panels.setdefault(batch_size, []).append(Series(label(optimizer), style(optimizer), band_of(points)))
    return panels


def batch_series(choices: dict[tuple[str, int], Choice]) -> list[Series]:
    series = []
    for optimizer in in_registry_order({o for o, _ in choices}):
        points = [(b, c.test) for (o, b), c in choices.items() if o == optimizer and c.test is not None]
        if points:
            series.append(Series(label(optimizer), style(optimizer), band_of(points)))
    return series


def sweep_runs(sweeps: list[Path], folder: str = "runs") -> list[Run]:
    """The runs under each sweep's `folder`, one of each point: the same point in
    two sweeps would count its seed twice."""
    runs = [r for r in load_runs([s / folder for s in sweeps if (s / folder).is_dir()], warn=lambda line: None)
            if "val_size" in r.config or folder != "runs"]
    where: dict[tuple, Path] = {}
    for run in runs:
        point = (*setting_of(run), run.config["seed"], run.config.get("val_size"))
        if point in where:
            raise UserError(f"{run.path.name} is in {where[point].parent} and in {run.path.parent}; report sweeps "
                            "whose points differ (other batch sizes, optimizers or seeds)")
        where[point] = run.path
    return runs


def write_report(sweeps: list[Path], out: Path | None, target: float = DEFAULT_TARGET) -> str:
    """The report of one sweep (into its folder, unless `out`) or of several
    (into `out`); returns its table and where it went, to print."""
    if out is None and len(sweeps) > 1:
        raise UserError(f"{len(sweeps)} sweeps: give --out, the folder their one report goes in (e.g. --out runs/claims)")
    out = out or sweeps[0]
    return report(out, target, sweeps=sweeps) + f"\nresults.csv, results.md and figures written to {out}"


def report(out: Path, target: float = DEFAULT_TARGET, echo: Echo = print, sweeps: list[Path] | None = None) -> str:
    """results.csv, results.md, lr.png and batch.png of the runs under out/runs,
    or of several `sweeps` together (written to out); returns the table."""
    sweeps = sweeps or [out]
    runs = sweep_runs(sweeps)
    if not runs:
        raise UserError(f"{', '.join(map(str, sweeps))} hold{'s' if len(sweeps) == 1 else ''} no sweep runs (no "
                        "runs/ folder with run directories); give the --out of a sweep")
    out.mkdir(parents=True, exist_ok=True)
    seeds = len({r.config["seed"] for r in runs})
    epochs = max(r.config["epochs"] for r in runs)
    title = f"MNIST CNN, {epochs} epoch{'s' if epochs > 1 else ''}, {seeds} seed{'s' if seeds > 1 else ''}, validation {runs[0].config['val_size']} images"
    choices = choose(runs)
    write_atomic(out / "results.csv", csv_text(runs, target).encode())
    retrained = sweep_runs(sweeps, "retrained")
    text = results_markdown(choices, runs, target, title, retrained)
    figures = []
    if choices:
        figures.append(lr_figure(lr_series(runs), out / "lr.png", f"Validation accuracy against learning rate\n{title}"))
        if batch_series(choices):
            figures.append(batch_figure(batch_series(choices), out / "batch.png", f"Tuned test accuracy\n{title}"))
    text += "".join(f"\n![{f.stem}]({f.name})\n" for f in figures)
    write_atomic(out / "results.md", text.encode())
    return text

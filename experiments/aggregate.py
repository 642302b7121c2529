"""From runs to answers: per-optimizer statistics over seeds, the curves the
figures draw, the results table, and verdicts on the original README's claims.

How sure: every figure over seeds is a mean with its sample standard deviation
and n (experiments.stats); a verdict compares a claim with the 95% confidence
interval of the mean over seeds (Student's t): "met" when the whole interval
is at or above the claim, "not met" when it is all below, "within noise" when
it straddles it; one seed gives no verdict. Comparisons of two optimizers pair
the seeds (the same seed gives both the same initial weights and data order).
"""

import statistics
from collections.abc import Callable

from plots import Band, Curves, tell_apart

from . import registry
from .config import counted
from .runs import Run
from .stats import Stat, stat

def verdict(values: Stat | None, target: float) -> str:
    """met / not met / within noise, as the module docstring says."""
    if values is None:
        return "no data"
    interval = values.interval()
    if interval is None:
        return "one seed: no verdict"
    low, high = interval
    return "met" if low >= target else "not met" if high < target else "within noise"


# ---------------------------------------------------------------- groups


# Everything but the seed that makes runs differ: runs that differ in any of it
# are never pooled (a sweep's run, trained without its 10,000 validation
# images, is no seed of a comparison's).
SHARED_SETTINGS = ("batch_size", "lr", "wd", "epochs", "trust_scale", "schedule", "warmup", "beta1", "beta2",
                   "val_size", "train_size")
# What a config.json written before a setting existed meant by it.
SETTING_DEFAULTS = {"schedule": "constant", "warmup": 0.0, "val_size": 0}
# Of two runs of one setting and seed, the one counted: ended before cut short, then the longest.
STATUS_ORDER = ("completed", "diverged", "pruned", "interrupted", "incomplete")


def one_per_seed(runs: list[Run], name: str, warn: Callable[[str], None]) -> list[Run]:
    """The runs of one setting, one per seed: of several runs of a seed (the
    same training twice), the one that got furthest, with a warning naming them."""
    by_seed: dict[object, list[Run]] = {}
    for run in runs:
        by_seed.setdefault(run.config.get("seed"), []).append(run)
    kept = []
    for seed, same in sorted(by_seed.items(), key=lambda item: str(item[0])):
        same.sort(key=lambda r: (STATUS_ORDER.index(r.status) if r.status in STATUS_ORDER else len(STATUS_ORDER),
                                 -len(r.test), str(r.path)))
        if len(same) > 1:
            warn(f"{len(same)} runs of {name}, seed {seed}, at one setting ({', '.join(str(r.path) for r in same)}): "
                 f"counted once, as {same[0].path}")
        kept.append(same[0])
    return kept


def group_runs(runs: list[Run], warn: Callable[[str], None] | None = None) -> dict[str, list[Run]]:
    """Runs grouped by optimizer and setting (seeds of one setting together,
    one run a seed), each group named by its optimizer, with the setting added
    where the runs differ in it (so that two groups never share a label)."""
    keys = {}
    for run in runs:
        key = (run.optimizer, *(run.config.get(k, SETTING_DEFAULTS.get(k)) for k in SHARED_SETTINGS))
        keys.setdefault(key, []).append(run)
    varying = [name for i, name in enumerate(SHARED_SETTINGS)
               if len({key[1 + i] for key in keys}) > 1]
    groups = {}
    order = list(registry.OPTIMIZERS)
    for key, members in sorted(keys.items(), key=lambda item: order.index(item[0][0]) if item[0][0] in order else len(order)):
        parts = [f"{name.replace('_', ' ')} {key[1 + SHARED_SETTINGS.index(name)]}" for name in varying]
        name = key[0] + (f" ({', '.join(parts)})" if parts else "")
        groups[name] = sorted(one_per_seed(members, name, warn or (lambda line: None)),
                              key=lambda r: r.config.get("seed", 0))
    return groups


def label_of(group_name: str) -> str:
    optimizer, _, rest = group_name.partition(" ")
    known = registry.OPTIMIZERS.get(optimizer)
    return (known.label if known else optimizer) + (f" {rest}" if rest else "")


def style_of(group_name: str) -> dict:
    known = registry.OPTIMIZERS.get(group_name.partition(" ")[0])
    return dict(known.style) if known else dict(color="black", linestyle="-", marker=".", label=group_name)


# ---------------------------------------------------------------- curves


def band(points: list[list[tuple[float, float]]]) -> Band:
    """Mean and range over runs of (x, y) series, aligned by position: seeds of
    one setting log at the same samples and epochs. Where a run stopped early
    (diverged), the others carry the band on."""
    out = Band()
    for i in range(max((len(p) for p in points), default=0)):
        ys = [p[i][1] for p in points if i < len(p)]
        out.x.append(next(p[i][0] for p in points if i < len(p)))
        out.mean.append(statistics.fmean(ys))
        out.low.append(min(ys))
        out.high.append(max(ys))
    return out


def all_curves(groups: dict[str, list[Run]]) -> list[Curves]:
    """Each group's curves, those of one optimizer at several settings told apart by line style."""
    return tell_apart([curves(name, group) for name, group in groups.items()],
                      [group[0].optimizer for group in groups.values()])


def curves(group_name: str, runs: list[Run]) -> Curves:
    """A group's bands over its seeds; a run with nothing logged yet is left
    out of them, and of the seeds the legend counts, and the label says so."""
    style = style_of(group_name)
    drawn = [r for r in runs if r.train or r.test]
    diverged = sum(r.diverged for r in drawn)
    empty = len(runs) - len(drawn)
    label = (label_of(group_name) + (f", {diverged} diverged" if diverged else "")
             + (f", {empty} with nothing logged" if empty else ""))
    return Curves(
        label=label,
        style=style,
        train_loss=band([[(r["samples"], r["loss"]) for r in run.train] for run in drawn]),
        test_accuracy=band([[(r["epoch"], r["test_accuracy"]) for r in run.test] for run in drawn]),
        test_loss=band([[(r["epoch"], r["test_loss"]) for r in run.test] for run in drawn]),
        seeds=len(drawn),
    )


# ---------------------------------------------------------------- tables


def accuracies(run: Run, within: int | None = None) -> list[float]:
    return [r["test_accuracy"] for r in run.test if within is None or r["epoch"] <= within]


def final_accuracy(run: Run) -> float | None:
    return run.test[-1]["test_accuracy"] if run.test and not run.diverged else None


def best_accuracy(run: Run, within: int | None = None) -> float | None:
    values = accuracies(run, within)
    return max(values) if values else None


def statuses(runs: list[Run]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def cell(value: Stat | None) -> str:
    return "-" if value is None else value.percent()


def results_table(groups: dict[str, list[Run]]) -> str:
    """Markdown: per group, the runs' statuses, final and best test accuracy
    (mean ± std over seeds, n), seconds per epoch and state bytes per parameter."""
    lines = [
        "| optimizer | runs | final accuracy | best accuracy | s/epoch | state bytes/param |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in groups.items():
        epoch_s = stat([(r.summary or {}).get("median_epoch_seconds") for r in runs])
        state = stat([(r.summary or {}).get("state_bytes_per_parameter") for r in runs])
        lines.append(
            f"| {name} | {statuses(runs)} | {cell(stat([final_accuracy(r) for r in runs]))} | "
            f"{cell(stat([best_accuracy(r) for r in runs]))} | "
            f"{'-' if epoch_s is None else f'{epoch_s.mean:.1f}'} | {'-' if state is None else f'{state.mean:.3f}'} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- claims


def paired(a: list[Run], b: list[Run], measure: Callable[[Run], float | None]) -> Stat | None:
    """measure(a) - measure(b) over the seeds both have."""
    by_seed = {r.config.get("seed"): r for r in b}
    diffs = []
    for run in a:
        other = by_seed.get(run.config.get("seed"))
        if other is not None:
            x, y = measure(run), measure(other)
            if x is not None and y is not None:
                diffs.append(x - y)
    return stat(diffs)


def mean_accuracy_over_epochs(run: Run) -> float | None:
    """The area under the test-accuracy curve per epoch: higher when a run gets
    good sooner. A diverged run scores what it had, with 0 for lost epochs."""
    epochs = run.config.get("epochs") or len(run.test)
    if not run.test:
        return None
    return sum(accuracies(run)) / epochs


def accuracy_claim(groups: dict[str, list[Run]], optimizer: str, target: float, epochs: int) -> dict | None:
    """"<optimizer> reaches <target> within <epochs> epochs": the best test
    accuracy of those epochs, per seed."""
    runs = groups.get(optimizer)
    if not runs:
        return None
    measured = stat([best_accuracy(r, within=epochs) for r in runs])
    return dict(
        claim=f"{label_of(optimizer)} reaches {100 * target:.1f}% within {counted(epochs, 'epoch')}",
        measured=("best of epochs 1-%d: " % epochs) + cell(measured)
        + ("" if measured is None or measured.n < 2 else f", seeds {100 * measured.low:.2f}-{100 * measured.high:.2f}%"),
        verdict=verdict(measured, target),
    )


def faster_claim(groups: dict[str, list[Run]], optimizer: str, other: str) -> dict | None:
    """"<optimizer> converges faster than <other>": the paired difference of the
    mean test accuracy over the epochs (the area under the curve)."""
    if optimizer not in groups or other not in groups:
        return None
    diff = paired(groups[optimizer], groups[other], mean_accuracy_over_epochs)
    if diff is None:
        return None
    interval = diff.interval()
    spread = "" if interval is None else f", 95% CI {100 * interval[0]:+.2f} to {100 * interval[1]:+.2f} points"
    return dict(
        claim=f"{label_of(optimizer)} converges faster than {label_of(other)}",
        measured=f"mean test accuracy over the epochs, {label_of(optimizer)} minus {label_of(other)}: "
                 f"{100 * diff.mean:+.2f} ± {100 * diff.std:.2f} points (n={diff.n} paired seeds){spread}",
        verdict=verdict(diff, 0.0),
    )


def claims_table(rows: list[dict]) -> str:
    lines = ["| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {r['claim']} | {r['measured']} | **{r['verdict']}** |" for r in rows]
    return "\n".join(lines)

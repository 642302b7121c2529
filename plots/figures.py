"""Comparison figures: train loss against samples seen, test accuracy and test loss per epoch."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

# Adam red, LAMB green, LAMB16 blue, as in the original figures; each also has
# its own line style and marker so that the figure reads without colour.
STYLES = {
    "adam": dict(color="tab:red", linestyle="--", marker="s", label="Adam"),
    "lamb": dict(color="tab:green", linestyle="-.", marker="^", label="LAMB"),
    "lamb16": dict(color="tab:blue", linestyle="-", marker="o", label="LAMB16"),
    "lamb16-seed": dict(color="tab:cyan", linestyle=":", marker="x", label="LAMB16, seed scaling"),
}


@dataclass
class Run:
    """What a run directory holds, as the figure needs it."""

    variant: str  # adam, lamb, lamb16 or lamb16-seed
    config: dict
    train: list[dict] = field(default_factory=list)  # {"samples", "loss"}
    test: list[dict] = field(default_factory=list)  # {"epoch", "test_loss", "test_accuracy"}
    diverged: bool = False


def load_run(run_dir: Path) -> Run:
    """Read config.json and metrics.jsonl of a run (a truncated last line is ignored)."""
    config = json.loads((run_dir / "config.json").read_text())
    run = Run(variant=config.get("variant", config["optimizer"]), config=config)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a crash can cut the last line short
        kind = record.get("kind")
        if kind == "train":
            run.train.append(record)
        elif kind == "test":
            run.test.append(record)
        elif kind == "diverged":
            run.diverged = True
    return run


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def zoom(values: list[float], low_q: float, high_q: float, floor: float | None = None) -> tuple[float, float]:
    """Axis limits around where most values lie, so that one diverging curve is
    clipped at the edge instead of squashing the others."""
    values = finite(values)
    if not values:
        return (0.0, 1.0)
    low, high = quantile(values, low_q), quantile(values, high_q)
    margin = 0.08 * (high - low) or 0.01 * max(abs(high), 1e-3)
    low, high = low - margin, high + margin
    return (max(low, floor) if floor is not None else low, high)


def comparison_figure(runs: list[Run], path: Path, title: str) -> Path:
    """Draw the three panels for `runs` into `path` (PNG) and return it."""
    fig, (loss_ax, acc_ax, test_loss_ax) = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    all_loss, all_acc, all_test_loss = [], [], []
    for run in runs:
        style = dict(STYLES.get(run.variant, dict(label=run.variant)))
        if run.diverged:
            style["label"] += " (diverged)"
        marker = style.pop("marker", None)
        samples = [r["samples"] for r in run.train]
        losses = [r["loss"] for r in run.train]
        loss_ax.plot(samples, losses, linewidth=1.0, **style)
        epochs = [r["epoch"] for r in run.test]
        accuracy = [r["test_accuracy"] for r in run.test]
        test_loss = [r["test_loss"] for r in run.test]
        acc_ax.plot(epochs, accuracy, marker=marker, **style)
        test_loss_ax.plot(epochs, test_loss, marker=marker, **style)
        # Skip the first tenth of training: every curve starts high.
        all_loss += losses[len(losses) // 10 :]
        all_acc += accuracy[1:] or accuracy
        all_test_loss += test_loss[1:] or test_loss

    loss_ax.set(title="train loss", xlabel="samples seen", ylabel="NLL loss", ylim=zoom(all_loss, 0.0, 0.97, floor=0.0))
    acc_ax.set(title="test accuracy", xlabel="epoch", ylabel="accuracy", ylim=zoom(all_acc, 0.1, 1.0))
    test_loss_ax.set(title="test loss", xlabel="epoch", ylabel="NLL loss", ylim=zoom(all_test_loss, 0.0, 0.9, floor=0.0))
    acc_ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=1))
    last_epoch = max((r["epoch"] for run in runs for r in run.test), default=1)
    for ax in (acc_ax, test_loss_ax):
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (loss_ax, acc_ax, test_loss_ax):
        ax.grid(True, alpha=0.4)
        ax.legend()
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_title(config: dict) -> str:
    return (
        f"MNIST CNN, batch {config['batch_size']}, lr {config['lr']:g}, "
        f"weight decay {config['wd']:g}, seed {config['seed']}"
    )

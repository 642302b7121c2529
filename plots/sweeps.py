"""Sweep figures: validation accuracy against learning rate (one panel per
batch size), and tuned test accuracy against batch size. Each series is a
mean over seeds with a band from the lowest to the highest seed. This module
only draws: the experiments compute the series."""

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import PercentFormatter

from .figures import Band, draw_band


@dataclass
class Series:
    """One optimizer's points: x (learning rate, or batch size) against accuracy over seeds."""

    label: str
    style: dict  # color, linestyle, marker
    band: Band


def log_x_panel(ax, series: list[Series], title: str, xlabel: str) -> None:
    for s in series:
        draw_band(ax, s.band, dict(s.style, label=s.label), per_epoch=True)
    ax.set_xscale("log")
    xs = sorted({x for s in series for x in s.band.x})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the grid's own values
    ax.minorticks_off()
    ax.set(title=title, xlabel=xlabel, ylabel="accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # as many decimals as the range needs
    ax.grid(True, alpha=0.4)


def finish(fig, ax, path: Path, title: str) -> Path:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), frameon=False)
    fig.suptitle(title, fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lr_figure(panels: dict[int, list[Series]], path: Path, title: str) -> Path:
    """Validation accuracy against learning rate, one panel per batch size."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.6), layout="constrained",
                             squeeze=False, sharey=True)
    for ax, (batch_size, series) in zip(axes[0], sorted(panels.items())):
        log_x_panel(ax, series, f"batch {batch_size}", "learning rate")
    return finish(fig, axes[0][0], path, title)


def batch_figure(series: list[Series], path: Path, title: str) -> Path:
    """Test accuracy at each optimizer's tuned learning rate against batch size."""
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    log_x_panel(ax, series, "test accuracy at the learning rate chosen by validation", "batch size")
    return finish(fig, ax, path, title)

"""Sweep figures: validation accuracy against learning rate (one panel per
batch size), and test accuracy at the chosen setting against batch size. Each
series is a mean over seeds with a band (its seeds' range, or its 95%
interval). Each panel is zoomed to the accuracies that decide between the
optimizers (each one's best), a point below drawn as a triangle on the lower
edge. On the batch axis the optimizers stand side by side around each batch
size. This module only draws: the experiments compute the series."""

import math
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

from .figures import OFF_SCALE_NOTE, Band, draw_band, figure_legend, mark_outside, pyplot


@dataclass
class Series:
    """One optimizer's points: x (learning rate, or batch size) against accuracy over seeds."""

    label: str
    style: dict  # color, linestyle, marker
    band: Band


NAMED_TICK_RATIO = 1.8  # closer values (a search's draws) get the log axis's own ticks: their names would overlap
BATCH_DODGE = 0.025  # decades between optimizers at a batch size: 6 of them span a third of 512 to 2048
FAR_BELOW = 0.10  # a mean this far under the panel's best (ten points) is off its scale


def deciding_range(series: list[Series], every_point: bool) -> tuple[float, float]:
    """Accuracy limits that show what decides: every optimizer's best point and
    what lies near it (every_point False: a learning rate's failures further
    below are off the scale), or every point within FAR_BELOW of the best (a
    batch size's), with a margin; at most 100%."""
    means = [[v for v in s.band.mean if math.isfinite(v)] for s in series]
    tops = [v for s in series for v in s.band.high if math.isfinite(v)]
    if not any(means):
        return 0.0, 1.0
    best = max(max(m) for m in means if m)
    shown = [min(m) if every_point else max(m) for m in means if m]
    low = max(min(shown), best - FAR_BELOW) if every_point else min(shown)
    high = max(tops + [best])
    spread = max(high - low, 0.005)  # half a point at least: a flat panel is no zoom into noise
    return max(0.0, low - (0.15 if every_point else 0.6) * spread), min(1.0, high + 0.15 * spread)


def dodged(series: list[Series], decades: float) -> list[Series]:
    """The series side by side: each one's x moved by `decades` (on the log
    axis) from its neighbour's, the group centred on the true x, so that the
    points and bars of optimizers at the same x do not hide one another."""
    middle = (len(series) - 1) / 2
    return [replace(s, band=replace(s.band, x=[x * 10 ** (decades * (k - middle)) for x in s.band.x]))
            for k, s in enumerate(series)]


def log_x_panel(ax, series: list[Series], title: str, xlabel: str, every_point: bool = True,
                dodge: float = 0.0) -> bool:
    """One panel; returns whether any point lies below its zoomed range.
    `dodge`: decades between neighbouring series at the same x (ticks stay at the true x)."""
    xs = sorted({x for s in series for x in s.band.x})
    series = dodged(series, dodge) if dodge else series
    for s in series:
        draw_band(ax, s.band, dict(s.style, label=s.label), per_epoch=True)
    ax.set_xscale("log")
    if all(b / a >= NAMED_TICK_RATIO for a, b in zip(xs, xs[1:])):  # a grid's values, far enough apart to name
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.margins(x=0.08)
    ax.set(title=title, xlabel=xlabel, ylabel="accuracy", ylim=deciding_range(series, every_point))
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # as many decimals as the range needs
    ax.grid(True, alpha=0.4)
    below = False
    for s in series:
        below |= mark_outside(ax, s.band.x, s.band.mean, s.style["color"])
    return below


def wrapped(title: str, fig) -> str:
    """The title's lines wrapped to the figure's width (about 13 characters an inch at the title's size)."""
    width = int(13 * fig.get_size_inches()[0])
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def finish(fig, ax, path: Path, title: str, off_scale: bool) -> Path:
    fig.suptitle(wrapped(title, fig), fontsize="medium")
    figure_legend(fig, ax, OFF_SCALE_NOTE if off_scale else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def lr_figure(panels: dict[int, list[Series]], path: Path, title: str) -> Path:
    """Validation accuracy against learning rate, one panel per batch size, each zoomed to its own best points."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4.4 * len(panels) + 1, 5.0), layout="constrained",
                             squeeze=False)
    off_scale = False
    for ax, (batch_size, series) in zip(axes[0], sorted(panels.items())):
        off_scale |= log_x_panel(ax, series, f"batch {batch_size}", "learning rate", every_point=False)
    # The legend of the panel with the most optimizers: every one named once.
    fullest = max(zip(axes[0], sorted(panels.items())), key=lambda item: len(item[1][1]))[0]
    return finish(fig, fullest, path, title, off_scale)


def batch_figure(series: list[Series], path: Path, title: str) -> Path:
    """Test accuracy at each optimizer's chosen setting against batch size."""
    fig, ax = pyplot().subplots(figsize=(7.5, 5.4), layout="constrained")
    off_scale = log_x_panel(ax, series, "", "batch size", dodge=BATCH_DODGE)  # the figure's title says what it shows
    return finish(fig, ax, path, title, off_scale)

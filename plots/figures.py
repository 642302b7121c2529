"""Comparison figures: train loss against samples seen, test accuracy and test
loss per epoch, one mean curve per optimizer with a band from its lowest to
its highest seed. This module only draws: the experiments compute the curves."""

import math
from dataclasses import dataclass, field
from pathlib import Path



def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported
    by the first figure: commands that draw none (a sweep's workers, train)
    skip its second of import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Band:
    """A curve over seeds: the mean, and the lowest and highest seed at each x."""

    x: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)


@dataclass
class Curves:
    """One optimizer's (or setting's) curves, and how to draw them."""

    label: str
    style: dict  # color, linestyle, marker
    train_loss: Band
    test_accuracy: Band
    test_loss: Band
    seeds: int = 1


def smooth(values: list[float], window: int) -> list[float]:
    """A centred moving average (shorter at the ends), so that noisy batch
    losses read as a trend; non-finite values pass through unsmoothed."""
    if window <= 1:
        return list(values)
    half = window // 2
    out = []
    for i, value in enumerate(values):
        near = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if near and math.isfinite(value) else value)
    return out


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def zoom(values: list[float], low_q: float, high_q: float, floor: float | None = None) -> tuple[float, float]:
    """Axis limits around where most values lie, so that one diverging curve is
    clipped at the edge (and marked there) instead of squashing the others."""
    values = finite(values)
    if not values:
        return (0.0, 1.0)
    low, high = quantile(values, low_q), quantile(values, high_q)
    margin = 0.08 * (high - low) or 0.01 * max(abs(high), 1e-3)
    low, high = low - margin, high + margin
    return (max(low, floor) if floor is not None else low, high)


def mark_outside(ax, x: list[float], y: list[float], color: str) -> bool:
    """Triangles on the axis edge where a point lies beyond the zoomed range
    (or is not finite): the curve went there, the axis does not show it.
    Returns whether it drew any."""
    low, high = ax.get_ylim()
    above = [(a, high) for a, b in zip(x, y) if not math.isfinite(b) or b > high]
    below = [(a, low) for a, b in zip(x, y) if math.isfinite(b) and b < low]
    for points, marker in ((above, "^"), (below, "v")):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, linestyle="none", marker=marker, color=color, markersize=7, clip_on=False, zorder=5)
    return bool(above or below)


FEW = 5  # a curve of fewer records is drawn as its points alone: a line between two records is no measurement


def draw_band(ax, band: Band, style: dict, per_epoch: bool, fill_alpha: float = 0.18) -> None:
    """The mean, and the seeds' range shaded (and, per epoch, as a bar at each
    point, which also shows where there is a single epoch). Where the records
    are few, only the points and their bars, unjoined (the legend keeps the
    line style)."""
    few = len(band.x) < FEW
    line, = ax.plot(band.x, band.mean, marker=style.get("marker") if per_epoch or few else None,
                    color=style["color"], linestyle="none" if few else style["linestyle"], label=style["label"])
    if few and style["linestyle"] != "none":
        ax.plot([], [], color=style["color"], linestyle=style["linestyle"], marker=style.get("marker"),
                label=style["label"])
        line.set_label("_" + style["label"])  # the legend shows the series' own line style
    if any(lo != hi for lo, hi in zip(band.low, band.high)):
        if not few:
            ax.fill_between(band.x, band.low, band.high, color=style["color"], alpha=fill_alpha, linewidth=0)
        if per_epoch or few:
            ax.vlines(band.x, band.low, band.high, color=style["color"], alpha=0.6, linewidth=1.5)


def figure_legend(fig, ax, note: str | None = None) -> None:
    """The legend of `ax`'s lines under the figure, in as many columns as fit
    its width (every entry shown, none cut), with `note` as its title, so that
    nothing at the figure's foot overlaps it."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    renderer = fig.canvas.get_renderer()
    for columns in range(min(len(labels), 6), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False,
                            title=note, title_fontsize="small")
        if legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width or columns == 1:
            return
        legend.remove()


def nothing_to_draw(axes, why: str) -> None:
    for ax in axes:
        ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.35", wrap=True)


SPARSE = 30  # a curve of fewer points shows each one: a line between two records is no measurement


def comparison_figure(curves: list[Curves], path: Path, title: str, log_y: bool = False) -> Path:
    """Draw the three panels for `curves` into `path` (PNG) and return it.
    `log_y` puts both loss panels on a log scale (no zoom then)."""
    from matplotlib.ticker import MultipleLocator, PercentFormatter

    plt = pyplot()
    fig, (loss_ax, acc_ax, test_loss_ax) = plt.subplots(1, 3, figsize=(16, 5.2), layout="constrained")
    all_loss, all_acc, all_test_loss = [], [], []
    for c in curves:
        style = dict(c.style, label=c.label + (f" ({c.seeds} seeds)" if c.seeds > 1 else ""))
        band = c.train_loss
        window = max(1, len(band.x) // 25)
        # Raw mean faint behind, the smoothed mean and band in front.
        if len(band.x) >= FEW:
            loss_ax.plot(band.x, band.mean, color=style["color"], alpha=0.25, linewidth=0.6)
        smoothed = Band(band.x, smooth(band.mean, window), smooth(band.low, window), smooth(band.high, window))
        draw_band(loss_ax, smoothed, style, per_epoch=len(band.x) < SPARSE)
        draw_band(acc_ax, c.test_accuracy, style, per_epoch=True)
        draw_band(test_loss_ax, c.test_loss, style, per_epoch=True)
        all_loss += band.mean[len(band.mean) // 10 :]  # every curve starts high: skip the first tenth
        all_acc += c.test_accuracy.mean[1:] or c.test_accuracy.mean
        all_test_loss += c.test_loss.mean[1:] or c.test_loss.mean

    loss_ax.set(title="train loss (smoothed; raw mean faint)", xlabel="samples seen", ylabel="NLL loss")
    acc_ax.set(title="test accuracy", xlabel="epoch", ylabel="accuracy", ylim=zoom(all_acc, 0.1, 1.0))
    test_loss_ax.set(title="test loss", xlabel="epoch", ylabel="NLL loss")
    if log_y:
        loss_ax.set_yscale("log")
        test_loss_ax.set_yscale("log")
    else:
        loss_ax.set_ylim(zoom(all_loss, 0.0, 0.97, floor=0.0))
        test_loss_ax.set_ylim(zoom(all_test_loss, 0.0, 0.9, floor=0.0))
    acc_ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # as many decimals as the range needs
    last_epoch = max((x for c in curves for x in c.test_accuracy.x), default=1)
    for ax in (acc_ax, test_loss_ax):
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(MultipleLocator(max(1, math.ceil(last_epoch / 10))))  # whole epochs
    off_scale = False
    for c in curves:
        off_scale |= mark_outside(acc_ax, c.test_accuracy.x, c.test_accuracy.mean, c.style["color"])
        if not log_y:
            off_scale |= mark_outside(test_loss_ax, c.test_loss.x, c.test_loss.mean, c.style["color"])
            off_scale |= mark_outside(loss_ax, c.train_loss.x,
                                      smooth(c.train_loss.mean, max(1, len(c.train_loss.x) // 25)), c.style["color"])
    for ax in (loss_ax, acc_ax, test_loss_ax):
        ax.grid(True, alpha=0.4)
    if not finite(all_loss + all_acc + all_test_loss):
        nothing_to_draw((loss_ax, acc_ax, test_loss_ax), "no finite value to draw:\nevery run diverged or logged nothing")
    fig.suptitle(title)
    figure_legend(fig, acc_ax, OFF_SCALE_NOTE if off_scale else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


OFF_SCALE_NOTE = "\u25b2 / \u25bc on an axis edge: a mean beyond the zoomed range (or not finite) at that x"


TITLE_SETTINGS = (("batch_size", "batch {}"), ("lr", "lr {:g}"), ("wd", "weight decay {:g}"))


def figure_title(config: dict | list[dict], seeds: int = 1) -> str:
    """The settings the runs share (those that differ are in the legend), and the seeds."""
    configs = config if isinstance(config, list) else [config]
    parts = []
    for key, text in TITLE_SETTINGS:
        values = {c.get(key) for c in configs}
        if len(values) == 1 and None not in values:
            parts.append(text.format(values.pop()))
    schedules = {(c.get("schedule", "constant"), c.get("warmup", 0.0)) for c in configs}
    if len(schedules) == 1:
        schedule, warmup = schedules.pop()
        if schedule != "constant" or warmup:
            parts.append(f"{schedule} lr" + (f" after {warmup:.0%} warmup" if warmup else ""))
    if len(parts) < len(TITLE_SETTINGS) or len(schedules) > 1:
        parts.append("other settings as in the legend")
    seed_values = {c.get("seed") for c in configs}
    if seeds > 1:
        seeds_text = f"{seeds} seeds (mean, band: lowest to highest)"
    else:
        seeds_text = f"seed {seed_values.pop()}" if len(seed_values) == 1 else "one seed each"
    return f"MNIST CNN, {', '.join(parts)}, {seeds_text}"


# A second, third, ... setting of one optimizer: its color (the optimizer) kept, its line told apart.
VARIANT_LINES = ("--", ":", "-.", (0, (5, 1, 1, 1)))
VARIANT_MARKERS = ("s", "^", "D", "v")


def tell_apart(curves: list[Curves], optimizers: list[str]) -> list[Curves]:
    """Curves of one optimizer (`optimizers`, one per curve) at several
    settings share its color; each after the first gets a line style and
    marker of its own."""
    seen: dict[str, int] = {}
    for c, optimizer in zip(curves, optimizers):
        k = seen.get(optimizer, 0)
        seen[optimizer] = k + 1
        if k:
            c.style = dict(c.style, linestyle=VARIANT_LINES[(k - 1) % len(VARIANT_LINES)],
                           marker=VARIANT_MARKERS[(k - 1) % len(VARIANT_MARKERS)])
    return curves


def check_figure_path(path: Path) -> None:
    """ValueError unless matplotlib can write a figure of `path`'s file type."""
    plt = pyplot()
    supported = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    kind = path.suffix.lstrip(".").lower()
    if kind not in supported:
        raise ValueError(f"{path}: matplotlib writes no .{kind or '(no suffix)'} figures; name a "
                         f"{', '.join('.' + k for k in ('png', 'pdf', 'svg'))} file")

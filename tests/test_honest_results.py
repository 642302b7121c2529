"""Results that cannot mislead: a seed counted once, runs that differ never
pooled, no command writing into a folder another made, figures whose legends
fit and whose panels show what decides, and the smaller answers users asked for."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import cli  # noqa: E402
from experiments import aggregate, loop  # noqa: E402
from experiments.errors import UserError  # noqa: E402
from experiments.runs import FOLDER_RECORD, Run, claim_dir  # noqa: E402
from plots import Band, Curves, Series, lr_figure  # noqa: E402
from plots import figures  # noqa: E402
from plots.sweeps import deciding_range, log_x_panel  # noqa: E402

ONE_EPOCH = ["--epochs", "1", "--batch-size", "100", "--lr", "0.01"]


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def offline(data_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--no-download"]


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.output
    return lines[0]


# ------------------------------------------------------- one seed, once


def test_two_runs_of_one_seed_are_counted_once_with_a_warning_naming_them(data_dir, tmp_path):
    for _ in range(2):  # the same training twice: two run directories of seed 1
        assert invoke("train", "--optimizer", "lamb16", *ONE_EPOCH, *offline(data_dir), "--out",
                      str(tmp_path / "runs")).exit_code == 0
    result = invoke("plot", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    output = result.output  # stdout and stderr, as a terminal shows them
    assert "2 runs of lamb16, seed 1, at one setting" in output and "counted once" in output
    assert "(n=1)" in output and "(n=2)" not in output and "±" not in output


def test_runs_that_differ_in_held_out_images_or_epochs_are_never_pooled(tmp_path):
    def run(name: str, **config) -> Run:
        base = dict(optimizer="lamb16", batch_size=1024, lr=0.02, wd=0.01, epochs=1, seed=1, val_size=0)
        return Run(path=tmp_path / name, config=dict(base, **config), summary=dict(status="completed"),
                   test=[dict(epoch=1, samples=60_000, test_accuracy=0.98, test_loss=0.1)])

    groups = aggregate.group_runs([run("a"), run("b", val_size=10_000), run("c", epochs=2), run("d", seed=2)])
    assert sorted(len(g) for g in groups.values()) == [1, 1, 2]  # only the two seeds of one setting pool
    assert any("val size 10000" in name for name in groups) and any("epochs 2" in name for name in groups)


def test_a_run_with_nothing_logged_is_not_counted_in_the_legend(tmp_path):
    runs = [Run(path=tmp_path / str(s), config=dict(optimizer="adam", seed=s), summary=None,
                test=[dict(epoch=1, test_accuracy=0.9, test_loss=0.3)] if s == 1 else [],
                train=[dict(samples=100, loss=1.0)] if s == 1 else []) for s in (1, 2)]
    curves = aggregate.curves("adam", runs)
    assert curves.seeds == 1 and "1 with nothing logged" in curves.label


# ---------------------------------------------------- folders that belong


def test_compare_resume_into_a_folder_of_train_runs_is_refused(data_dir, tmp_path):
    out = tmp_path / "runs"
    assert invoke("train", "--optimizer", "lamb16", *ONE_EPOCH, *offline(data_dir), "--out", str(out)).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    result = invoke("compare", *ONE_EPOCH, "--seeds", "1", *offline(data_dir), "--out", str(out), "--resume")
    one_line_error(result, f"--out {out} holds train's runs (made by train)", "folder of its own")
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_sweep_into_a_comparisons_folder_is_refused_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "comparison"
    assert invoke("compare", *ONE_EPOCH, "--seeds", "1", "--optimizers", "lamb16", *offline(data_dir), "--out",
                  str(out)).exit_code == 0
    results = (out / "results.md").read_bytes()
    result = invoke("sweep", "--optimizers", "lamb16", "--lrs", "0.01", "--batch-sizes", "100", "--epochs", "1",
                    "--val-size", "100", "--workers", "1", *offline(data_dir), "--out", str(out))
    one_line_error(result, "holds a comparison (made by compare)")
    assert (out / "results.md").read_bytes() == results and not (out / "sweep.db").exists()


def test_compare_resume_into_a_run_directory_is_refused_and_creates_nothing_inside(data_dir, tmp_path):
    assert invoke("train", "--optimizer", "lamb16", *ONE_EPOCH, *offline(data_dir), "--out",
                  str(tmp_path / "runs")).exit_code == 0
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    before = sorted(p.name for p in run.iterdir())
    result = invoke("compare", *ONE_EPOCH, "--seeds", "1", *offline(data_dir), "--out", str(run), "--resume")
    one_line_error(result, "is a run directory", "train --resume")
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_report_of_several_sweeps_never_goes_into_one_of_them(data_dir, tmp_path):
    for name, batch in (("a", "50"), ("b", "100")):
        assert invoke("sweep", "--optimizers", "lamb16", "--lrs", "0.01", "--batch-sizes", batch, "--epochs", "1",
                      "--val-size", "100", "--workers", "1", *offline(data_dir),
                      "--out", str(tmp_path / name)).exit_code == 0
    before = (tmp_path / "a" / "results.md").read_bytes()
    result = invoke("report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "a"))
    one_line_error(result, "holds a sweep (made by sweep)")
    assert (tmp_path / "a" / "results.md").read_bytes() == before
    assert invoke("report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both")).exit_code == 0
    assert json.loads((tmp_path / "both" / FOLDER_RECORD).read_text())["command"] == "report"


def test_a_reproduction_written_before_folder_records_resumes(tmp_path):
    figure = tmp_path / "reproduce" / "B128L001"  # a figure's folder of runs, as reproduce wrote it before records
    (figure / "lamb16_seed1").mkdir(parents=True)
    (figure / "lamb16_seed1" / "config.json").write_text("{}")
    assert claim_dir(figure, "reproduce") == figure
    assert json.loads((figure / FOLDER_RECORD).read_text())["command"] == "reproduce"
    with pytest.raises(UserError, match="holds a reproduction"):
        claim_dir(figure, "sweep")


# ------------------------------------------------------------- figures


def test_every_legend_entry_fits_the_figure():
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for k in range(7):
        ax.plot([1, 2], [k, k], label=f"an optimizer with a long name, number {k} (batch size 1024, lr 0.02)")
    figures.figure_legend(fig, ax, note="a note under the panels")
    fig.canvas.draw()
    (legend,) = fig.legends
    box, page = legend.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    plt.close(fig)
    assert len(legend.get_texts()) == 7 and box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1
    assert legend.get_title().get_text() == "a note under the panels"  # the note in the legend: no overlap


def test_a_learning_rate_panel_zooms_to_the_best_points_and_marks_the_failures_below():
    series = [Series("a", dict(color="red", linestyle="-", marker="o"),
                     Band([0.01, 0.1, 1.0], [0.990, 0.993, 0.0], [0.990, 0.993, 0.0], [0.990, 0.993, 0.0])),
              Series("b", dict(color="blue", linestyle="-", marker="s"),
                     Band([0.01, 0.1, 1.0], [0.985, 0.991, 0.5], [0.985, 0.991, 0.5], [0.985, 0.991, 0.5]))]
    low, high = deciding_range(series, every_point=False)
    assert 0.97 < low < 0.991 and 0.993 < high <= 1.0  # the diverged lrs (0% and 50%) off the scale
    low, high = deciding_range(series, every_point=True)
    assert 0.87 < low < 0.893  # every point within ten points of the best (and a margin), the rest marked


def test_a_figure_where_every_run_diverged_says_so(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(figures, "nothing_to_draw", lambda axes, why: said.append(why))
    empty = Curves("adam, 3 diverged", dict(color="red", linestyle="-", marker="o"), Band(), Band(), Band(), seeds=0)
    assert figures.comparison_figure([empty], tmp_path / "f.png", "t").stat().st_size > 0
    assert said and "every run diverged" in said[0]


def test_a_curve_of_few_records_is_drawn_as_points():
    fig, ax = plt.subplots()
    figures.draw_band(ax, Band([1, 2], [0.5, 0.4], [0.5, 0.4], [0.5, 0.4]), dict(color="red", linestyle="-",
                                                                             marker="o", label="two records"),
                      per_epoch=False)
    drawn = [line for line in ax.get_lines() if len(line.get_xdata())]
    plt.close(fig)
    assert [line.get_linestyle() for line in drawn] == ["None"] and drawn[0].get_marker() == "o"


def test_an_lr_figure_of_panels_with_other_optimizers_names_every_one(tmp_path):
    band = Band([0.01, 0.1], [0.98, 0.99], [0.98, 0.99], [0.98, 0.99])
    panels = {512: [Series(n, dict(color="red", linestyle="-", marker="o"), band) for n in "abcdef"],
              8192: [Series(n, dict(color="blue", linestyle="-", marker="s"), band) for n in "ab"]}
    path = lr_figure(panels, tmp_path / "lr.png", "title")
    assert path.stat().st_size > 0


def test_a_searchs_crowded_learning_rates_get_tick_labels_that_do_not_overlap(tmp_path):
    drawn = [0.00126, 0.00327, 0.00742, 0.0171, 0.0443, 0.0664, 0.144, 0.356]  # a search's lrs at one batch size
    band = Band(drawn, [0.97 + 0.002 * k for k in range(8)], [0.97] * 8, [0.99] * 8)
    fig, ax = plt.subplots(figsize=(4.4, 5.0))
    log_x_panel(ax, [Series("a", dict(color="red", linestyle="none", marker="o"), band)], "batch 8192", "lr")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()
                    and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]), key=lambda b: b.x0)
    plt.close(fig)
    assert len(boxes) >= 2 and all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_optimizers_at_the_same_batch_size_stand_side_by_side_with_the_ticks_at_the_batch_size():
    """Six optimizers at batch 512 and 2048: each drawn beside the others, none
    hiding another's point or bar, the group centred on the batch size it names."""
    band = Band([512, 2048], [0.99, 0.98], [0.985, 0.975], [0.995, 0.985])
    series = [Series(n, dict(color=c, linestyle="none", marker="o"), band)
              for n, c in zip("abcdef", ("red", "green", "blue", "black", "orange", "purple"))]
    fig, ax = plt.subplots()
    log_x_panel(ax, series, "", "batch size", dodge=0.025)
    drawn = [list(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata()) == 2]
    ticks = list(ax.get_xticks())
    plt.close(fig)
    assert ticks == [512, 2048] and len(drawn) == 6
    for column, batch_size in enumerate((512, 2048)):
        xs = sorted(x[column] for x in drawn)
        assert len(set(xs)) == 6 and all(b / a > 1.05 for a, b in zip(xs, xs[1:]))  # apart
        assert xs[-1] / xs[0] < 1.5 and math.isclose(math.sqrt(xs[0] * xs[-1]), batch_size)  # centred, near


# ------------------------------------------------------ smaller answers


@pytest.mark.parametrize("args,fragment", [
    (["--seeds", "99999999999999999999"], "a count of at most 1000 seeds"),
    (["--seeds", "1,99999999999999999999"], "outside 0 to 2**63-1"),
])
def test_seeds_out_of_range_are_one_line(data_dir, tmp_path, args, fragment):
    one_line_error(invoke("train", *ONE_EPOCH, *args, *offline(data_dir), "--out", str(tmp_path)), fragment)


def test_a_seed_out_of_range_is_a_usage_error_not_a_traceback(data_dir, tmp_path):
    result = invoke("train", *ONE_EPOCH, "--seed", "99999999999999999999", *offline(data_dir), "--out", str(tmp_path))
    assert result.exit_code == 2 and "Traceback" not in result.output and "--seed" in result.output


def test_a_long_epoch_says_how_far_it_got_where_no_bar_shows_it(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "PROGRESS_SECONDS", 0.0)
    result = invoke("train", "--optimizer", "lamb16", "--epochs", "1", "--batch-size", "50", "--log-interval", "2",
                    "--no-progress", *offline(data_dir), "--out", str(tmp_path))
    assert result.exit_code == 0
    progress = [line for line in result.output.splitlines() if " epoch 1: batch " in line]
    assert progress[0].startswith("lamb16_b50_lr") and "/6, loss" in progress[0]  # its run and lr named


def test_the_peers_import_and_compile_noise_stays_out_of_the_output():
    pytest.importorskip("torchao")
    code = ("import torch; from experiments import registry; p = torch.nn.Parameter(torch.zeros(8192)); "
            "o = registry.build('ao-adamw4bit', [p], 0.01, 0.0); p.grad = torch.ones(8192); o.step(); print('built')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(cli.__file__).parent, timeout=300)
    assert result.stdout.strip() == "built" and result.stderr.strip() == "", result.stderr


def test_an_unwritable_kernel_cache_says_so_not_install_a_compiler(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = "import warnings, torch, lamb16.native as n; warnings.simplefilter('always'); print(n.library())"
    env = dict(os.environ, LAMB16_CACHE_DIR=str(blocker / "cache"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.strip() == "None"
    assert "LAMB16_CACHE_DIR" in result.stderr and "writable" in result.stderr
    assert "install a C++ compiler" not in result.stderr
    assert shutil.which(os.environ.get("CXX", "c++"))  # the compiler was there: the cache was the problem

"""A new user's mistakes and a machine's faults: each a one-line error (or a
correct result) that loses nothing already written, and a way to go on."""

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import cli
from experiments import aggregate
from experiments.runs import load_runs
from mnist_files import write_idx
from plots import Band, Curves, Series, figure_title, tell_apart
from plots.sweeps import log_x_panel

TWO_EPOCHS = ["--optimizer", "lamb16", "--epochs", "2", "--batch-size", "100", "--lr", "0.01"]


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def offline(data_dir: Path, out: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--no-download", "--out", str(out)]


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def one_run(out: Path) -> Path:
    (config,) = list(out.rglob("config.json"))
    return config.parent


def files_of(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture
def stopped_run(data_dir, tmp_path, monkeypatch) -> Path:
    """A two-epoch run interrupted after its first epoch (as Ctrl-C leaves one)."""
    from experiments import loop

    original = loop.train_epoch
    calls = []

    def stop_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", stop_in_epoch_two)
    result = invoke("train", *TWO_EPOCHS, *offline(data_dir, tmp_path / "runs"))
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(loop, "train_epoch", original)
    return one_run(tmp_path / "runs")


def test_resume_refuses_options_that_contradict_the_run_naming_each(stopped_run, data_dir):
    before = files_of(stopped_run)
    result = invoke("train", "--resume", str(stopped_run), "--optimizer", "adam", "--lr", "0.5", "--epochs", "5",
                    "--data-dir", str(data_dir), "--no-download")
    line = error_line(result)
    assert "--optimizer adam (the run's: lamb16)" in line and "--lr 0.5 (the run's: 0.01)" in line
    assert "--epochs 5 (the run's: 2)" in line and "without --resume" in line
    assert files_of(stopped_run) == before
    # Options that agree with the run are no contradiction: it resumes and completes.
    result = invoke("train", "--resume", str(stopped_run), "--lr", "0.01", "--optimizer", "lamb16",
                    "--data-dir", str(data_dir), "--no-download")
    assert result.exit_code == 0, result.output
    assert json.loads((stopped_run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("key, value, fragment", [
    ("lr", 0.5, "lr 0.5 (the checkpoint's: 0.01)"),
    ("optimizer", "adam", "optimizer adam (the checkpoint's: lamb16)"),
])
def test_a_config_edited_after_its_checkpoint_is_refused(stopped_run, data_dir, key, value, fragment):
    config = json.loads((stopped_run / "config.json").read_text())
    config[key] = value
    (stopped_run / "config.json").write_text(json.dumps(config))
    checkpoint = (stopped_run / "checkpoint.pt").read_bytes()
    line = error_line(invoke("train", "--resume", str(stopped_run), "--data-dir", str(data_dir), "--no-download"))
    assert "was edited after checkpoint.pt was written" in line and fragment in line
    assert (stopped_run / "checkpoint.pt").read_bytes() == checkpoint


@pytest.mark.parametrize("text, fragment", [
    ("[1, 2]", "holds a JSON list, not an object"),
    (None, "batch_size is 'big', not an integer"),
    ("lr-nan", "lr nan must be a finite number above 0"),
])
def test_a_damaged_config_json_is_one_line_on_resume(stopped_run, data_dir, text, fragment):
    config = json.loads((stopped_run / "config.json").read_text())
    if text is None:
        text = json.dumps(dict(config, batch_size="big"))
    elif text == "lr-nan":
        text = json.dumps(dict(config, lr=float("nan")))
    (stopped_run / "config.json").write_text(text)
    line = error_line(invoke("train", "--resume", str(stopped_run), "--data-dir", str(data_dir), "--no-download"))
    assert fragment in line


def test_a_deleted_checkpoint_is_refused_not_restarted(data_dir, tmp_path):
    result = invoke("train", *TWO_EPOCHS, *offline(data_dir, tmp_path / "runs"))
    assert result.exit_code == 0
    run = one_run(tmp_path / "runs")
    (run / "summary.json").unlink()  # as if it had stopped after epoch 2, before its summary
    (run / "checkpoint.pt").unlink()
    line = error_line(invoke("train", "--resume", str(run), "--data-dir", str(data_dir), "--no-download"))
    assert "checkpoint.pt is missing, yet metrics.jsonl records 2 finished epochs" in line


def test_resume_on_other_data_files_is_refused(stopped_run, data_dir):
    labels = data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # one test label changed: same sizes, other files
    labels.write_bytes(bytes(data))
    line = error_line(invoke("train", "--resume", str(stopped_run), "--data-dir", str(data_dir), "--no-download"))
    assert "began on other MNIST files: t10k-labels-idx1-ubyte" in line


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one_and_resumes(data_dir, tmp_path, monkeypatch):
    from experiments import runs

    saves = []
    original = torch.save

    def full_disk_at_the_second(obj, file, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            file.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, file, *args, **kwargs)

    monkeypatch.setattr(runs.torch, "save", full_disk_at_the_second)
    line = error_line(invoke("train", *TWO_EPOCHS, *offline(data_dir, tmp_path / "runs")))
    run = one_run(tmp_path / "runs")
    assert "No space left on device" in line and f"resume with: python cli.py train --resume {run}" in line
    assert not list(run.glob(".checkpoint*")) and not list(run.glob(".*"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["epoch"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
    monkeypatch.setattr(runs.torch, "save", original)
    result = invoke("train", "--resume", str(run), "--data-dir", str(data_dir), "--no-download")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["test_accuracy_by_epoch"]) == 2


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "nan"], "'nan' is not a finite number above 0"),
    (["--lr", "0"], "'0' is not a finite number above 0"),
    (["--weight-decay", "inf"], "'inf' is not a finite number at least 0"),
])
def test_non_finite_or_zero_settings_are_refused_before_any_folder(data_dir, tmp_path, args, fragment):
    result = invoke("train", *args, *offline(data_dir, tmp_path / "runs"))
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_sweep_refuses_lr_zero_and_nan_as_train_does(data_dir, tmp_path):
    for lrs in ("0,0.01", "nan"):
        line = error_line(invoke("sweep", "--optimizers", "adamw", "--lrs", lrs, "--epochs", "1",
                                 *offline(data_dir, tmp_path / "sweep")))
        assert "invalid --lrs" in line and "positive" in line


def test_labels_out_of_range_are_one_line(data_dir, tmp_path):
    write_idx(data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte", torch.full((300,), 12))
    line = error_line(invoke("train", *TWO_EPOCHS, *offline(data_dir, tmp_path / "runs")))
    assert "labels" in line and "12..12, not digits 0-9" in line


def test_a_failed_download_leaves_no_folder_it_made(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train=True, download=False):
            Path(root, "MNIST", "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does first
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    data = tmp_path / "mistyped"
    line = error_line(invoke("train", "--data-dir", str(data), "--out", str(tmp_path / "runs")))
    assert "--data-dir" in line and "LAMB16_DATA_DIR" in line
    assert not data.exists() and not (tmp_path / "runs").exists()


def test_plot_to_a_file_type_matplotlib_cannot_write_is_one_line(data_dir, tmp_path):
    assert invoke("train", *TWO_EPOCHS, *offline(data_dir, tmp_path / "runs")).exit_code == 0
    line = error_line(invoke("plot", str(tmp_path / "runs"), "--output", str(tmp_path / "figure.txt")))
    assert "writes no .txt figures" in line and ".png" in line
    assert not (tmp_path / "figure.txt").exists()


def test_run_files_follow_the_umask(data_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        assert invoke("train", *TWO_EPOCHS, *offline(data_dir, tmp_path / "runs")).exit_code == 0
    finally:
        os.umask(previous)
    run = one_run(tmp_path / "runs")
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name


# ------------------------------------------------------------------ figures ----

def test_a_title_over_mixed_settings_names_only_what_they_share():
    configs = [dict(batch_size=1024, lr=0.02, wd=0.01, seed=1), dict(batch_size=1024, lr=0.005, wd=0.01, seed=1)]
    title = figure_title(configs)
    assert "batch 1024" in title and "weight decay 0.01" in title
    assert "lr" not in title and "as in the legend" in title
    assert figure_title(configs[:1]) == "MNIST CNN, batch 1024, lr 0.02, weight decay 0.01, seed 1"


def test_one_optimizer_at_several_settings_is_drawn_in_lines_told_apart(data_dir, tmp_path):
    for lr in ("0.01", "0.02", "0.005"):
        args = ["--optimizer", "lamb16", "--epochs", "1", "--batch-size", "150", "--lr", lr]
        assert invoke("train", *args, *offline(data_dir, tmp_path / "runs")).exit_code == 0
    curves = aggregate.all_curves(aggregate.group_runs(load_runs([tmp_path / "runs"])))
    assert len({c.label for c in curves}) == 3 and len({c.style["color"] for c in curves}) == 1
    assert len({(c.style["linestyle"], c.style.get("marker")) for c in curves}) == 3


def test_tell_apart_keeps_each_optimizers_first_style():
    band = Band([1], [0.5], [0.5], [0.5])
    curves = [Curves(name, dict(color=c, linestyle="-", marker="o"), band, band, band)
              for name, c in (("a", "red"), ("b", "blue"), ("a 2", "red"))]
    tell_apart(curves, ["a", "b", "a"])
    assert curves[0].style["linestyle"] == curves[1].style["linestyle"] == "-"
    assert curves[2].style["linestyle"] != "-" and curves[2].style["color"] == "red"


def test_accuracy_ticks_on_a_narrow_range_are_all_different():
    import matplotlib.pyplot as plt

    series = [Series("a", dict(color="red", linestyle="-", marker="o"),
                     Band([512, 2048, 8192], [0.9601, 0.9604, 0.9607], [0.9600, 0.9603, 0.9606],
                          [0.9602, 0.9605, 0.9608]))]
    fig, ax = plt.subplots()
    log_x_panel(ax, series, "narrow", "batch size")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    plt.close(fig)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels

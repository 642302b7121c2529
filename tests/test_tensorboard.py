"""TensorBoard events of a run's curves: written live by train and compare,
replayed by plot from saved runs, the same scalars either way, and a resumed
run's events without the epoch it trained twice."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from stops import StopAtCheck

import cli
from experiments import tensorboard as events
from experiments.config import RunConfig
from experiments.data import load_train_and_test
from experiments.errors import Interrupted
from experiments.loop import train_run
from experiments.runs import RunDir, read_records, run_metadata

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RUN = "lamb16_b64_lr0.01_wd0.01_seed1"


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def scalars_in(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the events in `folder`: tag -> [(step, value)]."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


SCHEDULED = "lamb16_b64_lr0.01_wd0.01_cosine_warmup0.2_seed1"


def test_train_writes_the_runs_curves_as_events_and_plot_replays_the_same(data_dir, tmp_path):
    args = ["train", "--optimizer", "lamb16", "--epochs", "2", "--lr", "0.01", "--batch-size", "64",
            "--schedule", "cosine", "--warmup", "0.2", "--log-interval", "1", "--data-dir", str(data_dir), "--no-download"]
    result = invoke(*args, "--out", str(tmp_path / "runs"), "--tensorboard", str(tmp_path / "tb"))
    assert result.exit_code == 0, result.output
    live = scalars_in(tmp_path / "tb" / SCHEDULED)
    records = read_records(tmp_path / "runs" / SCHEDULED / "metrics.jsonl")[0]
    tests = [r for r in records if r["kind"] == "test"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [v for _, v in live["test/accuracy"]] == pytest.approx([r["test_accuracy"] for r in tests])
    assert [s for s, _ in live["test/accuracy"]] == [r["samples"] for r in tests]  # steps: samples seen
    assert [v for _, v in live["train/lr"]] == pytest.approx([r["lr"] for r in trains])
    assert len({round(v, 9) for _, v in live["train/lr"]}) > 2  # the schedule's shape, not one value
    assert {"train/loss", "test/loss", "trust_ratio/conv1.weight", "trust_ratio/fc2.bias"} <= set(live)

    replayed = invoke("plot", str(tmp_path / "runs" / SCHEDULED), "--tensorboard", str(tmp_path / "replayed"))
    assert replayed.exit_code == 0, replayed.output
    assert "tensorboard --logdir" in replayed.output
    again = scalars_in(tmp_path / "replayed" / SCHEDULED)
    assert again.keys() == live.keys()
    for tag in live:
        assert [s for s, _ in again[tag]] == [s for s, _ in live[tag]]
        assert [v for _, v in again[tag]] == pytest.approx([v for _, v in live[tag]])
    invoke("plot", str(tmp_path / "runs" / SCHEDULED), "--tensorboard", str(tmp_path / "replayed"), "--force")
    assert scalars_in(tmp_path / "replayed" / SCHEDULED)["test/accuracy"] == again["test/accuracy"]  # replaced, not doubled


def test_a_resumed_run_shows_each_epoch_once(data_dir, tmp_path):
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    config = RunConfig(optimizer="lamb16", batch_size=64, lr=0.01, epochs=3, log_interval=2)
    run = RunDir.create(tmp_path / RUN, run_metadata(config, torch.device("cpu"), data_dir, len(train)))
    per_epoch = -(-len(train) // 64)
    with pytest.raises(Interrupted):  # stopped inside epoch 2: its first batches' events were written
        train_run(config, run, train, test, echo=lambda line: None, stop=StopAtCheck(per_epoch + 3),
                  events=tmp_path / "tb")
    train_run(config, run, train, test, echo=lambda line: None, events=tmp_path / "tb")
    shown = scalars_in(tmp_path / "tb")
    records = read_records(run.metrics_path)[0]
    assert [s for s, _ in shown["train/loss"]] == [r["samples"] for r in records if r["kind"] == "train"]
    assert [v for _, v in shown["test/accuracy"]] == pytest.approx(
        [r["test_accuracy"] for r in records if r["kind"] == "test"])
    assert len(shown["test/accuracy"]) == 3


def test_without_tensorboard_installed_the_option_is_a_one_line_error(data_dir, tmp_path, monkeypatch):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else found(name, *a))
    result = invoke("train", "--epochs", "1", "--data-dir", str(data_dir), "--no-download", "--out",
                    str(tmp_path / "runs"), "--tensorboard", str(tmp_path / "tb"))
    assert result.exit_code == 1 and "lamb16[tensorboard]" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    assert json.dumps(list(events.scalars({"kind": "resumed", "samples": 0}))) == "[]"

"""Learning-rate schedules: each step's lr against a hand-computed one, runs
that log it, name it and resume under it bit for bit."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from stops import StopAtCheck
from test_experiments import assert_same_weights_and_state, comparable, new_run

import cli
from experiments.config import RunConfig
from experiments.data import load_train_and_test
from experiments.errors import Interrupted
from experiments.loop import train_run
from experiments.schedules import WARMUP_START, make_scheduler


def expected_lr(step: int, total: int, schedule: str, warmup: float, base: float = 1.0) -> float:
    """Written out by hand: a linear rise over the first ceil(warmup * total)
    steps (from ~0), then constant, a half cosine to 0, or a line to 0."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return base * (WARMUP_START + (1 - WARMUP_START) * step / warm)
    k, rest = step - warm, total - warm
    if schedule == "cosine":
        return base * (1 + math.cos(math.pi * k / rest)) / 2
    if schedule == "linear":
        return base * (1 - k / rest)
    return base


@pytest.mark.parametrize("schedule, warmup", [("cosine", 0.0), ("cosine", 0.25), ("linear", 0.1),
                                              ("constant", 0.3)])
def test_each_steps_lr_is_the_hand_computed_one(schedule, warmup):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.02)
    total = 40
    scheduler = make_scheduler(optimizer, schedule, warmup, total)
    for step in range(total):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr(step, total, schedule, warmup, 0.02),
                                                                abs=1e-12), step
        optimizer.step()
        scheduler.step()


def test_a_constant_lr_without_warmup_needs_no_scheduler():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert make_scheduler(optimizer, "constant", 0.0, 100) is None


def test_train_logs_the_lr_of_each_interval_and_names_the_schedule(data_dir, tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(cli.cli, [
        "train", "--optimizer", "lamb16", "--epochs", "2", "--batch-size", "50", "--lr", "0.02", "--log-interval", "1",
        "--schedule", "cosine", "--warmup", "0.25", "--data-dir", str(data_dir), "--no-download", "--out", str(out),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = [p.parent for p in out.rglob("config.json")]
    assert run.name == "lamb16_b50_lr0.02_wd0.01_cosine_warmup0.25_seed1"
    config = json.loads((run / "config.json").read_text())
    assert config["schedule"] == "cosine" and config["warmup"] == 0.25
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    total = 2 * 6  # 300 images in batches of 50
    assert lrs == pytest.approx([expected_lr(step, total, "cosine", 0.25, 0.02) for step in range(total)], rel=1e-6)


def test_a_constant_run_keeps_the_name_it_always_had():
    assert RunConfig(optimizer="adam", batch_size=64, lr=0.01, wd=0.01).run_name() == "adam_b64_lr0.01_wd0.01_seed1"


def test_a_run_stopped_under_a_schedule_resumes_bit_for_bit(data_dir, tmp_path):
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    config = RunConfig(optimizer="lamb16", epochs=3, batch_size=32, lr=0.02, log_interval=3, schedule="cosine",
                       warmup=0.2)
    whole = new_run(tmp_path, "whole", config, data_dir, len(train))
    train_run(config, whole, train, test, echo=lambda line: None)
    cut = new_run(tmp_path, "cut", config, data_dir, len(train))
    with pytest.raises(Interrupted):
        train_run(config, cut, train, test, echo=lambda line: None,
                  stop=StopAtCheck(math.ceil(len(train) / config.batch_size) + 4))  # inside epoch 2
    resumed = train_run(config, cut, train, test, echo=lambda line: None)
    assert resumed["status"] == "completed"
    assert comparable(cut.path) == comparable(whole.path)  # the lr of every interval included
    assert_same_weights_and_state(cut.path, whole.path)


@pytest.mark.parametrize("args, fragment", [
    (["--schedule", "step"], "'step' is not one of 'constant', 'cosine', 'linear'"),
    (["--warmup", "1"], "'1' is not a finite number at least 0 and at most 0.99"),
])
def test_bad_schedule_options_are_usage_errors(data_dir, tmp_path, args, fragment):
    result = CliRunner().invoke(cli.cli, ["train", *args, "--data-dir", str(data_dir), "--no-download", "--out",
                                          str(tmp_path / "runs")], catch_exceptions=False)
    assert result.exit_code == 2 and fragment in result.output

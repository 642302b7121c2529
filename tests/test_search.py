"""Search sweeps (--trials: each optimizer's own search space, drawn
quasi-randomly, the same budget for each), confirmation on fresh seeds
(--confirm-seeds), and sweeps extended by running them again with more."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from click.testing import CliRunner

import cli
from experiments import registry, space, tuning
from experiments import sweep as sweeps
from experiments.runs import read_records

VAL = 100  # of the 300 synthetic training images
SEARCH = ["--optimizers", "sgd,lamb16", "--trials", "3", "--batch-sizes", "64", "--seeds", "1", "--epochs", "1",
          "--val-size", str(VAL), "--workers", "1"]


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def sweep(data_dir: Path, out: Path, *args: str):
    return invoke("sweep", *args, "--data-dir", str(data_dir), "--no-download", "--out", str(out))


def configs(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "config.json").read_text()) for p in sorted(folder.iterdir())}


def epochs_trained(folder: Path) -> dict[str, int]:
    return {p.name: sum(r["kind"] == "test" for r in read_records(p / "metrics.jsonl")[0])
            for p in sorted(folder.iterdir())}


def inside(knob: registry.Knob, value: float) -> bool:
    drawn = 1 - value if knob.complement else value
    return knob.low * (1 - 1e-3) <= drawn <= knob.high * (1 + 1e-3)


def test_each_optimizer_is_searched_over_its_own_knobs_within_their_ranges():
    for name in ("adamw", "sgd", "adafactor", "muon", "lamb16"):
        drawn = space.settings(name, 8)
        knobs = registry.spec(name).knobs
        assert len(drawn) == 8 and len({tuple(d.items()) for d in drawn}) == 8  # 8 distinct settings
        for setting in drawn:
            assert set(setting) == {k.field for k in knobs}
            assert all(inside(k, setting[k.field]) for k in knobs)
    assert "beta2" not in space.settings("sgd", 1)[0] and "beta1" not in space.settings("adafactor", 1)[0]
    # Quasi-random, not a grid: every draw a new lr, spread over the log range (each half of it gets some).
    lrs = sorted(math.log10(d["lr"]) for d in space.settings("lamb16", 8))
    assert lrs[0] < -1.5 and lrs[-1] > -1.5
    # The same draws for the same knobs, and the first ones kept when more are asked for.
    assert space.settings("adamw", 8) == space.settings("lamb16", 8)
    assert space.settings("lamb16", 12)[:8] == space.settings("lamb16", 8)


def test_a_search_sweep_tunes_every_optimizer_with_the_same_budget_and_confirms_on_fresh_seeds(data_dir, tmp_path):
    out = tmp_path / "search"
    result = sweep(data_dir, out, *SEARCH, "--confirm-seeds", "2")
    assert result.exit_code == 0, result.output
    tuned = configs(out / "runs")
    assert sorted(c["optimizer"] for c in tuned.values()) == ["lamb16"] * 3 + ["sgd"] * 3  # 3 trials each
    for name in ("sgd", "lamb16"):
        drawn = [{k: c[k] for k in space.settings(name, 3)[0]} for c in tuned.values() if c["optimizer"] == name]
        assert sorted(drawn, key=str) == sorted(space.settings(name, 3), key=str)
    assert all(c["beta2"] is None for c in tuned.values() if c["optimizer"] == "sgd")  # SGD has no beta2
    assert {c["seed"] for c in tuned.values()} == {1}

    confirmed = configs(out / "confirm")
    assert len(confirmed) == 4 and {c["seed"] for c in confirmed.values()} == {2, 3}  # never the tuning seed
    from experiments import tuning
    from experiments.runs import load_runs

    choices = tuning.choose(load_runs([out / "runs"]))
    for c in confirmed.values():
        chosen = choices[(c["optimizer"], 64)].config
        assert all(c[k] == getattr(chosen, k) for k in ("lr", "wd", "warmup", "beta1", "beta2", "epochs", "val_size"))
    assert "2 confirmation points" not in result.output and "4 confirmation points queued" in result.output
    trials = optuna.load_study(study_name=sweeps.STUDY_NAME, storage=sweeps.storage_url(out, None)).get_trials()
    assert [t.state for t in trials].count(optuna.trial.TrialState.COMPLETE) == 10
    # Queued seed by seed, so that a confirmation stopped partway compares every optimizer on the same seeds.
    queued = [sweeps.point_of(t) for t in trials if sweeps.folder_of(t) == sweeps.CONFIRM]
    assert [p["seed"] for p in queued] == [2, 2, 3, 3]
    assert {p["optimizer"] for p in queued[:2]} == {"sgd", "lamb16"}

    sections = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("### ")]
    assert sections[:2] == ["### At a glance", "### Confirmed on fresh seeds"]  # the answer first

    again = sweep(data_dir, out, *SEARCH, "--confirm-seeds", "2")  # resumed: nothing left to train
    assert again.exit_code == 0 and "epoch  1/1" not in again.output
    assert all(n == 1 for n in epochs_trained(out / "confirm").values())


def test_a_confirmation_seed_that_tuned_is_refused_before_anything_is_queued(data_dir, tmp_path):
    result = sweep(data_dir, tmp_path / "s", *SEARCH, "--seeds", "1,2", "--confirm-seeds", "2,3")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "reuses tuning seed 2" in result.output and "must not judge it" in result.output
    assert not (tmp_path / "s" / "sweep.db").exists()


def test_trials_and_a_grid_are_one_or_the_other(data_dir, tmp_path):
    result = sweep(data_dir, tmp_path / "s", *SEARCH, "--lrs", "0.01")
    assert result.exit_code == 1 and "drop --lrs" in result.output and len(result.output.splitlines()) == 1


def test_a_finished_sweep_extended_with_more_values_trains_only_the_new_points(data_dir, tmp_path):
    out = tmp_path / "grid"
    grid = ["--optimizers", "adamw", "--lrs", "0.001,0.003", "--batch-sizes", "64", "--seeds", "1", "--epochs", "1",
            "--val-size", str(VAL), "--workers", "1"]
    assert sweep(data_dir, out, *grid).exit_code == 0
    before = {p.name: (p / "metrics.jsonl").read_bytes() for p in (out / "runs").iterdir()}
    wider = list(grid)
    wider[wider.index("--lrs") + 1] = "0.0003,0.001,0.003"
    wider[wider.index("--seeds") + 1] = "1,2"
    result = sweep(data_dir, out, *wider)
    assert result.exit_code == 0, result.output
    assert "sweep extended: 4 new points queued, its earlier points kept" in result.output
    after = epochs_trained(out / "runs")
    assert len(after) == 6 and all(n == 1 for n in after.values())
    assert all((out / "runs" / name / "metrics.jsonl").read_bytes() == data for name, data in before.items())

    dropped = list(grid)  # lr 0.03 and seed 2 left out: refused, naming what it drops
    narrow = sweep(data_dir, out, *dropped)
    assert narrow.exit_code == 1 and "drops its lrs 0.0003" in narrow.output and "Traceback" not in narrow.output
    other = list(wider)
    other[other.index("--epochs") + 1] = "2"
    changed = sweep(data_dir, out, *other)
    assert changed.exit_code == 1 and "changes its epochs" in changed.output


def test_the_report_advises_the_command_that_extends_a_sweep_and_it_works(data_dir, tmp_path):
    """A choice at the grid's edge: the report names the lr to add, and the
    sweep run again with it added keeps every finished point."""
    out = tmp_path / "edge"
    grid = ["--optimizers", "adamw", "--lrs", "1e-5,3e-5", "--batch-sizes", "64", "--seeds", "1", "--epochs", "1",
            "--val-size", str(VAL), "--workers", "1"]
    assert sweep(data_dir, out, *grid).exit_code == 0
    report = (out / "results.md").read_text()
    assert "run the same sweep command with the lr added to --lrs" in report
    added = list(grid)
    added[added.index("--lrs") + 1] = "1e-5,3e-5,9e-5"
    result = sweep(data_dir, out, *added)
    assert result.exit_code == 0 and "1 new point queued" in result.output


def test_more_workers_than_cores_is_said(data_dir, tmp_path):
    cores = len(os.sched_getaffinity(0))
    lines = []
    assert sweeps.check_workers(cores + 1, echo=lines.append) == cores + 1
    assert f"--workers {cores + 1} on {cores} CPU core" in lines[0] and f"--workers {cores} finishes sooner" in lines[0]
    assert sweeps.check_workers(None, echo=lines.append) == cores and len(lines) == 1


def test_a_worker_whose_sweep_is_killed_stops_and_queues_its_point_again(data_dir, tmp_path):
    """kill -9 of the sweep's main process: its workers notice, stop after
    their batch (status interrupted, the point queued again), and exit."""
    out = tmp_path / "orphans"
    args = ["sweep", "--optimizers", "adamw", "--lrs", "0.001,0.01", "--batch-sizes", "8", "--seeds", "1",
            "--epochs", "200", "--val-size", str(VAL), "--workers", "2", "--data-dir", str(data_dir), "--no-download",
            "--out", str(out)]
    main = subprocess.Popen([sys.executable, str(Path(cli.__file__)), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("runs/*/checkpoint.pt"))) < 2:
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(main.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 2
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:  # whatever is left of it
        subprocess.run(["pkill", "-9", "-s", str(main.pid)], capture_output=True)
    statuses = {json.loads((p / "summary.json").read_text())["status"] for p in (out / "runs").iterdir()}
    assert statuses == {"interrupted"}
    study = optuna.load_study(study_name=sweeps.STUDY_NAME, storage=sweeps.storage_url(out, None))
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 2  # both queued again


@pytest.mark.parametrize("text,fragment", [
    ("0", None),
    ("3", None),
    ("x", "invalid --confirm-seeds 'x'"),
    ("5000", "invalid --confirm-seeds '5000'"),
    ("1,9", "reuses tuning seed 1"),
])
def test_confirmation_seeds_are_a_count_after_the_tuning_seeds_or_a_list_outside_them(text, fragment):
    from experiments.errors import UserError

    if fragment is None:
        assert sweeps.parse_confirm_seeds(text, (1, 2)) == tuple(range(3, 3 + int(text)))
    else:
        with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
            sweeps.parse_confirm_seeds(text, (1, 2))


def test_train_takes_a_searched_settings_betas_and_refuses_those_an_optimizer_lacks(data_dir, tmp_path):
    from experiments.config import RunConfig
    from experiments.loop import build_optimizer, make_model

    result = invoke("train", "--optimizer", "lamb16", "--beta1", "0.8", "--beta2", "0.99", "--epochs", "1",
                    "--data-dir", str(data_dir), "--no-download", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    (config,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/config.json")]
    assert (config["beta1"], config["beta2"]) == (0.8, 0.99)
    import torch

    optimizer = build_optimizer(RunConfig.from_dict(config), make_model(torch.device("cpu")))
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    sgd = build_optimizer(RunConfig(optimizer="sgd", beta1=0.5), make_model(torch.device("cpu")))
    assert sgd.param_groups[0]["momentum"] == 0.5
    refused = invoke("train", "--optimizer", "sgd", "--beta2", "0.9", "--data-dir", str(data_dir), "--no-download",
                     "--out", str(tmp_path / "runs"))
    assert refused.exit_code == 1 and "--beta2 applies to optimizers that have it, not sgd" in refused.output


def test_a_report_during_confirmation_names_every_planned_seed_and_how_many_runs_ended():
    def run(seed, status):
        return SimpleNamespace(config=dict(seed=seed), status=status)

    planned = [2, 3]
    line = tuning.confirmation_line([run(2, "completed"), run(3, "incomplete")], planned, choices=2)
    assert "seeds 2, 3," in line and "Under way: 1 of its 4 runs ended" in line
    done = tuning.confirmation_line([run(s, "completed") for s in planned for _ in range(2)], planned, choices=2)
    assert "seeds 2, 3," in done and "Under way" not in done
    assert "none yet" in tuning.confirmation_line([], [], choices=2)
    # The title counts the confirmation's runs while it is under way, not the seeds that some choices reached.
    tuned = [SimpleNamespace(config=dict(seed=1, epochs=10, val_size=100), status="completed")]
    partly = [run(2, "completed"), run(3, "completed"), run(2, "incomplete")]
    assert "confirmation under way (2 of 4 runs)" in tuning.title_of(tuned, partly, 8, planned, choices=2)
    every = [run(s, "completed") for s in planned for _ in range(2)]
    assert "confirmed on 2 more" in tuning.title_of(tuned, every, 8, planned, choices=2)

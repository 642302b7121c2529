"""Sweeps through Optuna on small synthetic MNIST files: every point once,
never again after it ended, resumed after a stop, split between workers; the
learning rate chosen by validation, never by the test set."""

import csv
import json
import math
import shutil
from pathlib import Path

import optuna
import pytest
import scipy.stats
import torch
from click.testing import CliRunner
from mnist_files import TRAIN_SIZE
from stops import StopAtCheck

import cli
from experiments import sweep as sweeps
from experiments import tuning, verdicts
from experiments.config import RunConfig
from experiments.data import hold_out, load_train_and_test
from experiments.errors import Interrupted
from experiments.runs import Run, load_runs, read_records

VAL = 100  # of the 300 synthetic training images
GRID = ["--optimizers", "adamw,lamb16", "--lrs", "0.005,0.02", "--batch-sizes", "64", "--seeds", "1", "--epochs", "1",
        "--val-size", str(VAL), "--workers", "1"]


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def sweep_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", *GRID, "--data-dir", str(data_dir), "--no-download", "--out", str(out), *extra]


def trained_epochs(out: Path) -> dict[str, int]:
    """Per run directory, how many epochs its log records (a run trained twice would show more)."""
    return {p.name: sum(r["kind"] == "test" for r in read_records(p / "metrics.jsonl")[0])
            for p in sorted((out / "runs").iterdir())}


def queued_trials(out: Path) -> list:
    study = optuna.load_study(study_name=sweeps.STUDY_NAME, storage=sweeps.storage_url(out, None))
    return [t for t in study.get_trials() if "run" in t.user_attrs]


def test_sweep_runs_each_point_once_writes_reports_and_a_rerun_trains_nothing(data_dir, tmp_path):
    out = tmp_path / "sweep"
    result = invoke(*sweep_args(data_dir, out))
    assert result.exit_code == 0, result.output
    assert trained_epochs(out) == {f"{o}_b64_lr{lr}_wd0.01_seed1": 1 for o in ("adamw", "lamb16")
                                   for lr in ("0.005", "0.02")}
    trials = queued_trials(out)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    assert all(0 <= float(r["final_val_accuracy"]) <= 1 for r in rows)
    assert (out / "lr.png").stat().st_size > 0 and (out / "batch.png").stat().st_size > 0
    markdown = (out / "results.md").read_text()
    assert "| AdamW | 64 |" in markdown and "| LAMB16 | 64 |" in markdown
    for path in (out / "runs").iterdir():  # each trained on the training images less the validation ones
        summary = json.loads((path / "summary.json").read_text())
        assert summary["samples"] == TRAIN_SIZE - VAL and summary["final_val_accuracy"] is not None

    again = invoke(*sweep_args(data_dir, out))
    assert again.exit_code == 0, again.output
    assert "epoch  1/1" not in again.output  # nothing trained
    assert trained_epochs(out) == {name: 1 for name in trained_epochs(out)}
    assert len(queued_trials(out)) == 4


def test_a_sweep_stopped_halfway_finishes_only_the_rest(data_dir, tmp_path, capfd):
    """Stopped inside its third point, the sweep queues that point again; run
    again, it trains the two it had not finished (the stopped one resumed from
    its run directory) and not the two it had."""
    out = tmp_path / "sweep"
    sweep = sweeps.Sweep(optimizers=("adamw", "lamb16"), lrs=(0.005, 0.02), batch_sizes=(64,), epochs=2,
                         val_size=VAL)
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    sweeps.open_study(sweep, out, None, echo=lambda line: None)
    batches = -(-(TRAIN_SIZE - VAL) // 64) * 2  # per point
    with pytest.raises(Interrupted):
        sweeps.work(sweep, out, None, data_dir, train, test, echo=lambda line: None,
                    stop=StopAtCheck(2 * batches + batches // 2 + 1))
    assert "Traceback" not in capfd.readouterr().err  # a stop is a status, not a crash
    statuses = {p.name: json.loads((p / "summary.json").read_text())["status"] for p in (out / "runs").iterdir()}
    assert sorted(statuses.values()) == ["completed", "completed", "interrupted"]
    stopped = next(name for name, status in statuses.items() if status == "interrupted")

    # As `sweep` run again does: the part-trained point first, then the one not begun.
    sweeps.stopped_points_first(sweeps.open_study(sweep, out, None, echo=lambda line: None), out)
    taken = sweeps.work(sweep, out, None, data_dir, train, test, echo=lambda line: None)
    assert len(taken) == 2 and taken[0] == stopped
    completed = [t.user_attrs["run"] for t in queued_trials(out) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(completed) == sorted(trained_epochs(out))  # each of the 4 points completed once
    assert all(s == 2 for s in trained_epochs(out).values())
    kinds = [r["kind"] for r in read_records(out / "runs" / stopped / "metrics.jsonl")[0]]
    assert kinds.count("resumed") == 1
    assert sweeps.work(sweep, out, None, data_dir, train, test, echo=lambda line: None) == []


def test_a_point_whose_worker_was_killed_goes_first_when_the_sweep_is_run_again(tmp_path):
    """A worker killed inside a point (kill -9, the machine stopped) leaves its
    trial running, its lock let go and its run directory part-trained: run
    again, the sweep queues that point ahead of the ones not begun."""
    out = tmp_path / "sweep"
    sweep = sweeps.Sweep(optimizers=("adamw", "lamb16"), lrs=(0.005, 0.02), batch_sizes=(64,), epochs=2,
                         val_size=VAL)
    study = sweeps.open_study(sweep, out, None, echo=lambda line: None)
    queued = [t.user_attrs["run"] for t in queued_trials(out)]
    with pytest.warns(UserWarning, match="Heartbeat"):
        killed = study.ask()  # as the worker took it
    name = killed.user_attrs["run"]
    assert name == queued[0]
    sweeps.lock_path(out, name, killed.number).parent.mkdir(parents=True, exist_ok=True)
    sweeps.lock_path(out, name, killed.number).touch()  # its worker gone: nobody holds the lock
    (out / "runs" / name).mkdir(parents=True)

    sweeps.stopped_points_first(sweeps.open_study(sweep, out, None, echo=lambda line: None), out)
    trials = queued_trials(out)
    waiting = [t.user_attrs["run"] for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert waiting == [name] + queued[1:]  # the killed point first, the rest in their order
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_two_workers_split_the_grid_and_never_run_a_point_twice(data_dir, tmp_path, capfd):
    out = tmp_path / "sweep"
    args = sweep_args(data_dir, out, "--workers", "2")
    args[args.index("--lrs") + 1] = "0.001,0.003,0.01"  # 6 points
    result = invoke(*args)
    printed = capfd.readouterr().out  # the worker processes print to the terminal
    assert result.exit_code == 0, result.output
    assert "[worker 1]" in printed and "[worker 2]" in printed  # both took points
    assert trained_epochs(out) == {name: 1 for name in trained_epochs(out)} and len(trained_epochs(out)) == 6
    trials = queued_trials(out)
    assert len(trials) == 6 and len({t.user_attrs["run"] for t in trials}) == 6
    runs_by_worker = [line for line in printed.splitlines() if line.startswith("[worker")]
    assert len(runs_by_worker) == 6  # each point announced once, by the worker that ran it
    # One thread a point, however many workers: the same grid on one gives every point the same results.
    args[-1] = "1"  # --workers 2, given last
    args[args.index("--out") + 1] = str(tmp_path / "one")
    assert invoke(*args).exit_code == 0
    for path in (out / "runs").iterdir():
        two, one = (json.loads((folder / "runs" / path.name / "summary.json").read_text())
                    for folder in (out, tmp_path / "one"))
        assert two["val_accuracy_by_epoch"] == one["val_accuracy_by_epoch"]
        assert two["final_test_accuracy"] == one["final_test_accuracy"]
        assert json.loads((path / "config.json").read_text())["threads"] == 1


def test_a_second_sweep_with_another_grid_on_the_same_folder_is_refused(data_dir, tmp_path):
    out = tmp_path / "sweep"
    assert invoke(*sweep_args(data_dir, out)).exit_code == 0
    args = sweep_args(data_dir, out)
    args[args.index("--lrs") + 1] = "0.1"
    result = invoke(*args)
    assert result.exit_code == 1 and "holds another sweep" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option,value,fragment", [
    ("--lrs", "fast", "invalid --lrs 'fast'"),
    ("--batch-sizes", "0", "invalid --batch-sizes '0'"),
    ("--val-size", "300", "--val-size 300 must leave training images"),
    ("--optimizers", "adam,nope", "unknown nope"),
])
def test_bad_sweep_options_are_one_line_errors(data_dir, tmp_path, option, value, fragment):
    args = sweep_args(data_dir, tmp_path / "sweep")
    args[args.index(option) + 1] = value
    result = invoke(*args)
    assert result.exit_code != 0 and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "sweep" / "sweep.db").exists()  # nothing queued


def test_report_of_several_sweeps_compares_their_batch_sizes_in_one_report(data_dir, tmp_path):
    small, large = tmp_path / "b32", tmp_path / "b64"
    for out, batch in ((small, "32"), (large, "64")):
        args = sweep_args(data_dir, out)
        args[args.index("--batch-sizes") + 1] = batch
        assert invoke(*args).exit_code == 0
    before = (small / "results.md").read_text()
    result = invoke("report", str(small), str(large), "--out", str(tmp_path / "both"))
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "both" / "results.md").read_text()
    assert "| LAMB16 | 32 |" in markdown and "| LAMB16 | 64 |" in markdown
    assert "### Batch 64 against batch 32" in markdown
    assert len(list(csv.DictReader((tmp_path / "both" / "results.csv").open()))) == 8
    assert (small / "results.md").read_text() == before  # each sweep's own report left as it was

    no_out = invoke("report", str(small), str(large))
    assert no_out.exit_code == 1 and "give --out" in no_out.output and len(no_out.output.splitlines()) == 1
    shutil.copytree(small, tmp_path / "copy")  # the same points in two sweeps
    twice = invoke("report", str(small), str(tmp_path / "copy"), "--out", str(tmp_path / "twice"))
    assert twice.exit_code == 1 and "report sweeps whose points differ" in twice.output


def test_report_of_a_folder_without_a_sweep_is_a_one_line_error(tmp_path):
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 1 and "holds no sweep runs" in result.output


def test_validation_split_is_the_last_images_the_same_for_every_run(data_dir):
    train, _ = load_train_and_test(data_dir, torch.device("cpu"))
    kept, val = hold_out(train, VAL)
    assert len(kept) == TRAIN_SIZE - VAL and len(val) == VAL
    assert torch.equal(val.images, train.images[-VAL:]) and torch.equal(kept.labels, train.labels[:-VAL])


def fake_run(optimizer: str, lr: float, seed: int, val: float | None, test: float, status: str = "completed") -> Run:
    config = RunConfig(optimizer=optimizer, lr=lr, seed=seed, batch_size=128, val_size=VAL).to_dict()
    summary = dict(status=status, final_val_accuracy=val, final_test_accuracy=test)
    return Run(path=Path(f"{optimizer}_{lr}_{seed}"), config=config, summary=summary,
               test=[dict(epoch=1, samples=1000, val_accuracy=val or 0.0, test_accuracy=test, wall_time=2.0)])


def test_the_learning_rate_is_chosen_by_validation_never_by_test():
    """lr 0.01 validates better, lr 0.02 tests better: 0.01 is chosen and its
    test accuracy reported; a diverged seed counts 0 for its setting."""
    runs = [fake_run("lamb16", 0.01, s, 0.95, 0.90) for s in (1, 2)]
    runs += [fake_run("lamb16", 0.02, s, 0.90, 0.99) for s in (1, 2)]
    runs += [fake_run("lamb16", 0.05, 1, 0.99, 0.99), fake_run("lamb16", 0.05, 2, None, 0.1, "diverged")]
    (choice,) = tuning.choose(runs).values()
    assert choice.lr == 0.01 and choice.test.mean == pytest.approx(0.90) and choice.test.n == 2
    assert choice.val.mean == pytest.approx(0.95)
    assert verdicts.reach(choice.runs, 0.94) == "1k samples, 2 s (2/2)"
    assert verdicts.reach(choice.runs, 0.99).startswith("not reached (0/2)")


def test_retrain_trains_each_chosen_setting_on_all_training_images(data_dir, tmp_path):
    out = tmp_path / "sweep"
    result = invoke(*sweep_args(data_dir, out, "--retrain"))
    assert result.exit_code == 0, result.output
    retrained = sorted((out / "retrained").iterdir())
    assert len(retrained) == 2  # one chosen setting per optimizer (one batch size, one seed)
    choices = tuning.choose(load_runs([out / "runs"]))
    for path in retrained:
        config = json.loads((path / "config.json").read_text())
        choice = choices[(config["optimizer"], 64)]
        assert config["val_size"] == 0 and config["lr"] == choice.lr
        assert json.loads((path / "summary.json").read_text())["samples"] == TRAIN_SIZE
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| LAMB16 | 64 |")]
    assert len(rows) == 1 and rows[0].split("|")[7].strip() != "-"  # the retrained test accuracy


def test_retrain_waits_for_points_still_queued(data_dir, tmp_path):
    out = tmp_path / "sweep"
    sweep = sweeps.Sweep(optimizers=("lamb16",), lrs=(0.01,), batch_sizes=(64,), epochs=1, val_size=VAL)
    sweeps.open_study(sweep, out, None, echo=lambda line: None)
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    lines = []
    sweeps.retrain(sweep, out, None, data_dir, train, test, echo=lines.append)
    assert "retrain waits until every point has ended (1 queued" in lines[0] and not (out / "retrained").exists()


def test_a_sweep_killed_halfway_finishes_the_rest_when_started_again(data_dir, tmp_path):
    """SIGKILL (no chance to clean up) in the middle of a point: started again,
    the sweep takes that point up at once (its worker's lock is gone), resumes
    it from its run directory, and trains no point that had ended."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    args = sweep_args(data_dir, out, "--workers", "1")
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--batch-sizes") + 1] = "16"  # slow enough to be caught in the middle
    command = [sys.executable, str(Path(cli.__file__)), *args]
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the second point has a finished epoch
        done = [p for p in (out / "runs").glob("*/checkpoint.pt")] if (out / "runs").is_dir() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    ended = {p.parent.name for p in (out / "runs").glob("*/summary.json")}
    assert len(ended) < 4  # it was killed with work left

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    epochs = trained_epochs(out)
    assert len(epochs) == 4 and all(n == 3 for n in epochs.values())  # no point trained past its epochs
    resumed = {name: [r["kind"] for r in read_records(out / "runs" / name / "metrics.jsonl")[0]].count("resumed")
               for name in epochs}
    assert all(resumed[name] == 0 for name in ended)  # the points that had ended were not touched again
    assert sorted(resumed.values())[-1] == 1  # the killed point resumed from its checkpoint
    trials = queued_trials(out)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4


def test_a_sigint_to_the_sweep_alone_stops_its_workers_and_queues_their_points_again(data_dir, tmp_path):
    """Ctrl-C in a terminal reaches every process of the sweep; a SIGINT sent
    to its main process alone (a job scheduler, kill -INT) must stop the
    workers as well, not leave it waiting on them."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    args = sweep_args(data_dir, out, "--workers", "2")
    args[args.index("--epochs") + 1] = "200"  # far longer than the test waits
    command = [sys.executable, str(Path(cli.__file__)), *args]
    # Not this test's process group, so only its pid gets the signal; SIGINT ignored from the start, as a
    # script's background job (`cli.py sweep ... &`) inherits it.
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("runs/*/checkpoint.pt"))) < 2:
        time.sleep(0.05)
    os.kill(sweep.pid, signal.SIGINT)
    try:
        output, _ = sweep.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of it, workers included
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130, output
    assert output.count("stopped; its point is queued again") == 2 and "Traceback" not in output
    statuses = {json.loads((p / "summary.json").read_text())["status"] for p in (out / "runs").iterdir()}
    assert statuses == {"interrupted"}


def test_verdicts_come_from_the_confirmation_seeds_alone_paired_and_corrected_for_the_family():
    """Tuning seed 1 makes AdamW look far better; the confirmation seeds 2-4
    (paired by seed) say LAMB16 is higher: the verdict follows them, its p
    corrected by Holm for the two peers, with the smallest detectable difference."""
    def runs_of(optimizer, batch_size, tests, first_seed=1):
        return [replace_batch(fake_run(optimizer, 0.01, seed, 0.9, test), batch_size)
                for seed, test in enumerate(tests, start=first_seed)]

    tuning_runs = (runs_of("lamb16", 128, [0.90]) + runs_of("adamw", 128, [0.99]) + runs_of("sgd", 128, [0.90]))
    lamb16, adamw = [0.990, 0.991, 0.989], [0.980, 0.982, 0.979]
    confirmations = (runs_of("lamb16", 128, lamb16, 2) + runs_of("adamw", 128, adamw, 2)
                     + runs_of("sgd", 128, [0.989, 0.992, 0.988], 2))
    judged = verdicts.judge(tuning.choose(tuning_runs), confirmations)
    assert all(j.confirmed and len(j.runs) == 3 for j in judged.values())
    text = verdicts.comparisons_markdown(judged)
    # Differences +1.0, +0.9, +1.0 points; the smaller of the two peers' p-values doubled by Holm.
    p = scipy.stats.ttest_rel(lamb16, adamw).pvalue
    row = next(line for line in text.splitlines() if line.startswith("| 128 | AdamW |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["+0.97 (n=3)", "+0.82 to +1.11"]
    assert float(cells[4]) == pytest.approx(p, rel=5e-3) and float(cells[5]) == pytest.approx(2 * p, rel=5e-3)
    assert cells[7] == "**higher**" and float(cells[6]) > 0.2  # 3 seeds detect no difference under 0.2 points
    assert "| 128 | SGD (momentum 0.9) |" in text and "**no difference detected**" in text
    # With 8 seeds planned, 3 ended: the same test, a verdict only so far.
    interim = verdicts.comparisons_markdown(judged, planned=8)
    row = next(line for line in interim.splitlines() if line.startswith("| 128 | AdamW |"))
    assert row.rstrip(" |").endswith("| higher, so far (3 of 8 seeds)") and "**" not in row
    assert "fewer seeds than the 8 planned is only so far" in interim
    assert "**higher**" in verdicts.comparisons_markdown(judged, planned=3)
    # The tuning seed takes no part: a confirmation run of seed 1 would not be counted.
    again = verdicts.judge(tuning.choose(tuning_runs), confirmations + runs_of("adamw", 128, [0.5]))
    assert [r.config["seed"] for r in again[("adamw", 128)].runs] == [2, 3, 4]


def test_the_report_answers_first_which_optimizer_is_better_at_which_batch_and_how_sure():
    """At a glance: per batch size each optimizer's confirmed accuracy and its
    time to the target, LAMB16 minus each peer with Holm's verdict, and a
    sentence of where it wins, ties and loses; interim while seeds are missing;
    nothing from tuning seeds alone."""
    def runs_of(optimizer, batch_size, tests, first_seed=2):
        return [replace_batch(fake_run(optimizer, 0.01, seed, test, test), batch_size)
                for seed, test in enumerate(tests, start=first_seed)]

    tuning_runs = [r for o in ("lamb16", "adamw", "sgd") for b in (128, 4096) for r in runs_of(o, b, [0.9], 1)]
    confirmations = (runs_of("lamb16", 128, [0.990, 0.991, 0.989]) + runs_of("adamw", 128, [0.991, 0.989, 0.990])
                     + runs_of("sgd", 128, [0.990, 0.990, 0.991]) + runs_of("lamb16", 4096, [0.985, 0.986, 0.984])
                     + runs_of("adamw", 4096, [0.960, 0.962, 0.959]) + runs_of("sgd", 4096, [0.990, 0.992, 0.991]))
    judged = verdicts.judge(tuning.choose(tuning_runs), confirmations)
    text = verdicts.glance_markdown(judged, 0.98, planned=3)
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["LAMB16"].startswith("| **LAMB16** | 99.00% (98.75-99.25), 1k, 2 s | 98.50% (98.25-98.75), 1k, 2 s |")
    low, high = scipy.stats.t.interval(0.95, 2, loc=0.9603333, scale=scipy.stats.sem([0.960, 0.962, 0.959]))
    assert f"96.03% ({100 * low:.2f}-{100 * high:.2f}), not reached |" in rows["AdamW"]  # validation below 98%
    lamb16 = [0.985, 0.986, 0.984]
    p_adamw = scipy.stats.ttest_rel(lamb16, [0.960, 0.962, 0.959]).pvalue
    p_sgd = scipy.stats.ttest_rel(lamb16, [0.990, 0.992, 0.991]).pvalue
    assert p_adamw < p_sgd < 0.025  # Holm over the 2 peers: the smaller p doubled, the larger kept
    assert rows["4096"] == f"| 4096 | +2.47, higher (p {2 * p_adamw:.2g}) | -0.60, lower (p {p_sgd:.2g}) |"
    assert rows["128"].startswith("| 128 | +0.00, none (p 1) | -0.03, none (p ")
    assert ("LAMB16 is higher than AdamW at batch 4096, and lower than SGD (momentum 0.9) at batch 4096; no "
            "difference is detected in the other 2 of 4 comparisons") in text
    detectable = sorted(t.detectable for t in verdicts.against_peers(judged)[128].values())
    assert f"(where these seeds could detect {100 * detectable[0]:.2f}-{100 * detectable[1]:.2f} points)" in text
    assert "Interim" not in text and "So far" not in text
    interim = verdicts.glance_markdown(judged, 0.98, planned=8)
    assert "under way (3 of each choice's 8 seeds ended)" in interim and "So far: LAMB16 is higher" in interim
    assert verdicts.glance_markdown(verdicts.judge(tuning.choose(tuning_runs), []), 0.98, planned=8) == ""


@pytest.mark.parametrize("seeds", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("level", [0.05, 0.0125, 0.01])
def test_the_smallest_detectable_difference_is_found_with_the_power_it_claims(seeds, level):
    """Paired t-tests of `seeds` at `level`, on simulated differences whose
    true mean is the detectable difference, reject 80% of the time."""
    import numpy as np

    from experiments.stats import smallest_detectable

    std = 0.002
    detectable = smallest_detectable(std, seeds, level)
    assert detectable is not None
    diffs = np.random.default_rng(seeds).normal(detectable, std, size=(20_000, seeds))
    rejected = scipy.stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < level
    assert rejected.mean() == pytest.approx(0.8, abs=0.012)  # 4 standard errors of 20,000 draws


def test_confirmation_runs_still_training_judge_nothing_until_they_end():
    tuning_runs = [fake_run("lamb16", 0.01, 1, 0.9, 0.99), fake_run("adamw", 0.01, 1, 0.9, 0.95)]
    training = [fake_run(o, 0.01, 2, 0.9, 0.5, "interrupted") for o in ("lamb16", "adamw")]
    judged = verdicts.judge(tuning.choose(tuning_runs), training)
    assert not any(j.confirmed for j in judged.values())  # the tuning seed, without a verdict, as before any started
    assert judged[("lamb16", 128)].test.mean == pytest.approx(0.99)
    ended = [fake_run("lamb16", 0.01, 3, 0.9, 0.98), fake_run("adamw", 0.01, 3, 0.9, 0.97)]
    judged = verdicts.judge(tuning.choose(tuning_runs), training + ended)
    assert all(j.confirmed and [r.config["seed"] for r in j.runs] == [3] for j in judged.values())


def test_a_difference_of_one_seed_has_no_spread_and_no_verdict():
    one = verdicts.judge(tuning.choose([fake_run("lamb16", 0.01, 1, 0.9, 0.99), fake_run("adamw", 0.01, 1, 0.9, 0.95)]),
                         [fake_run("lamb16", 0.01, 2, 0.9, 0.9865), fake_run("adamw", 0.01, 2, 0.9, 0.94)])
    row = next(line for line in verdicts.comparisons_markdown(one).splitlines() if "| AdamW |" in line)
    assert "+4.65 (n=1)" in row and "±" not in row and "one seed: no verdict" in row
    assert "higher" not in row and "lower" not in row


def test_without_confirmation_the_tuning_seeds_give_differences_but_no_verdicts():
    runs = [fake_run(o, 0.01, s, 0.9, t) for o, tests in (("lamb16", (0.99, 0.991, 0.992)), ("adamw", (0.9, 0.91, 0.92)))
            for s, t in zip((1, 2, 3), tests)]
    judged = verdicts.judge(tuning.choose(runs), [])
    assert not any(j.confirmed for j in judged.values())
    text = verdicts.comparisons_markdown(judged)
    assert "+8.10 (n=3)" in text and "winner's curse" in text and "--confirm-seeds 8" in text
    assert "higher" not in text and "| verdict |" not in text and "**" not in text


def replace_batch(run: Run, batch_size: int) -> Run:
    run.config["batch_size"] = batch_size
    return run


def test_a_chosen_lr_at_the_edge_of_its_grid_is_flagged_with_the_point_to_add():
    """LAMB16 peaks inside its grid; AdamW at its lowest lr (the best may lie
    below) and SGD at its highest: each flagged with one more grid step out."""
    accuracy = {"lamb16": (0.90, 0.95, 0.92), "adamw": (0.95, 0.93, 0.90), "sgd": (0.80, 0.85, 0.90)}
    runs = [fake_run(optimizer, lr, seed, val, val)
            for optimizer, vals in accuracy.items() for lr, val in zip((0.001, 0.003, 0.009), vals)
            for seed in (1, 2)]
    for run in runs:
        run.config["train_size"] = 60_000
    choices = tuning.choose(runs)
    assert tuning.edge_point(choices[("lamb16", 128)], runs) is None
    assert tuning.edge_point(choices[("adamw", 128)], runs) == pytest.approx(0.001 / 3)
    assert tuning.edge_point(choices[("sgd", 128)], runs) == pytest.approx(0.027)
    text = tuning.tuning_markdown(choices, runs) + tuning.edges_markdown(choices, runs) + tuning.protocol_markdown(
        runs, [], None)
    assert "| AdamW | 128 | lr 0.001, wd 0.01, warmup 0 (edge) |" in text and "| LAMB16 | 128 | lr 0.003, wd 0.01, warmup 0 |" in text
    assert "AdamW, batch 128: lr 0.001 is the lowest lr; add lr 0.000333." in text
    assert "SGD (momentum 0.9), batch 128: lr 0.009 is the highest lr; add lr 0.027." in text
    # The protocol: the search space, the budget in epochs and steps, the seeds, the rule.
    assert "lr 0.001, 0.003, 0.009; batch sizes 128" in text
    assert f"10 epochs a point, that is {10 * math.ceil((60_000 - VAL) / 128)} steps at batch 128" in text
    assert "Tuning seeds: 1, 2 (2 per setting)" in text and "validation accuracy" in text


def test_warmups_are_swept_under_a_shared_schedule_and_the_choice_names_its_warmup(data_dir, tmp_path):
    out = tmp_path / "sweep"
    args = sweep_args(data_dir, out, "--schedule", "cosine", "--warmups", "0,0.5")
    args[args.index("--optimizers") + 1] = "lamb16"
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(trained_epochs(out)) == sorted(f"lamb16_b64_lr{lr}_wd0.01_cosine{w}_seed1" for lr in ("0.005", "0.02")
                                                 for w in ("", "_warmup0.5"))
    trials = queued_trials(out)
    assert len(trials) == 4 and {t.user_attrs["point"]["warmup"] for t in trials} == {0.0, 0.5}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["schedule"], r["warmup"]) for r in rows} == {("cosine", "0.0"), ("cosine", "0.5")}
    (choice,) = tuning.choose(load_runs([out / "runs"])).values()
    best = max(rows, key=lambda r: float(r["final_val_accuracy"]))
    assert (choice.lr, choice.warmup) == (float(best["lr"]), float(best["warmup"]))
    assert "schedule cosine, warmup 0, 0.5" in (out / "results.md").read_text()


PRUNING_GRID = ["--optimizers", "adamw", "--lrs", "1e-5,0.003,0.01", "--batch-sizes", "16", "--seeds", "1",
                "--epochs", "3", "--val-size", str(VAL), "--workers", "1"]


def pruning_sweep(data_dir: Path, out: Path, *extra: str):
    return invoke("sweep", *PRUNING_GRID, "--data-dir", str(data_dir), "--no-download", "--out", str(out), *extra)


def summaries(out: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "summary.json").read_text()) for p in sorted((out / "runs").iterdir())}


def test_a_pruned_point_is_recorded_and_resumes_bit_for_bit_in_a_sweep_without_pruning(data_dir, tmp_path):
    """lr 0.003 runs first (the grid's middle); lr 1e-5 barely learns and is
    stopped after epoch 2, where its validation error is over twice 0.003's."""
    result = pruning_sweep(data_dir, tmp_path / "pruned", "--prune")
    assert result.exit_code == 0, result.output
    pruned = summaries(tmp_path / "pruned")
    slow = "adamw_b16_lr1e-05_wd0.01_seed1"
    assert pruned[slow]["status"] == "pruned" and pruned[slow]["epochs_completed"] < 3
    assert pruned["adamw_b16_lr0.003_wd0.01_seed1"]["status"] == "completed"
    kinds = [r["kind"] for r in read_records(tmp_path / "pruned" / "runs" / slow / "metrics.jsonl")[0]]
    assert kinds[-1] == "pruned" and "pruned after epoch" in result.output
    states = {t.user_attrs["run"]: t.state for t in queued_trials(tmp_path / "pruned")}
    assert states[slow] == optuna.trial.TrialState.PRUNED
    assert states["adamw_b16_lr0.003_wd0.01_seed1"] == optuna.trial.TrialState.COMPLETE
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "pruned" / "results.csv").open())}
    assert rows[slow]["status"] == "pruned"
    markdown = (tmp_path / "pruned" / "results.md").read_text()
    assert "- Pruning: " in markdown and "| AdamW | 16 | lr 0.003, wd 0.01, warmup 0 |" in markdown
    pruned_count = sum(s["status"] == "pruned" for s in pruned.values())
    assert f"3 tuning runs, {pruned_count} pruned, 0 not ended." in markdown
    rerun = pruning_sweep(data_dir, tmp_path / "pruned", "--prune")  # pruning again: nothing trains
    assert rerun.exit_code == 0 and "epoch " not in rerun.output.replace("after epoch", "")
    assert summaries(tmp_path / "pruned")[slow]["status"] == "pruned"

    again = pruning_sweep(data_dir, tmp_path / "pruned")  # without --prune: every pruned point finishes
    assert again.exit_code == 0, again.output
    assert "queued again, to resume without pruning" in again.output
    finished = summaries(tmp_path / "pruned")
    assert {s["status"] for s in finished.values()} == {"completed"}
    kinds = [r["kind"] for r in read_records(tmp_path / "pruned" / "runs" / slow / "metrics.jsonl")[0]]
    assert kinds.count("resumed") == 1 and kinds.count("test") == 3

    assert pruning_sweep(data_dir, tmp_path / "whole").exit_code == 0  # never pruned
    whole = summaries(tmp_path / "whole")
    for name, summary in whole.items():
        assert finished[name]["val_accuracy_by_epoch"] == summary["val_accuracy_by_epoch"]
        ours = torch.load(tmp_path / "pruned" / "runs" / name / "checkpoint.pt", weights_only=True)["model"]
        theirs = torch.load(tmp_path / "whole" / "runs" / name / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_setting_pruned_on_the_first_seed_is_not_trained_on_the_others(data_dir, tmp_path):
    """Seed 1 prunes lr 1e-5 after an epoch or two; that setting is then out of
    the choice, so seed 2 records it pruned without training it, trains the
    others in full, and finishes it from scratch in a sweep without --prune."""
    out = tmp_path / "seeds"
    result = pruning_sweep(data_dir, out, "--prune", "--seeds", "1,2")
    assert result.exit_code == 0, result.output
    pruned = summaries(out)
    first, second = "adamw_b16_lr1e-05_wd0.01_seed1", "adamw_b16_lr1e-05_wd0.01_seed2"
    assert pruned[first]["status"] == "pruned" and 1 <= pruned[first]["epochs_completed"] < 3
    assert pruned[second]["status"] == "pruned" and pruned[second]["epochs_completed"] == 0
    assert trained_epochs(out)[second] == 0 and "pruned before its first epoch" in result.output
    for lr in ("1e-05", "0.003", "0.01"):  # seed 2: in full where seed 1 kept the setting, else not at all
        kept = pruned[f"adamw_b16_lr{lr}_wd0.01_seed1"]["status"] == "completed"
        assert trained_epochs(out)[f"adamw_b16_lr{lr}_wd0.01_seed2"] == (3 if kept else 0)
    assert pruned["adamw_b16_lr0.003_wd0.01_seed1"]["status"] == "completed"
    states = {t.user_attrs["run"]: t.state for t in queued_trials(out)}
    assert states[second] == optuna.trial.TrialState.PRUNED
    assert "never trained: their setting was pruned on the first seed" in (out / "results.md").read_text()
    chosen = tuning.choose(load_runs([out / "runs"]))[("adamw", 16)].lr
    assert chosen != 1e-5

    again = pruning_sweep(data_dir, out, "--seeds", "1,2")  # without --prune: both seeds of it finish
    assert again.exit_code == 0, again.output
    assert {s["status"] for s in summaries(out).values()} == {"completed"}
    assert trained_epochs(out)[second] == 3
    kinds = [r["kind"] for r in read_records(out / "runs" / second / "metrics.jsonl")[0]]
    assert "resumed" not in kinds  # nothing to resume from: trained from its first batch


def test_a_finalist_pruned_on_a_later_seed_trains_in_full_when_the_sweep_runs_again(data_dir, tmp_path):
    """A later seed's point pruned though the first seed kept its setting (here:
    the first seed's point finished since, as a sweep without --prune does) is
    queued again by the next --prune sweep, and trains, not read back as pruned."""
    out = tmp_path / "seeds"
    assert pruning_sweep(data_dir, out, "--prune", "--seeds", "1,2").exit_code == 0
    second = "adamw_b16_lr1e-05_wd0.01_seed2"
    assert trained_epochs(out)[second] == 0
    study = optuna.load_study(study_name=sweeps.STUDY_NAME, storage=sweeps.storage_url(out, None))
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=dict(
        run="adamw_b16_lr1e-05_wd0.01_seed1", point=dict(optimizer="adamw", batch_size=16, lr=1e-5, wd=0.01,
                                                          warmup=0.0, seed=1))))  # the first seed's point, now kept
    again = pruning_sweep(data_dir, out, "--prune", "--seeds", "1,2")
    assert again.exit_code == 0, again.output
    assert "1 pruned point of later seeds queued again" in again.output
    assert summaries(out)[second]["status"] == "completed" and trained_epochs(out)[second] == 3


def grid_study():
    study = optuna.create_study(direction="maximize")

    def add(lr: float, seed: int, state=optuna.trial.TrialState.COMPLETE, accuracies=()) -> str:
        name = f"adamw_b64_lr{lr:g}_wd0.01_seed{seed}"
        study.add_trial(optuna.trial.create_trial(
            state=state, value=0.9 if state == optuna.trial.TrialState.COMPLETE else None,
            user_attrs=dict(run=name, point=dict(optimizer="adamw", batch_size=64, lr=lr, wd=0.01, seed=seed)),
            intermediate_values=dict(enumerate(accuracies, 1))))
        return name
    return study, add


def test_later_seeds_train_the_first_seeds_finalists_in_full_and_skip_the_rest():
    study, add = grid_study()
    add(0.01, 1, accuracies=[0.99])
    best_2 = add(0.01, 2, accuracies=[0.99])
    slow = dict(optimizer="adamw", batch_size=64, lr=0.001)
    slow_1, slow_2 = "adamw_b64_lr0.001_wd0.01_seed1", "adamw_b64_lr0.001_wd0.01_seed2"
    # Far behind at epoch 1: pruned on the first seed, judged by the first seed on the second.
    assert sweeps.should_prune(study, dict(slow, seed=1), slow_1, 1, 0.5, first_seed=1)
    assert not sweeps.should_prune(study, dict(slow, seed=2), slow_2, 1, 0.5, first_seed=1)
    add(0.001, 1, optuna.trial.TrialState.PRUNED, accuracies=[0.5])
    assert sweeps.should_prune(study, dict(slow, seed=2), slow_2, 0, None, first_seed=1)
    assert not sweeps.should_prune(study, dict(slow, lr=0.01, seed=2), best_2, 0, None, first_seed=1)


def test_a_later_seeds_point_pruned_though_the_first_seed_kept_its_setting_is_queued_again():
    study, add = grid_study()
    add(0.01, 1)
    kept_2 = add(0.01, 2, optuna.trial.TrialState.PRUNED)  # by an earlier rule
    add(0.001, 1, optuna.trial.TrialState.PRUNED)
    out_2 = add(0.001, 2, optuna.trial.TrialState.PRUNED)
    assert sweeps.requeue_finalists(study, first_seed=1) == 1
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["run"] for t in waiting] == [kept_2]
    assert waiting[0].user_attrs["point"]["lr"] == 0.01  # queued with its point
    assert sweeps.requeue_finalists(study, first_seed=1) == 0  # queued already: its latest trial waits
    add(0.001, 1)  # finished by a sweep without --prune: no longer out
    assert not sweeps.first_seed_pruned(study, out_2, first_seed=1)


def test_pruning_compares_a_point_only_with_its_own_optimizer_batch_size_and_seed():
    study = optuna.create_study(direction="maximize")
    def add(run: str, accuracy: float, **params) -> None:
        params = dict(dict(optimizer="adamw", batch_size=64, lr=0.01, seed=1), **params)
        study.add_trial(optuna.trial.create_trial(value=accuracy, intermediate_values={1: accuracy},
                                                  user_attrs={"run": run, "point": params}))

    add("peer", 0.96)
    add("other optimizer", 0.99, optimizer="lamb16")
    add("other batch", 0.99, batch_size=512)
    add("other seed", 0.99, seed=2)
    add("me, an earlier try", 0.99, lr=0.001)
    me = dict(optimizer="adamw", batch_size=64, lr=0.001, seed=1)
    assert sweeps.best_peer(study, me, "me, an earlier try", 1) == 0.96
    assert sweeps.best_peer(study, me, "me, an earlier try", 2) is None  # nobody reported epoch 2
    assert sweeps.clearly_below(0.91, 0.96) and not sweeps.clearly_below(0.93, 0.96)  # errors 9% and 7% against 4%
    assert not sweeps.clearly_below(0.995, 0.999)  # within half a point
    assert sweeps.middle_out((1, 2, 3, 4, 5, 6)) == [3, 4, 2, 5, 1, 6]

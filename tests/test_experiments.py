"""The experiment package's functions: seeds, statistics and verdicts, the
registry, interrupt and resume (bit for bit), the scaling study."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mnist_files import write_synthetic_mnist
from stops import StopAtCheck

import cli
from experiments import aggregate, quantization, registry
from experiments.config import RunConfig, parse_seeds
from experiments.data import load_mnist, load_train_and_test
from experiments.errors import Interrupted, UserError
from experiments.loop import train_run
from experiments.runs import Run, RunDir, read_records, run_metadata
from lamb16 import state_nbytes

ROOT = Path(__file__).resolve().parent.parent
TIME_FIELDS = ("epoch_time", "wall_time", "time")


@pytest.mark.parametrize("text, seeds", [("3", [1, 2, 3]), ("1,2,3", [1, 2, 3]), ("7,", [7]), ("5, 9", [5, 9])])
def test_seeds_are_a_count_or_a_list(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0", "x", "", "1,1", "1,a"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(UserError, match="--seeds"):
        parse_seeds(text)


def test_stat_is_mean_sample_std_and_range():
    s = aggregate.stat([0.97, 0.98, None, 0.99])
    assert s.n == 3 and s.mean == pytest.approx(0.98) and s.std == pytest.approx(0.01)
    assert (s.low, s.high) == (0.97, 0.99)
    low, high = s.interval()
    assert high - s.mean == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-4)  # t(0.975, 2 df)
    assert s.percent() == "98.00 ± 1.00% (n=3)"


@pytest.mark.parametrize(
    "values, verdict",
    [
        ([0.995, 0.996, 0.997], "met"),  # interval 0.9935-0.9985, all above 0.992
        ([0.993, 0.994, 0.995], "within noise"),  # interval 0.9915-0.9965 straddles it
        ([0.985, 0.986, 0.987], "not met"),
        ([0.995], "one seed: no verdict"),
    ],
)
def test_verdicts_follow_the_confidence_interval(values, verdict):
    assert aggregate.verdict(aggregate.stat(values), 0.992) == verdict


def fake_run(optimizer: str, seed: int, accuracies: list[float], lr: float = 0.01, status="completed") -> Run:
    config = dict(RunConfig(optimizer=optimizer, seed=seed, lr=lr, epochs=len(accuracies)).to_dict())
    test = [dict(epoch=i + 1, test_accuracy=a, test_loss=1 - a) for i, a in enumerate(accuracies)]
    return Run(path=Path(f"{optimizer}_{seed}"), config=config, test=test, summary=dict(status=status))


def test_faster_claim_pairs_seeds_on_the_area_under_the_accuracy_curve():
    groups = aggregate.group_runs(
        [fake_run("lamb16", s, [0.97 + d, 0.98 + d]) for s, d in ((1, 0.0), (2, 0.002), (3, 0.001))]
        + [fake_run("adam", s, [0.90 + d, 0.95 + d]) for s, d in ((1, 0.0), (2, 0.004), (3, -0.002))]
    )
    row = aggregate.faster_claim(groups, "lamb16", "adam")
    # Per seed, mean accuracy over the two epochs: +5.0, +4.8 and +5.3 points.
    assert row["verdict"] == "met" and "+5.03 ± 0.25 points (n=3 paired seeds)" in row["measured"]
    row = aggregate.faster_claim(groups, "adam", "lamb16")
    assert row["verdict"] == "not met"


def test_groups_keep_registry_order_and_name_the_setting_that_differs():
    groups = aggregate.group_runs(
        [fake_run("lamb16", 1, [0.9]), fake_run("adam", 1, [0.9]), fake_run("lamb16", 1, [0.9], lr=0.02)]
    )
    assert list(groups) == ["adam (lr 0.01)", "lamb16 (lr 0.01)", "lamb16 (lr 0.02)"]
    curves = aggregate.curves("lamb16 (lr 0.02)", groups["lamb16 (lr 0.02)"])
    assert curves.label == "LAMB16 (lr 0.02)" and curves.style["color"] == "tab:blue"


def test_band_carries_on_where_a_seed_stopped_early():
    band = aggregate.band([[(1, 0.5), (2, 0.7)], [(1, 0.3)]])
    assert band.x == [1, 2] and band.mean == [pytest.approx(0.4), 0.7] and band.low == [0.3, 0.7]


def test_registry_colours_of_the_original_figures():
    assert registry.spec("adam").color == "tab:red"
    assert registry.spec("lamb").color == "tab:green"
    assert registry.spec("lamb16").color == "tab:blue"
    styles = {(s.color, s.linestyle, s.marker) for s in registry.OPTIMIZERS.values()}
    assert len(styles) == len(registry.OPTIMIZERS)  # every optimizer drawn apart
    with pytest.raises(UserError, match="unknown optimizer 'nadam'; choose one of adam, adamw"):
        registry.spec("nadam")


@pytest.mark.parametrize("name", list(registry.OPTIMIZERS))
def test_every_registry_optimizer_trains_and_needs_the_state_it_declares(name):
    if not registry.available(name):
        with pytest.raises(UserError, match=r"pip install 'lamb16\[peers\]'"):
            registry.build(name, [torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0)
        pytest.skip(f"{registry.spec(name).package} not installed (the peers extra)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Tanh(), torch.nn.Linear(256, 1, bias=False))
    optimizer = registry.build(name, model.parameters(), lr=1e-3, weight_decay=0.0)
    x, y = torch.randn(64, 256), torch.randn(64, 1)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    big = model[0].weight  # 65,536 elements: the per-parameter figure applies
    per_param = state_nbytes(type("One", (), {"state": {big: optimizer.state[big]}})()) / big.numel()
    # Factored state (Adafactor's) grows with rows + columns: 0.03 bytes an element at 256 x 256.
    assert per_param == pytest.approx(registry.spec(name).state_bytes, rel=0.02, abs=0.035)


def test_a_missing_peer_names_the_extra_to_install(monkeypatch):
    fake = registry.OptimizerSpec("fake-peer", "Fake", registry.from_package("no_such_module_x", "Opt"),
                                  "black", "-", ".", 1.0, package="no_such_module_x")
    monkeypatch.setitem(registry.OPTIMIZERS, "fake-peer", fake)
    with pytest.raises(UserError, match=r"needs the no_such_module_x package: pip install 'lamb16\[peers\]'"):
        registry.build("fake-peer", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0)


def test_options_an_optimizer_does_not_take_are_refused():
    with pytest.raises(UserError, match="adam takes no trust_scale"):
        registry.build("adam", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0, trust_scale=0.5)


# ---------------------------------------------------------------- interrupt and resume


def comparable(run_dir: Path) -> list[dict]:
    """The train and test records, without wall-clock fields."""
    records, _ = read_records(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in records if r["kind"] in ("train", "test")]


def assert_same_weights_and_state(a: Path, b: Path) -> None:
    first, second = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (a, b))
    assert first["model"].keys() == second["model"].keys()
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    for state_a, state_b in zip(first["optimizer"]["state"].values(), second["optimizer"]["state"].values()):
        for key, value in state_a.items():
            other = state_b[key]
            assert value.dtype == other.dtype
            assert torch.equal(value.view(torch.uint8), other.view(torch.uint8)) if value.dtype.itemsize == 1 \
                else torch.equal(value, other)


def new_run(tmp_path: Path, name: str, config: RunConfig, data_dir: Path, train_size: int) -> RunDir:
    return RunDir.create(tmp_path / name, run_metadata(config, torch.device("cpu"), data_dir, train_size))


def test_a_stopped_run_resumes_to_the_same_metrics_and_weights_bit_for_bit(data_dir, tmp_path):
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    config = RunConfig(optimizer="lamb16", epochs=3, batch_size=32, lr=0.01, log_interval=3)
    whole = new_run(tmp_path, "whole", config, data_dir, len(train))
    train_run(config, whole, train, test, echo=lambda line: None)

    cut = new_run(tmp_path, "cut", config, data_dir, len(train))
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    with pytest.raises(Interrupted):
        train_run(config, cut, train, test, echo=lambda line: None, stop=StopAtCheck(batches_per_epoch + 4))
    summary = cut.summary()
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
    assert max(r["epoch"] for r in comparable(cut.path)) == 2  # it stopped inside epoch 2
    assert torch.load(cut.checkpoint_path, weights_only=True)["progress"]["epoch"] == 1

    resumed = train_run(config, cut, train, test, echo=lambda line: None)
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 3
    assert comparable(cut.path) == comparable(whole.path)
    assert resumed["test_accuracy_by_epoch"] == whole.summary()["test_accuracy_by_epoch"]
    assert_same_weights_and_state(cut.path, whole.path)
    kinds = [r["kind"] for r in read_records(cut.metrics_path)[0]]
    assert kinds.count("resumed") == 1


def test_a_corrupt_checkpoint_is_a_clear_error_that_keeps_the_run(data_dir, tmp_path):
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    config = RunConfig(optimizer="adam", epochs=1, batch_size=100)
    run = new_run(tmp_path, "run", config, data_dir, len(train))
    run.checkpoint_path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="delete it to restart"):
        train_run(config, run, train, test, echo=lambda line: None)
    assert run.checkpoint_path.read_bytes() == b"not a checkpoint"


def test_sigint_during_epoch_2_then_resume_matches_an_uninterrupted_train(tmp_path):
    data_dir = write_synthetic_mnist(tmp_path / "data", train_size=800)
    args = ["train", "--optimizer", "lamb16", "--epochs", "2", "--batch-size", "8", "--lr", "0.01",
            "--log-interval", "1", "--data-dir", str(data_dir), "--no-download", "--no-progress"]
    process = subprocess.Popen([sys.executable, "cli.py", *args, "--out", str(tmp_path / "cut")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # As many threads as this process, which trains the runs it is compared with.
                               env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads())))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        logs = list((tmp_path / "cut").glob("*/metrics.jsonl"))
        if logs and any(r.get("epoch") == 2 for r in read_records(logs[0])[0]):
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    (run_dir,) = [p.parent for p in (tmp_path / "cut").glob("*/config.json")]
    assert f"resume with: python cli.py train --resume {run_dir}" in stderr
    assert "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1

    runner = CliRunner()
    resumed = runner.invoke(cli.cli, [*args, "--resume", str(run_dir)], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1" in resumed.output
    whole = runner.invoke(cli.cli, [*args, "--out", str(tmp_path / "whole")], catch_exceptions=False)
    assert whole.exit_code == 0
    (whole_dir,) = [p.parent for p in (tmp_path / "whole").glob("*/config.json")]
    assert comparable(run_dir) == comparable(whole_dir)
    assert_same_weights_and_state(run_dir, whole_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_resuming_a_finished_run_is_refused(data_dir, tmp_path):
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    config = RunConfig(optimizer="sgd", epochs=1, batch_size=100)
    run = new_run(tmp_path, "run", config, data_dir, len(train))
    train_run(config, run, train, test, echo=lambda line: None)
    result = CliRunner().invoke(cli.cli, ["train", "--resume", str(run.path), "--data-dir", str(data_dir)])
    assert result.exit_code == 1 and "already completed; nothing to resume" in result.output


# ---------------------------------------------------------------- the scaling study


def test_moment_quantization_table_separates_the_scalings(data_dir):
    split = load_mnist(data_dir, True, torch.device("cpu"))
    rows = quantization.moment_quantization_table(split, steps=20, batch_size=64, lr=0.01, seed=0, layers=("fc1.weight",))
    by_scaling = {r["scaling"]: r for r in rows}
    assert by_scaling["absmax"]["store_m"] < 0.05 and by_scaling["absmax"]["saturated_m"] == 0
    assert by_scaling["seed"]["store_m"] > 0.5 and by_scaling["seed"]["saturated_m"] > 0.3
    assert "| fc1.weight | 400,000 | seed |" in quantization.markdown(rows)


def test_runs_of_one_config_differ_only_in_seed():
    base = RunConfig(optimizer="lamb16", batch_size=128)
    assert replace(base, seed=2).run_name() == "lamb16_b128_lr0.0025_wd0.01_seed2"
    assert RunConfig.from_dict(dict(base.to_dict(), hostname="x")) == base


def test_bench_times_the_compiled_path_per_group_or_per_tensor_on_the_cpu(monkeypatch):
    """bench's compiled names send a CPU step down the path GPUs take: one
    compiled call per group, or one per tensor as before; then everything is
    as it was. (Compilation itself is faked: this tests the routing.)"""
    import lamb16.compiled
    import lamb16.native
    from experiments import bench

    calls: list[tuple[str, int]] = []

    def group(update, jobs, **hyper):
        calls.append(("group", len(jobs)))
        for inputs, outputs, extra in jobs:
            for output, result in zip(outputs, update(*inputs, **hyper, **extra)):
                output.copy_(result)

    def per_tensor(update, inputs, **hyper):
        calls.append(("tensor", 1))
        return update(*inputs, **hyper)

    monkeypatch.setattr(lamb16.compiled, "run_group", group)
    monkeypatch.setattr(lamb16.compiled, "run_compiled", per_tensor)
    usable = lamb16.native.usable
    rows = bench.step_times([(20, 10), (30,)], ["lamb16 compiled", "lamb16 1pass compiled per tensor"],
                            torch.device("cpu"), warmup=1, steps=2)
    assert [r["optimizer"] for r in rows] == ["lamb16 compiled", "lamb16 1pass compiled per tensor"]
    # 3 timed steps, then one whose path is checked and one whose memory is measured: 2 tensors each.
    assert calls.count(("group", 2)) == 5 and calls.count(("tensor", 1)) == 10
    assert lamb16.native.usable is usable and not lamb16.dispatch.compile_per_tensor


def test_bench_never_labels_a_time_with_a_path_that_did_not_run(monkeypatch):
    """lamb16 names the CPU kernels here: with them unusable its steps run the
    reference, and its row says so instead of giving a time; each row records
    the path it ran, and what every step took beyond the state."""
    import lamb16.native
    from experiments import bench

    rows = {r["optimizer"]: r for r in bench.step_times([(20, 10)], ["lamb16", "lamb16 eager", "adam fused"],
                                                         torch.device("cpu"), warmup=1, steps=2)}
    assert rows["lamb16"]["path"] == "cpu kernels" and rows["lamb16"]["median_ms"] > 0
    assert rows["lamb16 eager"]["path"] == "reference" and rows["adam fused"]["path"] is None
    assert all(r["transient_bytes_per_parameter"] is not None for r in rows.values())
    monkeypatch.setattr(lamb16.native, "usable", lambda job, fused: False)
    (row,) = bench.step_times([(20, 10)], ["lamb16"], torch.device("cpu"), warmup=1, steps=2)
    assert row["path"] == "reference" and row["expected_path"] == "cpu kernels"
    assert row["median_ms"] is None and row["ratio_to_adam_fused"] is None and row["min_gb_per_s"] is None

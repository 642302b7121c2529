"""The experiment CLI, driven through click's test runner on small synthetic MNIST files
in the real IDX format (and on the real files where LAMB16_DATA_DIR has them)."""

import json
import os
from pathlib import Path

import matplotlib.image
import pytest
import torch
from click.testing import CliRunner
from mnist_files import TRAIN_SIZE, write_idx

import cli
import lamb16
from models import MnistCNN


def offline(data_dir: Path, out: Path) -> list[str]:
    """Options every training test passes: the synthetic data, never a download, --out."""
    return ["--data-dir", str(data_dir), "--no-download", "--out", str(out)]


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("config.json"))


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_train_writes_config_metrics_and_summary(data_dir, tmp_path):
    out = tmp_path / "runs"
    result = invoke(
        "train", "--optimizer", "lamb16", "--epochs", "2", "--batch-size", "64", "--lr", "0.01",
        "--log-interval", "2", *offline(data_dir, out),
    )
    assert result.exit_code == 0, result.output
    assert "epoch  2/2  train loss" in result.output and "accuracy" in result.output
    assert "batch/s" not in result.output and "it/s" not in result.output  # no bars when not a terminal
    (run_dir,) = run_dirs(out)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["optimizer"] == "lamb16" and config["batch_size"] == 64 and config["lr"] == 0.01
    assert config["seed"] == 1 and config["device"] == "cpu" and config["effective_batch_size"] == 64
    assert config["torch_version"] == torch.__version__ and config["lamb16_version"] == lamb16.__version__
    assert config["hostname"] and config["cpu_model"] and "git_commit" in config and "git_dirty" in config
    assert config["data_dir"] == str(data_dir.resolve())
    assert set(config["data_sha256"]) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}
    assert config["cpu_flush_denormal"] is True and config["channels_last"] is True
    assert (torch.tensor(1e-38) * 0.1).item() != 0  # flush-to-zero was switched back off

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    test = [r for r in records if r["kind"] == "test"]
    assert [r["epoch"] for r in test] == [1, 2]
    samples = [r["samples"] for r in train]
    assert samples == sorted(samples) and samples[-1] == 2 * TRAIN_SIZE
    assert all(0 < r["loss"] < 10 for r in train)
    assert set(train[-1]["trust_ratio"]) == {name for name, _ in MnistCNN().named_parameters()}
    assert all(0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0 and r["epoch_time"] > 0 for r in test)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2 and summary["ended"]
    assert summary["final_test_accuracy"] == test[-1]["test_accuracy"]
    assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in test)
    assert summary["parameters"] == 431_080
    # 2 bytes an element and a pair of float32 scales per block of a row (2,145 blocks in the CNN): 2.04
    assert 2.039 < summary["state_bytes_per_parameter"] < 2.041
    assert (run_dir / "checkpoint.pt").is_file()


def test_training_learns_the_synthetic_digits(data_dir, tmp_path):
    result = invoke("train", "--optimizer", "lamb", "--epochs", "3", "--batch-size", "32", "--lr", "0.01",
                    *offline(data_dir, tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert json.loads((run_dir / "summary.json").read_text())["best_test_accuracy"] > 0.5  # chance is 0.1


def test_train_seeds_and_weight_decay_long_name(data_dir, tmp_path):
    out = tmp_path / "runs"
    result = invoke("train", "--optimizer", "adamw", "--epochs", "1", "--batch-size", "100", "--seeds", "2",
                    "--weight-decay", "0.05", *offline(data_dir, out))
    assert result.exit_code == 0, result.output
    configs = [json.loads((d / "config.json").read_text()) for d in run_dirs(out)]
    assert sorted(c["seed"] for c in configs) == [1, 2] and {c["wd"] for c in configs} == {0.05}
    assert "[run 2 of 2]" in result.output


def test_a_second_run_never_overwrites_the_first(data_dir, tmp_path):
    args = ["train", "--epochs", "1", "--batch-size", "100", *offline(data_dir, tmp_path / "runs")]
    assert invoke(*args).exit_code == 0
    (first,) = run_dirs(tmp_path / "runs")
    before = (first / "metrics.jsonl").read_text()
    assert invoke(*args).exit_code == 0
    assert len(run_dirs(tmp_path / "runs")) == 2
    assert (first / "metrics.jsonl").read_text() == before


def test_compare_over_seeds_draws_bands_and_tables_mean_and_spread(data_dir, tmp_path):
    out = tmp_path / "cmp"
    result = invoke("compare", "--epochs", "2", "--batch-size", "100", "--lr", "0.01", "--seeds", "1,2",
                    "--optimizers", "adamw,lamb16", *offline(data_dir, out))
    assert result.exit_code == 0, result.output
    assert "[run 1 of 4] adamw, seed 1: batch 100, lr 0.01" in result.output
    assert sorted(p.name for p in run_dirs(out)) == ["adamw_seed1", "adamw_seed2", "lamb16_seed1", "lamb16_seed2"]
    # Same seed, same initial weights and data order: the first batch's loss is the same for both.
    first = {p.name: read_jsonl(p / "metrics.jsonl")[0] for p in run_dirs(out)}
    assert first["adamw_seed1"]["samples"] == first["lamb16_seed1"]["samples"]
    results = (out / "results.md").read_text()
    assert "| lamb16 | 2 completed |" in results and "(n=2)" in results
    finals = [json.loads((out / f"lamb16_seed{s}" / "summary.json").read_text())["final_test_accuracy"] for s in (1, 2)]
    std = abs(finals[0] - finals[1]) / 2**0.5  # the sample standard deviation of two values
    assert f"{100 * sum(finals) / 2:.2f} ± {100 * std:.2f}% (n=2)" in results
    image = matplotlib.image.imread(out / "figure.png")
    height, width = image.shape[:2]
    assert width >= 2.5 * height and width >= 1200  # three panels side by side


def test_compare_resume_skips_finished_runs_and_refuses_to_mix_studies(data_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--epochs", "1", "--batch-size", "150", "--seeds", "1", "--optimizers", "lamb,lamb16-seed",
            *offline(data_dir, out)]
    assert invoke(*args).exit_code == 0
    before = {p.name: (p / "metrics.jsonl").read_text() for p in run_dirs(out)}
    again = invoke(*args)
    assert again.exit_code == 1 and "--resume" in error_line(again)
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("completed before, skipped") == 2 and "epoch  1/1" not in resumed.output
    assert {p.name: (p / "metrics.jsonl").read_text() for p in run_dirs(out)} == before
    other = invoke(*[a if a != "150" else "100" for a in args], "--resume")
    assert other.exit_code == 1 and "batch_size 150, not 100" in error_line(other)


def test_ctrl_c_stops_a_comparison_after_its_batch_and_resume_finishes_it(data_dir, tmp_path, monkeypatch):
    """A real SIGINT in the second run's epoch: that run stops after its batch,
    the first stays completed, and --resume trains only what is left."""
    import signal

    from experiments import loop

    original, calls = loop.train_epoch, []

    def ctrl_c_in_the_second_run(*args, **kwargs):
        calls.append("epoch")
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
            calls.append("went on")  # the signal only asked the loop to stop: no KeyboardInterrupt mid-batch
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", ctrl_c_in_the_second_run)
    out = tmp_path / "cmp"
    args = ["compare", "--epochs", "1", "--batch-size", "100", "--seeds", "1", "--optimizers", "lamb,lamb16",
            *offline(data_dir, out)]
    stopped = invoke(*args)
    assert stopped.exit_code == 130 and f"resume with: the same command with --out {out} --resume" in stopped.output
    assert calls == ["epoch", "epoch", "went on"]
    statuses = {p.name: json.loads((p / "summary.json").read_text())["status"] for p in run_dirs(out)}
    assert statuses == {"lamb_seed1": "completed", "lamb16_seed1": "interrupted"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before afterwards
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0 and resumed.output.count("completed before, skipped") == 1, resumed.output


def test_repeated_optimizer_is_refused_before_training(data_dir, tmp_path):
    result = invoke("compare", "--optimizers", "lamb16,lamb16", *offline(data_dir, tmp_path / "cmp"))
    assert result.exit_code == 1 and "lists lamb16 more than once" in error_line(result)
    assert not (tmp_path / "cmp").exists()


def test_an_exploding_finite_loss_is_diverged_and_compare_goes_on(data_dir, tmp_path):
    out = tmp_path / "cmp"
    result = invoke("compare", "--optimizers", "adam,lamb", "--epochs", "2", "--batch-size", "50", "--lr", "1e6",
                    "--log-interval", "1", "--seeds", "1", *offline(data_dir, out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "adam_seed1" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    records = read_jsonl(out / "adam_seed1" / "metrics.jsonl")
    assert records[-1]["kind"] == "diverged"
    assert (out / "lamb_seed1" / "summary.json").is_file()  # the next optimizer still ran
    assert "1 diverged" in (out / "results.md").read_text()


def test_plot_finds_nested_runs_labels_settings_apart_and_never_overwrites(data_dir, tmp_path):
    for lr in ("0.01", "0.02"):
        assert invoke("train", "--optimizer", "lamb16", "--epochs", "1", "--batch-size", "150", "--lr", lr,
                      *offline(data_dir, tmp_path / "runs" / f"lr{lr}")).exit_code == 0
    (broken,) = run_dirs(tmp_path / "runs" / "lr0.02")
    with (broken / "metrics.jsonl").open("a") as log:
        log.write('{"kind": "train", "samp\n')
    result = invoke("plot", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "lamb16 (lr 0.01)" in result.output and "lamb16 (lr 0.02)" in result.output
    assert "skipped 1 malformed line" in result.output
    assert (tmp_path / "runs" / "figure.png").is_file()
    assert invoke("plot", str(tmp_path / "runs")).exit_code == 0
    assert (tmp_path / "runs" / "figure-2.png").is_file()  # a second figure, not over the first
    target = tmp_path / "mine.png"
    target.write_text("keep")
    refused = invoke("plot", str(tmp_path / "runs"), "--output", str(target))
    assert refused.exit_code == 1 and "--force" in error_line(refused) and target.read_text() == "keep"
    assert invoke("plot", str(tmp_path / "runs"), "--output", str(target), "--force", "--log-y").exit_code == 0
    assert matplotlib.image.imread(target).shape[1] >= 1200


def test_plot_warns_about_runs_that_have_not_ended(data_dir, tmp_path):
    assert invoke("train", "--epochs", "1", "--batch-size", "150", *offline(data_dir, tmp_path / "runs")).exit_code == 0
    (run_dir,) = run_dirs(tmp_path / "runs")
    (run_dir / "summary.json").unlink()
    result = invoke("plot", str(run_dir))
    assert result.exit_code == 0 and "has not ended" in result.output and "incomplete" in result.output


def test_reproduce_states_each_claim_with_a_verdict(data_dir, tmp_path):
    out = tmp_path / "repro"
    result = invoke("reproduce", "--epochs", "1", "--seeds", "2", "--optimizers", "adam,lamb,lamb16",
                    *offline(data_dir, out))
    assert result.exit_code == 0, result.output
    results = (out / "results.md").read_text()
    assert (out / "B1024L002.png").is_file() and (out / "B128L001.png").is_file()
    claims = [line for line in results.splitlines() if line.startswith("| batch ")]
    assert len(claims) == 6  # per figure: accuracy, faster than Adam, faster than LAMB
    assert all(any(v in line for v in ("**met**", "**not met**", "**within noise**")) for line in claims)
    # 300 synthetic images cannot reach 99.2% in one epoch: that claim is plainly not met.
    assert "batch 1024, lr 0.02: LAMB16 reaches 99.2% within 1 epoch" in results
    assert "n=2" in results


def test_missing_data_without_download_says_where_it_looked(tmp_path):
    result = invoke("train", "--data-dir", str(tmp_path / "nowhere"), "--no-download", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 1
    line = error_line(result)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in line and "--download" in line and "LAMB16_DATA_DIR" in line
    assert not (tmp_path / "runs").exists()  # a failed load leaves no empty --out behind


def test_a_failed_download_says_so_and_how_to_supply_the_files(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where a folder should be: the download cannot even start")
    result = invoke("train", "--data-dir", str(blocker / "mnist"), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 1
    line = error_line(result)
    assert "downloading MNIST" in line and "failed" in line and "copy the four" in line
    assert "--data-dir" in line and "LAMB16_DATA_DIR" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--optimizer", "nadam"], "'nadam' is not one of 'adam'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-0.1"], "--lr"),
        (["--wd", "-1"], "--weight-decay"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(data_dir, tmp_path, args, fragment):
    result = invoke("train", *args, "--data-dir", str(data_dir), "--no-download", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2
    assert fragment in error_line(result)
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--optimizers", "adam,nadam"], "unknown optimizer 'nadam'"),
        (["--seeds", "two"], "invalid --seeds"),
        (["--seeds", "1,1"], "seed 1 is listed twice"),
        (["--seed", "3", "--seeds", "2"], "not both"),
        (["--optimizers", "adam", "--trust-scale", "0.5"], "--trust-scale applies to LAMB16 only"),
    ],
)
def test_bad_compare_options_are_one_line_errors(data_dir, tmp_path, args, fragment):
    result = invoke("compare", *args, *offline(data_dir, tmp_path / "cmp"))
    assert result.exit_code == 1 and fragment in error_line(result)
    assert not (tmp_path / "cmp").exists()


def test_unwritable_out_is_a_one_line_error(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    result = invoke("train", "--data-dir", str(data_dir), "--no-download", "--out", str(blocker / "runs"))
    assert result.exit_code == 1
    assert "cannot write to --out" in error_line(result)
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "type byte"])
def test_corrupt_or_truncated_mnist_is_a_one_line_error(data_dir, tmp_path, damage):
    images = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    content = images.read_bytes()
    if damage == "type byte":  # float32 data type where MNIST has unsigned bytes
        write_idx(images, torch.zeros(TRAIN_SIZE, 28, 28), type_byte=0x0D)
    else:
        images.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"\xff" * len(content))
    result = invoke("train", "--data-dir", str(data_dir), "--no-download", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 1
    line = error_line(result)
    assert "MNIST train files" in line and "intact copies" in line


def test_bench_without_data_suggests_no_download_option(tmp_path):
    result = invoke("bench", "--data-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 1
    line = error_line(result)
    assert "MNIST not found" in line and "--download" not in line


def test_cuda_device_without_cuda_is_a_one_line_error(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = invoke("train", "--device", "cuda", "--data-dir", str(data_dir), "--no-download", "--out", str(tmp_path))
    assert result.exit_code == 1 and "no CUDA device" in error_line(result)


@pytest.mark.parametrize("command", ["train", "compare", "plot", "reproduce", "sweep", "report", "scaling", "deviation",
                                     "bench"])
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and "python cli.py " + command in result.output


def test_help_shows_defaults_of_the_original_flags():
    output = invoke("train", "--help").output
    for flag, default in [("--batch-size", "64"), ("--test-batch-size", "1000"), ("--epochs", "10"),
                          ("--lr", "0.0025"), ("--wd", "0.01"), ("--seed", "1"), ("--log-interval", "10")]:
        assert flag in output and f"default: {default}" in output
    assert "(1)" not in output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and lamb16.__version__ in result.output


REAL_DATA = Path(os.environ.get("LAMB16_DATA_DIR", "data"))


@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file(), reason="real MNIST not present")
def test_real_mnist_loads_whole_and_normalized():
    from experiments.data import load_mnist

    test = load_mnist(REAL_DATA, train=False, device=torch.device("cpu"))
    assert test.images.shape == (10_000, 1, 28, 28) and test.labels.dtype == torch.int64
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(test.images.mean().item()) < 0.05  # normalized with the training set's mean and std


def test_bench_times_interleaved_optimizers_and_writes_json(data_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = invoke(
        "bench", "--sizes", "cnn", "--optimizers", "adam fused,lamb16,lamb16 1pass,sgd", "--steps", "3", "--warmup", "1",
        "--batches", "1", "--data-dir", str(data_dir), "--json", str(out),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["cpu_loops"] == lamb16.native.loops() != "none"
    assert f"on the {report['cpu_loops']} kernel loops" in result.output
    rows = {r["optimizer"]: r for r in report["steps"]["cnn"]}
    assert rows["adam fused"]["ratio_to_adam_fused"] == 1.0
    assert rows["lamb16"]["median_ms"] > 0 and rows["lamb16"]["parameters"] == 431_080
    assert 2.039 < rows["lamb16"]["state_bytes_per_parameter"] < 2.041
    assert 8.0 < rows["adam fused"]["state_bytes_per_parameter"] < 8.001
    assert rows["sgd"]["state_bytes_per_parameter"] == 4.0 and rows["sgd"]["traffic_ms"] is None
    for name in ("adam fused", "lamb16", "lamb16 1pass"):  # each beside its design's traffic alone, in the same rounds
        row = rows[name]
        assert row["traffic_ms"] > 0 and row["ratio_to_traffic"] == row["median_ms"] / row["traffic_ms"]
    assert "| traffic ms | x traffic |" in result.output
    # The host's part of a kernel step, its kernel calls doing nothing: timed for the kernels' optimizers alone.
    assert rows["lamb16"]["host_ms"] > 0 and rows["lamb16 1pass"]["host_ms"] > 0
    assert rows["adam fused"]["host_ms"] is None and rows["sgd"]["host_ms"] is None
    assert "| host ms |" in result.output
    assert set(report["breakdown_batch_128"]) == {"data", "forward", "backward", "optimizer"}
    assert all(rate > 0 for rate in report["throughput_batch_1024"].values())


def test_bench_rejects_unknown_sizes(data_dir):
    result = invoke("bench", "--sizes", "cnn,2b", "--data-dir", str(data_dir))
    assert result.exit_code == 2 and "unknown 2b" in error_line(result)


def test_bench_refuses_a_json_file_it_could_not_write_before_timing(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("bench", "--sizes", "cnn", "--data-dir", str(data_dir), "--json", str(blocker / "bench.json"))
    assert result.exit_code == 1 and "--json" in error_line(result)
    assert "optimizer step" not in result.output


def test_deviation_gives_each_optimizers_distance_from_float32_state_over_seeds(data_dir):
    result = invoke("deviation", "--steps", "5", "--seeds", "2", "--optimizers", "lamb16,lamb16-1pass",
                    "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| lamb16")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00 ± 0.00 |") and "(n=2)" in rows[1]


def test_deviation_refuses_an_unknown_optimizer(data_dir):
    result = invoke("deviation", "--optimizers", "lamb16,adam9", "--data-dir", str(data_dir))
    assert result.exit_code == 2 and "adam9" in error_line(result)


def test_bench_times_the_loops_it_is_asked_for_then_leaves_the_kernels_as_they_were(data_dir):
    widest = lamb16.native.loops()
    result = invoke("bench", "--sizes", "cnn", "--optimizers", "adam fused,lamb16", "--steps", "3", "--warmup", "1",
                    "--batches", "1", "--loops", "portable", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert "on the portable kernel loops" in result.output
    assert lamb16.native.loops() == widest


def test_importing_the_library_or_the_cli_loads_no_compiler_dtensors_or_plotting():
    """Each of these costs a second or more to import: `import lamb16` (and a
    sweep's worker, a torchrun rank, `cli.py --help`) must not pay for them
    before a step, a DTensor or a figure needs them."""
    import subprocess
    import sys

    heavy = ("torch._dynamo", "torch.distributed.tensor", "matplotlib", "triton")
    loaded = "print(','.join(m for m in {!r} if m in sys.modules))".format(heavy)
    code = f"import sys; import lamb16; {loaded}; import cli; {loaded}"  # one interpreter: torch's import once
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=Path(cli.__file__).parent, check=True).stdout.splitlines()
    assert lines == ["", ""], f"import lamb16 loads {lines[0]!r}; import cli loads {lines[1]!r}"

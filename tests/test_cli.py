"""The experiment CLI, driven through click's test runner on small synthetic MNIST files
in the real IDX format (and on the real files where LAMB16_DATA_DIR has them)."""

import json
import os
import struct
from pathlib import Path

import matplotlib.image
import pytest
import torch
from click.testing import CliRunner

import cli
import lamb16.native

TRAIN_SIZE, TEST_SIZE = 300, 100


def write_idx(path: Path, array: torch.Tensor) -> None:
    """The IDX format: zero bytes, type 0x08 (ubyte), number of dims, big-endian sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def write_synthetic_mnist(root: Path, seed: int = 0) -> Path:
    """Digit-like images: each label a fixed random stroke pattern plus noise, so a CNN can learn it."""
    gen = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(10, 28, 28, generator=gen) > 0.8).float() * 255
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, size in (("train", TRAIN_SIZE), ("t10k", TEST_SIZE)):
        labels = torch.randint(0, 10, (size,), generator=gen)
        images = (patterns[labels] * 0.7 + torch.rand(size, 28, 28, generator=gen) * 70).clamp(0, 255)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_synthetic_mnist(tmp_path / "data")


def offline(data_dir: Path, out: Path) -> list[str]:
    """Options every training test passes: the synthetic data, never a download, a
    fresh --out, no progress bars."""
    return ["--data-dir", str(data_dir), "--no-download", "--out", str(out), "--no-progress"]


def invoke(*args: str):
    result = CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def single_run_dir(out: Path) -> Path:
    (run_dir,) = [p.parent for p in out.glob("*/config.json")]
    return run_dir


def test_train_writes_config_metrics_and_summary(data_dir, tmp_path):
    out = tmp_path / "runs"
    result = invoke(
        "train", "--optimizer", "lamb16", "--epochs", "2", "--batch-size", "64", "--lr", "0.01",
        "--log-interval", "2", *offline(data_dir, out),
    )
    assert result.exit_code == 0, result.output
    assert "epoch  2/2" in result.output and "accuracy" in result.output
    run_dir = single_run_dir(out)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["optimizer"] == "lamb16" and config["batch_size"] == 64 and config["lr"] == 0.01
    assert config["seed"] == 1 and config["scaling"] == "absmax" and config["device"] == "cpu"
    assert config["torch_version"] == torch.__version__ and config["lamb16_version"]
    assert config["cpu_flush_denormal"] is True and config["channels_last"] is True
    assert (torch.tensor(1e-38) * 0.1).item() != 0  # flush-to-zero was switched back off

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    test = [r for r in records if r["kind"] == "test"]
    assert [r["epoch"] for r in test] == [1, 2]
    samples = [r["samples"] for r in train]
    assert samples == sorted(samples) and samples[-1] == 2 * TRAIN_SIZE
    assert all(0 < r["loss"] < 10 for r in train)
    assert set(train[-1]["trust_ratio"]) == {name for name, _ in cli.MnistCNN().named_parameters()}
    assert all(0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0 and r["epoch_time"] > 0 for r in test)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["final_test_accuracy"] == test[-1]["test_accuracy"]
    assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in test)
    assert summary["parameters"] == 431_080
    assert 2.0 < summary["state_bytes_per_parameter"] < 2.001


def test_training_learns_the_synthetic_digits(data_dir, tmp_path):
    result = invoke(
        "train", "--optimizer", "lamb", "--epochs", "3", "--batch-size", "32", "--lr", "0.01",
        *offline(data_dir, tmp_path / "runs"),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((single_run_dir(tmp_path / "runs") / "summary.json").read_text())
    assert summary["best_test_accuracy"] > 0.5  # chance is 0.1


def test_a_second_run_never_overwrites_the_first(data_dir, tmp_path):
    args = ["train", "--epochs", "1", "--batch-size", "100", *offline(data_dir, tmp_path / "runs")]
    assert invoke(*args).exit_code == 0
    first = next((tmp_path / "runs").iterdir())
    before = (first / "metrics.jsonl").read_text()
    assert invoke(*args).exit_code == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert (first / "metrics.jsonl").read_text() == before


def test_compare_runs_all_optimizers_on_the_same_data_and_draws_the_figure(data_dir, tmp_path):
    out = tmp_path / "runs"
    result = invoke(
        "compare", "--epochs", "1", "--batch-size", "100", "--lr", "0.01", *offline(data_dir, out)
    )
    assert result.exit_code == 0, result.output
    (compare_dir,) = out.iterdir()
    for variant in ("adam", "lamb", "lamb16"):
        config = json.loads((compare_dir / variant / "config.json").read_text())
        assert config["variant"] == variant and config["seed"] == 1
        assert json.loads((compare_dir / variant / "summary.json").read_text())["status"] == "completed"
    # Same seed and data order: the first logged losses come from the same initial weights.
    first = [read_jsonl(compare_dir / v / "metrics.jsonl")[0] for v in ("adam", "lamb", "lamb16")]
    assert len({r["samples"] for r in first}) == 1
    image = matplotlib.image.imread(compare_dir / "figure.png")
    height, width = image.shape[:2]
    assert width >= 2.5 * height and width >= 1200  # three panels side by side


def test_plot_redraws_the_figure_from_saved_runs(data_dir, tmp_path):
    out = tmp_path / "runs"
    invoke("compare", "--epochs", "1", "--batch-size", "150", "--optimizers", "lamb,lamb16-seed",
           *offline(data_dir, out))
    (compare_dir,) = out.iterdir()
    (compare_dir / "figure.png").unlink()
    result = invoke("plot", str(compare_dir))
    assert result.exit_code == 0, result.output
    assert matplotlib.image.imread(compare_dir / "figure.png").shape[1] >= 1200
    result = invoke("plot", str(compare_dir / "lamb"), "--output", str(tmp_path / "one.png"), "--title", "LAMB only")
    assert result.exit_code == 0 and (tmp_path / "one.png").is_file()


def test_a_diverging_run_is_recorded_and_compare_goes_on(data_dir, tmp_path):
    out = tmp_path / "runs"
    result = invoke(
        "compare", "--optimizers", "adam,lamb", "--epochs", "2", "--batch-size", "50", "--lr", "1e12",
        "--log-interval", "1", *offline(data_dir, out),
    )
    assert result.exit_code == 0, result.output
    (compare_dir,) = out.iterdir()
    summary = json.loads((compare_dir / "adam" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    records = read_jsonl(compare_dir / "adam" / "metrics.jsonl")
    assert records[-1]["kind"] == "diverged"
    assert (compare_dir / "lamb" / "summary.json").is_file()  # the next optimizer still ran
    assert (compare_dir / "figure.png").is_file()


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_data_without_download_says_where_it_looked(tmp_path):
    result = invoke("train", "--data-dir", str(tmp_path / "nowhere"), "--no-download", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 1
    line = error_line(result)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in line and "--download" in line and "LAMB16_DATA_DIR" in line


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--optimizer", "sgd"], "'sgd' is not one of 'adam', 'lamb', 'lamb16'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-0.1"], "--lr"),
        (["--wd", "-1"], "--wd"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(data_dir, tmp_path, args, fragment):
    result = invoke("train", *args, "--data-dir", str(data_dir), "--no-download", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2
    assert fragment in error_line(result)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_unknown_optimizer_in_compare(data_dir, tmp_path):
    result = invoke("compare", "--optimizers", "adam,sgd", "--data-dir", str(data_dir), "--no-download")
    assert result.exit_code == 2 and "unknown optimizer sgd" in error_line(result)


def test_unwritable_out_is_a_one_line_error(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    result = invoke("train", "--data-dir", str(data_dir), "--no-download", "--out", str(blocker / "runs"))
    assert result.exit_code == 1
    assert "cannot write to --out" in error_line(result)
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_mnist_is_a_one_line_error(data_dir, tmp_path, damage):
    images = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    content = images.read_bytes()
    images.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"\xff" * len(content))
    result = invoke("train", "--data-dir", str(data_dir), "--no-download", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 1
    line = error_line(result)
    assert "cannot read the MNIST train files" in line and "--download" in line


def test_cuda_device_without_cuda_is_a_one_line_error(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = invoke("train", "--device", "cuda", "--data-dir", str(data_dir), "--no-download", "--out", str(tmp_path))
    assert result.exit_code == 1 and "no CUDA device" in error_line(result)


@pytest.mark.parametrize("command", ["train", "compare", "plot", "reproduce", "scaling"])
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output and "python cli.py " + command in result.output


def test_help_shows_defaults_of_the_original_flags():
    output = invoke("train", "--help").output
    for flag, default in [("--batch-size", "64"), ("--test-batch-size", "1000"), ("--epochs", "10"),
                          ("--lr", "0.0025"), ("--wd", "0.01"), ("--seed", "1"), ("--log-interval", "10")]:
        assert flag in output and f"default: {default}" in output


def test_moment_quantization_table_separates_the_scalings(data_dir):
    split = cli.load_mnist(data_dir, True, download=False, device=torch.device("cpu"))
    rows = cli.moment_quantization_table(split, steps=20, batch_size=64, lr=0.01, seed=0, layers=("fc1.weight",))
    by_scaling = {r["scaling"]: r for r in rows}
    assert by_scaling["absmax"]["store_m"] < 0.05 and by_scaling["absmax"]["saturated_m"] == 0
    assert by_scaling["seed"]["store_m"] > 0.5 and by_scaling["seed"]["saturated_m"] > 0.3


REAL_DATA = Path(os.environ.get("LAMB16_DATA_DIR", "data"))


@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file(), reason="real MNIST not present")
def test_real_mnist_loads_whole_and_normalized():
    test = cli.load_mnist(REAL_DATA, train=False, download=False, device=torch.device("cpu"))
    assert test.images.shape == (10_000, 1, 28, 28) and test.labels.dtype == torch.int64
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(test.images.mean().item()) < 0.05  # normalized with the training set's mean and std


def test_bench_times_interleaved_optimizers_and_writes_json(data_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = invoke(
        "bench", "--sizes", "cnn", "--optimizers", "adam fused,lamb16", "--steps", "3", "--warmup", "1",
        "--batches", "1", "--data-dir", str(data_dir), "--json", str(out),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["cpu_loops"] == lamb16.native.loops() != "none"
    assert f"on the {report['cpu_loops']} kernel loops" in result.output
    rows = {r["optimizer"]: r for r in report["steps"]["cnn"]}
    assert rows["adam fused"]["ratio_to_adam_fused"] == 1.0
    assert rows["lamb16"]["median_ms"] > 0 and rows["lamb16"]["parameters"] == 431_080
    assert 2.0 < rows["lamb16"]["state_bytes_per_parameter"] < 2.001
    assert 8.0 < rows["adam fused"]["state_bytes_per_parameter"] < 8.001
    for row in rows.values():  # each beside its design's memory traffic alone, timed in the same rounds
        assert row["traffic_ms"] > 0 and row["ratio_to_traffic"] == row["median_ms"] / row["traffic_ms"]
    assert "| traffic ms | x traffic |" in result.output
    assert set(report["breakdown_batch_128"]) == {"data", "forward", "backward", "optimizer"}
    assert all(rate > 0 for rate in report["throughput_batch_1024"].values())


def test_bench_rejects_unknown_sizes(data_dir):
    result = invoke("bench", "--sizes", "1b", "--data-dir", str(data_dir))
    assert result.exit_code == 2 and "unknown size 1b" in error_line(result)

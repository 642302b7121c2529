"""Lamb and Lamb16 under PyTorch's own distributed training, for real: two gloo
processes on the CPU. DDP replicates the step; FSDP2 (fully_shard) and other
DTensor placements shard it, and must give the unsharded step all the same."""

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from experiments import loop
import lamb16.dispatch
import lamb16.native
from lamb16 import Lamb, Lamb16, state_nbytes, triton_kernels
from models import MnistCNN
from stops import StopAtCheck

OPTIMIZERS = {"lamb16-absmax": functools.partial(Lamb16, scaling="absmax"), "lamb": Lamb,
              # Blocks of 4: 12-element rows in three; 1-D tensors cut inside a block (33 = 17 + 16).
              "lamb16": functools.partial(Lamb16, block_size=4)}
DDP_OPTIMIZERS = {**OPTIMIZERS, "lamb16-1pass": functools.partial(Lamb16, single_pass=True)}
# Every way a sharded step can run: both optimizers, Lamb16's two scalings,
# the CPU kernels (fused) and the eager reference.
SETUPS = {
    "lamb16-absmax": (Lamb16, {"scaling": "absmax"}),
    "lamb16-seed": (Lamb16, {"scaling": "seed"}),
    "lamb16-absmax-reference": (Lamb16, {"scaling": "absmax", "fused": False}),
    "lamb": (Lamb, {}),
    "lamb-bias-corrected": (Lamb, {"bias_correction": True, "max_weight_norm": None}),
    "lamb-reference": (Lamb, {"fused": False}),
    "lamb16": (Lamb16, {}),  # block scales of 256: a block a row here
    # Blocks of 4: several a row, 1-D tensors cut inside a block.
    "lamb16-small-blocks": (Lamb16, {"block_size": 4}),
    "lamb16-small-blocks-reference": (Lamb16, {"block_size": 4, "fused": False}),
    # The Triton kernels (under their interpreter, on these CPU tensors) take the pieces as the CPU kernels do.
    "lamb16-triton": (Lamb16, {}),
    "lamb16-absmax-triton": (Lamb16, {"scaling": "absmax"}),
}
STEPS = 4
RUNS_ON, NATIVE_USABLE = triton_kernels.runs_on, lamb16.native.usable
WORLD = 2


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """33 hidden units and one output: FSDP2 splits every tensor unevenly
    (17 and 16 rows), and the last weight (1 row) leaves rank 1 an empty piece."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 1))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(64, 12, generator=gen), torch.randn(64, 1, generator=gen)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args) -> None:
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


def start(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)


def local_batch(rank: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank its share of the global batch."""
    share = len(x) // WORLD
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


# ---------------------------------------------------------------- DDP ----


def ddp_worker(rank: int, port: int, out: str) -> None:
    """Every optimizer of DDP_OPTIMIZERS in turn, in one process group (a spawn
    each would cost seconds of start-up apiece)."""
    start(rank, port)
    try:
        for name, make in DDP_OPTIMIZERS.items():
            model, x, y = model_and_data()
            ddp = nn.parallel.DistributedDataParallel(model)
            train(ddp, make(ddp.parameters(), lr=1e-2, weight_decay=0.01), *local_batch(rank, x, y), STEPS)
            torch.save([p.detach() for p in model.parameters()], Path(out) / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_processes_matches_one_process_with_the_global_batch(tmp_path):
    spawn(ddp_worker, str(tmp_path))
    for name, make in DDP_OPTIMIZERS.items():
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(WORLD)]
        assert all(torch.equal(a, b) for a, b in zip(*ranks)), name  # every rank took the same step
        model, x, y = model_and_data()
        initial = [p.detach().clone() for p in model.parameters()]
        train(model, make(model.parameters(), lr=1e-2, weight_decay=0.01), x, y, STEPS)
        for single, distributed, start in zip(model.parameters(), ranks[0], initial):
            if name == "lamb":
                torch.testing.assert_close(distributed, single.detach(), rtol=1e-4, atol=1e-5, msg=name)
            else:  # the all-reduced gradient's last bits can move an fp8 code a step: see FP8_BOUND
                assert (distributed - single).norm() <= FP8_BOUND * (single.detach() - start).norm(), name


# -------------------------------------------------- DTensor placements ----

# (shape, placement) of each parameter: rows and columns split unevenly, a
# piece left empty, a replicated tensor, a one-element one.
PLACED = [((7, 5), "shard0"), ((5, 7), "shard1"), ((1, 9), "shard0"), ((6, 4), "replicate"), ((1,), "shard0")]
# Block scales lie within rows, which only cuts between rows keep whole: no
# Shard(1); 1-D tensors cut inside a block of 4 (11 = 6 + 5: block [4, 8) on
# both processes; 3 = 2 + 1), and one replicated.
PLACED_IN_ROWS = [((7, 5), "shard0"), ((1, 9), "shard0"), ((6, 4), "replicate"), ((1,), "shard0"),
                  ((11,), "shard0"), ((3,), "shard0"), ((9,), "replicate")]


def placed(setup: str) -> list[tuple[tuple[int, ...], str]]:
    return PLACED_IN_ROWS if SETUPS[setup][1].get("scaling", "block") == "block" else PLACED


def placed_tensors(setup: str, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape, _ in placed(setup)]


def unsharded_run(setup: str) -> tuple[list[torch.Tensor], list[dict]]:
    """The ground truth: the same steps on whole tensors in one process."""
    make, options = SETUPS[setup]
    params = [nn.Parameter(t) for t in placed_tensors(setup, 0)]
    optimizer = make(params, lr=1e-2, weight_decay=0.01, **options)
    for step in range(STEPS):
        for param, grad in zip(params, placed_tensors(setup, step + 1)):
            param.grad = grad
        optimizer.step()
    return [p.detach() for p in params], [optimizer.state[p] for p in params]


def placements_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    start(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        kinds = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}
        results = {}
        for setup, (make, options) in SETUPS.items():
            if setup.endswith("triton") and not triton_kernels.importable():
                continue
            triton_only(setup.endswith("triton"))
            placements = [[kinds[kind]] for _, kind in placed(setup)]
            params = [nn.Parameter(distribute_tensor(t, mesh, p))
                      for t, p in zip(placed_tensors(setup, 0), placements)]
            optimizer = make(params, lr=1e-2, weight_decay=0.01, **options)
            gathers = count_gathers_during(optimizer)
            on_triton = lamb16.dispatch.paths.get("triton kernels", 0)
            for step in range(STEPS):
                for param, grad, placement in zip(params, placed_tensors(setup, step + 1), placements):
                    param.grad = distribute_tensor(grad, mesh, placement)
                optimizer.step()
            states = [{k: (v.dtype, whole(v)) for k, v in optimizer.state[p].items()}
                      for p in params]
            results[setup] = ([p.full_tensor() for p in params], states, gathers[0], state_nbytes(optimizer))
            results[f"{setup} on triton"] = lamb16.dispatch.paths.get("triton kernels", 0) - on_triton
        cut_rows = nn.Parameter(distribute_tensor(torch.randn(5, 7), mesh, [Shard(1)]))
        try:
            Lamb16([cut_rows], scaling="block")
        except ValueError as error:
            results["refused"] = str(error)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def triton_only(on: bool) -> None:
    """The steps that follow take the Triton kernels (on CPU tensors: interpreted), or the paths they would."""
    triton_kernels.runs_on = (lambda device: True) if on else RUNS_ON
    lamb16.native.usable = (lambda job, fused: False) if on else NATIVE_USABLE


def whole(t: torch.Tensor) -> torch.Tensor:
    """A state tensor whole, as float32 (gloo gathers no fp8; fp8 -> float32 is exact)."""
    return t.float().full_tensor() if hasattr(t, "full_tensor") else t.float()


def count_gathers_during(optimizer: torch.optim.Optimizer) -> list[int]:
    """A counter of the collectives that optimizer.step() makes (any of torch's
    all-gathers and all-reduces, under any of their names)."""
    count = [0]
    step = optimizer.step
    names = [n for n in ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce") if hasattr(dist, n)]
    originals = {name: getattr(dist, name) for name in names}

    def counting(original):
        def collective(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)
        return collective

    def counted_step(*args, **kwargs):
        for name in names:
            setattr(dist, name, counting(originals[name]))
        try:
            return step(*args, **kwargs)
        finally:
            for name in names:
                setattr(dist, name, originals[name])

    optimizer.step = counted_step
    return count


def test_sharded_and_replicated_dtensors_step_as_whole_tensors(tmp_path):
    """Shard(0), Shard(1) and Replicate on two processes, uneven and empty
    pieces: the weights and every statistic equal the unsharded step to float32
    tolerance, the scales and state dtypes do not depend on the sharding, with
    one all-gather per step for the whole group. Block scales: 1-D tensors cut
    inside a block step as whole ones, and a cut through rows is refused."""
    spawn(placements_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert "must be cut between rows" in ranks[0]["refused"] and "scaling='absmax'" in ranks[0]["refused"]
    for setup in SETUPS:
        if setup not in ranks[0]:  # no Triton here
            continue
        weights, states, gathers, _ = ranks[0][setup]
        assert (ranks[0][f"{setup} on triton"] > 0) == setup.endswith("triton"), setup
        assert gathers == STEPS  # one collective a step, not one per tensor
        for other_weights, _ in [ranks[1][setup][:2]]:  # every rank ends with the same whole tensors
            assert all(torch.equal(a, b) for a, b in zip(weights, other_weights))
        single_weights, single_states = unsharded_run(setup)
        for sharded, single in zip(weights, single_weights):
            torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6, msg=setup)
        for sharded, single in zip(states, single_states):
            assert sharded.keys() == single.keys()
            for key, (dtype, value) in sharded.items():
                assert dtype == single[key].dtype, (setup, key)
                torch.testing.assert_close(value, single[key].float(), rtol=1e-5, atol=1e-6, msg=f"{setup} {key}")


# -------------------------------------------------------------- FSDP2 ----


def fsdp_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model, x, y = model_and_data()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model, x, y


def pieces(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[torch.Tensor]:
    """This rank's pieces of the weights and of every per-element state, as they are stored."""
    local = [p.to_local().clone() for p in model.parameters()]
    for param in model.parameters():
        state = optimizer.state[param]
        local += [v.to_local().clone() if hasattr(v, "to_local") else v.clone() for _, v in sorted(state.items())]
    return local


def fsdp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    start(rank, port)
    try:
        results = {}
        for name, make in {**OPTIMIZERS, "adam": torch.optim.Adam}.items():
            model, x, y = fsdp_model()
            optimizer = make(model.parameters(), lr=1e-2, weight_decay=0.01)
            gathers = count_gathers_during(optimizer)
            x, y = local_batch(rank, x, y)
            train(model, optimizer, x, y, STEPS)
            collectives = gathers[0]
            weights = [p.full_tensor() for p in model.parameters()]
            local_elements = sum(p.to_local().numel() for p in model.parameters())
            nbytes = state_nbytes(optimizer)
            # Save, take two more steps; then a fresh model and optimizer loaded from the checkpoint take the same two.
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=f"{out}/{name}")
            train(model, optimizer, x, y, 2)
            model2, _, _ = fsdp_model()
            optimizer2 = make(model2.parameters(), lr=1e-2, weight_decay=0.01)
            model_state, optimizer_state = get_state_dict(model2, optimizer2)
            loaded = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(loaded, checkpoint_id=f"{out}/{name}")
            set_state_dict(model2, optimizer2, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
            train(model2, optimizer2, x, y, 2)
            results[name] = dict(weights=weights, gathers=collectives, nbytes=nbytes, local_elements=local_elements,
                                 continued=pieces(optimizer, model), resumed=pieces(optimizer2, model2))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_trains_as_one_process_keeps_a_quarter_of_adams_state_and_resumes_bit_for_bit(tmp_path):
    """fully_shard on two processes, every tensor split unevenly (one piece
    empty): the weights after 4 steps equal one process's with the global batch,
    one collective a step; each rank holds 2 bytes per element of its pieces
    (Adam: 8); torch.distributed.checkpoint saves and loads the sharded fp8
    state, and the resumed run continues bit for bit."""
    spawn(fsdp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name, make in OPTIMIZERS.items():
        model, x, y = model_and_data()
        train(model, make(model.parameters(), lr=1e-2, weight_decay=0.01), x, y, STEPS)
        for rank in ranks:
            result = rank[name]
            for sharded, single in zip(result["weights"], model.parameters()):
                torch.testing.assert_close(sharded, single.detach(), rtol=1e-4, atol=1e-5, msg=name)
            assert result["gathers"] == STEPS, (name, result["gathers"])
            assert len(result["continued"]) == len(result["resumed"])
            for continued, resumed in zip(result["continued"], result["resumed"]):
                assert continued.dtype == resumed.dtype and torch.equal(continued, resumed), name
    assert [r["lamb16-absmax"]["local_elements"] for r in ranks] == [17 * 12 + 17 + 33 + 1, 16 * 12 + 16]  # rank 1: no piece of the last layer
    for rank in ranks:
        scalars = (6 + 4) * 4 * 4  # 4 tensors: six 0-dim float32 states (scales, step, statistics), a carry of four
        assert rank["lamb16-absmax"]["nbytes"] == 2 * rank["lamb16-absmax"]["local_elements"] + scalars
    # Block scales, two float32 grids a tensor: each process its rows' of the
    # weights (17 and 16 rows of 3 blocks; 1 row and none of 9), whole ones of
    # the 1-D biases (9 blocks, 1), as their cuts fall inside blocks.
    for rank, (rows, last_rows) in zip(ranks, [(17, 1), (16, 0)]):
        grids = 2 * 4 * (rows * 3 + 9 + last_rows * 9 + 1)
        assert rank["lamb16"]["nbytes"] == 2 * rank["lamb16"]["local_elements"] + 4 * 4 * 8 + grids
        assert rank["lamb"]["nbytes"] == 8 * rank["lamb"]["local_elements"] + 4 * 4 * 4
        assert rank["adam"]["nbytes"] == 8 * rank["adam"]["local_elements"] + 4 * 4


# ------------------------------------------------- cli.py train under torchrun ----

CLI = Path(__file__).parent.parent / "cli.py"
# 300 synthetic images in batches of 70: 5 steps an epoch, the last of 20, all split unevenly (35/35, 10/10).
TRAIN_ARGS = ["--epochs", "2", "--batch-size", "70", "--lr", "0.01", "--log-interval", "2", "--no-download"]


def torchrun_train(optimizer: str, data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(CLI), "train",
               "--optimizer", optimizer, *TRAIN_ARGS, "--data-dir", str(data_dir), "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", LAMB16_DATA_DIR="")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = out.rglob("checkpoint.pt")
    return torch.load(checkpoint, weights_only=False)["model"]


def single_process_weights(optimizer: str, data_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.cli, ["train", "--optimizer", optimizer, *TRAIN_ARGS, "--data-dir", str(data_dir),
                                          "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return final_weights(out)


# Lamb16's fp8 codes turn a last-bit difference (the ranks' partial sums
# added in another order) into a code one step away now and then, and the
# trajectories then part, by an amount that depends on where the flips fall
# (and so on the processor's loops: measured 2.2e-4 of the distance travelled
# under DDP, 1.1e-3 under FSDP2 on AVX2, 6.6e-3 on AVX-512). The bound is what
# the fp8 grid allows rather than what one machine measured: a code one step
# away moves that element's moment, and so its update, by at most one e4m3
# step, 2**-3 of its value; every moment that far off for the whole run moves
# the weights by at most 2**-3 of the distance they travelled. A gradient or
# sharding mistake moves them by the order of the distance itself (DDP
# without its gradient all-reduce: conv1.weight 0.63 of it away). Lamb's
# float32 state is held to float tolerance (measured: 6e-8 at most).
FP8_BOUND = 2.0**-3


# FSDP2 with Lamb16 through the CLI: test_a_run_stopped_in_one_process_resumes_under_fsdp2_on_two.
@pytest.mark.parametrize("mode,optimizer", [("ddp", "lamb16"), ("fsdp", "lamb")])
def test_train_under_torchrun_matches_one_process_with_the_global_batch(mode, optimizer, data_dir, tmp_path,
                                                                        monkeypatch):
    """`torchrun --nproc-per-node 2 cli.py train` (DDP, or FSDP2 with --fsdp):
    one run directory written by rank 0 alone, its log and summary those of one
    run, its weights those of one process with the same global batch, and its
    checkpoint whole."""
    result = torchrun_train(optimizer, data_dir, tmp_path / mode, *(["--fsdp"] if mode == "fsdp" else []))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch  2/2") == 1 and result.stdout.count("run written to") == 1
    (run_dir,) = [p.parent for p in (tmp_path / mode).rglob("config.json")]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parallel"] == mode and config["processes"] == WORLD
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records if r["kind"] == "train"] == [140, 280, 300, 440, 580, 600]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == WORLD

    if mode == "fsdp":  # FSDP2 shards plain layouts only: compare with one process on the same layout
        assert config["channels_last"] is False
        monkeypatch.setattr(loop, "make_model", lambda device, parallel=None: MnistCNN().to(device))
    expected = single_process_weights(optimizer, data_dir, tmp_path / "single")
    torch.manual_seed(1)
    initial = MnistCNN().state_dict()
    for name, weight in final_weights(tmp_path / mode).items():
        if optimizer == "lamb":
            torch.testing.assert_close(weight, expected[name], rtol=1e-4, atol=1e-5, msg=f"{mode} {name}")
        else:
            travelled = (expected[name] - initial[name]).norm()
            assert (weight - expected[name]).norm() <= FP8_BOUND * travelled, (mode, name)


def test_a_run_stopped_in_one_process_resumes_under_fsdp2_on_two(data_dir, tmp_path, monkeypatch):
    """Checkpoints hold whole tensors: a run stopped inside epoch 2 in one
    process resumes with `torchrun ... train --resume RUN --fsdp`, each rank
    taking its pieces of the weights and fp8 state, and ends where the
    uninterrupted run does (to FP8_BOUND)."""
    from experiments.config import RunConfig
    from experiments.data import load_train_and_test
    from experiments.errors import Interrupted
    from experiments.runs import RunDir, run_metadata

    monkeypatch.setattr(loop, "make_model", lambda device, parallel=None: MnistCNN().to(device))  # FSDP2's layout
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    config = RunConfig(optimizer="lamb16", epochs=2, batch_size=70, lr=0.01, log_interval=2)
    runs = {name: RunDir.create(tmp_path / name, run_metadata(config, torch.device("cpu"), data_dir, len(train)))
            for name in ("whole", "cut")}
    loop.train_run(config, runs["whole"], train, test, echo=lambda line: None)
    with pytest.raises(Interrupted):
        loop.train_run(config, runs["cut"], train, test, echo=lambda line: None,
                       stop=StopAtCheck(6))  # the 2nd batch of epoch 2
    assert runs["cut"].summary()["epochs_completed"] == 1

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(CLI), "train", "--resume", str(runs["cut"].path),
               "--fsdp", "--data-dir", str(data_dir), "--no-download"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch 1" in result.stdout and runs["cut"].summary()["status"] == "completed"
    resumed, expected = final_weights(runs["cut"].path), final_weights(runs["whole"].path)
    torch.manual_seed(1)
    initial = MnistCNN().state_dict()
    for name, weight in resumed.items():
        assert (weight - expected[name]).norm() <= FP8_BOUND * (expected[name] - initial[name]).norm(), name

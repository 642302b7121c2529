"""Muon (2-D weights) with AdamW (the rest) as one optimizer: one state_dict
in torch's format, schedulers, deepcopy and resume, as any optimizer."""

import copy
import io
import math

import pytest
import torch
from stops import StopAtCheck
from test_experiments import assert_same_weights_and_state, comparable, new_run

from experiments import registry
from experiments.combined import Combined
from experiments.config import RunConfig
from experiments.data import load_train_and_test
from experiments.errors import Interrupted
from experiments.loop import train_run


class SmallCNN(torch.nn.Module):
    """MnistCNN's kinds of parameter (conv kernels, biases, 2-D weights), small,
    so that these tests take milliseconds a step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 5, stride=4)
        self.fc1 = torch.nn.Linear(4 * 6 * 6, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))).log_softmax(1)


def built() -> tuple[torch.nn.Module, Combined]:
    torch.manual_seed(0)
    model = SmallCNN()
    return model, registry.build("muon", model.parameters(), lr=0.01, weight_decay=0.01)


def steps(model, optimizer, count: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        optimizer.zero_grad()
        model(torch.randn(8, 1, 28, 28, generator=gen)).logsumexp(1).mean().backward()
        optimizer.step()


def test_muon_takes_the_2d_weights_and_adamw_the_rest():
    model, optimizer = built()
    muon, adamw = optimizer.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.ndim == 2}
    assert len([p for g in optimizer.param_groups for p in g["params"]]) == len(list(model.parameters()))
    steps(model, optimizer, 2)
    assert set(optimizer.state) == set(model.parameters())  # one state for both parts


def test_one_state_dict_resumes_bit_for_bit_and_a_scheduler_reaches_both_parts():
    model, optimizer = built()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    steps(model, optimizer, 3)
    scheduler.step()
    assert all(part.param_groups[0]["lr"] == 0.005 for part in optimizer.parts)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    twin_model, twin = built()
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert all(part.state is twin.state for part in twin.parts)
    copied_model, copied = copy.deepcopy((model, optimizer))
    for seed in (5, 6):
        for m, o in ((model, optimizer), (twin_model, twin), (copied_model, copied)):
            steps(m, o, 1, seed)
        for other in (twin_model, copied_model):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_a_muon_run_stopped_midway_resumes_bit_for_bit(data_dir, tmp_path, monkeypatch):
    from experiments import loop

    monkeypatch.setattr(loop, "make_model", lambda device, parallel=None: SmallCNN().to(device))
    train, test = load_train_and_test(data_dir, torch.device("cpu"))
    config = RunConfig(optimizer="muon", epochs=2, batch_size=50, lr=0.01, log_interval=2, schedule="cosine")
    whole = new_run(tmp_path, "whole", config, data_dir, len(train))
    train_run(config, whole, train, test, echo=lambda line: None)
    cut = new_run(tmp_path, "cut", config, data_dir, len(train))
    with pytest.raises(Interrupted):
        train_run(config, cut, train, test, echo=lambda line: None,
                  stop=StopAtCheck(math.ceil(len(train) / config.batch_size) + 2))
    assert train_run(config, cut, train, test, echo=lambda line: None)["status"] == "completed"
    assert comparable(cut.path) == comparable(whole.path)
    assert_same_weights_and_state(cut.path, whole.path)


def test_muon_orthogonalizes_in_float32_on_the_cpu_as_torch_does_in_bfloat16():
    from torch.optim import _muon

    from experiments.combined import CpuMuon, newton_schulz_float32

    original = _muon._zeropower_via_newtonschulz  # the name the float32 path replaces during a CPU step
    update = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz_float32(update, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    theirs = original(update, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    assert ours.dtype == torch.float32 and ours.shape == update.shape
    assert (ours - theirs).norm() / theirs.norm() < 0.02  # bfloat16's rounding, no more
    assert not torch.allclose(ours, theirs, rtol=0, atol=1e-6)  # really float32, not torch's own
    weights = [torch.randn(48, 80, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    for w in weights:
        w.grad = update.clone()
    CpuMuon([weights[0]], lr=0.01).step()
    torch.optim.Muon([weights[1]], lr=0.01).step()
    assert _muon._zeropower_via_newtonschulz is original  # put back after the step
    assert torch.allclose(weights[0], weights[1], atol=2e-4)

"""A group's kernel table kept between steps (lamb16.plans): used whenever it
holds, and a full step wherever anything it depends on changed, with the very
results of steps that keep none."""

import copy

import pytest
import torch
from torch import nn

import lamb16.lamb16
from lamb16 import Lamb16

OPTIONS = [dict(), dict(single_pass=True), dict(scaling="block", block_size=64),
           dict(scaling="block", block_size=64, single_pass=True)]
IDS = ["exact", "1pass", "block", "block-1pass"]


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 200), nn.Tanh(), nn.Linear(200, 3))


def train(net: nn.Module, optimizer: Lamb16, steps: int, seed: int = 1, between=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        optimizer.zero_grad()
        net(torch.randn(16, 30, generator=gen)).square().mean().backward()
        if between is not None:
            between(step)
        optimizer.step()


@pytest.fixture
def full_steps(monkeypatch) -> list[int]:
    """Counts the full steps (the ones that check everything and make a plan)."""
    calls = []
    original = lamb16.lamb16.Lamb16.step_group

    def counting(self, index, *args):
        calls.append(index)
        return original(self, index, *args)

    monkeypatch.setattr(lamb16.lamb16.Lamb16, "step_group", counting)
    return calls


def without_plans(monkeypatch) -> None:
    monkeypatch.setattr(lamb16.plans, "ready", lambda *args: False)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_kept_tables_step_as_full_steps_do(options, full_steps, monkeypatch):
    net, twin = model(), model()
    optimizer = Lamb16(net.parameters(), lr=1e-2, weight_decay=0.01, **options)
    train(net, optimizer, 6)
    assert len(full_steps) == (2 if options.get("single_pass") else 1)  # then the plan: the first step makes one
    without_plans(monkeypatch)
    twin_optimizer = Lamb16(twin.parameters(), lr=1e-2, weight_decay=0.01, **options)
    train(twin, twin_optimizer, 6)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value.view(torch.uint8), twin_optimizer.state[q][key].view(torch.uint8)) \
                if value.dtype.itemsize == 1 else torch.equal(value, twin_optimizer.state[q][key]), key


@pytest.mark.parametrize("change", ["grad dropped", "grad transposed", "param .data", "state replaced", "loaded",
                                    "deepcopy", "weights edited"])
def test_every_change_a_table_depends_on_takes_a_full_step(change, full_steps, monkeypatch):
    """After the change, the step is a full one, and the run equals one that never kept a table."""
    def edit(run_optimizer, net):
        def between(step):
            if step != 3:
                return
            first = net[0].weight
            if change == "grad dropped":
                net[2].bias.grad = None
            elif change == "grad transposed":  # the same values, another layout
                first.grad = first.grad.t().contiguous().t()
            elif change == "param .data":
                first.data = first.data.clone()
            elif change == "state replaced":
                run_optimizer.state[first]["exp_avg"] = run_optimizer.state[first]["exp_avg"].clone()
            elif change == "loaded":
                run_optimizer.load_state_dict(run_optimizer.state_dict())
            elif change == "deepcopy":
                run_optimizer.__setstate__(copy.deepcopy(run_optimizer).__getstate__())
            else:
                with torch.no_grad():
                    first.mul_(0.5)
        return between

    results = []
    for keep in (True, False):
        if not keep:
            without_plans(monkeypatch)
        net = model()
        optimizer = Lamb16(net.parameters(), lr=1e-2, single_pass=True)
        full_steps.clear()
        train(net, optimizer, 6, between=edit(optimizer, net))
        results.append((net, full_steps.copy()))
    (kept, kept_full), (never, _) = results
    assert len(kept_full) >= 3, kept_full  # the first two steps (exact, then single pass), and one after the change
    for p, q in zip(kept.parameters(), never.parameters()):
        assert torch.equal(p, q), change


def test_a_bad_gradient_in_a_later_group_stops_the_step_before_any_group_moves(full_steps):
    net = model()
    optimizer = Lamb16([{"params": net[0].parameters()}, {"params": net[2].parameters()}], lr=1e-2)
    train(net, optimizer, 2)
    before = [p.detach().clone() for p in net.parameters()]
    net[2].weight.grad = net[2].weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))  # the first group's plan did not run

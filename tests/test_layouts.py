"""A parameter whose memory layout changes between steps (a model moved to
channels_last after its first steps, as people do for convolution speed, or
back) is stepped as if it had never moved: the state follows its elements on
every path. And maximize=True climbs, as torch.optim.Adam(maximize=True) does."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lamb16
from lamb16 import Lamb, Lamb16

PATHS = [
    pytest.param(dict(), id="block-kernels"),
    pytest.param(dict(single_pass=True), id="block-1pass-kernels"),
    pytest.param(dict(fused=False), id="block-reference"),
    pytest.param(dict(fused=False, single_pass=True), id="block-1pass-reference"),
    pytest.param(dict(block_size=32), id="block32-kernels"),
    pytest.param(dict(scaling="absmax"), id="absmax-kernels"),
    pytest.param(dict(scaling="absmax", fused=False), id="absmax-reference"),
    pytest.param(dict(scaling="absmax", single_pass=True), id="absmax-1pass-kernels"),
    pytest.param(dict(scaling="seed"), id="seed-kernels"),
]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 16, 3), nn.Flatten(), nn.Linear(16 * 4, 10))


def step_with(model: nn.Module, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    """One step with these gradients (given in logical order), each laid out as its parameter is, as autograd does."""
    for param, grad in zip(model.parameters(), grads):
        param.grad = torch.empty_like(param).copy_(grad)
    optimizer.step()


def gradient_stream(model: nn.Module, steps: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=generator) * 10.0 ** torch.randint(-6, 1, (), generator=generator)
             for p in model.parameters()] for _ in range(steps)]


def assert_same_steps(make, moves: list[torch.memory_format]) -> None:
    """Two copies of a model with the same gradients: one left as it is, the
    other moved to each layout of `moves` in turn between steps. Their weights
    and states must stay equal, element for element."""
    still = small_cnn()
    moving = copy.deepcopy(still)
    a, b = make(still.parameters()), make(moving.parameters())
    stream = gradient_stream(still, 2 + 2 * len(moves))
    for k, grads in enumerate(stream):
        if k >= 2 and k % 2 == 0:
            moving.to(memory_format=moves[(k - 2) // 2])
        step_with(still, a, grads)
        step_with(moving, b, grads)
    assert any(not p.is_contiguous() for p in moving.parameters()) or moves[-1] == torch.contiguous_format
    for p, q in zip(still.parameters(), moving.parameters()):
        assert torch.equal(p, q)
        for key, value in a.state[p].items():
            assert torch.equal(value.float(), b.state[q][key].float()), key


@pytest.mark.parametrize("options", PATHS)
def test_a_model_moved_to_channels_last_after_its_first_steps_steps_as_if_it_had_not(options):
    assert_same_steps(lambda params: Lamb16(params, lr=0.01, weight_decay=0.01, **options), [torch.channels_last])


@pytest.mark.parametrize("options", [PATHS[0], PATHS[5]])
def test_a_model_moved_there_and_back_steps_as_if_it_had_not(options):
    assert_same_steps(lambda params: Lamb16(params, lr=0.01, **options),
                      [torch.channels_last, torch.contiguous_format, torch.channels_last])


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=0.01), lambda ps: Lamb(ps, lr=0.01),
                                  lambda ps: Lamb(ps, lr=0.01, fused=False)], ids=["adam", "lamb", "lamb-reference"])
def test_adam_and_lamb_step_the_same_either_way(make):
    assert_same_steps(make, [torch.channels_last])


def test_the_compiled_path_follows_a_layout_change_too(monkeypatch):
    monkeypatch.setattr(lamb16.native, "usable", lambda tensors, fused: False)
    monkeypatch.setattr(lamb16.compiled, "compiles_on", lambda device: True)
    assert_same_steps(lambda params: Lamb16(params, lr=0.01), [torch.channels_last])


def test_a_layout_change_after_a_state_dict_round_trip_resumes_as_if_it_had_not():
    still = small_cnn()
    moving = copy.deepcopy(still)
    a, b = Lamb16(still.parameters(), lr=0.01), Lamb16(moving.parameters(), lr=0.01)
    stream = gradient_stream(still, 4)
    for grads in stream[:2]:
        step_with(still, a, grads)
        step_with(moving, b, grads)
    saved = copy.deepcopy(b.state_dict())
    moving.to(memory_format=torch.channels_last)
    b = Lamb16(moving.parameters(), lr=0.01)
    b.load_state_dict(saved)
    for grads in stream[2:]:
        step_with(still, a, grads)
        step_with(moving, b, grads)
    assert all(torch.equal(p, q) for p, q in zip(still.parameters(), moving.parameters()))


@pytest.mark.parametrize("make", [
    lambda ps, **kw: Lamb16(ps, lr=0.01, **kw), lambda ps, **kw: Lamb16(ps, lr=0.01, fused=False, **kw),
    lambda ps, **kw: Lamb16(ps, lr=0.01, single_pass=True, **kw), lambda ps, **kw: Lamb(ps, lr=0.01, **kw),
], ids=["lamb16", "lamb16-reference", "lamb16-1pass", "lamb"])
def test_maximize_steps_as_the_negated_gradient_and_leaves_the_gradient_as_it_was(make):
    """maximize=True on gradient g steps as maximize=False on -g, bit for bit,
    and p.grad is g again after the step, as with torch.optim.Adam."""
    up, down = small_cnn(), small_cnn()
    climb, descend = make(up.parameters(), maximize=True), make(down.parameters())
    for grads in gradient_stream(up, 3):
        step_with(up, climb, grads)
        step_with(down, descend, [-g for g in grads])
        assert all(torch.equal(p.grad, g) for p, g in zip(up.parameters(), grads))
    assert all(torch.equal(p, q) for p, q in zip(up.parameters(), down.parameters()))
    loaded = make(small_cnn().parameters())
    loaded.load_state_dict(climb.state_dict())
    assert loaded.param_groups[0]["maximize"] is True


def test_maximize_climbs_an_objective():
    x = torch.zeros(8, requires_grad=True)
    optimizer = Lamb16([x], lr=0.1, maximize=True)
    for _ in range(20):
        optimizer.zero_grad()
        (-(x - 1).pow(2).sum()).backward()  # its maximum is at x = 1
        optimizer.step()
    assert 0.5 < x.mean().item() < 1.5


@pytest.mark.parametrize("cls", [Lamb, Lamb16])
def test_an_invalid_maximize_is_a_clear_error(cls):
    with pytest.raises(ValueError, match="maximize"):
        cls([torch.zeros(2, requires_grad=True)], maximize="yes")


@pytest.mark.parametrize("cls", [Lamb, Lamb16])
def test_a_step_on_meta_parameters_checks_shapes_without_a_warning(cls):
    param = torch.zeros(64, 32, device="meta", requires_grad=True)
    param.grad = torch.zeros(64, 32, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls([param], lr=0.01).step()
    assert param.device.type == "meta"

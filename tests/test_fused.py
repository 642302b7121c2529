"""The compiled (fused) steps against the eager reference, which is the ground truth."""

import warnings

import pytest
import torch
from torch import nn

import lamb16.compiled
import lamb16.lamb16
from lamb16 import Lamb, Lamb16

# Below and above Inductor's 4096-element reduction split, several ranks, and
# the 1-element tensors that always take the reference.
SHAPES = [(3,), (50, 20), (20, 1, 5, 5), (130, 70), (2, 3, 900), (1,), ()]
STEPS = 6

CASES = {
    "lamb16": dict(cls=Lamb16, hyper=dict(weight_decay=0.01)),
    "lamb16-seed": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, scaling="seed")),
    "lamb": dict(cls=Lamb, hyper=dict(weight_decay=0.01)),
    "lamb-bias-correction": dict(cls=Lamb, hyper=dict(bias_correction=True, betas=(0.8, 0.99))),
}


def twin_runs(cls, hyper: dict, shapes=SHAPES, steps: int = STEPS):
    """The same parameters and gradients through fused=True and fused=False,
    with the learning rate changed every step, as a scheduler would."""
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=gen) for shape in shapes]
    fused = [nn.Parameter(t.clone()) for t in initial]
    reference = [nn.Parameter(t.clone()) for t in initial]
    fast_opt = cls(fused, lr=1e-2, fused=True, **hyper)
    ref_opt = cls(reference, lr=1e-2, fused=False, **hyper)
    for step in range(steps):
        for p, q in zip(fused, reference):
            grad = torch.randn(p.shape, generator=gen) * torch.exp(torch.randn(p.shape, generator=gen))
            p.grad, q.grad = grad.clone(), grad.clone()
        fast_opt.step()
        ref_opt.step()
        for opt in (fast_opt, ref_opt):
            opt.param_groups[0]["lr"] = 1e-2 * 0.8 ** (step + 1)
    return fused, reference, fast_opt, ref_opt


def assert_fused_matches_reference(fused, reference, fast_opt, ref_opt) -> None:
    for p, q in zip(fused, reference):
        fast, ref = fast_opt.state[p], ref_opt.state[q]
        assert fast.keys() == ref.keys()
        # Fused kernels sum in another order and contract multiply-adds; a value
        # within float32 noise of an fp8 rounding boundary may then round the
        # other way. That moves a rare fp8 code by one, and through the next
        # steps that element's parameter by a little: nothing else may differ.
        for key in ("exp_avg", "exp_avg_sq"):
            assert fast[key].dtype == ref[key].dtype
            if fast[key].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                codes, ref_codes = fast[key].view(torch.uint8).int(), ref[key].view(torch.uint8).int()
                assert (codes - ref_codes).abs().max() <= 1, key
                assert (codes != ref_codes).float().mean() <= 1e-3, key
            else:
                torch.testing.assert_close(fast[key], ref[key], rtol=1e-4, atol=1e-7)
        off = ~torch.isclose(p, q, rtol=1e-5, atol=1e-6)
        assert off.float().mean() <= 1e-3
        assert (p - q).abs().max() <= 1e-3
        for key in ("exp_avg_scale", "exp_avg_sq_scale", "weight_norm", "adam_norm", "trust_ratio"):
            if key in ref:
                torch.testing.assert_close(fast[key], ref[key], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_matches_reference(case):
    assert_fused_matches_reference(*twin_runs(CASES[case]["cls"], CASES[case]["hyper"]))


@pytest.fixture
def compiled_calls(monkeypatch) -> list[str]:
    """The names of the updates Lamb16 sends down the compiled path."""
    calls: list[str] = []
    original = lamb16.compiled.run_compiled

    def spy(update, *args, **kwargs):
        calls.append(update.__name__)
        return original(update, *args, **kwargs)

    monkeypatch.setattr(lamb16.compiled, "run_compiled", spy)
    return calls


def test_fused_path_is_actually_compiled(compiled_calls):
    twin_runs(Lamb16, dict(weight_decay=0.01), shapes=[(40, 40), (1,)], steps=2)
    assert compiled_calls == ["lamb16_update"] * 2  # the 1-element tensor takes the reference
    assert lamb16.compiled._unavailable is None
    assert lamb16.lamb16.lamb16_update in lamb16.compiled._compiled


def test_new_shapes_and_learning_rates_do_not_recompile():
    twin_runs(Lamb16, dict(weight_decay=0.01), shapes=[(300,), (70, 80)], steps=2)  # warm: both size classes
    torch._dynamo.utils.counters.clear()
    twin_runs(Lamb16, dict(weight_decay=0.01), shapes=[(17,), (9, 9, 9), (5000,), (3, 40, 50)], steps=3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_failed_compilation_falls_back_to_the_reference_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(lamb16.compiled, "_compiled", {})
    monkeypatch.setattr(lamb16.compiled, "_unavailable", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, reference, fast_opt, ref_opt = twin_runs(Lamb16, dict(weight_decay=0.01), shapes=[(30, 4), (8,)])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C compiler found" in messages[0]
    for p, q in zip(fused, reference):
        assert torch.equal(p, q)  # the reference itself ran


def test_fused_false_never_compiles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile must not be called")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(lamb16.compiled, "_compiled", {})
    param = nn.Parameter(torch.randn(100))
    optimizer = Lamb16([param], fused=False)
    param.grad = torch.randn(100)
    optimizer.step()


def test_channels_last_parameters_take_the_fused_path(compiled_calls):
    """A channels-last conv weight keeps that layout in its gradient and fp8 state;
    the fused step must handle it, and match the reference."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin.load_state_dict(conv.state_dict())
    fast_opt = Lamb16(conv.parameters(), lr=1e-2, fused=True)
    ref_opt = Lamb16(twin.parameters(), lr=1e-2, fused=False)
    x = torch.randn(4, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        for model, opt in ((conv, fast_opt), (twin, ref_opt)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast_opt.state[conv.weight]["exp_avg"].stride() == conv.weight.stride()
    assert compiled_calls.count("lamb16_update") == 6  # weight and bias, three steps
    assert_fused_matches_reference(list(conv.parameters()), list(twin.parameters()), fast_opt, ref_opt)

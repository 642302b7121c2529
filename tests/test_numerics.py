"""Lamb and Lamb16 against float64 re-statements of the spec, and on real training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lamb16 import Lamb, Lamb16
from lamb16.quantize import E4M3, E5M2, dequantize, store_absmax, store_seed

from reference import lamb16_reference, lamb_reference

SHAPES = [(), (7,), (5, 13), (20, 1, 5, 5), (64, 50)]
STEPS = 30


def gradient_stream(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Gradients whose scale varies per element and drifts over steps, as real ones do."""
    gen = torch.Generator().manual_seed(seed)
    element_scale = torch.exp(torch.randn(shape, generator=gen))
    bias = torch.randn(shape, generator=gen)
    return [
        (bias + torch.randn(shape, generator=gen)) * element_scale * 0.97**t * 1e-2
        for t in range(STEPS)
    ]


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Close to float64, with an absolute tolerance that follows the tensor's own
    scale (elements near zero come out of cancellation)."""
    expected = expected.to(torch.float32)
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def run_optimizer(optimizer_cls, param0, grads, **hyper) -> tuple[torch.Tensor, dict]:
    param = param0.clone().requires_grad_(True)
    # The reference path; test_fused.py holds the fused path to it.
    optimizer = optimizer_cls([param], fused=False, **hyper)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    return param.detach(), optimizer.state[param]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=1e-3),
        dict(lr=2e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.1, bias_correction=True),
        dict(lr=1e-2, weight_decay=0.01, adam=True),
        dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-8),
    ],
)
def test_lamb_matches_float64_reference(shape, hyper):
    param0 = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.3
    grads = gradient_stream(shape, seed=2)

    param, state = run_optimizer(Lamb, param0, grads, **hyper)
    expected = lamb_reference(param0, grads, **hyper)

    for key in ("exp_avg", "exp_avg_sq", "weight_norm", "adam_norm", "trust_ratio"):
        assert_close_to(state[key], expected[key])
    assert_close_to(param, expected["param"])


@pytest.mark.parametrize("fused", [False, None])
def test_lamb_without_weight_norm_clamp_is_the_papers_lamb(fused):
    """Bias-corrected, trust ratio ||w|| / ||u|| unclamped: on a tensor of norm 12
    the default clamp at 10 departs from it, max_weight_norm=None does not."""
    gen = torch.Generator().manual_seed(5)
    param0 = torch.randn(300, 200, generator=gen)
    param0 *= 12 / param0.norm()
    grads = [torch.randn(300, 200, generator=gen) * 1e-2 for _ in range(20)]
    hyper = dict(lr=1e-2, weight_decay=0.01, bias_correction=True)
    param = param0.clone().requires_grad_(True)
    optimizer = Lamb([param], max_weight_norm=None, fused=fused, **hyper)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    expected = lamb_reference(param0, grads, max_weight_norm=None, **hyper)
    assert_close_to(param.detach(), expected["param"])
    assert_close_to(optimizer.state[param]["weight_norm"], expected["weight_norm"])
    clamped = lamb_reference(param0, grads, **hyper)["param"]
    distance = (expected["param"] - param0.double()).norm()
    assert (clamped - expected["param"]).norm() > 0.1 * distance  # the option matters here


def test_invalid_max_weight_norm_is_refused():
    with pytest.raises(ValueError, match="Invalid max_weight_norm value: 0"):
        Lamb([nn.Parameter(torch.zeros(2))], max_weight_norm=0)


@pytest.mark.parametrize("scaling", ["seed", "absmax", "block"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=1e-3),
        dict(lr=2e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.01, trust_scale=0.618, betas=(0.8, 0.99)),
    ],
)
def test_lamb16_matches_float64_reference(scaling, shape, hyper):
    param0 = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.3
    grads = gradient_stream(shape, seed=4)

    # Block scales in blocks of 8: several a row, the last one short (13 and 50 elements).
    blocks = dict(block_size=8) if scaling == "block" else {}
    param, state = run_optimizer(Lamb16, param0, grads, scaling=scaling, **blocks, **hyper)
    expected = lamb16_reference(param0, grads, scaling=scaling, **blocks, **hyper)

    # Small blocks make many more scales, and so more elements that float32 and
    # float64 round to neighbouring codes for a step (measured: one code, once
    # in 30 steps, moving its weight by 1.7e-5 of the largest weight).
    assert_close_to(param, expected["param"], rtol=1e-4 if scaling == "block" else 1e-5)
    assert state["exp_avg"].dtype == E4M3 and state["exp_avg_sq"].dtype == E5M2
    # fp8 codes may differ only where float32 and float64 land on either side of
    # a rounding boundary: a handful of elements, by one code.
    for key in ("exp_avg", "exp_avg_sq"):
        codes = state[key].view(torch.uint8).int()
        expected_codes = expected[key].view(torch.uint8).int()
        assert (codes - expected_codes).abs().max() <= 1
        assert (codes != expected_codes).float().mean() <= 0.01
    for key in ("exp_avg_scale", "exp_avg_sq_scale", "weight_norm", "adam_norm", "trust_ratio"):
        assert_close_to(state[key], expected[key])


class TinyCNN(nn.Module):
    """A small CNN whose layer sizes span two orders of magnitude, like the MNIST one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5)  # 200 weights
        self.fc1 = nn.Linear(8 * 6 * 6, 64)  # 18,432 weights
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x.flatten(1)))), dim=1)


def cnn_gradient_run(scaling: str, steps: int) -> dict[str, dict[str, float]]:
    """Train TinyCNN with Lamb16 on a learnable synthetic task; alongside, keep
    float32 LAMB moments fed the very same gradients. Per weight tensor, return
    the relative error of Lamb16's stored moments against them (`drift_*`), and
    of a one-shot fp8 store of the float32 moments (`store_*`)."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 1, 16, 16, generator=gen)
    torch.manual_seed(0)
    model = TinyCNN()
    optimizer = Lamb16(model.parameters(), lr=1e-2, weight_decay=0.01, scaling=scaling)
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in weights.items()}
    beta1, beta2 = optimizer.defaults["betas"]
    for _ in range(steps):
        labels = torch.randint(0, 10, (64,), generator=gen)
        images = templates[labels] + torch.randn(64, 1, 16, 16, generator=gen)
        optimizer.zero_grad()
        F.nll_loss(model(images), labels).backward()
        optimizer.step()
        for name, p in weights.items():
            m, v = moments[name]
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    def rel(approx: torch.Tensor, exact: torch.Tensor) -> float:
        return ((approx - exact).norm() / exact.norm()).item()

    errors = {}
    for name, p in weights.items():
        m, v = moments[name]
        state = optimizer.state[p]
        m8, v8 = torch.empty_like(m, dtype=E4M3), torch.empty_like(v, dtype=E5M2)
        if scaling == "seed":
            m_scale, v_scale = store_seed(m, v, m8, v8, optimizer.defaults["eps"])
        else:
            m_scale, v_scale = store_absmax(m, v, m8, v8)
        errors[name] = dict(
            store_m=rel(dequantize(m8, m_scale), m),
            store_v=rel(dequantize(v8, v_scale), v),
            drift_m=rel(dequantize(state["exp_avg"], state["exp_avg_scale"]), m),
            drift_v=rel(dequantize(state["exp_avg_sq"], state["exp_avg_sq_scale"]), v),
        )
    return errors


def test_default_scaling_keeps_moments_of_real_cnn_gradients(capsys):
    absmax = cnn_gradient_run("absmax", steps=60)
    seed = cnn_gradient_run("seed", steps=60)
    with capsys.disabled():
        for name in absmax:
            print(f"\n  {name}: absmax {absmax[name]}\n  {'':{len(name)}}  seed   {seed[name]}")
    for name, err in absmax.items():
        # One store of float32 moments: the fp8 formats' own resolution.
        assert err["store_m"] <= 0.05, name
        assert err["store_v"] <= 0.10, name
        # Over the stream, rounding errors accumulate through the moving averages;
        # v drifts most (2 mantissa bits against 0.1% increments per step).
        assert err["drift_m"] <= 0.10, name
        assert err["drift_v"] <= 0.30, name
    # The seed arithmetic saturates the first moment of the larger layer.
    assert seed["fc1.weight"]["store_m"] >= 0.5
    assert seed["fc1.weight"]["drift_m"] >= 0.5


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: Lamb(ps, lr=1e-2),
        lambda ps: Lamb16(ps, lr=1e-2),
        lambda ps: Lamb16(ps, lr=1e-2, scaling="seed"),
    ],
    ids=["adam", "lamb", "lamb16", "lamb16-seed"],
)
def test_every_optimizer_lowers_the_loss(make_optimizer):
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = x[:, :1] * 2 - x[:, 1:2].sin()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = make_optimizer(model.parameters())
    initial = F.mse_loss(model(x), y).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    assert F.mse_loss(model(x), y).item() < 0.1 * initial


def test_absmax_store_keeps_v_positive_across_its_whole_range():
    # v spans the square of the gradient's range: 1e-12 is far below e5m2's
    # 2**-16 relative to the largest element, yet must not become 0 (its next
    # update would be m / eps).
    v = torch.tensor([4.0, 1e-3, 1e-8, 1e-12, 0.0])
    m = torch.tensor([-3.0, 0.5, 1e-3, 1e-7, 0.0])
    m8, v8 = torch.empty(5, dtype=E4M3), torch.empty(5, dtype=E5M2)
    m_scale, v_scale = store_absmax(m, v, m8, v8)
    v_back = dequantize(v8, v_scale)
    assert (v_back[:4] > 0).all()
    assert v_back[0] == 4.0  # the largest element is exact: it maps to 57344
    assert dequantize(m8, m_scale)[0] == -3.0  # likewise for m at 448
    assert v_back[3] >= 1e-12  # rounded up to the floor, never down to zero


def test_all_zero_moments_store_without_dividing_by_zero():
    zeros = torch.zeros(10)
    m8, v8 = torch.empty(10, dtype=E4M3), torch.empty(10, dtype=E5M2)
    for store in (store_absmax, lambda m, v, a, b: store_seed(m, v, a, b, 1e-6)):
        m_scale, v_scale = store(zeros, zeros, m8, v8)
        assert torch.isfinite(m_scale) and m_scale > 0
        assert torch.isfinite(v_scale) and v_scale > 0
        assert (dequantize(m8, m_scale) == 0).all()
        assert torch.isfinite(dequantize(v8, v_scale)).all()


def test_zero_gradients_from_the_start_leave_parameters_finite():
    param = torch.nn.Parameter(torch.randn(50))
    optimizer = Lamb16([param], lr=1e-2)
    for _ in range(3):
        param.grad = torch.zeros(50)
        optimizer.step()
    assert torch.isfinite(param).all()

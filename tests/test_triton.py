"""Lamb16's Triton kernels (lamb16.triton_kernels) held to the reference:
on CUDA where a GPU is, else on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py). `pytest -k triton` selects them.

Every kernel computes each element as the reference does with correctly
rounded arithmetic (the reference here takes its square root in float64, which
rounds to float32 exactly as IEEE sqrt does; torch's vectorized float32 sqrt
on some CPUs is a last bit off), so given the same sums it writes the same
weights, codes and scales bit for bit. Its sums add in another order: the
norms, and through the trust ratio the step size, agree to float32 rounding."""

import copy
import math
import warnings

import pytest
import torch
from optimizer_cases import CASES
from test_fused import assert_fused_matches_reference

import lamb16.native
import lamb16.updates as updates
from lamb16 import Lamb16, triton_kernels

pytestmark = pytest.mark.skipif(not triton_kernels.importable(), reason="Triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# One element, short rows of one block, rows of several blocks with a short last one, a conv weight.
SHAPES = [(3,), (50, 20), (20, 1, 5, 5), (130, 70), (2, 3, 300), (1,)]
# The contract table's Lamb16 option sets that take a fused path.
OPTION_SETS = {case.name: case for case in CASES if case.optimizer is Lamb16 and case.options.get("fused") is not False}
# Whole steps over several: one set of each kind of step (the passes above take every set).
STEP_SETS = ["lamb16", "lamb16-1pass", "lamb16-absmax", "lamb16-absmax-1pass", "lamb16-seed", "lamb16-small-blocks",
             "lamb16-1pass-tensor-lr"]


def exact_adam_direction(m, v, param, eps, weight_decay):
    return m / (v.double().sqrt().float() + eps) + param * weight_decay


@pytest.fixture
def on_triton(monkeypatch):
    """Lamb16's fused steps on the Triton kernels (on CPU tensors: interpreted),
    against a reference with a correctly rounded square root."""
    monkeypatch.setattr(triton_kernels, "runs_on", lambda device: True)
    monkeypatch.setattr(lamb16.native, "usable", lambda job, fused: False)
    monkeypatch.setattr(updates, "adam_direction", exact_adam_direction)
    from lamb16.triton_kernels import launch

    launch.launches.clear()
    return launch


def gradients(shapes, generator: torch.Generator) -> list[torch.Tensor]:
    """Gradients over many decades, with a NaN and an infinity among them."""
    grads = [torch.randn(s, generator=generator) * torch.exp(3 * torch.randn(s, generator=generator)) for s in shapes]
    grads[1].view(-1)[7], grads[3].view(-1)[11] = float("nan"), float("inf")
    return [g.to(DEVICE) for g in grads]


def twin_optimizers(case, shapes=SHAPES, steps: int = 3, **options):
    """Parameters stepped `steps` times by the reference, and a copy of them and their optimizer."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(DEVICE)) for s in shapes]
    reference = case(params, lr=1e-2, **dict(options, fused=False))
    for _ in range(steps):
        for p, g in zip(params, gradients(shapes, generator)):
            p.grad = g
        reference.step()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = case(twins, lr=1e-2, **options)
    fast.load_state_dict(copy.deepcopy(reference.state_dict()))
    fast.param_groups[0]["fused"] = case.options.get("fused")  # the state_dict brought the reference's fused=False
    for p, q in zip(params, twins):
        q.grad = p.grad
    return params, reference, twins, fast, generator


def jobs_of(optimizer: Lamb16, params) -> list:
    """The exact step's jobs of a group, as Lamb16.step_group makes them."""
    jobs = []
    for p in params:
        state = optimizer.state[p]
        inputs = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["exp_avg_scale"], state["exp_avg_sq_scale"])
        jobs.append((inputs, (*inputs[4:], state["weight_norm"], state["adam_norm"], state["trust_ratio"]), {}))
    return jobs


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a.view(torch.int32),
                       b.view(torch.uint8) if b.dtype.itemsize == 1 else b.view(torch.int32)), what


def test_triton_encoders_write_torchs_codes_for_every_float32_class():
    """Every e4m3fn and e5m2 value, every midpoint between neighbours (ties to
    even) and a float either side of it, values past the largest (e4m3fn
    saturates at 448, e5m2 overflows to infinity), subnormals of both formats
    and of float32, zeros of either sign, infinities and NaNs; and every code
    decoded."""
    from lamb16.triton_kernels.fp8 import codec

    values = []
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        finite = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        finite = finite[torch.isfinite(finite)].unique()
        middles = ((finite[1:].double() + finite[:-1].double()) / 2).float()
        values += [finite, middles, torch.nextafter(middles, torch.tensor(math.inf)),
                   torch.nextafter(middles, torch.tensor(-math.inf))]
    special = torch.tensor([0.0, math.inf, math.nan, 448, 464, 480, 500, 1e30, 3.4e38, 57344, 61439.99, 61440, 61441,
                            1e-45, 1e-40, 2.0**-126, 2.0**-10, 2.0**-17, 2.0**-18])
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(20_000, generator=generator) * 10.0 ** torch.randint(-14, 10, (20_000,), generator=generator)
    x = torch.cat(values + [special, -special, spread])
    codes = torch.arange(256, dtype=torch.uint8).repeat(-(-x.numel() // 256))[: x.numel()]
    e4m3, e5m2, decoded = codec(x.to(DEVICE), codes.to(DEVICE))
    assert torch.equal(e4m3.cpu(), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(e5m2.cpu(), x.to(torch.float8_e5m2).view(torch.uint8))
    for column, dtype in enumerate((torch.float8_e4m3fn, torch.float8_e5m2)):
        expected = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        got = decoded[:256, column].cpu()
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got[~got.isnan()].view(torch.int32), expected[~expected.isnan()].view(torch.int32))


@pytest.mark.parametrize("name", [n for n, c in OPTION_SETS.items() if not c.options.get("single_pass")])
@torch.no_grad()
def test_triton_exact_step_passes_match_the_reference_bit_for_bit_given_its_sums(name, on_triton):
    """Pass 1's sums against the reference's; pass 2, given the reference's
    finished statistics, writes the very weights, codes and scales."""
    case = OPTION_SETS[name]
    params, reference, twins, fast, _ = twin_optimizers(case)
    group = reference.param_groups[0]
    hyper = lamb16.lamb16.lamb16_hyperparameters(group)
    moments = {k: hyper[k] for k in ("beta1", "beta2", "eps", "weight_decay", "block_size", "scaling") if k in hyper}
    jobs, reference_jobs = jobs_of(fast, twins), jobs_of(reference, params)
    block = "block_size" in moments
    partials = (updates.lamb16_block_partials if block else updates.lamb16_partials)
    expected = [partials(*job[0], **moments) for job in reference_jobs]
    if block:
        sums = on_triton.lamb16_block_partials(jobs, **moments)
        torch.testing.assert_close(sums, torch.stack([e[0] for e in expected]), rtol=2e-6, atol=0)
        finished = torch.stack([torch.stack([*updates.norms_and_trust(e[0][0], e[0][1], p.numel(), hyper["trust_lr"],
                                                                       hyper["trust_scale"])]) for e, p in
                                zip(expected, params)])
        finished = torch.cat([finished, finished[:, 2:3] * hyper["lr"]], dim=1)
        on_triton.lamb16_block_applies(jobs, finished, **moments)
        for (inputs, _, _), e, row in zip(reference_jobs, expected, finished):
            scales = updates.absmax_scales_from_maxima(e[1], e[2])
            updates.lamb16_block_apply(*inputs, *scales, row[3], **moments)
            inputs[4].copy_(scales[0]), inputs[5].copy_(scales[1])
    else:
        sums = on_triton.lamb16_partials(jobs, **moments)
        torch.testing.assert_close(sums, torch.stack(expected), rtol=2e-6, atol=0)
        results = updates.lamb16_finish(torch.stack(expected), torch.tensor([float(p.numel()) for p in params]),
                                        trust_lr=hyper["trust_lr"], eps=hyper["eps"], trust_scale=hyper["trust_scale"],
                                        scaling=hyper["scaling"])
        finished = torch.stack([*results, results[4] * hyper["lr"]], dim=1)
        on_triton.lamb16_applies(jobs, finished, **moments)
        for (inputs, _, _), row in zip(reference_jobs, finished):
            updates.lamb16_apply(*inputs, row[0], row[1], row[5], **moments)
            inputs[4].copy_(row[0]), inputs[5].copy_(row[1])
    for p, q in zip(params, twins):
        assert_same_bits(q.detach(), p.detach(), f"{name}: weights")
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            assert_same_bits(fast.state[q][key], reference.state[p][key], f"{name}: {key}")


@pytest.mark.parametrize("name", [n for n, c in OPTION_SETS.items() if c.options.get("single_pass")])
def test_triton_single_pass_matches_the_reference_bit_for_bit(name, on_triton):
    """From the same carry the single pass knows its step before it starts:
    weights, codes, scales and trust ratio bit for bit; the carried norms to
    float32 rounding."""
    case = OPTION_SETS[name]
    params, reference, twins, fast, _ = twin_optimizers(case)
    for q in twins:  # the loaded carry is for these very weights: taken as an uninterrupted run takes its own
        fast.carried[q] = q._version
    reference.step()
    fast.step()
    assert on_triton.launches.get("block_single_pass_kernel", 0) + on_triton.launches.get(
        "tensor_single_pass_kernel", 0) == 1
    for p, q in zip(params, twins):
        assert_same_bits(q.detach(), p.detach(), f"{name}: weights")
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale", "trust_ratio", "weight_norm"):
            assert_same_bits(fast.state[q][key], reference.state[p][key], f"{name}: {key}")
        torch.testing.assert_close(fast.state[q]["adam_norm"], reference.state[p]["adam_norm"], rtol=2e-6, atol=0)
        torch.testing.assert_close(fast.state[q]["carry"], reference.state[p]["carry"], rtol=2e-6, atol=0)


@pytest.mark.parametrize("name", STEP_SETS)
def test_triton_steps_follow_the_reference_over_several_steps(name, on_triton):
    """Whole optimizer steps on the kernels against fused=False, the learning
    rate changing as a scheduler would, as the CPU kernels are held."""
    case = OPTION_SETS[name]
    generator = torch.Generator().manual_seed(1)
    initial = [torch.randn(s, generator=generator) for s in SHAPES]
    fused = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in initial]
    reference = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in initial]
    fast_opt, ref_opt = case(fused, lr=1e-2, weight_decay=0.01), case(reference, lr=1e-2, weight_decay=0.01,
                                                                       fused=False)
    for step in range(3):
        for p, q, g in zip(fused, reference, gradients(SHAPES, generator)):
            p.grad, q.grad = g.clone(), g.clone()
        fast_opt.step()
        ref_opt.step()
        for opt in (fast_opt, ref_opt):
            if not isinstance(opt.param_groups[0]["lr"], torch.Tensor):
                opt.param_groups[0]["lr"] = 1e-2 * 0.8 ** (step + 1)
    assert sum(on_triton.launches.values()) > 0
    assert_fused_matches_reference(fused, reference, fast_opt, ref_opt)


def test_triton_takes_a_whole_group_in_a_few_launches_whatever_its_size(on_triton):
    """40 tensors or 4: an exact step is three launches (pass 1, the sums, pass 2)."""
    for count in (4, 40):
        params = [torch.nn.Parameter(torch.randn(30, 7, device=DEVICE)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = Lamb16(params, lr=1e-2)
        on_triton.launches.clear()
        optimizer.step()
        assert on_triton.launches == {"block_partials_kernel": 1, "segments_kernel": 1, "block_apply_kernel": 1}


def test_triton_steps_channels_last_weights_in_their_memory_order(on_triton):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 3, 5, 5, generator=generator).to(DEVICE).to(memory_format=torch.channels_last)
    fused, reference = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    fast_opt, ref_opt = Lamb16([fused], lr=1e-2), Lamb16([reference], lr=1e-2, fused=False)
    for _ in range(3):
        grad = torch.randn(weight.shape, generator=generator).to(DEVICE).to(memory_format=torch.channels_last)
        fused.grad, reference.grad = grad.clone(), grad.clone()
        fast_opt.step()
        ref_opt.step()
    assert on_triton.launches["block_apply_kernel"] == 3
    assert_fused_matches_reference([fused], [reference], fast_opt, ref_opt)


def test_a_triton_failure_warns_once_and_the_step_takes_another_path(on_triton, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such GPU")

    monkeypatch.setattr(on_triton, "launch", broken)
    monkeypatch.setattr(triton_kernels, "_unavailable", None)
    params = [torch.nn.Parameter(torch.randn(20, 30, device=DEVICE)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = q.grad = torch.randn_like(p)
    optimizer = Lamb16(params, lr=1e-2)
    with pytest.warns(RuntimeWarning, match="the Triton kernels failed \\(RuntimeError: no such GPU\\)"):
        optimizer.step()
    reference = Lamb16(twins, lr=1e-2, fused=False)
    reference.step()
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(params, twins))
    assert not triton_kernels.usable(((params[0], params[0].grad, *[torch.zeros(1)] * 4), (), {}), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # no second warning


def test_triton_kernels_serve_cuda_tensors_only_by_default():
    job = ((torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float8_e4m3fn),
            torch.zeros(4, dtype=torch.float8_e5m2), torch.ones(()), torch.ones(())), (), {})
    assert not triton_kernels.usable(job, None)  # a CPU tensor: the CPU kernels' (or the tests' interpreter's)

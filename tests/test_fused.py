"""The fused steps against the eager reference, which is the ground truth: the CPU
kernels (lamb16.native, the default here) and the torch.compile path (what CUDA
runs, checked here on the CPU)."""

import _ctypes
import ctypes
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lamb16.compiled
import lamb16.lamb16
import lamb16.native
from lamb16 import Lamb, Lamb16

# Below and above Inductor's 4096-element reduction split and the kernels'
# 2048-element chunks, one large enough for the kernels' threads (32768),
# several ranks, and 1-element tensors.
SHAPES = [(3,), (50, 20), (20, 1, 5, 5), (130, 70), (2, 3, 900), (256, 160), (1,), ()]
STEPS = 6

CASES = {
    "lamb16": dict(cls=Lamb16, hyper=dict(weight_decay=0.01)),  # block scales of 256: one or several a row
    "lamb16-absmax": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, scaling="absmax")),
    "lamb16-seed": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, scaling="seed")),
    "lamb": dict(cls=Lamb, hyper=dict(weight_decay=0.01)),
    "lamb-bias-correction": dict(cls=Lamb, hyper=dict(bias_correction=True, betas=(0.8, 0.99))),
    # The paper's LAMB: most SHAPES have a norm above 10, where the default clamp acts.
    "lamb-no-weight-clamp": dict(cls=Lamb, hyper=dict(bias_correction=True, max_weight_norm=None, weight_decay=0.01)),
    "lamb16-1pass": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, single_pass=True)),
    "lamb16-absmax-1pass": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, scaling="absmax", single_pass=True)),
    "lamb16-seed-1pass": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, scaling="seed", single_pass=True)),
    # Blocks of 64: rows of one block, of several with a short last one (70 = 64 + 6), of many.
    "lamb16-small-blocks": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, block_size=64)),
    "lamb16-small-blocks-1pass": dict(cls=Lamb16, hyper=dict(weight_decay=0.01, block_size=64, single_pass=True)),
}


def kernel_calls(case: str, tensors: int, steps: int = STEPS) -> list[tuple[str, int]]:
    """The kernel calls a case makes: one a step, for every tensor (a
    single-pass Lamb16's first step is exact)."""
    if CASES[case]["cls"] is Lamb:
        return [("lamb_steps", tensors)] * steps
    prefix = "lamb16_block" if CASES[case]["hyper"].get("scaling", "block") == "block" else "lamb16"
    if CASES[case]["hyper"].get("single_pass"):
        return [(f"{prefix}_steps", tensors)] + [(f"{prefix}_single_pass_steps", tensors)] * (steps - 1)
    return [(f"{prefix}_steps", tensors)] * steps


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
                # atol: where m cancels to near 0, a last-bit difference in (1 - beta1) shows
                torch.testing.assert_close(fast[key], ref[key], rtol=1e-4, atol=1e-6)
        off = ~torch.isclose(p, q, rtol=1e-5, atol=1e-6)
        assert off.float().mean() <= 1e-3
        assert (p - q).abs().max() <= 1e-3
        for key in ("exp_avg_scale", "exp_avg_sq_scale", "weight_norm", "adam_norm", "trust_ratio", "carry"):
            if key in ref:
                torch.testing.assert_close(fast[key], ref[key], rtol=1e-4, atol=1e-9)


@pytest.fixture
def compiled_on_cpu(monkeypatch) -> None:
    """Send CPU tensors down the torch.compile path (CUDA's), not the CPU kernels."""
    monkeypatch.setattr(lamb16.native, "usable", lambda tensors, fused: False)
    monkeypatch.setattr(lamb16.compiled, "compiles_on", lambda device: True)


@pytest.fixture
def native_calls(monkeypatch) -> list[tuple[str, int]]:
    """The kernels the optimizers call, each with the number of tensors it took."""
    calls: list[tuple[str, int]] = []
    run_lamb16, lamb_steps = lamb16.native.run_lamb16, lamb16.native.lamb_steps

    def spy_lamb16(kernel, table, count, **kwargs):  # every Lamb16 step kernel, with a table made now or kept
        calls.append((kernel, count))
        return run_lamb16(kernel, table, count, **kwargs)

    def spy_lamb(jobs, **kwargs):
        calls.append(("lamb_steps", len(jobs)))
        return lamb_steps(jobs, **kwargs)

    monkeypatch.setattr(lamb16.native, "run_lamb16", spy_lamb16)
    monkeypatch.setattr(lamb16.native, "lamb_steps", spy_lamb)
    return calls


@pytest.fixture(params=lamb16.native.LOOPS[::-1])
def loops(request) -> str:
    """Each test with it runs on every set of the kernels' loops: the
    hand-vectorized ones (each skipped where the processor lacks it) and the
    portable ones."""
    widest = lamb16.native.loops()
    if not lamb16.native.use_loops(request.param):
        pytest.skip(f"no {request.param} loops on this machine")
    yield request.param
    lamb16.native.use_loops(widest)


@pytest.fixture
def compiled_calls(monkeypatch) -> list[tuple[str, int]]:
    """The compiled calls the optimizers make: each update's name, with the
    number of tensors the call took."""
    calls: list[tuple[str, int]] = []
    original = lamb16.compiled.run_group

    def spy(update, jobs, **kwargs):
        calls.append((update.__name__, len(jobs)))
        return original(update, jobs, **kwargs)

    monkeypatch.setattr(lamb16.compiled, "run_group", spy)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernels_match_reference(case, native_calls, loops):
    assert lamb16.native.loops() == loops
    assert_fused_matches_reference(*twin_runs(CASES[case]["cls"], CASES[case]["hyper"]))
    assert native_calls == kernel_calls(case, len(SHAPES))


# Each under the kernels' 32768 elements for splitting one tensor across
# threads, together over it: the small tensors are shared out whole.
SMALL_MANY = [(100, 50)] * 7 + [(3000,), (7,), (256, 160)]


@pytest.mark.parametrize("case", ["lamb16", "lamb-bias-correction", "lamb16-1pass", "lamb16-absmax-1pass"])
def test_cpu_kernels_share_out_many_small_tensors_as_the_reference(case, native_calls, loops):
    assert_fused_matches_reference(*twin_runs(CASES[case]["cls"], CASES[case]["hyper"], shapes=SMALL_MANY))


def test_a_tensor_the_kernels_cannot_take_runs_the_reference_beside_them(native_calls):
    """A transposed (non-dense) weight goes to the reference; the others still
    take the kernels, and every result is the reference's."""
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(30, 40, generator=gen), torch.randn(40, generator=gen)]
    fused = [nn.Parameter(initial[0].clone().t()), nn.Parameter(initial[1].clone())]
    reference = [nn.Parameter(initial[0].clone().t()), nn.Parameter(initial[1].clone())]
    assert not fused[0].is_contiguous()
    fast_opt, ref_opt = Lamb16(fused, lr=1e-2, fused=True), Lamb16(reference, lr=1e-2, fused=False)
    for _ in range(3):
        for p, q in zip(fused, reference):
            p.grad = q.grad = torch.randn(p.shape, generator=gen)
        fast_opt.step()
        ref_opt.step()
    assert native_calls == [("lamb16_block_steps", 1)] * 3
    assert torch.equal(fused[0], reference[0])  # the reference itself ran on it
    assert_fused_matches_reference(fused, reference, fast_opt, ref_opt)


# Every rank of tensor and a 0-dim one; each case compiles its own graphs (about
# 5-30 s apiece on 2 cores), so bias correction is tried with the clamp off alone.
COMPILED_SHAPES = [(3,), (50, 20), (20, 1, 5, 5), (2, 3, 90), ()]


@pytest.mark.parametrize("case", [case for case in CASES if case != "lamb-bias-correction"])
def test_compiled_step_matches_reference(case, compiled_on_cpu):
    assert_fused_matches_reference(*twin_runs(CASES[case]["cls"], CASES[case]["hyper"], shapes=COMPILED_SHAPES))


def test_each_tensor_takes_its_own_step_count_for_bias_correction(native_calls, loops):
    """A parameter without a gradient in the first steps lags the others' step
    count; its bias correction must use its own."""
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(20, 10, generator=gen) for _ in range(3)]
    fused = [nn.Parameter(t.clone()) for t in initial]
    reference = [nn.Parameter(t.clone()) for t in initial]
    hyper = dict(lr=1e-2, bias_correction=True, betas=(0.8, 0.99))
    fast_opt, ref_opt = Lamb(fused, fused=True, **hyper), Lamb(reference, fused=False, **hyper)
    for step in range(4):
        for index, (p, q) in enumerate(zip(fused, reference)):
            grad = torch.randn(p.shape, generator=gen) if step >= index else None
            p.grad, q.grad = grad, grad
        fast_opt.step()
        ref_opt.step()
    assert [float(fast_opt.state[p]["step"]) for p in fused] == [4.0, 3.0, 2.0]
    assert native_calls == [("lamb_steps", 1), ("lamb_steps", 2), ("lamb_steps", 3), ("lamb_steps", 3)]
    assert_fused_matches_reference(fused, reference, fast_opt, ref_opt)


BAD_GRADIENTS = {(7, 3): float("nan"), (8, 4): float("inf"), (9, 5): -float("inf"), (10, 6): 1e20, (11, 7): -3e19}


def runs_with_bad_gradients(fused: bool | None, bad: bool, scaling: str) -> tuple[list[nn.Parameter], Lamb16]:
    """Lamb16 on a 300x200 and a 50-element tensor for 4 steps; in step 2 some
    elements of the first gradient are NaN, infinite or square past float32
    (bad=True), or 0 in their place (bad=False). A scaling ending in "-1pass"
    takes single-pass steps."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(300, 200, generator=gen)), nn.Parameter(torch.randn(50, generator=gen))]
    optimizer = Lamb16(params, lr=1e-2, weight_decay=0.01, scaling=scaling.removesuffix("-1pass"), fused=fused,
                       single_pass=scaling.endswith("-1pass"))
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
            if step == 1 and p.dim() == 2:
                for index, value in BAD_GRADIENTS.items():
                    p.grad[index] = value if bad else 0.0
        optimizer.step()
    return params, optimizer


def assert_same_run(a: tuple[list[nn.Parameter], Lamb16], b: tuple[list[nn.Parameter], Lamb16]) -> None:
    for p, q in zip(a[0], b[0]):
        assert torch.equal(p, q)
        for key, value in a[1].state[p].items():
            other = b[1].state[q][key]
            assert torch.equal(value.view(torch.uint8), other.view(torch.uint8)) if value.dtype.itemsize == 1 \
                else torch.equal(value, other), key


def assert_policy_holds(fused: bool, scaling: str) -> None:
    """The policy (lamb16.updates.usable_gradient): a NaN, an infinity or a
    gradient whose square overflows float32 changes nothing but what a zero
    there would, bit for bit, so every weight and moment stays finite."""
    bad = runs_with_bad_gradients(fused, bad=True, scaling=scaling)
    assert_same_run(bad, runs_with_bad_gradients(fused, bad=False, scaling=scaling))
    params, optimizer = bad
    assert all(p.isfinite().all() for p in params)
    assert all(v.float().isfinite().all() for s in optimizer.state.values() for v in s.values())


@pytest.mark.parametrize("scaling", ["absmax", "seed", "block", "absmax-1pass", "seed-1pass", "block-1pass"])
def test_non_finite_and_overflowing_gradients_count_as_zero_on_the_kernels(scaling, loops):
    assert_policy_holds(True, scaling)


@pytest.mark.parametrize("scaling", ["absmax", "seed", "block", "absmax-1pass", "seed-1pass", "block-1pass"])
def test_non_finite_and_overflowing_gradients_count_as_zero_on_the_reference(scaling):
    assert_policy_holds(False, scaling)


@pytest.mark.parametrize("scaling", ["absmax", "seed", "block", "absmax-1pass", "seed-1pass", "block-1pass"])
def test_non_finite_and_overflowing_gradients_count_as_zero_compiled(scaling, compiled_on_cpu):
    assert_policy_holds(True, scaling)


@pytest.mark.parametrize("scaling", ["absmax", "absmax-1pass", "block", "block-1pass"])
def test_kernels_apply_the_gradient_policy_as_the_reference(scaling, loops):
    fast, ref = (runs_with_bad_gradients(f, bad=True, scaling=scaling) for f in (True, False))
    assert_fused_matches_reference(fast[0], ref[0], fast[1], ref[1])


@pytest.mark.parametrize("cls", [Lamb])
def test_cpu_kernels_spread_a_nan_gradient_as_the_reference(cls, loops):
    """For Lamb, as for Adam, a NaN in one gradient element reaches exactly the
    weights and moments it reaches on the reference; the other tensor is
    untouched by it."""
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(300, 200, generator=gen), torch.randn(50, generator=gen)]
    fused = [nn.Parameter(t.clone()) for t in initial]
    reference = [nn.Parameter(t.clone()) for t in initial]
    fast_opt, ref_opt = cls(fused, lr=1e-2, fused=True), cls(reference, lr=1e-2, fused=False)
    for step in range(3):
        for p, q in zip(fused, reference):
            grad = torch.randn(p.shape, generator=gen)
            if step == 1 and p.dim() == 2:
                grad[7, 3] = float("nan")
            p.grad, q.grad = grad.clone(), grad.clone()
        fast_opt.step()
        ref_opt.step()
    poisoned, clean = (fused[0], reference[0]), (fused[1], reference[1])
    assert poisoned[1].isnan().any()
    assert torch.equal(poisoned[0].isnan(), poisoned[1].isnan())
    for key in ("exp_avg", "exp_avg_sq"):
        fast, ref = fast_opt.state[poisoned[0]][key].float(), ref_opt.state[poisoned[1]][key].float()
        assert torch.equal(fast.isnan(), ref.isnan()), key
    torch.testing.assert_close(clean[0], clean[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaling", ["absmax", "block"])
def test_a_first_moment_scale_past_the_hand_vectorized_range_matches_the_reference(scaling, loops):
    """The hand-vectorized loops fold 2**8 into m's scale (through half
    precision), exact for scales up to 2**100. A larger one, from a diverging
    run, must still give the reference's step: such a tensor (with block
    scales: such a block, its neighbours staying on the fast loops) takes the
    portable loops."""
    gen = torch.Generator().manual_seed(0)
    initial = torch.randn(1000, generator=gen)
    fused, reference = nn.Parameter(initial.clone()), nn.Parameter(initial.clone())
    # lr 0: the weights stay put, so that the (huge) update cannot blur the comparison.
    fast_opt, ref_opt = (Lamb16([p], lr=0.0, fused=f, scaling=scaling) for p, f in ((fused, True), (reference, False)))
    small_codes = (torch.randint(0, 2, (1000,), generator=gen) * 2 - 1) * 2.0**-8  # e4m3 subnormals
    for step in range(2):
        grad = torch.randn(1000, generator=gen)
        fused.grad, reference.grad = grad.clone(), grad.clone()
        if step == 1:
            for opt, p in ((fast_opt, fused), (ref_opt, reference)):
                opt.state[p]["exp_avg"] = small_codes.to(torch.float8_e4m3fn)
                opt.state[p]["exp_avg_scale"].view(-1)[0] = 2.0**122  # m near 2**114, finite
        fast_opt.step()
        ref_opt.step()
    assert 2.0**100 < float(ref_opt.state[reference]["exp_avg_scale"].view(-1)[0]) < float("inf")
    assert_fused_matches_reference([fused], [reference], fast_opt, ref_opt)


@pytest.mark.parametrize("magnitude", [1e-12, 1e-3, 1.0, 1e6])  # v = g**2 stays a normal float32
def test_the_largest_moments_are_stored_at_the_top_of_fp8_never_past_it(magnitude, loops):
    """Over its absmax scale, a tensor's largest |m| is 448 and its largest v
    57344, give or take a rounding: the kernels store them as the top codes
    without saturating them first, and must never round one up into NaN."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        p = nn.Parameter(torch.randn(3000, generator=gen))
        opt = Lamb16([p], lr=1e-3)
        for _ in range(2):
            p.grad = torch.randn(3000, generator=gen) * torch.exp(2 * torch.randn(3000, generator=gen)) * magnitude
            opt.step()
        m_codes = opt.state[p]["exp_avg"].view(torch.uint8) & 0x7F
        v_codes = opt.state[p]["exp_avg_sq"].view(torch.uint8) & 0x7F
        assert int(m_codes.max()) == 0x7E, trial  # 448
        assert int(v_codes.max()) == 0x7B, trial  # 57344


def same_state(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("single_pass", [False, True], ids=["exact", "single-pass"])
def test_cpu_kernels_give_the_same_result_on_any_number_of_threads(single_pass, loops):
    threads = torch.get_num_threads()
    hyper = dict(weight_decay=0.01, single_pass=single_pass)
    try:
        torch.set_num_threads(1)
        one = twin_runs(Lamb16, hyper, shapes=SMALL_MANY)
        torch.set_num_threads(max(threads, 2))
        many = twin_runs(Lamb16, hyper, shapes=SMALL_MANY)
    finally:
        torch.set_num_threads(threads)
    # Each tensor's sums add up chunk by chunk in order, whichever thread took
    # which chunk: the very same bits, the large tensor's (256 x 160) too.
    for p, q in zip(one[0], many[0]):
        assert torch.equal(p, q)
        assert same_state(one[2].state[p], many[2].state[q])


# The exact step's phases (BlockGroup in cpu_kernels.cpp): a tensor of its own,
# several that keep their updates, one over 4 M elements (2**22) that keeps
# none, then two more, with rows of every kind.
PHASES = [(1100, 1000), (700, 600), (3,), (300, 700), (70,), (4200, 1000), (600, 600), (500, 1000)]


@pytest.mark.parametrize("single_pass", [False, True], ids=["exact", "single-pass"])
def test_cpu_kernels_match_reference_phase_by_phase(single_pass, loops):
    # Two steps (a single pass's first is exact): over 8.7 M elements, a third
    # finds the rare code that rounded the other way and then nearly cancels.
    hyper = dict(weight_decay=0.01, single_pass=single_pass)
    assert_fused_matches_reference(*twin_runs(Lamb16, hyper, shapes=PHASES, steps=2))


@pytest.mark.parametrize("single_pass", [False, True], ids=["exact", "single-pass"])
def test_a_group_steps_each_tensor_as_it_would_step_alone(single_pass, loops):
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=gen) for shape in PHASES]
    together = [nn.Parameter(t.clone()) for t in initial]
    alone = [nn.Parameter(t.clone()) for t in initial]
    hyper = dict(lr=1e-2, weight_decay=0.01, single_pass=single_pass)
    group = Lamb16(together, **hyper)
    singles = [Lamb16([p], **hyper) for p in alone]
    for _ in range(3):
        for p, q in zip(together, alone):
            p.grad = torch.randn(p.shape, generator=gen) * torch.exp(torch.randn(p.shape, generator=gen))
            q.grad = p.grad.clone()
        group.step()
        for opt in singles:
            opt.step()
    for p, q, opt in zip(together, alone, singles):
        assert torch.equal(p, q)
        assert same_state(group.state[p], opt.state[q])


def kernel_conversion(name: str, values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(values.numel(), dtype=out_dtype)
    getattr(lamb16.native.library(), name)(values.data_ptr(), out.data_ptr(), values.numel())
    return out


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "flush-denormal"])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_cpu_kernels_convert_fp8_exactly_as_torch(fp8, flush_denormal, loops):
    """The kernels' conversions against torch's: every code, and float32 values
    spread over the whole bit range plus each midpoint between neighbouring
    codes and the floats on either side of it (where rounding to nearest even
    decides). Also with the processor flushing subnormals (what
    torch.set_flush_denormal(True) asks for), which must not change a result."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes.view(fp8).float().unique()
    finite = finite[finite.isfinite()]
    midpoints = ((finite[1:].double() + finite[:-1].double()) / 2).float()
    around = [midpoints, midpoints.nextafter(torch.tensor(1e9)), midpoints.nextafter(torch.tensor(-1e9))]
    spread = torch.arange(0, 2**32, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 448.0, 464.0, 480.0, 61440.0])
    values = torch.cat([spread, *around, *(-t for t in around), special])
    expected = values.to(fp8).view(torch.uint8)

    suffix = "e4m3" if fp8 == torch.float8_e4m3fn else "e5m2"
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this processor cannot flush subnormals")
    try:
        decoded = kernel_conversion(f"decode_{suffix}_array", codes, torch.float32)
        encoded = kernel_conversion(f"encode_{suffix}_array", values, torch.uint8)
    finally:
        torch.set_flush_denormal(False)
    torch.testing.assert_close(decoded, codes.view(fp8).float(), rtol=0, atol=0, equal_nan=True)
    both_nan = encoded.view(fp8).float().isnan() & expected.view(fp8).float().isnan()
    mismatched = (encoded != expected) & ~both_nan
    assert not mismatched.any(), (values[mismatched][:5], encoded[mismatched][:5], expected[mismatched][:5])


# One tensor shared across the threads, one small one taken whole.
TRAFFIC_SHAPES = [(40_000,), (300, 7)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("pattern", list(lamb16.native.TRAFFIC_PATTERNS))
def test_traffic_reads_the_gradients_and_writes_what_a_step_writes(pattern):
    moment_dtype = lamb16.native.TRAFFIC_PATTERNS[pattern][1]
    gen = torch.Generator().manual_seed(0)
    tensors = [
        (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
         torch.randint(0, 100, shape, generator=gen).to(moment_dtype),
         torch.randint(100, 200, shape, generator=gen).to(moment_dtype))
        for shape in TRAFFIC_SHAPES
    ]
    before = [[bits(t).clone() for t in row] for row in tensors]
    lamb16.native.traffic(pattern, tensors)
    for (param, grad, exp_avg, exp_avg_sq), (old_param, old_grad, old_avg, old_avg_sq) in zip(tensors, before):
        assert torch.equal(bits(grad), old_grad)  # only read
        for written, old in ((param, old_param), (exp_avg, old_avg), (exp_avg_sq, old_avg_sq)):
            assert not torch.equal(bits(written), old)


@pytest.mark.parametrize("single_pass", [False, True], ids=["exact", "single-pass"])
def test_calls_only_runs_a_steps_host_work_and_changes_nothing(single_pass, native_calls):
    """Within native.calls_only() a step plans and calls the kernels, which
    do nothing; after it, the kernels step again."""
    params = [nn.Parameter(torch.randn(shape)) for shape in [(300, 200), (8,)]]
    optimizer = Lamb16(params, lr=1e-2, single_pass=single_pass)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.step()
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in optimizer.state[p].items() if k != "step"} for p in params]
    with lamb16.native.calls_only():
        optimizer.step()
    assert len(native_calls) == 3  # it called the kernels' entry point ...
    for p, old, state in zip(params, before, states):  # ... which changed nothing
        assert torch.equal(p, old)
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())
    optimizer.step()
    assert not torch.equal(params[0], before[0])


def test_traffic_takes_only_its_designs_dtypes():
    p = torch.zeros(10)
    with pytest.raises(ValueError, match="uint8 moments"):
        lamb16.native.traffic("lamb16", [(p, p.clone(), p.clone(), p.clone())])
    with pytest.raises(ValueError, match="Invalid traffic pattern: 'sgd'"):
        lamb16.native.traffic("sgd", [])


def test_fused_path_is_actually_compiled_one_call_per_group(compiled_on_cpu, compiled_calls):
    twin_runs(Lamb16, dict(weight_decay=0.01), shapes=[(40, 40), (1,), ()], steps=2)
    assert compiled_calls == [("lamb16_block_update", 3)] * 2  # every tensor of the group, each step
    assert lamb16.compiled._unavailable is None


def step_counting_graphs(optimizer, params, steps: int) -> int:
    """Graphs compiled during `steps` steps with new gradients and a new learning rate each."""
    gen = torch.Generator().manual_seed(1)
    torch._dynamo.utils.counters.clear()
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.param_groups[0]["lr"] = 1e-2 * 0.9**step
        optimizer.step()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("cls", [Lamb16, Lamb])
def test_a_group_compiles_once_and_new_learning_rates_do_not_recompile(cls, compiled_on_cpu):
    """One graph per group, at its first step; a second model in the same
    process gets its own graph and leaves the first one's in place."""
    gen = torch.Generator().manual_seed(0)
    first = [nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(30, 20), (20,), (7, 3, 5)]]
    second = [nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(11,), (4, 4)]]
    # Lamb16's single pass: an exact first step (a graph), then single-pass steps (a graph for each of its four
    # phases: its block scales, the update's norm, the new weights' norm, its writes).
    hyper, warm_up, graphs = (dict(bias_correction=True), 1, 1) if cls is Lamb else (dict(single_pass=True), 2, 5)
    first_opt, second_opt = cls(first, lr=1e-2, **hyper), cls(second, lr=1e-2, **hyper)
    assert step_counting_graphs(first_opt, first, warm_up) == graphs
    assert step_counting_graphs(second_opt, second, warm_up) == graphs
    assert step_counting_graphs(first_opt, first, 3) == 0  # Lamb's bias correction: a new step count each step
    assert step_counting_graphs(second_opt, second, 3) == 0


def test_failed_compilation_falls_back_to_the_reference_with_one_warning(monkeypatch, compiled_on_cpu):
    def broken_compile(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(lamb16.compiled, "_compiled", {})
    monkeypatch.setattr(lamb16.compiled, "_groups", {})
    monkeypatch.setattr(lamb16.compiled, "_unavailable", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, reference, _, _ = twin_runs(Lamb16, dict(weight_decay=0.01), shapes=[(30, 4), (8,)])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C compiler found" in messages[0]
    for p, q in zip(fused, reference):
        assert torch.equal(p, q)  # the reference itself ran


@pytest.mark.parametrize("cls", [Lamb16, Lamb])
def test_failed_kernel_build_falls_back_to_the_reference_with_one_warning(monkeypatch, tmp_path, cls):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LAMB16_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lamb16.native, "_library", None)
    monkeypatch.setattr(lamb16.native, "_unavailable", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, reference, _, _ = twin_runs(cls, dict(weight_decay=0.01), shapes=[(30, 4), (8,)])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no-such-compiler" in messages[0], messages
    for p, q in zip(fused, reference):
        assert torch.equal(p, q)  # the reference itself ran


@pytest.mark.parametrize("refused", ["-march=native", "-fopenmp"])
def test_a_compiler_without_an_option_still_builds_the_kernels(refused, monkeypatch, tmp_path):
    """A compiler that cannot tell this processor (-march=native unsupported)
    builds the portable loops, one without OpenMP builds them for one thread:
    no warning, and the reference's results."""
    compiler = tmp_path / "cxx-without-option"
    compiler.write_text(
        f'#!/bin/sh\nfor arg in "$@"; do\n  if [ "$arg" = "{refused}" ]; then\n'
        f'    echo "error: unsupported option {refused}" >&2; exit 1\n  fi\ndone\nexec c++ "$@"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("LAMB16_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lamb16.native, "_library", None)
    monkeypatch.setattr(lamb16.native, "_unavailable", None)
    for single_pass in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runs = twin_runs(Lamb16, dict(weight_decay=0.01, single_pass=single_pass), shapes=[(300, 200), (8,)])
        assert lamb16.native._library is not None
        assert_fused_matches_reference(*runs)


def test_kernels_build_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LAMB16_CACHE_DIR", str(tmp_path))
    path = lamb16.native.build("c++")
    assert path.parent == tmp_path and path.suffix == ".so"
    built = path.stat().st_mtime_ns
    assert lamb16.native.build("c++") == path and path.stat().st_mtime_ns == built  # found, not rebuilt
    assert isinstance(ctypes.CDLL(str(path)).lamb16_steps, ctypes._CFuncPtr)


def test_fused_false_never_builds_or_compiles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no fused path may be used")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(lamb16.native, "library", refuse)
    monkeypatch.setattr(lamb16.compiled, "compiles_on", lambda device: True)
    monkeypatch.setattr(lamb16.compiled, "_compiled", {})
    monkeypatch.setattr(lamb16.compiled, "_groups", {})
    param = nn.Parameter(torch.randn(100))
    optimizer = Lamb16([param], fused=False)
    param.grad = torch.randn(100)
    optimizer.step()


@pytest.mark.parametrize("path", ["native", "compiled"])
def test_channels_last_parameters_take_the_fused_path(request, path):
    """A channels-last conv weight keeps that layout in its gradient and fp8 state;
    the fused step must handle it, and match the reference."""
    if path == "compiled":
        request.getfixturevalue("compiled_on_cpu")
    calls = request.getfixturevalue("native_calls" if path == "native" else "compiled_calls")
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
    if path == "native":
        assert calls == [("lamb16_block_steps", 2)] * 3  # weight and bias, three steps
    else:
        assert calls == [("lamb16_block_update", 2)] * 3
    assert_fused_matches_reference(list(conv.parameters()), list(twin.parameters()), fast_opt, ref_opt)


# A damaged library fails its checksum (truncated: loading it would kill the
# process with SIGBUS) or passes it and fails to load (foreign).
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_cached_library_is_rebuilt_once_with_one_warning(monkeypatch, tmp_path, damage):
    built = lamb16.native.build("c++")  # this session's cached build, found (not compiled again)
    monkeypatch.setenv("LAMB16_CACHE_DIR", str(tmp_path))
    path = tmp_path / built.name
    shutil.copyfile(built, path)
    shutil.copyfile(lamb16.native.digest_path(built), lamb16.native.digest_path(path))
    assert lamb16.native.build("c++") == path  # the copy is the cache's library
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:  # a real library without our kernels, its checksum made to match
        path.write_bytes(Path(_ctypes.__file__).read_bytes())
        lamb16.native.digest_path(path).write_text(lamb16.native.sha256_of(path))
    monkeypatch.setattr(lamb16.native, "_library", None)
    monkeypatch.setattr(lamb16.native, "_unavailable", None)
    with pytest.warns(RuntimeWarning, match="failed their checksum or load") as caught:
        assert lamb16.native.loops() != "none"
    assert len(caught) == 1
    assert path.read_bytes() != b"" and lamb16.native.verified(path)
    param = nn.Parameter(torch.randn(100))  # and the rebuilt kernels step, without another warning
    param.grad = torch.randn(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Lamb16([param]).step()
        assert lamb16.native.library() is not None


def test_a_groups_repeated_blocks_become_identical_chunks_that_share_a_graph():
    """A transformer's layers: the group is cut at the layer's period, so that
    all layers share one compiled graph; a small group is one call; with no
    repetition, chunks of at most MAX_CHUNK tensors."""
    from experiments.bench import transformer_shapes

    shapes = transformer_shapes(width=32, layers=12, vocab=64)  # 147 tensors: 12 per layer, 3 more
    cut = lamb16.compiled.chunks([(math.prod(shape),) for shape in shapes])
    assert [b - a for a, b in cut].count(12) == 12 and len(cut) <= 14
    assert len({tuple(shapes[a:b]) for a, b in cut}) <= 3  # the layer's graph, and at most two for the ends
    assert lamb16.compiled.chunks([(n,) for n in (500, 20, 25000, 50, 400000, 500, 5000, 10)]) == [(0, 8)]
    distinct = lamb16.compiled.chunks([(n,) for n in range(1, 61)])
    assert [a for a, _ in distinct] == [0, 30] and distinct[-1][1] == 60


def test_every_chunk_of_a_group_steps_as_the_reference(compiled_on_cpu, compiled_calls):
    """Tensors of three repeated 'layers': one compiled call per group, cut into
    chunks that all match the reference."""
    shapes = [(16,), (8, 16), (8,)] * 3 + [(5,)]
    assert_fused_matches_reference(*twin_runs(Lamb16, dict(weight_decay=0.01), shapes=shapes, steps=3))
    assert compiled_calls == [("lamb16_block_update", len(shapes))] * 3


def test_a_piece_of_a_sharded_1d_tensor_passes_compiled_as_eagerly():
    """What a process runs for its piece of a 1-D tensor whose cut falls inside a
    block (off the CPU: compiled with dynamic shapes, the piece flat, its
    blocks' scales as a grid): both passes, starting 3 elements into a block."""
    from lamb16.updates import lamb16_block_apply, lamb16_block_partials

    gen = torch.Generator().manual_seed(0)
    moments = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, block_size=8, phase=3)
    runs = []
    for compiled in (True, False):
        piece = torch.randn(30, generator=gen.manual_seed(1))
        grad = torch.randn(30, generator=gen)
        codes = (torch.randn(30, generator=gen) * 50).to(torch.float8_e4m3fn), (
            torch.rand(30, generator=gen) * 500).to(torch.float8_e5m2)
        old_scales = torch.rand(1, 5, generator=gen) + 0.5, torch.rand(1, 5, generator=gen) + 0.5
        inputs = (piece, grad, *codes, *old_scales)
        run = lamb16.compiled.run_compiled if compiled else (lambda update, args, **kw: update(*args, **kw))
        sums, m_max, v_max = run(lamb16_block_partials, inputs, **moments)
        new_scales = m_max / 448, v_max / 57344
        run(lamb16_block_apply, (*inputs, *new_scales, torch.tensor(0.01)), **moments)
        runs.append((sums, m_max, v_max, piece, *codes))
    assert m_max.shape == (1, 5)  # 3 + 30 elements: blocks of 8
    for compiled, eager in zip(*runs):
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-6, atol=1e-7)

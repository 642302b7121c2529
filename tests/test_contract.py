"""The torch.optim.Optimizer contract, for Lamb and both scalings of Lamb16."""

import copy
import io

import pytest
import torch
from torch import nn

from lamb16 import Lamb, Lamb16, state_nbytes
from lamb16.quantize import E4M3, E5M2
from optimizer_cases import CASES, CORE

@pytest.fixture(params=CASES, ids=repr)
def make(request):
    return request.param


@pytest.fixture(params=CORE, ids=repr)
def make_core(request):
    return request.param


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
        (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-0.01), "Invalid weight_decay value: -0.01"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_value(make, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        make(small_model().parameters(), **kwargs)


def test_lamb16_specific_validation():
    params = list(small_model().parameters())
    with pytest.raises(ValueError, match="Invalid scaling: 'rms'"):
        Lamb16(params, scaling="rms")
    with pytest.raises(ValueError, match="Invalid trust_scale value: -0.5"):
        Lamb16(params, trust_scale=-0.5)


def test_invalid_group_added_later_raises_and_is_not_kept(make):
    model = small_model()
    optimizer = make(list(model[0].parameters()), lr=1e-2)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        optimizer.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(optimizer.param_groups) == 1
    train(model, optimizer, steps=2)  # still usable


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_non_float32_parameters_are_refused(make, dtype):
    param = nn.Parameter(torch.zeros(3, dtype=dtype))
    with pytest.raises(ValueError, match=f"float32 parameters only, got {dtype}"):
        make([param])


def test_param_groups_keep_their_own_hyperparameters(make):
    a, b = torch.randn(4, 3), torch.randn(5)
    together = [nn.Parameter(a.clone()), nn.Parameter(b.clone())]
    optimizer = make(
        [{"params": [together[0]]}, {"params": [together[1]], "lr": 3e-2, "weight_decay": 0.1}],
        lr=1e-2,
    )
    # The ground truth: each group on its own optimizer, fed the same gradients.
    alone = [nn.Parameter(a.clone()), nn.Parameter(b.clone())]
    alone_optimizers = [make([alone[0]], lr=1e-2), make([alone[1]], lr=3e-2, weight_decay=0.1)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in together]
        for p, q, g, opt in zip(together, alone, grads, alone_optimizers):
            p.grad, q.grad = g.clone(), g.clone()
            opt.step()
        optimizer.step()
    assert torch.equal(together[0], alone[0])
    assert torch.equal(together[1], alone[1])
    assert not torch.equal(together[1], b)


def test_add_param_group_steps_the_new_group(make):
    model = small_model()
    optimizer = make(model[0].parameters(), lr=1e-2)
    before = [p.clone() for p in model[2].parameters()]
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 5e-2})
    train(model, optimizer, steps=3)
    assert optimizer.param_groups[1]["lr"] == 5e-2
    assert all(not torch.equal(p, b) for p, b in zip(model[2].parameters(), before))


def test_step_returns_the_closure_loss_computed_with_grad(make):
    model = small_model()
    optimizer = make(model.parameters(), lr=1e-2)
    x = torch.randn(8, 6)

    def closure():
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()  # fails if the closure ran under no_grad
        return loss

    before = model(x).square().mean().item()  # the closure runs before the step moves anything
    weights = [p.clone() for p in model.parameters()]
    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and loss.item() == before
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert optimizer.step() is None


def test_parameters_without_grad_are_skipped(make):
    model = small_model()
    optimizer = make(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    model[2].bias.grad = None
    before = model[2].bias.clone()
    optimizer.step()
    assert torch.equal(model[2].bias, before)
    assert model[2].bias not in optimizer.state
    assert model[2].weight in optimizer.state


def test_sparse_gradients_raise_a_clear_error(make):
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = make(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()


def test_zero_size_and_zero_dim_parameters(make):
    empty = nn.Parameter(torch.zeros(0, 5))
    scalar = nn.Parameter(torch.tensor(0.5))
    optimizer = make([empty, scalar], lr=1e-2)
    for _ in range(3):
        empty.grad = torch.zeros(0, 5)
        scalar.grad = torch.tensor(0.25)
        optimizer.step()
    assert empty.shape == (0, 5)
    assert torch.isfinite(scalar) and scalar.item() < 0.5
    assert torch.isfinite(optimizer.state[scalar]["trust_ratio"])


def test_a_frozen_group_does_not_move(make):
    model = small_model()
    optimizer = make(
        [{"params": model[0].parameters(), "lr": 1e-12}, {"params": model[2].parameters()}],
        lr=1e-2,
    )
    frozen = [p.clone() for p in model[0].parameters()]
    moving = [p.clone() for p in model[2].parameters()]
    train(model, optimizer, steps=5)
    assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))
    assert all(not torch.equal(p, m) for p, m in zip(model[2].parameters(), moving))


def test_trust_diagnostics_are_kept_per_parameter(make):
    model = small_model()
    optimizer = make(model.parameters(), lr=1e-2)
    train(model, optimizer, steps=2)
    for param in model.parameters():
        state = optimizer.state[param]
        for key in ("weight_norm", "adam_norm", "trust_ratio"):
            assert state[key].dim() == 0 and torch.isfinite(state[key])
        assert state["trust_ratio"] > 0


def test_state_dict_round_trip_resumes_exactly(make):
    """Training resumed from a checkpoint equals training that never stopped."""
    model = small_model()
    optimizer = make(model.parameters(), lr=1e-2, weight_decay=0.01)
    train(model, optimizer, steps=5)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = small_model(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = make(resumed.parameters(), lr=1e-2, weight_decay=0.01)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])

    for before, after in zip(optimizer.state.values(), resumed_optimizer.state.values()):
        assert before.keys() == after.keys()
        for key in before:
            assert after[key].dtype == before[key].dtype, key  # fp8 stays fp8
            assert torch.equal(after[key].float(), before[key].float()), key

    for seed in range(1, 6):  # several later steps, compared after each
        train(model, optimizer, steps=1, seed=seed)
        train(resumed, resumed_optimizer, steps=1, seed=seed)
        assert params_equal(model, resumed)


def test_lamb16_state_stays_float8_after_load():
    model = small_model()
    optimizer = Lamb16(model.parameters())
    train(model, optimizer, steps=2)
    fresh = Lamb16(model.parameters())
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for state in fresh.state.values():
        assert state["exp_avg"].dtype == E4M3
        assert state["exp_avg_sq"].dtype == E5M2
    assert state_nbytes(fresh) == state_nbytes(optimizer)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 5), nn.Flatten(), nn.Linear(8 * 24 * 24, 10))


@pytest.mark.parametrize(
    "make_optimizer, per_param, per_tensor_max",
    [
        # Six float32 scalars (two scales, the step, three statistics) and the single-pass carry's four.
        (lambda ps: Lamb16(ps, scaling="absmax"), 2, 40),
        (lambda ps: Lamb16(ps, scaling="seed"), 2, 40),
        (lambda ps: Lamb16(ps, scaling="absmax", single_pass=True), 2, 40),
        (lambda ps: Lamb(ps), 8, 16),
        (lambda ps: torch.optim.Adam(ps), 8, 16),
    ],
    ids=["lamb16-absmax", "lamb16-seed", "lamb16-absmax-1pass", "lamb", "adam"],
)
def test_state_nbytes_measures_bytes_per_parameter(make_optimizer, per_param, per_tensor_max):
    model = conv_net()
    optimizer = make_optimizer(model.parameters())
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    extra = state_nbytes(optimizer) - per_param * n
    assert 0 < extra <= per_tensor_max * len(params)


@pytest.mark.parametrize("single_pass", [False, True])
def test_state_nbytes_of_block_scales_is_two_bytes_and_a_pair_of_scales_per_block(single_pass):
    """The default scaling: 2 bytes an element, 8 per block (the conv's rows of
    25 elements are a block each; the linear layer's of 4,608, 18 blocks of
    256), and four float32 scalars and the carry's four per tensor."""
    model = conv_net()
    optimizer = Lamb16(model.parameters(), single_pass=single_pass)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    blocks = 8 * 1 + 1 + 10 * 18 + 1  # conv weight, conv bias (8 elements: one block), linear weight and bias
    n = sum(p.numel() for p in model.parameters())
    assert state_nbytes(optimizer) == 2 * n + 8 * blocks + 4 * 8 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_matches_cpu(make):
    cpu_model = small_model()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    cpu_opt = make(cpu_model.parameters(), lr=1e-2, weight_decay=0.01)
    cuda_opt = make(cuda_model.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(32, 6, generator=gen)
        for model, opt, data in ((cpu_model, cpu_opt, x), (cuda_model, cuda_opt, x.cuda())):
            opt.zero_grad()
            model(data).square().mean().backward()
            opt.step()
    for p, q in zip(cpu_model.parameters(), cuda_model.parameters()):
        assert q.is_cuda
        torch.testing.assert_close(q.cpu(), p, rtol=1e-4, atol=1e-5)
    for state in cuda_opt.state.values():
        assert all(t.device.type == "cuda" for k, t in state.items() if k != "step")


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, list]:
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    return params, state


def assert_unchanged(model: nn.Module, optimizer: torch.optim.Optimizer, before: tuple[list, list]) -> None:
    params, state = before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert len(optimizer.state) == len(state)
    for now, then in zip(optimizer.state.values(), state):
        assert all(torch.equal(now[k].view(torch.uint8), then[k].view(torch.uint8)) if now[k].dtype.itemsize == 1
                   else torch.equal(now[k], then[k]) for k in then)


@pytest.mark.parametrize("fused", [False, None])
def test_a_parameter_cast_after_construction_fails_the_step_before_any_write(make, fused):
    model = small_model()
    optimizer = make([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2, fused=fused)
    train(model, optimizer, steps=2)
    model[2].bfloat16()  # the second group's parameters: the first group comes first in the step
    before = snapshot(model, optimizer)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    with pytest.raises(ValueError, match=r"supports float32 parameters only, got torch.bfloat16 \(shape \(3, 16\)\)"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.parametrize(
    "saver, loader, fragment",
    [
        (Lamb16, Lamb, "Invalid state_dict for Lamb: it was saved by Lamb16"),
        (Lamb, Lamb16, "Invalid state_dict for Lamb16: it was saved by Lamb"),
        (torch.optim.Adam, Lamb16, "Invalid state_dict for Lamb16: it was saved by Adam or AdamW"),
        (torch.optim.SGD, Lamb, "Invalid state_dict for Lamb: it was saved by SGD"),
    ],
)
def test_another_optimizers_state_dict_is_refused_at_load(saver, loader, fragment):
    model = small_model()
    source = saver(model.parameters(), lr=1e-2)
    train(model, source, steps=1)
    target = loader(model.parameters(), lr=1e-2)
    train(model, target, steps=1)
    before = snapshot(model, target)
    with pytest.raises(ValueError, match=fragment):
        target.load_state_dict(source.state_dict())
    assert_unchanged(model, target, before)
    train(model, target, steps=1)  # and it still steps


def test_a_state_of_the_wrong_kind_is_a_clear_error_at_step():
    model = small_model()
    optimizer = Lamb16(model.parameters(), lr=1e-2)
    train(model, optimizer, steps=1)
    state = optimizer.state[model[0].weight]
    state["exp_avg"] = state["exp_avg"].float()  # installed by hand, behind the optimizer's back
    with pytest.raises(ValueError, match="state 'exp_avg' of a parameter of shape \\(16, 6\\) is torch.float32"):
        train(model, optimizer, steps=1)


def compiled_twin(make, compile_what: str, steps: int = 8):
    """A model trained eagerly beside its twin under torch.compile (of the
    optimizer step alone, or of the whole training step); after 3 warm-up
    steps any recompilation raises."""
    import torch._dynamo

    eager_model, compiled_model = small_model(), small_model()
    eager_opt = make(eager_model.parameters(), lr=1e-2)
    compiled_opt = make(compiled_model.parameters(), lr=1e-2)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))

    def train_step(model, optimizer):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    compiled_step = torch.compile(compiled_opt.step)
    compiled_train_step = torch.compile(train_step)
    torch._dynamo.reset()
    for step in range(steps):
        with torch._dynamo.config.patch(error_on_recompile=step >= 3):
            train_step(eager_model, eager_opt)
            if compile_what == "step":
                compiled_opt.zero_grad()
                compiled_model(x).square().mean().backward()
                compiled_step()
            else:
                compiled_train_step(compiled_model, compiled_opt)
    return eager_model, compiled_model


def test_compiled_optimizer_step_never_recompiles_and_matches_eager(make_core):
    eager, compiled = compiled_twin(make_core, "step")
    assert params_equal(eager, compiled)


def test_compiled_training_step_never_recompiles_and_matches_eager(make_core):
    eager, compiled = compiled_twin(make_core, "train step")
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_partial_dtensor_parameters_are_refused_with_a_clear_error(make, tmp_path):
    """Sharded and replicated DTensors step (tests/test_distributed.py); a
    Partial one is a sum still to be taken, not a parameter: a clear error."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = nn.Parameter(DTensor.from_local(torch.randn(8, 4), mesh, [Partial()]))
        with pytest.raises(ValueError, match=r"sharded \(Shard\) or replicated \(Replicate\).*shape \(8, 4\)"):
            make([param])
    finally:
        dist.destroy_process_group()


# ------------------------------------------- the contract as torch.optim.Adam keeps it ----

LR = 2.0**-7  # exactly a float32, so that a tensor lr and a float lr are the same number


def trained(make, steps: int = 3, **options) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = small_model()
    optimizer = make(model.parameters(), lr=LR, **options)
    train(model, optimizer, steps=steps)
    return model, optimizer


def assert_same_course(a: tuple, b: tuple, steps: int = 4) -> None:
    """Two (model, optimizer) pairs take the same later steps, bit for bit, compared after each."""
    for seed in range(10, 10 + steps):
        train(*a, steps=1, seed=seed)
        train(*b, steps=1, seed=seed)
        assert params_equal(a[0], b[0]), f"apart after the step with seed {seed}"


def test_load_state_dict_twice_and_continue(make):
    model, optimizer = trained(make)
    twin_model = copy.deepcopy(model)
    twin = make(twin_model.parameters(), lr=LR)
    saved = copy.deepcopy(optimizer.state_dict())  # a live state_dict shares the state's tensors
    twin.load_state_dict(saved)
    twin.load_state_dict(twin.state_dict())  # a trainer that restores again
    twin.load_state_dict(saved)
    assert_same_course((model, optimizer), (twin_model, twin))


def test_load_state_dict_into_a_deepcopy(make):
    model, optimizer = trained(make)
    saved = copy.deepcopy(optimizer.state_dict())
    twin_model, twin = copy.deepcopy((model, optimizer))
    twin.load_state_dict(saved)
    assert_same_course((model, optimizer), (twin_model, twin))


def test_deepcopy_continues_bit_for_bit(make):
    model, optimizer = trained(make)
    twin = copy.deepcopy((model, optimizer))
    assert all(p is not q for p, q in zip(twin[0].parameters(), model.parameters()))
    assert_same_course((model, optimizer), twin)


def test_torch_save_of_the_optimizer_continues_bit_for_bit(make):
    model, optimizer = trained(make)
    buffer = io.BytesIO()
    torch.save((model, optimizer), buffer)
    buffer.seek(0)
    twin = torch.load(buffer, weights_only=False)
    assert_same_course((model, optimizer), twin)


def test_state_dict_holds_only_tensors_and_plain_values(make):
    """What a step needs is in the state_dict, as tensors (step counters
    included, as float32 0-dim tensors) or plain values: nothing kept aside."""
    model, optimizer = trained(make)
    saved = optimizer.state_dict()
    for state in saved["state"].values():
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0 and state["step"].item() == 3
        assert all(isinstance(value, torch.Tensor) for value in state.values())
    fresh_model = copy.deepcopy(model)
    fresh = make(fresh_model.parameters(), lr=LR)
    fresh.load_state_dict(torch.load(io.BytesIO(save_bytes(saved)), weights_only=True))
    assert_same_course((model, optimizer), (fresh_model, fresh))


def save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_load_state_dict_hooks_run_in_torchs_order(make):
    """Pre-hooks run first (prepended ones before the others) and may replace
    the state_dict, even one the optimizer would refuse as it is; post-hooks
    see the state as a step uses it and may add entries of their own."""
    model, optimizer = trained(make)
    saved = optimizer.state_dict()
    option = sorted(optimizer.group_options() - {"lr", "fused"})[0]
    for group in saved["param_groups"]:
        del group[option]  # as another version might have saved it
    target = make(copy.deepcopy(model).parameters(), lr=LR)
    with pytest.raises(ValueError, match=f"lack {option}"):
        target.load_state_dict(saved)
    calls = []

    def repair(opt, state_dict):
        calls.append("repair")
        state_dict = copy.deepcopy(state_dict)
        for group, own in zip(state_dict["param_groups"], opt.param_groups):
            group[option] = own[option]
        return state_dict

    def first(opt, state_dict):
        calls.append("first")

    def post(opt):
        calls.append("post")
        for state in (s for s in opt.state.values() if isinstance(s, dict)):
            for key, dtype in type(opt).element_state.items():
                assert state[key].dtype == dtype, key  # already as a step needs it
        opt.state["ran_load_state_dict_post_hook"] = True

    target.register_load_state_dict_pre_hook(repair)
    target.register_load_state_dict_pre_hook(first, prepend=True)
    target.register_load_state_dict_post_hook(post)
    target.load_state_dict(saved)
    assert calls == ["first", "repair", "post"]
    assert target.state["ran_load_state_dict_post_hook"] is True
    target.load_state_dict(target.state_dict())  # the hook's own entry loads too
    assert calls[-3:] == ["first", "repair", "post"]


def test_a_hook_entry_in_state_does_not_stop_steps_or_saves(make):
    model, optimizer = trained(make)
    optimizer.state["note"] = {"written_by": "a hook"}
    optimizer.state["flag"] = True
    train(model, optimizer, steps=1)
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["state"]["flag"] is True
    twin_model = copy.deepcopy(model)
    twin = make(twin_model.parameters(), lr=LR)
    twin.load_state_dict(saved)
    assert twin.state["flag"] is True
    assert_same_course((model, optimizer), (twin_model, twin), steps=2)


def test_state_dict_and_step_hooks(make):
    model = small_model()
    optimizer = make(model.parameters(), lr=LR)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("step pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("step post"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save pre"))

    def post(opt, state_dict):
        calls.append("save post")
        state_dict["extra"] = 1
        return state_dict

    optimizer.register_state_dict_post_hook(post)
    train(model, optimizer, steps=1)
    assert optimizer.state_dict()["extra"] == 1
    assert calls == ["step pre", "step post", "save pre", "save post"]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "[1]", "[1,1]"])
def test_tensor_lr_of_any_one_element_shape_steps_as_the_float(make, shape):
    options = {**make.options}
    base = type(make)(make.name, make.optimizer, options)  # the same case with a float lr
    with_float = trained(base)
    as_tensor = small_model()
    optimizer = make.optimizer(as_tensor.parameters(), **{**options, "lr": torch.full(shape, LR)})
    train(as_tensor, optimizer, steps=3)
    assert params_equal(with_float[0], as_tensor)


def test_a_tensor_lr_changed_in_place_is_followed(make):
    model = small_model()
    lr = torch.tensor(LR)
    optimizer = make.optimizer(model.parameters(), **{**make.options, "lr": lr})
    train(model, optimizer, steps=2)
    lr.fill_(0.0)  # as a scheduler writing into a tensor lr does
    before = [p.clone() for p in model.parameters()]
    train(model, optimizer, steps=2)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_schedulers_drive_the_lr(make):
    model = small_model()
    optimizer = make(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for step in range(3):
        train(model, optimizer, steps=1, seed=step)
        scheduler.step()
    assert float(optimizer.param_groups[0]["lr"]) == LR * 0.5**3
    saved = copy.deepcopy(optimizer.state_dict())
    assert float(saved["param_groups"][0]["initial_lr"]) == LR


def test_an_lr_zero_group_leaves_its_weights_exactly(make):
    model = small_model()
    optimizer = make([{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=LR)
    frozen = [p.clone() for p in model[0].parameters()]
    train(model, optimizer, steps=3)
    assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))


def test_zero_grad_to_none_skips_every_parameter(make):
    model, optimizer = trained(make, steps=2)
    optimizer.zero_grad()  # set_to_none=True, torch's default
    assert all(p.grad is None for p in model.parameters())
    before = snapshot(model, optimizer)
    optimizer.step()
    assert_unchanged(model, optimizer, before)


def test_zero_grad_to_zeros_steps_as_explicit_zero_gradients(make):
    model, optimizer = trained(make, steps=2)
    twin_model, twin = copy.deepcopy((model, optimizer))
    optimizer.zero_grad(set_to_none=False)
    for p in twin_model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    twin.step()
    assert all(float(s["step"]) == 3 for s in optimizer.state.values())
    assert params_equal(model, twin_model)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lr=float("nan")), "Invalid learning rate: nan"),
        (dict(lr=torch.tensor([1e-3, 2e-3])), r"Invalid learning rate: a tensor of shape \(2,\)"),
        (dict(lr=torch.tensor(1)), "Invalid learning rate: a tensor of dtype torch.int64"),
        (dict(lr="0.01"), "Invalid learning rate: '0.01'"),
        (dict(eps=float("nan")), "Invalid epsilon value: nan"),
        (dict(betas=(0.9,)), r"Invalid betas: \(0.9,\)"),
        (dict(betas=(0.9, float("nan"))), "Invalid beta parameter at index 1: nan"),
        (dict(weight_decay=float("nan")), "Invalid weight_decay value: nan"),
        (dict(fused="yes"), "Invalid fused value: 'yes'"),
    ],
)
def test_more_invalid_hyperparameters_raise_naming_them(make, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        make.optimizer(small_model().parameters(), **{**make.options, **kwargs})


@pytest.mark.parametrize(
    "optimizer, kwargs, fragment",
    [
        (Lamb16, dict(trust_scale=float("nan")), "Invalid trust_scale value: nan"),
        (Lamb16, dict(single_pass=1), "Invalid single_pass value: 1"),
        (Lamb, dict(adam="no"), "Invalid adam value: 'no'"),
        (Lamb, dict(bias_correction=None), "Invalid bias_correction value: None"),
        (Lamb, dict(max_weight_norm=0.0), "Invalid max_weight_norm value: 0.0"),
    ],
)
def test_each_optimizers_own_options_are_checked(optimizer, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        optimizer(small_model().parameters(), **kwargs)


@pytest.mark.parametrize("trust_lr", ["scheduled", "initial"])
def test_the_trust_ratio_reads_the_scheduled_or_the_initial_lr(make, trust_lr):
    """Under a scheduler that halves the lr each step, the trust ratio's factor
    1e-3 / lr reads the lr of this step ("scheduled") or the one the schedule
    started from ("initial", so that lr x trust keeps the schedule's shape)."""
    if make.optimizer is not Lamb16:
        pytest.skip("Lamb's trust ratio reads no lr")
    from lamb16.updates import lamb16_trust_ratio

    model = small_model()
    optimizer = make(model.parameters(), lr=LR, trust_lr=trust_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    last_update_norms: dict = {}
    for step in range(4):
        train(model, optimizer, steps=1, seed=step)
        read = LR if trust_lr == "initial" else LR * 0.5**step
        for p in model.parameters():
            state = optimizer.state[p]
            # A single-pass step (any after the first) reads the last step's update norm.
            update_norm = last_update_norms[p] if make.options.get("single_pass") and step else state["adam_norm"]
            expected = lamb16_trust_ratio(state["weight_norm"], update_norm, read, optimizer.defaults["trust_scale"])
            torch.testing.assert_close(state["trust_ratio"], expected, rtol=1e-5, atol=0)
            last_update_norms[p] = state["adam_norm"].clone()
        scheduler.step()


def test_trust_lr_initial_without_a_scheduler_reads_the_lr():
    model, twin = small_model(), small_model()
    a, b = Lamb16(model.parameters(), lr=LR), Lamb16(twin.parameters(), lr=LR, trust_lr="initial")
    train(model, a, steps=3)
    train(twin, b, steps=3)
    assert params_equal(model, twin)
    with pytest.raises(ValueError, match="Invalid trust_lr: 'base'"):
        Lamb16(model.parameters(), trust_lr="base")

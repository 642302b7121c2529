"""What Lamb and Lamb16 share: hyperparameter checks and the walk over parameters."""

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def is_dtensor(t: Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported (by whoever
    # made it). Importing it here would add seconds to every `import lamb16`
    # (it brings torch._dynamo), and a torch built without distributed has none.
    dtensors = sys.modules.get("torch.distributed.tensor")
    return dtensors is not None and isinstance(t, dtensors.DTensor)


def local_piece(t: Tensor) -> Tensor:
    """This process's piece of a DTensor (the tensor itself otherwise), sharing its memory."""
    return t._local_tensor if is_dtensor(t) else t


def check_placements(param: Tensor, optimizer: str) -> None:
    """What a sharded step can take: each mesh dimension shards the parameter
    (Shard) or copies it (Replicate); a Partial parameter is no tensor yet."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in param.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise ValueError(
                f"{optimizer} supports DTensor parameters sharded (Shard) or replicated (Replicate) over their mesh, "
                f"got a parameter of shape {tuple(param.shape)} with placements {param.placements}; redistribute it "
                "to Shard or Replicate"
            )


def check_gradient(param: Tensor, optimizer: str) -> None:
    """The gradient must be split as its parameter is, element for element."""
    grad = param.grad
    if not is_dtensor(grad) or grad.placements != param.placements or grad.device_mesh != param.device_mesh:
        found = grad.placements if is_dtensor(grad) else f"a plain {type(grad).__name__}"
        raise ValueError(
            f"{optimizer}: the gradient of a DTensor parameter of shape {tuple(param.shape)} has placements {found}, "
            f"not its parameter's {param.placements}; reduce it to the parameter's placements (FSDP2 does) before step()"
        )


def check_learning_rate(lr: float | Tensor) -> None:
    """A float, or a tensor of one element (any shape: [], [1], [1, 1]) that a
    scheduler may change in place; >= 0 and not NaN."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid learning rate: a tensor of shape {tuple(lr.shape)} (a tensor lr must hold "
                             "exactly one element)")
        if not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: a tensor of dtype {lr.dtype} (must be floating point)")
        value = lr.item()
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        value = lr
    else:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a float or a one-element tensor)")
    if not 0.0 <= value:
        raise ValueError(f"Invalid learning rate: {value} (must be >= 0)")


def check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        choices = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"Invalid {name} value: {value!r} (must be {choices})")


def check_hyperparameters(
    lr: float | Tensor, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """Raise ValueError naming the first invalid hyperparameter."""
    check_learning_rate(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (must be a pair)")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            raise ValueError(f"Invalid beta parameter at index {index}: a tensor (must be a float)")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")


def float32_error(optimizer: str, param: Tensor) -> ValueError:
    """Both optimizers do their arithmetic in float32 and update in place, so they
    take float32 parameters only; a half-precision model keeps float32 master
    weights, as it would for any other optimizer without AMP."""
    return ValueError(
        f"{optimizer} supports float32 parameters only, got {param.dtype} "
        f"(shape {tuple(param.shape)}); keep float32 weights, e.g. model.float()"
    )


def check_float32_params(group: dict[str, Any], optimizer: str) -> None:
    for param in group["params"]:
        if param.dtype != torch.float32:
            raise float32_error(optimizer, param)


def check_sharding(group: dict[str, Any], optimizer: str) -> None:
    """DTensor parameters (FSDP2's fully_shard, tensor parallelism) step on their
    local pieces (lamb16.sharded); any other tensor subclass wraps memory the
    update cannot reach, and is refused."""
    for param in group["params"]:
        if is_dtensor(param):
            check_placements(param, optimizer)
        elif is_traceable_wrapper_subclass(param):
            raise ValueError(
                f"{optimizer} does not support parameters of type {type(param).__name__} (shape "
                f"{tuple(param.shape)}); use plain tensors or DTensors"
            )


def check_step_tensors(param: Tensor, optimizer: str) -> None:
    """What a step needs of a parameter and its gradient, checked before any write."""
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError(
            f"{optimizer} does not support sparse gradients; use dense gradients (e.g. nn.Embedding(sparse=False))"
        )
    if param.dtype != torch.float32:  # cast after the optimizer was built
        raise float32_error(optimizer, param)
    if is_dtensor(param):
        check_gradient(param, optimizer)
    # torch itself refuses a gradient of another shape, dtype or device.


def adam_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters both updates take, as their keyword arguments."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    if isinstance(lr, Tensor):  # any one-element shape, read as the 0-dim tensor every path takes
        lr = lr.detach().reshape(())
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


def with_gradients(group: dict[str, Any]) -> list[Tensor]:
    """A group's parameters that a step moves: those with a gradient and elements."""
    return [p for p in group["params"] if p.grad is not None and p.numel() > 0]


# One tensor's update: the reference's tensor arguments (weights, gradient, the
# two moments, then any 0-dim state), the 0-dim state tensors its results go to
# (in place), and keyword arguments of its own (Lamb's step count).
Job = tuple[tuple[Tensor, ...], tuple[Tensor, ...], dict[str, Any]]


def init_step_and_statistics(state: dict[str, Tensor], param: Tensor) -> None:
    """The step counter, and the 0-dim tensors each step writes its statistics into."""
    state["step"] = torch.tensor(0.0)
    for key in ("weight_norm", "adam_norm", "trust_ratio"):
        state[key] = torch.zeros((), device=param.device)


def stepped_states(
    optimizer: Optimizer, params: list[Tensor], init_state: Callable[[dict, Tensor], None]
) -> list[tuple[Tensor, dict[str, Any]]]:
    """(parameter, state) for each of `params` (already checked), its state
    initialised on first use and its step counted (one call for all)."""
    pairs = []
    for param in params:
        state = optimizer.state[param]
        if not state:
            init_state(state, param)
        pairs.append((param, state))
    if pairs:
        torch._foreach_add_([state["step"] for _, state in pairs], 1.0)
    return pairs


def is_dense(t: Tensor) -> bool:
    """Contiguous, or channels-last (as conv weights and their state may be)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def lies_as_state(pieces: list[Tensor]) -> bool:
    """Whether the weights and gradient lie in memory as their state does
    (element i of each the same element), as every path walks them.

    Where a parameter's layout changed since its state was made (a model moved
    to channels_last, or back), the state keeps its layout: Lamb16's block
    scales belong to runs of elements in it, and the norms add its elements in
    its order. The
    step then walks copies of the weights and gradient in that layout and
    copies the weights back: the same steps, bit for bit, as if the layout had
    never changed, for two transient copies of the moved tensors."""
    param, grad, exp_avg, _ = pieces
    return param.stride() == exp_avg.stride() and grad.stride() == exp_avg.stride()


def in_layout_of(like: Tensor, t: Tensor) -> Tensor:
    """A copy of `t` laid out in memory as `like` (a dense tensor of its shape)."""
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


# Every update's first inputs: the per-element tensors (weights, gradient, the two moments).
ELEMENTWISE = 4


def same_dense_layout(tensors: tuple[Tensor, ...]) -> bool:
    """Whether an update's tensors can be walked as flat arrays: the parameter is
    dense in one memory layout (plain or channels-last) and every other
    per-element tensor (gradient, moments) has that very layout, so that element
    i of each is the same element. 0-dim tensors (scales) are scalars."""
    first = tensors[0]
    shape, stride, device = first.shape, first.stride(), first.device
    if not is_dense(first):
        return False
    for t in tensors[1:]:
        if t.device != device or (t.dim() and (t.shape != shape or t.stride() != stride)):
            return False
    return True


@contextlib.contextmanager
def ascending(groups: list[dict[str, Any]]) -> Iterator[None]:
    """The gradients of `maximize` groups negated while the step runs (in place:
    no memory; negation is exact, so they come back bit for bit), so that the
    step climbs the objective as torch.optim.Adam(maximize=True) does."""
    grads = [local_piece(p.grad) for g in groups if g.get("maximize") for p in g["params"] if p.grad is not None]
    if grads:
        torch._foreach_neg_(grads)
    try:
        yield
    finally:
        if grads:
            torch._foreach_neg_(grads)


# torch.compiler.disable in the lazy form that torch.optim's own steps use:
# torch._dynamo (seconds to import) is imported at the first call, not by `import lamb16`.
@torch._disable_dynamo
def update_eagerly(update: Callable[[], None]) -> None:
    """Run the update outside any torch.compile of the step: Dynamo cannot trace
    the CPU kernels' ctypes call, and would guard on every parameter and state
    it met in the dispatch, recompiling each step. Off the CPU the update still
    runs the reference compiled (lamb16.compiled), with graphs of its own."""
    update()


# Group options and state added after state_dicts were first saved: an older one may lack them.
LATER_GROUP_KEYS = frozenset({"max_weight_norm", "single_pass", "trust_lr", "block_size", "maximize"})
LATER_STATE_KEYS = frozenset({"carry"})


def saved_by(group: dict[str, Any]) -> str:
    """Which optimizer a saved parameter group looks like it came from."""
    keys = set(group)
    if {"trust_scale", "scaling"} <= keys:
        return "Lamb16"
    if {"adam", "bias_correction"} <= keys:
        return "Lamb"
    if "amsgrad" in keys:
        return "Adam or AdamW"
    if "momentum" in keys:
        return "SGD"
    return "another optimizer"


class CheckedOptimizer(Optimizer):
    """An Optimizer that validates every param group as it is added, whether by
    the constructor or by `add_param_group`, and keeps none that fails; checks
    every parameter and state before a step writes anything; and loads only a
    state_dict of its own kind.

    Subclasses say what their state holds: per-element tensors and their dtypes
    (`element_state`), 0-dim tensors (`scalar_state`), 1-dim ones of a fixed
    length (`vector_state`), and float32 ones whose shape depends on the
    group's options (`shaped_state`, checked by the subclass's check_state).
    """

    element_state: dict[str, torch.dtype] = {}
    scalar_state: tuple[str, ...] = ()
    vector_state: dict[str, int] = {}
    shaped_state: tuple[str, ...] = ()

    def check_group(self, group: dict[str, Any]) -> None:
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        check_flag("fused", group["fused"], allow_none=True)
        check_flag("maximize", group["maximize"])
        check_float32_params(group, type(self).__name__)
        check_sharding(group, type(self).__name__)

    def check_state(self, state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> None:
        name = type(self).__name__
        for key, dtype in self.element_state.items():
            value = state.get(key)
            if not isinstance(value, Tensor) or value.dtype != dtype or value.shape != param.shape:
                found = "missing" if value is None else f"{getattr(value, 'dtype', type(value).__name__)}"
                raise ValueError(
                    f"{name}: state {key!r} of a parameter of shape {tuple(param.shape)} is {found}, expected {dtype} "
                    "of its shape; was it loaded from another optimizer? Start from a fresh optimizer instead"
                )
            if is_dtensor(param) and (
                not is_dtensor(value) or value.placements != param.placements
            ):
                raise ValueError(
                    f"{name}: state {key!r} of a DTensor parameter of shape {tuple(param.shape)} is not sharded as "
                    "its parameter; load sharded state with torch.distributed.checkpoint "
                    "(set_optimizer_state_dict), or start from a fresh optimizer"
                )
        for key in self.scalar_state:
            if not isinstance(state.get(key), Tensor) or state[key].dim() != 0:
                raise ValueError(f"{name}: state {key!r} is missing or not a 0-dim tensor; start from a fresh optimizer")
        for key, length in self.vector_state.items():
            value = state.get(key)
            if not isinstance(value, Tensor) or value.shape != (length,) or value.dtype != torch.float32:
                raise ValueError(f"{name}: state {key!r} is missing or not a float32 tensor of {length} elements; "
                                 "start from a fresh optimizer")

    def params_to_step(self) -> list[list[Tensor]]:
        """Per group, its parameters that have a gradient (and elements), every
        one and its state checked first: a step either runs whole or raises
        before it has changed anything."""
        per_group = []
        for group in self.param_groups:
            params = with_gradients(group)
            self.check_params(group, params)
            per_group.append(params)
        return per_group

    def check_params(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Check each of a group's parameters about to step, and its state."""
        name = type(self).__name__
        for param in params:
            check_step_tensors(param, name)
            if self.state.get(param):
                self.check_state(self.state[param], param, group)

    def group_options(self) -> set[str]:
        """The group options of this optimizer, as its constructor names them
        (torch's own load adds others, such as differentiable, to the defaults)."""
        return set(inspect.signature(type(self).__init__).parameters) - {"self", "params"}

    def check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Refuse another optimizer's state_dict with a clear error, before anything is installed."""
        name = type(self).__name__
        own_keys = self.group_options() - LATER_GROUP_KEYS
        for group in state_dict.get("param_groups", []):
            missing = own_keys - set(group)
            if missing:
                raise ValueError(
                    f"Invalid state_dict for {name}: it was saved by {saved_by(group)} (its parameter groups lack "
                    f"{', '.join(sorted(missing))}); load it into the kind of optimizer that saved it"
                )
        expected = set(self.element_state) | set(self.scalar_state) | set(self.vector_state) | set(self.shaped_state)
        param_ids = {i for group in state_dict.get("param_groups", []) for i in group.get("params", [])}
        for key, state in state_dict.get("state", {}).items():
            if key not in param_ids:  # an entry that a hook put there, not a parameter's state
                continue
            if not expected - LATER_STATE_KEYS <= set(state) <= expected:
                raise ValueError(
                    f"Invalid state_dict for {name}: its state holds {', '.join(sorted(state))}, not "
                    f"{', '.join(sorted(expected))}; load it into the kind of optimizer that saved it"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load in torch's order: the pre-hooks (which may repair or
        replace the state_dict), then the check that it is this optimizer's
        kind, then the state installed (`__setstate__`), then the post-hooks."""
        check = self.register_load_state_dict_pre_hook(lambda _, loaded: self.check_loadable(loaded))
        try:
            super().load_state_dict(state_dict)
        finally:
            check.remove()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Where state comes in by every route (load_state_dict, copy.deepcopy,
        unpickling), before any post-hook sees it."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)  # saved before the option existed
        self.state_installed()

    def state_installed(self) -> None:
        """Bring state that came in to what a step expects (Lamb16: fp8 again)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step for every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update_eagerly(self.ascend_or_descend)
        return loss

    def ascend_or_descend(self) -> None:
        with ascending(self.param_groups):
            self.update_groups()

    def update_groups(self) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self.check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

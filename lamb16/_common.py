"""What Lamb and Lamb16 share: hyperparameter checks and the walk over parameters."""

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """Raise ValueError naming the first invalid hyperparameter."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (must be a pair)")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")


def check_float32_params(group: dict[str, Any], optimizer: str) -> None:
    """Both optimizers do their arithmetic in float32 and update in place, so they
    take float32 parameters only; a half-precision model keeps float32 master
    weights, as it would for any other optimizer without AMP."""
    for param in group["params"]:
        if param.dtype != torch.float32:
            raise ValueError(
                f"{optimizer} supports float32 parameters only, got {param.dtype} "
                f"(shape {tuple(param.shape)}); keep float32 weights, e.g. model.float()"
            )


def params_with_grad(group: dict[str, Any], optimizer: str) -> Iterator[Tensor]:
    """The parameters of a group that have a gradient and at least one element."""
    for param in group["params"]:
        if param.grad is None or param.numel() == 0:
            continue
        if param.grad.is_sparse:
            raise RuntimeError(
                f"{optimizer} does not support sparse gradients; "
                "use dense gradients (e.g. nn.Embedding(sparse=False))"
            )
        yield param


def adam_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters both updates take, as their keyword arguments."""
    beta1, beta2 = group["betas"]
    return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


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
    optimizer: Optimizer, group: dict[str, Any], name: str, init_state: Callable[[dict, Tensor], None]
) -> list[tuple[Tensor, dict[str, Any]]]:
    """(parameter, state) for each parameter of a group that has a gradient, its
    state initialised on first use and its step counted (one call for all)."""
    pairs = []
    for param in params_with_grad(group, name):
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


class CheckedOptimizer(Optimizer):
    """An Optimizer that validates every param group as it is added, whether by
    the constructor or by `add_param_group`, and keeps none that fails."""

    def check_group(self, group: dict[str, Any]) -> None:
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        check_float32_params(group, type(self).__name__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self.check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

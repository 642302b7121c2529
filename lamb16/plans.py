"""A parameter group's kernel table, kept from one step to the next: the CPU
fast path's Python side, cut to what must be done each step.

A full step checks every tensor and its state, sorts the group's tensors
between the CPU kernels and the other paths, and writes a table of their
addresses: for a model of forty tensors that takes more host time than the
kernels take on small ones. A group whose every tensor took one kernel in its
last full step keeps that step's table (a Plan). The next step checks, tensor
by tensor, only what can have changed since: that the same parameters have
gradients, laid out as their parameters and on the CPU, that the parameters
and their state are the same tensors at the same addresses (a load, a
deepcopy, `.data =` or a model cast makes new ones), and for a single pass
that nothing changed the weights behind its back. It writes the gradients'
addresses in, counts the steps and calls the kernel. Anything else takes the
full step, which makes a new plan.
"""

import array
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import Job

GRAD_COLUMN = 1  # every Lamb16 table's rows: param, grad, ...


@dataclass
class Plan:
    group: dict[str, Any]  # the group it was made for, and the options it was made under
    options: tuple
    kernel: str
    params: list[Tensor]
    states: list[dict[str, Any]]
    tensors: list[tuple[Tensor, ...]]  # per row, every state tensor the row (or the step counter) holds
    shapes: list[tuple[torch.Size, tuple[int, ...]]]
    addresses: list[int]  # each parameter's
    steps: list[Tensor]
    table: array.array
    columns: int


def options_of(group: dict[str, Any]) -> tuple:
    return tuple(group.get(key) for key in ("scaling", "single_pass", "block_size", "fused"))


def make_plan(group: dict[str, Any], kernel: str, jobs: list[Job], table: array.array,
              states: list[dict[str, Any]]) -> Plan:
    """The plan of a group whose every parameter with a gradient took `kernel`
    in the step just made, with that step's jobs and table."""
    params = [inputs[0] for inputs, _, _ in jobs]
    return Plan(
        group=group, options=options_of(group), kernel=kernel, params=params, states=states,
        tensors=[tuple(value for value in state.values() if isinstance(value, Tensor)) for state in states],
        shapes=[(p.shape, p.stride()) for p in params], addresses=[p.data_ptr() for p in params],
        steps=[state["step"] for state in states], table=table, columns=len(table) // max(1, len(jobs)),
    )


def ready(plan: Plan, group: dict[str, Any], params: list[Tensor], optimizer_state: Any) -> bool:
    """Whether the plan holds for this step of `group` (its parameters with a
    gradient: `params`); if so, the gradients' addresses are in its table."""
    if plan.group is not group or plan.options != options_of(group) or len(params) != len(plan.params):
        return False
    table, columns = plan.table, plan.columns
    for row, param in enumerate(params):
        grad = param.grad
        shape, stride = plan.shapes[row]
        if (param is not plan.params[row] or grad.is_sparse or grad.dtype is not torch.float32 or not grad.is_cpu
                or grad.shape != shape or grad.stride() != stride or param.data_ptr() != plan.addresses[row]):
            return False
        state = optimizer_state.get(param)
        if state is not plan.states[row] or not same_tensors(state, plan.tensors[row]):
            return False
        table[row * columns + GRAD_COLUMN] = grad.data_ptr()
    return True


def same_tensors(state: dict[str, Any], tensors: tuple[Tensor, ...]) -> bool:
    """Whether a state holds the very tensors it held (none replaced or added)."""
    values = [value for value in state.values() if isinstance(value, Tensor)]
    return len(values) == len(tensors) and all(a is b for a, b in zip(values, tensors))

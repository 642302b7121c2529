"""LAMB: Adam's per-element step rescaled per tensor by a trust ratio ||w|| / ||update||."""

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import sharded
from ._common import (
    in_layout_of,
    lies_as_state,
    CheckedOptimizer,
    Job,
    adam_hyperparameters,
    check_flag,
    init_step_and_statistics,
    is_dtensor,
    local_piece,
    stepped_states,
)
from .dispatch import run_updates

# The paper's phi: the weight norm enters the trust ratio clamped at this value.
MAX_WEIGHT_NORM = 10.0


def trust_ratio(weight_norm: Tensor, update_norm: Tensor) -> Tensor:
    """||w|| / ||u||, or 1 where either norm is zero (nothing to scale against)."""
    both_positive = (weight_norm > 0) & (update_norm > 0)
    return torch.where(both_positive, weight_norm / update_norm, torch.ones_like(weight_norm))


# A step's reductions over one tensor (columns of lamb_partials()): sums, which
# the pieces of a sharded tensor add up.
PARTIALS = ("weight_sum", "update_sum")
COMBINE = ("sum", "sum")

Number = float | Tensor  # hyperparameters: floats, or 0-dim tensors on the compiled path


def lamb_direction(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: Number, beta1: Number, beta2: Number,
    eps: Number, weight_decay: Number, bias_correction: bool,
) -> Tensor:
    """Adam's update from the new moments, bias-corrected if asked, plus decoupled weight decay."""
    m, v = exp_avg, exp_avg_sq
    if bias_correction:
        m = m / (1 - beta1**step)
        v = v / (1 - beta2**step)
    return (m / (v.sqrt() + eps)).add_(param * weight_decay)


def lamb_partials(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: Number, beta1: Number,
    beta2: Number, eps: Number, weight_decay: Number, bias_correction: bool,
) -> Tensor:
    """First pass: the moving averages, in place, and the PARTIALS (square sums
    of the weights and of the update)."""
    exp_avg.mul_(beta1).add_(grad * (1 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
    update = lamb_direction(param, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, bias_correction=bias_correction)
    return torch.stack([param.square().sum(), update.square().sum()])


def lamb_finish(
    partials: Tensor, *, adam: bool, max_weight_norm: Number = MAX_WEIGHT_NORM
) -> tuple[Tensor, Tensor, Tensor]:
    """From a whole tensor's partials (the last dimension; any leading ones are
    tensors side by side): (weight_norm, adam_norm, trust_ratio)."""
    weight_sum, update_sum = partials.unbind(-1)
    weight_norm, adam_norm = weight_sum.sqrt().clamp(max=max_weight_norm), update_sum.sqrt()
    trust = torch.ones_like(adam_norm) if adam else trust_ratio(weight_norm, adam_norm)
    return weight_norm, adam_norm, trust


def lamb_apply(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor, *, step: Number,
    beta1: Number, beta2: Number, eps: Number, weight_decay: Number, bias_correction: bool,
) -> None:
    """Second pass: the update again, from the moments the first pass wrote; the
    weights move by step_size (lr * trust) times it. (`grad` is unused: the
    arguments are those of every pass.)"""
    update = lamb_direction(param, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, bias_correction=bias_correction)
    param.sub_(update.mul_(step_size))


def lamb_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: Number,
    lr: Number,
    beta1: Number,
    beta2: Number,
    eps: Number,
    weight_decay: Number,
    adam: bool,
    bias_correction: bool,
    max_weight_norm: Number = MAX_WEIGHT_NORM,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LAMB step on one tensor, in place on `param`, `exp_avg` and `exp_avg_sq`:
    the reference implementation. Returns (weight_norm, adam_norm, trust_ratio)
    as 0-dim tensors, for logging. Numbers may be floats or 0-dim tensors.
    """
    moments = dict(step=step, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   bias_correction=bias_correction)
    partials = lamb_partials(param, grad, exp_avg, exp_avg_sq, **moments)
    results = lamb_finish(partials, adam=adam, max_weight_norm=max_weight_norm)
    lamb_apply(param, grad, exp_avg, exp_avg_sq, results[2] * lr, **moments)
    return results


def lamb_sharded_steps(
    jobs: list[Job], params: list[Tensor], fused: bool | None, *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, adam: bool, bias_correction: bool, max_weight_norm: float,
) -> None:
    """lamb_update() of DTensor parameters, each job on this process's pieces:
    pass 1, the square sums added over the shards (one collective per process
    group), the norms and trust ratio finished, then pass 2 (lamb16.sharded)."""
    moments = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
    taken = sharded.on_kernels(jobs, fused, "lamb_partials")
    partials = sharded.first_pass(lamb_partials, "lamb_partials", jobs, fused, taken, len(PARTIALS),
                                  **moments)
    partials = sharded.combine_over_shards(partials, params, COMBINE)
    results = lamb_finish(partials, adam=adam, max_weight_norm=max_weight_norm)
    # The outputs' values (norms, trust ratio), then the step size that pass 2 takes.
    finished = torch.stack([*results, results[2] * lr], dim=1)
    sharded.second_pass(lamb_apply, "lamb_applies", jobs, fused, taken, finished, [3], **moments)


class Lamb(CheckedOptimizer):
    """LAMB (You et al. 2019, arXiv 1904.00962), as the widely used PyTorch port computes it.

    Adam's update m / (sqrt(v) + eps) plus decoupled weight decay, scaled per
    tensor by min(||w||, max_weight_norm) / ||update|| so that every layer moves
    by a similar fraction of its weights (max_weight_norm=None: no clamp, the
    paper's identity phi; with bias_correction=True that is the paper's LAMB). Use it for large-batch training where Adam needs
    its learning rate tuned per batch size; `adam=True` drops the trust ratio
    (Adam with decoupled decay, for comparison). No bias correction unless
    `bias_correction=True`. State: two float32 tensors per parameter (8 bytes
    per element); see `Lamb16` for the same idea in 2 bytes.

    After each step, `optimizer.state[p]` holds `weight_norm`, `adam_norm` and
    `trust_ratio` of that step as 0-dim tensors, for logging (updated in place, as
    the moments are: keep `.item()` for a history). `fused` as for
    `Lamb16`: None or True runs the fused step (CPU kernels, or torch.compile
    off the CPU), False the eager reference; so are `maximize` and a parameter
    whose memory layout changes between steps.
    """

    element_state = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    scalar_state = ("step", "weight_norm", "adam_norm", "trust_ratio")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        adam: bool = False,
        bias_correction: bool = False,
        max_weight_norm: float | None = MAX_WEIGHT_NORM,
        fused: bool | None = None,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            adam=adam,
            bias_correction=bias_correction,
            max_weight_norm=max_weight_norm,
            fused=fused,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_flag("adam", group["adam"])
        check_flag("bias_correction", group["bias_correction"])
        limit = group["max_weight_norm"]
        if limit is not None and not limit > 0:
            raise ValueError(f"Invalid max_weight_norm value: {limit} (must be > 0, or None for no clamp)")

    def update_groups(self) -> None:
        for group, params in zip(self.param_groups, self.params_to_step()):
            hyper = adam_hyperparameters(group)
            limit = group.get("max_weight_norm", MAX_WEIGHT_NORM)  # absent from older state_dicts
            # No clamp is a clamp at infinity: one compiled graph and one kernel argument for both.
            hyper.update(adam=group["adam"], bias_correction=group["bias_correction"],
                         max_weight_norm=math.inf if limit is None else limit)
            jobs: list[Job] = []
            sharded_jobs: list[Job] = []
            relaid: list[tuple[Tensor, Tensor]] = []  # (parameter, its copy in its state's layout)
            for param, state in stepped_states(self, params, init_state):
                pieces = [local_piece(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                if not is_dtensor(param) and not lies_as_state(pieces):  # the layout moved since the state was made
                    pieces[:2] = [in_layout_of(pieces[2], t) for t in pieces[:2]]
                    relaid.append((param, pieces[0]))
                inputs = tuple(pieces)
                outputs = (state["weight_norm"], state["adam_norm"], state["trust_ratio"])
                (sharded_jobs if is_dtensor(param) else jobs).append(
                    (inputs, outputs, {"step": float(state["step"])}))
            run_updates(lamb_update, "lamb_steps", jobs, group["fused"], **hyper)
            if sharded_jobs:
                sharded_params = [p for p in params if is_dtensor(p)]
                lamb_sharded_steps(sharded_jobs, sharded_params, group["fused"], **hyper)
            for param, copy in relaid:
                param.copy_(copy)


def init_state(state: dict[str, Tensor], param: Tensor) -> None:
    """Zero moments, the step counter and the statistics."""
    init_step_and_statistics(state, param)
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

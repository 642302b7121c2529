"""LAMB16: LAMB with its per-element moments stored in float8, and a learning-rate-aware trust ratio."""

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import native, sharded
from ._common import (
    CheckedOptimizer,
    Job,
    adam_hyperparameters,
    init_step_and_statistics,
    is_dtensor,
    local_piece,
    stepped_states,
)
from .dispatch import run_updates
from .quantize import (
    E4M3,
    E5M2,
    SCALINGS,
    absmax_scales_from_maxima,
    dequantize,
    seed_scales_from_sums,
    seed_sums,
    write_absmax,
    write_seed,
)

# Each squared element enters the weight and update norms clamped to [eps, MAX_SQUARE].
MAX_SQUARE = 1.0
# The learning rate the trust ratio is calibrated for: at lr = REFERENCE_LR the
# lr-aware factor is 1, and it rescales the ratio when lr is far from it.
REFERENCE_LR = 1e-3
MAX_TRUST = 2.0


def clamped_square_sum(x: Tensor, eps: float | Tensor) -> Tensor:
    """sum(clamp(x*x, eps, 1)): what a clamped norm sums, one huge or dead element
    weighing no more than one ordinary element."""
    return x.square().clamp(min=eps).clamp(max=MAX_SQUARE).sum()


def lamb16_trust_ratio(
    weight_norm: Tensor, update_norm: Tensor, lr: float | Tensor, trust_scale: float | Tensor
) -> Tensor:
    """(w / u * 1e-3 / lr) ** trust_scale, clamped to [0, 2]. The factor 1e-3 / lr
    keeps the step size sensible when lr is far from the usual 1e-3, and the
    exponent softens the layer-wise ratio."""
    return ((weight_norm / update_norm / lr * REFERENCE_LR) ** trust_scale).clamp(0, MAX_TRUST)


Number = float | Tensor  # hyperparameters: floats, or 0-dim tensors on the compiled path


def usable_gradient(grad: Tensor) -> Tensor:
    """The gradient with each element that is NaN or infinite, or whose square
    overflows float32 (|g| above about 1.8e19), taken as 0 for this step. One
    such element would otherwise reach every element of its tensor through the
    fp8 scales and the norms, for good; this way the element's moments decay
    as with a zero gradient and everything stays finite. Finite gradients are
    untouched, bit for bit."""
    return torch.where(grad * grad < math.inf, grad, 0.0)


def new_moments(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    beta1: Number, beta2: Number,
) -> tuple[Tensor, Tensor]:
    """This step's float32 moments: the stored ones decompressed, then Adam's moving averages."""
    grad = usable_gradient(grad)
    m = dequantize(exp_avg, exp_avg_scale) * beta1 + grad * (1 - beta1)
    v = dequantize(exp_avg_sq, exp_avg_sq_scale) * beta2 + grad * grad * (1 - beta2)
    return m, v


def adam_direction(m: Tensor, v: Tensor, param: Tensor, eps: Number, weight_decay: Number) -> Tensor:
    """m / (sqrt(v) + eps) plus decoupled weight decay, from this step's float32 moments."""
    return m / (v.sqrt() + eps) + param * weight_decay


# A step's reductions over one tensor, as the partial sums and maxima that the
# pieces of a sharded tensor add up (or take the largest of): columns of
# lamb16_partials(), and how they combine.
PARTIALS = ("m_stat", "v_stat", "weight_sum", "update_sum")
COMBINE = {"absmax": ("max", "max", "sum", "sum"), "seed": ("sum", "sum", "sum", "sum")}


def lamb16_partials(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    *, beta1: Number, beta2: Number, eps: Number, weight_decay: Number, scaling: str,
) -> Tensor:
    """First pass: every reduction of the step, reading only the old state, the
    gradient and the weights, as the PARTIALS (largest |m| and v for absmax, or
    sums of clamp(x*x, 0, 10) for seed; the clamped square sums of the weights
    and the update). A tensor's pieces give its partials by COMBINE."""
    m, v = new_moments(grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, beta1, beta2)
    if scaling == "seed":
        m_stat, v_stat = seed_sums(m, v)
    else:
        m_stat, v_stat = m.abs().amax(), v.amax()
    update = adam_direction(m, v, param, eps, weight_decay)
    return torch.stack([m_stat, v_stat, clamped_square_sum(param, eps), clamped_square_sum(update, eps)])


def lamb16_finish(
    partials: Tensor, numel: int | Tensor, *, lr: Number, eps: Number, trust_scale: Number, scaling: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From a whole tensor's partials (the last dimension, PARTIALS; any leading
    ones are tensors side by side): (new m scale, new v scale, weight_norm,
    adam_norm, trust_ratio)."""
    m_stat, v_stat, weight_sum, update_sum = partials.unbind(-1)
    if scaling == "seed":
        m_scale, v_scale = seed_scales_from_sums(m_stat, v_stat, numel, eps)
    else:
        m_scale, v_scale = absmax_scales_from_maxima(m_stat, v_stat)
    weight_norm, adam_norm = weight_sum.sqrt() / numel, update_sum.sqrt() / numel
    trust = lamb16_trust_ratio(weight_norm, adam_norm, lr, trust_scale)
    return m_scale, v_scale, weight_norm, adam_norm, trust


def lamb16_apply(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    new_exp_avg_scale: Tensor, new_exp_avg_sq_scale: Tensor, step_size: Tensor,
    *, beta1: Number, beta2: Number, eps: Number, weight_decay: Number, scaling: str,
) -> None:
    """Second pass: the same moments and update, recomputed from the old state
    (cheaper than keeping them), stored in fp8 with the new scales; the weights
    move by step_size (lr * trust) times the update."""
    m, v = new_moments(grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, beta1, beta2)
    update = adam_direction(m, v, param, eps, weight_decay)
    write = write_seed if scaling == "seed" else write_absmax
    write(m, v, new_exp_avg_scale, new_exp_avg_sq_scale, exp_avg, exp_avg_sq)
    param.sub_(update * step_size)


def lamb16_update(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    *, lr: Number, beta1: Number, beta2: Number, eps: Number, weight_decay: Number, trust_scale: Number, scaling: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LAMB16 step on one tensor: the reference implementation, in the two
    passes over memory that the arithmetic needs (the fp8 scales and the trust
    ratio are reductions over the whole tensor, known only after a first pass).

    Updates `param`, `exp_avg` (e4m3) and `exp_avg_sq` (e5m2) in place and
    returns (exp_avg_scale, exp_avg_sq_scale, weight_norm, adam_norm, trust_ratio).
    """
    moments = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scaling=scaling)
    state = (param, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale)
    partials = lamb16_partials(*state, **moments)
    results = lamb16_finish(partials, param.numel(), lr=lr, eps=eps, trust_scale=trust_scale, scaling=scaling)
    m_scale, v_scale, _, _, trust = results
    lamb16_apply(*state, m_scale, v_scale, trust * lr, **moments)
    return results


def lamb16_sharded_steps(
    jobs: list[Job], params: list[Tensor], fused: bool | None, *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, trust_scale: float, scaling: str,
) -> None:
    """lamb16_update() of DTensor parameters, each job on this process's pieces:
    pass 1, the partials combined over the shards (one collective per process
    group), finished as for a whole tensor, then pass 2 (lamb16.sharded)."""
    moments = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scaling=scaling)
    native_rows = sharded.on_native(jobs, fused)
    partials = sharded.first_pass(lamb16_partials, native.lamb16_partials, jobs, fused, native_rows,
                                  len(PARTIALS), **moments)
    partials = sharded.combine_over_shards(partials, params, COMBINE[scaling])
    numel = torch.tensor([float(p.numel()) for p in params], device=partials.device)
    results = lamb16_finish(partials, numel, lr=lr, eps=eps, trust_scale=trust_scale, scaling=scaling)
    # The outputs' values (new scales, norms, trust ratio), then the step size; pass 2 takes columns 0, 1, 5.
    finished = torch.stack([*results, results[4] * lr], dim=1)
    sharded.second_pass(lamb16_apply, native.lamb16_applies, jobs, fused, native_rows, finished, [0, 1, 5],
                        **moments)


class Lamb16(CheckedOptimizer):
    """LAMB16: LAMB whose Adam moments take 16 bits per parameter instead of 64.

    The first moment is stored as float8_e4m3fn and the second as float8_e5m2,
    each with one float32 scale per tensor: a quarter of Adam's or LAMB's state
    memory, with per-element adaptive learning rates kept (unlike factored
    optimizers). The trust ratio is learning-rate aware:
    clamp(((||w|| / ||u||) * 1e-3 / lr) ** trust_scale, 0, 2), with both norms
    taken as sqrt(sum(clamp(x*x, eps, 1))) / n. No bias correction.

    Use it in place of Adam or LAMB where optimizer state memory matters, and
    for large batches with learning rates far from 1e-3. Parameters must be
    float32 (no AMP needed).

    scaling: "absmax" (default) maps each tensor's largest |m| and v to the top
        of the fp8 range, so the stored moments stay within fp8's resolution;
        "seed" is the original proof-of-concept's arithmetic, which saturates
        the first moment of large tensors (kept to reproduce its figures).
    fused: None (default) or True runs the update fused into two passes over
        memory: on the CPU, C++ kernels built once per machine (lamb16.native);
        elsewhere, the reference compiled by torch.compile (lamb16.compiled). It
        falls back to the reference with one warning where it cannot build or
        compile; False always runs the eager reference.

    After each step, `optimizer.state[p]` holds `weight_norm`, `adam_norm` and
    `trust_ratio` of that step as 0-dim tensors, for logging (updated in place, as
    the moments are: keep `.item()` for a history).
    """

    element_state = {"exp_avg": E4M3, "exp_avg_sq": E5M2}
    scalar_state = ("exp_avg_scale", "exp_avg_sq_scale", "step", "weight_norm", "adam_norm", "trust_ratio")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_scale: float = 0.382,
        scaling: str = "absmax",
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            trust_scale=trust_scale,
            scaling=scaling,
            fused=fused,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        if not 0.0 <= group["trust_scale"]:
            raise ValueError(f"Invalid trust_scale value: {group['trust_scale']} (must be >= 0)")
        if group["scaling"] not in SCALINGS:
            raise ValueError(f"Invalid scaling: {group['scaling']!r} (choose one of {', '.join(SCALINGS)})")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict casts floating-point state to the parameter's
        # dtype, which would turn the fp8 moments into float32 (4x the memory).
        # fp8 -> float32 -> fp8 is exact, so casting back loses nothing.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "exp_avg" in state:
                state["exp_avg"] = state["exp_avg"].to(E4M3)
                state["exp_avg_sq"] = state["exp_avg_sq"].to(E5M2)

    def update_groups(self) -> None:
        for group, params in zip(self.param_groups, self.params_to_step()):
            hyper = adam_hyperparameters(group)
            hyper.update(trust_scale=group["trust_scale"], scaling=group["scaling"])
            jobs: list[Job] = []
            sharded_jobs: list[Job] = []
            for param, state in stepped_states(self, params, init_state):
                m_scale, v_scale = state["exp_avg_scale"], state["exp_avg_sq_scale"]
                pieces = [local_piece(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                inputs = (*pieces, m_scale, v_scale)
                # The new scales replace the old in place; then the step's statistics.
                outputs = (m_scale, v_scale, state["weight_norm"], state["adam_norm"], state["trust_ratio"])
                (sharded_jobs if is_dtensor(param) else jobs).append((inputs, outputs, {}))
            run_updates(lamb16_update, native.lamb16_steps, jobs, group["fused"], **hyper)
            if sharded_jobs:
                sharded_params = [p for p in params if is_dtensor(p)]
                lamb16_sharded_steps(sharded_jobs, sharded_params, group["fused"], **hyper)


def init_state(state: dict[str, Tensor], param: Tensor) -> None:
    """Zero moments in fp8 and unit scales, as the first step expects; the step
    counter and the statistics."""
    init_step_and_statistics(state, param)
    # zeros_like of a DTensor is a DTensor placed as it is: state sharded as its parameter.
    state["exp_avg"] = torch.zeros_like(param, dtype=E4M3, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=E5M2, memory_format=torch.preserve_format)
    state["exp_avg_scale"] = torch.ones((), device=param.device)
    state["exp_avg_sq_scale"] = torch.ones((), device=param.device)

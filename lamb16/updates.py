"""LAMB16's step on one tensor as pure functions, the reference every faster
path is tested against: the moments, the norms and the trust ratio, then the
writes, for each scaling (one scale per tensor, absmax or seed; a grid of
block scales), in the exact step's two passes and in the single pass. Lamb16
(lamb16.py) runs them, or the kernels and the compiled path that match them."""

import math
from typing import Any

import torch
from torch import Tensor

from .quantize import (
    E4M3,
    E4M3_MAX,
    E5M2,
    E5M2_MAX,
    E5M2_SMALLEST,
    absmax_scales_from_maxima,
    as_rows,
    block_codes,
    block_maxima,
    dequantize,
    dequantize_blocks,
    seed_scales_from_sums,
    seed_sums,
    write_absmax,
    from_rows,
    write_seed,
)

# Each squared element enters the weight and update norms clamped to [eps, MAX_SQUARE].
MAX_SQUARE = 1.0
# The learning rate the trust ratio is calibrated for: at lr = REFERENCE_LR the
# lr-aware factor is 1, and it rescales the ratio when lr is far from it.
REFERENCE_LR = 1e-3
MAX_TRUST = 2.0
# Which lr the trust ratio reads under a schedule (Lamb16's trust_lr).
TRUST_LRS = ("scheduled", "initial")
# Elements that share a scale with scaling="block": 2 + 8 / 256 = 2.03 bytes of state an element.
DEFAULT_BLOCK_SIZE = 256


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


def norms_and_trust(
    weight_sum: Tensor, update_sum: Tensor, numel: int | Tensor, trust_lr: Number, trust_scale: Number
) -> tuple[Tensor, Tensor, Tensor]:
    """(weight_norm, adam_norm, trust_ratio) from a whole tensor's clamped square sums."""
    weight_norm, adam_norm = weight_sum.sqrt() / numel, update_sum.sqrt() / numel
    return weight_norm, adam_norm, lamb16_trust_ratio(weight_norm, adam_norm, trust_lr, trust_scale)


def lamb16_finish(
    partials: Tensor, numel: int | Tensor, *, trust_lr: Number, eps: Number, trust_scale: Number, scaling: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From a whole tensor's partials (the last dimension, PARTIALS; any leading
    ones are tensors side by side): (new m scale, new v scale, weight_norm,
    adam_norm, trust_ratio)."""
    m_stat, v_stat, weight_sum, update_sum = partials.unbind(-1)
    if scaling == "seed":
        m_scale, v_scale = seed_scales_from_sums(m_stat, v_stat, numel, eps)
    else:
        m_scale, v_scale = absmax_scales_from_maxima(m_stat, v_stat)
    return m_scale, v_scale, *norms_and_trust(weight_sum, update_sum, numel, trust_lr, trust_scale)


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
    *, lr: Number, trust_lr: Number, beta1: Number, beta2: Number, eps: Number, weight_decay: Number,
    trust_scale: Number, scaling: str,
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
    results = lamb16_finish(partials, param.numel(), trust_lr=trust_lr, eps=eps, trust_scale=trust_scale,
                            scaling=scaling)
    m_scale, v_scale, _, _, trust = results
    lamb16_apply(*state, m_scale, v_scale, trust * lr, **moments)
    return results


# ------------------------------------------------------------ single pass
#
# What a single-pass step carries over to the next, per tensor (state["carry"]):
# the norm of the weights as it wrote them; per moment, the statistic the next
# step's scale starts from (absmax: the largest |m| and v as stored; seed: the
# scales computed from this step's moments); and 1 where the tensor's last step
# wrote them, 0 where it was an exact step, which writes none.
CARRY = ("weight_norm", "m_stat", "v_stat", "written")


def gradient_absmax(grad: Tensor) -> Tensor:
    """The largest |g| the step will use (non-finite elements count as 0)."""
    return usable_gradient(grad).abs().amax()


def stats_after_exact_step(exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor, scaling: str) -> tuple[Tensor, Tensor]:
    """The carry's moment statistics where an exact step (which writes none)
    stored the moments: exactly these. Its largest absmax moments sit at the
    top of the fp8 range, and seed moments are stored with their own seed scales."""
    if scaling == "seed":
        return exp_avg_scale, exp_avg_sq_scale
    return exp_avg_scale * E4M3_MAX, exp_avg_sq_scale * E5M2_MAX


def single_pass_scales(
    m_stat: Tensor, v_stat: Tensor, grad: Tensor, *, beta1: Number, beta2: Number, scaling: str
) -> tuple[Tensor, Tensor]:
    """The scales a single-pass step stores its moments with, known before it
    reads them. absmax: from exact bounds, |m| <= b1 max|m_old| + (1 - b1) max|g|
    and v <= b2 max v_old + (1 - b2) max g*g (written in the order new_moments()
    computes, so that rounding keeps them bounds), so nothing saturates; seed:
    the scales the last step computed from its moments."""
    if scaling == "seed":
        return m_stat, v_stat
    return bounded_scales(m_stat, v_stat, gradient_absmax(grad), beta1, beta2)


def bounded_scales(m_stat: Tensor, v_stat: Tensor, grad_absmax: Tensor, beta1: Number,
                   beta2: Number) -> tuple[Tensor, Tensor]:
    """single_pass_scales() with absmax scales, from the gradient's largest |g|
    (any tensors of the same shape: many tensors side by side)."""
    m_bound = m_stat * beta1 + grad_absmax * (1 - beta1)
    v_bound = v_stat * beta2 + grad_absmax * grad_absmax * (1 - beta2)
    return absmax_scales_from_maxima(m_bound, v_bound)


def next_stats(m: Tensor, v: Tensor, m_scale: Tensor, v_scale: Tensor, eps: Number, scaling: str) -> tuple[Tensor, Tensor]:
    """What the next single-pass step's scales start from. absmax: the largest
    |m| and v as write_absmax() stores them (fp8 rounding is monotonic, so the
    largest code is the largest value's); seed: this step's moments' seed scales."""
    if scaling == "seed":
        return next_stats_from(*seed_sums(m, v), m_scale, v_scale, m.numel(), eps, scaling)
    return next_stats_from(m.abs().amax(), v.amax(), m_scale, v_scale, m.numel(), eps, scaling)


def next_stats_from(m_stat: Tensor, v_stat: Tensor, m_scale: Tensor, v_scale: Tensor, numel: int | Tensor,
                    eps: Number, scaling: str) -> tuple[Tensor, Tensor]:
    """next_stats() from the moments' reductions (absmax: the largest |m| and v;
    seed: their sums of clamp(x*x, 0, 10)), of one tensor or many side by side."""
    if scaling == "seed":
        return seed_scales_from_sums(m_stat, v_stat, numel, eps)
    m_top = dequantize((m_stat * (1 / m_scale)).to(E4M3), m_scale)
    v_top = dequantize((v_stat * (1 / v_scale)).clamp(min=E5M2_SMALLEST).to(E5M2), v_scale)
    return m_top, v_top


def weight_norm_of(param: Tensor, eps: Number) -> Tensor:
    return clamped_square_sum(param, eps).sqrt() / param.numel()


def lamb16_single_pass_reductions(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    carry: Tensor, adam_norm: Tensor,
    *, lr: Number, trust_lr: Number, beta1: Number, beta2: Number, eps: Number, weight_decay: Number,
    trust_scale: Number, scaling: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The single pass's reductions, reading the tensors and writing nothing:
    this step's scales (from the carry, and for absmax the gradient's largest),
    the trust ratio, the new update's norm, the norm of the weights as this step
    will leave them, and the moments' statistics the next step starts from.
    Returns what lamb16_single_pass_update() returns."""
    m_scale, v_scale = single_pass_scales(carry[1], carry[2], grad, beta1=beta1, beta2=beta2, scaling=scaling)
    weight_norm = carry[0]
    trust = lamb16_trust_ratio(weight_norm, adam_norm, trust_lr, trust_scale)
    m, v = new_moments(grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, beta1, beta2)
    update = adam_direction(m, v, param, eps, weight_decay)
    new_adam_norm = clamped_square_sum(update, eps).sqrt() / param.numel()
    new_carry = torch.stack([weight_norm_of(param - update * (trust * lr), eps),
                             *next_stats(m, v, m_scale, v_scale, eps, scaling), torch.ones_like(weight_norm)])
    return m_scale, v_scale, weight_norm, new_adam_norm, trust, new_carry


def lamb16_single_pass_writes(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    carry: Tensor, adam_norm: Tensor, m_scale: Tensor, v_scale: Tensor, weight_norm: Tensor, new_adam_norm: Tensor,
    trust: Tensor, new_carry: Tensor,
    *, lr: Number, beta1: Number, beta2: Number, eps: Number, weight_decay: Number, scaling: str, **_: Any,
) -> tuple[()]:
    """The single pass's writes, given its reductions' results: the moments
    stored over this step's scales, the weights moved."""
    m, v = new_moments(grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, beta1, beta2)
    update = adam_direction(m, v, param, eps, weight_decay)
    write = write_seed if scaling == "seed" else write_absmax
    write(m, v, m_scale, v_scale, exp_avg, exp_avg_sq)
    param.sub_(update * (trust * lr))
    return ()


def lamb16_single_pass_update(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor, exp_avg_sq_scale: Tensor,
    carry: Tensor, adam_norm: Tensor,
    *, lr: Number, trust_lr: Number, beta1: Number, beta2: Number, eps: Number, weight_decay: Number,
    trust_scale: Number, scaling: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One single-pass LAMB16 step on one tensor, the reference: everything it
    needs before writing comes from the carry, the last step's update norm
    (`adam_norm`) and the gradient's absmax, so the fused kernels read the
    weights, gradient and codes once. Its trust ratio takes the last step's
    update norm in place of this one's; the weight norm is exact (that of the
    weights the last step wrote, which the caller recomputes where anything
    else changed them).

    Written as its reductions, then its writes (`phases`): the compiled path
    runs each as a graph of its own, as in one Inductor keeps the update
    between them in a float32 buffer the size of the tensor.

    Returns (exp_avg_scale, exp_avg_sq_scale, weight_norm, adam_norm, trust_ratio,
    carry) as they are after the step.
    """
    state = (param, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, carry, adam_norm)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scaling=scaling)
    results = lamb16_single_pass_reductions(*state, trust_lr=trust_lr, trust_scale=trust_scale, **hyper)
    lamb16_single_pass_writes(*state, *results, **hyper)
    return results


lamb16_single_pass_update.phases = (lamb16_single_pass_reductions, lamb16_single_pass_writes)


# ------------------------------------------------------------ block scales
#
# scaling="block": the moments' scales are a grid, one per block of
# block_size elements of each row (lamb16.quantize). The update, the norms
# and the trust ratio are those of the other scalings; only the stored
# moments' scales differ. The reference works on the tensors seen as rows;
# `phase` (0 but for a piece of a sharded 1-D tensor) says where in its first
# block a row begins.


def block_moments(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor, exp_avg_sq_scales: Tensor,
    beta1: Number, beta2: Number, block_size: int, phase: int,
) -> tuple[Tensor, Tensor]:
    """This step's float32 moments as rows, as new_moments() computes them,
    each element dequantized with its block's scale."""
    rows = exp_avg_scales.shape[0]
    grad = usable_gradient(as_rows(grad, rows))
    m = dequantize_blocks(as_rows(exp_avg, rows), exp_avg_scales, block_size, phase) * beta1 + grad * (1 - beta1)
    v = dequantize_blocks(as_rows(exp_avg_sq, rows), exp_avg_sq_scales, block_size, phase) * beta2 \
        + grad * grad * (1 - beta2)
    return m, v


def block_update(m: Tensor, v: Tensor, param: Tensor, eps: Number, weight_decay: Number) -> Tensor:
    """adam_direction() of moments given as rows, in the parameter's shape (the
    weights are read only as they are: a view of them as rows, read while they
    are written, is what Inductor fuses wrongly)."""
    return adam_direction(from_rows(m, param), from_rows(v, param), param, eps, weight_decay)


def lamb16_block_partials(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, *, beta1: Number, beta2: Number, eps: Number, weight_decay: Number, block_size: int,
    phase: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """First pass: the clamped square sums of the weights and the update (as a
    pair, which a tensor's pieces add up), and each block's largest |m| and |v|."""
    m, v = block_moments(grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales, beta1, beta2, block_size, phase)
    update = block_update(m, v, param, eps, weight_decay)
    sums = torch.stack([clamped_square_sum(param, eps), clamped_square_sum(update, eps)])
    return (sums, *block_maxima(m, v, block_size, phase))


def lamb16_block_apply(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, new_exp_avg_scales: Tensor, new_exp_avg_sq_scales: Tensor, step_size: Tensor,
    *, beta1: Number, beta2: Number, eps: Number, weight_decay: Number, block_size: int, phase: int = 0,
) -> None:
    """Second pass: the same moments and update, stored over the new block
    scales; the weights move by step_size times the update."""
    m, v = block_moments(grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales, beta1, beta2, block_size, phase)
    update = block_update(m, v, param, eps, weight_decay)
    m_codes, v_codes = block_codes(m, v, new_exp_avg_scales, new_exp_avg_sq_scales, block_size, phase)
    exp_avg.copy_(from_rows(m_codes, exp_avg))
    exp_avg_sq.copy_(from_rows(v_codes, exp_avg_sq))
    param.sub_(update * step_size)


def lamb16_block_update(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, *, lr: Number, trust_lr: Number, beta1: Number, beta2: Number, eps: Number,
    weight_decay: Number, trust_scale: Number, block_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LAMB16 step with block scales on one tensor, the reference: in
    place on `param`, `exp_avg` and `exp_avg_sq`; returns (the new scale grids,
    weight_norm, adam_norm, trust_ratio). A block's scales come from its own
    moments, so only the trust ratio needs the first pass."""
    moments = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, block_size=block_size)
    state = (param, grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales)
    sums, m_max, v_max = lamb16_block_partials(*state, **moments)
    m_scales, v_scales = absmax_scales_from_maxima(m_max, v_max)
    weight_norm, adam_norm, trust = norms_and_trust(sums[0], sums[1], param.numel(), trust_lr, trust_scale)
    lamb16_block_apply(*state, m_scales, v_scales, trust * lr, **moments)
    return m_scales, v_scales, weight_norm, adam_norm, trust


def lamb16_block_single_pass_scales(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, carry: Tensor, adam_norm: Tensor, *, beta1: Number, beta2: Number, block_size: int,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """The single pass's block scales, each block's from its own moments (read, not kept)."""
    m, v = block_moments(grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales, beta1, beta2, block_size, 0)
    return absmax_scales_from_maxima(*block_maxima(m, v, block_size))


def lamb16_block_single_pass_update_norm(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, carry: Tensor, adam_norm: Tensor, m_scales: Tensor, v_scales: Tensor, *,
    trust_lr: Number, beta1: Number, beta2: Number, eps: Number, weight_decay: Number, trust_scale: Number,
    block_size: int, **_: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """Its trust ratio and the new update's norm, reading and writing nothing:
    (weight_norm, the new update's norm, trust_ratio)."""
    weight_norm = carry[0]
    m, v = block_moments(grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales, beta1, beta2, block_size, 0)
    update = block_update(m, v, param, eps, weight_decay)
    new_adam_norm = clamped_square_sum(update, eps).sqrt() / param.numel()
    return weight_norm, new_adam_norm, lamb16_trust_ratio(weight_norm, adam_norm, trust_lr, trust_scale)


def lamb16_block_single_pass_carry(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, carry: Tensor, adam_norm: Tensor, m_scales: Tensor, v_scales: Tensor,
    weight_norm: Tensor, new_adam_norm: Tensor, trust: Tensor, *, lr: Number, beta1: Number, beta2: Number,
    eps: Number, weight_decay: Number, block_size: int, **_: Any,
) -> tuple[Tensor]:
    """The carry, whose weight norm is that of the weights as this step will leave them."""
    m, v = block_moments(grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales, beta1, beta2, block_size, 0)
    update = block_update(m, v, param, eps, weight_decay)
    zero = torch.zeros_like(weight_norm)
    return (torch.stack([weight_norm_of(param - update * (trust * lr), eps), zero, zero,
                         torch.ones_like(weight_norm)]),)


def lamb16_block_single_pass_writes(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, carry: Tensor, adam_norm: Tensor, m_scales: Tensor, v_scales: Tensor,
    weight_norm: Tensor, new_adam_norm: Tensor, trust: Tensor, new_carry: Tensor, *, lr: Number, beta1: Number,
    beta2: Number, eps: Number, weight_decay: Number, block_size: int, **_: Any,
) -> tuple[()]:
    """Its writes, given the reductions' results: the moments stored over the
    blocks' new scales, the weights moved."""
    m, v = block_moments(grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales, beta1, beta2, block_size, 0)
    update = block_update(m, v, param, eps, weight_decay)
    m_codes, v_codes = block_codes(m, v, m_scales, v_scales, block_size)
    exp_avg.copy_(from_rows(m_codes, exp_avg))
    exp_avg_sq.copy_(from_rows(v_codes, exp_avg_sq))
    param.sub_(update * (trust * lr))
    return ()


def lamb16_block_single_pass_update(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scales: Tensor,
    exp_avg_sq_scales: Tensor, carry: Tensor, adam_norm: Tensor, *, lr: Number, trust_lr: Number, beta1: Number,
    beta2: Number, eps: Number, weight_decay: Number, trust_scale: Number, block_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One single-pass LAMB16 step with block scales, the reference: each
    block's scales come from its own moments as in the exact step (a block is
    in cache when they are known), so the one difference from the exact step is
    the trust ratio's update norm, the last step's. Returns as
    lamb16_single_pass_update() (the carry's moment statistics unused: 0), and
    is written in phases as that one is: its scales, the update's norm, the new
    weights' norm, its writes (in one graph, Inductor keeps the moments or the
    update in float32 buffers the size of the tensor)."""
    state = (param, grad, exp_avg, exp_avg_sq, exp_avg_scales, exp_avg_sq_scales, carry, adam_norm)
    hyper = dict(lr=lr, trust_lr=trust_lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 trust_scale=trust_scale, block_size=block_size)
    results = lamb16_block_single_pass_scales(*state, **hyper)
    results += lamb16_block_single_pass_update_norm(*state, *results, **hyper)
    results += lamb16_block_single_pass_carry(*state, *results, **hyper)
    lamb16_block_single_pass_writes(*state, *results, **hyper)
    return results


lamb16_block_single_pass_update.phases = (
    lamb16_block_single_pass_scales, lamb16_block_single_pass_update_norm, lamb16_block_single_pass_carry,
    lamb16_block_single_pass_writes)

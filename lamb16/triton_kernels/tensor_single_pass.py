"""The single-pass step with one scale per tensor: its scales and step size
are known before it starts (from the carry, and for absmax the gradient's
largest |g|), so one pass reads the weights, gradient and codes and writes
the weights and codes; each program leaves its share of what the next step
starts from: the new update's and weights' clamped square sums, and the
moments' largest (absmax) or clamped square sums (seed)."""

import triton
import triton.language as tl

from .arithmetic import (
    absmax_codes, clamped_square, masked_max, masked_sum, seed_codes, seed_square, store_elements, tensor_step_tile,
)


@triton.jit
def tensor_single_pass_kernel(table, programs, new_scales, step_sizes, partials, beta1, one_minus_beta1, beta2,
                              one_minus_beta2, eps, weight_decay, SEED: tl.constexpr, TILE: tl.constexpr):
    tensor, offsets, inside, param, m, v, update = tensor_step_tile(
        table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, TILE)
    program = tl.program_id(0)
    m_scale, v_scale = tl.load(new_scales + 2 * tensor), tl.load(new_scales + 2 * tensor + 1)
    if SEED:
        m_code, v_code = seed_codes(m, v, m_scale, v_scale)
        tl.store(partials + 4 * program + 2, masked_sum(seed_square(m), inside))
        tl.store(partials + 4 * program + 3, masked_sum(seed_square(v), inside))
    else:
        m_code, v_code = absmax_codes(m, v, m_scale, v_scale)
        tl.store(partials + 4 * program + 2, masked_max(tl.abs(m), inside))
        tl.store(partials + 4 * program + 3, masked_max(v, inside))
    param = param - update * tl.load(step_sizes + tensor)
    store_elements(table, tensor, offsets, inside, param, m_code, v_code)
    tl.store(partials + 4 * program, masked_sum(clamped_square(update, eps), inside))
    tl.store(partials + 4 * program + 1, masked_sum(clamped_square(param, eps), inside))

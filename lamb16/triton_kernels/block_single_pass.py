"""The single-pass step with block scales: the step size is known before it
starts (the trust ratio takes the weight norm and the update norm the last
step carried), so one pass reads the weights, gradient and codes, writes the
weights, codes and each block's scales, and leaves each program's share of
the new update's and the new weights' clamped square sums for the next step."""

import triton
import triton.language as tl

from .arithmetic import block_scales_and_codes, block_step_tile, clamped_square, masked_sum, store_elements


@triton.jit
def block_single_pass_kernel(table, programs, step_sizes, partials, beta1, one_minus_beta1, beta2, one_minus_beta2,
                             eps, weight_decay, BLOCKS: tl.constexpr, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    tensor, held, offsets, inside, m_scales, v_scales, param, m, v, update = block_step_tile(
        table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, BLOCKS, LANES, BLOCK_SIZE)
    new_m_scale, new_v_scale, m_code, v_code = block_scales_and_codes(m, v, inside)
    param = param - update * tl.load(step_sizes + tensor)
    tl.store(m_scales, new_m_scale, mask=held)
    tl.store(v_scales, new_v_scale, mask=held)
    store_elements(table, tensor, offsets, inside, param, m_code, v_code)
    program = tl.program_id(0)
    tl.store(partials + 2 * program, masked_sum(clamped_square(update, eps), inside))
    tl.store(partials + 2 * program + 1, masked_sum(clamped_square(param, eps), inside))

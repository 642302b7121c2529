"""Pass 1 of the exact step with block scales: each program's share of a
tensor's clamped square sums of the weights and the update (which the trust
ratio needs before any write). Reads the weights, gradient and codes; writes
two floats a program."""

import triton
import triton.language as tl

from .arithmetic import (
    M_SCALE, V_SCALE, adam_direction, address, block_tile, clamped_square, load_elements, masked_sum, new_moments,
)


@triton.jit
def block_partials_kernel(table, programs, partials, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                          weight_decay, BLOCKS: tl.constexpr, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    program = tl.program_id(0)
    tensor = tl.load(programs + 2 * program)
    blocks, offsets, inside = block_tile(table, tensor, tl.load(programs + 2 * program + 1), BLOCKS, LANES,
                                         BLOCK_SIZE)
    param, grad, m_code, v_code = load_elements(table, tensor, offsets, inside)
    scales_inside = tl.max(inside.to(tl.int32), axis=1) > 0
    m_scale = tl.load(address(table, tensor, M_SCALE, tl.float32) + blocks, mask=scales_inside, other=1.0)
    v_scale = tl.load(address(table, tensor, V_SCALE, tl.float32) + blocks, mask=scales_inside, other=1.0)
    m, v = new_moments(grad, m_code, v_code, m_scale[:, None], v_scale[:, None], beta1, one_minus_beta1, beta2,
                       one_minus_beta2)
    update = adam_direction(m, v, param, eps, weight_decay)
    tl.store(partials + 2 * program, masked_sum(clamped_square(param, eps), inside))
    tl.store(partials + 2 * program + 1, masked_sum(clamped_square(update, eps), inside))

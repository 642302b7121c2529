"""Pass 2 of the exact step with block scales: the moments and the update
again, each block's new scales from its own largest |m| and |v| (in
registers), the codes over them, and the weights moved by the tensor's step
size (lr times its trust ratio, from pass 1's sums). Reads the weights,
gradient and codes; writes the weights, codes and scales in place."""

import triton
import triton.language as tl

from .arithmetic import (
    M_SCALE, V_SCALE, adam_direction, address, block_scales_and_codes, block_tile, load_elements, new_moments,
    store_elements,
)


@triton.jit
def block_apply_kernel(table, programs, step_sizes, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                       weight_decay, BLOCKS: tl.constexpr, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    program = tl.program_id(0)
    tensor = tl.load(programs + 2 * program)
    blocks, offsets, inside = block_tile(table, tensor, tl.load(programs + 2 * program + 1), BLOCKS, LANES,
                                         BLOCK_SIZE)
    param, grad, m_code, v_code = load_elements(table, tensor, offsets, inside)
    scales_inside = tl.max(inside.to(tl.int32), axis=1) > 0
    m_scales = address(table, tensor, M_SCALE, tl.float32) + blocks
    v_scales = address(table, tensor, V_SCALE, tl.float32) + blocks
    m, v = new_moments(grad, m_code, v_code, tl.load(m_scales, mask=scales_inside, other=1.0)[:, None],
                       tl.load(v_scales, mask=scales_inside, other=1.0)[:, None], beta1, one_minus_beta1, beta2,
                       one_minus_beta2)
    update = adam_direction(m, v, param, eps, weight_decay)
    new_m_scale, new_v_scale, m_code, v_code = block_scales_and_codes(m, v, inside)
    tl.store(m_scales, new_m_scale, mask=scales_inside)
    tl.store(v_scales, new_v_scale, mask=scales_inside)
    store_elements(table, tensor, offsets, inside, param - update * tl.load(step_sizes + tensor), m_code, v_code)

"""Pass 2 of the exact step with block scales: the moments and the update
again, each block's new scales from its own largest |m| and |v| (in
registers), the codes over them, and the weights moved by the tensor's step
size (lr times its trust ratio, from pass 1's sums). Reads the weights,
gradient and codes; writes the weights, codes and scales in place."""

import triton
import triton.language as tl

from .arithmetic import block_scales_and_codes, block_step_tile, store_elements


@triton.jit
def block_apply_kernel(table, programs, step_sizes, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                       weight_decay, BLOCKS: tl.constexpr, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    tensor, held, offsets, inside, m_scales, v_scales, param, m, v, update = block_step_tile(
        table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, BLOCKS, LANES, BLOCK_SIZE)
    new_m_scale, new_v_scale, m_code, v_code = block_scales_and_codes(m, v, inside)
    tl.store(m_scales, new_m_scale, mask=held)
    tl.store(v_scales, new_v_scale, mask=held)
    store_elements(table, tensor, offsets, inside, param - update * tl.load(step_sizes + tensor), m_code, v_code)

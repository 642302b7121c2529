"""Pass 2 of the exact step with one scale per tensor: the moments and the
update again, the codes over the tensor's new scales (from pass 1's
reductions), and the weights moved by its step size. Reads the weights,
gradient and codes; writes the weights and codes in place."""

import triton
import triton.language as tl

from .arithmetic import absmax_codes, seed_codes, store_elements, tensor_step_tile


@triton.jit
def tensor_apply_kernel(table, programs, new_scales, step_sizes, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                        weight_decay, SEED: tl.constexpr, TILE: tl.constexpr):
    tensor, offsets, inside, param, m, v, update = tensor_step_tile(
        table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, TILE)
    m_scale, v_scale = tl.load(new_scales + 2 * tensor), tl.load(new_scales + 2 * tensor + 1)
    if SEED:
        m_code, v_code = seed_codes(m, v, m_scale, v_scale)
    else:
        m_code, v_code = absmax_codes(m, v, m_scale, v_scale)
    store_elements(table, tensor, offsets, inside, param - update * tl.load(step_sizes + tensor), m_code, v_code)

"""Pass 1 of the exact step with block scales: each program's share of a
tensor's clamped square sums of the weights and the update (which the trust
ratio needs before any write). Reads the weights, gradient and codes; writes
two floats a program."""

import triton
import triton.language as tl

from .arithmetic import block_step_tile, clamped_square, masked_sum


@triton.jit
def block_partials_kernel(table, programs, partials, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                          weight_decay, BLOCKS: tl.constexpr, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    _, _, _, inside, _, _, param, _, _, update = block_step_tile(
        table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, BLOCKS, LANES, BLOCK_SIZE)
    program = tl.program_id(0)
    tl.store(partials + 2 * program, masked_sum(clamped_square(param, eps), inside))
    tl.store(partials + 2 * program + 1, masked_sum(clamped_square(update, eps), inside))

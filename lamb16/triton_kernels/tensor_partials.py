"""Pass 1 of the exact step with one scale per tensor (absmax or seed): each
program's share of the tensor's reductions, the largest |m| and v (absmax)
or the sums of clamp(x*x, 0, 10) of m and v (seed), and the clamped square
sums of the weights and the update. Reads the weights, gradient and codes;
writes four floats a program."""

import triton
import triton.language as tl

from .arithmetic import clamped_square, masked_max, masked_sum, seed_square, tensor_step_tile


@triton.jit
def tensor_partials_kernel(table, programs, partials, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                           weight_decay, SEED: tl.constexpr, TILE: tl.constexpr):
    _, _, inside, param, m, v, update = tensor_step_tile(
        table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, TILE)
    program = tl.program_id(0)
    if SEED:
        tl.store(partials + 4 * program, masked_sum(seed_square(m), inside))
        tl.store(partials + 4 * program + 1, masked_sum(seed_square(v), inside))
    else:
        tl.store(partials + 4 * program, masked_max(tl.abs(m), inside))
        tl.store(partials + 4 * program + 1, masked_max(v, inside))
    tl.store(partials + 4 * program + 2, masked_sum(clamped_square(param, eps), inside))
    tl.store(partials + 4 * program + 3, masked_sum(clamped_square(update, eps), inside))

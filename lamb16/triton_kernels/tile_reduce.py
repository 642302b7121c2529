"""A reduction over each tensor's elements alone, each program's share: the
clamped square sum of the weights (a single pass's weight norm, where
something else changed the weights), or the largest |g| of the usable
gradient (a single pass's absmax scales). Reads one float32 an element."""

import triton
import triton.language as tl

from .arithmetic import GRAD, PARAM, address, clamped_square, element_tile, masked_max, masked_sum


@triton.jit
def tile_reduce_kernel(table, programs, partials, eps, GRADIENT_ABSMAX: tl.constexpr, TILE: tl.constexpr):
    program = tl.program_id(0)
    tensor = tl.load(programs + 2 * program)
    offsets, inside = element_tile(table, tensor, tl.load(programs + 2 * program + 1), TILE)
    if GRADIENT_ABSMAX:
        grad = tl.load(address(table, tensor, GRAD, tl.float32) + offsets, mask=inside, other=0.0)
        grad = tl.where(grad * grad < float("inf"), grad, 0.0)
        tl.store(partials + program, masked_max(tl.abs(grad), inside))
    else:
        param = tl.load(address(table, tensor, PARAM, tl.float32) + offsets, mask=inside, other=0.0)
        tl.store(partials + program, masked_sum(clamped_square(param, eps), inside))

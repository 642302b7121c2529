"""Each tensor's programs' partials combined into the tensor's own, one
program a tensor, in a fixed order (no atomics: the same bits every run): a
sum per column, or the largest where MAXIMA's bit for the column is set."""

import triton
import triton.language as tl


@triton.jit
def segments_kernel(partials, ranges, out, WIDTH: tl.constexpr, COLUMNS: tl.constexpr, MAXIMA: tl.constexpr,
                    CHUNK: tl.constexpr):
    tensor = tl.program_id(0)
    first = tl.load(ranges + 2 * tensor)
    count = tl.load(ranges + 2 * tensor + 1)
    rows = tl.arange(0, CHUNK)
    columns = tl.arange(0, COLUMNS)
    takes_max = ((MAXIMA >> columns) & 1) == 1
    sums = tl.zeros((CHUNK, COLUMNS), dtype=tl.float32)
    largest = tl.zeros((CHUNK, COLUMNS), dtype=tl.float32)
    for start in range(0, count, CHUNK):
        inside = ((start + rows) < count)[:, None] & (columns < WIDTH)[None, :]
        values = tl.load(partials + (first + start + rows)[:, None] * WIDTH + columns[None, :], mask=inside, other=0.0)
        sums += values
        largest = tl.maximum(largest, values)
    result = tl.where(takes_max, tl.max(largest, axis=0), tl.sum(sums, axis=0))
    tl.store(out + tensor * WIDTH + columns, result, mask=columns < WIDTH)

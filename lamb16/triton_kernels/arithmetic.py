"""The arithmetic every Lamb16 Triton kernel shares, as small @triton.jit
helpers: where a group's tensors are (a table of addresses), the tiles a
program walks, the moments, the update, the clamped squares the norms sum,
and the fp8 codes over their scales.

Each step is written as lamb16.updates writes it, operation for operation
and in its order, with IEEE division and square root (div_rn, sqrt_rn) and
no multiply-add contraction (the kernels launch with enable_fp_fusion=False):
a GPU then computes every element's moments, codes and update bit for bit as
the reference does with correctly rounded arithmetic. Sums over a tensor add
in another order than torch's, so the norms (and the trust ratio, and with it
the step size) agree with the reference's to float32 rounding.
"""

import triton
import triton.language as tl

from .fp8 import decode_e4m3fn, decode_e5m2, encode_e4m3fn, encode_e5m2

# Columns of a group's table: one row of int64 per tensor (lamb16.triton_kernels.launch builds it).
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, M_SCALE, V_SCALE, NUMEL, ROW_LENGTH, BLOCKS_PER_ROW, BLOCK_COUNT = (
    tl.constexpr(i) for i in range(10))
COLUMNS = tl.constexpr(10)

E4M3_MAX = tl.constexpr(448.0)
E5M2_MAX = tl.constexpr(57344.0)
E5M2_SMALLEST = tl.constexpr(2.0**-16)
MIN_SCALE = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: an all-zero moment's scale
SEED_M_CLAMP = tl.constexpr(15.0)
SEED_SQUARE_CLAMP = tl.constexpr(10.0)


@triton.jit
def column(table, tensor, which: tl.constexpr):
    return tl.load(table + tensor * COLUMNS + which)


@triton.jit
def address(table, tensor, which: tl.constexpr, dtype: tl.constexpr):
    """The pointer that row `tensor` of the table holds in column `which`."""
    return column(table, tensor, which).to(tl.pointer_type(dtype))


@triton.jit
def element_tile(table, tensor, first, TILE: tl.constexpr):
    """TILE consecutive elements of a tensor from `first`: offsets, and which lie inside it."""
    offsets = first + tl.arange(0, TILE)
    return offsets, offsets < column(table, tensor, NUMEL)


@triton.jit
def block_tile(table, tensor, first_block, BLOCKS: tl.constexpr, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """BLOCKS blocks of a tensor from `first_block` (its blocks numbered row by
    row), as a (BLOCKS, LANES) tile: the blocks, each lane's element offset,
    and which lanes hold an element (a row's last block may be short)."""
    row_length = column(table, tensor, ROW_LENGTH)
    per_row = column(table, tensor, BLOCKS_PER_ROW)
    blocks = first_block + tl.arange(0, BLOCKS)
    lanes = tl.arange(0, LANES)
    within = (blocks % per_row)[:, None] * BLOCK_SIZE + lanes[None, :]
    offsets = (blocks // per_row)[:, None] * row_length + within
    inside = (blocks[:, None] < column(table, tensor, BLOCK_COUNT)) & (lanes[None, :] < BLOCK_SIZE) & (within < row_length)
    return blocks, offsets, inside


@triton.jit
def load_elements(table, tensor, offsets, inside):
    """The weights, the usable gradient (a non-finite element, or one whose
    square overflows, taken as 0) and the two moments' codes at `offsets`."""
    param = tl.load(address(table, tensor, PARAM, tl.float32) + offsets, mask=inside, other=0.0)
    grad = tl.load(address(table, tensor, GRAD, tl.float32) + offsets, mask=inside, other=0.0)
    grad = tl.where(grad * grad < float("inf"), grad, 0.0)
    m_code = tl.load(address(table, tensor, EXP_AVG, tl.uint8) + offsets, mask=inside, other=0).to(tl.int32)
    v_code = tl.load(address(table, tensor, EXP_AVG_SQ, tl.uint8) + offsets, mask=inside, other=0).to(tl.int32)
    return param, grad, m_code, v_code


@triton.jit
def store_elements(table, tensor, offsets, inside, param, m_code, v_code):
    tl.store(address(table, tensor, PARAM, tl.float32) + offsets, param, mask=inside)
    tl.store(address(table, tensor, EXP_AVG, tl.uint8) + offsets, m_code.to(tl.uint8), mask=inside)
    tl.store(address(table, tensor, EXP_AVG_SQ, tl.uint8) + offsets, v_code.to(tl.uint8), mask=inside)


@triton.jit
def new_moments(grad, m_code, v_code, m_scale, v_scale, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """This step's float32 moments: the stored ones decoded and scaled, then Adam's moving averages."""
    m = decode_e4m3fn(m_code) * m_scale * beta1 + grad * one_minus_beta1
    v = decode_e5m2(v_code) * v_scale * beta2 + grad * grad * one_minus_beta2
    return m, v


@triton.jit
def adam_direction(m, v, param, eps, weight_decay):
    """m / (sqrt(v) + eps) plus decoupled weight decay."""
    return tl.div_rn(m, tl.sqrt_rn(v) + eps) + param * weight_decay


@triton.jit
def clamped_square(x, eps):
    """clamp(x*x, eps, 1): what the weight and update norms sum."""
    return tl.minimum(tl.maximum(x * x, eps), 1.0)


@triton.jit
def masked_sum(x, inside):
    return tl.sum(tl.where(inside, x, 0.0))


@triton.jit
def masked_max(x, inside):
    return tl.max(tl.where(inside, x, 0.0))


@triton.jit
def absmax_scale(largest, top):
    """The scale that maps a moment's largest to the top of its fp8 range (never 0)."""
    return tl.maximum(tl.div_rn(largest, top), MIN_SCALE)


@triton.jit
def absmax_codes(m, v, m_scale, v_scale):
    """m and v in fp8 over their scales, as lamb16.quantize writes them: each
    multiplied by its scale's reciprocal, v floored at e5m2's smallest value."""
    m_code = encode_e4m3fn(m * tl.div_rn(1.0, m_scale))
    v_code = encode_e5m2(tl.maximum(v * tl.div_rn(1.0, v_scale), E5M2_SMALLEST))
    return m_code, v_code


@triton.jit
def seed_codes(m, v, m_scale, v_scale):
    """m and v in fp8 with the proof of concept's clamps."""
    m_code = encode_e4m3fn(tl.minimum(tl.maximum(m * tl.div_rn(1.0, m_scale), -SEED_M_CLAMP), SEED_M_CLAMP))
    v_code = encode_e5m2(tl.minimum(tl.maximum(v, 0.0), SEED_SQUARE_CLAMP) * tl.div_rn(1.0, v_scale))
    return m_code, v_code


@triton.jit
def seed_square(x):
    """clamp(x*x, 0, 10): what the seed scales sum."""
    return tl.minimum(x * x, SEED_SQUARE_CLAMP)


@triton.jit
def block_scales_and_codes(m, v, inside):
    """Each block's (row of the tile's) scales, from its own largest |m| and
    |v|, and the tile's codes over them."""
    m_scale = absmax_scale(tl.max(tl.where(inside, tl.abs(m), 0.0), axis=1), E4M3_MAX)
    v_scale = absmax_scale(tl.max(tl.where(inside, tl.abs(v), 0.0), axis=1), E5M2_MAX)
    m_code, v_code = absmax_codes(m, v, m_scale[:, None], v_scale[:, None])
    return m_scale, v_scale, m_code, v_code


@triton.jit
def block_step_tile(table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                    BLOCKS: tl.constexpr, LANES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """What every block-scale kernel starts with: this program's tile of its
    tensor (whole blocks), the weights, and this step's moments and update
    from the old codes and block scales. Returns the tensor, the blocks (and
    which hold elements), the tile's offsets (and which are elements), the
    pointers to the block scales, the weights, m, v and the update."""
    program = tl.program_id(0)
    tensor = tl.load(programs + 2 * program)
    blocks, offsets, inside = block_tile(table, tensor, tl.load(programs + 2 * program + 1), BLOCKS, LANES,
                                         BLOCK_SIZE)
    param, grad, m_code, v_code = load_elements(table, tensor, offsets, inside)
    held = tl.max(inside.to(tl.int32), axis=1) > 0
    m_scales = address(table, tensor, M_SCALE, tl.float32) + blocks
    v_scales = address(table, tensor, V_SCALE, tl.float32) + blocks
    m, v = new_moments(grad, m_code, v_code, tl.load(m_scales, mask=held, other=1.0)[:, None],
                       tl.load(v_scales, mask=held, other=1.0)[:, None], beta1, one_minus_beta1, beta2,
                       one_minus_beta2)
    update = adam_direction(m, v, param, eps, weight_decay)
    return tensor, held, offsets, inside, m_scales, v_scales, param, m, v, update


@triton.jit
def tensor_step_tile(table, programs, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                     TILE: tl.constexpr):
    """What every kernel with one scale a tensor starts with: this program's
    TILE elements of its tensor, the weights, and this step's moments and
    update. Returns the tensor, the offsets (and which are elements), the
    weights, m, v and the update."""
    program = tl.program_id(0)
    tensor = tl.load(programs + 2 * program)
    offsets, inside = element_tile(table, tensor, tl.load(programs + 2 * program + 1), TILE)
    param, grad, m_code, v_code = load_elements(table, tensor, offsets, inside)
    m, v = new_moments(grad, m_code, v_code, tl.load(address(table, tensor, M_SCALE, tl.float32)),
                       tl.load(address(table, tensor, V_SCALE, tl.float32)), beta1, one_minus_beta1, beta2,
                       one_minus_beta2)
    return tensor, offsets, inside, param, m, v, adam_direction(m, v, param, eps, weight_decay)

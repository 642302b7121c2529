"""How Lamb16 stores a moment in 8 bits: fp8 elements, float32 scales per block or per tensor.

The first moment goes to float8_e4m3fn (3 mantissa bits, |x| <= 448), the
second to float8_e5m2 (2 mantissa bits, up to 57344, down to 2**-16), whose
wider exponent suits v, which spans the square of the gradient's range.
A scaling is a pair of functions: `*_scales` reduces this step's float32
moments `m` and `v` to their two scales, and `write_*` stores their fp8 form
into `exp_avg` and `exp_avg_sq`; `store_*` does both, and `dequantize`
(`dequantize_blocks`) reads a moment back. Writes multiply by the scale's reciprocal: one division per
tensor instead of one per element, at most one float32 rounding away from
dividing.

Three scalings:
- "block" (the default): every `block_size` consecutive elements of a row
  (a dim-0 slice, in memory order; a tensor of fewer than two dimensions is
  one row) have their own pair of absmax scales, so a block far below the
  tensor's largest keeps fp8's whole range: rare embedding rows, a second
  moment that falls in one part of a tensor while another holds the scale.
  8 bytes of scales per block; a row never shares a block with another, so
  FSDP2's cuts between rows never cut one.
- "absmax", one pair per tensor: each tensor's largest |m| maps to 448 and
  largest v to 57344: nothing saturates, small elements keep the format's
  whole range below (but nothing more than about 1e-5 below the largest |m|),
  v is floored at e5m2's smallest value instead of flushing to zero (a zero
  there would make that element's next update m / eps), and an all-zero
  tensor divides by a tiny floor, not by zero.
- "seed", the original proof-of-concept's: scale = sqrt(sum(clamp(x*x, 0, 10))) / n
  + eps, m / scale clamped to +-15. Dividing by n rather than sqrt(n) maps a
  typical element to about sqrt(n), so on large tensors almost the whole first
  moment saturates. Kept to reproduce the original figures.

Measured by `python cli.py scaling --steps 300` (a float32 LAMB trains the
MNIST CNN at batch 128, lr 0.01; its gradients also feed float32 moments and,
per scaling, fp8-stored moments updated exactly as Lamb16 updates them).
"store" is the relative error ||dequant(fp8(x)) - x|| / ||x|| of one fp8 store
of the float32 moments (median over 30 checks); "drift" compares the fp8
chain with the float32 one after 300 steps:

    tensor        elements  scaling  store m  store v  drift m  drift v  m saturated  m flushed  v flushed
    conv1.weight       500  seed     0.572    0.052    0.880    0.513    45.0%        0.00%      0.00%
    conv1.weight       500  absmax   0.026    0.053    0.059    0.472     0.0%        0.00%      0.00%
    conv1.weight       500  block    0.024    0.049    0.061    0.269     0.0%        0.00%      0.00%
    conv2.weight    25,000  seed     0.921    0.053    0.983    0.516    85.5%        0.00%      0.00%
    conv2.weight    25,000  absmax   0.026    0.053    0.062    0.412     0.0%        0.00%      0.00%
    conv2.weight    25,000  block    0.026    0.051    0.061    0.365     0.0%        0.00%      0.00%
    fc1.weight     400,000  seed     0.942    0.053    0.976    0.335    63.2%        8.83%      3.63%
    fc1.weight     400,000  absmax   0.027    0.053    0.065    0.310     0.0%       10.82%      0.00%
    fc1.weight     400,000  block    0.026    0.051    0.061    0.274     0.0%        0.55%      0.00%

With absmax or block scales, one store loses 2.4-2.7% of the first moment on
every size (the seed arithmetic 57-94%) and 5% of the second: the resolution
of the formats themselves. What no scaling removes is the drift of v: e5m2
has 2 mantissa bits, so an increment of (1 - b2) = 0.1% per step rounds
away, and the stored v strays from the float32 one (by 27-47% after 300 steps
here; block scales, whose largest element in each block is stored exactly,
least). Stochastic rounding would remove that bias but make the error a
random walk whose spread settles near 1 / sqrt(1 - b2**2), some 22 times the
per-step rounding error. LAMB16's trust ratio partly renormalises each
layer's step, so the drift mostly reweights elements within a layer. fc1's
11% of m flushed to zero under a scale per tensor are elements below 2.2e-6
of the tensor's largest, mostly units whose gradient is already zero; block
scales keep all but 0.55% of them.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = torch.finfo(E4M3).max  # 448
E5M2_MAX = torch.finfo(E5M2).max  # 57344
E5M2_SMALLEST = 2.0**-16  # smallest positive (subnormal) e5m2
# Floor for a scale, so that an all-zero moment divides by it safely.
MIN_SCALE = torch.finfo(torch.float32).tiny

# The proof-of-concept's bounds, kept exactly for scaling="seed".
SEED_M_CLAMP = 15.0
SEED_SQUARE_CLAMP = 10.0

SCALINGS = ("absmax", "seed", "block")


def dequantize(stored: Tensor, scale: Tensor) -> Tensor:
    """The float32 moment that an fp8 tensor and its scale stand for."""
    return stored.float().mul_(scale)


def absmax_scales(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The default scaling: each tensor's largest magnitude maps to the top of its
    fp8 range, so no element saturates and small ones keep as much range as the
    format has (e4m3 spans 2**-9 to 448, e5m2 2**-16 to 57344, relative to it).
    The floor keeps an all-zero moment from dividing by zero."""
    return absmax_scales_from_maxima(m.abs().amax(), v.amax())


def absmax_scales_from_maxima(m_absmax: Tensor, v_max: Tensor) -> tuple[Tensor, Tensor]:
    """The absmax scales from the largest |m| and v (of a whole tensor, or of many side by side)."""
    return (m_absmax / E4M3_MAX).clamp(min=MIN_SCALE), (v_max / E5M2_MAX).clamp(min=MIN_SCALE)


def write_absmax(m: Tensor, v: Tensor, m_scale: Tensor, v_scale: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    """v is floored at the smallest e5m2 value instead of flushing to zero: a zero
    in v would turn that element's next update m / (sqrt(v) + eps) into m / eps.
    No ceiling is needed: the largest element lands on the top of the range, give
    or take a float32 rounding, which the fp8 conversion rounds back onto it."""
    exp_avg.copy_(m * (1 / m_scale))
    exp_avg_sq.copy_((v * (1 / v_scale)).clamp(min=E5M2_SMALLEST))


def seed_scales(m: Tensor, v: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """The proof-of-concept's scaling, exactly: scale = sqrt(sum(clamp(x*x, 0, 10))) / n + eps.

    Dividing by n rather than sqrt(n) maps a typical element of m to about
    sqrt(n), far past the clamp at 15, so large tensors lose most of their
    first moment. Kept to reproduce the original figures, not for new work.
    """
    return seed_scales_from_sums(*seed_sums(m, v), m.numel(), eps)


def seed_sums(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The sums the seed scales take: sum(clamp(x*x, 0, 10)) of m and of v."""
    return m.square().clamp(0, SEED_SQUARE_CLAMP).sum(), v.square().clamp(0, SEED_SQUARE_CLAMP).sum()


def seed_scales_from_sums(
    m_sum: Tensor, v_sum: Tensor, numel: int | Tensor, eps: float | Tensor
) -> tuple[Tensor, Tensor]:
    """The seed scales of a tensor of `numel` elements from its seed_sums()."""
    return m_sum.sqrt() / numel + eps, v_sum.sqrt() / numel + eps


def write_seed(m: Tensor, v: Tensor, m_scale: Tensor, v_scale: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    exp_avg.copy_((m * (1 / m_scale)).clamp(-SEED_M_CLAMP, SEED_M_CLAMP))
    exp_avg_sq.copy_(v.clamp(0, SEED_SQUARE_CLAMP) * (1 / v_scale))


def store_absmax(m: Tensor, v: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Store m and v in fp8 with the absmax scaling; returns the scales."""
    m_scale, v_scale = absmax_scales(m, v)
    write_absmax(m, v, m_scale, v_scale, exp_avg, exp_avg_sq)
    return m_scale, v_scale


def store_seed(
    m: Tensor, v: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, eps: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Store m and v in fp8 with the seed scaling; returns the scales."""
    m_scale, v_scale = seed_scales(m, v, eps)
    write_seed(m, v, m_scale, v_scale, exp_avg, exp_avg_sq)
    return m_scale, v_scale


# ------------------------------------------------------------ block scales
#
# A tensor's block scales are a (rows, blocks per row) grid: a row is a dim-0
# slice, taken in memory order (a channels-last weight's rows are walked as
# stored), cut into blocks of block_size elements, the last block of a row
# shorter. The functions below work on a tensor seen as its rows, (rows,
# length); a piece of a longer row (a sharded 1-D tensor) starts `phase`
# elements into its first block.


def block_grid(shape: tuple[int, ...], block_size: int) -> tuple[int, int]:
    """(rows, blocks per row) of the scales of a tensor of this shape."""
    rows = shape[0] if len(shape) >= 2 else 1
    length = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
    return rows, max(1, -(-length // block_size))


def row_order(t: Tensor) -> list[int]:
    """Dim 0, then the other dims from the largest stride to the smallest: the
    order in which a dense tensor's elements lie in memory."""
    return [0, *sorted(range(1, t.dim()), key=lambda d: -t.stride(d))] if t.dim() else []


def as_rows(t: Tensor, rows: int) -> Tensor:
    """`t` as (rows, length), each row's elements in memory order (a view where
    the layout allows, else a copy: take results back with from_rows)."""
    return t.permute(row_order(t)).reshape(rows, -1)


def from_rows(value: Tensor, like: Tensor) -> Tensor:
    """`value`, given as as_rows(like) sees `like`, in like's shape."""
    order = row_order(like)
    return value.reshape([like.shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])


def to_blocks(x: Tensor, block_size: int, phase: int = 0) -> Tensor:
    """(rows, length) -> (rows, blocks, block_size), zero-padded: `phase` zeros
    before (the part of the first block that lies elsewhere), and to the end of
    the last block."""
    rows, length = x.shape
    blocks = -(-(phase + length) // block_size)
    return F.pad(x, (phase, blocks * block_size - phase - length)).view(rows, blocks, block_size)


def from_blocks(x: Tensor, length: int, phase: int = 0) -> Tensor:
    """The inverse of to_blocks: (rows, blocks, block_size) -> (rows, length)."""
    return x.reshape(x.shape[0], -1)[:, phase:phase + length]


def dequantize_blocks(codes: Tensor, scales: Tensor, block_size: int, phase: int = 0) -> Tensor:
    """The float32 moment that fp8 rows and their block scales stand for."""
    return from_blocks(to_blocks(codes.float(), block_size, phase) * scales[..., None], codes.shape[1], phase)


def block_maxima(m: Tensor, v: Tensor, block_size: int, phase: int = 0) -> tuple[Tensor, Tensor]:
    """Each block's largest |m| and |v| (NaN where a block holds a NaN)."""
    return to_blocks(m.abs(), block_size, phase).amax(-1), to_blocks(v.abs(), block_size, phase).amax(-1)


def block_codes(
    m: Tensor, v: Tensor, m_scales: Tensor, v_scales: Tensor, block_size: int, phase: int = 0
) -> tuple[Tensor, Tensor]:
    """m and v rows in fp8 over their blocks' scales, as write_absmax() stores a
    whole tensor over its one scale (multiplied by each scale's reciprocal; v
    floored at e5m2's smallest value)."""
    length = m.shape[1]
    m_codes = from_blocks(to_blocks(m, block_size, phase) * (1 / m_scales)[..., None], length, phase)
    v_codes = from_blocks(to_blocks(v, block_size, phase) * (1 / v_scales)[..., None], length, phase)
    return m_codes.to(E4M3), v_codes.clamp(min=E5M2_SMALLEST).to(E5M2)


def store_blocks(m: Tensor, v: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Store m and v in fp8 with block scales; returns the scale grids."""
    rows = block_grid(tuple(m.shape), block_size)[0]
    m_rows, v_rows = as_rows(m, rows), as_rows(v, rows)
    m_max, v_max = block_maxima(m_rows, v_rows, block_size)
    m_scales, v_scales = absmax_scales_from_maxima(m_max, v_max)
    m_codes, v_codes = block_codes(m_rows, v_rows, m_scales, v_scales, block_size)
    exp_avg.copy_(from_rows(m_codes, exp_avg))
    exp_avg_sq.copy_(from_rows(v_codes, exp_avg_sq))
    return m_scales, v_scales

"""float32 to fp8 codes and back by integer operations on the bits, the same
on every GPU, every Triton version and under Triton's interpreter.

Triton's own float32 -> fp8 conversion rounds through float16 toward zero
before sm90 (0.21% of e5m2 and 0.41% of e4m3 codes of Lamb16's scaled moments
one code off torch's), and some versions refuse e4m3fn below sm89; its
interpreter rounds wrongly too. These round to nearest, ties to even, with
torch's rules for what does not fit (measured on its casts, and tested on
every class of float32 against them):

- e4m3fn (bias 7, 3 mantissa bits, no infinity): a finite value past 448 and
  +-inf saturate to +-448 (code 0x7E); NaN is 0x7F with its sign.
- e5m2 (bias 15, 2 mantissa bits): a value that rounds past 57344 becomes
  +-inf (0x7C); NaN is 0x7F with its sign.

Codes travel as int32 holding 0..255 (stored through a uint8 view of the fp8
state tensors).
"""

import triton
import triton.language as tl


@triton.jit
def round_shift(mantissa, shift):
    """mantissa >> shift (shift 1..31), rounded to nearest, ties to even."""
    kept = mantissa >> shift
    rest = mantissa & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rest > half) | ((rest == half) & ((kept & 1) == 1))
    return kept + up.to(tl.int32)


@triton.jit
def encode(x, MANTISSA: tl.constexpr, BIAS: tl.constexpr, TOP: tl.constexpr):
    """The fp8 code of float32 x, for a format of MANTISSA bits and exponent
    BIAS, whose largest finite code is TOP (a rounding past it is clamped to
    TOP: e4m3fn's 448, or e5m2's infinity, which its largest finite rounds
    into)."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    dropped: tl.constexpr = 23 - MANTISSA
    # A normal fp8 value: round the float32 bits at the fp8 mantissa's last bit, then rebias the exponent.
    normal = (magnitude + ((1 << (dropped - 1)) - 1) + ((magnitude >> dropped) & 1)) >> dropped
    normal = tl.minimum(normal - ((127 - BIAS) << MANTISSA), TOP)
    # A subnormal fp8 value: the float32 significand in units of the smallest fp8 step, 2**(1 - BIAS - MANTISSA).
    exponent = magnitude >> 23
    significand = (magnitude & 0x7FFFFF) | 0x800000
    shift = tl.minimum(150 + (1 - BIAS - MANTISSA) - exponent, 31)
    subnormal = round_shift(significand, tl.maximum(shift, 1))
    smallest_normal: tl.constexpr = (128 - BIAS) << 23
    code = tl.where(magnitude >= smallest_normal, normal, subnormal)
    code = tl.where(magnitude > 0x7F800000, 0x7F, code)  # NaN
    return code | sign


@triton.jit
def encode_e4m3fn(x):
    return encode(x, 3, 7, 0x7E)


@triton.jit
def encode_e5m2(x):
    return encode(x, 2, 15, 0x7C)


@triton.jit
def decode(code, MANTISSA: tl.constexpr, BIAS: tl.constexpr, HAS_INF: tl.constexpr):
    """The float32 value of an fp8 code (int32 0..255), exactly."""
    sign = (code & 0x80) << 24
    field = (code & 0x7F) >> MANTISSA
    mantissa = code & ((1 << MANTISSA) - 1)
    normal = (sign | ((field + (127 - BIAS)) << 23) | (mantissa << (23 - MANTISSA))).to(tl.float32, bitcast=True)
    step: tl.constexpr = 2.0 ** (1 - BIAS - MANTISSA)
    subnormal = mantissa.to(tl.float32) * step
    subnormal = tl.where(sign != 0, -subnormal, subnormal)
    value = tl.where(field == 0, subnormal, normal)
    top = (code & 0x7F) >> MANTISSA == (0x7F >> MANTISSA)  # the largest exponent field
    if HAS_INF:
        infinity = tl.where(sign != 0, -float("inf"), float("inf"))
        value = tl.where(top & (mantissa == 0), infinity, value)
        value = tl.where(top & (mantissa != 0), float("nan"), value)
    else:
        value = tl.where((code & 0x7F) == 0x7F, float("nan"), value)
    return value


@triton.jit
def decode_e4m3fn(code):
    return decode(code, 3, 7, False)


@triton.jit
def decode_e5m2(code):
    return decode(code, 2, 15, True)


@triton.jit
def codec_kernel(x_ptr, codes_ptr, e4m3_ptr, e5m2_ptr, values_ptr, n, BLOCK: tl.constexpr):
    """The encoders and decoders over arrays, for their tests: x's e4m3fn and
    e5m2 codes, and the value of every code in `codes` in either format."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    tl.store(e4m3_ptr + offsets, encode_e4m3fn(x).to(tl.uint8), mask=inside)
    tl.store(e5m2_ptr + offsets, encode_e5m2(x).to(tl.uint8), mask=inside)
    code = tl.load(codes_ptr + offsets, mask=inside, other=0).to(tl.int32)
    tl.store(values_ptr + 2 * offsets, decode_e4m3fn(code), mask=inside)
    tl.store(values_ptr + 2 * offsets + 1, decode_e5m2(code), mask=inside)


def codec(x, codes):
    """(e4m3fn codes of x, e5m2 codes of x, the (n, 2) values of `codes` as e4m3fn and as e5m2)."""
    import torch

    n = max(x.numel(), codes.numel())
    e4m3, e5m2 = (torch.empty(n, dtype=torch.uint8, device=x.device) for _ in range(2))
    values = torch.empty(n, 2, device=x.device)
    codec_kernel[(triton.cdiv(n, 1024),)](x, codes, e4m3, e5m2, values, n, BLOCK=1024)
    return e4m3, e5m2, values

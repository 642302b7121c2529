// The arithmetic every set of loops shares: fp8 codes to and from float32 by
// bit arithmetic, the elements' moments, and what the loops hand back. The
// loops themselves are in portable.h, avx2.h and avx512.h, the threads and the
// C entry points in cpu_kernels.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// Elements a vectorized loop reduces in float32 before the sum moves to double:
// short enough that float32 rounding stays far below the tests' tolerance.
constexpr int64_t CHUNK = 2048;
// Below this many elements one thread does all: waking the others costs more.
constexpr int64_t PARALLEL_MIN = 1 << 15;

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// fp8 codes <-> float32 by bit arithmetic, which vectorizes (a table lookup
// would not). Rounding is to nearest even, as torch's own conversion; the tests
// compare both on every code and on every rounding boundary.

// The exponent is rebiased (7 -> 127, 15 -> 127) by an integer add; a
// subnormal code (exponent 0) comes out as 2**(1 - bias) * (1 + m/2**k) / 2,
// from which 2x - 2**(1 - bias) is its exact value. No float32 subnormal is
// made on the way, so a flush-denormals mode cannot zero a small moment.

inline float decode_e4m3(uint8_t code) {
  const uint32_t mag = code & 0x7Fu;
  const float normal = float_of((mag << 20) + (120u << 23));
  float value = mag < 8u ? normal * 2.0f - 0x1p-6f : normal;
  value = mag == 0x7Fu ? std::numeric_limits<float>::quiet_NaN() : value;
  return float_of(bits_of(value) | (uint32_t(code & 0x80u) << 24));
}

inline float decode_e5m2(uint8_t code) {
  const uint32_t mag = code & 0x7Fu;
  const float normal = float_of((mag << 21) + (112u << 23));
  float value = mag < 4u ? normal * 2.0f - 0x1p-14f : normal;
  value = mag >= 0x7Cu ? float_of((mag << 21) | 0x7F800000u) : value;  // inf, or NaN
  return float_of(bits_of(value) | (uint32_t(code & 0x80u) << 24));
}

inline uint8_t encode_e4m3(float x) {
  const uint32_t bits = bits_of(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  // Normal: drop 20 mantissa bits with round-half-even, rebias 127 -> 7.
  const uint32_t normal = ((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  // Below 2**-6 (subnormal): adding 2**14 rounds to a multiple of 2**-9.
  const uint32_t subnormal = bits_of(float_of(a) + 0x1p14f) - bits_of(0x1p14f);
  uint32_t code = a < (121u << 23) ? subnormal : normal;
  code = std::min(code, 0x7Eu);          // past 448, and inf: 448, as torch saturates
  code = a > 0x7F800000u ? 0x7Fu : code;  // NaN stays NaN
  return uint8_t(code | sign);
}

inline uint8_t encode_e5m2(float x) {
  const uint32_t bits = bits_of(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  const uint32_t normal = ((a + 0xFFFFFu + ((a >> 21) & 1u)) >> 21) - (112u << 2);
  const uint32_t subnormal = bits_of(float_of(a) + 0x1p7f) - bits_of(0x1p7f);
  uint32_t code = a < (113u << 23) ? subnormal : normal;
  code = std::min(code, 0x7Cu);          // from 61440 up: inf
  code = a > 0x7F800000u ? 0x7Fu : code;  // NaN stays NaN
  return uint8_t(code | sign);
}

inline float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

// ---------------------------------------------------------------- LAMB16 ----

struct Lamb16Args {
  float m_scale, v_scale;  // the old state's
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  bool seed;
};

// A gradient element that is NaN or infinite, or whose square overflows
// float32, counts as 0 (as usable_gradient() in updates.py): it would otherwise
// reach every element of its tensor through the scales and norms.
inline float usable(float g) { return g * g < std::numeric_limits<float>::infinity() ? g : 0.0f; }

// This step's float32 moments, as new_moments(): dequantize, then the moving averages.
inline float lamb16_m(uint8_t code, float g, const Lamb16Args& a) {
  return decode_e4m3(code) * a.m_scale * a.beta1 + usable(g) * a.one_minus_beta1;
}

inline float lamb16_v(uint8_t code, float g, const Lamb16Args& a) {
  const float u = usable(g);
  return decode_e5m2(code) * a.v_scale * a.beta2 + u * u * a.one_minus_beta2;
}

struct Lamb16Sums {
  float m_stat, v_stat;  // absmax: largest |m| and v; seed: sums of clamp(x*x, 0, 10)
  float weight, update;  // sums of clamp(x*x, eps, 1)
  float m_nans, v_nans;  // NaN moments seen (a max over them would drop them)
};


struct SinglePassSums {
  float update;        // sum of clamp(u*u, eps, 1)
  float m_sum, v_sum;  // seed: sums of clamp(x*x, 0, 10) (absmax: unused)
};

// Block scales (scaling="block"): what the first pass sums over a block...
struct NormSums {
  float weight, update;  // sums of clamp(x*x, eps, 1)
};

// ...and what the writes find in a block: its largest |m| and |v| (NaN if a
// moment is), the sum of clamp(u*u, eps, 1) where asked for, and (the exact
// step's first pass, which keeps the update) that of the old weights.
struct BlockMoments {
  float m_max, v_max, update, weight;
};

// A tensor seen as rows of row_length cut into blocks of block_size (the
// last block of a row shorter), numbered row by row, so that a run of blocks
// is a run of elements; a chunk is a run of whole blocks.
struct BlockLayout {
  int64_t n, row_length, block_size, per_row;

  BlockLayout(int64_t n_, int64_t row_length_, int64_t block_size_)
      : n(n_), row_length(row_length_), block_size(block_size_), per_row((row_length_ + block_size_ - 1) / block_size_) {}
  int64_t count() const { return n / row_length * per_row; }
  int64_t start(int64_t b) const { return b / per_row * row_length + b % per_row * block_size; }
  int64_t length(int64_t b) const { return std::min(block_size, row_length - b % per_row * block_size); }
  // Blocks a chunk takes: about CHUNK elements of them.
  int64_t per_chunk() const { return std::max<int64_t>(1, CHUNK / std::min(block_size, row_length)); }
  int64_t chunks() const { return (count() + per_chunk() - 1) / per_chunk(); }
  int64_t first(int64_t c) const { return c * per_chunk(); }
  int64_t last(int64_t c) const { return std::min(count(), (c + 1) * per_chunk()); }  // one past
  int64_t end(int64_t c) const { return start(last(c) - 1) + length(last(c) - 1); }  // one past its last element
  // Floats a block's moment buffer holds: whole vectors of the widest loops.
  int64_t buffer() const { return (std::min(block_size, row_length) + 15) / 16 * 16; }
};

// Whether a block's m scale lets the hand-vectorized loops fold 2**8 into it
// exactly (see loops_for in cpu_kernels.cpp); a NaN fails.
inline bool foldable(float m_scale) { return std::fabs(m_scale) <= 0x1p100f && std::fabs(m_scale) >= 0x1p-126f; }

// An absmax scale from the largest magnitude it scales and the format's top
// (448 or 57344), as absmax_scales_from_maxima(): floored at the smallest
// normal float, so that an all-zero block divides safely; a NaN stays NaN.
inline float absmax_scale(float largest, float top) {
  return largest != largest ? largest : std::max(largest / top, std::numeric_limits<float>::min());
}


// --------------------------------------------------------------- LAMB ----

struct LambArgs {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  float m_correction, v_correction;  // 1 - beta**step
};

// A template parameter, not a flag: a branch inside the loop would be turned
// into both sides computed and one kept, two divisions per element for nothing.
template <bool kBiasCorrection>
inline float lamb_update(float p, float m, float v, const LambArgs& a) {
  if (kBiasCorrection) {
    m = m / a.m_correction;
    v = v / a.v_correction;
  }
  return m / (std::sqrt(v) + a.eps) + p * a.weight_decay;
}

struct LambSums {
  float weight, update;
};

// LAMB's new moments do not depend on the trust ratio: the first pass stores
// them, and the second reads them back for the update, with no gradient to
// read again (40 bytes an element moved in all, where recomputing them would
// move 44; float32 state leaves the step bound by memory, not arithmetic).
}  // namespace

// The LAMB16 loops again with AVX2, F16C and FMA intrinsics, 8 elements a
// register, for processors without AVX-512 (many AMD and older Intel ones),
// where the portable loops are bound by the compiler's fp8 arithmetic at 3.5-4.5
// times their memory traffic. The same conversions through half precision as
// the AVX-512 loops (see avx512.h); a chunk's last elements, fewer than 8, go
// through the same code on zero-padded copies. LAMB's float32 loops need no
// conversions, and the portable ones already run near their traffic.
#pragma once

#include "arithmetic.h"
#include "portable.h"

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define LAMB16_AVX2 1
#include <immintrin.h>

namespace {
namespace avx2 {

using Floats = __m256;   // 8 float32
using Ints = __m256i;    // 8 int32
using Halves = __m128i;  // 8 int16: float16 bits, or fp8 codes in the high bytes
constexpr int64_t WIDTH = 8;
constexpr float E4M3_IN_HALF = 0x1p-8f;  // e4m3 values times this are halves (exactly)

inline Floats splat(float x) { return _mm256_set1_ps(x); }
inline Ints splat_int(uint32_t x) { return _mm256_set1_epi32(int(x)); }
inline Halves splat_half(uint16_t x) { return _mm_set1_epi16(short(x)); }
inline Ints bits_of(Floats x) { return _mm256_castps_si256(x); }
inline Floats float_of(Ints x) { return _mm256_castsi256_ps(x); }
// std::min(std::max(x, lo), hi), NaN kept (the instructions return their second operand where either is NaN).
inline Floats clamp(Floats x, float lo, float hi) { return _mm256_min_ps(splat(hi), _mm256_max_ps(splat(lo), x)); }
inline Floats magnitude(Floats x) { return _mm256_and_ps(x, float_of(splat_int(0x7FFFFFFFu))); }
inline Ints magnitude_bits(Floats x) { return bits_of(magnitude(x)); }

// 8 codes into the high bytes of 16-bit lanes, and back.
inline Halves load_codes(const uint8_t* p) {
  return _mm_unpacklo_epi8(_mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline void store_codes(uint8_t* p, Halves codes) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(_mm_srli_epi16(codes, 8), _mm_setzero_si128()));
}
// Both moments' codes through one pack.
inline void store_codes(uint8_t* m, uint8_t* v, Halves m_codes, Halves v_codes) {
  const __m128i both = _mm_packus_epi16(_mm_srli_epi16(m_codes, 8), _mm_srli_epi16(v_codes, 8));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(m), both);
  _mm_storeh_pi(reinterpret_cast<__m64*>(v), _mm_castsi128_ps(both));
}

inline Floats float_of_half(Halves h) { return _mm256_cvtph_ps(h); }
inline Halves half_of(Floats x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline Floats decode_e5m2(Halves codes) { return float_of_half(codes); }

// The value times E4M3_IN_HALF: the magnitude moved down a bit, the sign kept;
// the NaN codes (magnitude 0x7F) read as halves are NaNs.
inline Floats decode_e4m3_in_half(Halves codes) {
  const Halves half = _mm_and_si128(_mm_srai_epi16(codes, 1), splat_half(0xBF80));
  const Halves nan = _mm_cmpeq_epi16(_mm_and_si128(codes, splat_half(0x7F00)), splat_half(0x7F00));
  return float_of_half(_mm_blendv_epi8(half, codes, nan));
}

// As avx512::round_to_grid: a magnitude (or NaN) rounded to nearest even onto
// a grid of kMantissa bits whose subnormals start below 2**-14.
template <int kMantissa>
inline Floats round_to_grid(Floats x) {
  const Ints exponent = _mm256_max_epu32(_mm256_and_si256(bits_of(x), splat_int(0x7F800000u)),
                                         splat_int(uint32_t(127 - 14) << 23));
  const Floats shift = float_of(_mm256_add_epi32(exponent, splat_int(uint32_t(23 - kMantissa) << 23)));
  return _mm256_sub_ps(_mm256_add_ps(x, shift), shift);
}

inline Floats with_sign_of(Floats magnitude, Floats x) {
  return _mm256_or_ps(magnitude, _mm256_and_ps(x, float_of(splat_int(0x80000000u))));
}

inline Halves encode_e5m2(Floats x) {  // from 61440 up: inf; NaN stays NaN
  return half_of(with_sign_of(round_to_grid<2>(_mm256_min_ps(splat(0x1p16f), magnitude(x))), x));
}
inline Halves encode_unsigned_e5m2(Floats x) { return half_of(round_to_grid<2>(_mm256_min_ps(splat(0x1p16f), x))); }
// v over an absmax scale of its own (at most 57344 give or take a rounding,
// never inf: no saturation), floored at e5m2's smallest subnormal, NaN kept.
inline Halves encode_absmax_e5m2(Floats x) { return half_of(round_to_grid<2>(_mm256_max_ps(splat(0x1p-16f), x))); }

// x / E4M3_IN_HALF as e4m3, for x within +-1.75 give or take a rounding, and no NaN.
inline Halves encode_unsaturated_e4m3_in_half(Floats x) {
  const Halves half = half_of(with_sign_of(round_to_grid<3>(magnitude(x)), x));
  const Halves sign = splat_half(0x8000);
  return _mm_or_si128(_mm_andnot_si128(sign, _mm_slli_epi16(half, 1)), _mm_and_si128(half, sign));
}
// The same, saturating at 448 (1.75 here), NaN on the NaN code's place (1.875).
inline Halves encode_e4m3_in_half(Floats x) {
  const Floats nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return encode_unsaturated_e4m3_in_half(_mm256_blendv_ps(clamp(x, -1.75f, 1.75f), with_sign_of(splat(1.875f), x), nan));
}

inline float sum(Floats x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float largest(Ints magnitudes) {  // the largest of 8 magnitudes given as bits (NaN above all)
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(magnitudes), _mm256_extracti128_si256(magnitudes, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return ::float_of(uint32_t(_mm_cvtsi128_si32(m)));
}

// Every lane valid: a mask with nothing to take out, which the compiler
// would otherwise apply (an AND with all ones is not folded for floats).
struct AllLanes {};
inline Floats masked(AllLanes, Floats x) { return x; }
inline Floats masked(Floats valid, Floats x) { return _mm256_and_ps(valid, x); }

// body(p, g, mq, vq, valid) over a chunk, 8 elements at a time; `valid` says
// which lanes hold elements: AllLanes, but in the last, short step, which runs
// on zero-padded copies, a mask (kWrites: written back). Bodies are generic
// lambdas, compiled once for each.
template <bool kWrites, typename Body>
inline void for_each_8(float* p, const float* g, uint8_t* mq, uint8_t* vq, int64_t n, Body body) {
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) body(p + i, g + i, mq + i, vq + i, AllLanes{});
  const int64_t rest = n - i;
  if (rest == 0) return;
  alignas(32) float p8[WIDTH] = {}, g8[WIDTH] = {};
  uint8_t m8[WIDTH] = {}, v8[WIDTH] = {};
  std::memcpy(p8, p + i, rest * sizeof(float));
  std::memcpy(g8, g + i, rest * sizeof(float));
  std::memcpy(m8, mq + i, rest);
  std::memcpy(v8, vq + i, rest);
  const Ints lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  body(p8, g8, m8, v8, float_of(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(rest)), lane)));
  if (kWrites) {
    std::memcpy(p + i, p8, rest * sizeof(float));
    std::memcpy(mq + i, m8, rest);
    std::memcpy(vq + i, v8, rest);
  }
}

struct Moments {
  Floats p, m, v, u;
};

// This step's moments and update for 8 elements, as lamb16_m, lamb16_v and the portable loops.
inline Moments lamb16_moments(const float* p, const float* g, const uint8_t* mq, const uint8_t* vq,
                              const Lamb16Args& a) {
  const Floats param = _mm256_loadu_ps(p), loaded = _mm256_loadu_ps(g);
  // As usable(): a gradient whose square is not finite counts as 0.
  const Floats loaded_squared = _mm256_mul_ps(loaded, loaded);
  const Floats finite = _mm256_cmp_ps(loaded_squared, splat(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
  const Floats grad = _mm256_and_ps(finite, loaded), grad_squared = _mm256_and_ps(finite, loaded_squared);
  const Floats m_old = _mm256_mul_ps(decode_e4m3_in_half(load_codes(mq)), splat(a.m_scale / E4M3_IN_HALF));
  const Floats v_old = _mm256_mul_ps(decode_e5m2(load_codes(vq)), splat(a.v_scale));
  const Floats m = _mm256_fmadd_ps(m_old, splat(a.beta1), _mm256_mul_ps(grad, splat(a.one_minus_beta1)));
  const Floats v = _mm256_fmadd_ps(v_old, splat(a.beta2), _mm256_mul_ps(grad_squared, splat(a.one_minus_beta2)));
  const Floats u = _mm256_fmadd_ps(param, splat(a.weight_decay),
                                   _mm256_div_ps(m, _mm256_add_ps(_mm256_sqrt_ps(v), splat(a.eps))));
  return {param, m, v, u};
}

// clamp(x*x, lo, hi) where `valid`, 0 elsewhere.
template <typename Valid>
inline Floats clamped_square(Floats x, float lo, float hi, Valid valid) {
  return masked(valid, clamp(_mm256_mul_ps(x, x), lo, hi));
}

template <bool kSeed>
Lamb16Sums lamb16_chunk_sums(const float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                             const uint8_t* __restrict vq, int64_t n, const Lamb16Args args) {
  Floats m_sum = _mm256_setzero_ps(), v_sum = m_sum, weight = m_sum, update = m_sum;
  Ints m_max = _mm256_setzero_si256(), v_max = m_max;  // as bits: a NaN's order above any number's
  // Read only: the chunk's arrays pass as writable for for_each_8, which writes nothing back here.
  for_each_8<false>(const_cast<float*>(p), g, const_cast<uint8_t*>(mq), const_cast<uint8_t*>(vq), n,
                    [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, auto valid) {
    const Moments x = lamb16_moments(pi, gi, mi, vi, args);
    if (kSeed) {  // padded lanes hold m = v = 0, which add nothing
      m_sum = _mm256_add_ps(m_sum, clamp(_mm256_mul_ps(x.m, x.m), 0.0f, 10.0f));
      v_sum = _mm256_add_ps(v_sum, clamp(_mm256_mul_ps(x.v, x.v), 0.0f, 10.0f));
    } else {
      m_max = _mm256_max_epu32(magnitude_bits(x.m), m_max);
      v_max = _mm256_max_epu32(magnitude_bits(x.v), v_max);
    }
    weight = _mm256_add_ps(weight, clamped_square(x.p, args.eps, 1.0f, valid));
    update = _mm256_add_ps(update, clamped_square(x.u, args.eps, 1.0f, valid));
  });
  if (kSeed) return {sum(m_sum), sum(v_sum), sum(weight), sum(update), 0.0f, 0.0f};
  const float m_stat = largest(m_max), v_stat = largest(v_max);
  const bool m_nan = m_stat != m_stat, v_nan = v_stat != v_stat;
  return {m_nan ? 0.0f : m_stat, v_nan ? 0.0f : v_stat, sum(weight), sum(update), float(m_nan), float(v_nan)};
}

// One vector's writes, as avx512::lamb16_store (kGeneral: the saturating, NaN-keeping e4m3 encoder).
template <bool kSeed, bool kGeneral>
inline void lamb16_store(float* p, uint8_t* mq, uint8_t* vq, const Moments& x, Floats m_to_code, Floats v_to_code,
                         float step_size) {
  const auto encode_m = [](Floats m) {
    return kGeneral ? encode_e4m3_in_half(m) : encode_unsaturated_e4m3_in_half(m);
  };
  if (kSeed) {
    const float m_bound = 15.0f * E4M3_IN_HALF;
    store_codes(mq, vq, encode_m(clamp(_mm256_mul_ps(x.m, m_to_code), -m_bound, m_bound)),
                encode_unsigned_e5m2(_mm256_mul_ps(clamp(x.v, 0.0f, 10.0f), v_to_code)));
  } else if (kGeneral) {  // scales bound from the carry: v may lie above its top
    store_codes(mq, vq, encode_m(_mm256_mul_ps(x.m, m_to_code)),
                encode_unsigned_e5m2(_mm256_max_ps(splat(0x1p-16f), _mm256_mul_ps(x.v, v_to_code))));
  } else {  // absmax scales of these very moments
    store_codes(mq, vq, encode_m(_mm256_mul_ps(x.m, m_to_code)), encode_absmax_e5m2(_mm256_mul_ps(x.v, v_to_code)));
  }
  _mm256_storeu_ps(p, _mm256_fnmadd_ps(x.u, splat(step_size), x.p));
}

template <bool kSeed>
void lamb16_chunk_apply(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale, float v_scale,
                        float step_size) {
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;  // as the portable loops
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  for_each_8<true>(p, g, mq, vq, n, [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, auto) {
    lamb16_store<kSeed, false>(pi, mi, vi, lamb16_moments(pi, gi, mi, vi, args), m_to_code, v_to_code, step_size);
  });
}

template <bool kSeed>
SinglePassSums lamb16_chunk_single_pass(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale,
                                        float v_scale, float step_size) {
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  Floats update = _mm256_setzero_ps(), m_sum = update, v_sum = update;
  for_each_8<true>(p, g, mq, vq, n, [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, auto valid) {
    const Moments x = lamb16_moments(pi, gi, mi, vi, args);
    lamb16_store<kSeed, true>(pi, mi, vi, x, m_to_code, v_to_code, step_size);
    if (kSeed) {  // padded lanes hold m = v = 0, which add nothing
      m_sum = _mm256_add_ps(m_sum, clamp(_mm256_mul_ps(x.m, x.m), 0.0f, 10.0f));
      v_sum = _mm256_add_ps(v_sum, clamp(_mm256_mul_ps(x.v, x.v), 0.0f, 10.0f));
    }
    update = _mm256_add_ps(update, clamped_square(x.u, args.eps, 1.0f, valid));
  });
  return {sum(update), sum(m_sum), sum(v_sum)};
}

// Block scales' exact step, as avx512::lamb16_blocks_sums and _apply.
inline NormSums lamb16_blocks_sums(const float* p, const float* g, const uint8_t* mq, const uint8_t* vq,
                                   const BlockLayout& layout, int64_t first, int64_t last, const float* m_scales,
                                   const float* v_scales, Lamb16Args args, float* new_m, float* new_v) {
  Floats weight = _mm256_setzero_ps(), update = weight;
  float elsewhere_weight = 0, elsewhere_update = 0;  // the portable loops'
  for (int64_t b = first; b < last; ++b) {
    const int64_t lo = layout.start(b);
    args.m_scale = m_scales[b], args.v_scale = v_scales[b];
    if (!foldable(args.m_scale)) {
      const NormSums s = portable::lamb16_blocks_sums(p, g, mq, vq, layout, b, b + 1, m_scales, v_scales, args,
                                                      new_m, new_v);
      elsewhere_weight += s.weight, elsewhere_update += s.update;
      continue;
    }
    Ints m_top = _mm256_setzero_si256(), v_top = m_top;  // padded lanes hold m = v = 0
    // Read only: the block's arrays pass as writable for for_each_8, which writes nothing back here.
    for_each_8<false>(const_cast<float*>(p + lo), g + lo, const_cast<uint8_t*>(mq + lo), const_cast<uint8_t*>(vq + lo),
                      layout.length(b), [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, auto valid) {
      const Moments x = lamb16_moments(pi, gi, mi, vi, args);
      m_top = _mm256_max_epu32(magnitude_bits(x.m), m_top);
      v_top = _mm256_max_epu32(magnitude_bits(x.v), v_top);
      weight = _mm256_add_ps(weight, clamped_square(x.p, args.eps, 1.0f, valid));
      update = _mm256_add_ps(update, clamped_square(x.u, args.eps, 1.0f, valid));
    });
    new_m[b] = absmax_scale(largest(m_top), 448.0f);
    new_v[b] = absmax_scale(largest(v_top), 57344.0f);
  }
  return {sum(weight) + elsewhere_weight, sum(update) + elsewhere_update};
}

inline void lamb16_blocks_apply(float* p, const float* g, uint8_t* mq, uint8_t* vq, const BlockLayout& layout,
                                int64_t first, int64_t last, float* m_scales, float* v_scales, const float* new_m,
                                const float* new_v, Lamb16Args args, float step_size) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t lo = layout.start(b);
    args.m_scale = m_scales[b], args.v_scale = v_scales[b];
    if (!foldable(args.m_scale) || !foldable(new_m[b])) {
      portable::lamb16_blocks_apply(p, g, mq, vq, layout, b, b + 1, m_scales, v_scales, new_m, new_v, args,
                                    step_size);
      continue;
    }
    const Floats m_to_code = splat(1.0f / new_m[b] * E4M3_IN_HALF), v_to_code = splat(1.0f / new_v[b]);
    for_each_8<true>(p + lo, g + lo, mq + lo, vq + lo, layout.length(b),
                     [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, auto) {
      lamb16_store<false, false>(pi, mi, vi, lamb16_moments(pi, gi, mi, vi, args), m_to_code, v_to_code, step_size);
    });
    m_scales[b] = new_m[b], v_scales[b] = new_v[b];
  }
}

// Block scales' single pass, as the portable loops (portable.h); the moments'
// buffers hold whole vectors, the last one's padded lanes too.
template <bool kSumUpdate>
BlockMoments lamb16_block_moments(float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                                  const uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float step_size,
                                  float* __restrict m_out, float* __restrict v_out) {
  Ints m_top = _mm256_setzero_si256(), v_top = m_top;  // padded lanes hold m = v = 0
  Floats update = _mm256_setzero_ps();
  // The codes are only read (for_each_8 copies the last ones back unchanged).
  for_each_8<true>(p, g, const_cast<uint8_t*>(mq), const_cast<uint8_t*>(vq), n,
                   [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, auto valid) {
    const Moments x = lamb16_moments(pi, gi, mi, vi, args);
    _mm256_storeu_ps(pi, _mm256_fnmadd_ps(x.u, splat(step_size), x.p));
    _mm256_storeu_ps(m_out, x.m);
    _mm256_storeu_ps(v_out, x.v);
    m_out += WIDTH, v_out += WIDTH;
    m_top = _mm256_max_epu32(magnitude_bits(x.m), m_top);
    v_top = _mm256_max_epu32(magnitude_bits(x.v), v_top);
    if (kSumUpdate) update = _mm256_add_ps(update, clamped_square(x.u, args.eps, 1.0f, valid));
  });
  return {largest(m_top), largest(v_top), sum(update), 0.0f};
}

// As portable::lamb16_block_updates; u_out, like the moments' buffers, holds whole vectors.
inline BlockMoments lamb16_block_updates(const float* __restrict p, const float* __restrict g,
                                         const uint8_t* __restrict mq, const uint8_t* __restrict vq, int64_t n,
                                         const Lamb16Args args, float* __restrict m_out, float* __restrict v_out,
                                         float* __restrict u_out) {
  Ints m_top = _mm256_setzero_si256(), v_top = m_top;  // padded lanes hold m = v = 0
  Floats update = _mm256_setzero_ps(), weight = update;
  // Read only: the block's arrays pass as writable for for_each_8, which writes nothing back here.
  for_each_8<false>(const_cast<float*>(p), g, const_cast<uint8_t*>(mq), const_cast<uint8_t*>(vq), n,
                    [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, auto valid) {
    const Moments x = lamb16_moments(pi, gi, mi, vi, args);
    _mm256_storeu_ps(m_out, x.m);
    _mm256_storeu_ps(v_out, x.v);
    _mm256_storeu_ps(u_out, x.u);
    m_out += WIDTH, v_out += WIDTH, u_out += WIDTH;
    m_top = _mm256_max_epu32(magnitude_bits(x.m), m_top);
    v_top = _mm256_max_epu32(magnitude_bits(x.v), v_top);
    update = _mm256_add_ps(update, clamped_square(x.u, args.eps, 1.0f, valid));
    weight = _mm256_add_ps(weight, clamped_square(x.p, args.eps, 1.0f, valid));
  });
  return {largest(m_top), largest(v_top), sum(update), sum(weight)};
}

inline void move_weights(float* __restrict p, const float* __restrict u, int64_t n, float step_size) {
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) {
    _mm256_storeu_ps(p + i, _mm256_fnmadd_ps(_mm256_loadu_ps(u + i), splat(step_size), _mm256_loadu_ps(p + i)));
  }
  for (; i < n; ++i) p[i] = std::fma(-u[i], step_size, p[i]);  // one rounding, as the vectors'
}

// As avx512::encode_block; the last, short vector's codes through a copy.
inline void encode_block(const float* __restrict m, const float* __restrict v, int64_t n, float m_inverse,
                         float v_inverse, uint8_t* __restrict mq, uint8_t* __restrict vq) {
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  const auto encode = [&](int64_t i, uint8_t* m_codes, uint8_t* v_codes) {
    store_codes(m_codes, v_codes, encode_unsaturated_e4m3_in_half(_mm256_mul_ps(_mm256_loadu_ps(m + i), m_to_code)),
                encode_absmax_e5m2(_mm256_mul_ps(_mm256_loadu_ps(v + i), v_to_code)));
  };
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) encode(i, mq + i, vq + i);
  if (i == n) return;
  uint8_t m8[WIDTH], v8[WIDTH];
  encode(i, m8, v8);
  std::memcpy(mq + i, m8, n - i);
  std::memcpy(vq + i, v8, n - i);
}

inline float gradient_chunk_absmax(const float* __restrict g, int64_t n) {
  Ints top = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) {
    const Floats loaded = _mm256_loadu_ps(g + i);
    const Floats finite = _mm256_cmp_ps(_mm256_mul_ps(loaded, loaded), splat(std::numeric_limits<float>::infinity()),
                                        _CMP_LT_OQ);
    top = _mm256_max_epu32(top, magnitude_bits(_mm256_and_ps(finite, loaded)));
  }
  float result = largest(top);
  for (; i < n; ++i) result = std::max(result, std::fabs(usable(g[i])));  // a max: exact in any order
  return result;
}

inline float weight_chunk_sum(const float* __restrict p, int64_t n, float eps) {
  Floats weight = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) {
    const Floats x = _mm256_loadu_ps(p + i);
    weight = _mm256_add_ps(weight, clamp(_mm256_mul_ps(x, x), eps, 1.0f));
  }
  float total = sum(weight);
  for (; i < n; ++i) total += ::clamp(p[i] * p[i], eps, 1.0f);
  return total;
}

// The fp8 conversions of whole arrays, for the tests (the last, short step scalar).
inline void encode_e4m3_array(const float* x, uint8_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) {
    store_codes(out + i, encode_e4m3_in_half(_mm256_mul_ps(_mm256_loadu_ps(x + i), splat(E4M3_IN_HALF))));
  }
  for (; i < n; ++i) out[i] = ::encode_e4m3(x[i]);
}
inline void encode_e5m2_array(const float* x, uint8_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) store_codes(out + i, encode_e5m2(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = ::encode_e5m2(x[i]);
}
inline void decode_e4m3_array(const uint8_t* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(decode_e4m3_in_half(load_codes(x + i)), splat(1 / E4M3_IN_HALF)));
  }
  for (; i < n; ++i) out[i] = ::decode_e4m3(x[i]);
}
inline void decode_e5m2_array(const uint8_t* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) _mm256_storeu_ps(out + i, decode_e5m2(load_codes(x + i)));
  for (; i < n; ++i) out[i] = ::decode_e5m2(x[i]);
}

}  // namespace avx2
}  // namespace
#endif

// The portable loops written with AVX-512 intrinsics, 16 elements a register,
// where the compiler targets a processor that has them (GCC vectorizes the
// portable loops by widening the fp8 bytes to 64 lanes, and spills registers).
// fp8 goes through half precision, which the processor converts in hardware:
// an e5m2 code is the top byte of the half with the same value, and an e4m3
// code, its magnitude moved down a bit, a half of its value times 2**-8. The
// results are those of the portable loops, which stay as the fallback and as
// what the tests hold to the reference as well.
//
// These loops also prefetch: the hardware prefetcher runs too short a distance
// ahead of loops this heavy once the arrays outgrow the L2 cache (measured on
// 10 M elements: the step takes about a quarter less time).
#pragma once

#include "arithmetic.h"
#include "portable.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#define LAMB16_AVX512 1
#include <immintrin.h>

namespace {
namespace avx512 {

using Floats = __m512;    // 16 float32
using Ints = __m512i;     // 16 int32
using Halves = __m256i;   // 16 int16: float16 bits, or fp8 codes in the high bytes
using Lanes = __mmask16;  // which of the 16 elements are there
constexpr int64_t WIDTH = 16;
constexpr Lanes ALL = 0xFFFF;
// e4m3 values times E4M3_IN_HALF are halves (exactly: a power of two).
constexpr float E4M3_IN_HALF = 0x1p-8f;

inline Floats splat(float x) { return _mm512_set1_ps(x); }
inline Ints splat_int(uint32_t x) { return _mm512_set1_epi32(int(x)); }
inline Halves splat_half(uint16_t x) { return _mm256_set1_epi16(short(x)); }
inline Ints bits_of(Floats x) { return _mm512_castps_si512(x); }
inline Floats float_of(Ints x) { return _mm512_castsi512_ps(x); }
// std::min(std::max(x, lo), hi), NaN kept as the scalar clamp keeps it (the
// instructions return their second operand where either is NaN).
inline Floats clamp(Floats x, float lo, float hi) { return _mm512_min_ps(splat(hi), _mm512_max_ps(splat(lo), x)); }

// 16 codes into the high bytes of 16-bit lanes, and back.
inline Halves load_codes(const uint8_t* p, Lanes k) {
  const Halves to_high = _mm256_setr_epi8(0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10, 0, 11,
                                          0, 12, 0, 13, 0, 14, 0, 15);
  return _mm256_maskz_permutexvar_epi8(0xAAAAAAAAu, to_high, _mm256_castsi128_si256(_mm_maskz_loadu_epi8(k, p)));
}

inline void store_codes(uint8_t* p, Lanes k, Halves codes) {
  const Halves from_high = _mm256_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 0, 0, 0, 0,
                                            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm_mask_storeu_epi8(p, k, _mm256_castsi256_si128(_mm256_permutexvar_epi8(from_high, codes)));
}

// Hardware conversions: exact both ways here, and untouched by flush-to-zero
// and denormals-are-zero (a half's subnormals are float32 normals).
inline Floats float_of_half(Halves h) { return _mm512_cvtph_ps(h); }
inline Halves half_of(Floats x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline Floats decode_e5m2(Halves codes) { return float_of_half(codes); }

// The value times E4M3_IN_HALF.
inline Floats decode_e4m3_in_half(Halves codes) {
  Halves half = _mm256_and_si256(_mm256_srai_epi16(codes, 1), splat_half(0xBF80));  // sign kept, magnitude down
  // The NaN codes (magnitude 0x7F) would land on 1.875; read as halves they are NaNs.
  const Lanes nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(codes, splat_half(0x7F00)), splat_half(0x7F00));
  return float_of_half(_mm256_mask_mov_epi16(half, nan, codes));
}

// A magnitude (or NaN) rounded to nearest even onto a grid of kMantissa bits
// whose subnormals start below 2**-14, as halves' do: adding 2**(e + 23 -
// kMantissa), for its exponent e (at least -14), rounds there in hardware, and
// taking that power of two off again is exact. Magnitudes up to 2**100.
template <int kMantissa>
inline Floats round_to_grid(Floats magnitude) {
  const Ints exponent = _mm512_max_epu32(_mm512_and_si512(bits_of(magnitude), splat_int(0x7F800000u)),
                                         splat_int(uint32_t(127 - 14) << 23));
  const Floats shift = float_of(_mm512_add_epi32(exponent, splat_int(uint32_t(23 - kMantissa) << 23)));
  return _mm512_sub_ps(_mm512_add_ps(magnitude, shift), shift);
}

inline Floats with_sign_of(Floats magnitude, Floats x) {  // magnitude | (x & sign bit)
  return float_of(_mm512_ternarylogic_epi32(bits_of(magnitude), bits_of(x), splat_int(0x80000000u), 0xF8));
}

// As the scalar encode_e5m2: from 61440 up, inf (it rounds to 2**16, past the
// largest half); NaN stays NaN.
inline Halves encode_e5m2(Floats x) {
  const Floats magnitude = _mm512_min_ps(splat(0x1p16f), _mm512_abs_ps(x));  // NaN kept
  return half_of(with_sign_of(round_to_grid<2>(magnitude), x));
}

// The same for x at least +0, or NaN (of either sign, which it keeps).
inline Halves encode_unsigned_e5m2(Floats x) { return half_of(round_to_grid<2>(_mm512_min_ps(splat(0x1p16f), x))); }

// v over an absmax scale of its own (at most 57344 give or take a rounding,
// never inf: no saturation), floored at e5m2's smallest subnormal, NaN kept.
inline Halves encode_absmax_e5m2(Floats x) { return half_of(round_to_grid<2>(_mm512_max_ps(splat(0x1p-16f), x))); }

// As the scalar encode_e4m3 of x / E4M3_IN_HALF, for x that needs no
// saturation and is no NaN: within +-1.75 (448 here), give or take a rounding,
// which rounds back to 1.75.
inline Halves encode_unsaturated_e4m3_in_half(Floats x) {
  const Halves half = half_of(with_sign_of(round_to_grid<3>(_mm512_abs_ps(x)), x));
  // The magnitude up a bit into the high byte, the sign where it was.
  return _mm256_ternarylogic_epi32(_mm256_slli_epi16(half, 1), half, splat_half(0x8000), 0xD8);
}

// As the scalar encode_e4m3 of x / E4M3_IN_HALF: saturates at 448 (1.75 here),
// and NaN takes the NaN code's place on the grid (1.875).
inline Halves encode_e4m3_in_half(Floats x) {
  const Lanes nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const Floats nan_code = with_sign_of(splat(1.875f), x);
  return encode_unsaturated_e4m3_in_half(_mm512_mask_mov_ps(clamp(x, -1.75f, 1.75f), nan, nan_code));
}

// Elements ahead of the loop that prefetches bring into the L1 cache.
constexpr int64_t AHEAD = 1024;

// The cache line AHEAD elements past element i: one a step for float arrays,
// one every fourth step for fp8 codes (a 64-byte line holds 16 floats, 64 codes).
template <typename T>
inline void prefetch(const T* array, int64_t i) {
  if (sizeof(T) == 1 && i % 64 != 0) return;
  // In integers: the address may lie past the array's end, where a prefetch does nothing.
  const uintptr_t address = reinterpret_cast<uintptr_t>(array) + uintptr_t(i + AHEAD) * sizeof(T);
  _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0);
}

// Lanes i..i+15 of an n-element array, fewer at its end.
inline Lanes lanes_from(int64_t i, int64_t n) { return n - i >= WIDTH ? ALL : Lanes((1u << (n - i)) - 1); }

// The loop over a chunk in steps of 16, the last step masked to what is left.
// With the mask a constant in all but that step, the compiler drops it there.
template <typename Body>
inline void for_each_16(int64_t n, Body body) {
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) body(i, ALL);
  if (i < n) body(i, lanes_from(i, n));
}


// This step's moments and update for 16 elements, as lamb16_m, lamb16_v and the scalar loops.
struct Moments {
  Floats p, m, v, u;
};

inline Moments lamb16_moments(const float* p, const float* g, const uint8_t* mq, const uint8_t* vq, int64_t i,
                              Lanes k, const Lamb16Args& a) {
  prefetch(p, i), prefetch(g, i), prefetch(mq, i), prefetch(vq, i);
  const Floats param = _mm512_maskz_loadu_ps(k, p + i), loaded = _mm512_maskz_loadu_ps(k, g + i);
  // As usable(): a gradient whose square is not finite counts as 0.
  const Floats loaded_squared = _mm512_mul_ps(loaded, loaded);
  const Lanes finite = _mm512_cmp_ps_mask(loaded_squared, splat(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
  const Floats grad = _mm512_maskz_mov_ps(finite, loaded), grad_squared = _mm512_maskz_mov_ps(finite, loaded_squared);
  const Floats m_old = _mm512_mul_ps(decode_e4m3_in_half(load_codes(mq + i, k)), splat(a.m_scale / E4M3_IN_HALF));
  const Floats v_old = _mm512_mul_ps(decode_e5m2(load_codes(vq + i, k)), splat(a.v_scale));
  const Floats m = _mm512_fmadd_ps(m_old, splat(a.beta1), _mm512_mul_ps(grad, splat(a.one_minus_beta1)));
  const Floats v = _mm512_fmadd_ps(v_old, splat(a.beta2), _mm512_mul_ps(grad_squared, splat(a.one_minus_beta2)));
  const Floats u = _mm512_fmadd_ps(param, splat(a.weight_decay),
                                   _mm512_div_ps(m, _mm512_add_ps(_mm512_sqrt_ps(v), splat(a.eps))));
  return {param, m, v, u};
}

inline float sum(Floats x) { return _mm512_reduce_add_ps(x); }
inline Ints magnitude_bits(Floats x) { return _mm512_and_si512(bits_of(x), splat_int(0x7FFFFFFFu)); }
inline float largest(Ints magnitudes) { return ::float_of(uint32_t(_mm512_reduce_max_epu32(magnitudes))); }

template <bool kSeed>
Lamb16Sums lamb16_chunk_sums(const float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                             const uint8_t* __restrict vq, int64_t n, const Lamb16Args args) {
  Floats m_sum = _mm512_setzero_ps(), v_sum = m_sum, weight = m_sum, update = m_sum;
  Ints m_max = _mm512_setzero_si512(), v_max = m_max;  // absmax, as bits: a NaN's order above any number's
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Moments x = lamb16_moments(p, g, mq, vq, i, k, args);
    if (kSeed) {  // the zeros in lanes past the end add nothing here...
      m_sum = _mm512_add_ps(m_sum, clamp(_mm512_mul_ps(x.m, x.m), 0.0f, 10.0f));
      v_sum = _mm512_add_ps(v_sum, clamp(_mm512_mul_ps(x.v, x.v), 0.0f, 10.0f));
    } else {
      m_max = _mm512_max_epu32(m_max, magnitude_bits(x.m));
      v_max = _mm512_max_epu32(v_max, magnitude_bits(x.v));
    }
    // ...but here they would add eps each.
    weight = _mm512_mask_add_ps(weight, k, weight, clamp(_mm512_mul_ps(x.p, x.p), args.eps, 1.0f));
    update = _mm512_mask_add_ps(update, k, update, clamp(_mm512_mul_ps(x.u, x.u), args.eps, 1.0f));
  });
  if (kSeed) return {sum(m_sum), sum(v_sum), sum(weight), sum(update), 0.0f, 0.0f};
  const float m_stat = largest(m_max), v_stat = largest(v_max);
  const bool m_nan = m_stat != m_stat, v_nan = v_stat != v_stat;
  return {m_nan ? 0.0f : m_stat, v_nan ? 0.0f : v_stat, sum(weight), sum(update), float(m_nan), float(v_nan)};
}

// One vector's writes, as the portable lamb16_write. What the exact step
// encodes needs less than the general conversions (kGeneral false): m over its
// scale is no NaN and needs no saturation (the seed clamps it, the absmax scale
// bounds it; a NaN or infinite m makes a scale that takes the portable loops).
// In either, v is at least +0 or NaN (a sum of products of non-negative
// numbers; old codes below 0 are clamped away).
template <bool kSeed, bool kGeneral>
inline void lamb16_store(float* p, uint8_t* mq, uint8_t* vq, int64_t i, Lanes k, const Moments& x, Floats m_to_code,
                         Floats v_to_code, float step_size) {
  const auto encode_m = [](Floats m) {
    return kGeneral ? encode_e4m3_in_half(m) : encode_unsaturated_e4m3_in_half(m);
  };
  if (kSeed) {
    const float m_bound = 15.0f * E4M3_IN_HALF;
    store_codes(mq + i, k, encode_m(clamp(_mm512_mul_ps(x.m, m_to_code), -m_bound, m_bound)));
    store_codes(vq + i, k, encode_unsigned_e5m2(_mm512_mul_ps(clamp(x.v, 0.0f, 10.0f), v_to_code)));
  } else if (kGeneral) {  // scales bound from the carry: v may lie above its top
    store_codes(mq + i, k, encode_m(_mm512_mul_ps(x.m, m_to_code)));
    store_codes(vq + i, k, encode_unsigned_e5m2(_mm512_max_ps(splat(0x1p-16f), _mm512_mul_ps(x.v, v_to_code))));
  } else {  // absmax scales of these very moments
    store_codes(mq + i, k, encode_m(_mm512_mul_ps(x.m, m_to_code)));
    store_codes(vq + i, k, encode_absmax_e5m2(_mm512_mul_ps(x.v, v_to_code)));
  }
  _mm512_mask_storeu_ps(p + i, k, _mm512_fnmadd_ps(x.u, splat(step_size), x.p));
}

template <bool kSeed>
void lamb16_chunk_apply(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale, float v_scale,
                        float step_size) {
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;  // as the portable loops
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Moments x = lamb16_moments(p, g, mq, vq, i, k, args);
    lamb16_store<kSeed, false>(p, mq, vq, i, k, x, m_to_code, v_to_code, step_size);
  });
}

// The single pass, as the portable loops. m over its scale goes through the
// general encoder: the scales come from bounds, which rounding may pass by an
// ulp, and a NaN moment (from NaN codes in a loaded state) does not make the
// scale NaN here, as it does in the exact step.
inline float gradient_chunk_absmax(const float* __restrict g, int64_t n) {
  Ints top = _mm512_setzero_si512();  // magnitudes as bits, in the order of their values
  for_each_16(n, [&](int64_t i, Lanes k) {
    prefetch(g, i);
    const Floats loaded = _mm512_maskz_loadu_ps(k, g + i);
    const Lanes finite = _mm512_cmp_ps_mask(_mm512_mul_ps(loaded, loaded),
                                            splat(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
    top = _mm512_mask_max_epu32(top, finite, top, magnitude_bits(loaded));
  });
  return largest(top);
}

inline float weight_chunk_sum(const float* __restrict p, int64_t n, float eps) {
  Floats weight = _mm512_setzero_ps();
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Floats x = _mm512_maskz_loadu_ps(k, p + i);
    weight = _mm512_mask_add_ps(weight, k, weight, clamp(_mm512_mul_ps(x, x), eps, 1.0f));
  });
  return sum(weight);
}

template <bool kSeed>
SinglePassSums lamb16_chunk_single_pass(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale,
                                        float v_scale, float step_size) {
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;  // as the portable loops
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  Floats update = _mm512_setzero_ps(), m_sum = update, v_sum = update;
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Moments x = lamb16_moments(p, g, mq, vq, i, k, args);
    lamb16_store<kSeed, true>(p, mq, vq, i, k, x, m_to_code, v_to_code, step_size);
    if (kSeed) {  // lanes past the end hold m = v = 0, which add nothing here
      m_sum = _mm512_add_ps(m_sum, clamp(_mm512_mul_ps(x.m, x.m), 0.0f, 10.0f));
      v_sum = _mm512_add_ps(v_sum, clamp(_mm512_mul_ps(x.v, x.v), 0.0f, 10.0f));
    }
    update = _mm512_mask_add_ps(update, k, update, clamp(_mm512_mul_ps(x.u, x.u), args.eps, 1.0f));
  });
  return {sum(update), sum(m_sum), sum(v_sum)};
}

// Block scales' exact step, as portable::lamb16_blocks_sums and _apply: the
// loops above, one block after another with each block's scales, the sums
// kept in registers across the run; a block whose scales cannot be folded
// takes the portable loops.
inline NormSums lamb16_blocks_sums(const float* p, const float* g, const uint8_t* mq, const uint8_t* vq,
                                   const BlockLayout& layout, int64_t first, int64_t last, const float* m_scales,
                                   const float* v_scales, Lamb16Args args, float* new_m, float* new_v) {
  Floats weight = _mm512_setzero_ps(), update = weight;
  float elsewhere_weight = 0, elsewhere_update = 0;  // the portable loops'
  for (int64_t b = first; b < last; ++b) {
    const int64_t lo = layout.start(b), n = layout.length(b);
    args.m_scale = m_scales[b], args.v_scale = v_scales[b];
    if (!foldable(args.m_scale)) {
      const NormSums s = portable::lamb16_blocks_sums(p, g, mq, vq, layout, b, b + 1, m_scales, v_scales, args,
                                                      new_m, new_v);
      elsewhere_weight += s.weight, elsewhere_update += s.update;
      continue;
    }
    Ints m_top = _mm512_setzero_si512(), v_top = m_top;  // as bits: a NaN's above any number's
    for_each_16(n, [&](int64_t i, Lanes k) {
      const Moments x = lamb16_moments(p + lo, g + lo, mq + lo, vq + lo, i, k, args);
      m_top = _mm512_max_epu32(m_top, magnitude_bits(x.m));
      v_top = _mm512_max_epu32(v_top, magnitude_bits(x.v));
      weight = _mm512_mask_add_ps(weight, k, weight, clamp(_mm512_mul_ps(x.p, x.p), args.eps, 1.0f));
      update = _mm512_mask_add_ps(update, k, update, clamp(_mm512_mul_ps(x.u, x.u), args.eps, 1.0f));
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
    for_each_16(layout.length(b), [&](int64_t i, Lanes k) {
      const Moments x = lamb16_moments(p + lo, g + lo, mq + lo, vq + lo, i, k, args);
      lamb16_store<false, false>(p + lo, mq + lo, vq + lo, i, k, x, m_to_code, v_to_code, step_size);
    });
    m_scales[b] = new_m[b], v_scales[b] = new_v[b];
  }
}

// Block scales' single pass, as the portable loops (portable.h). The moments'
// buffers hold whole vectors: the last, masked one is stored whole.
template <bool kSumUpdate>
BlockMoments lamb16_block_moments(float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                                  const uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float step_size,
                                  float* __restrict m_out, float* __restrict v_out) {
  Ints m_top = _mm512_setzero_si512(), v_top = m_top;  // lanes past the end hold m = v = 0
  Floats update = _mm512_setzero_ps();
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Moments x = lamb16_moments(p, g, mq, vq, i, k, args);
    _mm512_mask_storeu_ps(p + i, k, _mm512_fnmadd_ps(x.u, splat(step_size), x.p));
    _mm512_storeu_ps(m_out + i, x.m);
    _mm512_storeu_ps(v_out + i, x.v);
    m_top = _mm512_max_epu32(m_top, magnitude_bits(x.m));
    v_top = _mm512_max_epu32(v_top, magnitude_bits(x.v));
    if (kSumUpdate) update = _mm512_mask_add_ps(update, k, update, clamp(_mm512_mul_ps(x.u, x.u), args.eps, 1.0f));
  });
  return {largest(m_top), largest(v_top), sum(update), 0.0f};
}

// As portable::lamb16_block_updates; u_out, like the moments' buffers, holds whole vectors.
inline BlockMoments lamb16_block_updates(const float* __restrict p, const float* __restrict g,
                                         const uint8_t* __restrict mq, const uint8_t* __restrict vq, int64_t n,
                                         const Lamb16Args args, float* __restrict m_out, float* __restrict v_out,
                                         float* __restrict u_out) {
  Ints m_top = _mm512_setzero_si512(), v_top = m_top;  // lanes past the end hold m = v = 0
  Floats update = _mm512_setzero_ps(), weight = update;
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Moments x = lamb16_moments(p, g, mq, vq, i, k, args);
    _mm512_storeu_ps(m_out + i, x.m);
    _mm512_storeu_ps(v_out + i, x.v);
    _mm512_storeu_ps(u_out + i, x.u);
    m_top = _mm512_max_epu32(m_top, magnitude_bits(x.m));
    v_top = _mm512_max_epu32(v_top, magnitude_bits(x.v));
    update = _mm512_mask_add_ps(update, k, update, clamp(_mm512_mul_ps(x.u, x.u), args.eps, 1.0f));
    weight = _mm512_mask_add_ps(weight, k, weight, clamp(_mm512_mul_ps(x.p, x.p), args.eps, 1.0f));
  });
  return {largest(m_top), largest(v_top), sum(update), sum(weight)};
}

inline void move_weights(float* __restrict p, const float* __restrict u, int64_t n, float step_size) {
  for_each_16(n, [&](int64_t i, Lanes k) {
    prefetch(p, i), prefetch(u, i);
    const Floats moved = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, u + i), splat(step_size),
                                          _mm512_maskz_loadu_ps(k, p + i));
    _mm512_mask_storeu_ps(p + i, k, moved);
  });
}

// m over its block's scale needs no saturation and is no NaN here: the block's
// largest sets the scale, and a NaN or infinite one makes a scale that takes
// the portable loops.
inline void encode_block(const float* __restrict m, const float* __restrict v, int64_t n, float m_inverse,
                         float v_inverse, uint8_t* __restrict mq, uint8_t* __restrict vq) {
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  for_each_16(n, [&](int64_t i, Lanes k) {
    store_codes(mq + i, k, encode_unsaturated_e4m3_in_half(_mm512_mul_ps(_mm512_loadu_ps(m + i), m_to_code)));
    store_codes(vq + i, k, encode_absmax_e5m2(_mm512_mul_ps(_mm512_loadu_ps(v + i), v_to_code)));
  });
}

// LAMB: as lamb_update and the portable loops.
template <bool kBiasCorrection>
inline Floats lamb_direction(Floats p, Floats m, Floats v, const LambArgs& a) {
  if (kBiasCorrection) {
    m = _mm512_div_ps(m, splat(a.m_correction));
    v = _mm512_div_ps(v, splat(a.v_correction));
  }
  return _mm512_fmadd_ps(p, splat(a.weight_decay), _mm512_div_ps(m, _mm512_add_ps(_mm512_sqrt_ps(v), splat(a.eps))));
}

template <bool kBiasCorrection>
LambSums lamb_chunk_moments(const float* __restrict p, const float* __restrict g, float* __restrict mq,
                            float* __restrict vq, int64_t n, const LambArgs args) {
  Floats weight = _mm512_setzero_ps(), update = weight;
  for_each_16(n, [&](int64_t i, Lanes k) {
    prefetch(p, i), prefetch(g, i), prefetch(mq, i), prefetch(vq, i);
    const Floats param = _mm512_maskz_loadu_ps(k, p + i), grad = _mm512_maskz_loadu_ps(k, g + i);
    const Floats m = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, mq + i), splat(args.beta1),
                                     _mm512_mul_ps(grad, splat(args.one_minus_beta1)));
    const Floats v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, vq + i), splat(args.beta2),
                                     _mm512_mul_ps(_mm512_mul_ps(grad, grad), splat(args.one_minus_beta2)));
    const Floats u = lamb_direction<kBiasCorrection>(param, m, v, args);
    _mm512_mask_storeu_ps(mq + i, k, m);
    _mm512_mask_storeu_ps(vq + i, k, v);
    weight = _mm512_fmadd_ps(param, param, weight);       // zeros past the end...
    update = _mm512_mask3_fmadd_ps(u, u, update, k);  // ...but there u is 0 / eps, or NaN
  });
  return {sum(weight), sum(update)};
}

template <bool kBiasCorrection>
void lamb_chunk_apply(float* __restrict p, const float* __restrict mq, const float* __restrict vq, int64_t n,
                      const LambArgs args, float step_size) {
  for_each_16(n, [&](int64_t i, Lanes k) {
    prefetch(p, i), prefetch(mq, i), prefetch(vq, i);
    const Floats param = _mm512_maskz_loadu_ps(k, p + i);
    const Floats u = lamb_direction<kBiasCorrection>(param, _mm512_maskz_loadu_ps(k, mq + i),
                                                     _mm512_maskz_loadu_ps(k, vq + i), args);
    _mm512_mask_storeu_ps(p + i, k, _mm512_fnmadd_ps(u, splat(step_size), param));
  });
}

// The fp8 conversions of whole arrays, for the tests: true values, not times E4M3_IN_HALF.
inline void encode_e4m3_array(const float* x, uint8_t* out, int64_t n) {
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Floats in_half = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), splat(E4M3_IN_HALF));
    store_codes(out + i, k, encode_e4m3_in_half(in_half));
  });
}
inline void encode_e5m2_array(const float* x, uint8_t* out, int64_t n) {
  for_each_16(n, [&](int64_t i, Lanes k) { store_codes(out + i, k, encode_e5m2(_mm512_maskz_loadu_ps(k, x + i))); });
}
inline void decode_e4m3_array(const uint8_t* x, float* out, int64_t n) {
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Floats in_half = decode_e4m3_in_half(load_codes(x + i, k));
    _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(in_half, splat(1 / E4M3_IN_HALF)));
  });
}
inline void decode_e5m2_array(const uint8_t* x, float* out, int64_t n) {
  for_each_16(n, [&](int64_t i, Lanes k) { _mm512_mask_storeu_ps(out + i, k, decode_e5m2(load_codes(x + i, k))); });
}

}  // namespace avx512
}  // namespace
#endif

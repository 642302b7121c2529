// The CPU fast path of Lamb16 and Lamb: each update in the passes over memory
// that the arithmetic needs, split across threads by OpenMP. The loops come
// in up to three sets: portable C++ that the compiler vectorizes (-O3
// -march=native), and the same by hand with AVX-512 and with AVX2 intrinsics,
// the widest built in used.
//
// Pass 1 reads the weights, the gradient and the old state and returns every
// reduction of the step; pass 2 reads them again, recomputes the same moments
// and update (cheaper than storing them) and writes the new state and weights.
// (LAMB's float32 moments are the exception: pass 1 stores them, see below.)
// Lamb16's single pass reads the gradient alone for its absmax, then reads
// and writes everything once (see "LAMB16, single pass"). The arithmetic is
// that of lamb16/lamb16.py and lamb16/lamb.py, operation for operation; tests
// check every set of loops against it. Beside them, the same passes'
// memory traffic alone, for `bench`. No torch headers: the library loads this
// through ctypes with raw pointers, so it builds in a few seconds.
//
// Where the time goes (`python cli.py bench`, 2 AVX-512 cores): an exact step
// must read weights, gradient and codes twice, since the trust ratio and the
// new scales are reductions over the whole tensor known only after pass 1.
// That is 20 bytes read an element against Adam's 16, and on these machines
// the time follows the bytes read: the two passes' traffic alone (bench's
// "traffic" column, the same loads and stores with the arithmetic left out)
// takes 0.9-1.07x Adam fused's whole step at 10-100 M elements, and the
// kernels run within 1.1-1.25x of that traffic. The AVX-512 loops are bound by
// the instructions they issue, not by the divider, so estimates of sqrt and
// division do not pay; a scale above 2**100 (a diverging run) takes the
// portable loops, where the 2**8 fold of the e4m3 trick is no longer exact.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// Elements a vectorized loop reduces in float32 before the sum moves to double:
// short enough that float32 rounding stays far below the tests' tolerance.
constexpr int64_t BLOCK = 2048;
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
// float32, counts as 0 (as usable_gradient() in lamb16.py): it would otherwise
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

Lamb16Sums lamb16_block_sums(const float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                             const uint8_t* __restrict vq, int64_t n, const Lamb16Args args) {
  float m_stat = 0, v_stat = 0, weight = 0, update = 0, m_nans = 0, v_nans = 0;
  const float eps = args.eps, wd = args.weight_decay;
  if (args.seed) {
#pragma omp simd simdlen(16) reduction(+ : m_stat, v_stat, weight, update)
    for (int64_t i = 0; i < n; ++i) {
      const float m = lamb16_m(mq[i], g[i], args), v = lamb16_v(vq[i], g[i], args);
      const float u = m / (std::sqrt(v) + eps) + p[i] * wd;
      m_stat += clamp(m * m, 0.0f, 10.0f);
      v_stat += clamp(v * v, 0.0f, 10.0f);
      weight += clamp(p[i] * p[i], eps, 1.0f);
      update += clamp(u * u, eps, 1.0f);
    }
  } else {
#pragma omp simd simdlen(16) reduction(max : m_stat, v_stat) reduction(+ : weight, update, m_nans, v_nans)
    for (int64_t i = 0; i < n; ++i) {
      const float m = lamb16_m(mq[i], g[i], args), v = lamb16_v(vq[i], g[i], args);
      const float u = m / (std::sqrt(v) + eps) + p[i] * wd;
      m_stat = std::max(m_stat, std::fabs(m));
      v_stat = std::max(v_stat, v);
      m_nans += m != m ? 1.0f : 0.0f;
      v_nans += v != v ? 1.0f : 0.0f;
      weight += clamp(p[i] * p[i], eps, 1.0f);
      update += clamp(u * u, eps, 1.0f);
    }
  }
  return {m_stat, v_stat, weight, update, m_nans, v_nans};
}

// One element's writes, as lamb16_apply(): its moments stored with the new
// scales (their inverses here), its weight moved by step_size times its
// update. Returns the element's m, v and u, which the single pass also sums.
struct Element {
  float m, v, u;
};

template <bool kSeed>
inline Element lamb16_write(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                            uint8_t* __restrict vq, int64_t i, const Lamb16Args& a, float m_inverse, float v_inverse,
                            float step_size) {
  const float m = lamb16_m(mq[i], g[i], a), v = lamb16_v(vq[i], g[i], a);
  const float u = m / (std::sqrt(v) + a.eps) + p[i] * a.weight_decay;
  if (kSeed) {
    mq[i] = encode_e4m3(clamp(m * m_inverse, -15.0f, 15.0f));
    vq[i] = encode_e5m2(clamp(v, 0.0f, 10.0f) * v_inverse);
  } else {
    mq[i] = encode_e4m3(m * m_inverse);
    vq[i] = encode_e5m2(std::max(v * v_inverse, 0x1p-16f));
  }
  p[i] = p[i] - u * step_size;
  return {m, v, u};
}

void lamb16_block_apply(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale, float v_scale,
                        float step_size) {
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;  // as write_absmax(), write_seed()
  if (args.seed) {
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < n; ++i) lamb16_write<true>(p, g, mq, vq, i, args, m_inverse, v_inverse, step_size);
  } else {
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < n; ++i) lamb16_write<false>(p, g, mq, vq, i, args, m_inverse, v_inverse, step_size);
  }
}

// The single-pass step (lamb16_single_pass_update() in lamb16.py) reads the
// weights, gradient and codes once: its scales come from bounds that need only
// the gradient's absmax (a read of the gradient alone before the pass), its
// trust ratio from the last step's update norm. While it writes, it sums what
// the next step will need: this step's update norm, the moments' statistics,
// and the norm of the weights it wrote.

// The largest |g| of usable gradient elements.
float gradient_block_absmax(const float* __restrict g, int64_t n) {
  float largest = 0;
#pragma omp simd simdlen(16) reduction(max : largest)
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::fabs(usable(g[i])));
  return largest;
}

// sum(clamp(p*p, eps, 1)): the single pass runs it over each block it has just
// written, and a recomputed weight norm over the same blocks, so that both
// give the same bits.
float weight_block_sum(const float* __restrict p, int64_t n, float eps) {
  float weight = 0;
#pragma omp simd simdlen(16) reduction(+ : weight)
  for (int64_t i = 0; i < n; ++i) weight += clamp(p[i] * p[i], eps, 1.0f);
  return weight;
}

struct SinglePassSums {
  float update;        // sum of clamp(u*u, eps, 1)
  float m_sum, v_sum;  // seed: sums of clamp(x*x, 0, 10) (absmax: unused)
};

SinglePassSums lamb16_block_single_pass(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale,
                                        float v_scale, float step_size) {
  const float eps = args.eps, m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;
  float update = 0, m_sum = 0, v_sum = 0;
  if (args.seed) {
#pragma omp simd simdlen(16) reduction(+ : update, m_sum, v_sum)
    for (int64_t i = 0; i < n; ++i) {
      const Element e = lamb16_write<true>(p, g, mq, vq, i, args, m_inverse, v_inverse, step_size);
      update += clamp(e.u * e.u, eps, 1.0f);
      m_sum += clamp(e.m * e.m, 0.0f, 10.0f);
      v_sum += clamp(e.v * e.v, 0.0f, 10.0f);
    }
  } else {
#pragma omp simd simdlen(16) reduction(+ : update)
    for (int64_t i = 0; i < n; ++i) {
      const Element e = lamb16_write<false>(p, g, mq, vq, i, args, m_inverse, v_inverse, step_size);
      update += clamp(e.u * e.u, eps, 1.0f);
    }
  }
  return {update, m_sum, v_sum};
}

// The largest code magnitude in a block just written: fp8 rounding is
// monotonic, so it is the code of the largest |m| (or v), which the next
// single-pass step bounds from (a NaN's codes are the largest). A max over
// bytes in cache: cheaper than a max over the floats inside the writing loop,
// which the compiler then vectorizes far worse (1.8x the step's time).
int largest_code(const uint8_t* __restrict codes, int64_t n) {
  uint8_t top = 0;
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < n; ++i) top = std::max(top, uint8_t(codes[i] & 0x7Fu));
  return top;
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
template <bool kBiasCorrection>
LambSums lamb_block_moments(const float* __restrict p, const float* __restrict g, float* __restrict mq,
                            float* __restrict vq, int64_t n, const LambArgs args) {
  float weight = 0, update = 0;
#pragma omp simd simdlen(16) reduction(+ : weight, update)
  for (int64_t i = 0; i < n; ++i) {
    const float m = mq[i] * args.beta1 + g[i] * args.one_minus_beta1;
    const float v = vq[i] * args.beta2 + g[i] * g[i] * args.one_minus_beta2;
    const float u = lamb_update<kBiasCorrection>(p[i], m, v, args);
    mq[i] = m;
    vq[i] = v;
    weight += p[i] * p[i];
    update += u * u;
  }
  return {weight, update};
}

template <bool kBiasCorrection>
void lamb_block_apply(float* __restrict p, const float* __restrict mq, const float* __restrict vq, int64_t n,
                      const LambArgs args, float step_size) {
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < n; ++i) {
    p[i] = p[i] - lamb_update<kBiasCorrection>(p[i], mq[i], vq[i], args) * step_size;
  }
}

// ---------------------------------------------------------------- AVX-512 ----
//
// The same loops written with AVX-512 intrinsics, 16 elements a register,
// where the compiler targets a processor that has them (GCC vectorizes the
// loops above by widening the fp8 bytes to 64 lanes, and spills registers).
// fp8 goes through half precision, which the processor converts in hardware:
// an e5m2 code is the top byte of the half with the same value, and an e4m3
// code, its magnitude moved down a bit, a half of its value times 2**-8. The
// results are those of the portable loops, which stay as the fallback and as
// what the tests hold to the reference as well.
//
// These loops also prefetch: the hardware prefetcher runs too short a distance
// ahead of loops this heavy once the arrays outgrow the L2 cache (measured on
// 10 M elements: the step takes about a quarter less time).

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#define LAMB16_AVX512 1
#include <immintrin.h>

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

// The loop over a block in steps of 16, the last step masked to what is left.
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
Lamb16Sums lamb16_block_sums(const float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
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
  } else {
    store_codes(mq + i, k, encode_m(_mm512_mul_ps(x.m, m_to_code)));
    store_codes(vq + i, k, encode_unsigned_e5m2(_mm512_max_ps(splat(0x1p-16f), _mm512_mul_ps(x.v, v_to_code))));
  }
  _mm512_mask_storeu_ps(p + i, k, _mm512_fnmadd_ps(x.u, splat(step_size), x.p));
}

template <bool kSeed>
void lamb16_block_apply(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
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
inline float gradient_block_absmax(const float* __restrict g, int64_t n) {
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

inline float weight_block_sum(const float* __restrict p, int64_t n, float eps) {
  Floats weight = _mm512_setzero_ps();
  for_each_16(n, [&](int64_t i, Lanes k) {
    const Floats x = _mm512_maskz_loadu_ps(k, p + i);
    weight = _mm512_mask_add_ps(weight, k, weight, clamp(_mm512_mul_ps(x, x), eps, 1.0f));
  });
  return sum(weight);
}

template <bool kSeed>
SinglePassSums lamb16_block_single_pass(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
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
LambSums lamb_block_moments(const float* __restrict p, const float* __restrict g, float* __restrict mq,
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
void lamb_block_apply(float* __restrict p, const float* __restrict mq, const float* __restrict vq, int64_t n,
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
#endif


// ------------------------------------------------------------------ AVX2 ----
//
// The LAMB16 loops again with AVX2, F16C and FMA intrinsics, 8 elements a
// register, for processors without AVX-512 (many AMD and older Intel ones),
// where the portable loops are bound by the compiler's fp8 arithmetic at 3.5-4.5
// times their memory traffic. The same conversions through half precision as
// the AVX-512 loops (see there); a block's last elements, fewer than 8, go
// through the same code on zero-padded copies. LAMB's float32 loops need no
// conversions, and the portable ones already run near their traffic.

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define LAMB16_AVX2 1
#include <immintrin.h>

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

// body(p, g, mq, vq, valid) over a block, 8 elements at a time; `valid` has
// its lanes set where elements are (all but in the last, short step, which runs
// on zero-padded copies; kWrites: written back).
template <bool kWrites, typename Body>
inline void for_each_8(float* p, const float* g, uint8_t* mq, uint8_t* vq, int64_t n, Body body) {
  const Floats all = float_of(splat_int(0xFFFFFFFFu));
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) body(p + i, g + i, mq + i, vq + i, all);
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
inline Floats clamped_square(Floats x, float lo, float hi, Floats valid) {
  return _mm256_and_ps(valid, clamp(_mm256_mul_ps(x, x), lo, hi));
}

template <bool kSeed>
Lamb16Sums lamb16_block_sums(const float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                             const uint8_t* __restrict vq, int64_t n, const Lamb16Args args) {
  Floats m_sum = _mm256_setzero_ps(), v_sum = m_sum, weight = m_sum, update = m_sum;
  Ints m_max = _mm256_setzero_si256(), v_max = m_max;  // as bits: a NaN's order above any number's
  // Read only: the block's arrays pass as writable for for_each_8, which writes nothing back here.
  for_each_8<false>(const_cast<float*>(p), g, const_cast<uint8_t*>(mq), const_cast<uint8_t*>(vq), n,
                    [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, Floats valid) {
    const Moments x = lamb16_moments(pi, gi, mi, vi, args);
    if (kSeed) {  // padded lanes hold m = v = 0, which add nothing
      m_sum = _mm256_add_ps(m_sum, clamp(_mm256_mul_ps(x.m, x.m), 0.0f, 10.0f));
      v_sum = _mm256_add_ps(v_sum, clamp(_mm256_mul_ps(x.v, x.v), 0.0f, 10.0f));
    } else {
      m_max = _mm256_max_epu32(m_max, magnitude_bits(x.m));
      v_max = _mm256_max_epu32(v_max, magnitude_bits(x.v));
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
    store_codes(mq, encode_m(clamp(_mm256_mul_ps(x.m, m_to_code), -m_bound, m_bound)));
    store_codes(vq, encode_unsigned_e5m2(_mm256_mul_ps(clamp(x.v, 0.0f, 10.0f), v_to_code)));
  } else {
    store_codes(mq, encode_m(_mm256_mul_ps(x.m, m_to_code)));
    store_codes(vq, encode_unsigned_e5m2(_mm256_max_ps(splat(0x1p-16f), _mm256_mul_ps(x.v, v_to_code))));
  }
  _mm256_storeu_ps(p, _mm256_fnmadd_ps(x.u, splat(step_size), x.p));
}

template <bool kSeed>
void lamb16_block_apply(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale, float v_scale,
                        float step_size) {
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;  // as the portable loops
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  for_each_8<true>(p, g, mq, vq, n, [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, Floats) {
    lamb16_store<kSeed, false>(pi, mi, vi, lamb16_moments(pi, gi, mi, vi, args), m_to_code, v_to_code, step_size);
  });
}

template <bool kSeed>
SinglePassSums lamb16_block_single_pass(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale,
                                        float v_scale, float step_size) {
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;
  const Floats m_to_code = splat(m_inverse * E4M3_IN_HALF), v_to_code = splat(v_inverse);
  Floats update = _mm256_setzero_ps(), m_sum = update, v_sum = update;
  for_each_8<true>(p, g, mq, vq, n, [&](float* pi, const float* gi, uint8_t* mi, uint8_t* vi, Floats valid) {
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

inline float gradient_block_absmax(const float* __restrict g, int64_t n) {
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

inline float weight_block_sum(const float* __restrict p, int64_t n, float eps) {
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
#endif

// Which loops run: the widest built in, unless the tests (use_loops) ask for
// narrower ones, to hold each set to the reference.
enum Loops { PORTABLE_LOOPS = 0, AVX2_LOOPS = 1, AVX512_LOOPS = 2 };
#if defined(LAMB16_AVX512)
constexpr int WIDEST_LOOPS = AVX512_LOOPS;
#elif defined(LAMB16_AVX2)
constexpr int WIDEST_LOOPS = AVX2_LOOPS;
#else
constexpr int WIDEST_LOOPS = PORTABLE_LOOPS;
#endif
int loops = WIDEST_LOOPS;

// The loops to run for a block, by the m scales it reads and writes. The
// hand-vectorized loops fold E4M3_IN_HALF into m's scale, so the scale times
// 2**8 and its reciprocal times 2**-8 must be normal floats: absmax scales of
// finite moments are at most 2**128 / 448; a larger one (a diverged or edited
// state) takes the portable loops.
inline int loops_for(float old_m_scale, float new_m_scale) {
  const bool exact = std::fabs(old_m_scale) <= 0x1p100f && std::fabs(old_m_scale) >= 0x1p-126f &&
                     std::fabs(new_m_scale) <= 0x1p100f && std::fabs(new_m_scale) >= 0x1p-126f;
  return exact ? loops : PORTABLE_LOOPS;
}

inline int64_t blocks_of(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

// A LAMB16 step's reductions over n elements (pass 1), from the old scales in
// args: {m_stat, v_stat, weight, update} as lamb16_partials() in lamb16.py:
// largest |m| and v (NaN if any is) or the seed's sums, and the clamped square
// sums of the weights and the update.
struct Lamb16Partials {
  float m_stat, v_stat, weight, update;
};

Lamb16Partials lamb16_sums(const float* param, const float* grad, const uint8_t* exp_avg, const uint8_t* exp_avg_sq,
                           int64_t n, const Lamb16Args args, int threads) {
  auto block_sums = lamb16_block_sums;
  const int chosen = loops_for(args.m_scale, args.m_scale);
#ifdef LAMB16_AVX512
  if (chosen == AVX512_LOOPS) block_sums = args.seed ? avx512::lamb16_block_sums<true> : avx512::lamb16_block_sums<false>;
#endif
#ifdef LAMB16_AVX2
  if (chosen == AVX2_LOOPS) block_sums = args.seed ? avx2::lamb16_block_sums<true> : avx2::lamb16_block_sums<false>;
#endif
  const int64_t blocks = blocks_of(n);
  float m_max = 0, v_max = 0, m_nans = 0, v_nans = 0;
  double m_sum = 0, v_sum = 0, weight = 0, update = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) \
    reduction(max : m_max, v_max) reduction(+ : m_sum, v_sum, weight, update, m_nans, v_nans)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    const Lamb16Sums s = block_sums(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args);
    m_max = std::max(m_max, s.m_stat);
    v_max = std::max(v_max, s.v_stat);
    m_sum += s.m_stat;
    v_sum += s.v_stat;
    weight += s.weight;
    update += s.update;
    m_nans += s.m_nans;
    v_nans += s.v_nans;
  }
  if (args.seed) return {float(m_sum), float(v_sum), float(weight), float(update)};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  return {m_nans > 0 ? nan : m_max, v_nans > 0 ? nan : v_max, float(weight), float(update)};
}

// A LAMB16 step's writes over n elements (pass 2): moments stored with the new
// scales, weights moved by step_size times the update.
void lamb16_apply(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq, int64_t n,
                  const Lamb16Args args, float m_scale, float v_scale, float step_size, int threads) {
  auto block_apply = lamb16_block_apply;
  const int chosen = loops_for(args.m_scale, m_scale);
#ifdef LAMB16_AVX512
  if (chosen == AVX512_LOOPS) block_apply = args.seed ? avx512::lamb16_block_apply<true> : avx512::lamb16_block_apply<false>;
#endif
#ifdef LAMB16_AVX2
  if (chosen == AVX2_LOOPS) block_apply = args.seed ? avx2::lamb16_block_apply<true> : avx2::lamb16_block_apply<false>;
#endif
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t b = 0; b < blocks_of(n); ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    block_apply(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, m_scale, v_scale, step_size);
  }
}

// One LAMB16 step on n elements, from the old scales in args; out: {new m
// scale, new v scale, weight_norm, adam_norm, trust_ratio}.
void lamb16_step(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq, int64_t n,
                 const Lamb16Args args, float lr, float trust_lr, float trust_scale, int threads, float* out) {
  const Lamb16Partials s = lamb16_sums(param, grad, exp_avg, exp_avg_sq, n, args, threads);
  // lamb16_finish()
  const float count = float(n);
  float m_scale, v_scale;
  if (args.seed) {  // seed_scales_from_sums()
    m_scale = std::sqrt(s.m_stat) / count + args.eps;
    v_scale = std::sqrt(s.v_stat) / count + args.eps;
  } else {  // absmax_scales_from_maxima(); a NaN stays NaN
    const float tiny = std::numeric_limits<float>::min();
    m_scale = s.m_stat != s.m_stat ? s.m_stat : std::max(s.m_stat / 448.0f, tiny);
    v_scale = s.v_stat != s.v_stat ? s.v_stat : std::max(s.v_stat / 57344.0f, tiny);
  }
  const float weight_norm = std::sqrt(s.weight) / count;
  const float adam_norm = std::sqrt(s.update) / count;
  // lamb16_trust_ratio(): (w / u / trust_lr * 1e-3) ** trust_scale, clamped to [0, 2].
  const float trust = clamp(std::pow(weight_norm / adam_norm / trust_lr * 1e-3f, trust_scale), 0.0f, 2.0f);
  lamb16_apply(param, grad, exp_avg, exp_avg_sq, n, args, m_scale, v_scale, trust * lr, threads);
  out[0] = m_scale;
  out[1] = v_scale;
  out[2] = weight_norm;
  out[3] = adam_norm;
  out[4] = trust;
}

// ---------------------------------------------------- LAMB16, single pass ----

// Which loops the single pass takes: the hand-vectorized ones where built in
// and exact for both scales (as lamb16_apply); the weight sums and the
// gradient's absmax by the switch alone, so that a recomputed weight norm
// always takes the same loop as the pass that carried it.
float gradient_absmax(const float* grad, int64_t n, int threads) {
  auto block_absmax = gradient_block_absmax;
#ifdef LAMB16_AVX512
  if (loops == AVX512_LOOPS) block_absmax = avx512::gradient_block_absmax;
#endif
#ifdef LAMB16_AVX2
  if (loops == AVX2_LOOPS) block_absmax = avx2::gradient_block_absmax;
#endif
  float top = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(max : top)
  for (int64_t b = 0; b < blocks_of(n); ++b) {
    const int64_t lo = b * BLOCK;
    top = std::max(top, block_absmax(grad + lo, std::min(n - lo, BLOCK)));
  }
  return top;
}

using WeightSum = float (*)(const float*, int64_t, float);

WeightSum weight_sum_loop() {
#ifdef LAMB16_AVX512
  if (loops == AVX512_LOOPS) return avx512::weight_block_sum;
#endif
#ifdef LAMB16_AVX2
  if (loops == AVX2_LOOPS) return avx2::weight_block_sum;
#endif
  return weight_block_sum;
}

// weight_norm_of(): sqrt(sum(clamp(p*p, eps, 1))) / n, block by block as the single pass sums it.
float weight_norm(const float* param, int64_t n, float eps, int threads) {
  const WeightSum block_sum = weight_sum_loop();
  double weight = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(+ : weight)
  for (int64_t b = 0; b < blocks_of(n); ++b) {
    const int64_t lo = b * BLOCK;
    weight += block_sum(param + lo, std::min(n - lo, BLOCK), eps);
  }
  return std::sqrt(float(weight)) / float(n);
}

// One single-pass LAMB16 step on n elements, from the old scales in args, the
// carry (CARRY in lamb16.py) and the last step's update norm; out: {new m
// scale, new v scale, weight_norm, adam_norm, trust_ratio, then the new carry's four}.
void lamb16_single_pass_step(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq, int64_t n,
                             const Lamb16Args args, float lr, float trust_lr, float trust_scale, const float* carry,
                             float last_adam_norm, int threads, float* out) {
  const float count = float(n), tiny = std::numeric_limits<float>::min();
  // single_pass_scales(): the carried statistics, and bounds from the gradient's absmax.
  float m_scale = carry[1], v_scale = carry[2];
  if (!args.seed) {
    const float g_max = gradient_absmax(grad, n, threads);
    const float m_bound = carry[1] * args.beta1 + g_max * args.one_minus_beta1;
    const float v_bound = carry[2] * args.beta2 + g_max * g_max * args.one_minus_beta2;
    m_scale = m_bound != m_bound ? m_bound : std::max(m_bound / 448.0f, tiny);  // a NaN stays NaN
    v_scale = v_bound != v_bound ? v_bound : std::max(v_bound / 57344.0f, tiny);
  }
  const float weight_norm = carry[0];
  const float trust = clamp(std::pow(weight_norm / last_adam_norm / trust_lr * 1e-3f, trust_scale), 0.0f, 2.0f);
  const float step_size = trust * lr;

  auto block_pass = lamb16_block_single_pass;
#ifdef LAMB16_AVX512
  if (loops_for(args.m_scale, m_scale) == AVX512_LOOPS) {
    block_pass = args.seed ? avx512::lamb16_block_single_pass<true> : avx512::lamb16_block_single_pass<false>;
  }
#endif
#ifdef LAMB16_AVX2
  if (loops_for(args.m_scale, m_scale) == AVX2_LOOPS) {
    block_pass = args.seed ? avx2::lamb16_block_single_pass<true> : avx2::lamb16_block_single_pass<false>;
  }
#endif
  const WeightSum block_weight_sum = weight_sum_loop();
  int m_code = 0, v_code = 0;
  double m_sum = 0, v_sum = 0, update = 0, weight = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) \
    reduction(max : m_code, v_code) reduction(+ : m_sum, v_sum, update, weight)
  for (int64_t b = 0; b < blocks_of(n); ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    const SinglePassSums s = block_pass(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, m_scale,
                                        v_scale, step_size);
    // What the block just wrote, still in cache: the new weights' norm, the largest codes.
    weight += block_weight_sum(param + lo, len, args.eps);
    if (!args.seed) {
      m_code = std::max(m_code, largest_code(exp_avg + lo, len));
      v_code = std::max(v_code, largest_code(exp_avg_sq + lo, len));
    }
    update += s.update;
    m_sum += s.m_sum;
    v_sum += s.v_sum;
  }
  // next_stats(): seed scales of this step's moments, or the largest |m| and v as stored.
  float m_stat, v_stat;
  if (args.seed) {
    m_stat = std::sqrt(float(m_sum)) / count + args.eps;
    v_stat = std::sqrt(float(v_sum)) / count + args.eps;
  } else {
    m_stat = decode_e4m3(uint8_t(m_code)) * m_scale;
    v_stat = decode_e5m2(uint8_t(v_code)) * v_scale;
  }
  out[0] = m_scale;
  out[1] = v_scale;
  out[2] = weight_norm;
  out[3] = std::sqrt(float(update)) / count;
  out[4] = trust;
  out[5] = std::sqrt(float(weight)) / count;
  out[6] = m_stat;
  out[7] = v_stat;
  out[8] = 1.0f;
}

// A LAMB step's first pass over n elements: the moments, in place, and the
// square sums of the weights and the update (lamb_partials()).
LambSums lamb_sums(const float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                   const LambArgs args, bool bias_correction, int threads) {
  auto moments = bias_correction ? lamb_block_moments<true> : lamb_block_moments<false>;
#ifdef LAMB16_AVX512
  if (loops == AVX512_LOOPS) moments = bias_correction ? avx512::lamb_block_moments<true> : avx512::lamb_block_moments<false>;
#endif
  double weight = 0, update = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(+ : weight, update)
  for (int64_t b = 0; b < blocks_of(n); ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    const LambSums s = moments(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args);
    weight += s.weight;
    update += s.update;
  }
  return {float(weight), float(update)};
}

// A LAMB step's second pass: the weights move by step_size times the update.
void lamb_apply(float* param, const float* exp_avg, const float* exp_avg_sq, int64_t n, const LambArgs args,
                bool bias_correction, float step_size, int threads) {
  auto apply = bias_correction ? lamb_block_apply<true> : lamb_block_apply<false>;
#ifdef LAMB16_AVX512
  if (loops == AVX512_LOOPS) apply = bias_correction ? avx512::lamb_block_apply<true> : avx512::lamb_block_apply<false>;
#endif
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t b = 0; b < blocks_of(n); ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    apply(param + lo, exp_avg + lo, exp_avg_sq + lo, len, args, step_size);
  }
}

// One LAMB step on n elements; out: {weight_norm, adam_norm, trust_ratio}.
void lamb_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n, const LambArgs args,
               bool bias_correction, float lr, bool adam, float max_weight_norm, int threads, float* out) {
  const LambSums s = lamb_sums(param, grad, exp_avg, exp_avg_sq, n, args, bias_correction, threads);
  // lamb_finish(); trust_ratio(): w / u, or 1 where either norm is zero (nothing to scale against).
  const float weight_norm = std::min(std::sqrt(s.weight), max_weight_norm);
  const float adam_norm = std::sqrt(s.update);
  const float trust = adam || !(weight_norm > 0 && adam_norm > 0) ? 1.0f : weight_norm / adam_norm;
  lamb_apply(param, exp_avg, exp_avg_sq, n, args, bias_correction, trust * lr, threads);
  out[0] = weight_norm;
  out[1] = adam_norm;
  out[2] = trust;
}

// ---------------------------------------------------------- traffic ----
//
// A step's reads and writes alone, pass for pass as the loops above make them
// (and as Adam makes its one), the arithmetic left out (bits are xor-ed, to
// read and write something): what memory alone costs a step of that design,
// which `bench` times beside the steps.

using Word = uint32_t;  // a float32's bits

// Adam: one pass, reading the weights, gradient and moments, writing the weights and moments.
void adam_traffic(Word* p, const Word* g, Word* m, Word* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Word mi = m[i] ^ g[i], vi = v[i] ^ g[i];
    m[i] = mi;
    v[i] = vi;
    p[i] ^= mi ^ vi;
  }
}

// LAMB: pass 1 reads the weights, gradient and moments, and writes the
// moments; pass 2 reads the weights and moments, and writes the weights.
Word lamb_traffic_first(const Word* p, const Word* g, Word* m, Word* v, int64_t n) {
  Word seen = 0;
#pragma omp simd reduction(^ : seen)
  for (int64_t i = 0; i < n; ++i) {
    m[i] ^= g[i];
    v[i] ^= g[i];
    seen ^= p[i];
  }
  return seen;
}

void lamb_traffic_second(Word* p, const Word* m, const Word* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] ^= m[i] ^ v[i];
}

// LAMB16: pass 1 reads the weights, gradient and both fp8 codes; pass 2 reads
// them again and writes the weights and codes.
Word lamb16_traffic_first(const Word* p, const Word* g, const uint8_t* mq, const uint8_t* vq, int64_t n) {
  Word seen = 0;
#pragma omp simd reduction(^ : seen)
  for (int64_t i = 0; i < n; ++i) seen ^= p[i] ^ g[i] ^ mq[i] ^ Word(vq[i]) << 8;
  return seen;
}

void lamb16_traffic_second(Word* p, const Word* g, uint8_t* mq, uint8_t* vq, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t m = mq[i], v = vq[i];
    p[i] ^= g[i] ^ m;
    mq[i] = m ^ v;
    vq[i] = v ^ 1;
  }
}

// LAMB16's single pass: the gradient alone first (its absmax), then the second pass above.
Word gradient_traffic(const Word* g, int64_t n) {
  Word seen = 0;
#pragma omp simd reduction(^ : seen)
  for (int64_t i = 0; i < n; ++i) seen ^= g[i];
  return seen;
}

enum Pattern { ADAM_PATTERN = 0, LAMB_PATTERN = 1, LAMB16_PATTERN = 2, LAMB16_SINGLE_PASS_PATTERN = 3 };

// One tensor's traffic, its blocks split across the threads as a step's are.
Word tensor_traffic(int pattern, Word* p, const Word* g, void* m, void* v, int64_t n, int threads) {
  Word* m32 = static_cast<Word*>(m);
  Word* v32 = static_cast<Word*>(v);
  uint8_t* m8 = static_cast<uint8_t*>(m);
  uint8_t* v8 = static_cast<uint8_t*>(v);
  const int64_t blocks = blocks_of(n);
  Word seen = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(^ : seen)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    if (pattern == ADAM_PATTERN) {
      adam_traffic(p + lo, g + lo, m32 + lo, v32 + lo, len);
    } else if (pattern == LAMB_PATTERN) {
      seen ^= lamb_traffic_first(p + lo, g + lo, m32 + lo, v32 + lo, len);
    } else if (pattern == LAMB16_SINGLE_PASS_PATTERN) {
      seen ^= gradient_traffic(g + lo, len);
    } else {
      seen ^= lamb16_traffic_first(p + lo, g + lo, m8 + lo, v8 + lo, len);
    }
  }
  if (pattern == ADAM_PATTERN) return seen;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    if (pattern == LAMB_PATTERN) {
      lamb_traffic_second(p + lo, m32 + lo, v32 + lo, len);
    } else {
      lamb16_traffic_second(p + lo, g + lo, m8 + lo, v8 + lo, len);
    }
  }
  return seen;
}

// Many tensors in one call: row t of the table holds tensor t's addresses, and
// its size in column SIZE, in the order of the *_COLUMNS below; the results are
// written into the 0-dim state tensors the row points to.
//
// Tensors large enough to share out go one at a time, split across the threads;
// the small ones go whole to one thread each, several at once (a small tensor's
// sums add up in the same order whichever thread takes it).

constexpr int64_t SIZE = 4;

template <typename Update>
void each_tensor(const int64_t* table, int64_t columns, int64_t count, int threads, Update update) {
  int64_t small_total = 0;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t n = table[t * columns + SIZE];
    if (n >= PARALLEL_MIN) {
      update(t, threads);
    } else {
      small_total += n;
    }
  }
#pragma omp parallel for schedule(dynamic, 1) if (small_total >= PARALLEL_MIN) num_threads(threads)
  for (int64_t t = 0; t < count; ++t) {
    if (table[t * columns + SIZE] < PARALLEL_MIN) update(t, 1);
  }
}

template <typename T>
T* address(int64_t value) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(value));
}

}  // namespace

extern "C" {

// Rows: param, grad, exp_avg, exp_avg_sq, numel, exp_avg_scale (read, then
// overwritten), exp_avg_sq_scale (likewise), weight_norm, adam_norm, trust_ratio.
constexpr int64_t LAMB16_COLUMNS = 10;

void lamb16_steps(const int64_t* table, int64_t count, float lr, float trust_lr, float beta1, float beta2,
                  float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay, float trust_scale, int seed, int threads) {
  each_tensor(table, LAMB16_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * LAMB16_COLUMNS;
    float* m_scale = address<float>(r[5]);
    float* v_scale = address<float>(r[6]);
    const Lamb16Args args{*m_scale, *v_scale, beta1, beta2, one_minus_beta1, one_minus_beta2,
                          eps, weight_decay, seed != 0};
    float out[5];
    lamb16_step(address<float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]), address<uint8_t>(r[3]),
                r[4], args, lr, trust_lr, trust_scale, tensor_threads, out);
    *m_scale = out[0];
    *v_scale = out[1];
    *address<float>(r[7]) = out[2];
    *address<float>(r[8]) = out[3];
    *address<float>(r[9]) = out[4];
  });
}

// The single-pass step's rows: those of lamb16_steps, then the carry (four
// floats, read, then overwritten). adam_norm holds the last step's update norm
// when the step starts, and this step's after.
constexpr int64_t SINGLE_PASS_COLUMNS = 11;

void lamb16_single_pass_steps(const int64_t* table, int64_t count, float lr, float trust_lr, float beta1,
                              float beta2, float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay,
                              float trust_scale, int seed, int threads) {
  each_tensor(table, SINGLE_PASS_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * SINGLE_PASS_COLUMNS;
    float* m_scale = address<float>(r[5]);
    float* v_scale = address<float>(r[6]);
    float* carry = address<float>(r[10]);
    const Lamb16Args args{*m_scale, *v_scale, beta1, beta2, one_minus_beta1, one_minus_beta2,
                          eps, weight_decay, seed != 0};
    float out[9];
    lamb16_single_pass_step(address<float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]),
                            address<uint8_t>(r[3]), r[4], args, lr, trust_lr, trust_scale, carry, *address<float>(r[8]),
                            tensor_threads, out);
    *m_scale = out[0];
    *v_scale = out[1];
    for (int k = 2; k < 5; ++k) *address<float>(r[5 + k]) = out[k];
    for (int k = 0; k < 4; ++k) carry[k] = out[5 + k];
  });
}

// Over rows as lamb16_single_pass_steps' (only param, numel and the carry are
// read): each tensor's weight norm into its carry, as a single pass would have
// carried it, for weights that something else has changed since.
void lamb16_weight_norms(const int64_t* table, int64_t count, float eps, int threads) {
  each_tensor(table, SINGLE_PASS_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * SINGLE_PASS_COLUMNS;
    address<float>(r[10])[0] = weight_norm(address<const float>(r[0]), r[4], eps, tensor_threads);
  });
}

// Rows: param, grad, exp_avg, exp_avg_sq, numel, weight_norm, adam_norm,
// trust_ratio; corrections: each tensor's {1 - beta1**step, 1 - beta2**step}
// (its own step count), used where bias_correction is set.
constexpr int64_t LAMB_COLUMNS = 8;

void lamb_steps(const int64_t* table, int64_t count, const float* corrections, float lr, float beta1, float beta2,
                float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay, int bias_correction,
                int adam, float max_weight_norm, int threads) {
  each_tensor(table, LAMB_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * LAMB_COLUMNS;
    const float* correction = corrections + 2 * t;
    const LambArgs args{beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, correction[0], correction[1]};
    float out[3];
    lamb_step(address<float>(r[0]), address<const float>(r[1]), address<float>(r[2]), address<float>(r[3]), r[4],
              args, bias_correction != 0, lr, adam != 0, max_weight_norm, tensor_threads, out);
    *address<float>(r[5]) = out[0];
    *address<float>(r[6]) = out[1];
    *address<float>(r[7]) = out[2];
  });
}

// The two passes apart, for a tensor whose pieces live on several processes
// (a sharded parameter): lamb16_partials() writes each row's Lamb16Partials
// into out (count x 4) and changes nothing; the caller combines the pieces'
// partials and finishes them; lamb16_applies() then runs pass 2 with each
// row of finished (count x 6): {new m scale, new v scale, weight_norm,
// adam_norm, trust_ratio, step_size}, reading the old scales from the table,
// then writes the row's first five into the row's 0-dim tensors.
void lamb16_partials(const int64_t* table, int64_t count, float beta1, float beta2, float one_minus_beta1,
                     float one_minus_beta2, float eps, float weight_decay, int seed, int threads, float* out) {
  each_tensor(table, LAMB16_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * LAMB16_COLUMNS;
    const Lamb16Args args{*address<float>(r[5]), *address<float>(r[6]), beta1, beta2, one_minus_beta1,
                          one_minus_beta2, eps, weight_decay, seed != 0};
    const Lamb16Partials s = lamb16_sums(address<const float>(r[0]), address<const float>(r[1]),
                                         address<const uint8_t>(r[2]), address<const uint8_t>(r[3]), r[4], args,
                                         tensor_threads);
    float* row = out + 4 * t;
    row[0] = s.m_stat, row[1] = s.v_stat, row[2] = s.weight, row[3] = s.update;
  });
}

void lamb16_applies(const int64_t* table, int64_t count, float beta1, float beta2, float one_minus_beta1,
                    float one_minus_beta2, float eps, float weight_decay, int seed, int threads, const float* finished) {
  each_tensor(table, LAMB16_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * LAMB16_COLUMNS;
    const Lamb16Args args{*address<float>(r[5]), *address<float>(r[6]), beta1, beta2, one_minus_beta1,
                          one_minus_beta2, eps, weight_decay, seed != 0};
    const float* f = finished + 6 * t;
    lamb16_apply(address<float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]), address<uint8_t>(r[3]),
                 r[4], args, f[0], f[1], f[5], tensor_threads);
    for (int k = 0; k < 5; ++k) *address<float>(r[5 + k]) = f[k];
  });
}

// Likewise for LAMB: lamb_partials() runs pass 1 (it writes the moments) and
// each row's {weight, update} square sums into out (count x 2);
// lamb_applies() runs pass 2 with each row of finished (count x 4):
// {weight_norm, adam_norm, trust_ratio, step_size}, then writes the first
// three into the row's 0-dim tensors.
void lamb_partials(const int64_t* table, int64_t count, const float* corrections, float beta1, float beta2,
                   float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay, int bias_correction,
                   int threads, float* out) {
  each_tensor(table, LAMB_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * LAMB_COLUMNS;
    const float* correction = corrections + 2 * t;
    const LambArgs args{beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, correction[0], correction[1]};
    const LambSums s = lamb_sums(address<const float>(r[0]), address<const float>(r[1]), address<float>(r[2]),
                                 address<float>(r[3]), r[4], args, bias_correction != 0, tensor_threads);
    out[2 * t] = s.weight;
    out[2 * t + 1] = s.update;
  });
}

void lamb_applies(const int64_t* table, int64_t count, const float* corrections, float beta1, float beta2,
                  float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay, int bias_correction,
                  int threads, const float* finished) {
  each_tensor(table, LAMB_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * LAMB_COLUMNS;
    const float* correction = corrections + 2 * t;
    const LambArgs args{beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, correction[0], correction[1]};
    const float* f = finished + 4 * t;
    lamb_apply(address<float>(r[0]), address<const float>(r[2]), address<const float>(r[3]), r[4], args,
               bias_correction != 0, f[3], tensor_threads);
    for (int k = 0; k < 3; ++k) *address<float>(r[5 + k]) = f[k];
  });
}

// The traffic of a step of the given pattern (ADAM_PATTERN, LAMB_PATTERN,
// LAMB16_PATTERN or LAMB16_SINGLE_PASS_PATTERN) over a table whose rows start as the steps' do: param, grad,
// exp_avg, exp_avg_sq, numel. Returns the bits pass 1 read, xor-ed, so that no
// compiler leaves the reads out.
int64_t traffic(const int64_t* table, int64_t columns, int64_t count, int pattern, int threads) {
  Word seen = 0;
  each_tensor(table, columns, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * columns;
    const Word bits = tensor_traffic(pattern, address<Word>(r[0]), address<const Word>(r[1]), address<void>(r[2]),
                                     address<void>(r[3]), r[4], tensor_threads);
#pragma omp atomic
    seen ^= bits;
  });
  return seen;
}

// Switches to the given loops (Loops: 0 portable, 1 avx2, 2 avx512) where
// they are built in, or leaves them (-1); returns the loops that run from now on.
int use_loops(int which) {
  const bool built = which == PORTABLE_LOOPS || which == WIDEST_LOOPS ||
#ifdef LAMB16_AVX2
                     which == AVX2_LOOPS ||
#endif
                     false;
  if (which >= 0 && built) loops = which;
  return loops;
}

// The fp8 conversions alone, for the tests to compare with torch's: those of
// the loops that run.
#define HAND_VECTORIZED_AVX512(call)
#define HAND_VECTORIZED_AVX2(call)
#ifdef LAMB16_AVX512
#undef HAND_VECTORIZED_AVX512
#define HAND_VECTORIZED_AVX512(call) \
  if (loops == AVX512_LOOPS) return avx512::call;
#endif
#ifdef LAMB16_AVX2
#undef HAND_VECTORIZED_AVX2
#define HAND_VECTORIZED_AVX2(call) \
  if (loops == AVX2_LOOPS) return avx2::call;
#endif
#define HAND_VECTORIZED(call) HAND_VECTORIZED_AVX512(call) HAND_VECTORIZED_AVX2(call)

void encode_e4m3_array(const float* x, uint8_t* out, int64_t n) {
  HAND_VECTORIZED(encode_e4m3_array(x, out, n))
  for (int64_t i = 0; i < n; ++i) out[i] = encode_e4m3(x[i]);
}
void encode_e5m2_array(const float* x, uint8_t* out, int64_t n) {
  HAND_VECTORIZED(encode_e5m2_array(x, out, n))
  for (int64_t i = 0; i < n; ++i) out[i] = encode_e5m2(x[i]);
}
void decode_e4m3_array(const uint8_t* x, float* out, int64_t n) {
  HAND_VECTORIZED(decode_e4m3_array(x, out, n))
  for (int64_t i = 0; i < n; ++i) out[i] = decode_e4m3(x[i]);
}
void decode_e5m2_array(const uint8_t* x, float* out, int64_t n) {
  HAND_VECTORIZED(decode_e5m2_array(x, out, n))
  for (int64_t i = 0; i < n; ++i) out[i] = decode_e5m2(x[i]);
}

}  // extern "C"

// The CPU fast path of Lamb16 and Lamb: each update in the two passes over
// memory that the arithmetic needs, as plain C++ loops that the compiler
// vectorizes (-O3 -march=native) and OpenMP splits across threads.
//
// Pass 1 reads the weights, the gradient and the old state and returns every
// reduction of the step; pass 2 reads them again, recomputes the same moments
// and update (cheaper than storing them) and writes the new state and weights.
// The arithmetic is that of lamb16/lamb16.py and lamb16/lamb.py, operation for
// operation; tests check both against it. No torch headers: the library loads
// this through ctypes with raw pointers, so it builds in a second or two.

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

// This step's float32 moments, as new_moments(): dequantize, then the moving averages.
inline float lamb16_m(uint8_t code, float g, const Lamb16Args& a) {
  return decode_e4m3(code) * a.m_scale * a.beta1 + g * a.one_minus_beta1;
}

inline float lamb16_v(uint8_t code, float g, const Lamb16Args& a) {
  return decode_e5m2(code) * a.v_scale * a.beta2 + g * g * a.one_minus_beta2;
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

void lamb16_block_apply(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
                        uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float m_scale, float v_scale,
                        float step_size) {
  const float eps = args.eps, wd = args.weight_decay;
  const float m_inverse = 1.0f / m_scale, v_inverse = 1.0f / v_scale;  // as write_absmax(), write_seed()
  if (args.seed) {
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < n; ++i) {
      const float m = lamb16_m(mq[i], g[i], args), v = lamb16_v(vq[i], g[i], args);
      const float u = m / (std::sqrt(v) + eps) + p[i] * wd;
      mq[i] = encode_e4m3(clamp(m * m_inverse, -15.0f, 15.0f));
      vq[i] = encode_e5m2(clamp(v, 0.0f, 10.0f) * v_inverse);
      p[i] = p[i] - u * step_size;
    }
  } else {
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < n; ++i) {
      const float m = lamb16_m(mq[i], g[i], args), v = lamb16_v(vq[i], g[i], args);
      const float u = m / (std::sqrt(v) + eps) + p[i] * wd;
      mq[i] = encode_e4m3(m * m_inverse);
      vq[i] = encode_e5m2(std::max(v * v_inverse, 0x1p-16f));
      p[i] = p[i] - u * step_size;
    }
  }
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

template <bool kBiasCorrection>
LambSums lamb_block_sums(const float* __restrict p, const float* __restrict g, const float* __restrict mq,
                         const float* __restrict vq, int64_t n, const LambArgs args) {
  float weight = 0, update = 0;
#pragma omp simd simdlen(16) reduction(+ : weight, update)
  for (int64_t i = 0; i < n; ++i) {
    const float m = mq[i] * args.beta1 + g[i] * args.one_minus_beta1;
    const float v = vq[i] * args.beta2 + g[i] * g[i] * args.one_minus_beta2;
    const float u = lamb_update<kBiasCorrection>(p[i], m, v, args);
    weight += p[i] * p[i];
    update += u * u;
  }
  return {weight, update};
}

template <bool kBiasCorrection>
void lamb_block_apply(float* __restrict p, const float* __restrict g, float* __restrict mq, float* __restrict vq,
                      int64_t n, const LambArgs args, float step_size) {
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < n; ++i) {
    const float m = mq[i] * args.beta1 + g[i] * args.one_minus_beta1;
    const float v = vq[i] * args.beta2 + g[i] * g[i] * args.one_minus_beta2;
    const float u = lamb_update<kBiasCorrection>(p[i], m, v, args);
    mq[i] = m;
    vq[i] = v;
    p[i] = p[i] - u * step_size;
  }
}

inline int64_t blocks_of(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

// One LAMB16 step on n elements, from the old scales in args; out: {new m
// scale, new v scale, weight_norm, adam_norm, trust_ratio}.
void lamb16_step(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq, int64_t n,
                 const Lamb16Args args, float lr, float trust_scale, int threads, float* out) {
  const int64_t blocks = blocks_of(n);
  float m_max = 0, v_max = 0, m_nans = 0, v_nans = 0;
  double m_sum = 0, v_sum = 0, weight = 0, update = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) \
    reduction(max : m_max, v_max) reduction(+ : m_sum, v_sum, weight, update, m_nans, v_nans)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    const Lamb16Sums s = lamb16_block_sums(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args);
    m_max = std::max(m_max, s.m_stat);
    v_max = std::max(v_max, s.v_stat);
    m_sum += s.m_stat;
    v_sum += s.v_stat;
    weight += s.weight;
    update += s.update;
    m_nans += s.m_nans;
    v_nans += s.v_nans;
  }
  const float count = float(n);
  float m_scale, v_scale;
  if (args.seed) {  // seed_scales()
    m_scale = std::sqrt(float(m_sum)) / count + args.eps;
    v_scale = std::sqrt(float(v_sum)) / count + args.eps;
  } else {  // absmax_scales()
    const float tiny = std::numeric_limits<float>::min(), nan = std::numeric_limits<float>::quiet_NaN();
    m_scale = m_nans > 0 ? nan : std::max(m_max / 448.0f, tiny);
    v_scale = v_nans > 0 ? nan : std::max(v_max / 57344.0f, tiny);
  }
  const float weight_norm = std::sqrt(float(weight)) / count;
  const float adam_norm = std::sqrt(float(update)) / count;
  // lamb16_trust_ratio(): (w / u / lr * 1e-3) ** trust_scale, clamped to [0, 2].
  const float trust = clamp(std::pow(weight_norm / adam_norm / lr * 1e-3f, trust_scale), 0.0f, 2.0f);
  const float step_size = trust * lr;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    lamb16_block_apply(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, m_scale, v_scale,
                       step_size);
  }
  out[0] = m_scale;
  out[1] = v_scale;
  out[2] = weight_norm;
  out[3] = adam_norm;
  out[4] = trust;
}

// One LAMB step on n elements; out: {weight_norm, adam_norm, trust_ratio}.
void lamb_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n, const LambArgs args,
               bool bias_correction, float lr, bool adam, float max_weight_norm, int threads, float* out) {
  const auto sums = bias_correction ? lamb_block_sums<true> : lamb_block_sums<false>;
  const auto apply = bias_correction ? lamb_block_apply<true> : lamb_block_apply<false>;
  const int64_t blocks = blocks_of(n);
  double weight = 0, update = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(+ : weight, update)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    const LambSums s = sums(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args);
    weight += s.weight;
    update += s.update;
  }
  const float weight_norm = std::min(std::sqrt(float(weight)), max_weight_norm);
  const float adam_norm = std::sqrt(float(update));
  // trust_ratio(): w / u, or 1 where either norm is zero (nothing to scale against).
  const float trust = adam || !(weight_norm > 0 && adam_norm > 0) ? 1.0f : weight_norm / adam_norm;
  const float step_size = trust * lr;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, len = std::min(n - lo, BLOCK);
    apply(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, step_size);
  }
  out[0] = weight_norm;
  out[1] = adam_norm;
  out[2] = trust;
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

void lamb16_steps(const int64_t* table, int64_t count, float lr, float beta1, float beta2, float one_minus_beta1,
                  float one_minus_beta2, float eps, float weight_decay, float trust_scale, int seed, int threads) {
  each_tensor(table, LAMB16_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * LAMB16_COLUMNS;
    float* m_scale = address<float>(r[5]);
    float* v_scale = address<float>(r[6]);
    const Lamb16Args args{*m_scale, *v_scale, beta1, beta2, one_minus_beta1, one_minus_beta2,
                          eps, weight_decay, seed != 0};
    float out[5];
    lamb16_step(address<float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]), address<uint8_t>(r[3]),
                r[4], args, lr, trust_scale, tensor_threads, out);
    *m_scale = out[0];
    *v_scale = out[1];
    *address<float>(r[7]) = out[2];
    *address<float>(r[8]) = out[3];
    *address<float>(r[9]) = out[4];
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

// The fp8 conversions alone, for the tests to compare with torch's.
void encode_e4m3_array(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = encode_e4m3(x[i]);
}
void encode_e5m2_array(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = encode_e5m2(x[i]);
}
void decode_e4m3_array(const uint8_t* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = decode_e4m3(x[i]);
}
void decode_e5m2_array(const uint8_t* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = decode_e5m2(x[i]);
}

}  // extern "C"

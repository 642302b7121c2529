// The portable loops: plain C++ over a chunk of elements that the compiler
// vectorizes (-O3 -march=native, `omp simd`). Every processor runs them; the
// hand-vectorized loops (avx2.h, avx512.h) give the same results faster, and
// a tensor whose scales they cannot take exactly comes back here.
#pragma once

#include "arithmetic.h"

namespace {
namespace portable {

Lamb16Sums lamb16_chunk_sums(const float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
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

void lamb16_chunk_apply(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
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

// The single-pass step (lamb16_single_pass_update() in updates.py) reads the
// weights, gradient and codes once: its scales come from bounds that need only
// the gradient's absmax (a read of the gradient alone before the pass), its
// trust ratio from the last step's update norm. While it writes, it sums what
// the next step will need: this step's update norm, the moments' statistics,
// and the norm of the weights it wrote.

// The largest |g| of usable gradient elements.
float gradient_chunk_absmax(const float* __restrict g, int64_t n) {
  float largest = 0;
#pragma omp simd simdlen(16) reduction(max : largest)
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::fabs(usable(g[i])));
  return largest;
}

// sum(clamp(p*p, eps, 1)): the single pass runs it over each chunk it has just
// written, and a recomputed weight norm over the same chunks, so that both
// give the same bits.
float weight_chunk_sum(const float* __restrict p, int64_t n, float eps) {
  float weight = 0;
#pragma omp simd simdlen(16) reduction(+ : weight)
  for (int64_t i = 0; i < n; ++i) weight += clamp(p[i] * p[i], eps, 1.0f);
  return weight;
}


SinglePassSums lamb16_chunk_single_pass(float* __restrict p, const float* __restrict g, uint8_t* __restrict mq,
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

// The largest code magnitude in a chunk just written: fp8 rounding is
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


template <bool kBiasCorrection>
LambSums lamb_chunk_moments(const float* __restrict p, const float* __restrict g, float* __restrict mq,
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
void lamb_chunk_apply(float* __restrict p, const float* __restrict mq, const float* __restrict vq, int64_t n,
                      const LambArgs args, float step_size) {
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < n; ++i) {
    p[i] = p[i] - lamb_update<kBiasCorrection>(p[i], mq[i], vq[i], args) * step_size;
  }
}


// ------------------------------------------------------------ block scales --
//
// The exact step's two passes over a run of blocks [first, last) of a
// layout, each block with its own scales (the hand-vectorized loops keep
// their sums in registers across the run): the norms' sums, and each block's
// new scales from its maxima; then each block's writes over its new scales,
// which replace its old.
NormSums lamb16_blocks_sums(const float* p, const float* g, const uint8_t* mq, const uint8_t* vq,
                            const BlockLayout& layout, int64_t first, int64_t last, const float* m_scales,
                            const float* v_scales, Lamb16Args args, float* new_m, float* new_v) {
  float weight = 0, update = 0;
  for (int64_t b = first; b < last; ++b) {
    const int64_t lo = layout.start(b);
    args.m_scale = m_scales[b], args.v_scale = v_scales[b];
    const Lamb16Sums s = lamb16_chunk_sums(p + lo, g + lo, mq + lo, vq + lo, layout.length(b), args);
    weight += s.weight;
    update += s.update;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    new_m[b] = s.m_nans > 0 ? nan : absmax_scale(s.m_stat, 448.0f);
    new_v[b] = s.v_nans > 0 ? nan : absmax_scale(s.v_stat, 57344.0f);
  }
  return {weight, update};
}

void lamb16_blocks_apply(float* p, const float* g, uint8_t* mq, uint8_t* vq, const BlockLayout& layout,
                         int64_t first, int64_t last, float* m_scales, float* v_scales, const float* new_m,
                         const float* new_v, Lamb16Args args, float step_size) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t lo = layout.start(b);
    args.m_scale = m_scales[b], args.v_scale = v_scales[b];
    lamb16_chunk_apply(p + lo, g + lo, mq + lo, vq + lo, layout.length(b), args, new_m[b], new_v[b], step_size);
    m_scales[b] = new_m[b], v_scales[b] = new_v[b];
  }
}

// A block (scaling="block") is at most block_size elements with scales of
// their own. The exact step runs the loops above on each block (with its own
// scales); the single pass computes a block's moments once, keeps them in a
// buffer while it moves the weights and finds the block's maxima, then
// encodes them over the block's new scales.

template <bool kSumUpdate>
BlockMoments lamb16_block_moments(float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                                  const uint8_t* __restrict vq, int64_t n, const Lamb16Args args, float step_size,
                                  float* __restrict m_out, float* __restrict v_out) {
  uint32_t m_top = 0, v_top = 0;  // magnitudes as bits: a NaN's above any number's
  float update = 0;
  const float eps = args.eps;
#pragma omp simd simdlen(16) reduction(max : m_top, v_top) reduction(+ : update)
  for (int64_t i = 0; i < n; ++i) {
    const float m = lamb16_m(mq[i], g[i], args), v = lamb16_v(vq[i], g[i], args);
    const float u = m / (std::sqrt(v) + eps) + p[i] * args.weight_decay;
    p[i] = p[i] - u * step_size;
    m_out[i] = m;
    v_out[i] = v;
    m_top = std::max(m_top, bits_of(m) & 0x7FFFFFFFu);
    v_top = std::max(v_top, bits_of(v) & 0x7FFFFFFFu);
    if (kSumUpdate) update += clamp(u * u, eps, 1.0f);
  }
  return {float_of(m_top), float_of(v_top), update, 0.0f};
}

// The exact step's first pass over a block, where its update has room to be
// kept: the moments as lamb16_block_moments, the update into u_out (the
// weights move later, by move_weights), and the sums of the update and of
// the weights as they were.
BlockMoments lamb16_block_updates(const float* __restrict p, const float* __restrict g, const uint8_t* __restrict mq,
                                  const uint8_t* __restrict vq, int64_t n, const Lamb16Args args,
                                  float* __restrict m_out, float* __restrict v_out, float* __restrict u_out) {
  uint32_t m_top = 0, v_top = 0;
  float update = 0, weight = 0;
  const float eps = args.eps;
#pragma omp simd simdlen(16) reduction(max : m_top, v_top) reduction(+ : update, weight)
  for (int64_t i = 0; i < n; ++i) {
    const float m = lamb16_m(mq[i], g[i], args), v = lamb16_v(vq[i], g[i], args);
    const float u = m / (std::sqrt(v) + eps) + p[i] * args.weight_decay;
    m_out[i] = m;
    v_out[i] = v;
    u_out[i] = u;
    m_top = std::max(m_top, bits_of(m) & 0x7FFFFFFFu);
    v_top = std::max(v_top, bits_of(v) & 0x7FFFFFFFu);
    update += clamp(u * u, eps, 1.0f);
    weight += clamp(p[i] * p[i], eps, 1.0f);
  }
  return {float_of(m_top), float_of(v_top), update, weight};
}

// The weights moved by step_size times the updates kept, as the writes move them.
void move_weights(float* __restrict p, const float* __restrict u, int64_t n, float step_size) {
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] - u[i] * step_size;
}

// A block's codes from its moments, over its new scales (their inverses), as block_codes().
void encode_block(const float* __restrict m, const float* __restrict v, int64_t n, float m_inverse, float v_inverse,
                  uint8_t* __restrict mq, uint8_t* __restrict vq) {
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < n; ++i) {
    mq[i] = encode_e4m3(m[i] * m_inverse);
    vq[i] = encode_e5m2(std::max(v[i] * v_inverse, 0x1p-16f));
  }
}

}  // namespace portable
}  // namespace

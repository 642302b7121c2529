// The CPU fast path of Lamb16 and Lamb: each update in the passes over memory
// that the arithmetic needs, split across threads by OpenMP. The loops come
// in up to three sets, each in a file of its own beside the arithmetic they
// share (arithmetic.h): portable C++ that the compiler vectorizes (portable.h),
// and the same by hand with AVX2 (avx2.h) and AVX-512 intrinsics (avx512.h),
// the widest built in used. This file holds what is common to them: which
// loops run, the threads, and the C entry points that lamb16/native.py calls.
//
// An exact step makes two passes: its trust ratio (and a scale per tensor) is
// a reduction over the whole tensor, known only once pass 1 has read it all.
// With block scales (the default) pass 1 computes each block's moments and
// update once, writes the block's new scales and codes, and keeps the update
// (4 bytes an element); pass 2 moves the weights by it (see BlockGroup). With a
// scale per tensor, pass 1 returns the reductions, and pass 2 reads weights,
// gradient and codes again, computes the same moments and update again and
// writes everything. (LAMB's float32 moments: pass 1 stores them, see below.)
// The single pass reads and writes everything once (with a scale per tensor,
// after the gradient alone for its absmax; see "LAMB16, single pass"). The
// arithmetic is that of lamb16/updates.py and lamb16/lamb.py, operation for
// operation; tests check every set of loops against it. Beside them, the same
// passes' memory traffic alone, for `bench`. No torch headers: the library
// loads this through ctypes with raw pointers, so it builds in a few seconds.
//
// Where the time goes (2 cores of an AMD EPYC, Zen 5): in cache, on one
// thread, the block single pass takes 0.96 ns an element on the AVX2 loops
// and 0.61 on the AVX-512 loops, a quarter of it the encoders, 5% sqrt and
// division (taken out to measure). The AVX2 loops are bound by the
// instructions they issue at any size, the AVX-512 ones by memory at 100 M
// elements and by both at 10 M; computing the moments twice was a sixth of the
// exact step on both (10 M: 4.44 -> 3.68 ms on AVX-512, 6.38 -> 5.33 on AVX2,
// once the update was kept). A scale above 2**100 (a diverging run) takes the
// portable loops, where the 2**8 fold of the e4m3 trick is no longer exact.

#include "arithmetic.h"
#include "avx2.h"
#include "avx512.h"
#include "portable.h"

#include <array>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

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

// LOOP(which, name): the loop `name` of the set `which` (Loops) where that set
// is built in, else the portable one, as a pointer to it (for loops that take
// the same arguments in every set).
template <typename Loop>
Loop loop_of(int which, Loop avx512_loop, Loop avx2_loop, Loop portable_loop) {
  if (which == AVX512_LOOPS && avx512_loop != nullptr) return avx512_loop;
  if (which == AVX2_LOOPS && avx2_loop != nullptr) return avx2_loop;
  return portable_loop;
}
#ifdef LAMB16_AVX512
#define AVX512_LOOP(name) &avx512::name
#else
#define AVX512_LOOP(name) nullptr
#endif
#ifdef LAMB16_AVX2
#define AVX2_LOOP(name) &avx2::name
#else
#define AVX2_LOOP(name) nullptr
#endif
#define LOOP(which, name) \
  loop_of<decltype(&portable::name)>((which), AVX512_LOOP(name), AVX2_LOOP(name), &portable::name)

// The loops to run for a chunk, by the m scales it reads and writes. The
// hand-vectorized loops fold E4M3_IN_HALF into m's scale, so the scale times
// 2**8 and its reciprocal times 2**-8 must be normal floats: absmax scales of
// finite moments are at most 2**128 / 448; a larger one (a diverged or edited
// state) takes the portable loops.
inline int loops_for(float old_m_scale, float new_m_scale) {
  return foldable(old_m_scale) && foldable(new_m_scale) ? loops : PORTABLE_LOOPS;
}

inline int64_t chunks_of(int64_t n) { return (n + CHUNK - 1) / CHUNK; }

// The most elements of a block-scale exact step's phase (see BlockGroup) whose
// updates the first pass keeps for the writes (4 bytes an element, 16 MB).
constexpr int64_t KEPT = int64_t(1) << 22;

// Chunks' sums added up in chunk order, in double: the same bits however many
// threads summed the chunks, and whichever took which.
inline NormSums in_order(const NormSums* parts, int64_t n) {
  double weight = 0, update = 0;
  for (int64_t c = 0; c < n; ++c) weight += parts[c].weight, update += parts[c].update;
  return {float(weight), float(update)};
}

// A LAMB16 step's reductions over n elements (pass 1), from the old scales in
// args: {m_stat, v_stat, weight, update} as lamb16_partials() in updates.py:
// largest |m| and v (NaN if any is) or the seed's sums, and the clamped square
// sums of the weights and the update.
struct Lamb16Partials {
  float m_stat, v_stat, weight, update;
};

Lamb16Partials lamb16_sums(const float* param, const float* grad, const uint8_t* exp_avg, const uint8_t* exp_avg_sq,
                           int64_t n, const Lamb16Args args, int threads) {
  auto chunk_sums = portable::lamb16_chunk_sums;
  const int chosen = loops_for(args.m_scale, args.m_scale);
#ifdef LAMB16_AVX512
  if (chosen == AVX512_LOOPS) chunk_sums = args.seed ? avx512::lamb16_chunk_sums<true> : avx512::lamb16_chunk_sums<false>;
#endif
#ifdef LAMB16_AVX2
  if (chosen == AVX2_LOOPS) chunk_sums = args.seed ? avx2::lamb16_chunk_sums<true> : avx2::lamb16_chunk_sums<false>;
#endif
  const int64_t chunks = chunks_of(n);
  float m_max = 0, v_max = 0, m_nans = 0, v_nans = 0;
  double m_sum = 0, v_sum = 0, weight = 0, update = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) \
    reduction(max : m_max, v_max) reduction(+ : m_sum, v_sum, weight, update, m_nans, v_nans)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
    const Lamb16Sums s = chunk_sums(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args);
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
  auto chunk_apply = portable::lamb16_chunk_apply;
  const int chosen = loops_for(args.m_scale, m_scale);
#ifdef LAMB16_AVX512
  if (chosen == AVX512_LOOPS) chunk_apply = args.seed ? avx512::lamb16_chunk_apply<true> : avx512::lamb16_chunk_apply<false>;
#endif
#ifdef LAMB16_AVX2
  if (chosen == AVX2_LOOPS) chunk_apply = args.seed ? avx2::lamb16_chunk_apply<true> : avx2::lamb16_chunk_apply<false>;
#endif
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t c = 0; c < chunks_of(n); ++c) {
    const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
    chunk_apply(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, m_scale, v_scale, step_size);
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
  const auto chunk_absmax = LOOP(loops, gradient_chunk_absmax);
  float top = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(max : top)
  for (int64_t c = 0; c < chunks_of(n); ++c) {
    const int64_t lo = c * CHUNK;
    top = std::max(top, chunk_absmax(grad + lo, std::min(n - lo, CHUNK)));
  }
  return top;
}

using WeightSum = float (*)(const float*, int64_t, float);

WeightSum weight_sum_loop() { return LOOP(loops, weight_chunk_sum); }

// weight_norm_of(): sqrt(sum(clamp(p*p, eps, 1))) / n, chunk by chunk as the single pass sums it.
float weight_norm(const float* param, int64_t n, float eps, int threads) {
  const WeightSum chunk_sum = weight_sum_loop();
  double weight = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(+ : weight)
  for (int64_t c = 0; c < chunks_of(n); ++c) {
    const int64_t lo = c * CHUNK;
    weight += chunk_sum(param + lo, std::min(n - lo, CHUNK), eps);
  }
  return std::sqrt(float(weight)) / float(n);
}

// One single-pass LAMB16 step on n elements, from the old scales in args, the
// carry (CARRY in updates.py) and the last step's update norm; out: {new m
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

  auto chunk_pass = portable::lamb16_chunk_single_pass;
#ifdef LAMB16_AVX512
  if (loops_for(args.m_scale, m_scale) == AVX512_LOOPS) {
    chunk_pass = args.seed ? avx512::lamb16_chunk_single_pass<true> : avx512::lamb16_chunk_single_pass<false>;
  }
#endif
#ifdef LAMB16_AVX2
  if (loops_for(args.m_scale, m_scale) == AVX2_LOOPS) {
    chunk_pass = args.seed ? avx2::lamb16_chunk_single_pass<true> : avx2::lamb16_chunk_single_pass<false>;
  }
#endif
  const WeightSum chunk_weight_sum = weight_sum_loop();
  int m_code = 0, v_code = 0;
  double m_sum = 0, v_sum = 0, update = 0, weight = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) \
    reduction(max : m_code, v_code) reduction(+ : m_sum, v_sum, update, weight)
  for (int64_t c = 0; c < chunks_of(n); ++c) {
    const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
    const SinglePassSums s = chunk_pass(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, m_scale,
                                        v_scale, step_size);
    // What the chunk just wrote, still in cache: the new weights' norm, the largest codes.
    weight += chunk_weight_sum(param + lo, len, args.eps);
    if (!args.seed) {
      m_code = std::max(m_code, portable::largest_code(exp_avg + lo, len));
      v_code = std::max(v_code, portable::largest_code(exp_avg_sq + lo, len));
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

// ------------------------------------------------- LAMB16, block scales ----
//
// scaling="block" (lamb16_block_update() in updates.py): n elements are rows of
// row_length, each cut into blocks of block_size (the last one shorter), each
// block with scales of its own in a grid laid out as the blocks are. A chunk
// is a run of whole blocks. A block's new scales come from its own moments:
// the writes compute them once, into a buffer, while the block is in cache,
// moving its weights and finding its maxima, then encode them: the single
// pass needs nothing but the last step's update norm. The exact step's first
// pass finds every block's maxima with the norms, and its second writes each
// block over its new scales, both by the loops of a scale per tensor, run on
// one block at a time. Each block takes the hand-vectorized loops where its
// old scale (decoding) and new scale (encoding) allow.


// The exact step's first pass (lamb16_block_partials()): the clamped square
// sums of the weights and the update, each block's moments from its old
// scales; and, where new_scales is given (2 x the blocks), each block's new m
// and v scales from its maxima.
NormSums lamb16_block_first_pass(const float* param, const float* grad, const uint8_t* exp_avg,
                                 const uint8_t* exp_avg_sq, const BlockLayout& layout, const float* m_scales,
                                 const float* v_scales, const Lamb16Args args, float* new_scales, int threads) {
  const auto blocks_sums = LOOP(loops, lamb16_blocks_sums);
  std::vector<float> unused(new_scales == nullptr ? 2 * layout.count() : 0);
  float* new_m = new_scales == nullptr ? unused.data() : new_scales;
  float* new_v = new_m + layout.count();
  std::vector<NormSums> parts(layout.chunks());
#pragma omp parallel for schedule(static) if (layout.n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t c = 0; c < layout.chunks(); ++c) {
    parts[c] = blocks_sums(param, grad, exp_avg, exp_avg_sq, layout, layout.first(c), layout.last(c), m_scales,
                           v_scales, args, new_m, new_v);
  }
  return in_order(parts.data(), layout.chunks());
}

// The writes of a chunk's blocks, each with its maxima found in cache: its
// moments from its old scales into a buffer, its weights moved by step_size
// times the update, its new scales (in place of the old) from its own maxima,
// its codes (the single pass; a sharded tensor's pieces). kSinglePass: also
// the sums the carry takes, the update's and (over the chunk just written, as
// lamb16_block_weight_norm() sums it) the new weights'.
template <bool kSinglePass>
NormSums lamb16_chunk_writes(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq,
                             const BlockLayout& layout, int64_t c, float* m_scales, float* v_scales, Lamb16Args args,
                             float step_size, float* buffer) {
  float* m_buffer = buffer;
  float* v_buffer = buffer + layout.buffer();
  float update = 0;
  for (int64_t b = layout.first(c); b < layout.last(c); ++b) {
    const int64_t lo = layout.start(b), len = layout.length(b);
    args.m_scale = m_scales[b], args.v_scale = v_scales[b];
    const BlockMoments x = LOOP(loops_for(args.m_scale, args.m_scale), lamb16_block_moments<kSinglePass>)(
        param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, step_size, m_buffer, v_buffer);
    const float m_scale = absmax_scale(x.m_max, 448.0f), v_scale = absmax_scale(x.v_max, 57344.0f);
    m_scales[b] = m_scale, v_scales[b] = v_scale;
    LOOP(loops_for(m_scale, m_scale), encode_block)(m_buffer, v_buffer, len, 1.0f / m_scale, 1.0f / v_scale,
                                                    exp_avg + lo, exp_avg_sq + lo);
    update += x.update;
  }
  if (!kSinglePass) return {0.0f, 0.0f};
  const int64_t lo = layout.start(layout.first(c));
  return {weight_sum_loop()(param + lo, layout.end(c) - lo, args.eps), update};
}

// The exact step's first pass over a chunk whose update has room to be kept
// (in u, from the chunk's first element on; whole vectors, so with room for
// one past the chunk's end): each block's moments from its old scales, its
// new scales from their maxima, its codes over them, its update into u; the
// chunk's square sums of the weights and the update.
NormSums lamb16_chunk_updates(const float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq,
                              const BlockLayout& layout, int64_t c, float* m_scales, float* v_scales, Lamb16Args args,
                              float* buffer, float* u) {
  float* m_buffer = buffer;
  float* v_buffer = buffer + layout.buffer();
  const int64_t chunk_start = layout.start(layout.first(c));
  float weight = 0, update = 0;
  for (int64_t b = layout.first(c); b < layout.last(c); ++b) {
    const int64_t lo = layout.start(b), len = layout.length(b);
    args.m_scale = m_scales[b], args.v_scale = v_scales[b];
    const BlockMoments x = LOOP(loops_for(args.m_scale, args.m_scale), lamb16_block_updates)(
        param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args, m_buffer, v_buffer, u + (lo - chunk_start));
    const float m_scale = absmax_scale(x.m_max, 448.0f), v_scale = absmax_scale(x.v_max, 57344.0f);
    m_scales[b] = m_scale, v_scales[b] = v_scale;
    LOOP(loops_for(m_scale, m_scale), encode_block)(m_buffer, v_buffer, len, 1.0f / m_scale, 1.0f / v_scale,
                                                    exp_avg + lo, exp_avg_sq + lo);
    weight += x.weight, update += x.update;
  }
  return {weight, update};
}

// The writes of a sharded tensor's piece, by the step size its shards agreed on.
void lamb16_block_writes(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq,
                         const BlockLayout& layout, float* m_scales, float* v_scales, const Lamb16Args args,
                         float step_size, int threads) {
#pragma omp parallel if (layout.n >= PARALLEL_MIN) num_threads(threads)
  {
    std::vector<float> buffer(2 * layout.buffer());
#pragma omp for schedule(static)
    for (int64_t c = 0; c < layout.chunks(); ++c) {
      lamb16_chunk_writes<false>(param, grad, exp_avg, exp_avg_sq, layout, c, m_scales, v_scales, args, step_size,
                                 buffer.data());
    }
  }
}

// weight_norm_of() chunk by chunk as the block single pass sums it.
float lamb16_block_weight_norm(const float* param, const BlockLayout& layout, float eps, int threads) {
  const WeightSum chunk_weight_sum = weight_sum_loop();
  std::vector<NormSums> parts(layout.chunks());
#pragma omp parallel for schedule(static) if (layout.n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t c = 0; c < layout.chunks(); ++c) {
    const int64_t lo = layout.start(layout.first(c));
    parts[c] = {chunk_weight_sum(param + lo, layout.end(c) - lo, eps), 0.0f};
  }
  return std::sqrt(in_order(parts.data(), layout.chunks()).weight) / float(layout.n);
}

inline float lamb16_trust(float weight_norm, float adam_norm, float trust_lr, float trust_scale) {
  return clamp(std::pow(weight_norm / adam_norm / trust_lr * 1e-3f, trust_scale), 0.0f, 2.0f);
}

// A LAMB step's first pass over n elements: the moments, in place, and the
// square sums of the weights and the update (lamb_partials()).
LambSums lamb_sums(const float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                   const LambArgs args, bool bias_correction, int threads) {
  auto moments = bias_correction ? portable::lamb_chunk_moments<true> : portable::lamb_chunk_moments<false>;
#ifdef LAMB16_AVX512
  if (loops == AVX512_LOOPS) moments = bias_correction ? avx512::lamb_chunk_moments<true> : avx512::lamb_chunk_moments<false>;
#endif
  double weight = 0, update = 0;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(+ : weight, update)
  for (int64_t c = 0; c < chunks_of(n); ++c) {
    const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
    const LambSums s = moments(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, len, args);
    weight += s.weight;
    update += s.update;
  }
  return {float(weight), float(update)};
}

// A LAMB step's second pass: the weights move by step_size times the update.
void lamb_apply(float* param, const float* exp_avg, const float* exp_avg_sq, int64_t n, const LambArgs args,
                bool bias_correction, float step_size, int threads) {
  auto apply = bias_correction ? portable::lamb_chunk_apply<true> : portable::lamb_chunk_apply<false>;
#ifdef LAMB16_AVX512
  if (loops == AVX512_LOOPS) apply = bias_correction ? avx512::lamb_chunk_apply<true> : avx512::lamb_chunk_apply<false>;
#endif
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
  for (int64_t c = 0; c < chunks_of(n); ++c) {
    const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
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

// LAMB16's exact step with block scales, its update kept: pass 1 reads the
// weights, gradient and codes, writes the codes and the update; pass 2 reads
// the weights and the update and writes the weights.
void lamb16_kept_traffic_first(const Word* p, const Word* g, uint8_t* mq, uint8_t* vq, Word* u, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t m = mq[i], v = vq[i];
    u[i] = p[i] ^ g[i];
    mq[i] = m ^ v;
    vq[i] = v ^ 1;
  }
}

void lamb16_kept_traffic_second(Word* p, const Word* u, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] ^= u[i];
}

// LAMB16's single pass: the gradient alone first (its absmax), then the second pass above.
Word gradient_traffic(const Word* g, int64_t n) {
  Word seen = 0;
#pragma omp simd reduction(^ : seen)
  for (int64_t i = 0; i < n; ++i) seen ^= g[i];
  return seen;
}

enum Pattern {
  ADAM_PATTERN = 0,
  LAMB_PATTERN = 1,
  LAMB16_PATTERN = 2,
  LAMB16_SINGLE_PASS_PATTERN = 3,
  LAMB16_BLOCK_SINGLE_PASS_PATTERN = 4,  // the second pass alone
  LAMB16_BLOCK_PATTERN = 5                // the update kept, up to KEPT elements (else as LAMB16_PATTERN)
};

// One tensor's traffic, its chunks split across the threads as a step's are.
Word tensor_traffic(int pattern, Word* p, const Word* g, void* m, void* v, int64_t n, int threads) {
  Word* m32 = static_cast<Word*>(m);
  Word* v32 = static_cast<Word*>(v);
  uint8_t* m8 = static_cast<uint8_t*>(m);
  uint8_t* v8 = static_cast<uint8_t*>(v);
  const int64_t chunks = chunks_of(n);
  Word seen = 0;
  if (pattern == LAMB16_BLOCK_PATTERN && n <= KEPT) {
    static thread_local std::vector<Word> kept;  // between calls, as the step's
    if (int64_t(kept.size()) < n) kept.resize(n);
    Word* const u = kept.data();  // the calling thread's, which the others share here
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
      lamb16_kept_traffic_first(p + lo, g + lo, m8 + lo, v8 + lo, u + lo, len);
    }
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
      lamb16_kept_traffic_second(p + lo, u + lo, len);
    }
    return seen;
  }
  const int64_t first_chunks = pattern == LAMB16_BLOCK_SINGLE_PASS_PATTERN ? 0 : chunks;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN) num_threads(threads) reduction(^ : seen)
  for (int64_t c = 0; c < first_chunks; ++c) {
    const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
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
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * CHUNK, len = std::min(n - lo, CHUNK);
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

// A block-scale row's layout (numel in column 4, the row length in 11).
inline BlockLayout layout_of(const int64_t* r, int block_size) { return BlockLayout(r[4], r[11], block_size); }

// The block-scale steps' rows: param, grad, exp_avg, exp_avg_sq, numel,
// exp_avg_scale and exp_avg_sq_scale (grids, read, then overwritten),
// weight_norm, adam_norm, trust_ratio, carry (single pass: four floats, read,
// then overwritten), row length.
constexpr int64_t BLOCK_COLUMNS = 12;

// A block step's tensors as one run of chunks, tensor t's from first[t] to
// first[t + 1], that the threads share out in one parallel region a step
// instead of one or two a tensor (the CNN's steps and the AVX2 loops' at 10 M
// measured 3-5% faster, the AVX-512 loops' the same); a tensor's sums, added
// in chunk order, come out the same whatever the number of threads.
//
// The exact step goes phase by phase, a phase being tensors that add up to
// PHASE elements or more (or one larger tensor), KEPT at most where it can:
// the first pass over a phase stores its new codes and keeps its update, and
// once every thread has its sums in, the writes move the weights by the
// update kept. The moments and the update are computed once, not once a
// pass, for 4 bytes an element written and read again, from the last-level
// cache where the phase fits there (which PHASE is chosen for). Each thread
// keeps the updates of its own share of a phase's chunks, and the same share
// is its writes, so that no thread waits for another but at the sums. A
// tensor over KEPT elements takes two passes that both compute the moments,
// and keeps nothing.
struct BlockGroup {
  static constexpr int64_t PHASE = int64_t(1) << 20;
  const int64_t* table;
  std::vector<BlockLayout> layouts;
  std::vector<int64_t> first{0}, blocks{0}, phases{0};  // count + 1 each but phases: the tensors phases start at
  int64_t elements = 0, buffer = 0;                    // all of them; the largest block buffer

  BlockGroup(const int64_t* table_, int64_t count, int block_size) : table(table_) {
    layouts.reserve(count);
    int64_t in_phase = 0;
    for (int64_t t = 0; t < count; ++t) {
      const BlockLayout& layout = layouts.emplace_back(layout_of(row(t), block_size));
      if (in_phase > 0 && in_phase + layout.n > KEPT) phases.push_back(t), in_phase = 0;
      first.push_back(first.back() + layout.chunks());
      blocks.push_back(blocks.back() + layout.count());
      elements += layout.n, in_phase += layout.n;
      buffer = std::max(buffer, layout.buffer());
      if (in_phase >= PHASE || t + 1 == count) phases.push_back(t + 1), in_phase = 0;
    }
  }
  const int64_t* row(int64_t t) const { return table + t * BLOCK_COLUMNS; }
  int64_t chunks() const { return first.back(); }
  int64_t tensor_of(int64_t c) const { return std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1; }
  int64_t chunk_start(int64_t c) const {  // in its tensor
    const int64_t t = tensor_of(c);
    return layouts[t].start(layouts[t].first(c - first[t]));
  }
  int64_t chunk_length(int64_t c) const {
    const int64_t t = tensor_of(c), local = c - first[t];
    return layouts[t].end(local) - layouts[t].start(layouts[t].first(local));
  }
  int64_t phase_elements(int64_t phase) const {
    int64_t n = 0;
    for (int64_t t = phases[phase]; t < phases[phase + 1]; ++t) n += layouts[t].n;
    return n;
  }
};

// This thread's share of chunks first to last (one past), the same each time it asks.
inline std::pair<int64_t, int64_t> my_share(int64_t first, int64_t last) {
#ifdef _OPENMP
  const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
#else
  const int64_t team = 1, me = 0;
#endif
  return {first + (last - first) * me / team, first + (last - first) * (me + 1) / team};
}

inline Lamb16Args block_args(float beta1, float beta2, float one_minus_beta1, float one_minus_beta2, float eps,
                             float weight_decay) {
  return {0.0f, 0.0f, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, false};
}

// The exact step of a block group (see BlockGroup), a phase at a time, each
// phase run by every thread of the region.
struct ExactBlockStep {
  const BlockGroup& group;
  const Lamb16Args args;
  const float lr, trust_lr, trust_scale;
  std::vector<NormSums> parts;   // each chunk's square sums
  std::vector<float> new_scales;  // in two passes, tensor t's from 2 * blocks[t]: its m's, then its v's
  const decltype(&portable::lamb16_blocks_sums) blocks_sums = LOOP(loops, lamb16_blocks_sums);
  const decltype(&portable::lamb16_blocks_apply) blocks_apply = LOOP(loops, lamb16_blocks_apply);
  const decltype(&portable::move_weights) move_weights = LOOP(loops, move_weights);

  ExactBlockStep(const BlockGroup& group_, Lamb16Args args_, float lr_, float trust_lr_, float trust_scale_)
      : group(group_), args(args_), lr(lr_), trust_lr(trust_lr_), trust_scale(trust_scale_), parts(group_.chunks()) {
    bool two_passes = false;
    for (int64_t phase = 0; phase + 1 < int64_t(group.phases.size()); ++phase) {
      two_passes |= group.phase_elements(phase) > KEPT;
    }
    if (two_passes) new_scales.resize(2 * group.blocks.back());
  }

  // What a thread keeps: its block buffer, its updates (between steps too:
  // no page faults), and the step size of the tensor it last moved.
  struct Thread {
    std::vector<float> buffer;
    std::vector<float>& kept;
    int64_t sized = -1;
    float step_size = 0;
    explicit Thread(const BlockGroup& group) : buffer(2 * group.buffer), kept(thread_kept()) {}
    static std::vector<float>& thread_kept() {
      static thread_local std::vector<float> kept;
      return kept;
    }
  };

  // Tensor t's {weight_norm, adam_norm, trust_ratio}, from its chunks' sums.
  std::array<float, 3> norms(int64_t t) const {
    const NormSums s = in_order(parts.data() + group.first[t], group.layouts[t].chunks());
    const float weight_norm = std::sqrt(s.weight) / float(group.layouts[t].n);
    const float adam_norm = std::sqrt(s.update) / float(group.layouts[t].n);
    return {weight_norm, adam_norm, lamb16_trust(weight_norm, adam_norm, trust_lr, trust_scale)};
  }
  float step_size(int64_t t, Thread& thread) const {
    if (t != thread.sized) thread.sized = t, thread.step_size = norms(t)[2] * lr;
    return thread.step_size;
  }

  // The first pass stores the codes and keeps the update of this thread's
  // share of the phase's chunks; once every thread's sums are in, the same
  // share moves its weights. No thread waits for another but at the sums.
  void keeping_updates(int64_t phase, Thread& thread) {
    const auto [mine, past] = my_share(group.first[group.phases[phase]], group.first[group.phases[phase + 1]]);
    int64_t length = 16;  // room for a whole vector past the end
    for (int64_t c = mine; c < past; ++c) length += group.chunk_length(c);
    if (int64_t(thread.kept.size()) < length) thread.kept.resize(length);
    for (int64_t c = mine, at = 0; c < past; at += group.chunk_length(c), ++c) {
      const int64_t t = group.tensor_of(c);
      const int64_t* r = group.row(t);
      parts[c] = lamb16_chunk_updates(address<const float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]),
                                      address<uint8_t>(r[3]), group.layouts[t], c - group.first[t],
                                      address<float>(r[5]), address<float>(r[6]), args, thread.buffer.data(),
                                      thread.kept.data() + at);
    }
#pragma omp barrier
    for (int64_t c = mine, at = 0; c < past; at += group.chunk_length(c), ++c) {
      const int64_t t = group.tensor_of(c);
      move_weights(address<float>(group.row(t)[0]) + group.chunk_start(c), thread.kept.data() + at,
                   group.chunk_length(c), step_size(t, thread));
    }
  }

  // The sums and each block's new scales, then the writes, which compute the
  // moments and the update again and run on into the next phase (no wait).
  void in_two_passes(int64_t phase, Thread& thread) {
    const int64_t first = group.first[group.phases[phase]], last = group.first[group.phases[phase + 1]];
#pragma omp for schedule(static)
    for (int64_t c = first; c < last; ++c) {
      const int64_t t = group.tensor_of(c);
      const BlockLayout& layout = group.layouts[t];
      const int64_t* r = group.row(t);
      float* new_m = new_scales.data() + 2 * group.blocks[t];
      parts[c] = blocks_sums(address<const float>(r[0]), address<const float>(r[1]), address<const uint8_t>(r[2]),
                             address<const uint8_t>(r[3]), layout, layout.first(c - group.first[t]),
                             layout.last(c - group.first[t]), address<const float>(r[5]), address<const float>(r[6]),
                             args, new_m, new_m + layout.count());
    }
#pragma omp for schedule(static) nowait
    for (int64_t c = first; c < last; ++c) {
      const int64_t t = group.tensor_of(c);
      const BlockLayout& layout = group.layouts[t];
      const int64_t* r = group.row(t);
      const float* new_m = new_scales.data() + 2 * group.blocks[t];
      blocks_apply(address<float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]), address<uint8_t>(r[3]),
                   layout, layout.first(c - group.first[t]), layout.last(c - group.first[t]), address<float>(r[5]),
                   address<float>(r[6]), new_m, new_m + layout.count(), args, step_size(t, thread));
    }
  }
};

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

// Over rows as lamb16_single_pass_steps' (columns 11) or the block steps'
// (12, block_size > 0; only param, numel, the carry and the row length are
// read): each tensor's weight norm into its carry, as a single pass would have
// carried it, for weights that something else has changed since.
void lamb16_weight_norms(const int64_t* table, int64_t columns, int64_t count, float eps, int block_size,
                         int threads) {
  each_tensor(table, columns, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * columns;
    address<float>(r[10])[0] = block_size > 0
                                   ? lamb16_block_weight_norm(address<const float>(r[0]), layout_of(r, block_size),
                                                              eps, tensor_threads)
                                   : weight_norm(address<const float>(r[0]), r[4], eps, tensor_threads);
  });
}



void lamb16_block_steps(const int64_t* table, int64_t count, float lr, float trust_lr, float beta1, float beta2,
                        float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay, float trust_scale,
                        int block_size, int threads) {
  const BlockGroup group(table, count, block_size);
  ExactBlockStep step(group, block_args(beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay), lr,
                      trust_lr, trust_scale);
#pragma omp parallel if (group.elements >= PARALLEL_MIN) num_threads(threads)
  {
    ExactBlockStep::Thread mine(group);
    for (int64_t phase = 0; phase + 1 < int64_t(group.phases.size()); ++phase) {
      if (group.phase_elements(phase) <= KEPT) {
        step.keeping_updates(phase, mine);
      } else {
        step.in_two_passes(phase, mine);
      }
    }
  }
  for (int64_t t = 0; t < count; ++t) {
    const std::array<float, 3> norms = step.norms(t);
    for (int k = 0; k < 3; ++k) *address<float>(group.row(t)[7 + k]) = norms[k];
  }
}

void lamb16_block_single_pass_steps(const int64_t* table, int64_t count, float lr, float trust_lr, float beta1,
                                    float beta2, float one_minus_beta1, float one_minus_beta2, float eps,
                                    float weight_decay, float trust_scale, int block_size, int threads) {
  const Lamb16Args args = block_args(beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay);
  const BlockGroup group(table, count, block_size);
  std::vector<float> trusts(count);
  for (int64_t t = 0; t < count; ++t) {  // from the carried weight norm and the last step's update norm
    const int64_t* r = group.row(t);
    trusts[t] = lamb16_trust(address<float>(r[10])[0], *address<float>(r[8]), trust_lr, trust_scale);
  }
  std::vector<NormSums> parts(group.chunks());
#pragma omp parallel if (group.elements >= PARALLEL_MIN) num_threads(threads)
  {
    std::vector<float> buffer(2 * group.buffer);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < group.chunks(); ++c) {
      const int64_t t = group.tensor_of(c);
      const int64_t* r = group.row(t);
      parts[c] = lamb16_chunk_writes<true>(address<float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]),
                                           address<uint8_t>(r[3]), group.layouts[t], c - group.first[t],
                                           address<float>(r[5]), address<float>(r[6]), args, trusts[t] * lr,
                                           buffer.data());
    }
  }
  for (int64_t t = 0; t < count; ++t) {
    const int64_t* r = group.row(t);
    const float n = float(group.layouts[t].n);
    const NormSums s = in_order(parts.data() + group.first[t], group.layouts[t].chunks());
    float* carry = address<float>(r[10]);
    *address<float>(r[7]) = carry[0];
    *address<float>(r[8]) = std::sqrt(s.update) / n;  // was the last step's
    *address<float>(r[9]) = trusts[t];
    carry[0] = std::sqrt(s.weight) / n;
    carry[1] = carry[2] = 0.0f;  // block scales carry no moment statistics
    carry[3] = 1.0f;
  }
}

// The block steps' two passes apart, for the pieces of sharded tensors:
// lamb16_block_partials() writes each row's {weight, update} square sums into
// out (count x 2) and changes nothing; lamb16_block_applies() runs the writes
// with each row of finished (count x 4): {weight_norm, adam_norm, trust_ratio,
// step_size}, then writes its first three into the row's 0-dim tensors.
void lamb16_block_partials(const int64_t* table, int64_t count, float beta1, float beta2, float one_minus_beta1,
                           float one_minus_beta2, float eps, float weight_decay, int block_size, int threads,
                           float* out) {
  const Lamb16Args args = block_args(beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay);
  each_tensor(table, BLOCK_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * BLOCK_COLUMNS;
    const NormSums s = lamb16_block_first_pass(address<const float>(r[0]), address<const float>(r[1]),
                                               address<const uint8_t>(r[2]), address<const uint8_t>(r[3]),
                                               layout_of(r, block_size), address<const float>(r[5]),
                                               address<const float>(r[6]), args, nullptr, tensor_threads);
    out[2 * t] = s.weight;
    out[2 * t + 1] = s.update;
  });
}

void lamb16_block_applies(const int64_t* table, int64_t count, float beta1, float beta2, float one_minus_beta1,
                          float one_minus_beta2, float eps, float weight_decay, int block_size, int threads,
                          const float* finished) {
  const Lamb16Args args = block_args(beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay);
  each_tensor(table, BLOCK_COLUMNS, count, threads, [&](int64_t t, int tensor_threads) {
    const int64_t* r = table + t * BLOCK_COLUMNS;
    const float* f = finished + 4 * t;
    lamb16_block_writes(address<float>(r[0]), address<const float>(r[1]), address<uint8_t>(r[2]),
                        address<uint8_t>(r[3]), layout_of(r, block_size), address<float>(r[5]), address<float>(r[6]),
                        args, f[3], tensor_threads);
    for (int k = 0; k < 3; ++k) *address<float>(r[7 + k]) = f[k];
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

// The traffic of a step of the given Pattern over a table whose rows start as
// the steps' do: param, grad, exp_avg, exp_avg_sq, numel. Returns the bits pass 1 read, xor-ed, so that no
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

// Nothing: what native.calls_only() puts in place of the steps, for `bench` to
// time the host's part of a step. Their arguments are the caller's to clean up
// (x86-64 and AArch64 calling conventions), so it takes none.
void nothing() {}

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


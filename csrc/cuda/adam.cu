// The Adam base's ops on CUDA (grad_sq_sums, adam_reduce, adam_update_): the twin of
// csrc/cpu/adam_passes.h.  Pass 1 forms m, v and u in registers and writes nothing;
// pass 2 forms them again from the same inputs and writes w, m, v and the step count
// (u is recomputed, not stored).  Sums are deterministic two-stage fp64 sums (chunk
// partials summed per layer in chunk order), the MCLR median of |u_i|/|w_i| the exact
// radix selection of reduce.cu.  The step count, found_inf, the grad scale and the clip
// divisor are read on the device: the host never reads a device value.  Torch-free.
#include "common.cuh"
#include "passes.cuh"
#include "radix_select.cuh"

static_assert(sizeof(cblr::cuda::LayerTable) + sizeof(cblr::cuda::Scratch) + sizeof(cblr::cuda::AdamMath) +
                      sizeof(cblr::cuda::AdamUpdateArgs) <= 4000,
              "the update's launch arguments must fit the 4 KiB kernel parameter space");

namespace cblr {
namespace cuda {
namespace {

enum { SUM_W2 = 0, SUM_G2, SUM_DIFF2, SUM_STEP2 };
enum { FLAG_MEASURED = 0, FLAG_NORMS, FLAG_MEDIAN, FLAG_NONFINITE };
enum { STAT_W_NORM = 0, STAT_G_NORM, STAT_STEP_NORM, STAT_KAPPA, STAT_RATIO, STAT_ALPHA, STAT_FALLBACK, STAT_COLUMNS };
enum { P_W2 = 0, P_U2, P_NONFINITE, P_NAN_QUOTIENTS };  // columns of the chunk partials (kAdamPartials)

// A layer's constants of one step: g's divisors and the bias corrections of t = step + 1.
struct LayerConstants {
  float unscale, clip;
  bool has_clip;
  BiasCorrections bc;
};

__device__ __forceinline__ LayerConstants layer_constants(const LayerTable& t, int slot, const AdamMath& c) {
  LayerConstants k;
  k.unscale = *c.unscale;
  k.has_clip = c.clip != nullptr;
  k.clip = k.has_clip ? *c.clip : 1.0f;
  k.bc = bias_corrections(*t.age[slot], c.beta1, c.beta2, c.bias_correction);
  return k;
}

// g ÷ grad scale (a product with fl32(1/S)), ÷ the clip divisor where clipping.
__device__ __forceinline__ float adam_grad(float g, const LayerConstants& k) {
  const float unscaled = g * k.unscale;
  return k.has_clip ? unscaled / k.clip : unscaled;
}

// The new moments (in m, v) and the direction u of one element.
__device__ __forceinline__ float adam_element(float g, float w, float& m, float& v, const AdamMath& c,
                                              const LayerConstants& k) {
  const AdamMoments<float> next = adam_moments(g, m, v, c.beta1, c.one_minus_beta1, c.beta2, c.one_minus_beta2);
  m = next.m;
  v = next.v;
  return adam_direction(next.m, next.v, w, k.bc.first, k.bc.second, c.eps, c.weight_decay);
}

// The elements [begin, end) of this block's chunk.
struct ChunkRange {
  int slot;
  int64_t begin, end;
};

__device__ __forceinline__ ChunkRange chunk_range(const LayerTable& t) {
  ChunkRange r;
  r.slot = find_slot(t, int(blockIdx.x));
  const int64_t n = t.n[r.slot];
  r.begin = int64_t(int(blockIdx.x) - t.chunk_start[r.slot]) * kChunk;
  r.end = r.begin + kChunk < n ? r.begin + kChunk : n;
  return r;
}

// ------------------------------------------------------------------ grad_sq_sums

template <typename P>
__global__ void __launch_bounds__(kThreads) grad_sq_kernel(const __grid_constant__ LayerTable table,
                                                           double* partials, const float* unscale) {
  __shared__ BlockSums<1> block_sums;
  const ChunkRange r = chunk_range(table);
  const P* g = static_cast<const P*>(table.ptr[ROLE_G][r.slot]);
  const bool aligned = table.bits[r.slot] & BIT_ALIGNED;
  const float inv = *unscale;
  double acc[1] = {0.0};
  for (int64_t base = r.begin + int64_t(threadIdx.x) * kVec; base < r.end; base += int64_t(kThreads) * kVec) {
    const bool vector = aligned && base + kVec <= r.end;
    const int count = vector ? kVec : int(r.end - base < kVec ? r.end - base : kVec);
    float gv[kVec];
    load_span(g, base, count, vector, gv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k < count) acc[0] += square_in_double(gv[k] * inv);
    }
  }
  block_sums.sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc[0];
}

__global__ void __launch_bounds__(kThreads) grad_sq_finish_kernel(const __grid_constant__ LayerTable table,
                                                                  const double* partials, double* sums) {
  const int slot = int(blockIdx.x);
  double acc[1];
  sum_layer_partials<1>(partials, table.chunk_start[slot], table.chunk_start[slot + 1], acc);
  if (threadIdx.x == 0) sums[table.row[slot]] = acc[0];
}

// ------------------------------------------------------------------ the measuring pass

// scratch.mode[slot] of an Adam pass: M_W2 | M_G2 where the layer's Σw², Σu² are taken,
// M_SELECT where its median is.  flags null (adam_reduce): every layer, the median under
// mclr; else (adam_update_'s own pass) only what the reduction lacks.
__global__ void plan_adam_kernel(const __grid_constant__ LayerTable table, uint8_t* mode, const bool* flags,
                                 bool mclr) {
  const int slot = int(threadIdx.x);
  if (slot >= table.count) return;
  const bool* f = flags ? flags + int64_t(table.row[slot]) * 4 : nullptr;
  const bool norms = !f || !f[FLAG_NORMS];
  const bool select = mclr && (!f || !f[FLAG_MEDIAN]);
  mode[slot] = uint8_t((norms ? (M_W2 | M_G2 | M_CHECK) : 0) | (select ? M_SELECT : 0));
}

// One pass over a chunk: pass 0 takes Σw², Σu², the non-finite count of g (and the first
// histogram); a later pass only histograms the quotients under the selected prefix.
template <typename P>
__global__ void __launch_bounds__(kThreads) adam_measure_kernel(const __grid_constant__ LayerTable table,
                                                                const Scratch scratch, const AdamMath math, int pass,
                                                                int shift, int nbits) {
  __shared__ uint32_t hist[kRadixBins];
  __shared__ BlockSums<kAdamPartials> block_sums;
  const ChunkRange r = chunk_range(table);
  const uint8_t mode = scratch.mode[r.slot];
  const bool select = mode & M_SELECT;
  if (pass > 0 && !select) return;
  double acc[kAdamPartials] = {0, 0, 0, 0};
  if ((mode & kReads) == 0) {  // pass 0 only (see above)
    if (threadIdx.x == 0) {
      for (int k = 0; k < kAdamPartials; ++k) scratch.partials[int64_t(blockIdx.x) * kAdamPartials + k] = 0.0;
    }
    return;
  }
  if (select) {
    for (int b = int(threadIdx.x); b < kRadixBins; b += kThreads) hist[b] = 0;
    __syncthreads();
  }
  const P* w = static_cast<const P*>(table.ptr[ROLE_W_IN][r.slot]);
  const P* g = static_cast<const P*>(table.ptr[ROLE_G][r.slot]);
  const float* m = static_cast<const float*>(table.ptr[ROLE_EXP_AVG][r.slot]);
  const float* v = static_cast<const float*>(table.ptr[ROLE_EXP_AVG_SQ][r.slot]);
  const bool aligned = table.bits[r.slot] & BIT_ALIGNED;
  const LayerConstants k = layer_constants(table, r.slot, math);
  const uint32_t prefix = pass > 0 ? scratch.select[r.slot * 3] : 0u;
  const int high = shift + nbits;  // < 32 for pass > 0
  const uint32_t mask = (1u << nbits) - 1u;
  for (int64_t base = r.begin + int64_t(threadIdx.x) * kVec; base < r.end; base += int64_t(kThreads) * kVec) {
    const bool vector = aligned && base + kVec <= r.end;
    const int count = vector ? kVec : int(r.end - base < kVec ? r.end - base : kVec);
    float wv[kVec], gv[kVec], mv[kVec], vv[kVec];
    load_span(w, base, count, vector, wv);
    load_span(g, base, count, vector, gv);
    load_span(m, base, count, vector, mv);
    load_span(v, base, count, vector, vv);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e >= count) continue;
      const float ge = adam_grad(gv[e], k);
      const float u = adam_element(ge, wv[e], mv[e], vv[e], math, k);
      if (pass == 0) {
        acc[P_W2] += square_in_double(wv[e]);
        acc[P_U2] += square_in_double(u);
        acc[P_NONFINITE] += is_finite(ge) ? 0.0 : 1.0;
      }
      if (select && wv[e] != 0.0f) {
        add_quotient(hist, curvature_quotient(u, wv[e]), pass, shift, prefix, high, mask, acc[P_NAN_QUOTIENTS]);
      }
    }
  }
  if (select) flush_histogram(hist, scratch, r.slot, mask);
  if (pass == 0) {
    block_sums.sum(acc);
    if (threadIdx.x == 0) {
      for (int c = 0; c < kAdamPartials; ++c) scratch.partials[int64_t(blockIdx.x) * kAdamPartials + c] = acc[c];
    }
  }
}

// Where a measuring pass's per-layer totals go: the op's outputs by row (adam_reduce), or
// (sums null) scratch.pre_sums / scratch.pre_median by slot (adam_update_'s own pass).
struct MeasureOut {
  double* sums;
  float* median;
  bool* flags;
};

__global__ void __launch_bounds__(kThreads) adam_measure_finish_kernel(const __grid_constant__ LayerTable table,
                                                                       const Scratch scratch, const MeasureOut out) {
  const int slot = int(blockIdx.x);
  double acc[kAdamPartials];
  sum_layer_partials<kAdamPartials>(scratch.partials, table.chunk_start[slot], table.chunk_start[slot + 1], acc);
  if (threadIdx.x != 0) return;
  const bool select = scratch.mode[slot] & M_SELECT;
  const float median = select ? selected_median(scratch, slot, acc[P_NAN_QUOTIENTS]) : 0.0f;  // 0: not taken
  if (!out.sums) {
    scratch.pre_sums[slot * 4 + SUM_W2] = acc[P_W2];
    scratch.pre_sums[slot * 4 + SUM_G2] = acc[P_U2];
    scratch.pre_median[slot] = median;
    return;
  }
  const int row = table.row[slot];
  double* sums = out.sums + int64_t(row) * 4;
  sums[SUM_W2] = acc[P_W2];
  sums[SUM_G2] = acc[P_U2];
  sums[SUM_DIFF2] = 0.0;
  sums[SUM_STEP2] = 0.0;
  out.median[row] = median;
  bool* flags = out.flags + int64_t(row) * 4;
  flags[FLAG_MEASURED] = true;
  flags[FLAG_NORMS] = true;
  flags[FLAG_MEDIAN] = select;
  flags[FLAG_NONFINITE] = acc[P_NONFINITE] > 0.0;
}

// The measuring passes over a batch whose scratch.mode is planned: pass 0, the further
// histogram passes and selections (mclr: the exact median, 11/11/10 bits), the totals.
template <typename P>
void launch_measure(const LayerTable& table, const Scratch& scratch, const AdamMath& math, bool mclr,
                    const MeasureOut& out, cudaStream_t stream) {
  if (mclr) cudaMemsetAsync(scratch.select, 0, sizeof(uint32_t) * 3 * kMaxLayers, stream);
  if (table.chunks > 0) {
    int shift[3], bits[3];
    const int passes = mclr ? median_passes(false, shift, bits) : 1;
    for (int p = 0; p < passes; ++p) {
      if (mclr) cudaMemsetAsync(scratch.hist, 0, sizeof(uint32_t) * kRadixBins * table.count, stream);
      adam_measure_kernel<P><<<table.chunks, kThreads, 0, stream>>>(table, scratch, math, p, mclr ? shift[p] : 0,
                                                                   mclr ? bits[p] : 1);
      if (mclr) select_kernel<<<table.count, kThreads, 0, stream>>>(scratch, table.count, p, shift[p], bits[p]);
    }
  }
  adam_measure_finish_kernel<<<table.count, kThreads, 0, stream>>>(table, scratch, out);
}

// ------------------------------------------------------------------ the update

__device__ __forceinline__ bool skipped(const AdamUpdateArgs& a) { return *a.found_inf != 0.0f; }

// Per layer: ‖w‖, ‖u‖ and the median from the reduction or the update's own pass, the
// ratio (csrc/layer_math.h), α = r·γ and the statistics (written on a skipped step too).
__global__ void adam_ratio_kernel(const __grid_constant__ LayerTable table, const Scratch scratch,
                                  const AdamUpdateArgs args) {
  const int slot = int(threadIdx.x);
  if (slot >= table.count) return;
  const int row = table.row[slot];
  const double* sums = args.sums + int64_t(row) * 4;
  const bool* flags = args.flags + int64_t(row) * 4;
  const bool own_norms = !flags[FLAG_NORMS];
  const double w2 = own_norms ? scratch.pre_sums[slot * 4 + SUM_W2] : sums[SUM_W2];
  const double u2 = own_norms ? scratch.pre_sums[slot * 4 + SUM_G2] : sums[SUM_G2];
  const bool own_median = args.rule == CUDA_RULE_MCLR && !flags[FLAG_MEDIAN];
  const float median = own_median ? scratch.pre_median[slot] : args.median[row];
  const double w_norm = norm_from_sum(w2), u_norm = norm_from_sum(u2);
  const AdamRatio r = adam_ratio(Rule(args.rule), w_norm, u_norm, median, table.bits[slot] & BIT_ADAPT,
                                 args.trust_coefficient, args.eps, args.has_max_ratio, args.max_ratio);
  const float lr = args.lr ? *args.lr : args.lr_value;
  const double alpha = layer_alpha(r.ratio, lr);
  scratch.alpha[slot] = float(alpha);  // the update's math type
  double* stats = args.stats + int64_t(row) * STAT_COLUMNS;
  stats[STAT_W_NORM] = w_norm;
  stats[STAT_G_NORM] = u_norm;
  stats[STAT_STEP_NORM] = 0.0;
  stats[STAT_KAPPA] = r.kappa;
  stats[STAT_RATIO] = r.ratio;
  stats[STAT_ALPHA] = alpha;
  stats[STAT_FALLBACK] = r.fallback ? 1.0 : 0.0;
}

// w ← w − α·u (rounded to the storage type), m and v written; Σ(α·u)² of the moves.
template <typename P>
__global__ void __launch_bounds__(kThreads) adam_update_kernel(const __grid_constant__ LayerTable table,
                                                               const Scratch scratch, const AdamMath math,
                                                               const AdamUpdateArgs args) {
  __shared__ BlockSums<1> block_sums;
  if (skipped(args)) return;  // nothing is written (the finish kernel reads no partials either)
  const ChunkRange r = chunk_range(table);
  P* w = static_cast<P*>(table.ptr[ROLE_W][r.slot]);
  const P* g = static_cast<const P*>(table.ptr[ROLE_G][r.slot]);
  float* m = static_cast<float*>(table.ptr[ROLE_EXP_AVG][r.slot]);
  float* v = static_cast<float*>(table.ptr[ROLE_EXP_AVG_SQ][r.slot]);
  const bool aligned = table.bits[r.slot] & BIT_ALIGNED;
  const LayerConstants k = layer_constants(table, r.slot, math);
  const float alpha = scratch.alpha[r.slot];
  double acc[1] = {0.0};
  for (int64_t base = r.begin + int64_t(threadIdx.x) * kVec; base < r.end; base += int64_t(kThreads) * kVec) {
    const bool vector = aligned && base + kVec <= r.end;
    const int count = vector ? kVec : int(r.end - base < kVec ? r.end - base : kVec);
    float wv[kVec], gv[kVec], mv[kVec], vv[kVec];
    load_span(w, base, count, vector, wv);
    load_span(g, base, count, vector, gv);
    load_span(m, base, count, vector, mv);
    load_span(v, base, count, vector, vv);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e >= count) continue;
      const float move = adam_element(adam_grad(gv[e], k), wv[e], mv[e], vv[e], math, k) * alpha;
      wv[e] = wv[e] - move;
      acc[0] += square_in_double(move);
    }
    store_span(w, base, count, vector, wv);
    store_span(m, base, count, vector, mv);
    store_span(v, base, count, vector, vv);
  }
  block_sums.sum(acc);
  if (threadIdx.x == 0) scratch.upartials[blockIdx.x] = acc[0];
}

// Per layer: the step norm, and the step count advanced (after every chunk read it).
__global__ void __launch_bounds__(kThreads) adam_update_finish_kernel(const __grid_constant__ LayerTable table,
                                                                      const Scratch scratch,
                                                                      const AdamUpdateArgs args) {
  if (skipped(args)) return;
  const int slot = int(blockIdx.x);
  double acc[1];
  sum_layer_partials<1>(scratch.upartials, table.chunk_start[slot], table.chunk_start[slot + 1], acc);
  if (threadIdx.x != 0) return;
  args.stats[int64_t(table.row[slot]) * STAT_COLUMNS + STAT_STEP_NORM] = norm_from_sum(acc[0]);
  *table.age[slot] = *table.age[slot] + 1.0f;
}

template <typename P>
void launch_update(const LayerTable& table, const Scratch& scratch, const AdamMath& math, const AdamUpdateArgs& args,
                   cudaStream_t stream) {
  const bool mclr = args.rule == CUDA_RULE_MCLR;
  plan_adam_kernel<<<1, kMaxLayers, 0, stream>>>(table, scratch.mode, args.flags, mclr);
  launch_measure<P>(table, scratch, math, mclr, MeasureOut{nullptr, nullptr, nullptr}, stream);
  adam_ratio_kernel<<<1, kMaxLayers, 0, stream>>>(table, scratch, args);
  if (table.chunks > 0) adam_update_kernel<P><<<table.chunks, kThreads, 0, stream>>>(table, scratch, math, args);
  adam_update_finish_kernel<<<table.count, kThreads, 0, stream>>>(table, scratch, args);
}

template <typename P>
void launch_grad_sq(const LayerTable& table, double* partials, const float* unscale, double* sums,
                    cudaStream_t stream) {
  if (table.chunks > 0) grad_sq_kernel<P><<<table.chunks, kThreads, 0, stream>>>(table, partials, unscale);
  grad_sq_finish_kernel<<<table.count, kThreads, 0, stream>>>(table, partials, sums);
}

template <typename P>
void launch_reduce(const LayerTable& table, const Scratch& scratch, const AdamMath& math, bool mclr,
                   const MeasureOut& out, cudaStream_t stream) {
  plan_adam_kernel<<<1, kMaxLayers, 0, stream>>>(table, scratch.mode, nullptr, mclr);
  launch_measure<P>(table, scratch, math, mclr, out, stream);
}

// f.template operator()<P>() for the batch's storage type P.
template <typename F>
void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

}  // namespace

cudaError_t grad_sq_batch(DType dtype, const LayerTable& table, double* partials, const float* unscale, double* sums,
                          cudaStream_t stream) {
  if (table.count == 0) return cudaSuccess;
  by_dtype(dtype, [&](auto tag) { launch_grad_sq<decltype(tag)>(table, partials, unscale, sums, stream); });
  return cudaGetLastError();
}

cudaError_t adam_reduce_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const AdamMath& math,
                              bool mclr, double* sums, float* median, bool* flags, cudaStream_t stream) {
  if (table.count == 0) return cudaSuccess;
  by_dtype(dtype, [&](auto tag) {
    launch_reduce<decltype(tag)>(table, scratch, math, mclr, MeasureOut{sums, median, flags}, stream);
  });
  return cudaGetLastError();
}

cudaError_t adam_update_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const AdamMath& math,
                              const AdamUpdateArgs& args, cudaStream_t stream) {
  if (table.count == 0) return cudaSuccess;
  by_dtype(dtype, [&](auto tag) { launch_update<decltype(tag)>(table, scratch, math, args, stream); });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace cblr

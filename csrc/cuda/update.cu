// Pass 2 (layerwise_update_) on CUDA: κ from the reduction (or the lag stash), the ratio
// (csrc/layer_math.h, on the device) and the fused update of every layer of a batch —
// weight decay, momentum, Nesterov, the CBLR step kept, the update from the saved w_t of
// a layer at its probe point, and the lag=1 measurement of the inputs on the fly.
// found_inf is read by the kernels: a skipped step writes nothing but the restore of the
// parameters at their probe point; the host never reads it.  Torch-free.
//
// Launches per batch: a plan (what the reduction lacks and the ratio needs: decided on the
// device), the update's own measuring pass for those layers (its blocks return at once
// for the others), the ratio, the update over the chunks, and the per-layer totals.
#include "common.cuh"
#include "passes.cuh"

namespace cblr {
namespace cuda {
namespace {

enum { SUM_W2 = 0, SUM_G2, SUM_DIFF2, SUM_STEP2 };
enum { FLAG_MEASURED = 0, FLAG_NORMS, FLAG_MEDIAN, FLAG_NONFINITE };
enum { STAT_W_NORM = 0, STAT_G_NORM, STAT_STEP_NORM, STAT_KAPPA, STAT_RATIO, STAT_ALPHA, STAT_FALLBACK, STAT_COLUMNS };

// scratch.ustate[slot]
enum UpdateBit : uint8_t {
  U_PRE_NORMS = 1,   // the update's own pass took Σw², Σg² (scratch.pre_sums)
  U_PRE_MEDIAN = 2,  // ... and the median (scratch.pre_median)
  U_ACC_STATS = 4,   // the statistics' norms come from the update pass (not needed before)
};

struct Inputs {
  double w_norm, g_norm, kappa;
};

__device__ __forceinline__ bool skipped(const UpdateArgs& a) { return *a.found_inf != 0.0f; }

// (‖w‖, ‖g‖, κ) of the step's inputs from the reduction, completed by the update's own
// pass; norms NaN where neither has them (the ratio then does not need them).
__device__ __forceinline__ Inputs current_inputs(const UpdateArgs& a, const Scratch& s, int slot, int row,
                                                 uint8_t ustate, const RatioParams& p, double w2_fly, double g2_fly,
                                                 bool fly) {
  const double* sums = a.sums + int64_t(row) * 4;
  const bool* flags = a.flags + int64_t(row) * 4;
  double w2 = sums[SUM_W2], g2 = sums[SUM_G2];
  if (!flags[FLAG_NORMS]) {
    if (ustate & U_PRE_NORMS) {
      w2 = s.pre_sums[slot * 4 + 0];
      g2 = s.pre_sums[slot * 4 + 1];
    } else if (fly) {
      w2 = w2_fly;
      g2 = g2_fly;
    } else {
      w2 = g2 = quiet_nan_double();
    }
  }
  float median = a.median[row];
  if (!flags[FLAG_MEDIAN] && (ustate & U_PRE_MEDIAN)) median = s.pre_median[slot];
  Inputs in;
  in.w_norm = norm_from_sum(w2);
  in.g_norm = norm_from_sum(g2);
  in.kappa = reduction_kappa(Rule(a.rule), in.w_norm, in.g_norm, sums[SUM_DIFF2], sums[SUM_STEP2], median,
                             p.weight_decay, p.eps);
  return in;
}

__device__ __forceinline__ Inputs ratio_inputs(const LayerTable& t, const UpdateArgs& a, const Scratch& s, int slot,
                                               uint8_t ustate, const RatioParams& p) {
  if (t.bits[slot] & BIT_STASHED) {  // lag=1: ‖w‖, ‖g‖ and κ of the previous step's inputs
    const double* st = t.lagged[slot];
    return Inputs{st[0], st[1], st[2]};
  }
  return current_inputs(a, s, slot, t.row[slot], ustate, p, 0.0, 0.0, false);
}

// What the update's own pass must take before the ratio: the norms of a layer whose
// reduction lacks them where the ratio falls back (or the step is skipped: the statistics),
// the median an MCLR layer needs and the reduction lacks (a reduction made elsewhere).
__global__ void plan_update_kernel(const __grid_constant__ LayerTable table, const Scratch scratch,
                                   const UpdateArgs args, const RatioParams params) {
  const int slot = int(threadIdx.x);
  if (slot >= table.count) return;
  const int row = table.row[slot];
  const bool* flags = args.flags + int64_t(row) * 4;
  const bool stashed = table.bits[slot] & BIT_STASHED, adapt = table.bits[slot] & BIT_ADAPT;
  const bool measured = flags[FLAG_MEASURED];
  const bool unmeasured = !stashed && !flags[FLAG_NORMS];
  const bool need_median = args.rule == CUDA_RULE_MCLR && !flags[FLAG_MEDIAN] && (args.lag || measured);
  const Inputs in = ratio_inputs(table, args, scratch, slot, 0, params);
  const LayerRatio r = layer_ratio(in.kappa, measured, *table.kappa[slot], in.w_norm, in.g_norm, adapt, params);
  const bool need_norms = unmeasured && (r.fallback || skipped(args) || need_median);
  scratch.mode[slot] = uint8_t((need_norms ? (M_W2 | M_G2) : 0) | (need_median ? M_SELECT : 0));
  scratch.ustate[slot] = uint8_t((need_norms ? U_PRE_NORMS : 0) | (need_median ? U_PRE_MEDIAN : 0) |
                                 (unmeasured && !need_norms ? U_ACC_STATS : 0));
}

__global__ void ratio_kernel(const __grid_constant__ LayerTable table, const Scratch scratch, const UpdateArgs args,
                             const RatioParams params) {
  const int slot = int(threadIdx.x);
  if (slot >= table.count) return;
  const int row = table.row[slot];
  const uint8_t ustate = scratch.ustate[slot];
  const bool adapt = table.bits[slot] & BIT_ADAPT;
  const bool measured = args.flags[int64_t(row) * 4 + FLAG_MEASURED];
  const Inputs in = ratio_inputs(table, args, scratch, slot, ustate, params);
  const double kappa_bar = *table.kappa[slot];
  const LayerRatio r = layer_ratio(in.kappa, measured, kappa_bar, in.w_norm, in.g_norm, adapt, params);
  const float lr = args.lr ? *args.lr : args.lr_value;
  const double alpha = layer_alpha(r.ratio, lr);
  scratch.alpha[slot] = float(alpha);  // the update's math type
  double* stats = args.stats + int64_t(row) * STAT_COLUMNS;
  stats[STAT_W_NORM] = in.w_norm;
  stats[STAT_G_NORM] = in.g_norm;
  stats[STAT_STEP_NORM] = 0.0;
  stats[STAT_KAPPA] = r.used;
  stats[STAT_RATIO] = r.ratio;
  stats[STAT_ALPHA] = alpha;
  stats[STAT_FALLBACK] = r.fallback ? 1.0 : 0.0;
  if (!skipped(args)) {
    *table.kappa[slot] = r.new_bar;
    *table.age[slot] = next_age(*table.age[slot], measured);
  }
}

template <typename P>
__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ LayerTable table,
                                                          const Scratch scratch, const UpdateArgs args) {
  __shared__ BlockSums<kUpdatePartials> block_sums;
  const int slot = find_slot(table, int(blockIdx.x));
  const int64_t n = table.n[slot];
  const int64_t begin = int64_t(int(blockIdx.x) - table.chunk_start[slot]) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  P* w = static_cast<P*>(table.ptr[ROLE_W][slot]);
  const P* w_in = static_cast<const P*>(table.ptr[ROLE_W_IN][slot]);
  const bool aligned = table.bits[slot] & BIT_ALIGNED;
  double acc[kUpdatePartials] = {0, 0, 0, 0};
  if (skipped(args)) {  // nothing is written but the restore of a layer at its probe point
    if (table.bits[slot] & BIT_SHIFTED) {
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) w[i] = w_in[i];
    }
    if (threadIdx.x == 0) {
      for (int k = 0; k < kUpdatePartials; ++k) scratch.upartials[int64_t(blockIdx.x) * kUpdatePartials + k] = 0.0;
    }
    return;
  }
  const P* g = static_cast<const P*>(table.ptr[ROLE_G][slot]);
  float* v = static_cast<float*>(table.ptr[ROLE_V][slot]);
  float* prev = static_cast<float*>(table.ptr[ROLE_PREV][slot]);
  const bool has_momentum = v != nullptr, keep_prev = prev != nullptr;
  const bool nesterov = args.nesterov && has_momentum;
  const bool inputs = args.lag || (scratch.ustate[slot] & U_ACC_STATS);  // the inputs' norms, on the fly
  const bool next_w2 = args.next_w_sq != nullptr;
  const float alpha = scratch.alpha[slot];
  const float momentum = float(args.momentum), weight_decay = float(args.weight_decay);
  const float inv = *args.unscale;

  for (int64_t base = begin + int64_t(threadIdx.x) * kVec; base < end; base += int64_t(kThreads) * kVec) {
    float wv[kVec] = {0, 0, 0, 0}, gv[kVec] = {0, 0, 0, 0}, vv[kVec] = {0, 0, 0, 0}, sv[kVec] = {0, 0, 0, 0};
    const bool vector = aligned && base + kVec <= end;
    const int m = vector ? kVec : int(end - base);
    if (vector) {
      load_vec(w_in + base, wv);
      load_vec(g + base, gv);
      if (has_momentum) load_vec(v + base, vv);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {  // unrolled: the arrays stay in registers
        if (k < m) {
          wv[k] = load_value(w_in[base + k]);
          gv[k] = load_value(g[base + k]);
          if (has_momentum) vv[k] = v[base + k];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k >= m) continue;
      gv[k] *= inv;
      if (inputs) {
        acc[0] += square_in_double(wv[k]);
        acc[1] += square_in_double(gv[k]);
      }
      const float d = decayed_grad(gv[k], wv[k], weight_decay);
      sv[k] = momentum_update(wv[k], d, vv[k], alpha, momentum, has_momentum, nesterov);
      acc[2] += square_in_double(sv[k]);
      if (next_w2) acc[3] += square_in_double(load_value(store_value<P>(wv[k])));  // Σw² as pass 1 would sum it
    }
    if (vector) {
      store_vec(w + base, wv);
      if (has_momentum) *reinterpret_cast<float4*>(v + base) = make_float4(vv[0], vv[1], vv[2], vv[3]);
      if (keep_prev) *reinterpret_cast<float4*>(prev + base) = make_float4(sv[0], sv[1], sv[2], sv[3]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (k < m) {
          w[base + k] = store_value<P>(wv[k]);
          if (has_momentum) v[base + k] = vv[k];
          if (keep_prev) prev[base + k] = sv[k];
        }
      }
    }
  }
  block_sums.sum(acc);
  if (threadIdx.x == 0) {
    for (int k = 0; k < kUpdatePartials; ++k) scratch.upartials[int64_t(blockIdx.x) * kUpdatePartials + k] = acc[k];
  }
}

// Per layer: the step norm, the statistics' norms taken on the fly, the lag stash of this
// step's inputs, Σw² of the result (next_w_sq).
__global__ void __launch_bounds__(kThreads) finish_update_kernel(const __grid_constant__ LayerTable table,
                                                                 const Scratch scratch, const UpdateArgs args,
                                                                 const RatioParams params) {
  const int slot = int(blockIdx.x);
  double acc[kUpdatePartials];
  sum_layer_partials<kUpdatePartials>(scratch.upartials, table.chunk_start[slot], table.chunk_start[slot + 1], acc);
  if (threadIdx.x != 0) return;
  const int row = table.row[slot];
  const uint8_t ustate = scratch.ustate[slot];
  double* stats = args.stats + int64_t(row) * STAT_COLUMNS;
  if (skipped(args)) return;
  stats[STAT_STEP_NORM] = norm_from_sum(acc[2]);
  if (ustate & U_ACC_STATS) {
    stats[STAT_W_NORM] = norm_from_sum(acc[0]);
    stats[STAT_G_NORM] = norm_from_sum(acc[1]);
  }
  if (args.lag) {  // this step's inputs, for the next step
    const Inputs in = current_inputs(args, scratch, slot, row, ustate, params, acc[0], acc[1], true);
    double* st = table.lagged[slot];
    st[0] = in.w_norm;
    st[1] = in.g_norm;
    st[2] = in.kappa;
  }
  if (args.next_w_sq) args.next_w_sq[row] = acc[3];
}

template <typename P>
void launch_update(const LayerTable& table, const Scratch& scratch, const UpdateArgs& args, cudaStream_t stream) {
  const RatioParams params =
      make_ratio_params(args.trust_coefficient, args.curvature_ema, args.has_max_ratio, args.max_ratio,
                        args.weight_decay, args.eps, args.fallback_trust);
  plan_update_kernel<<<1, kMaxLayers, 0, stream>>>(table, scratch, args, params);
  MeasureArgs m{};
  m.mclr = args.rule == CUDA_RULE_MCLR;
  m.approx_median = args.approx_median;
  m.weight_decay = float(args.weight_decay);
  m.unscale = args.unscale;
  m.to_outputs = false;
  measure_batch(std::is_same<P, float>::value ? DType::F32 : std::is_same<P, __half>::value ? DType::F16 : DType::BF16,
                table, scratch, m, stream);
  ratio_kernel<<<1, kMaxLayers, 0, stream>>>(table, scratch, args, params);
  if (table.chunks > 0) update_kernel<P><<<table.chunks, kThreads, 0, stream>>>(table, scratch, args);
  finish_update_kernel<<<table.count, kThreads, 0, stream>>>(table, scratch, args, params);
}

}  // namespace

cudaError_t update_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const UpdateArgs& args,
                         cudaStream_t stream) {
  if (table.count == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: launch_update<__half>(table, scratch, args, stream); break;
    case DType::BF16: launch_update<__nv_bfloat16>(table, scratch, args, stream); break;
    default: launch_update<float>(table, scratch, args, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace cblr

// Pass 1 (layerwise_reduce) on CUDA: per-layer Σw², Σg², the CBLR secant sums and the
// non-finite flag as deterministic two-stage sums (per-chunk partials in fp64, summed per
// layer in chunk order: no float atomics), and the exact lower median of the quotients
// |d_i|/|w_i| by radix selection over their float bits (per-block histograms in shared
// memory, exact integer counts added into per-layer histograms).  Torch-free.
#include "common.cuh"
#include "passes.cuh"
#include "radix_select.cuh"

namespace cblr {
namespace cuda {
namespace {

// Decides on the device which layers measure (their age) and so what pass 1 reads
// (csrc/cpu/step_passes.h, reduce_layers, is the same plan on the host).
__global__ void plan_reduce_kernel(const __grid_constant__ LayerTable table, uint8_t* mode, int rule,
                                   int64_t curvature_interval, bool lag, bool check_nonfinite) {
  const int slot = int(threadIdx.x);
  if (slot >= table.count) return;
  const uint8_t bits = table.bits[slot];
  const bool adapt = bits & BIT_ADAPT, stashed = bits & BIT_STASHED, probed = bits & BIT_PROBED;
  const bool measured = adapt && (rule == CUDA_RULE_CBLR ? probed
                                                        : measurement_due(*table.age[slot], curvature_interval));
  // lag=1 stashes κ of every layer for the next step (as the reference does): MCLR
  // selects the median of every layer under lag, of the measuring ones otherwise.
  const bool select = rule == CUDA_RULE_MCLR && (lag || measured);
  bool read_w = !stashed && measured && !probed;
  // Where w would be read for Σw² alone, a known Σw² spares the read; a probed layer sits
  // at w_t + s, so its Σw_t² must be the shift's.
  const bool known = probed || (read_w && (bits & BIT_KNOWN_W2) && !select);
  if (known) read_w = false;
  const bool norms = read_w || known;
  uint8_t m = 0;
  if (read_w) m |= M_W2;
  if (norms) m |= M_G2 | M_NORMS;
  if (check_nonfinite) m |= M_CHECK;
  if (probed) m |= M_SECANT;
  if (select) m |= M_SELECT;
  if (known) m |= M_KNOWN;
  if (measured) m |= M_MEASURED;
  mode[slot] = m;
}

struct Element {
  float w, g, probe_g, step;
};

// One pass over a chunk: pass 0 takes the sums (and the first histogram); a later pass
// (pass > 0) only histograms the quotients whose higher bits equal the selected prefix.
template <typename P>
__global__ void __launch_bounds__(kThreads) chunk_pass_kernel(const __grid_constant__ LayerTable table,
                                                              const Scratch scratch, int pass, int shift, int nbits,
                                                              float weight_decay, const float* unscale) {
  __shared__ uint32_t hist[kRadixBins];
  __shared__ BlockSums<kPartials> block_sums;
  const int slot = find_slot(table, int(blockIdx.x));
  const uint8_t mode = scratch.mode[slot];
  const bool select = mode & M_SELECT;
  double acc[kPartials] = {0, 0, 0, 0, 0, 0};
  if (pass > 0 && !select) return;
  if ((mode & kReads) == 0) {
    if (threadIdx.x == 0) {
      for (int k = 0; k < kPartials; ++k) scratch.partials[int64_t(blockIdx.x) * kPartials + k] = 0.0;
    }
    return;
  }
  if (select) {
    for (int b = int(threadIdx.x); b < kRadixBins; b += kThreads) hist[b] = 0;
    __syncthreads();
  }
  const int64_t n = table.n[slot];
  const int64_t begin = int64_t(int(blockIdx.x) - table.chunk_start[slot]) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const P* w = static_cast<const P*>(table.ptr[ROLE_W_IN][slot]);
  const P* g = static_cast<const P*>(table.ptr[ROLE_G][slot]);
  const P* probe_g = static_cast<const P*>(table.ptr[ROLE_PROBE_G][slot]);
  const float* step = static_cast<const float*>(table.ptr[ROLE_STEP][slot]);
  const bool secant = pass == 0 && (mode & M_SECANT);
  const bool read_w = (mode & (M_W2 | M_SELECT)) && !secant;
  const bool read_g = true;  // every reading mode reads g
  const bool sum_w = pass == 0 && (mode & M_W2);
  const bool sum_g = pass == 0 && (mode & (M_G2 | M_SECANT));
  const bool aligned = table.bits[slot] & BIT_ALIGNED;
  const uint32_t prefix = pass > 0 ? scratch.select[slot * 3] : 0u;
  const int high = shift + nbits;  // < 32 for pass > 0
  const uint32_t mask = (1u << nbits) - 1u;
  const float inv = *unscale;

  auto visit = [&](const Element& e) {
    if (pass == 0) {
      if (sum_w) acc[0] += square_in_double(e.w);
      if (sum_g) acc[1] += square_in_double(e.g);
      acc[4] += is_finite(e.g) ? 0.0 : 1.0;
      if (secant) {
        acc[4] += is_finite(e.probe_g) ? 0.0 : 1.0;  // an overflow at w_t + s skips the step too
        const float diff = secant_difference(e.g, e.probe_g, e.step, weight_decay);
        acc[2] += square_in_double(diff);
      }
    }
    if (select && e.w != 0.0f) {
      add_quotient(hist, curvature_quotient(decayed_grad(e.g, e.w, weight_decay), e.w), pass, shift, prefix, high,
                   mask, acc[5]);
    }
  };

  for (int64_t base = begin + int64_t(threadIdx.x) * kVec; base < end; base += int64_t(kThreads) * kVec) {
    float wv[kVec] = {0, 0, 0, 0}, gv[kVec] = {0, 0, 0, 0}, pv[kVec] = {0, 0, 0, 0}, sv[kVec] = {0, 0, 0, 0};
    float s_raw[kVec] = {0, 0, 0, 0};
    int m = kVec;
    if (aligned && base + kVec <= end) {
      if (read_w) load_vec(w + base, wv);
      if (read_g) load_vec(g + base, gv);
      if (secant) {
        load_vec(probe_g + base, pv);
        load_vec(step + base, s_raw);
      }
    } else {
      m = int(end - base < kVec ? end - base : kVec);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {  // unrolled: the arrays stay in registers
        if (k < m) {
          if (read_w) wv[k] = load_value(w[base + k]);
          if (read_g) gv[k] = load_value(g[base + k]);
          if (secant) {
            pv[k] = load_value(probe_g[base + k]);
            s_raw[k] = step[base + k];
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k >= m) continue;
      gv[k] *= inv;
      pv[k] *= inv;
      if (secant) {
        // s: the shift's realised displacement.
        sv[k] = s_raw[k];
        acc[3] += square_in_double(s_raw[k]);
      }
      visit(Element{wv[k], gv[k], pv[k], sv[k]});
    }
  }

  if (select) flush_histogram(hist, scratch, slot, mask);
  if (pass == 0) {
    block_sums.sum(acc);
    if (threadIdx.x == 0) {
      for (int k = 0; k < kPartials; ++k) scratch.partials[int64_t(blockIdx.x) * kPartials + k] = acc[k];
    }
  }
}

// Per-layer totals of the chunk partials (chunk order) and the median from the selection.
__global__ void __launch_bounds__(kThreads) finish_kernel(const __grid_constant__ LayerTable table,
                                                          const Scratch scratch, const MeasureArgs args) {
  const int slot = int(blockIdx.x);
  double acc[kPartials];
  sum_layer_partials<kPartials>(scratch.partials, table.chunk_start[slot], table.chunk_start[slot + 1], acc);
  if (threadIdx.x != 0) return;
  const uint8_t mode = scratch.mode[slot];
  float median = 0.0f;  // not taken
  if (mode & M_SELECT) {
    median = selected_median(scratch, slot, acc[5]);
    if (args.approx_median) median = approx_median(median);
  }
  if (!args.to_outputs) {
    scratch.pre_sums[slot * 4 + 0] = acc[0];
    scratch.pre_sums[slot * 4 + 1] = acc[1];
    scratch.pre_median[slot] = median;
    return;
  }
  const int row = table.row[slot];
  const bool norms = mode & M_NORMS;
  double* sums = args.sums + int64_t(row) * 4;
  sums[0] = norms ? ((mode & M_KNOWN) ? args.w_sq[row] : acc[0]) : 0.0;
  sums[1] = norms ? acc[1] : 0.0;
  sums[2] = acc[2];
  sums[3] = acc[3];
  args.median[row] = median;
  bool* flags = args.flags + int64_t(row) * 4;
  flags[0] = mode & M_MEASURED;
  flags[1] = norms;
  flags[2] = mode & M_SELECT;
  flags[3] = acc[4] > 0.0;
}

template <typename P>
void launch_measure(const LayerTable& table, const Scratch& scratch, const MeasureArgs& args, cudaStream_t stream) {
  if (table.chunks > 0) {
    int shift[3], bits[3];
    const int passes = args.mclr ? median_passes(args.approx_median, shift, bits) : 1;
    if (args.mclr) {
      cudaMemsetAsync(scratch.select, 0, sizeof(uint32_t) * 3 * kMaxLayers, stream);
    }
    for (int p = 0; p < passes; ++p) {
      if (args.mclr) cudaMemsetAsync(scratch.hist, 0, sizeof(uint32_t) * kRadixBins * table.count, stream);
      chunk_pass_kernel<P><<<table.chunks, kThreads, 0, stream>>>(table, scratch, p, args.mclr ? shift[p] : 0,
                                                                 args.mclr ? bits[p] : 1, args.weight_decay,
                                                                 args.unscale);
      if (args.mclr) select_kernel<<<table.count, kThreads, 0, stream>>>(scratch, table.count, p, shift[p], bits[p]);
    }
  } else if (args.mclr) {
    cudaMemsetAsync(scratch.select, 0, sizeof(uint32_t) * 3 * kMaxLayers, stream);
  }
  finish_kernel<<<table.count, kThreads, 0, stream>>>(table, scratch, args);
}

}  // namespace

int median_passes(bool approx, int* shift, int* bits) {
  if (approx) {  // the top 16 bits: the bf16-truncated median
    shift[0] = 21; bits[0] = 11;
    shift[1] = 16; bits[1] = 5;
    return 2;
  }
  shift[0] = 21; bits[0] = 11;
  shift[1] = 10; bits[1] = 11;
  shift[2] = 0; bits[2] = 10;
  return 3;
}

cudaError_t measure_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const MeasureArgs& args,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::F16: launch_measure<__half>(table, scratch, args, stream); break;
    case DType::BF16: launch_measure<__nv_bfloat16>(table, scratch, args, stream); break;
    default: launch_measure<float>(table, scratch, args, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t reduce_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const ReduceArgs& args,
                         cudaStream_t stream) {
  if (table.count == 0) return cudaSuccess;
  plan_reduce_kernel<<<1, kMaxLayers, 0, stream>>>(table, scratch.mode, args.rule, args.curvature_interval, args.lag,
                                                   args.check_nonfinite);
  MeasureArgs m;
  m.mclr = args.rule == CUDA_RULE_MCLR;
  m.approx_median = args.approx_median;
  m.weight_decay = float(args.weight_decay);
  m.unscale = args.unscale;
  m.to_outputs = true;
  m.w_sq = args.w_sq;
  m.sums = args.sums;
  m.median = args.median;
  m.flags = args.flags;
  return measure_batch(dtype, table, scratch, m, stream);
}

}  // namespace cuda
}  // namespace cblr

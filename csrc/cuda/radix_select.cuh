// The exact lower median's radix selection, shared by the measuring passes of reduce.cu
// (quotients |d_i|/|w_i|) and adam.cu (quotients |u_i|/|w_i|): a chunk pass adds each
// quotient to a block histogram of one radix digit (add_quotient), flushes it into the
// layer's histogram with exact integer atomics (flush_histogram), select_kernel picks the
// digit of the rank-th smallest, and selected_median reads the result.  Torch-free; an
// anonymous namespace: each .cu file gets its own copy of the kernel.
#pragma once

#include "common.cuh"
#include "passes.cuh"

namespace cblr {
namespace cuda {
namespace {

// One quotient into the block histogram of pass `pass` (a later pass takes only the
// quotients whose higher bits equal the selected prefix); a NaN one is counted in nans.
__device__ __forceinline__ void add_quotient(uint32_t* hist, float q, int pass, int shift, uint32_t prefix,
                                             int high, uint32_t mask, double& nans) {
  if (q != q) {
    nans += 1.0;
    return;
  }
  const uint32_t b = float_bits(q);
  if (pass == 0 || (b >> high) == (prefix >> high)) atomicAdd(&hist[(b >> shift) & mask], 1u);
}

// The block histogram added into the layer's (integer counts: exact in any order).
__device__ __forceinline__ void flush_histogram(const uint32_t* hist, const Scratch& scratch, int slot,
                                                uint32_t mask) {
  __syncthreads();
  uint32_t* layer_hist = scratch.hist + int64_t(slot) * kRadixBins;
  for (int b = int(threadIdx.x); b <= int(mask); b += kThreads) {
    if (hist[b]) atomicAdd(layer_hist + b, hist[b]);
  }
}

// The median a finished selection found: NaN when the layer has no quotient or a NaN one.
__device__ __forceinline__ float selected_median(const Scratch& scratch, int slot, double nans) {
  const uint32_t* state = scratch.select + slot * 3;
  return (state[2] == 0 || nans > 0.0) ? quiet_nan() : bits_float(state[0]);
}

// One radix digit of the lower median of each selecting layer: the bin holding the
// rank-th smallest quotient among those matching the prefix (one block per layer).
__global__ void __launch_bounds__(kThreads) select_kernel(const Scratch scratch, int count, int pass, int shift,
                                                          int nbits) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  const int slot = int(blockIdx.x);
  if (slot >= count || !(scratch.mode[slot] & M_SELECT)) return;
  const uint32_t* hist = scratch.hist + int64_t(slot) * kRadixBins;
  uint32_t* state = scratch.select + slot * 3;  // prefix, rank, count
  const int bins = 1 << nbits;
  const int per = (bins + kThreads - 1) / kThreads;
  const int first = int(threadIdx.x) * per;
  const uint32_t carried_rank = pass == 0 ? 0u : state[1];  // read before any thread writes it
  const uint32_t carried_prefix = pass == 0 ? 0u : state[0];
  uint32_t local = 0;
  for (int b = first; b < first + per && b < bins; ++b) local += hist[b];
  uint32_t before = 0, total = 0;
  Scan(scan).ExclusiveSum(local, before, total);
  const uint32_t rank = pass == 0 ? (total ? uint32_t(lower_median_rank(int64_t(total))) : 0u) : carried_rank;
  if (pass == 0 && threadIdx.x == 0) state[2] = total;  // quotients that are not NaN
  if (total == 0 || rank < before || rank >= before + local) return;
  uint32_t cum = before;
  for (int b = first; b < first + per && b < bins; ++b) {
    if (rank < cum + hist[b]) {
      state[0] = carried_prefix | (uint32_t(b) << shift);
      state[1] = rank - cum;
      return;
    }
    cum += hist[b];
  }
}

}  // namespace
}  // namespace cuda
}  // namespace cblr

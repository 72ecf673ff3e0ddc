// Device helpers of the CUDA backend: storage types, vector accesses, the chunk lookup
// and deterministic block sums.  Torch-free (CUDA runtime, CUB, csrc/layer_math.h).
// Compile with --fmad=false (no fused multiply-add: the MCLR quotients and the update
// are bit-identical to the other backends') and without --use_fast_math (IEEE division).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../layer_math.h"
#include "kernels.h"

static_assert(sizeof(cblr::cuda::LayerTable) + sizeof(cblr::cuda::Scratch) + sizeof(cblr::cuda::UpdateArgs) <= 4000,
              "the launch arguments must fit the 4 KiB kernel parameter space");

namespace cblr {
namespace cuda {

// Storage <-> math (fp32).  Rounding to the storage type is round-to-nearest-even, as torch's.
__device__ __forceinline__ float load_value(float x) { return x; }
__device__ __forceinline__ float load_value(__half x) { return __half2float(x); }
__device__ __forceinline__ float load_value(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename P> __device__ __forceinline__ P store_value(float x);
template <> __device__ __forceinline__ float store_value<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store_value<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_value<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// kVec elements of storage type P, as one aligned access (16 bytes for fp32, 8 for 16-bit types).
template <typename P>
struct alignas(sizeof(P) * kVec) Vec {
  P v[kVec];
};

template <typename P>
__device__ __forceinline__ void load_vec(const P* p, float (&out)[kVec]) {
  const Vec<P> x = *reinterpret_cast<const Vec<P>*>(p);
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = load_value(x.v[k]);
}

template <typename P>
__device__ __forceinline__ void store_vec(P* p, const float (&in)[kVec]) {
  Vec<P> x;
#pragma unroll
  for (int k = 0; k < kVec; ++k) x.v[k] = store_value<P>(in[k]);
  *reinterpret_cast<Vec<P>*>(p) = x;
}

// kVec elements from p + base: one vector access where `vector`, else the first `count`
// one by one (the rest 0).  Unrolled: the arrays stay in registers.
template <typename P>
__device__ __forceinline__ void load_span(const P* p, int64_t base, int count, bool vector, float (&out)[kVec]) {
  if (vector) {
    load_vec(p + base, out);
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = k < count ? load_value(p[base + k]) : 0.0f;
}

template <typename P>
__device__ __forceinline__ void store_span(P* p, int64_t base, int count, bool vector, const float (&in)[kVec]) {
  if (vector) {
    store_vec(p + base, in);
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < count) p[base + k] = store_value<P>(in[k]);
  }
}

// The layer (slot) of the table that block `block` works on: the last slot whose
// chunk_start is <= block (layers without elements own no chunk).
__device__ __forceinline__ int find_slot(const LayerTable& t, int block) {
  int lo = 0, hi = t.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t.chunk_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sums of N doubles over the block, in a fixed order (the same bits every run for a
// given block size): CUB's warp-shuffle tree.  The result is valid in thread 0.
template <int N>
struct BlockSums {
  using Reduce = cub::BlockReduce<double, kThreads, cub::BLOCK_REDUCE_WARP_REDUCTIONS>;
  typename Reduce::TempStorage storage;

  __device__ __forceinline__ void sum(double (&x)[N]) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const double total = Reduce(storage).Sum(x[k]);
      __syncthreads();  // the storage is reused by the next column
      x[k] = total;
    }
  }
};

// Each layer's chunk partials summed in chunk order (one block per layer, fixed order).
template <int N>
__device__ __forceinline__ void sum_layer_partials(const double* partials, int first, int last, double (&out)[N]) {
  __shared__ BlockSums<N> sums;
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = 0.0;
  for (int c = first + int(threadIdx.x); c < last; c += kThreads) {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] += partials[int64_t(c) * N + k];
  }
  sums.sum(out);
}

}  // namespace cuda
}  // namespace cblr

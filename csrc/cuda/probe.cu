// CBLR's probe on CUDA: the shift (saved ← w, w ← w + s with s rounded to the storage
// type, Σw_t² per layer as a deterministic two-stage fp64 sum) and the restore (w ←
// saved, bit-exactly).  Torch-free.
#include "common.cuh"

namespace cblr {
namespace cuda {
namespace {

template <typename P>
__global__ void __launch_bounds__(kThreads) shift_kernel(const __grid_constant__ LayerTable table, double* partials) {
  __shared__ BlockSums<1> block_sums;
  const int slot = find_slot(table, int(blockIdx.x));
  const int64_t n = table.n[slot];
  const int64_t begin = int64_t(int(blockIdx.x) - table.chunk_start[slot]) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  P* w = static_cast<P*>(table.ptr[ROLE_W][slot]);
  P* saved = static_cast<P*>(table.ptr[ROLE_W_IN][slot]);
  const float* step = static_cast<const float*>(table.ptr[ROLE_STEP][slot]);
  float* delta = static_cast<float*>(table.ptr[ROLE_PREV][slot]);
  const bool aligned = table.bits[slot] & BIT_ALIGNED;
  double acc[1] = {0.0};
  for (int64_t base = begin + int64_t(threadIdx.x) * kVec; base < end; base += int64_t(kThreads) * kVec) {
    if (aligned && base + kVec <= end) {
      const Vec<P> x = *reinterpret_cast<const Vec<P>*>(w + base);
      *reinterpret_cast<Vec<P>*>(saved + base) = x;
      const float4 s = *reinterpret_cast<const float4*>(step + base);
      const float sv[kVec] = {s.x, s.y, s.z, s.w};
      float out[kVec], moved[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float wv = load_value(x.v[k]);
        acc[0] += square_in_double(wv);
        out[k] = load_value(store_value<P>(wv + load_value(store_value<P>(sv[k]))));
        moved[k] = realised_displacement(out[k], wv);
      }
      store_vec(w + base, out);
      *reinterpret_cast<float4*>(delta + base) = make_float4(moved[0], moved[1], moved[2], moved[3]);
    } else {
      for (int64_t i = base; i < end && i < base + kVec; ++i) {
        const P x = w[i];
        saved[i] = x;
        const float wv = load_value(x);
        acc[0] += square_in_double(wv);
        w[i] = store_value<P>(wv + load_value(store_value<P>(step[i])));
        delta[i] = realised_displacement(load_value(w[i]), wv);
      }
    }
  }
  block_sums.sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc[0];
}

__global__ void __launch_bounds__(kThreads) shift_finish_kernel(const __grid_constant__ LayerTable table,
                                                                const double* partials, double* w_sq) {
  const int slot = int(blockIdx.x);
  double acc[1];
  sum_layer_partials<1>(partials, table.chunk_start[slot], table.chunk_start[slot + 1], acc);
  if (threadIdx.x == 0) w_sq[table.row[slot]] = acc[0];
}

template <typename P>
__global__ void __launch_bounds__(kThreads) restore_kernel(const __grid_constant__ LayerTable table) {
  const int slot = find_slot(table, int(blockIdx.x));
  const int64_t n = table.n[slot];
  const int64_t begin = int64_t(int(blockIdx.x) - table.chunk_start[slot]) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  P* w = static_cast<P*>(table.ptr[ROLE_W][slot]);
  const P* saved = static_cast<const P*>(table.ptr[ROLE_W_IN][slot]);
  const bool aligned = table.bits[slot] & BIT_ALIGNED;
  for (int64_t base = begin + int64_t(threadIdx.x) * kVec; base < end; base += int64_t(kThreads) * kVec) {
    if (aligned && base + kVec <= end) {
      *reinterpret_cast<Vec<P>*>(w + base) = *reinterpret_cast<const Vec<P>*>(saved + base);
    } else {
      for (int64_t i = base; i < end && i < base + kVec; ++i) w[i] = saved[i];
    }
  }
}

template <typename P>
void launch_shift(const LayerTable& table, double* partials, double* w_sq, cudaStream_t stream) {
  if (table.chunks > 0) shift_kernel<P><<<table.chunks, kThreads, 0, stream>>>(table, partials);
  shift_finish_kernel<<<table.count, kThreads, 0, stream>>>(table, partials, w_sq);
}

}  // namespace

cudaError_t shift_batch(DType dtype, const LayerTable& table, double* partials, double* w_sq, cudaStream_t stream) {
  if (table.count == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: launch_shift<__half>(table, partials, w_sq, stream); break;
    case DType::BF16: launch_shift<__nv_bfloat16>(table, partials, w_sq, stream); break;
    default: launch_shift<float>(table, partials, w_sq, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t restore_batch(DType dtype, const LayerTable& table, cudaStream_t stream) {
  if (table.chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: restore_kernel<__half><<<table.chunks, kThreads, 0, stream>>>(table); break;
    case DType::BF16: restore_kernel<__nv_bfloat16><<<table.chunks, kThreads, 0, stream>>>(table); break;
    default: restore_kernel<float><<<table.chunks, kThreads, 0, stream>>>(table); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace cblr

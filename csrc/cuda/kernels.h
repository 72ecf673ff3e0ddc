// Torch-free host API of the CUDA backend: the layer table that every launch takes as a
// kernel argument, and the launchers of csrc/cuda/*.cu.  Included by the .cu files (nvcc)
// and by the binding (csrc/cuda/binding.cpp, the host compiler): plain C++ and the CUDA
// runtime's types only.
//
// One call of an op handles the layers of a param group in batches of at most kMaxLayers
// layers of one storage type (the binding splits them).  A batch is one LayerTable: every
// pass over the batch is one launch over its chunks (kChunk elements of one layer each),
// found from the block index by a binary search in chunk_start.  Per-layer device values
// that decide what a pass reads (a layer measures when its age says so, a reduction made
// elsewhere lacks a norm) are decided on the device into a mode byte per layer: the host
// never reads a device value and never branches on one.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cblr {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// The table lives in the kernel parameter space (<= 4 KiB together with the scalars).
constexpr int kMaxLayers = 36;
constexpr int kThreads = 256;                   // threads per block, every kernel
constexpr int kVec = 4;                         // elements per vector access
constexpr int64_t kChunk = kThreads * kVec * 16;  // elements per chunk (one block)
constexpr int kRadixBins = 2048;                // histogram bins of one radix pass (11 bits)

// Roles of the tensor pointers of a layer.
enum Role : int {
  ROLE_W = 0,      // the parameter (written by the update and the probe)
  ROLE_W_IN,       // w_t: the saved copy where the parameter sits at the probe point, else w
  ROLE_G,          // the gradient
  ROLE_V,          // momentum buffer (fp32) or null
  ROLE_PREV,       // s_{t−1} kept (fp32) or null; shift: the realised displacement it writes
  ROLE_PROBE_G,    // pass 1, CBLR: the gradient at w_t + s
  ROLE_STEP,       // pass 1 / shift: s (fp32)
  ROLE_COUNT
};
// The Adam base's ops (adam.cu) take the same tables: w in ROLE_W and ROLE_W_IN, g in
// ROLE_G, the moments (fp32) in these two slots, and the step count in `age`'s.
constexpr Role ROLE_EXP_AVG = ROLE_V;
constexpr Role ROLE_EXP_AVG_SQ = ROLE_PREV;

// Host bits of a layer.
enum LayerBit : uint8_t {
  BIT_ADAPT = 1,
  BIT_STASHED = 2,   // lag=1 and a valid stash
  BIT_PROBED = 4,    // CBLR probe gradient given (pass 1)
  BIT_KNOWN_W2 = 8,  // w_sq holds Σw_t²
  BIT_ALIGNED = 16,  // every pointer of the layer is aligned for kVec-wide accesses
  BIT_SHIFTED = 32,  // the update reads w_t from the saved copy
};

struct LayerTable {
  int count;                           // layers in this batch
  int chunks;                          // chunks in this batch (= chunk_start[count])
  int chunk_start[kMaxLayers + 1];     // first chunk of each layer (prefix sums)
  int row[kMaxLayers];                 // the layer's row in the op's [L, ...] outputs
  int64_t n[kMaxLayers];               // elements
  void* ptr[ROLE_COUNT][kMaxLayers];   // data pointers by role (null where absent)
  double* kappa[kMaxLayers];           // κ̄ (update)
  float* age[kMaxLayers];              // age (reduce, update)
  double* lagged[kMaxLayers];          // lag stash [3] (update, lag=1) or null
  uint8_t bits[kMaxLayers];            // LayerBit
};

// Per-batch device scratch of the reduce and update passes (the binding allocates it
// with torch's caching allocator; hist and select need zeros).
struct Scratch {
  uint8_t* mode;        // [kMaxLayers] what each layer's pass reads (reduce.cu)
  double* partials;     // [chunks][kPartials]
  uint32_t* hist;       // [kMaxLayers][kRadixBins] (MCLR only, else null)
  uint32_t* select;     // [kMaxLayers][3]: prefix, rank, count (MCLR only)
  double* pre_sums;     // [kMaxLayers][4]: the update's own pass 1 (Σw², Σg²)
  float* pre_median;    // [kMaxLayers]
  float* alpha;         // [kMaxLayers] (update)
  uint8_t* ustate;      // [kMaxLayers] (update)
  double* upartials;    // [chunks][kUpdatePartials]
};
constexpr int kPartials = 6;        // Σw², Σg², Σ(Δd)², Σs², non-finite g, NaN quotients
constexpr int kUpdatePartials = 4;  // Σw_t², Σg², Σs², Σw_{t+1}²

enum RuleId : int { CUDA_RULE_LARS = 0, CUDA_RULE_MCLR = 1, CUDA_RULE_CBLR = 2 };

struct ReduceArgs {
  int rule;
  double weight_decay;
  int64_t curvature_interval;
  bool lag, approx_median, check_nonfinite;
  const float* unscale;  // device scalar: gradients are read as g·unscale (GradScaler's fl32(1/S), or 1)
  const double* w_sq;  // [L] or null (indexed by row)
  // outputs, indexed by row
  double* sums;   // [L][4]
  float* median;  // [L]
  bool* flags;    // [L][4]
};

struct UpdateArgs {
  int rule;
  bool lag, approx_median, nesterov, has_momentum, keep_prev;
  double weight_decay, momentum, eps;
  double trust_coefficient, curvature_ema, fallback_trust;
  bool has_max_ratio;
  double max_ratio;
  // the reduction, indexed by row
  const double* sums;
  const float* median;
  const bool* flags;
  const float* found_inf;  // device scalar (fp32): nonzero skips the step
  const float* unscale;    // device scalar, as ReduceArgs::unscale
  const float* lr;         // device scalar, or null: lr_value
  float lr_value;
  double* stats;      // [L][7]
  double* next_w_sq;  // [L] or null
};

// The Adam base (adam.cu): the element-wise constants, each rounded once to fp32 on the
// host (as the CPU kernels' AdamConstants), and the device scalars the kernels read.
struct AdamMath {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  bool bias_correction;
  const float* unscale;  // device scalar, as ReduceArgs::unscale
  const float* clip;     // device scalar (g ÷ clip, LAMB's global clipping) or null
};
constexpr int kAdamPartials = 4;  // Σw², Σu², non-finite g, NaN quotients

struct AdamUpdateArgs {
  int rule;  // CUDA_RULE_LARS or CUDA_RULE_MCLR
  double trust_coefficient, eps;
  bool has_max_ratio;
  double max_ratio;
  // the reduction, indexed by row
  const double* sums;
  const float* median;
  const bool* flags;
  const float* found_inf;  // device scalar (fp32): nonzero skips the step, writing nothing
  const float* lr;         // device scalar, or null: lr_value
  float lr_value;
  double* stats;  // [L][7]
};

// The median passes' (shift, bits) schedule: exact 11/11/10 bits, approx the top 16 bits.
int median_passes(bool approx, int* shift, int* bits);

// Every launcher returns cudaGetLastError() after its launches (no synchronisation).
cudaError_t reduce_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const ReduceArgs& args,
                         cudaStream_t stream);
cudaError_t update_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const UpdateArgs& args,
                         cudaStream_t stream);
// saved ← w, w ← w + s (s rounded to the storage type), ROLE_PREV ← the realised
// displacement (w + s as stored) − w; w_sq[row] = Σsaved² (fp64).
cudaError_t shift_batch(DType dtype, const LayerTable& table, double* partials, double* w_sq,
                        cudaStream_t stream);
// w ← saved (ROLE_W ← ROLE_W_IN), bit-exactly.
cudaError_t restore_batch(DType dtype, const LayerTable& table, cudaStream_t stream);
// sums[row] = Σ(g·unscale)² of each layer (fp64); partials: [chunks] doubles.
cudaError_t grad_sq_batch(DType dtype, const LayerTable& table, double* partials, const float* unscale, double* sums,
                          cudaStream_t stream);
// Pass 1 of the Adam base: Σw², Σu² of the direction u this step would take, the lower
// median of |u_i|/|w_i| (mclr), the non-finite flag of g; into sums [L][4], median [L],
// flags [L][4] by row.  Writes nothing else.
cudaError_t adam_reduce_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const AdamMath& math,
                              bool mclr, double* sums, float* median, bool* flags, cudaStream_t stream);
// Pass 2: what the reduction lacks taken first, the ratio, w ← w − α·u with m, v written
// and the step count advanced; a skipped step writes nothing but the statistics.
cudaError_t adam_update_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const AdamMath& math,
                              const AdamUpdateArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace cblr

// What reduce.cu and update.cu share: the per-layer mode bits of a measuring pass and the
// entry point of the measuring passes (chunk sums, radix-select median, per-layer
// totals), implemented in reduce.cu.  Torch-free.
#pragma once

#include "kernels.h"

namespace cblr {
namespace cuda {

// scratch.mode[slot]: what the measuring pass reads and takes of the layer.
enum ModeBit : uint8_t {
  M_W2 = 1,        // Σw² of w (ROLE_W_IN)
  M_G2 = 2,        // Σg²
  M_CHECK = 4,     // non-finite check of g (always done where g is read)
  M_SECANT = 8,    // CBLR secant sums from g, the probe gradient and s (w not read)
  M_SELECT = 16,   // median of the quotients |d|/|w| (radix selection)
  M_KNOWN = 32,    // Σw² is w_sq[row] (the shift's Σw_t²)
  M_MEASURED = 64, // flag only: the layer measures κ this step
  M_NORMS = 128,   // flag only: Σw² and Σg² taken
};
constexpr uint8_t kReads = M_W2 | M_G2 | M_CHECK | M_SECANT | M_SELECT;

struct MeasureArgs {
  bool mclr, approx_median;
  float weight_decay;
  const float* unscale;  // device scalar: g is read as g·unscale
  // Where the totals go: the op's outputs by row (reduce), or scratch.pre_sums /
  // scratch.pre_median by slot (the update's own pass before the ratio).
  bool to_outputs;
  const double* w_sq;  // outputs only
  double* sums;
  float* median;
  bool* flags;
};

// Launches, on `stream`, the passes over the batch whose scratch.mode is already set
// (by a kernel earlier in the stream): pass 0 (sums, non-finite counts, the first
// histogram), the further histogram passes and selections (MCLR), the per-layer totals.
cudaError_t measure_batch(DType dtype, const LayerTable& table, const Scratch& scratch, const MeasureArgs& args,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace cblr

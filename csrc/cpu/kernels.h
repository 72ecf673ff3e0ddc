// Torch-free entry points of the CPU backend (csrc/binding.cpp wraps them as torch ops).
// Each call handles all layers of one param group; work is split into (layer, chunk)
// items run by `threads` OpenMP threads, with results independent of the thread count
// (for one instruction-set variant: wider vectors sum in another order, dispatch.h).
#pragma once

#include <cstdint>
#include <vector>

#include "layers.h"

namespace cblr {
namespace cpu {

// Group hyperparameters of one step.
struct StepConfig {
  Rule rule = RULE_LARS;
  double weight_decay = 0, momentum = 0;
  bool nesterov = false;
  int64_t curvature_interval = 1;
  bool lag = false;
  bool approx_median = false;
  bool check_nonfinite = true;  // false: lag=1 layers with a stash are not read in pass 1 at all
  RatioParams ratio{};  // pass 2 only
  int threads = 1;
  // MCLR scratch (the caller's, kept between steps so its pages stay mapped): a pass
  // needs 4 (fp64: 8) bytes per element of the selecting layers, twice that under lag=1;
  // with less, the call allocates its own.
  unsigned char* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// The instruction-set variant of the passes in use: "baseline", "avx2" or "avx512".
const char* kernel_isa();

// Columns of functional.Reduction (SUM_*, FLAG_*), of the lag stash (‖w‖, ‖g‖, κ) and of
// the statistics (functional.STAT_NAMES).
enum { SUM_W2, SUM_G2, SUM_DIFF2, SUM_STEP2, SUM_COLUMNS };
enum { FLAG_MEASURED, FLAG_NORMS, FLAG_MEDIAN, FLAG_NONFINITE, FLAG_COLUMNS };
enum { LAGGED_W_NORM, LAGGED_G_NORM, LAGGED_KAPPA };
enum { STAT_W_NORM, STAT_G_NORM, STAT_STEP_NORM, STAT_KAPPA, STAT_RATIO, STAT_ALPHA, STAT_FALLBACK,
       STAT_COLUMNS };

// A reduction of L layers as flat rows: sums[L][SUM_COLUMNS], median[L], flags[L][FLAG_COLUMNS].
struct ReductionOut {
  double* sums;
  float* median;
  bool* flags;
};
struct ReductionIn {
  const double* sums;
  const float* median;
  const bool* flags;
};

// Pass 1: writes the reduction.  Σw² and Σg² (FLAG_NORMS) only where the layer measures
// and has no valid lag stash; a layer that reads w only for Σw² takes
// LayerRef::known_w2 instead where it has one.  Elsewhere g is read for the non-finite
// check alone (not at all for a layer with a lag stash when !check_nonfinite).  The
// median (MCLR, FLAG_MEDIAN) where a measuring layer has no stash, approx-truncated (0
// elsewhere).  A CBLR layer with a probe gradient (LayerRef::measures) sits at w_t + s:
// w is not read, Σw_t² is the known one (the shift's), and the pass sums the secant's
// (d(w_t) − d(w_t + s))² and s² from g_t, the probe gradient and s (layer_math.h,
// secant_difference).
void reduce_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, const ReductionOut& reduction);

// Pass 2: κ by rule from the reduction (or the lag stash), ratio and update; writes
// stats[L][STAT_COLUMNS] and, unless skip, the parameters, momentum buffers, prev steps,
// κ̄, age, the lag stash and, where LayerRef::next_w2 is set, Σw² of the result (equal to
// what pass 1 would sum).  Norms the reduction lacks are taken by this pass (read first
// where the ratio falls back or the step is skipped).  An MCLR layer that measures needs
// the reduction's median or a valid stash (the caller checks).  A shifted layer (CBLR
// probe) is updated from w_t in LayerRef::saved; when skip, the caller restores it
// (copy_layers).
void apply_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, const ReductionIn& reduction,
                  bool skip, float lr, double* stats);

// CBLR closure protocol.  Pointers are to n dense elements; parameters in the storage
// type, steps s_{t−1} and displacements in the math type.
struct ShiftLayer {
  DType dtype;
  int64_t n;
  void* param;
  const void* step;
  void* saved;
  void* displacement;
};

// dst[i] = src[i], bytes[i] bytes each.
void copy_layers(const std::vector<const void*>& src, const std::vector<void*>& dst,
                 const std::vector<int64_t>& bytes, int threads);
// saved = param; param += step rounded to the parameter's storage type; displacement =
// param − saved (realised_displacement); w_sq[i] = Σsaved² (one pass).
void shift_layers(const std::vector<ShiftLayer>& layers, int threads, double* w_sq);

// The sharded median's radix select (median_histogram.h): one layer's local shard (n
// dense elements, g read as g·g_unscale) and the key bits chosen so far.
struct HistogramLayer {
  DType dtype;
  int64_t n;
  const void* w;
  const void* g;
  float g_unscale;
  int64_t prefix;
};

// counts[L][2^width]: per layer, its keys (the fp32 bits of |d| / |w|; none where w = 0
// or the quotient is NaN) whose bits above shift + width equal the prefix's, by the
// width bits at shift; nans[L]: its NaN quotients where w ≠ 0.
void histogram_layers(const std::vector<HistogramLayer>& layers, int shift, int width, double weight_decay,
                      int threads, double* counts, double* nans);
// The same keys (those whose bits above top equal the prefix's), layer after layer:
// keys, and layer_counts[L] of them per layer.
void gather_layers(const std::vector<HistogramLayer>& layers, int top, double weight_decay, int threads,
                   std::vector<int32_t>& keys, int64_t* layer_counts);

// The Adam base (LAMB and the median rule on the Adam direction u, adam_passes.h).  One
// layer: n dense elements of w and g in the storage type, m and v in the math type,
// the step count (fp32, 0-d state).
struct AdamLayer {
  DType dtype = DType::F32;
  int64_t n = 0;
  void* w = nullptr;
  const void* g = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  float* step = nullptr;
  bool adapt = false;
  void* s = nullptr;  // where pass 2 keeps the moves α·u (CBLR's step, math type), or null
};

// Group hyperparameters of one Adam step; g is read as g·g_unscale, then ÷ clip (the
// global clipping divisor) where has_clip.
struct AdamConfig {
  Rule rule = RULE_LARS;
  float g_unscale = 1.0f;
  bool has_clip = false;
  float clip = 1.0f;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-6, weight_decay = 0;
  bool bias_correction = true;
  double trust_coefficient = 1;  // pass 2 only, as max_ratio
  bool has_max_ratio = false;
  double max_ratio = 0;
  int threads = 1;
  unsigned char* workspace = nullptr;  // MCLR scratch, as StepConfig's (4 or 8 bytes per element)
  int64_t workspace_bytes = 0;
};

// sums[i] = Σ(g·g_unscale)² of layer i (fp64; only dtype, n and g are read).
void grad_sq_layers(const std::vector<AdamLayer>& layers, float g_unscale, int threads, double* sums);

// Pass 1: Σw² (SUM_W2), Σu² (SUM_G2) of the direction u this step would take and, for
// MCLR, the lower median of |u_i|/|w_i| over w_i ≠ 0 (0 elsewhere); every flag but
// FLAG_MEDIAN (MCLR only) set, FLAG_NONFINITE where g holds a NaN or Inf.  Writes nothing
// else.
void adam_reduce_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const ReductionOut& reduction);

// Pass 2: the ratio and w ← w − γ·r·u with m, v written and the step count advanced;
// stats[L][STAT_COLUMNS] (STAT_G_NORM: ‖u‖).  Norms (and the median) the reduction lacks
// are taken first; when skip, nothing is written but the statistics.
void adam_apply_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const ReductionIn& reduction,
                       bool skip, float lr, double* stats);

// Pass 2 of CBLR on the Adam direction, each layer's α = γ·r given: w ← w − α·u with m, v
// and the moves s = α·u (AdamLayer::s) written and the step count advanced;
// step_norms[i] = ‖α_i·u‖.  When skip, nothing is written but step_norms (0).
void adam_secant_apply_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const double* alphas,
                              bool skip, double* step_norms);

}  // namespace cpu
}  // namespace cblr

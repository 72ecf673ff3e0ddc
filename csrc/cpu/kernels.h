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
  RatioParams ratio{};
  int threads = 1;
  // MCLR scratch (the caller's, kept between steps so its pages stay mapped): a pass
  // needs 4 (fp64: 8) bytes per element of the selecting layers, twice that under lag=1;
  // with less, the call allocates its own.
  unsigned char* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// The instruction-set variant of the passes in use: "baseline", "avx2" or "avx512".
const char* kernel_isa();

// Reduction columns (functional.RED_*) and statistics columns (functional.STAT_NAMES).
enum { RED_W_NORM, RED_G_NORM, RED_KAPPA, RED_MEASURED, RED_NONFINITE, RED_COLUMNS };
enum { STAT_W_NORM, STAT_G_NORM, STAT_STEP_NORM, STAT_KAPPA, STAT_RATIO, STAT_ALPHA, STAT_FALLBACK,
       STAT_COLUMNS };

// Pass 1: writes red[L][RED_COLUMNS].  Layers with a valid lag stash get only the
// non-finite check (their other columns are NaN).  A layer that reads w only for ‖w‖
// takes LayerRef::known_w_norm instead where it is known.  A CBLR layer with a probe
// gradient (LayerRef::measures) sits at w_t + s: w is not read, its ‖w_t‖ is the known
// norm (the shift's), and the pass measures ‖d(w_t) − d(w_t + s)‖ and ‖s‖ from g_t, the
// probe gradient and s (layer_math.h, secant_difference).
void reduce_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, float* red);

// Pass 2: ratio and update; writes stats[L][STAT_COLUMNS] and, unless skip, the
// parameters, momentum buffers, prev steps, κ̄, age, the lag stash and, where
// LayerRef::next_w_norm is set, ‖w‖ of the result (equal to what pass 1 would measure).
// A shifted layer (CBLR probe) is updated from w_t in LayerRef::saved; when skip, the
// caller restores it (copy_layers).
void apply_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, const float* red,
                  bool skip, float lr, float* stats);

// CBLR closure protocol.  Pointers are to n dense elements; parameters in the storage
// type, steps s_{t−1} in the math type.
struct ShiftLayer {
  DType dtype;
  int64_t n;
  void* param;
  const void* step;
  void* saved;
};

// dst[i] = src[i], bytes[i] bytes each.
void copy_layers(const std::vector<const void*>& src, const std::vector<void*>& dst,
                 const std::vector<int64_t>& bytes, int threads);
// saved = param; param += step rounded to the parameter's storage type; w_norms[i] =
// ‖saved‖ (one pass).
void shift_layers(const std::vector<ShiftLayer>& layers, int threads, float* w_norms);

}  // namespace cpu
}  // namespace cblr

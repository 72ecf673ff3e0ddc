// The public entry points of kernels.h: each forwards to the variant of the passes
// chosen once per process (dispatch.h).
#include "dispatch.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace cblr {
namespace cpu {
namespace {

// Whether this CPU (and OS) runs the variant's instructions; the targets in isa_*.cpp.
bool cpu_runs(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("f16c");
  if (!std::strcmp(isa, "avx2")) return avx2;
  if (!std::strcmp(isa, "avx512")) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }
#endif
  return !std::strcmp(isa, "baseline");
}

const KernelTable* choose() {
  const char* wanted = std::getenv("CBLR_EXT_CPU_ISA");
  const bool any = wanted == nullptr || *wanted == '\0';
  for (const KernelTable* table : {avx512_kernels(), avx2_kernels(), baseline_kernels()}) {
    if (table && cpu_runs(table->isa) && (any || !std::strcmp(wanted, table->isa))) return table;
  }
  throw std::runtime_error(std::string("cblr_ext: CBLR_EXT_CPU_ISA=") + wanted +
                           " is not compiled in or not supported by this CPU (baseline, avx2, avx512)");
}

const KernelTable& kernels() {
  static const KernelTable* table = choose();
  return *table;
}

}  // namespace

const char* kernel_isa() { return kernels().isa; }

void reduce_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, const ReductionOut& reduction) {
  kernels().reduce(cfg, layers, reduction);
}

void apply_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, const ReductionIn& reduction,
                  bool skip, float lr, double* stats) {
  kernels().apply(cfg, layers, reduction, skip, lr, stats);
}

void copy_layers(const std::vector<const void*>& src, const std::vector<void*>& dst,
                 const std::vector<int64_t>& bytes, int threads) {
  kernels().copy(src, dst, bytes, threads);
}

void shift_layers(const std::vector<ShiftLayer>& layers, int threads, double* w_sq) {
  kernels().shift(layers, threads, w_sq);
}

void histogram_layers(const std::vector<HistogramLayer>& layers, int shift, int width, double weight_decay,
                      int threads, double* counts, double* nans) {
  kernels().histogram(layers, shift, width, weight_decay, threads, counts, nans);
}

void grad_sq_layers(const std::vector<AdamLayer>& layers, float g_unscale, int threads, double* sums) {
  kernels().grad_sq(layers, g_unscale, threads, sums);
}

void adam_reduce_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const ReductionOut& reduction) {
  kernels().adam_reduce(cfg, layers, reduction);
}

void adam_apply_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const ReductionIn& reduction,
                       bool skip, float lr, double* stats) {
  kernels().adam_apply(cfg, layers, reduction, skip, lr, stats);
}

void adam_secant_apply_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const double* alphas,
                              bool skip, double* step_norms) {
  kernels().adam_secant_apply(cfg, layers, alphas, skip, step_norms);
}

void gather_layers(const std::vector<HistogramLayer>& layers, int top, double weight_decay, int threads,
                   std::vector<int32_t>& keys, int64_t* layer_counts) {
  kernels().gather(layers, top, weight_decay, threads, keys, layer_counts);
}

}  // namespace cpu
}  // namespace cblr

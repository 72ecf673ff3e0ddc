// The torch side of the CPU backend: the CPU kernels of the ops that cblr_ext/ops.py
// declares, their input checks (every check runs before anything is written), and the
// translation of tensor lists into the torch-free layer views of csrc/cpu/kernels.h.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "binding_checks.h"
#include "cpu/adam_secant.h"
#include "cpu/kernels.h"
#include "cpu/median_candidates.h"

namespace {

using at::Tensor;
using cblr::cpu::DType;
using cblr::cpu::LayerRef;
using cblr::binding::bump_versions;

constexpr cblr::binding::Checks kCheck{"cblr_ext cpp backend: "};
const at::Device kCpu(at::kCPU);

DType dtype_of(const Tensor& t, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: kCheck.unsupported_dtype(t, i, "float64, float32, float16 and bfloat16");
  }
}

at::ScalarType state_dtype(const Tensor& param) {
  return param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_param(const Tensor& param, size_t i) {
  kCheck.dense(param, kCpu, i);
  dtype_of(param, i);
}

// Bit-exact copies into whole tensors, run as one multi-tensor pass (copy_layers).
struct TensorCopies {
  std::vector<const void*> from;
  std::vector<void*> to;
  std::vector<int64_t> bytes;

  void add(const Tensor& dst, const void* src) {
    from.push_back(src);
    to.push_back(dst.data_ptr());
    bytes.push_back(dst.numel() * dst.element_size());
  }
  void run() const {
    if (!to.empty()) cblr::cpu::copy_layers(from, to, bytes, at::get_num_threads());
  }
};

cblr::cpu::StepConfig step_config(const std::string& rule, double weight_decay, int64_t curvature_interval,
                                  bool lag, bool approx_median) {
  cblr::cpu::StepConfig cfg;
  cfg.rule = kCheck.rule(rule);
  cfg.weight_decay = weight_decay;
  cfg.curvature_interval = curvature_interval;
  cfg.lag = lag;
  cfg.approx_median = approx_median;
  cfg.threads = at::get_num_threads();
  return cfg;
}

using OptionalTensors = c10::List<std::optional<Tensor>>;

// The caller's scratch for the median passes (a CPU uint8 tensor; empty: none).
void use_workspace(const Tensor& workspace, cblr::cpu::StepConfig& cfg) {
  TORCH_CHECK(workspace.device().is_cpu() && workspace.scalar_type() == at::kByte && workspace.is_contiguous(),
              kCheck.who, "the workspace must be a contiguous CPU uint8 tensor");
  cfg.workspace = workspace.data_ptr<uint8_t>();
  cfg.workspace_bytes = workspace.numel();
}

// GradScaler's fl32(1/S) (as GradScaler.unscale_ forms it), 1 without a scale.
float grad_unscale(const std::optional<Tensor>& grad_scale) {
  if (!grad_scale.has_value()) return 1.0f;
  kCheck.grad_scale(grad_scale, kCpu);
  return float(1.0 / double(grad_scale->item<float>()));
}

// A per-layer fp64 column ([layers]), or null.
double* layer_sums(const std::optional<Tensor>& sums, size_t layers, const char* what) {
  if (!sums.has_value()) return nullptr;
  kCheck.table(*sums, at::kDouble, {int64_t(layers)}, kCpu, what);
  return sums->data_ptr<double>();
}

// Entry i of an optional per-layer list (empty list: none), checked like a companion;
// false where there is none.
bool optional_companion(const OptionalTensors& list, size_t i, const Tensor& param, at::ScalarType dtype,
                        const char* what, const void*& data) {
  if (list.empty()) return false;
  const std::optional<Tensor> t = list.get(i);
  if (!t.has_value()) return false;
  kCheck.companion(param, *t, dtype, what, i);
  data = t->data_ptr();
  return true;
}

// Layer i's parameter, gradient (read as g·g_unscale), age and flags, checked: what both
// passes read.
LayerRef layer_inputs(at::TensorList params, at::TensorList grads, float g_unscale, at::TensorList ages,
                      const c10::List<bool>& adapt, const c10::List<bool>& lagged_valid, size_t i) {
  check_param(params[i], i);
  kCheck.companion(params[i], grads[i], params[i].scalar_type(), "gradient", i);
  kCheck.scalar_state(ages[i], at::kFloat, 1, kCpu, "age", i);
  LayerRef l;
  l.dtype = dtype_of(params[i], i);
  l.n = params[i].numel();
  l.w = params[i].data_ptr();
  l.g = grads[i].data_ptr();
  l.g_unscale = g_unscale;
  l.age = ages[i].data_ptr<float>();
  l.adapt = adapt.get(i);
  l.lagged_valid = lagged_valid.get(i);
  return l;
}

std::tuple<Tensor, Tensor, Tensor> layerwise_reduce(
    const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList ages, c10::List<bool> adapt,
    c10::List<bool> lagged_valid, const OptionalTensors& probe_grads, const OptionalTensors& probe_steps,
    const std::optional<Tensor>& w_sq, c10::List<bool> w_sq_known, const std::optional<Tensor>& grad_scale,
    double weight_decay, int64_t curvature_interval, bool lag, bool approx_median, bool check_nonfinite,
    const Tensor& workspace) {
  const size_t count = params.size();
  kCheck.reduce_counts(count, grads.size(), ages.size(), adapt.size(), lagged_valid.size(), probe_grads.size(),
                       probe_steps.size(), w_sq_known.size());
  cblr::cpu::StepConfig cfg = step_config(rule, weight_decay, curvature_interval, lag, approx_median);
  cfg.check_nonfinite = check_nonfinite;
  use_workspace(workspace, cfg);
  const double* known_w2 = layer_sums(w_sq, count, "w_sq");
  const float g_unscale = grad_unscale(grad_scale);
  std::vector<LayerRef> layers(count);
  for (size_t i = 0; i < count; ++i) {
    LayerRef& l = layers[i] = layer_inputs(params, grads, g_unscale, ages, adapt, lagged_valid, i);
    l.has_known_w2 = !w_sq_known.empty() && w_sq_known.get(i);
    TORCH_CHECK(!l.has_known_w2 || known_w2, kCheck.who, "w_sq_known[", i, "] is set but w_sq is None");
    if (l.has_known_w2) l.known_w2 = known_w2[i];
    l.measures = optional_companion(probe_grads, i, params[i], params[i].scalar_type(), "probe gradient", l.probe_g);
    const bool has_step = optional_companion(probe_steps, i, params[i], state_dtype(params[i]), "probe step", l.step);
    // The parameter sits at w_t + s: Σw_t² must come from the shift (w_sq).
    TORCH_CHECK(!l.measures || (has_step && l.has_known_w2), kCheck.who, "layer ", i,
                " has a probe gradient but no probe step or no known Σw_t² (w_sq with w_sq_known[", i, "])");
    TORCH_CHECK(!l.measures || cfg.rule == cblr::RULE_CBLR, kCheck.who, "only CBLR probes");
  }
  const int64_t rows = int64_t(count);
  Tensor sums = at::empty({rows, cblr::cpu::SUM_COLUMNS}, at::kDouble);
  Tensor median = at::empty({rows}, at::kFloat);
  Tensor flags = at::empty({rows, cblr::cpu::FLAG_COLUMNS}, at::kBool);
  cblr::cpu::reduce_layers(cfg, layers, {sums.data_ptr<double>(), median.data_ptr<float>(), flags.data_ptr<bool>()});
  return {sums, median, flags};
}

Tensor layerwise_update_(
    const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
    at::TensorList prev_steps, at::TensorList kappas, at::TensorList ages, at::TensorList lagged,
    c10::List<bool> lagged_valid, const OptionalTensors& saved, c10::List<bool> adapt, const Tensor& sums,
    const Tensor& median, const Tensor& flags, const Tensor& found_inf, const std::optional<Tensor>& grad_scale,
    const Tensor& lr, double momentum,
    bool nesterov, double weight_decay, double eps, double trust_coefficient, double curvature_ema,
    std::optional<double> max_ratio, double fallback_trust, int64_t curvature_interval, bool lag, bool approx_median,
    const Tensor& workspace, const std::optional<Tensor>& next_w_sq) {
  const size_t count = params.size();
  kCheck.update_counts(count, grads.size(), momentum_buffers.size(), prev_steps.size(), kappas.size(), ages.size(),
                       lagged.size(), lag, lagged_valid.size(), saved.size(), adapt.size());
  const int64_t rows = int64_t(count);
  kCheck.reduction(sums, median, flags, rows, cblr::cpu::SUM_COLUMNS, cblr::cpu::FLAG_COLUMNS, kCpu);
  TORCH_CHECK(found_inf.numel() == 1 && lr.numel() == 1, kCheck.who, "found_inf and lr are scalars");
  cblr::cpu::StepConfig cfg = step_config(rule, weight_decay, curvature_interval, lag, approx_median);
  cfg.momentum = momentum;
  cfg.nesterov = nesterov;
  use_workspace(workspace, cfg);
  double* next_w2 = layer_sums(next_w_sq, count, "next_w_sq");
  cfg.ratio = cblr::make_ratio_params(trust_coefficient, curvature_ema, max_ratio.has_value(),
                                      max_ratio.value_or(0.0), weight_decay, eps, fallback_trust);
  const cblr::cpu::ReductionIn reduction{sums.data_ptr<double>(), median.data_ptr<float>(), flags.data_ptr<bool>()};
  const float g_unscale = grad_unscale(grad_scale);
  std::vector<LayerRef> layers(count);
  for (size_t i = 0; i < count; ++i) {
    LayerRef& l = layers[i] = layer_inputs(params, grads, g_unscale, ages, adapt, lagged_valid, i);
    kCheck.scalar_state(kappas[i], at::kDouble, 1, kCpu, "kappa", i);
    l.kappa = kappas[i].data_ptr<double>();
    if (!momentum_buffers.empty()) {
      kCheck.companion(params[i], momentum_buffers[i], state_dtype(params[i]), "momentum buffer", i);
      l.v = momentum_buffers[i].data_ptr();
    }
    if (!prev_steps.empty()) {
      kCheck.companion(params[i], prev_steps[i], state_dtype(params[i]), "previous step", i);
      l.prev = prev_steps[i].data_ptr();
    }
    if (lag) {
      kCheck.scalar_state(lagged[i], at::kDouble, 3, kCpu, "lag stash", i);
      l.lagged = lagged[i].data_ptr<double>();
    }
    if (next_w2) l.next_w2 = next_w2 + i;
    l.shifted = optional_companion(saved, i, params[i], params[i].scalar_type(), "saved parameter", l.saved);
    TORCH_CHECK(!l.shifted || cfg.rule == cblr::RULE_CBLR, kCheck.who, "only CBLR probes");
    // The update takes missing norms itself, not a missing median (pass 1 selects it).
    const bool* row = reduction.flags + i * cblr::cpu::FLAG_COLUMNS;
    TORCH_CHECK(cfg.rule != cblr::RULE_MCLR || !row[cblr::cpu::FLAG_MEASURED] || row[cblr::cpu::FLAG_MEDIAN] ||
                    (lag && l.lagged_valid),
                kCheck.who, "MCLR layer ", i, " measures, but the reduction has no median for it "
                "(FLAG_MEDIAN) and it has no valid lag stash");
  }
  // A skipped step writes nothing but the restore of the shifted parameters to w_t.
  const bool skip = found_inf.item<bool>();
  TensorCopies restores;
  if (!skip) {
    for (at::TensorList written : {params, momentum_buffers, prev_steps, kappas, ages, lagged}) bump_versions(written);
  } else {
    for (size_t i = 0; i < count; ++i) {
      if (!layers[i].shifted) continue;
      bump_versions(params[i]);
      restores.add(params[i], layers[i].saved);
    }
  }
  Tensor stats = at::empty({rows, cblr::cpu::STAT_COLUMNS}, at::kDouble);
  cblr::cpu::apply_layers(cfg, layers, reduction, skip, lr.item<float>(), stats.data_ptr<double>());
  restores.run();
  return stats;
}

// saved ← w, w ← w + s, displacements ← the realised w + s − w; returns Σw_t² per layer
// (fp64: layerwise_reduce's w_sq).
Tensor probe_shift_(at::TensorList params, at::TensorList steps, at::TensorList saved,
                    at::TensorList displacements) {
  kCheck.probe_shift_counts(params.size(), steps.size(), saved.size(), displacements.size());
  std::vector<cblr::cpu::ShiftLayer> layers;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(params[i], i);
    kCheck.companion(params[i], steps[i], state_dtype(params[i]), "step", i);
    kCheck.companion(params[i], saved[i], params[i].scalar_type(), "save buffer", i);
    kCheck.companion(params[i], displacements[i], state_dtype(params[i]), "displacement", i);
    layers.push_back({dtype_of(params[i], i), params[i].numel(), params[i].data_ptr(), steps[i].data_ptr(),
                      saved[i].data_ptr(), displacements[i].data_ptr()});
  }
  bump_versions(params);
  bump_versions(saved);
  bump_versions(displacements);
  Tensor w_sq = at::empty({int64_t(params.size())}, at::kDouble);
  cblr::cpu::shift_layers(layers, at::get_num_threads(), w_sq.data_ptr<double>());
  return w_sq;
}

void probe_restore_(at::TensorList params, at::TensorList saved) {
  kCheck.count(saved.size(), params.size(), "saved parameters", false);
  TensorCopies copies;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(params[i], i);
    kCheck.companion(params[i], saved[i], params[i].scalar_type(), "saved parameter", i);
    copies.add(params[i], saved[i].data_ptr());
  }
  bump_versions(params);
  copies.run();
}

std::string cpu_isa() { return cblr::cpu::kernel_isa(); }

}  // namespace

// The ops and their schemas are declared once, in cblr_ext/ops.py (SCHEMAS): this file
// registers kernels only.
TORCH_LIBRARY_IMPL(cblr_ext, CPU, m) {
  m.impl("layerwise_reduce", &layerwise_reduce);
  m.impl("layerwise_update_", &layerwise_update_);
  m.impl("probe_shift_", &probe_shift_);
  m.impl("probe_restore_", &probe_restore_);
}

// No tensor arguments: registered for every dispatch key.
TORCH_LIBRARY_IMPL(cblr_ext, CompositeExplicitAutograd, m) { m.impl("cpu_isa", &cpu_isa); }

// The sharded median's radix select: one round's counts, and the keys still candidates
// (cblr_ext/distributed.py).
namespace {

std::vector<cblr::cpu::HistogramLayer> histogram_inputs(at::TensorList params, at::TensorList grads,
                                                        const std::optional<Tensor>& grad_scale, const Tensor& prefix) {
  const size_t count = params.size();
  kCheck.count(grads.size(), count, "gradients", false);
  kCheck.table(prefix, at::kLong, {int64_t(count)}, kCpu, "the prefixes");
  const float g_unscale = grad_unscale(grad_scale);
  const int64_t* prefixes = prefix.data_ptr<int64_t>();
  std::vector<cblr::cpu::HistogramLayer> layers(count);
  for (size_t i = 0; i < count; ++i) {
    check_param(params[i], i);
    kCheck.companion(params[i], grads[i], params[i].scalar_type(), "gradient", i);
    TORCH_CHECK(prefixes[i] >= 0, kCheck.who, "the prefix of layer ", i, " is negative");
    layers[i] = {dtype_of(params[i], i), params[i].numel(), params[i].data_ptr(), grads[i].data_ptr(), g_unscale,
                 prefixes[i]};
  }
  return layers;
}

std::tuple<Tensor, Tensor> median_histogram(at::TensorList params, at::TensorList grads,
                                            const std::optional<Tensor>& grad_scale, double weight_decay,
                                            const Tensor& prefix, int64_t shift, int64_t width) {
  TORCH_CHECK(shift >= 0 && width >= 1 && width <= 16 && shift + width <= 31,
              kCheck.who, "a round counts 1 to 16 key bits below bit 31 (got shift ", shift, ", width ",
              width, ")");
  const auto layers = histogram_inputs(params, grads, grad_scale, prefix);
  Tensor counts = at::empty({int64_t(layers.size()), int64_t(1) << width}, at::kDouble);
  Tensor nans = at::empty({int64_t(layers.size())}, at::kDouble);
  cblr::cpu::histogram_layers(layers, int(shift), int(width), weight_decay, at::get_num_threads(),
                              counts.data_ptr<double>(), nans.data_ptr<double>());
  return {counts, nans};
}

std::tuple<Tensor, Tensor> median_candidates(at::TensorList params, at::TensorList grads,
                                             const std::optional<Tensor>& grad_scale, double weight_decay,
                                             const Tensor& prefix, int64_t top) {
  TORCH_CHECK(top >= 0 && top <= 31, kCheck.who, "the prefix's lowest bit lies in 0 to 31 (got ", top, ")");
  const auto layers = histogram_inputs(params, grads, grad_scale, prefix);
  std::vector<int32_t> gathered;
  Tensor layer_counts = at::empty({int64_t(layers.size())}, at::kLong);
  cblr::cpu::gather_layers(layers, int(top), weight_decay, at::get_num_threads(), gathered,
                           layer_counts.data_ptr<int64_t>());
  Tensor keys = at::empty({int64_t(gathered.size())}, at::kInt);
  std::copy(gathered.begin(), gathered.end(), keys.data_ptr<int32_t>());
  return {keys, layer_counts};
}

Tensor median_candidate_histogram(const Tensor& keys, const Tensor& layer_counts, const Tensor& prefix, int64_t shift,
                                  int64_t width) {
  TORCH_CHECK(shift >= 0 && width >= 1 && width <= 16 && shift + width <= 31,
              kCheck.who, "a round counts 1 to 16 key bits below bit 31 (got shift ", shift, ", width ",
              width, ")");
  const int64_t count = prefix.numel();
  kCheck.table(prefix, at::kLong, {count}, kCpu, "the prefixes");
  kCheck.table(layer_counts, at::kLong, {count}, kCpu, "the candidates per layer");
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kInt && keys.is_contiguous() && keys.device() == kCpu,
              kCheck.who, "the candidate keys must be one dense int32 CPU vector");
  const int64_t* per_layer = layer_counts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(per_layer[i] >= 0, kCheck.who, "layer ", i, " has a negative number of candidates");
    total += per_layer[i];
  }
  TORCH_CHECK(total == keys.numel(), kCheck.who, "the layers hold ", total, " candidates, the keys ", keys.numel());
  Tensor counts = at::empty({count, int64_t(1) << width}, at::kDouble);
  cblr::cpu::count_candidates(keys.data_ptr<int32_t>(), per_layer, prefix.data_ptr<int64_t>(), count, int(shift),
                              int(width), counts.data_ptr<double>());
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(cblr_ext, CPU, m) {
  m.impl("median_histogram", &median_histogram);
  m.impl("median_candidates", &median_candidates);
  m.impl("median_candidate_histogram", &median_candidate_histogram);
}

// The Adam base's ops (LAMB): Σg² for the global clipping, and the two passes.
namespace {

// The clip divisor (one fp32 element on the CPU), or none.
void use_clip(const std::optional<Tensor>& clip, cblr::cpu::AdamConfig& cfg) {
  if (!clip.has_value()) return;
  TORCH_CHECK(clip->device().is_cpu() && clip->numel() == 1 && clip->scalar_type() == at::kFloat, kCheck.who,
              "clip must be a one-element fp32 tensor on cpu (got ", clip->scalar_type(), " of shape ",
              clip->sizes(), " on ", clip->device(), ")");
  cfg.has_clip = true;
  cfg.clip = clip->item<float>();
}

// What the element math of every Adam op reads (the ratio's hyperparameters aside).
cblr::cpu::AdamConfig adam_math_config(const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip,
                                       double beta1, double beta2, double eps, double weight_decay,
                                       bool bias_correction) {
  cblr::cpu::AdamConfig cfg;
  cfg.g_unscale = grad_unscale(grad_scale);
  use_clip(clip, cfg);
  cfg.beta1 = beta1;
  cfg.beta2 = beta2;
  cfg.eps = eps;
  cfg.weight_decay = weight_decay;
  cfg.bias_correction = bias_correction;
  cfg.threads = at::get_num_threads();
  return cfg;
}

cblr::cpu::AdamConfig adam_config(const std::string& rule, const std::optional<Tensor>& grad_scale,
                                  const std::optional<Tensor>& clip, double beta1, double beta2, double eps,
                                  double weight_decay, bool bias_correction) {
  const cblr::Rule rule_id = kCheck.rule(rule);
  TORCH_CHECK(rule_id != cblr::RULE_CBLR, kCheck.who, "the Adam base runs the rules lars and mclr (got 'cblr')");
  cblr::cpu::AdamConfig cfg = adam_math_config(grad_scale, clip, beta1, beta2, eps, weight_decay, bias_correction);
  cfg.rule = rule_id;
  return cfg;
}

// Layer i of an Adam op, checked: w, g, m and v (the moments in the state dtype) and the step count.
cblr::cpu::AdamLayer adam_layer(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList steps, size_t i) {
  check_param(params[i], i);
  kCheck.companion(params[i], grads[i], params[i].scalar_type(), "gradient", i);
  kCheck.companion(params[i], exp_avgs[i], state_dtype(params[i]), "exp_avg", i);
  kCheck.companion(params[i], exp_avg_sqs[i], state_dtype(params[i]), "exp_avg_sq", i);
  kCheck.scalar_state(steps[i], at::kFloat, 1, kCpu, "step", i);
  cblr::cpu::AdamLayer l;
  l.dtype = dtype_of(params[i], i);
  l.n = params[i].numel();
  l.w = params[i].data_ptr();
  l.g = grads[i].data_ptr();
  l.m = exp_avgs[i].data_ptr();
  l.v = exp_avg_sqs[i].data_ptr();
  l.step = steps[i].data_ptr<float>();
  return l;
}

std::vector<cblr::cpu::AdamLayer> adam_layers(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                              at::TensorList exp_avg_sqs, at::TensorList steps) {
  const size_t count = params.size();
  kCheck.count(grads.size(), count, "gradients", false);
  kCheck.count(exp_avgs.size(), count, "exp_avgs", false);
  kCheck.count(exp_avg_sqs.size(), count, "exp_avg_sqs", false);
  kCheck.count(steps.size(), count, "steps", false);
  std::vector<cblr::cpu::AdamLayer> layers(count);
  for (size_t i = 0; i < count; ++i) layers[i] = adam_layer(params, grads, exp_avgs, exp_avg_sqs, steps, i);
  return layers;
}

// An Adam op's checked inputs: the group's configuration and its layers.
struct AdamInputs {
  cblr::cpu::AdamConfig cfg;
  std::vector<cblr::cpu::AdamLayer> layers;
};

AdamInputs adam_inputs(const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList steps, const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& clip, double beta1, double beta2, double eps, double weight_decay,
                       bool bias_correction) {
  return {adam_config(rule, grad_scale, clip, beta1, beta2, eps, weight_decay, bias_correction),
          adam_layers(params, grads, exp_avgs, exp_avg_sqs, steps)};
}

Tensor grad_sq_sums(at::TensorList grads, const std::optional<Tensor>& grad_scale) {
  const float g_unscale = grad_unscale(grad_scale);
  std::vector<cblr::cpu::AdamLayer> layers(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_param(grads[i], i);
    layers[i].dtype = dtype_of(grads[i], i);
    layers[i].n = grads[i].numel();
    layers[i].g = grads[i].data_ptr();
  }
  Tensor sums = at::empty({int64_t(grads.size())}, at::kDouble);
  cblr::cpu::grad_sq_layers(layers, g_unscale, at::get_num_threads(), sums.data_ptr<double>());
  return sums;
}

std::tuple<Tensor, Tensor, Tensor> adam_reduce(const std::string& rule, at::TensorList params, at::TensorList grads,
                                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                               at::TensorList steps, const std::optional<Tensor>& grad_scale,
                                               const std::optional<Tensor>& clip, double beta1, double beta2,
                                               double eps, double weight_decay, bool bias_correction) {
  const auto [cfg, layers] = adam_inputs(rule, params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, clip, beta1,
                                         beta2, eps, weight_decay, bias_correction);
  const int64_t rows = int64_t(layers.size());
  Tensor sums = at::empty({rows, cblr::cpu::SUM_COLUMNS}, at::kDouble);
  Tensor median = at::empty({rows}, at::kFloat);
  Tensor flags = at::empty({rows, cblr::cpu::FLAG_COLUMNS}, at::kBool);
  cblr::cpu::adam_reduce_layers(cfg, layers, {sums.data_ptr<double>(), median.data_ptr<float>(),
                                              flags.data_ptr<bool>()});
  return {sums, median, flags};
}

Tensor adam_update_(const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, c10::List<bool> adapt, const Tensor& sums,
                    const Tensor& median, const Tensor& flags, const Tensor& found_inf,
                    const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip, const Tensor& lr,
                    double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
                    double trust_coefficient, std::optional<double> max_ratio) {
  auto [cfg, layers] = adam_inputs(rule, params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, clip, beta1, beta2,
                                   eps, weight_decay, bias_correction);
  cfg.trust_coefficient = trust_coefficient;
  cfg.has_max_ratio = max_ratio.has_value();
  cfg.max_ratio = max_ratio.value_or(0.0);
  kCheck.count(adapt.size(), layers.size(), "adapt flags", false);
  for (size_t i = 0; i < layers.size(); ++i) layers[i].adapt = adapt.get(i);
  const int64_t rows = int64_t(layers.size());
  kCheck.reduction(sums, median, flags, rows, cblr::cpu::SUM_COLUMNS, cblr::cpu::FLAG_COLUMNS, kCpu);
  TORCH_CHECK(found_inf.numel() == 1 && lr.numel() == 1 && found_inf.device().is_cpu() && lr.device().is_cpu(),
              kCheck.who, "found_inf and lr are one-element CPU tensors");
  const bool skip = found_inf.item<bool>();
  if (!skip) {
    for (at::TensorList written : {params, exp_avgs, exp_avg_sqs, steps}) bump_versions(written);
  }
  Tensor stats = at::empty({rows, cblr::cpu::STAT_COLUMNS}, at::kDouble);
  cblr::cpu::adam_apply_layers(cfg, layers, {sums.data_ptr<double>(), median.data_ptr<float>(),
                                             flags.data_ptr<bool>()},
                               skip, lr.item<float>(), stats.data_ptr<double>());
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(cblr_ext, CPU, m) {
  m.impl("grad_sq_sums", &grad_sq_sums);
  m.impl("adam_reduce", &adam_reduce);
  m.impl("adam_update_", &adam_update_);
}

// CBLR on the Adam direction: the secant's sums (csrc/cpu/adam_secant.h) and its pass 2.
namespace {

// A layer's gradient in its math type: 16-bit ones converted to fp32 (kept alive in `converted`).
const void* secant_grad(const Tensor& grad, std::vector<Tensor>& converted) {
  if (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble) return grad.data_ptr();
  converted.push_back(grad.to(at::kFloat));
  return converted.back().data_ptr();
}

Tensor adam_secant_sums(at::TensorList params, at::TensorList grads, at::TensorList probe_grads,
                        at::TensorList probe_steps, at::TensorList exp_avg_sqs, at::TensorList steps,
                        const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip, double beta2,
                        double eps, bool bias_correction) {
  const size_t count = params.size();
  kCheck.count(grads.size(), count, "gradients", false);
  kCheck.count(probe_grads.size(), count, "probe gradients", false);
  kCheck.count(probe_steps.size(), count, "probe steps", false);
  kCheck.count(exp_avg_sqs.size(), count, "exp_avg_sqs", false);
  kCheck.count(steps.size(), count, "steps", false);
  for (size_t i = 0; i < count; ++i) {
    check_param(params[i], i);
    kCheck.companion(params[i], grads[i], params[i].scalar_type(), "gradient", i);
    kCheck.companion(params[i], probe_grads[i], params[i].scalar_type(), "probe gradient", i);
    kCheck.companion(params[i], probe_steps[i], state_dtype(params[i]), "probe step", i);
    kCheck.companion(params[i], exp_avg_sqs[i], state_dtype(params[i]), "exp_avg_sq", i);
    kCheck.scalar_state(steps[i], at::kFloat, 1, kCpu, "step", i);
  }
  // β1 and λ: not read by the secant.
  const cblr::cpu::AdamConfig cfg = adam_math_config(grad_scale, clip, 0.0, beta2, eps, 0.0, bias_correction);
  std::vector<Tensor> converted;
  std::vector<cblr::cpu::SecantLayer> layers(count);
  for (size_t i = 0; i < count; ++i) {
    cblr::cpu::SecantLayer& l = layers[i];
    l.wide = params[i].scalar_type() == at::kDouble;
    l.n = params[i].numel();
    l.g = secant_grad(grads[i], converted);
    l.g_s = secant_grad(probe_grads[i], converted);
    l.s = probe_steps[i].data_ptr();
    l.v = exp_avg_sqs[i].data_ptr();
    l.step = *steps[i].data_ptr<float>();
  }
  Tensor sums = at::empty({int64_t(count), 2}, at::kDouble);
  cblr::cpu::secant_sums_layers(cfg, layers, sums.data_ptr<double>());
  return sums;
}

// Its pass 2, the Adam base's update (adam_passes.h) with each layer's α given and the
// moves s = α·u written into prev_steps; nothing is written when found_inf.
Tensor adam_secant_update_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList prev_steps,
                           const Tensor& alpha, const Tensor& found_inf, const std::optional<Tensor>& grad_scale,
                           const std::optional<Tensor>& clip, double beta1, double beta2, double eps,
                           double weight_decay, bool bias_correction) {
  const cblr::cpu::AdamConfig cfg =
      adam_math_config(grad_scale, clip, beta1, beta2, eps, weight_decay, bias_correction);
  std::vector<cblr::cpu::AdamLayer> layers = adam_layers(params, grads, exp_avgs, exp_avg_sqs, steps);
  kCheck.count(prev_steps.size(), layers.size(), "previous steps", false);
  for (size_t i = 0; i < layers.size(); ++i) {
    kCheck.companion(params[i], prev_steps[i], state_dtype(params[i]), "previous step", i);
    layers[i].s = prev_steps[i].data_ptr();
  }
  const int64_t rows = int64_t(layers.size());
  kCheck.table(alpha, at::kDouble, {rows}, kCpu, "alpha");
  TORCH_CHECK(found_inf.numel() == 1 && found_inf.device().is_cpu(), kCheck.who,
              "found_inf is a one-element CPU tensor");
  const bool skip = found_inf.item<bool>();
  if (!skip) {
    for (at::TensorList written : {params, exp_avgs, exp_avg_sqs, steps, prev_steps}) bump_versions(written);
  }
  Tensor step_norms = at::empty({rows}, at::kDouble);
  cblr::cpu::adam_secant_apply_layers(cfg, layers, alpha.data_ptr<double>(), skip, step_norms.data_ptr<double>());
  return step_norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(cblr_ext, CPU, m) {
  m.impl("adam_secant_sums", &adam_secant_sums);
  m.impl("adam_secant_update_", &adam_secant_update_);
}

// An empty Python module, so that the setup.py build imports as ``cblr_ext._C``
// (importing it registers the kernels above).
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

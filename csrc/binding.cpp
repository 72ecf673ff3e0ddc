// The torch side of the CPU backend: op schemas (declared once, here), input checks
// (every check runs before anything is written), and the translation of tensor
// lists into the torch-free layer views of csrc/cpu/kernels.h.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace {

using at::Tensor;
using cblr::cpu::DType;
using cblr::cpu::LayerRef;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "cblr_ext cpp backend: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType state_dtype(const Tensor& param) {
  return param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

cblr::Rule rule_of(const std::string& rule) {
  if (rule == "lars") return cblr::RULE_LARS;
  if (rule == "mclr") return cblr::RULE_MCLR;
  TORCH_CHECK(rule == "cblr", "cblr_ext cpp backend: unknown rule '", rule, "'");
  return cblr::RULE_CBLR;
}

// The same elements in the same memory order: equal sizes, and equal strides wherever a
// dimension has more than one element (autograd gives gradients any stride there).
bool same_order(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// `other` may be read as flat memory alongside `param` (dense): same device, elements and
// memory order, and dense too.
void check_companion(const Tensor& param, const Tensor& other, at::ScalarType dtype, const char* what,
                     size_t i) {
  TORCH_CHECK(other.device() == param.device(), "cblr_ext cpp backend: ", what, " of layer ", i,
              " is on ", other.device(), ", its parameter on ", param.device());
  TORCH_CHECK(other.scalar_type() == dtype, "cblr_ext cpp backend: ", what, " of layer ", i, " has dtype ",
              other.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(same_order(other, param) && other.is_non_overlapping_and_dense(), "cblr_ext cpp backend: ", what,
              " of layer ", i, " must have its parameter's shape and memory layout");
}

void check_param(const Tensor& param, size_t i) {
  TORCH_CHECK(param.device().is_cpu(), "cblr_ext cpp backend: layer ", i, " is on ", param.device());
  dtype_of(param);
  TORCH_CHECK(param.is_non_overlapping_and_dense(), "cblr_ext cpp backend: layer ", i,
              " is not dense (a view with gaps or overlaps); pass a dense parameter");
}

void check_scalar_state(const Tensor& t, int64_t numel, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == numel && t.is_contiguous(),
              "cblr_ext cpp backend: ", what, " of layer ", i, " must be a contiguous CPU fp32 tensor of ",
              numel, " element(s)");
}

void check_count(size_t got, size_t layers, const char* what, bool optional) {
  TORCH_CHECK(got == layers || (optional && got == 0), "cblr_ext cpp backend: ", layers, " layers but ", got,
              " ", what);
}

// A write by these ops is an in-place update to torch: bump the written tensors' version
// counters, as torch's own in-place ops do (autograd's checks of saved tensors and the cpp
// backend's carried ‖w‖ rely on them).  Called before the kernels write, so that a tensor
// whose counter cannot move (an inference tensor outside inference mode) fails first.
void bump_versions(at::TensorList tensors) {
  for (const Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
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

cblr::cpu::StepConfig step_config(const std::string& rule, double weight_decay, double eps,
                                  int64_t curvature_interval, bool lag, bool approx_median) {
  cblr::cpu::StepConfig cfg;
  cfg.rule = rule_of(rule);
  cfg.weight_decay = weight_decay;
  cfg.curvature_interval = curvature_interval;
  cfg.lag = lag;
  cfg.approx_median = approx_median;
  cfg.ratio.weight_decay = float(weight_decay);
  cfg.ratio.eps = float(eps);
  cfg.threads = at::get_num_threads();
  return cfg;
}

using OptionalTensors = c10::List<std::optional<Tensor>>;

// The caller's scratch for the median passes (a CPU uint8 tensor), if any.
void use_workspace(const std::optional<Tensor>& workspace, cblr::cpu::StepConfig& cfg) {
  if (!workspace.has_value()) return;
  TORCH_CHECK(workspace->device().is_cpu() && workspace->scalar_type() == at::kByte && workspace->is_contiguous(),
              "cblr_ext cpp backend: the workspace must be a contiguous CPU uint8 tensor");
  cfg.workspace = workspace->data_ptr<uint8_t>();
  cfg.workspace_bytes = workspace->numel();
}

// A per-layer fp32 column ([layers] contiguous CPU), or null.
float* layer_norms(const std::optional<Tensor>& norms, size_t layers, const char* what) {
  if (!norms.has_value()) return nullptr;
  TORCH_CHECK(norms->device().is_cpu() && norms->scalar_type() == at::kFloat && norms->is_contiguous() &&
                  norms->dim() == 1 && norms->size(0) == int64_t(layers),
              "cblr_ext cpp backend: ", what, " must be a contiguous CPU fp32 tensor of ", layers, " elements");
  return norms->data_ptr<float>();
}

// Entry i of an optional per-layer list (empty list: none), checked like a companion;
// false where there is none.
bool optional_companion(const OptionalTensors& list, size_t i, const Tensor& param, at::ScalarType dtype,
                        const char* what, const void*& data) {
  if (list.empty()) return false;
  const std::optional<Tensor> t = list.get(i);
  if (!t.has_value()) return false;
  check_companion(param, *t, dtype, what, i);
  data = t->data_ptr();
  return true;
}

// Layer i's parameter, gradient, age and flags, checked: what both passes read.
LayerRef layer_inputs(at::TensorList params, at::TensorList grads, at::TensorList ages, const c10::List<bool>& adapt,
                      const c10::List<bool>& lagged_valid, size_t i) {
  check_param(params[i], i);
  check_companion(params[i], grads[i], params[i].scalar_type(), "gradient", i);
  check_scalar_state(ages[i], 1, "age", i);
  LayerRef l;
  l.dtype = dtype_of(params[i]);
  l.n = params[i].numel();
  l.w = params[i].data_ptr();
  l.g = grads[i].data_ptr();
  l.age = ages[i].data_ptr<float>();
  l.adapt = adapt.get(i);
  l.lagged_valid = lagged_valid.get(i);
  return l;
}

Tensor reduce(const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList ages,
              c10::List<bool> adapt, c10::List<bool> lagged_valid, const OptionalTensors& probe_grads, const OptionalTensors& steps, double weight_decay, double eps,
              int64_t curvature_interval, bool lag, bool approx_median, bool check_nonfinite,
              const std::optional<Tensor>& workspace, const std::optional<Tensor>& w_norms) {
  const size_t count = params.size();
  check_count(grads.size(), count, "gradients", false);
  check_count(ages.size(), count, "ages", false);
  check_count(adapt.size(), count, "adapt flags", false);
  check_count(lagged_valid.size(), count, "lag flags", false);
  check_count(probe_grads.size(), count, "probe gradients", true);
  check_count(steps.size(), count, "steps", true);
  cblr::cpu::StepConfig cfg = step_config(rule, weight_decay, eps, curvature_interval, lag, approx_median);
  cfg.check_nonfinite = check_nonfinite;
  use_workspace(workspace, cfg);
  const float* known_w_norms = layer_norms(w_norms, count, "w_norms");
  std::vector<LayerRef> layers(count);
  for (size_t i = 0; i < count; ++i) {
    LayerRef& l = layers[i] = layer_inputs(params, grads, ages, adapt, lagged_valid, i);
    l.measures = optional_companion(probe_grads, i, params[i], params[i].scalar_type(), "probe gradient", l.probe_g);
    const bool has_step = optional_companion(steps, i, params[i], state_dtype(params[i]), "step", l.step);
    // The parameter sits at w_t + s: ‖w_t‖ must come from the shift (w_norms).
    TORCH_CHECK(!l.measures || (has_step && known_w_norms), "cblr_ext cpp backend: layer ", i,
                " has a probe gradient but no step or no ‖w_t‖ (w_norms)");
    TORCH_CHECK(!l.measures || cfg.rule == cblr::RULE_CBLR, "cblr_ext cpp backend: only CBLR probes");
    if (known_w_norms) l.known_w_norm = known_w_norms[i];
  }
  Tensor red = at::empty({int64_t(count), cblr::cpu::RED_COLUMNS}, at::kFloat);
  cblr::cpu::reduce_layers(cfg, layers, red.data_ptr<float>());
  return red;
}

Tensor apply(const std::string& rule, at::TensorList params, at::TensorList grads,
             at::TensorList momentum_buffers, at::TensorList prev_steps, at::TensorList kappas,
             at::TensorList ages, at::TensorList lagged, const OptionalTensors& saved, c10::List<bool> adapt,
             c10::List<bool> lagged_valid, const Tensor& red, const Tensor& found_inf, const Tensor& lr, double momentum, bool nesterov,
             double weight_decay, double eps, double trust_coefficient, double curvature_ema,
             std::optional<double> max_ratio, double fallback_trust, int64_t curvature_interval, bool lag,
             bool approx_median, const std::optional<Tensor>& workspace, const std::optional<Tensor>& next_w_norms) {
  const size_t count = params.size();
  check_count(grads.size(), count, "gradients", false);
  check_count(momentum_buffers.size(), count, "momentum buffers", true);
  check_count(prev_steps.size(), count, "previous steps", true);
  check_count(kappas.size(), count, "kappas", false);
  check_count(ages.size(), count, "ages", false);
  check_count(lagged.size(), count, "lag stashes", !lag);
  check_count(saved.size(), count, "saved parameters", true);
  check_count(adapt.size(), count, "adapt flags", false);
  check_count(lagged_valid.size(), count, "lag flags", false);
  TORCH_CHECK(red.device().is_cpu() && red.scalar_type() == at::kFloat && red.is_contiguous() &&
                  red.dim() == 2 && red.size(0) == int64_t(count) && red.size(1) == cblr::cpu::RED_COLUMNS,
              "cblr_ext cpp backend: red must be a contiguous fp32 [layers, 5] CPU tensor");
  TORCH_CHECK(found_inf.numel() == 1 && lr.numel() == 1, "cblr_ext cpp backend: found_inf and lr are scalars");
  cblr::cpu::StepConfig cfg = step_config(rule, weight_decay, eps, curvature_interval, lag, approx_median);
  cfg.momentum = momentum;
  cfg.nesterov = nesterov;
  use_workspace(workspace, cfg);
  float* next_norms = layer_norms(next_w_norms, count, "next_w_norms");
  cfg.ratio = cblr::make_ratio_params(trust_coefficient, curvature_ema, max_ratio.has_value(),
                                      max_ratio.value_or(0.0), weight_decay, eps, fallback_trust);
  std::vector<LayerRef> layers(count);
  for (size_t i = 0; i < count; ++i) {
    LayerRef& l = layers[i] = layer_inputs(params, grads, ages, adapt, lagged_valid, i);
    check_scalar_state(kappas[i], 1, "kappa", i);
    l.kappa = kappas[i].data_ptr<float>();
    if (!momentum_buffers.empty()) {
      check_companion(params[i], momentum_buffers[i], state_dtype(params[i]), "momentum buffer", i);
      l.v = momentum_buffers[i].data_ptr();
    }
    if (!prev_steps.empty()) {
      check_companion(params[i], prev_steps[i], state_dtype(params[i]), "previous step", i);
      l.prev = prev_steps[i].data_ptr();
    }
    if (lag) {
      check_scalar_state(lagged[i], 3, "lag stash", i);
      l.lagged = lagged[i].data_ptr<float>();
    }
    if (next_norms) l.next_w_norm = next_norms + i;
    l.shifted = optional_companion(saved, i, params[i], params[i].scalar_type(), "saved parameter", l.saved);
    TORCH_CHECK(!l.shifted || cfg.rule == cblr::RULE_CBLR, "cblr_ext cpp backend: only CBLR probes");
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
  Tensor stats = at::empty({int64_t(count), cblr::cpu::STAT_COLUMNS}, at::kFloat);
  cblr::cpu::apply_layers(cfg, layers, red.data_ptr<float>(), skip, lr.item<float>(), stats.data_ptr<float>());
  restores.run();
  return stats;
}

void restore(at::TensorList dst, at::TensorList src) {
  check_count(src.size(), dst.size(), "sources", false);
  TensorCopies copies;
  for (size_t i = 0; i < dst.size(); ++i) {
    check_param(dst[i], i);
    check_companion(dst[i], src[i], dst[i].scalar_type(), "source", i);
    copies.add(dst[i], src[i].data_ptr());
  }
  bump_versions(dst);
  copies.run();
}

Tensor shift(at::TensorList params, at::TensorList steps, at::TensorList saved) {
  check_count(steps.size(), params.size(), "steps", false);
  check_count(saved.size(), params.size(), "save buffers", false);
  std::vector<cblr::cpu::ShiftLayer> layers;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(params[i], i);
    check_companion(params[i], steps[i], state_dtype(params[i]), "step", i);
    check_companion(params[i], saved[i], params[i].scalar_type(), "save buffer", i);
    layers.push_back({dtype_of(params[i]), params[i].numel(), params[i].data_ptr(), steps[i].data_ptr(),
                      saved[i].data_ptr()});
  }
  bump_versions(params);
  bump_versions(saved);
  Tensor w_norms = at::empty({int64_t(params.size())}, at::kFloat);
  cblr::cpu::shift_layers(layers, at::get_num_threads(), w_norms.data_ptr<float>());
  return w_norms;
}

std::string cpu_isa() { return cblr::cpu::kernel_isa(); }

}  // namespace

TORCH_LIBRARY(cblr_ext, m) {
  m.def("reduce(str rule, Tensor[] params, Tensor[] grads, Tensor[] ages, bool[] adapt, bool[] lagged_valid, "
        "Tensor?[] probe_grads, Tensor?[] steps, float weight_decay, float eps, "
        "int curvature_interval, bool lag, bool approx_median, bool check_nonfinite=True, "
        "Tensor(z!)? workspace=None, Tensor? w_norms=None) -> Tensor");
  m.def("apply(str rule, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] prev_steps, Tensor(d!)[] kappas, Tensor(e!)[] ages, Tensor(f!)[] lagged, Tensor?[] saved, "
        "bool[] adapt, "
        "bool[] lagged_valid, Tensor red, Tensor found_inf, Tensor lr, float momentum, bool nesterov, "
        "float weight_decay, float eps, float trust_coefficient, float curvature_ema, float? max_ratio, "
        "float fallback_trust, int curvature_interval, bool lag, bool approx_median, Tensor(z!)? workspace=None, "
        "Tensor(y!)? next_w_norms=None) -> Tensor");
  m.def("restore(Tensor(a!)[] dst, Tensor[] src) -> ()");
  // Returns ‖w_t‖ per layer (for reduce's w_norms); apply updates from `saved`.
  m.def("shift(Tensor(a!)[] params, Tensor[] steps, Tensor(b!)[] saved) -> Tensor");
  m.def("cpu_isa() -> str");
}

TORCH_LIBRARY_IMPL(cblr_ext, CPU, m) {
  m.impl("reduce", &reduce);
  m.impl("apply", &apply);
  m.impl("restore", &restore);
  m.impl("shift", &shift);
}

// No tensor arguments: registered for every dispatch key.
TORCH_LIBRARY_IMPL(cblr_ext, CompositeExplicitAutograd, m) { m.impl("cpu_isa", &cpu_isa); }

// An empty Python module, so that the setup.py build imports as ``cblr_ext._C``
// (importing it registers the ops above).
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

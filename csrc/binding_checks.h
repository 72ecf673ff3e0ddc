// The input checks of the ops' torch-side bindings (csrc/binding.cpp for the CPU,
// csrc/cuda/binding.cpp for CUDA): one implementation, one wording.  Every message
// starts with the backend's name; every check runs before an op writes or launches.
//
// | check | what it asks of a tensor (list) |
// | --- | --- |
// | count | a per-layer list holds one entry per layer (or none, where optional) |
// | rule | "lars", "mclr" or "cblr" |
// | dense | a parameter on the op's device, dense (no gaps or overlaps) |
// | companion | a per-layer tensor beside its parameter: same device, dtype asked, shape and memory order |
// | scalar_state | a per-layer state scalar (age, κ̄, lag stash): contiguous, dtype and size asked, on the device |
// | table | a per-group table (reduction columns, Σw²): contiguous, dtype and shape asked, on the device |
// | grad_scale | GradScaler's scale: one fp32 element on the device |
// | unsupported_dtype | (the message for a parameter dtype the backend does not run) |
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

#include "layer_math.h"

namespace cblr::binding {

// The same elements in the same memory order: equal sizes, and equal strides wherever a
// dimension has more than one element (autograd gives gradients any stride there).
inline bool same_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// A write by these ops is an in-place update to torch: bump the written tensors' version
// counters, as torch's own in-place ops do (autograd's checks of saved tensors and the cpp
// backend's carried Σw² rely on them).  Called before the kernels write, so that a tensor
// whose counter cannot move (an inference tensor outside inference mode) fails first.
inline void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

struct Checks {
  const char* who;  // "cblr_ext cpp backend: "

  void count(size_t got, size_t layers, const char* what, bool optional) const {
    TORCH_CHECK(got == layers || (optional && got == 0), who, layers, " layers but ", got, " ", what);
  }

  Rule rule(const std::string& name) const {
    if (name == "lars") return RULE_LARS;
    if (name == "mclr") return RULE_MCLR;
    TORCH_CHECK(name == "cblr", who, "unknown rule '", name, "'");
    return RULE_CBLR;
  }

  [[noreturn]] void unsupported_dtype(const at::Tensor& param, size_t i, const char* supported) const {
    TORCH_CHECK(false, who, "layer ", i, " has dtype ", param.scalar_type(), "; supported are ", supported,
                " (use backend='reference' for others)");
  }

  void dense(const at::Tensor& param, const at::Device& device, size_t i) const {
    TORCH_CHECK(param.device() == device, who, "layer ", i, " is on ", param.device(), ", expected ", device);
    TORCH_CHECK(param.is_non_overlapping_and_dense(), who, "layer ", i,
                " is not dense (a view with gaps or overlaps); pass a dense parameter");
  }

  void companion(const at::Tensor& param, const at::Tensor& other, at::ScalarType dtype, const char* what,
                 size_t i) const {
    TORCH_CHECK(other.device() == param.device(), who, what, " of layer ", i, " is on ", other.device(),
                ", its parameter on ", param.device());
    TORCH_CHECK(other.scalar_type() == dtype, who, what, " of layer ", i, " has dtype ", other.scalar_type(),
                ", expected ", dtype);
    TORCH_CHECK(same_order(other, param) && other.is_non_overlapping_and_dense(), who, what, " of layer ", i,
                " must have its parameter's shape and memory layout");
  }

  void scalar_state(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Device& device,
                    const char* what, size_t i) const {
    TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.numel() == numel && t.is_contiguous(), who,
                what, " of layer ", i, " must be a contiguous ", dtype, " tensor of ", numel, " element(s) on ",
                device);
  }

  void table(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const at::Device& device,
             const char* what) const {
    TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous(), who,
                what, " must be a contiguous ", dtype, " tensor of shape ", shape, " on ", device, " (got ",
                t.scalar_type(), " of shape ", t.sizes(), " on ", t.device(), ")");
  }

  void grad_scale(const std::optional<at::Tensor>& scale, const at::Device& device) const {
    if (!scale.has_value()) return;
    TORCH_CHECK(scale->device() == device && scale->numel() == 1 && scale->scalar_type() == at::kFloat, who,
                "grad_scale must be a one-element fp32 tensor on ", device, " (got ", scale->scalar_type(),
                " of shape ", scale->sizes(), " on ", scale->device(), ")");
  }

  // The per-layer lists both ops take, counted against the parameters.
  void reduce_counts(size_t layers, size_t grads, size_t ages, size_t adapt, size_t lagged_valid,
                     size_t probe_grads, size_t probe_steps, size_t w_sq_known) const {
    count(grads, layers, "gradients", false);
    count(ages, layers, "ages", false);
    count(adapt, layers, "adapt flags", false);
    count(lagged_valid, layers, "lag flags", false);
    count(probe_grads, layers, "probe gradients", true);
    count(probe_steps, layers, "probe steps", true);
    count(w_sq_known, layers, "w_sq_known flags", true);
  }

  void update_counts(size_t layers, size_t grads, size_t momentum_buffers, size_t prev_steps, size_t kappas,
                     size_t ages, size_t lagged, bool lag, size_t lagged_valid, size_t saved, size_t adapt) const {
    count(grads, layers, "gradients", false);
    count(momentum_buffers, layers, "momentum buffers", true);
    count(prev_steps, layers, "previous steps", true);
    count(kappas, layers, "kappas", false);
    count(ages, layers, "ages", false);
    count(lagged, layers, "lag stashes", !lag);
    count(lagged_valid, layers, "lag flags", false);
    count(saved, layers, "saved parameters", true);
    count(adapt, layers, "adapt flags", false);
  }

  // The reduction a group's update reads: [L, sum columns] fp64, [L] fp32, [L, flag columns] bool.
  void reduction(const at::Tensor& sums, const at::Tensor& median, const at::Tensor& flags, int64_t layers,
                 int64_t sum_columns, int64_t flag_columns, const at::Device& device) const {
    table(sums, at::kDouble, {layers, sum_columns}, device, "the reduction's sums");
    table(median, at::kFloat, {layers}, device, "the reduction's median");
    table(flags, at::kBool, {layers, flag_columns}, device, "the reduction's flags");
  }

  void probe_shift_counts(size_t layers, size_t steps, size_t saved, size_t displacements) const {
    count(steps, layers, "steps", false);
    count(saved, layers, "save buffers", false);
    count(displacements, layers, "displacements", false);
  }
};

}  // namespace cblr::binding

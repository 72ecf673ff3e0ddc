// The torch side of the CUDA backend: the CUDA kernels of the ops that cblr_ext/ops.py
// declares, their input checks (every check runs before anything is launched), and the
// translation of tensor lists into the torch-free layer tables of csrc/cuda/kernels.h.
// c10/cuda headers only (ATen/cuda/CUDAContext.h would need cusparse.h).  Nothing here
// reads a device value: found_inf and a device lr are read by the kernels.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../binding_checks.h"
#include "kernels.h"

namespace {

using at::Tensor;
using cblr::cuda::DType;
using cblr::cuda::kMaxLayers;
using cblr::cuda::LayerTable;
using OptionalTensors = c10::List<std::optional<Tensor>>;

using cblr::binding::bump_versions;

constexpr cblr::binding::Checks kCheck{"cblr_ext cuda backend: "};
constexpr const char* kWho = kCheck.who;
static_assert(int(cblr::RULE_LARS) == cblr::cuda::CUDA_RULE_LARS && int(cblr::RULE_MCLR) == cblr::cuda::CUDA_RULE_MCLR &&
                  int(cblr::RULE_CBLR) == cblr::cuda::CUDA_RULE_CBLR,
              "the CUDA kernels number the rules as csrc/layer_math.h does");

DType dtype_of(const Tensor& t, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: kCheck.unsupported_dtype(t, i, "float32, float16 and bfloat16");
  }
}

void check_param(const Tensor& p, const Tensor& first, size_t i) {
  TORCH_CHECK(first.is_cuda(), kWho, "layer 0 is on ", first.device());
  kCheck.dense(p, first.device(), i);
  dtype_of(p, i);
  TORCH_CHECK(p.numel() < (int64_t(1) << 31), kWho, "layer ", i, " has 2^31 elements or more");
}

std::optional<Tensor> entry(const OptionalTensors& list, size_t i) {
  if (list.empty()) return std::nullopt;
  return list.get(i);
}

// One layer as the tables take it.
struct Layer {
  int row = 0;
  DType dtype = DType::F32;
  int64_t n = 0;
  void* ptr[cblr::cuda::ROLE_COUNT] = {};
  double* kappa = nullptr;
  float* age = nullptr;
  double* lagged = nullptr;
  uint8_t bits = 0;
};

bool aligned(const Layer& l, size_t storage_bytes) {
  using namespace cblr::cuda;
  for (int r = 0; r < ROLE_COUNT; ++r) {
    if (!l.ptr[r]) continue;
    const bool fp32_state = r == ROLE_V || r == ROLE_PREV || r == ROLE_STEP;
    const uintptr_t need = (fp32_state ? 4 : storage_bytes) * kVec;
    if (reinterpret_cast<uintptr_t>(l.ptr[r]) % need != 0) return false;
  }
  return true;
}

// Batches of at most kMaxLayers layers of one storage type, in layer order per type.
struct Batch {
  DType dtype;
  LayerTable table;
};

std::vector<Batch> make_batches(std::vector<Layer>& layers) {
  std::vector<Batch> batches;
  for (DType dtype : {DType::F32, DType::F16, DType::BF16}) {
    Batch* open = nullptr;
    for (Layer& l : layers) {
      if (l.dtype != dtype) continue;
      const size_t bytes = dtype == DType::F32 ? 4 : 2;
      if (aligned(l, bytes)) l.bits |= cblr::cuda::BIT_ALIGNED;
      if (!open || open->table.count == kMaxLayers) {
        batches.push_back(Batch{dtype, LayerTable{}});
        open = &batches.back();
        open->table.count = 0;
        open->table.chunk_start[0] = 0;
      }
      LayerTable& t = open->table;
      const int s = t.count++;
      const int64_t chunks = (l.n + cblr::cuda::kChunk - 1) / cblr::cuda::kChunk;
      TORCH_CHECK(int64_t(t.chunk_start[s]) + chunks < (int64_t(1) << 31), kWho, "too many chunks in one launch");
      t.chunk_start[s + 1] = t.chunk_start[s] + int(chunks);
      t.chunks = t.chunk_start[s + 1];
      t.row[s] = l.row;
      t.n[s] = l.n;
      for (int r = 0; r < cblr::cuda::ROLE_COUNT; ++r) t.ptr[r][s] = l.ptr[r];
      t.kappa[s] = l.kappa;
      t.age[s] = l.age;
      t.lagged[s] = l.lagged;
      t.bits[s] = l.bits;
    }
  }
  return batches;
}

// One device allocation (torch's caching allocator, on the current stream) per batch,
// carved into the kernels' scratch.
struct ScratchBuffer {
  Tensor storage;
  cblr::cuda::Scratch scratch{};

  ScratchBuffer(const LayerTable& t, bool mclr, const at::Device& device) {
    using namespace cblr::cuda;
    const int64_t chunks = t.chunks > 0 ? t.chunks : 1;
    int64_t offsets[9], bytes = 0;
    const int64_t sizes[9] = {kMaxLayers,
                              chunks * kPartials * 8,
                              mclr ? int64_t(kMaxLayers) * kRadixBins * 4 : 0,
                              int64_t(kMaxLayers) * 3 * 4,
                              int64_t(kMaxLayers) * 4 * 8,
                              int64_t(kMaxLayers) * 4,
                              int64_t(kMaxLayers) * 4,
                              kMaxLayers,
                              chunks * kUpdatePartials * 8};
    for (int k = 0; k < 9; ++k) {
      offsets[k] = bytes;
      bytes += (sizes[k] + 255) & ~int64_t(255);
    }
    storage = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
    uint8_t* base = storage.data_ptr<uint8_t>();
    scratch.mode = base + offsets[0];
    scratch.partials = reinterpret_cast<double*>(base + offsets[1]);
    scratch.hist = mclr ? reinterpret_cast<uint32_t*>(base + offsets[2]) : nullptr;
    scratch.select = reinterpret_cast<uint32_t*>(base + offsets[3]);
    scratch.pre_sums = reinterpret_cast<double*>(base + offsets[4]);
    scratch.pre_median = reinterpret_cast<float*>(base + offsets[5]);
    scratch.alpha = reinterpret_cast<float*>(base + offsets[6]);
    scratch.ustate = base + offsets[7];
    scratch.upartials = reinterpret_cast<double*>(base + offsets[8]);
  }
};

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kWho, what, " failed to launch: ", cudaGetErrorString(err));
}

at::TensorOptions on(const Tensor& like, at::ScalarType dtype) {
  return at::TensorOptions().dtype(dtype).device(like.device());
}

// GradScaler's fl32(1/S) on the device (as GradScaler.unscale_ forms it), 1 without a
// scale: the kernels read it, the host never does.
Tensor grad_unscale(const std::optional<Tensor>& grad_scale, const Tensor& like) {
  if (!grad_scale.has_value()) return at::empty({}, on(like, at::kFloat)).fill_(1.0);
  kCheck.grad_scale(grad_scale, like.device());
  return grad_scale->to(at::kDouble).reciprocal().to(at::kFloat).reshape({});
}

std::tuple<Tensor, Tensor, Tensor> layerwise_reduce(
    const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList ages, c10::List<bool> adapt,
    c10::List<bool> lagged_valid, const OptionalTensors& probe_grads, const OptionalTensors& probe_steps,
    const std::optional<Tensor>& w_sq, c10::List<bool> w_sq_known, const std::optional<Tensor>& grad_scale,
    double weight_decay, int64_t curvature_interval, bool lag, bool approx_median, bool check_nonfinite,
    const Tensor& workspace) {
  const size_t count = params.size();
  const int rule_id = int(kCheck.rule(rule));
  kCheck.reduce_counts(count, grads.size(), ages.size(), adapt.size(), lagged_valid.size(), probe_grads.size(),
                       probe_steps.size(), w_sq_known.size());
  const int64_t rows = int64_t(count);
  if (count == 0) {
    return {at::empty({0, 4}, on(workspace, at::kDouble)), at::empty({0}, on(workspace, at::kFloat)),
            at::empty({0, 4}, on(workspace, at::kBool))};
  }
  const Tensor& first = params[0];
  c10::cuda::CUDAGuard guard(first.device());
  if (w_sq.has_value()) kCheck.table(*w_sq, at::kDouble, {rows}, first.device(), "w_sq");
  std::vector<Layer> layers(count);
  for (size_t i = 0; i < count; ++i) {
    const Tensor& p = params[i];
    check_param(p, first, i);
    kCheck.companion(p, grads[i], p.scalar_type(), "gradient", i);
    if (rule_id != cblr::cuda::CUDA_RULE_CBLR) kCheck.scalar_state(ages[i], at::kFloat, 1, p.device(), "age", i);
    Layer& l = layers[i];
    l.row = int(i);
    l.dtype = dtype_of(p, i);
    l.n = p.numel();
    l.ptr[cblr::cuda::ROLE_W] = l.ptr[cblr::cuda::ROLE_W_IN] = p.data_ptr();
    l.ptr[cblr::cuda::ROLE_G] = grads[i].data_ptr();
    l.age = rule_id != cblr::cuda::CUDA_RULE_CBLR ? ages[i].data_ptr<float>() : nullptr;
    if (adapt.get(i)) l.bits |= cblr::cuda::BIT_ADAPT;
    if (lag && lagged_valid.get(i)) l.bits |= cblr::cuda::BIT_STASHED;
    const bool known = !w_sq_known.empty() && w_sq_known.get(i);
    TORCH_CHECK(!known || w_sq.has_value(), kWho, "w_sq_known[", i, "] is set but w_sq is None");
    if (known) l.bits |= cblr::cuda::BIT_KNOWN_W2;
    const std::optional<Tensor> pg = entry(probe_grads, i);
    if (pg.has_value()) {
      TORCH_CHECK(rule_id == cblr::cuda::CUDA_RULE_CBLR, kWho, "only CBLR probes");
      const std::optional<Tensor> s = entry(probe_steps, i);
      // The parameter sits at w_t + s: Σw_t² must come from the shift (w_sq).
      TORCH_CHECK(s.has_value() && known, kWho, "layer ", i, " has a probe gradient but no probe step or no known "
                  "Σw_t² (w_sq with w_sq_known[", i, "])");
      kCheck.companion(p, *pg, p.scalar_type(), "probe gradient", i);
      kCheck.companion(p, *s, at::kFloat, "probe step", i);
      l.ptr[cblr::cuda::ROLE_PROBE_G] = pg->data_ptr();
      l.ptr[cblr::cuda::ROLE_STEP] = s->data_ptr();
      l.bits |= cblr::cuda::BIT_PROBED;
    }
  }
  Tensor sums = at::empty({rows, 4}, on(first, at::kDouble));
  Tensor median = at::empty({rows}, on(first, at::kFloat));
  Tensor flags = at::empty({rows, 4}, on(first, at::kBool));
  cblr::cuda::ReduceArgs args{};
  args.rule = rule_id;
  args.weight_decay = weight_decay;
  args.curvature_interval = curvature_interval;
  args.lag = lag;
  args.approx_median = approx_median;
  args.check_nonfinite = check_nonfinite;
  const Tensor unscale = grad_unscale(grad_scale, first);
  args.unscale = unscale.data_ptr<float>();
  args.w_sq = w_sq.has_value() ? w_sq->data_ptr<double>() : nullptr;
  args.sums = sums.data_ptr<double>();
  args.median = median.data_ptr<float>();
  args.flags = flags.data_ptr<bool>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  for (const Batch& b : make_batches(layers)) {
    ScratchBuffer scratch(b.table, rule_id == cblr::cuda::CUDA_RULE_MCLR, first.device());
    check_launch(cblr::cuda::reduce_batch(b.dtype, b.table, scratch.scratch, args, stream), "layerwise_reduce");
  }
  return {sums, median, flags};
}

Tensor layerwise_update_(
    const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
    at::TensorList prev_steps, at::TensorList kappas, at::TensorList ages, at::TensorList lagged,
    c10::List<bool> lagged_valid, const OptionalTensors& saved, c10::List<bool> adapt, const Tensor& sums,
    const Tensor& median, const Tensor& flags, const Tensor& found_inf, const std::optional<Tensor>& grad_scale,
    const Tensor& lr, double momentum, bool nesterov, double weight_decay, double eps, double trust_coefficient, double curvature_ema,
    std::optional<double> max_ratio, double fallback_trust, int64_t curvature_interval, bool lag, bool approx_median,
    const Tensor& workspace, const std::optional<Tensor>& next_w_sq) {
  const size_t count = params.size();
  const int rule_id = int(kCheck.rule(rule));
  kCheck.update_counts(count, grads.size(), momentum_buffers.size(), prev_steps.size(), kappas.size(), ages.size(),
                       lagged.size(), lag, lagged_valid.size(), saved.size(), adapt.size());
  const int64_t rows = int64_t(count);
  if (count == 0) return at::empty({0, 7}, on(workspace, at::kDouble));
  const Tensor& first = params[0];
  c10::cuda::CUDAGuard guard(first.device());
  kCheck.reduction(sums, median, flags, rows, 4, 4, first.device());
  if (next_w_sq.has_value()) kCheck.table(*next_w_sq, at::kDouble, {rows}, first.device(), "next_w_sq");
  TORCH_CHECK(found_inf.numel() == 1 && lr.numel() == 1, kWho, "found_inf and lr are scalars");
  TORCH_CHECK(found_inf.device() == first.device(), kWho, "found_inf must be on ", first.device(),
              " (it is read by the kernels, never on the host)");
  TORCH_CHECK(lr.is_cpu() || lr.device() == first.device(), kWho, "lr must be on the CPU or on ", first.device());
  std::vector<Layer> layers(count);
  for (size_t i = 0; i < count; ++i) {
    const Tensor& p = params[i];
    check_param(p, first, i);
    kCheck.companion(p, grads[i], p.scalar_type(), "gradient", i);
    kCheck.scalar_state(kappas[i], at::kDouble, 1, p.device(), "kappa", i);
    kCheck.scalar_state(ages[i], at::kFloat, 1, p.device(), "age", i);
    Layer& l = layers[i];
    l.row = int(i);
    l.dtype = dtype_of(p, i);
    l.n = p.numel();
    l.ptr[cblr::cuda::ROLE_W] = l.ptr[cblr::cuda::ROLE_W_IN] = p.data_ptr();
    l.ptr[cblr::cuda::ROLE_G] = grads[i].data_ptr();
    l.kappa = kappas[i].data_ptr<double>();
    l.age = ages[i].data_ptr<float>();
    if (!momentum_buffers.empty()) {
      kCheck.companion(p, momentum_buffers[i], at::kFloat, "momentum buffer", i);
      l.ptr[cblr::cuda::ROLE_V] = momentum_buffers[i].data_ptr();
    }
    if (!prev_steps.empty()) {
      kCheck.companion(p, prev_steps[i], at::kFloat, "previous step", i);
      l.ptr[cblr::cuda::ROLE_PREV] = prev_steps[i].data_ptr();
    }
    if (lag) {
      kCheck.scalar_state(lagged[i], at::kDouble, 3, p.device(), "lag stash", i);
      l.lagged = lagged[i].data_ptr<double>();
      if (lagged_valid.get(i)) l.bits |= cblr::cuda::BIT_STASHED;
    }
    if (adapt.get(i)) l.bits |= cblr::cuda::BIT_ADAPT;
    const std::optional<Tensor> w_t = entry(saved, i);
    if (w_t.has_value()) {
      TORCH_CHECK(rule_id == cblr::cuda::CUDA_RULE_CBLR, kWho, "only CBLR probes");
      kCheck.companion(p, *w_t, p.scalar_type(), "saved parameter", i);
      l.ptr[cblr::cuda::ROLE_W_IN] = w_t->data_ptr();
      l.bits |= cblr::cuda::BIT_SHIFTED;
    }
  }
  // Written through raw pointers (on a skipped step too: the host does not know of it).
  for (at::TensorList written : {params, momentum_buffers, prev_steps, kappas, ages, lagged}) bump_versions(written);
  if (next_w_sq.has_value()) bump_versions(*next_w_sq);
  // Device scalars as the kernels read them (fp32; a no-op for fp32 inputs, no sync).
  const Tensor skip = found_inf.to(at::kFloat);
  const Tensor lr_device = lr.is_cpu() ? Tensor() : lr.to(at::kFloat);
  Tensor stats = at::empty({rows, 7}, on(first, at::kDouble));
  cblr::cuda::UpdateArgs args{};
  args.rule = rule_id;
  args.lag = lag;
  args.approx_median = approx_median;
  args.nesterov = nesterov;
  args.has_momentum = !momentum_buffers.empty();
  args.keep_prev = !prev_steps.empty();
  args.weight_decay = weight_decay;
  args.momentum = momentum;
  args.eps = eps;
  args.trust_coefficient = trust_coefficient;
  args.curvature_ema = curvature_ema;
  args.fallback_trust = fallback_trust;
  args.has_max_ratio = max_ratio.has_value();
  args.max_ratio = max_ratio.value_or(0.0);
  args.sums = sums.data_ptr<double>();
  args.median = median.data_ptr<float>();
  args.flags = flags.data_ptr<bool>();
  args.found_inf = skip.data_ptr<float>();
  const Tensor unscale = grad_unscale(grad_scale, first);
  args.unscale = unscale.data_ptr<float>();
  args.lr = lr.is_cpu() ? nullptr : lr_device.data_ptr<float>();
  args.lr_value = lr.is_cpu() ? lr.to(at::kFloat).item<float>() : 0.0f;  // a CPU value: no device sync
  args.stats = stats.data_ptr<double>();
  args.next_w_sq = next_w_sq.has_value() ? next_w_sq->data_ptr<double>() : nullptr;
  (void)curvature_interval;  // the measured flags come with the reduction
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  for (const Batch& b : make_batches(layers)) {
    ScratchBuffer scratch(b.table, rule_id == cblr::cuda::CUDA_RULE_MCLR, first.device());
    check_launch(cblr::cuda::update_batch(b.dtype, b.table, scratch.scratch, args, stream), "layerwise_update_");
  }
  return stats;
}

// saved ← w, w ← w + s; returns Σw_t² per layer (fp64: layerwise_reduce's w_sq).
Tensor probe_shift_(at::TensorList params, at::TensorList steps, at::TensorList saved,
                    at::TensorList displacements) {
  kCheck.probe_shift_counts(params.size(), steps.size(), saved.size(), displacements.size());
  if (params.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
  const Tensor& first = params[0];
  c10::cuda::CUDAGuard guard(first.device());
  std::vector<Layer> layers(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    check_param(p, first, i);
    kCheck.companion(p, steps[i], at::kFloat, "step", i);
    kCheck.companion(p, saved[i], p.scalar_type(), "save buffer", i);
    kCheck.companion(p, displacements[i], at::kFloat, "displacement", i);
    Layer& l = layers[i];
    l.row = int(i);
    l.dtype = dtype_of(p, i);
    l.n = p.numel();
    l.ptr[cblr::cuda::ROLE_W] = p.data_ptr();
    l.ptr[cblr::cuda::ROLE_W_IN] = saved[i].data_ptr();
    l.ptr[cblr::cuda::ROLE_STEP] = steps[i].data_ptr();
    l.ptr[cblr::cuda::ROLE_PREV] = displacements[i].data_ptr();
  }
  bump_versions(params);
  bump_versions(saved);
  bump_versions(displacements);
  Tensor w_sq = at::empty({int64_t(params.size())}, on(first, at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  for (const Batch& b : make_batches(layers)) {
    Tensor partials = at::empty({b.table.chunks > 0 ? b.table.chunks : 1}, on(first, at::kDouble));
    check_launch(cblr::cuda::shift_batch(b.dtype, b.table, partials.data_ptr<double>(), w_sq.data_ptr<double>(),
                                         stream), "probe_shift_");
  }
  return w_sq;
}

void probe_restore_(at::TensorList params, at::TensorList saved) {
  kCheck.count(saved.size(), params.size(), "saved parameters", false);
  if (params.empty()) return;
  const Tensor& first = params[0];
  c10::cuda::CUDAGuard guard(first.device());
  std::vector<Layer> layers(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    check_param(p, first, i);
    kCheck.companion(p, saved[i], p.scalar_type(), "saved parameter", i);
    Layer& l = layers[i];
    l.row = int(i);
    l.dtype = dtype_of(p, i);
    l.n = p.numel();
    l.ptr[cblr::cuda::ROLE_W] = p.data_ptr();
    l.ptr[cblr::cuda::ROLE_W_IN] = saved[i].data_ptr();
  }
  bump_versions(params);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  for (const Batch& b : make_batches(layers)) {
    check_launch(cblr::cuda::restore_batch(b.dtype, b.table, stream), "probe_restore_");
  }
}

// ------------------------------------------------------------------ the Adam base (LAMB)

// The layers of an Adam op, checked before anything is launched: w, g, the fp32 moments
// and the fp32 step count (a device scalar the kernels read and advance).
std::vector<Layer> adam_layers(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList steps) {
  const size_t count = params.size();
  kCheck.count(grads.size(), count, "gradients", false);
  kCheck.count(exp_avgs.size(), count, "exp_avgs", false);
  kCheck.count(exp_avg_sqs.size(), count, "exp_avg_sqs", false);
  kCheck.count(steps.size(), count, "steps", false);
  std::vector<Layer> layers(count);
  for (size_t i = 0; i < count; ++i) {
    const Tensor& p = params[i];
    check_param(p, params[0], i);
    kCheck.companion(p, grads[i], p.scalar_type(), "gradient", i);
    kCheck.companion(p, exp_avgs[i], at::kFloat, "exp_avg", i);
    kCheck.companion(p, exp_avg_sqs[i], at::kFloat, "exp_avg_sq", i);
    kCheck.scalar_state(steps[i], at::kFloat, 1, p.device(), "step", i);
    Layer& l = layers[i];
    l.row = int(i);
    l.dtype = dtype_of(p, i);
    l.n = p.numel();
    l.ptr[cblr::cuda::ROLE_W] = l.ptr[cblr::cuda::ROLE_W_IN] = p.data_ptr();
    l.ptr[cblr::cuda::ROLE_G] = grads[i].data_ptr();
    l.ptr[cblr::cuda::ROLE_EXP_AVG] = exp_avgs[i].data_ptr();
    l.ptr[cblr::cuda::ROLE_EXP_AVG_SQ] = exp_avg_sqs[i].data_ptr();
    l.age = steps[i].data_ptr<float>();  // the step count (kernels.h)
  }
  return layers;
}

// The element-wise constants (each rounded once to fp32, as the CPU kernels round them)
// and the device scalars; the clip divisor a one-element fp32 tensor on the device.
cblr::cuda::AdamMath adam_math(const Tensor& unscale, const std::optional<Tensor>& clip, const Tensor& first,
                               double beta1, double beta2, double eps, double weight_decay, bool bias_correction) {
  if (clip.has_value()) {
    TORCH_CHECK(clip->device() == first.device() && clip->numel() == 1 && clip->scalar_type() == at::kFloat, kWho,
                "clip must be a one-element fp32 tensor on ", first.device(), " (got ", clip->scalar_type(),
                " of shape ", clip->sizes(), " on ", clip->device(), ")");
  }
  cblr::cuda::AdamMath m{};
  m.beta1 = float(beta1);
  m.one_minus_beta1 = float(1.0 - beta1);
  m.beta2 = float(beta2);
  m.one_minus_beta2 = float(1.0 - beta2);
  m.eps = float(eps);
  m.weight_decay = float(weight_decay);
  m.bias_correction = bias_correction;
  m.unscale = unscale.data_ptr<float>();
  m.clip = clip.has_value() ? clip->data_ptr<float>() : nullptr;
  return m;
}

int adam_rule(const std::string& rule) {
  const int id = int(kCheck.rule(rule));
  TORCH_CHECK(id != cblr::cuda::CUDA_RULE_CBLR, kWho, "the Adam base runs the rules lars and mclr (got 'cblr')");
  return id;
}

Tensor grad_sq_sums(at::TensorList grads, const std::optional<Tensor>& grad_scale) {
  if (grads.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
  const Tensor& first = grads[0];
  c10::cuda::CUDAGuard guard(first.device());
  std::vector<Layer> layers(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_param(grads[i], first, i);
    Layer& l = layers[i];
    l.row = int(i);
    l.dtype = dtype_of(grads[i], i);
    l.n = grads[i].numel();
    l.ptr[cblr::cuda::ROLE_G] = grads[i].data_ptr();
  }
  const Tensor unscale = grad_unscale(grad_scale, first);
  Tensor sums = at::empty({int64_t(grads.size())}, on(first, at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  for (const Batch& b : make_batches(layers)) {
    Tensor partials = at::empty({b.table.chunks > 0 ? b.table.chunks : 1}, on(first, at::kDouble));
    check_launch(cblr::cuda::grad_sq_batch(b.dtype, b.table, partials.data_ptr<double>(), unscale.data_ptr<float>(),
                                           sums.data_ptr<double>(), stream), "grad_sq_sums");
  }
  return sums;
}

std::tuple<Tensor, Tensor, Tensor> adam_reduce(const std::string& rule, at::TensorList params, at::TensorList grads,
                                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                               at::TensorList steps, const std::optional<Tensor>& grad_scale,
                                               const std::optional<Tensor>& clip, double beta1, double beta2,
                                               double eps, double weight_decay, bool bias_correction) {
  const int rule_id = adam_rule(rule);
  if (params.empty()) {
    kCheck.count(grads.size(), 0, "gradients", false);
    const auto options = at::TensorOptions().dtype(at::kDouble);
    return {at::empty({0, 4}, options), at::empty({0}, options.dtype(at::kFloat)),
            at::empty({0, 4}, options.dtype(at::kBool))};
  }
  const Tensor& first = params[0];
  c10::cuda::CUDAGuard guard(first.device());
  std::vector<Layer> layers = adam_layers(params, grads, exp_avgs, exp_avg_sqs, steps);
  const Tensor unscale = grad_unscale(grad_scale, first);
  const cblr::cuda::AdamMath math = adam_math(unscale, clip, first, beta1, beta2, eps, weight_decay, bias_correction);
  const int64_t rows = int64_t(params.size());
  Tensor sums = at::empty({rows, 4}, on(first, at::kDouble));
  Tensor median = at::empty({rows}, on(first, at::kFloat));
  Tensor flags = at::empty({rows, 4}, on(first, at::kBool));
  const bool mclr = rule_id == cblr::cuda::CUDA_RULE_MCLR;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  for (const Batch& b : make_batches(layers)) {
    ScratchBuffer scratch(b.table, mclr, first.device());
    check_launch(cblr::cuda::adam_reduce_batch(b.dtype, b.table, scratch.scratch, math, mclr, sums.data_ptr<double>(),
                                               median.data_ptr<float>(), flags.data_ptr<bool>(), stream),
                 "adam_reduce");
  }
  return {sums, median, flags};
}

Tensor adam_update_(const std::string& rule, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, c10::List<bool> adapt, const Tensor& sums,
                    const Tensor& median, const Tensor& flags, const Tensor& found_inf,
                    const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip, const Tensor& lr,
                    double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
                    double trust_coefficient, std::optional<double> max_ratio) {
  const int rule_id = adam_rule(rule);
  kCheck.count(adapt.size(), params.size(), "adapt flags", false);
  if (params.empty()) {
    kCheck.count(grads.size(), 0, "gradients", false);
    return at::empty({0, 7}, at::TensorOptions().dtype(at::kDouble));
  }
  const Tensor& first = params[0];
  c10::cuda::CUDAGuard guard(first.device());
  std::vector<Layer> layers = adam_layers(params, grads, exp_avgs, exp_avg_sqs, steps);
  const int64_t rows = int64_t(params.size());
  kCheck.reduction(sums, median, flags, rows, 4, 4, first.device());
  TORCH_CHECK(found_inf.numel() == 1 && lr.numel() == 1, kWho, "found_inf and lr are scalars");
  TORCH_CHECK(found_inf.device() == first.device(), kWho, "found_inf must be on ", first.device(),
              " (it is read by the kernels, never on the host)");
  TORCH_CHECK(lr.is_cpu() || lr.device() == first.device(), kWho, "lr must be on the CPU or on ", first.device());
  for (size_t i = 0; i < layers.size(); ++i) {
    if (adapt.get(i)) layers[i].bits |= cblr::cuda::BIT_ADAPT;
  }
  const Tensor unscale = grad_unscale(grad_scale, first);
  const cblr::cuda::AdamMath math = adam_math(unscale, clip, first, beta1, beta2, eps, weight_decay, bias_correction);
  // Written through raw pointers (on a skipped step too, as far as the host knows).
  for (at::TensorList written : {params, exp_avgs, exp_avg_sqs, steps}) bump_versions(written);
  const Tensor skip = found_inf.to(at::kFloat);  // device scalars as the kernels read them (no sync)
  const Tensor lr_device = lr.is_cpu() ? Tensor() : lr.to(at::kFloat);
  Tensor stats = at::empty({rows, 7}, on(first, at::kDouble));
  cblr::cuda::AdamUpdateArgs args{};
  args.rule = rule_id;
  args.trust_coefficient = trust_coefficient;
  args.eps = eps;
  args.has_max_ratio = max_ratio.has_value();
  args.max_ratio = max_ratio.value_or(0.0);
  args.sums = sums.data_ptr<double>();
  args.median = median.data_ptr<float>();
  args.flags = flags.data_ptr<bool>();
  args.found_inf = skip.data_ptr<float>();
  args.lr = lr.is_cpu() ? nullptr : lr_device.data_ptr<float>();
  args.lr_value = lr.is_cpu() ? lr.to(at::kFloat).item<float>() : 0.0f;  // a CPU value: no device sync
  args.stats = stats.data_ptr<double>();
  const bool mclr = rule_id == cblr::cuda::CUDA_RULE_MCLR;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  for (const Batch& b : make_batches(layers)) {
    ScratchBuffer scratch(b.table, mclr, first.device());
    check_launch(cblr::cuda::adam_update_batch(b.dtype, b.table, scratch.scratch, math, args, stream),
                 "adam_update_");
  }
  return stats;
}

}  // namespace

// The ops and their schemas are declared once, in cblr_ext/ops.py (SCHEMAS): this file
// registers CUDA kernels only.
TORCH_LIBRARY_IMPL(cblr_ext, CUDA, m) {
  m.impl("layerwise_reduce", &layerwise_reduce);
  m.impl("layerwise_update_", &layerwise_update_);
  m.impl("probe_shift_", &probe_shift_);
  m.impl("probe_restore_", &probe_restore_);
  m.impl("grad_sq_sums", &grad_sq_sums);
  m.impl("adam_reduce", &adam_reduce);
  m.impl("adam_update_", &adam_update_);
}

// An empty Python module, so that the setup.py build imports as ``cblr_ext._C_cuda``
// (importing it registers the kernels above).
extern "C" PyObject* PyInit__C_cuda() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

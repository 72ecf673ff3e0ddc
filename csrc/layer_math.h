// The per-layer math of docs/algorithm.md in C++: the twin of cblr_ext/layer_math.py,
// function by function, shared by the CPU kernels (csrc/cpu) and the CUDA kernels.
//
// Torch-free and header-only.  Every function is CBLR_HD (host and device under
// nvcc).  The per-layer scalars (norms, κ, κ̄, r, α) are double, formed from double sums
// of squares, with the hyperparameters as given (the Python twin's fp64 tensors combined
// with Python floats): no norm or curvature of finite fp32 input overflows.  Build with
// -ffp-contract=off (nvcc: --fmad=false) so that no multiply-add is fused: the MCLR
// quotients must be bit-identical across backends.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CBLR_HD __host__ __device__ __forceinline__
#else
#define CBLR_HD inline
#endif

namespace cblr {

// Measurement rules: which curvature estimate a group uses.
enum Rule : int { RULE_LARS = 0, RULE_MCLR = 1, RULE_CBLR = 2 };

CBLR_HD float quiet_nan() { return __builtin_nanf(""); }

CBLR_HD double quiet_nan_double() { return __builtin_nan(""); }

CBLR_HD bool is_finite(float x) { return x - x == 0.0f; }  // false for ±inf and NaN
CBLR_HD bool is_finite(double x) { return x - x == 0.0; }

// LARS curvature (‖g‖ + β‖w‖ + ε) / ‖w‖.
CBLR_HD double lars_kappa(double w_norm, double g_norm, double weight_decay, double eps) {
  return (g_norm + w_norm * weight_decay + eps) / w_norm;
}

// MCLR curvature m + ε; NaN when the median is 0 or missing (NaN compares false).
CBLR_HD double median_kappa(float median, double eps) {
  return median > 0.0f ? double(median) + eps : quiet_nan_double();
}

// CBLR curvature (‖d(w) − d(w+s)‖ + ε) / ‖s‖; NaN when either norm is 0.
CBLR_HD double secant_kappa(double diff_norm, double step_norm, double eps) {
  return (diff_norm > 0.0 && step_norm > 0.0) ? (diff_norm + eps) / step_norm : quiet_nan_double();
}

// x² as a term of Σx², in double: for a float x exact, and neither overflowing (|x| > 1.8e19
// squares to inf in float) nor underflowing (|x| < 1e-19 to a subnormal or 0).
CBLR_HD double square_in_double(float x) {
  double v = x;
  return v * v;
}
CBLR_HD double square_in_double(double x) { return x * x; }

// ‖x‖ from Σx², both double (a float norm would overflow above 3.4e38).
CBLR_HD double norm_from_sum(double sum_sq) { return sqrt(sum_sq); }

// This step's κ by rule from a reduction's quantities: the norms (LARS), the median
// (MCLR), the secant's Σ(Δd)² and Σs² (CBLR).
CBLR_HD double reduction_kappa(Rule rule, double w_norm, double g_norm, double diff_sq, double step_sq,
                               float median, double weight_decay, double eps) {
  if (rule == RULE_LARS) return lars_kappa(w_norm, g_norm, weight_decay, eps);
  if (rule == RULE_MCLR) return median_kappa(median, eps);
  return secant_kappa(norm_from_sum(diff_sq), norm_from_sum(step_sq), eps);
}

// d = g + β·w, rounded after the product and after the sum (no fused multiply-add).
template <typename T>
CBLR_HD T decayed_grad(T g, T w, T weight_decay) {
  T product = w * weight_decay;
  return g + product;
}

// Δ = fl(w + s) − w: what the probe really moved w by, in the math type.
template <typename T>
CBLR_HD T realised_displacement(T shifted, T w) {
  return shifted - w;
}

// d(w) − d(w + s) = (g − g_s) − β·s: the secant's difference of decayed gradients, with
// the weight-decay part exact (s the realised displacement Δ, in the math type).  g_s is
// the gradient at w + s.
template <typename T>
CBLR_HD T secant_difference(T g, T g_s, T s, T weight_decay) {
  T product = s * weight_decay;
  return (g - g_s) - product;
}

// |x| with the sign bit cleared: −0 gives +0, as torch's abs does (x < 0 ? −x : x would
// keep −0, and the quotient −0 / |w| would differ from the other backends' bits).
CBLR_HD float magnitude(float x) { return fabsf(x); }
CBLR_HD double magnitude(double x) { return fabs(x); }

// h = |d| / |w|, defined for w ≠ 0 only (the caller skips w = 0).
template <typename T>
CBLR_HD T curvature_quotient(T d, T w) {
  return magnitude(d) / magnitude(w);
}

CBLR_HD uint32_t float_bits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return bits;
}

CBLR_HD float bits_float(uint32_t bits) {
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

// median="approx": the median rounded toward zero to bf16 precision (relative error < 2^-7).
constexpr uint32_t kApproxMask = 0xFFFF0000u;

// The volatile keeps gcc 12.2 (Debian) from miscompiling float -> bits & mask -> float
// under a branch into the identity (seen at -O1..-O3 with -fPIC).
CBLR_HD float approx_median(float median) {
  volatile uint32_t bits = float_bits(median) & kApproxMask;
  return bits_float(bits);
}

// Position of the lower median (the ⌈n/2⌉-th smallest, zero-based) among n > 0 values.
CBLR_HD int64_t lower_median_rank(int64_t n) { return (n - 1) / 2; }

// η_F·‖w‖ / (‖g‖ + β‖w‖ + ε), or 1 where that is undefined.
CBLR_HD double fallback_ratio(double w_norm, double g_norm, double weight_decay, double eps,
                              double fallback_trust) {
  double r = fallback_trust * w_norm / (g_norm + w_norm * weight_decay + eps);
  bool defined = w_norm > 0.0 && g_norm > 0.0 && is_finite(r) && r > 0.0;
  return defined ? r : 1.0;
}

// Group hyperparameters of the ratio rule.
struct RatioParams {
  double trust_coefficient;
  double curvature_ema;
  double one_minus_ema;  // 1 − ρ (as Python forms it)
  bool has_max_ratio;
  double max_ratio;
  double weight_decay;
  double eps;
  double fallback_trust;
};

CBLR_HD RatioParams make_ratio_params(double trust_coefficient, double curvature_ema,
                                      bool has_max_ratio, double max_ratio, double weight_decay,
                                      double eps, double fallback_trust) {
  return RatioParams{trust_coefficient, curvature_ema, 1.0 - curvature_ema, has_max_ratio,
                     max_ratio, weight_decay, eps, fallback_trust};
}

struct LayerRatio {
  double ratio;    // r (1 for layers not adapted)
  double new_bar;  // κ̄ after this step
  double used;     // κ̄ the rule used, NaN for the fallback and not-adapted layers
  bool fallback;   // adapted, but the rule was undefined
};

// Ratio of one step from a (possibly missing) measurement κ and the running κ̄.
CBLR_HD LayerRatio layer_ratio(double kappa, bool measured, double kappa_bar, double w_norm,
                               double g_norm, bool adapt, const RatioParams& p) {
  bool valid = measured && is_finite(kappa) && kappa > 0.0 && adapt;
  double ema_value = kappa_bar * p.curvature_ema + kappa * p.one_minus_ema;
  double new_bar = valid ? (kappa_bar != kappa_bar ? kappa : ema_value) : kappa_bar;
  double rule_ratio = p.trust_coefficient / new_bar;
  // On a measuring step the fresh measurement decides; in between, κ̄ is reused.
  bool use_rule = (measured ? valid : is_finite(kappa_bar)) && adapt;
  use_rule = use_rule && is_finite(rule_ratio) && rule_ratio > 0.0;
  double ratio = use_rule ? rule_ratio
                          : fallback_ratio(w_norm, g_norm, p.weight_decay, p.eps, p.fallback_trust);
  if (p.has_max_ratio && ratio > p.max_ratio) ratio = p.max_ratio;
  LayerRatio out;
  out.ratio = adapt ? ratio : 1.0;
  out.new_bar = new_bar;
  out.used = use_rule ? new_bar : quiet_nan_double();
  out.fallback = adapt && !use_rule;
  return out;
}

// α = r·γ, rounded once (γ the fp32 learning rate), then to each layer's math type.
CBLR_HD double layer_alpha(double ratio, float lr) { return ratio * double(lr); }

// A layer re-measures when curvature_interval steps have passed since its last attempt.
CBLR_HD bool measurement_due(float age, int64_t curvature_interval) {
  return age >= float(curvature_interval);
}

CBLR_HD float next_age(float age, bool measured) { return measured ? 1.0f : age + 1.0f; }

// Per-element momentum update in the math type T:
//   v ← μ·v + α·d;  s = v, or μ·v + α·d with Nesterov (s = α·d without momentum);  w ← w − s.
// Returns s; updates w and (when has_momentum) v.
template <typename T>
CBLR_HD T momentum_update(T& w, T d, T& v, T alpha, T momentum, bool has_momentum,
                          bool nesterov) {
  T scaled = d * alpha;
  T s = scaled;
  if (has_momentum) {
    T decayed = v * momentum;
    v = decayed + scaled;
    if (nesterov) {
      T look_ahead = v * momentum;
      s = look_ahead + scaled;
    } else {
      s = v;
    }
  }
  w = w - s;
  return s;
}

// ---------------------------------------------------------------- the Adam base (LAMB)

// m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g², each product and sum rounded in the
// math type T (the Python twin's tensor ops): the coefficients come as T, 1 − β formed in
// double first (as Python forms it).
template <typename T>
struct AdamMoments {
  T m, v;
};

template <typename T>
CBLR_HD AdamMoments<T> adam_moments(T g, T m, T v, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2) {
  T m_kept = m * beta1;
  T m_new = g * one_minus_beta1;
  T v_kept = v * beta2;
  T g_sq = g * g;
  T v_new = g_sq * one_minus_beta2;
  return AdamMoments<T>{m_kept + m_new, v_kept + v_new};
}

// (1 − β1^t, 1 − β2^t) for this step's t = step + 1, in fp32 (the step count is fp32
// state), or ones without bias correction.
struct BiasCorrections {
  float first, second;
};

CBLR_HD BiasCorrections bias_corrections(float step, float beta1, float beta2, bool bias_correction) {
  if (!bias_correction) return BiasCorrections{1.0f, 1.0f};
  float t = step + 1.0f;
  return BiasCorrections{1.0f - powf(beta1, t), 1.0f - powf(beta2, t)};
}

// √x in x's own type (an unqualified sqrt of a float would round through double).
CBLR_HD float square_root(float x) { return sqrtf(x); }
CBLR_HD double square_root(double x) { return sqrt(x); }

// u = m̂ / (√v̂ + ε) + λ·w with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t), rounded op by op in T.
template <typename T>
CBLR_HD T adam_direction(T m, T v, T w, T bc1, T bc2, T eps, T weight_decay) {
  T m_hat = m / bc1;
  T v_hat = v / bc2;
  T denominator = square_root(v_hat) + eps;
  T decay = w * weight_decay;
  return m_hat / denominator + decay;
}

struct AdamRatio {
  double ratio;   // r (1 where undefined and for layers not adapted)
  double kappa;   // the curvature r stands for, NaN where not used
  bool fallback;  // adapted, but the rule was undefined
};

// "lars" (LAMB): κ = ‖u‖/‖w‖, r = η·‖w‖/‖u‖; "mclr": κ = median |u_i|/|w_i| + ε, r = η/κ.
// r = 1 where undefined (‖w‖ = 0, ‖u‖ = 0, no median) and for not-adapted layers; the
// bound max_ratio (LAMB's trust clip) applies to defined ratios.
CBLR_HD AdamRatio adam_ratio(Rule rule, double w_norm, double u_norm, float median, bool adapt,
                             double trust_coefficient, double eps, bool has_max_ratio, double max_ratio) {
  double kappa, r;
  if (rule == RULE_LARS) {
    kappa = u_norm / w_norm;
    r = trust_coefficient * w_norm / u_norm;
  } else {
    kappa = median_kappa(median, eps);
    r = trust_coefficient / kappa;
  }
  bool defined = adapt && w_norm > 0.0 && u_norm > 0.0 && is_finite(r) && r > 0.0;
  if (has_max_ratio && r > max_ratio) r = max_ratio;
  AdamRatio out;
  out.ratio = defined ? r : 1.0;
  out.kappa = defined ? kappa : quiet_nan_double();
  out.fallback = adapt && !defined;
  return out;
}

// ---------------------------------------------------------------- CBLR on the Adam direction

// (g − g_s) / (√v̂ + ε), v̂ = v / (1 − β2^t): the secant of the preconditioned gradient, g_s the
// gradient at the probe point, v this step's second moment; rounded op by op in T, the
// division as adam_direction takes it.
template <typename T>
CBLR_HD T adam_secant_difference(T g, T g_s, T v, T bc2, T eps) {
  T diff = g - g_s;
  T v_hat = v / bc2;
  T denominator = square_root(v_hat) + eps;
  return diff / denominator;
}

}  // namespace cblr

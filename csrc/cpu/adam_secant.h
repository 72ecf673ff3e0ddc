// CBLR on the Adam direction (cblr_ext/lamb_secant.py): the secant's sums of every measuring
// layer, Σ((g − g_s)/(√v̂ + ε))² over v̂ of this step's v, and Σs² of the displacement the
// probe realised.  One read of g, g_s, v and s per element, nothing written.  The math is
// layer_math.h's, in the layer's math type T (fp32, fp64 for fp64 layers; the binding hands
// 16-bit gradients over converted to fp32, as the reference reads them); the sums are fp64.
#pragma once

#include <cstdint>
#include <vector>

#include "../layer_math.h"
#include "kernels.h"

namespace cblr {
namespace cpu {

// One layer's inputs: g and g_s in the math type, s and v in the state dtype (the same).
struct SecantLayer {
  bool wide = false;  // fp64 (else fp32)
  int64_t n = 0;
  const void* g = nullptr;
  const void* g_s = nullptr;
  const void* s = nullptr;
  const void* v = nullptr;
  float step = 0;  // the step count before this step (t − 1)
};

// Layers above this many elements are summed by the team (OpenMP), smaller ones alone.
constexpr int64_t kSecantTeamElements = 1 << 16;

template <typename T>
void secant_layer_sums(const AdamConfig& cfg, const SecantLayer& l, double* out) {
  const T* g = static_cast<const T*>(l.g);
  const T* g_s = static_cast<const T*>(l.g_s);
  const T* s = static_cast<const T*>(l.s);
  const T* v = static_cast<const T*>(l.v);
  const BiasCorrections bc = bias_corrections(l.step, 0.0f, float(cfg.beta2), cfg.bias_correction);
  const T unscale = T(cfg.g_unscale), clip = T(cfg.clip), beta2 = T(cfg.beta2), one_minus_beta2 = T(1.0 - cfg.beta2);
  const T bc2 = T(bc.second), eps = T(cfg.eps);
  const bool has_clip = cfg.has_clip;
  const int64_t n = l.n;
  const int team = n > kSecantTeamElements ? cfg.threads : 1;
  double diff2 = 0, step2 = 0;
#pragma omp parallel for reduction(+ : diff2, step2) num_threads(team) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T gv = g[i] * unscale, gsv = g_s[i] * unscale;  // g ÷ grad scale (÷ clip), as the moments take it
    if (has_clip) {
      gv = gv / clip;
      gsv = gsv / clip;
    }
    // This step's v (the m formed alongside is not used).
    const T v_now = adam_moments(gv, T(0), v[i], T(0), T(1), beta2, one_minus_beta2).v;
    const double d = double(adam_secant_difference(gv, gsv, v_now, bc2, eps));
    const double sv = double(s[i]);
    diff2 += d * d;
    step2 += sv * sv;
  }
  out[0] = diff2;
  out[1] = step2;
}

// out[L][2]: each layer's (Σ(P·(g − g_s))², Σs²).
inline void secant_sums_layers(const AdamConfig& cfg, const std::vector<SecantLayer>& layers, double* out) {
  for (size_t i = 0; i < layers.size(); ++i) {
    if (layers[i].wide) {
      secant_layer_sums<double>(cfg, layers[i], out + 2 * i);
    } else {
      secant_layer_sums<float>(cfg, layers[i], out + 2 * i);
    }
  }
}

}  // namespace cpu
}  // namespace cblr

// The Adam base's passes over all layers of a group (LAMB, and the median rule on the
// Adam direction u): pass 1 forms m, v and u in registers and writes nothing; pass 2
// forms them again from the same inputs and writes w, m, v and the step count (and, for
// CBLR on the Adam direction, whose ratio is given, its step s = α·u).  u is
// recomputed, not stored: 44 bytes per fp32 parameter (pass 1 reads g, w, m, v; pass 2
// reads them and writes w, m, v), where writing u out and reading it back would add 8.
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)
namespace {

// One layer's constants of the element-wise math, in its math type T (as the Python
// twin combines fp32/fp64 tensors with Python floats: each rounded once to T).
template <typename T>
struct AdamConstants {
  T g_unscale, clip, beta1, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay;
};

template <typename T>
AdamConstants<T> adam_constants(const AdamConfig& cfg, const AdamLayer& l) {
  const BiasCorrections bc = bias_corrections(*l.step, float(cfg.beta1), float(cfg.beta2), cfg.bias_correction);
  return {T(cfg.g_unscale), T(cfg.clip), T(cfg.beta1), T(1.0 - cfg.beta1), T(cfg.beta2), T(1.0 - cfg.beta2),
          T(bc.first), T(bc.second), T(cfg.eps), T(cfg.weight_decay)};
}

// g ÷ grad scale (a product with fl32(1/S)), ÷ the clip divisor where clipping.
template <bool Clip, typename T>
inline T adam_grad(T g, const AdamConstants<T>& c) {
  const T unscaled = g * c.g_unscale;
  return Clip ? unscaled / c.clip : unscaled;
}

// The new moments (in m, v) and the direction u of one element.
template <typename T>
inline T adam_element(T g, T w, T& m, T& v, const AdamConstants<T>& c) {
  const AdamMoments<T> next = adam_moments(g, m, v, c.beta1, c.one_minus_beta1, c.beta2, c.one_minus_beta2);
  m = next.m;
  v = next.v;
  return adam_direction(next.m, next.v, w, c.bc1, c.bc2, c.eps, c.weight_decay);
}

// Pass 1 of one block (n ≤ kSumBlock): adds Σw², Σu² (block sums, as in sum_squares) and
// Σ 0·g (NaN iff some g is NaN or ±inf: a flag that vectorises); the quotients |u|/|w|
// into h (kNoQuotient where w = 0) when Quotients.
template <typename P, bool Clip, bool Quotients>
void adam_reduce_block(const P* w, const P* g, const math_t<P>* m, const math_t<P>* v, int64_t n,
                       const AdamConstants<math_t<P>>& c, math_t<P>* h, ChunkResult& r, math_t<P>& nonfinite) {
  using T = math_t<P>;
  double w2 = 0, u2 = 0;
  T zeros = 0;
#pragma omp simd reduction(+ : w2, u2, zeros)
  for (int64_t i = 0; i < n; ++i) {
    const T wv = load(w[i]), gv = adam_grad<Clip>(T(load(g[i])), c);
    T mv = m[i], vv = v[i];
    const T u = adam_element(gv, wv, mv, vv, c);
    w2 += square_in_double(wv);
    u2 += square_in_double(u);
    zeros += gv * T(0);
    if (Quotients) h[i] = wv != 0 ? curvature_quotient(u, wv) : kNoQuotient<T>;
  }
  r.w2 += w2;
  r.g2 += u2;
  nonfinite += zeros;
}

// Pass 2 of one block: writes m, v and w ← w − α·u (rounded to the storage type), and with
// KeepMoves the moves α·u into `moves` (CBLR's step s, kept for the next probe); adds
// Σ(α·u)² of the moves.
template <typename P, bool Clip, bool KeepMoves>
void adam_apply_block(P* w, const P* g, math_t<P>* m, math_t<P>* v, math_t<P>* moves, int64_t n,
                      const AdamConstants<math_t<P>>& c, math_t<P> alpha, ChunkResult& r) {
  using T = math_t<P>;
  double s2 = 0;
#pragma omp simd reduction(+ : s2)
  for (int64_t i = 0; i < n; ++i) {
    const T wv = load(w[i]), gv = adam_grad<Clip>(T(load(g[i])), c);
    T mv = m[i], vv = v[i];
    const T move = adam_element(gv, wv, mv, vv, c) * alpha;
    m[i] = mv;
    v[i] = vv;
    w[i] = store<P>(wv - move);
    if (KeepMoves) moves[i] = move;
    s2 += square_in_double(move);
  }
  r.s2 += s2;
}

// A layer's arrays from element `offset` on: w and g in the storage type P, m, v and the
// kept moves s (null where not kept) in the math type.
template <typename P>
struct AdamArrays {
  P* w;
  const P* g;
  math_t<P>* m;
  math_t<P>* v;
  math_t<P>* s;
};

template <typename P>
AdamArrays<P> adam_arrays(const AdamLayer& l, int64_t offset = 0) {
  return {static_cast<P*>(l.w) + offset, static_cast<const P*>(l.g) + offset, static_cast<math_t<P>*>(l.m) + offset,
          static_cast<math_t<P>*>(l.v) + offset, l.s ? static_cast<math_t<P>*>(l.s) + offset : nullptr};
}

// The quotient |u_i|/|w_i| of element i, for w_i ≠ 0 (the median's scalar paths).
template <typename P>
math_t<P> adam_quotient_at(bool clip, const AdamConstants<math_t<P>>& c, const AdamArrays<P>& a, int64_t i) {
  using T = math_t<P>;
  const T wv = load(a.w[i]);
  T mv = a.m[i], vv = a.v[i];
  const T gv = clip ? adam_grad<true>(T(load(a.g[i])), c) : adam_grad<false>(T(load(a.g[i])), c);
  return curvature_quotient(adam_element(gv, wv, mv, vv, c), wv);
}

// Every valid quotient |u_i|/|w_i| of a layer into out (the median's fallback); returns how many.
template <typename P>
int64_t adam_quotients(const AdamConfig& cfg, const AdamLayer& l, math_t<P>* out) {
  const AdamConstants<math_t<P>> c = adam_constants<math_t<P>>(cfg, l);
  const AdamArrays<P> a = adam_arrays<P>(l);
  int64_t count = 0;
  for (int64_t i = 0; i < l.n; ++i) {
    if (load(a.w[i]) != 0) out[count++] = adam_quotient_at(cfg.has_clip, c, a, i);
  }
  return count;
}

// The bracket of a layer's quotients |u_i|/|w_i| (median.h, bracket_of).
template <typename P>
Bracket<math_t<P>> adam_bracket(const AdamConfig& cfg, const AdamLayer& l) {
  using T = math_t<P>;
  const AdamConstants<T> c = adam_constants<T>(cfg, l);
  const AdamArrays<P> a = adam_arrays<P>(l);
  return bracket_of<T>(
      l.n,
      [&](int64_t i) { return load(a.w[i]) != 0 ? adam_quotient_at(cfg.has_clip, c, a, i) : kNoQuotient<T>; },
      [&](int64_t i) {
        __builtin_prefetch(a.w + i);
        __builtin_prefetch(a.g + i);
        __builtin_prefetch(a.m + i);
        __builtin_prefetch(a.v + i);
      });
}

template <typename P>
void adam_reduce_chunk(const AdamConfig& cfg, const AdamLayer& l, const Chunk& chunk,
                       const Bracket<math_t<P>>* bracket, math_t<P>* candidates, ChunkResult& r, bool& nonfinite) {
  using T = math_t<P>;
  const AdamConstants<T> c = adam_constants<T>(cfg, l);
  const AdamArrays<P> a = adam_arrays<P>(l, chunk.begin);
  const int64_t n = chunk.end - chunk.begin;
  alignas(64) T h[kSumBlock];
  T zeros = 0;
  with_flag(cfg.has_clip, [&](auto clip) {
    for (int64_t b = 0; b < n; b += kSumBlock) {
      const int64_t k = std::min(kSumBlock, n - b);
      if (bracket) {
        adam_reduce_block<P, clip.value, true>(a.w + b, a.g + b, a.m + b, a.v + b, k, c, h, r, zeros);
        collect_block(h, k, *bracket, candidates + chunk.begin, r.counts);
      } else {
        adam_reduce_block<P, clip.value, false>(a.w + b, a.g + b, a.m + b, a.v + b, k, c, h, r, zeros);
      }
    }
  });
  nonfinite = zeros != zeros;  // NaN: some 0·g was
}

template <typename P>
void adam_apply_chunk(const AdamConfig& cfg, const AdamLayer& l, const Chunk& chunk, double alpha, ChunkResult& r) {
  using T = math_t<P>;
  const AdamConstants<T> c = adam_constants<T>(cfg, l);
  const int64_t n = chunk.end - chunk.begin;
  const AdamArrays<P> a = adam_arrays<P>(l, chunk.begin);
  with_flag(cfg.has_clip, [&](auto clip) {
    with_flag(a.s != nullptr, [&](auto keep) {
      for (int64_t b = 0; b < n; b += kSumBlock) {
        adam_apply_block<P, clip.value, keep.value>(a.w + b, a.g + b, a.m + b, a.v + b, keep.value ? a.s + b : nullptr,
                                                    std::min(kSumBlock, n - b), c, T(alpha), r);
      }
    });
  });
}

// The update over every layer: w ← w − α_i·u with m, v (and the moves, where a layer keeps
// them) written, then the step counts advanced; returns ‖α_i·u‖ per layer.
std::vector<double> adam_move_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers,
                                     const double* alphas) {
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<ChunkResult> results(chunks.size());
  parallel_items(int64_t(chunks.size()), cfg.threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    dispatch(layers[c.layer].dtype, [&](auto tag) {
      adam_apply_chunk<decltype(tag)>(cfg, layers[c.layer], c, alphas[c.layer], results[k]);
    });
  });
  const std::vector<LayerSums> sums = sum_chunks(layers.size(), chunks, results);
  std::vector<double> step_norms(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    step_norms[i] = norm_from_sum(sums[i].s2);
    *layers[i].step = *layers[i].step + 1.0f;  // read by every chunk above: advanced last
  }
  return step_norms;
}

}  // namespace

void grad_sq_layers(const std::vector<AdamLayer>& layers, float g_unscale, int threads, double* sums) {
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<ChunkResult> results(chunks.size());
  parallel_items(int64_t(chunks.size()), threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    dispatch(layers[c.layer].dtype, [&](auto tag) {
      using P = decltype(tag);
      const P* g = static_cast<const P*>(layers[c.layer].g) + c.begin;
      double unused = 0;
      sum_squares(g, g, math_t<P>(g_unscale), c.end - c.begin, unused, results[k].g2);
    });
  });
  const std::vector<LayerSums> layer_sums = sum_chunks(layers.size(), chunks, results);
  for (size_t i = 0; i < layers.size(); ++i) sums[i] = layer_sums[i].g2;
}

void adam_reduce_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const ReductionOut& reduction) {
  const size_t count = layers.size();
  const std::vector<char> selects(count, cfg.rule == RULE_MCLR);
  MedianPlan plan(cfg.workspace, cfg.workspace_bytes, cfg.threads, layers, selects, false,
                  [&](const AdamLayer& l, auto tag) { return adam_bracket<decltype(tag)>(cfg, l); });
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<ChunkResult> results(chunks.size());
  std::vector<char> chunk_nonfinite(chunks.size(), 0);
  parallel_items(int64_t(chunks.size()), cfg.threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    dispatch(layers[c.layer].dtype, [&](auto tag) {
      using T = math_t<decltype(tag)>;
      bool nonfinite = false;
      adam_reduce_chunk<decltype(tag)>(cfg, layers[c.layer], c, plan.collecting<T>(c.layer),
                                       plan.candidates<T>(c.layer), results[k], nonfinite);
      chunk_nonfinite[k] = nonfinite;
    });
  });
  const std::vector<LayerSums> sums = sum_chunks(count, chunks, results);
  const std::vector<float> medians = select_medians(
      layers, plan, sums, false, cfg.threads,
      [&](int i, auto tag, auto* out) { return adam_quotients<decltype(tag)>(cfg, layers[i], out); });
  std::vector<char> nonfinite(count, 0);
  for (size_t k = 0; k < chunks.size(); ++k) nonfinite[chunks[k].layer] |= chunk_nonfinite[k];
  for (size_t i = 0; i < count; ++i) {
    double* row = reduction.sums + i * SUM_COLUMNS;
    row[SUM_W2] = sums[i].w2;
    row[SUM_G2] = sums[i].g2;
    row[SUM_DIFF2] = 0.0;
    row[SUM_STEP2] = 0.0;
    reduction.median[i] = medians[i];
    bool* flags = reduction.flags + i * FLAG_COLUMNS;
    flags[FLAG_MEASURED] = true;
    flags[FLAG_NORMS] = true;
    flags[FLAG_MEDIAN] = selects[i];
    flags[FLAG_NONFINITE] = nonfinite[i];
  }
}

void adam_apply_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const ReductionIn& reduction,
                       bool skip, float lr, double* stats) {
  const size_t count = layers.size();
  std::vector<double> w2(count), u2(count);
  std::vector<float> median(count);
  std::vector<char> lacks_norms(count), lacks_median(count);
  std::vector<AdamLayer> lacking;  // the layers whose reduction misses norms or the median: reduced first
  std::vector<size_t> lacking_index;
  for (size_t i = 0; i < count; ++i) {
    const double* sums = reduction.sums + i * SUM_COLUMNS;
    const bool* flags = reduction.flags + i * FLAG_COLUMNS;
    w2[i] = sums[SUM_W2];
    u2[i] = sums[SUM_G2];
    median[i] = reduction.median[i];
    lacks_norms[i] = !flags[FLAG_NORMS];
    lacks_median[i] = cfg.rule == RULE_MCLR && !flags[FLAG_MEDIAN];
    if (lacks_norms[i] || lacks_median[i]) {
      lacking.push_back(layers[i]);
      lacking_index.push_back(i);
    }
  }
  if (!lacking.empty()) {
    const size_t n = lacking.size();
    std::vector<double> sums(n * SUM_COLUMNS);
    std::vector<float> medians(n);
    std::unique_ptr<bool[]> flags(new bool[n * FLAG_COLUMNS]);
    CBLR_ISA::adam_reduce_layers(cfg, lacking, ReductionOut{sums.data(), medians.data(), flags.get()});
    for (size_t k = 0; k < n; ++k) {
      const size_t i = lacking_index[k];
      if (lacks_norms[i]) {
        w2[i] = sums[k * SUM_COLUMNS + SUM_W2];
        u2[i] = sums[k * SUM_COLUMNS + SUM_G2];
      }
      if (lacks_median[i]) median[i] = medians[k];
    }
  }
  std::vector<double> alphas(count);
  for (size_t i = 0; i < count; ++i) {
    const double w_norm = norm_from_sum(w2[i]), u_norm = norm_from_sum(u2[i]);
    const AdamRatio r = adam_ratio(cfg.rule, w_norm, u_norm, median[i], layers[i].adapt, cfg.trust_coefficient,
                                   cfg.eps, cfg.has_max_ratio, cfg.max_ratio);
    alphas[i] = layer_alpha(r.ratio, lr);
    double* row = stats + i * STAT_COLUMNS;
    row[STAT_W_NORM] = w_norm;
    row[STAT_G_NORM] = u_norm;
    row[STAT_STEP_NORM] = 0.0;
    row[STAT_KAPPA] = r.kappa;
    row[STAT_RATIO] = r.ratio;
    row[STAT_ALPHA] = alphas[i];
    row[STAT_FALLBACK] = r.fallback ? 1.0 : 0.0;
  }
  if (skip) return;
  const std::vector<double> step_norms = adam_move_layers(cfg, layers, alphas.data());
  for (size_t i = 0; i < count; ++i) stats[i * STAT_COLUMNS + STAT_STEP_NORM] = step_norms[i];
}

void adam_secant_apply_layers(const AdamConfig& cfg, const std::vector<AdamLayer>& layers, const double* alphas,
                              bool skip, double* step_norms) {
  if (skip) {
    std::fill(step_norms, step_norms + layers.size(), 0.0);
    return;
  }
  const std::vector<double> norms = adam_move_layers(cfg, layers, alphas);
  std::copy(norms.begin(), norms.end(), step_norms);
}

}  // namespace cblr::cpu::CBLR_ISA

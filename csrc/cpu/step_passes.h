// The two passes of a step over all layers of a param group: reduce (pass 1) and
// apply (ratio and update, pass 2), with the MCLR median riding along whichever
// pass streams the inputs (median.h).
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)
namespace {

struct ChunkResult {
  double w2 = 0, g2 = 0, s2 = 0, d2 = 0;  // d2: CBLR's ‖d(w_t) − d(w_t + s)‖² (s2 its ‖s‖²)
  double next_w2 = 0;                     // ‖w‖² after the update
  MedianCounts counts;
};

// Which layers select a median in this pass, their brackets and scratch slices: per
// selecting layer n slots for the chunks' candidates and, under lag=1, n for all its
// quotients (the update overwrites w), in the caller's workspace when it is large enough.
class MedianPlan {
 public:
  // The SGD base's brackets, of the quotients |g_i + β·w_i| / |w_i|.
  MedianPlan(const StepConfig& cfg, const std::vector<LayerRef>& layers, const std::vector<char>& selects,
             bool keep_quotients)
      : MedianPlan(cfg.workspace, cfg.workspace_bytes, cfg.threads, layers, selects, keep_quotients,
                   [&](const LayerRef& l, auto tag) {
                     using P = decltype(tag);
                     return make_bracket(static_cast<const P*>(l.w), static_cast<const P*>(l.g),
                                         math_t<P>(l.g_unscale), l.n, math_t<P>(cfg.weight_decay));
                   }) {}

  // Any layers (with members n and dtype): make_bracket(layer, storage type tag) gives the
  // bracket of a selecting layer; workspace: the caller's scratch, as StepConfig's.
  template <typename Layer, typename MakeBracket>
  MedianPlan(unsigned char* workspace, int64_t workspace_bytes, int threads, const std::vector<Layer>& layers,
             const std::vector<char>& selects, bool keep_quotients, MakeBracket&& make_bracket)
      : selects_(selects), offset_(layers.size(), 0), f32_(layers.size()), f64_(layers.size()) {
    int64_t bytes = 0;
    std::vector<int> selecting;
    for (size_t i = 0; i < layers.size(); ++i) {
      if (!selects[i]) continue;
      offset_[i] = bytes;
      bytes += (layers[i].n * math_size(layers[i].dtype) + 63) & ~int64_t(63);  // slices stay aligned
      selecting.push_back(int(i));
    }
    if (selecting.empty()) return;
    const int64_t needed = keep_quotients ? 2 * bytes : bytes;
    candidates_ = workspace;
    if (workspace_bytes < needed) {
      owned_.reset(new unsigned char[needed]);  // uninitialised: untouched pages stay free
      candidates_ = owned_.get();
    }
    if (keep_quotients) quotients_ = candidates_ + bytes;
    parallel_items(int64_t(selecting.size()), threads, kChunk * int64_t(selecting.size()), [&](int64_t k) {
      const Layer& l = layers[selecting[k]];
      dispatch(l.dtype, [&](auto tag) {
        using P = decltype(tag);
        bracket<math_t<P>>(selecting[k]) = make_bracket(l, tag);
      });
    });
  }

  bool selects(int layer) const { return selects_[layer]; }

  template <typename T>
  Bracket<T>& bracket(int layer) { return brackets(T{})[layer]; }

  // The bracket a chunk collects against, or null (no median, or already known).
  template <typename T>
  const Bracket<T>* collecting(int layer) {
    return selects_[layer] && !bracket<T>(layer).known ? &bracket<T>(layer) : nullptr;
  }
  template <typename T>
  T* candidates(int layer) { return reinterpret_cast<T*>(candidates_ + offset_[layer]); }
  template <typename T>
  T* quotients(int layer) { return reinterpret_cast<T*>(quotients_ + offset_[layer]); }

 private:
  std::vector<char> selects_;
  std::vector<int64_t> offset_;
  std::vector<Bracket<float>> f32_;
  std::vector<Bracket<double>> f64_;
  std::vector<Bracket<float>>& brackets(float) { return f32_; }
  std::vector<Bracket<double>>& brackets(double) { return f64_; }
  std::unique_ptr<unsigned char[]> owned_;
  unsigned char* candidates_ = nullptr;
  unsigned char* quotients_ = nullptr;
};

// Per layer: the sums of its chunks in chunk order (deterministic).
struct LayerSums {
  double w2 = 0, g2 = 0, s2 = 0, d2 = 0, next_w2 = 0;
  MedianCounts counts;
  Slices slices;  // (chunk begin, candidates) per chunk
};

std::vector<LayerSums> sum_chunks(size_t layers, const std::vector<Chunk>& chunks,
                                  const std::vector<ChunkResult>& results) {
  std::vector<LayerSums> sums(layers);
  for (size_t k = 0; k < chunks.size(); ++k) {
    LayerSums& s = sums[chunks[k].layer];
    s.w2 += results[k].w2;
    s.g2 += results[k].g2;
    s.s2 += results[k].s2;
    s.d2 += results[k].d2;
    s.next_w2 += results[k].next_w2;
    s.counts.add(results[k].counts);
    s.slices.emplace_back(chunks[k].begin, results[k].counts.inside);
  }
  return sums;
}

template <typename P>
bool any_nonfinite(const P* g, math_t<P> gs, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(load(g[i]) * gs)) return true;
  }
  return false;
}

// ‖g‖² is finite when every element is; when it is not, a scan tells a non-finite
// element from squares that overflowed.  A CBLR probe gradient counts as g does (an
// overflow at w_t + s skips the step), by its secant sum.
bool layer_nonfinite(const LayerRef& l, double g2, double d2) {
  return dispatch(l.dtype, [&](auto tag) {
    using P = decltype(tag);
    const math_t<P> gs(l.g_unscale);
    return (!std::isfinite(g2) && any_nonfinite(static_cast<const P*>(l.g), gs, l.n)) ||
           (l.measures && !std::isfinite(d2) && any_nonfinite(static_cast<const P*>(l.probe_g), gs, l.n));
  });
}

// The median of each selecting layer, as fp32 and approx-truncated (0 elsewhere: not taken;
// NaN only where undefined).  write_quotients(layer, storage type tag, out) writes every
// valid quotient of the layer to out and returns how many (the fallback where the
// bracket missed).
template <typename Layer, typename WriteQuotients>
std::vector<float> select_medians(const std::vector<Layer>& layers, MedianPlan& plan,
                                  const std::vector<LayerSums>& sums, bool approx, int threads,
                                  WriteQuotients&& write_quotients) {
  std::vector<float> medians(layers.size(), 0.0f);
  std::vector<int> selecting;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (plan.selects(int(i))) selecting.push_back(int(i));
  }
  parallel_items(int64_t(selecting.size()), threads, kChunk * int64_t(selecting.size()), [&](int64_t k) {
    const int i = selecting[k];
    dispatch(layers[i].dtype, [&](auto tag) {
      using T = math_t<decltype(tag)>;
      auto all_quotients = [&](T* out) { return write_quotients(i, tag, out); };
      const float median = float(finish_median(plan.bracket<T>(i), sums[i].counts, sums[i].slices,
                                               plan.candidates<T>(i), approx, all_quotients));
      medians[i] = approx ? approx_median(median) : median;
    });
  });
  return medians;
}

// The SGD base's medians: the fallback reads the quotients stored by the pass (lag=1: w
// is overwritten) or recomputes them from w and g.
std::vector<float> finish_medians(const std::vector<LayerRef>& layers, MedianPlan& plan,
                                  const std::vector<LayerSums>& sums, bool from_quotients, bool approx,
                                  double weight_decay, int threads) {
  return select_medians(layers, plan, sums, approx, threads, [&](int i, auto tag, auto* out) {
    using P = decltype(tag);
    using T = math_t<P>;
    const LayerRef& l = layers[i];
    int64_t m = 0;
    if (from_quotients) {
      const T* q = plan.quotients<T>(i);
      for (int64_t j = 0; j < l.n; ++j) {
        if (q[j] >= 0) out[m++] = q[j];
      }
    } else {
      const P* w = static_cast<const P*>(l.w);
      const P* g = static_cast<const P*>(l.g);
      for (int64_t j = 0; j < l.n; ++j) {
        if (load(w[j]) != 0) out[m++] = quotient_at(w, g, T(l.g_unscale), j, T(weight_decay));
      }
    }
    return m;
  });
}

// κ of layer i's current inputs by the group's rule, from the reduction and the norms.
double current_kappa(const StepConfig& cfg, const ReductionIn& reduction, size_t i, double w_norm, double g_norm) {
  const double* sums = reduction.sums + i * SUM_COLUMNS;
  return reduction_kappa(cfg.rule, w_norm, g_norm, sums[SUM_DIFF2], sums[SUM_STEP2], reduction.median[i],
                         cfg.ratio.weight_decay, cfg.ratio.eps);
}

// ------------------------------------------------------------------------ pass 1

// Σx² of one block (m ≤ kSumBlock), in double (square_in_double).  ‖w‖² wherever it may be carried
// to the next step is the double sum of these over the layer's blocks in chunk order:
// the norm the update pass takes of its result then equals the one pass 1 would take
// of the same w (one instance, not inlined: one summation order).
template <typename P>
__attribute__((noinline)) double block_squares(const P* x, int64_t m) {
  using T = math_t<P>;
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < m; ++i) {
    const T v = load(x[i]);
    sum += square_in_double(v);
  }
  return sum;
}

// Σ(x·scale)² of one block, summed as block_squares sums.
template <typename P>
double scaled_block_squares(const P* x, math_t<P> scale, int64_t m) {
  using T = math_t<P>;
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < m; ++i) {
    const T v = load(x[i]) * scale;
    sum += square_in_double(v);
  }
  return sum;
}

// ‖w‖² of a chunk as block_squares sums it, and ‖g·gs‖².
template <typename P>
void carried_squares(const P* w, const P* g, math_t<P> gs, int64_t n, double& w2, double& g2) {
  for (int64_t s = 0; s < n; s += kSumBlock) {
    const int64_t m = std::min(kSumBlock, n - s);
    w2 += block_squares(w + s, m);
    g2 += scaled_block_squares(g + s, gs, m);
  }
}

// Adds Σx² and Σy² (x, y the math values of a and b·bs) to sx and sy: the squares in
// double (square_in_double), partial sums over short blocks (two independent chains of
// adds), added up in block order.  When a == b only sy is meaningful.
template <typename P>
void sum_squares(const P* a, const P* b, math_t<P> bs, int64_t n, double& sx, double& sy) {
  using T = math_t<P>;
  for (int64_t s = 0; s < n; s += kSumBlock) {
    const int64_t m = std::min(kSumBlock, n - s);
    double bx = 0, by = 0;
#pragma omp simd reduction(+ : bx, by)
    for (int64_t i = 0; i < m; ++i) {
      T x = load(a[s + i]), y = load(b[s + i]) * bs;
      bx += square_in_double(x);
      by += square_in_double(y);
    }
    sx += bx;
    sy += by;
  }
}

template <typename P>
void reduce_chunk(const LayerRef& l, const Chunk& c, bool read_w, bool read_g, const Bracket<math_t<P>>* bracket,
                  math_t<P>* candidates, math_t<P> weight_decay, ChunkResult& r) {
  const P* w = static_cast<const P*>(l.w) + c.begin;
  const P* g = static_cast<const P*>(l.g) + c.begin;
  const int64_t n = c.end - c.begin;
  const math_t<P> gs(l.g_unscale);
  double w2 = 0, g2 = 0;
  if (!read_w) {  // ‖g‖ and the non-finite check only (when wanted)
    double unused = 0;
    if (read_g) sum_squares(g, g, gs, n, unused, g2);
  } else if (!bracket) {
    carried_squares(w, g, gs, n, w2, g2);  // Σw² as the update pass sums it (LayerRef::next_w2)
  } else {
    for (int64_t b = 0; b < n; b += kSumBlock) {
      const int64_t m = std::min(kSumBlock, n - b);
      collect_quotients(w + b, g + b, gs, m, weight_decay, *bracket, candidates + c.begin, r.counts, w2, g2);
    }
  }
  r.w2 = w2;
  r.g2 = g2;
}

// CBLR secant of one chunk: ‖g_t‖², ‖d(w_t) − d(w_t + s)‖² and ‖s‖² from g_t, the probe
// gradient and s (the shift's realised displacement).  w is not read: it
// sits at the probe point, and ‖w_t‖ is the shift's.
template <typename P>
void secant_chunk(const LayerRef& l, const Chunk& c, math_t<P> weight_decay, ChunkResult& r) {
  using T = math_t<P>;
  const P* g = static_cast<const P*>(l.g) + c.begin;
  const P* g_p = static_cast<const P*>(l.probe_g) + c.begin;
  const T* s = static_cast<const T*>(l.step) + c.begin;
  const T gs(l.g_unscale);
  const int64_t n = c.end - c.begin;
  for (int64_t b = 0; b < n; b += kSumBlock) {  // block sums as in sum_squares
    const int64_t m = std::min(kSumBlock, n - b);
    double bg = 0, bd = 0, bs = 0;
#pragma omp simd reduction(+ : bg, bd, bs)
    for (int64_t j = b; j < b + m; ++j) {
      const T gv = load(g[j]) * gs;
      const T diff = secant_difference(gv, T(load(g_p[j])) * gs, s[j], weight_decay);
      bg += square_in_double(gv);
      bd += square_in_double(diff);
      bs += square_in_double(s[j]);
    }
    r.g2 += bg;
    r.d2 += bd;
    r.s2 += bs;
  }
}

// ------------------------------------------------------------------------ pass 2

// Lag: 0 = no stash, 1 = measure the inputs' norms, 2 = norms and median quotients.
// w_in: w_t (w itself, or the copy a CBLR probe saved).
template <typename P, bool Momentum, bool Nesterov, bool KeepPrev, int Lag>
void apply_range(P* w, const P* w_in, const P* g, math_t<P> gs, math_t<P>* v, math_t<P>* prev, math_t<P>* h,
                 int64_t n, math_t<P> alpha, math_t<P> momentum, math_t<P> weight_decay, ChunkResult& r) {
  using T = math_t<P>;
  double w2 = 0, g2 = 0, s2 = 0;  // block sums (n ≤ kSumBlock), as in sum_squares
#pragma omp simd reduction(+ : w2, g2, s2)
  for (int64_t i = 0; i < n; ++i) {
    T wv = load(w_in[i]), gv = load(g[i]) * gs;
    if (Lag) {
      w2 += square_in_double(wv);
      g2 += square_in_double(gv);
    }
    T d = decayed_grad(gv, wv, weight_decay);
    if (Lag == 2) {
      T q = curvature_quotient(d, wv);
      h[i] = wv != 0 ? q : kNoQuotient<T>;
    }
    T vv = Momentum ? v[i] : T(0);
    T s = momentum_update(wv, d, vv, alpha, momentum, Momentum, Nesterov);
    w[i] = store<P>(wv);
    if (Momentum) v[i] = vv;
    if (KeepPrev) prev[i] = s;
    s2 += square_in_double(s);
  }
  r.w2 += w2;
  r.g2 += g2;
  r.s2 += s2;
}

// Lag 2 keeps every quotient for the fallback selection: computed into a buffer in L1,
// collected from there, then copied out (streamed when the call keeps more than the
// caches hold: the copy is read again only if the bracket missed).
template <typename P, bool Momentum, bool Nesterov, bool KeepPrev, int Lag>
void apply_chunk(const LayerRef& l, const Chunk& c, math_t<P> alpha, math_t<P> momentum,
                 math_t<P> weight_decay, const Bracket<math_t<P>>* bracket, math_t<P>* candidates,
                 math_t<P>* quotients, bool stream, ChunkResult& r) {
  using T = math_t<P>;
  const bool next_w2 = l.next_w2 != nullptr;
  P* w = static_cast<P*>(l.w) + c.begin;
  const P* w_in = static_cast<const P*>(l.value()) + c.begin;
  const P* g = static_cast<const P*>(l.g) + c.begin;
  T* v = Momentum ? static_cast<T*>(l.v) + c.begin : nullptr;
  T* prev = KeepPrev ? static_cast<T*>(l.prev) + c.begin : nullptr;
  const int64_t n = c.end - c.begin;
  alignas(64) T h[Lag == 2 ? kSumBlock : 1];
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t m = std::min(kSumBlock, n - b);
    apply_range<P, Momentum, Nesterov, KeepPrev, Lag>(w + b, w_in + b, g + b, T(l.g_unscale),
                                                      Momentum ? v + b : nullptr,
                                                      KeepPrev ? prev + b : nullptr, h, m, alpha,
                                                      momentum, weight_decay, r);
    if (Lag == 2) {
      collect_block(h, m, *bracket, candidates + c.begin, r.counts);
      copy_bytes(quotients + c.begin + b, h, m * int64_t(sizeof(T)), stream);
    }
    if (next_w2) r.next_w2 += block_squares(w + b, m);  // from L1
  }
  if (Lag == 2 && stream) stream_fence();
}

template <typename P>
void apply_chunk_dispatch(const StepConfig& cfg, const LayerRef& l, const Chunk& c, double alpha, int lag,
                          MedianPlan& plan, bool stream, ChunkResult& r) {
  using T = math_t<P>;
  const Bracket<T>* bracket = plan.collecting<T>(c.layer);
  if (lag == 2 && !bracket) lag = 1;  // median known up front (small layer) or not needed
  with_flag(l.v != nullptr, [&](auto momentum) {
    with_flag(cfg.nesterov, [&](auto nesterov) {
      with_flag(l.prev != nullptr, [&](auto keep_prev) {
        auto run = [&](auto lag_mode) {
          apply_chunk<P, momentum.value, nesterov.value && momentum.value, keep_prev.value, lag_mode.value>(
              l, c, T(alpha), T(cfg.momentum), T(cfg.weight_decay), bracket,
              lag_mode.value == 2 ? plan.candidates<T>(c.layer) : nullptr,
              lag_mode.value == 2 ? plan.quotients<T>(c.layer) : nullptr, stream, r);
        };
        if (lag == 2) {
          run(std::integral_constant<int, 2>{});
        } else if (lag == 1) {
          run(std::integral_constant<int, 1>{});
        } else {
          run(std::integral_constant<int, 0>{});
        }
      });
    });
  });
}

}  // namespace

void reduce_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, const ReductionOut& reduction) {
  const size_t count = layers.size();
  std::vector<char> measured(count), selects(count), read_w(count), known(count), read_g(count);
  for (size_t i = 0; i < count; ++i) {
    const LayerRef& l = layers[i];
    const bool full = !(cfg.lag && l.lagged_valid);
    measured[i] = l.adapt && (cfg.rule == RULE_CBLR ? l.measures
                                                    : measurement_due(*l.age, cfg.curvature_interval));
    selects[i] = cfg.rule == RULE_MCLR && full && measured[i];
    // Before the update Σw² and Σg² matter only to a measurement and to the fallback: a
    // layer that does not measure reads g alone here, for the non-finite check, the
    // update pass sums its squares for the statistics, and reads them first only where
    // the ratio falls back.
    read_w[i] = full && measured[i];
    // Where w is read for Σw² alone, a known Σw² spares the read: the previous update
    // pass's (LARS), the shift's Σw_t² (a CBLR probe: w sits at w_t + s).
    known[i] = l.measures || (read_w[i] && !selects[i] && l.has_known_w2);
    if (known[i]) read_w[i] = false;
    read_g[i] = read_w[i] || known[i] || cfg.check_nonfinite;
  }
  MedianPlan plan(cfg, layers, selects, false);
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<ChunkResult> results(chunks.size());
  parallel_items(int64_t(chunks.size()), cfg.threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    const LayerRef& l = layers[c.layer];
    dispatch(l.dtype, [&](auto tag) {
      using P = decltype(tag);
      using T = math_t<P>;
      if (l.measures) {
        secant_chunk<P>(l, c, T(cfg.weight_decay), results[k]);
      } else {
        reduce_chunk<P>(l, c, read_w[c.layer], read_g[c.layer], plan.collecting<T>(c.layer),
                        plan.candidates<T>(c.layer), T(cfg.weight_decay), results[k]);
      }
    });
  });
  const std::vector<LayerSums> sums = sum_chunks(count, chunks, results);
  const std::vector<float> medians = finish_medians(layers, plan, sums, false, cfg.approx_median, cfg.weight_decay,
                                                      cfg.threads);
  for (size_t i = 0; i < count; ++i) {
    const LayerRef& l = layers[i];
    const bool norms = read_w[i] || known[i];
    double* row = reduction.sums + i * SUM_COLUMNS;
    row[SUM_W2] = norms ? (read_w[i] ? sums[i].w2 : l.known_w2) : 0.0;
    row[SUM_G2] = norms ? sums[i].g2 : 0.0;
    row[SUM_DIFF2] = l.measures ? sums[i].d2 : 0.0;
    row[SUM_STEP2] = l.measures ? sums[i].s2 : 0.0;
    reduction.median[i] = medians[i];
    bool* flags = reduction.flags + i * FLAG_COLUMNS;
    flags[FLAG_MEASURED] = measured[i];
    flags[FLAG_NORMS] = norms;
    flags[FLAG_MEDIAN] = selects[i];
    flags[FLAG_NONFINITE] = layer_nonfinite(l, sums[i].g2, sums[i].d2);
  }
}

// ‖w‖² and ‖g‖² of the chosen layers, read before anything is written (the fallback's
// norms where pass 1 did not take them, and the statistics of a skipped step).
std::vector<LayerSums> input_norms(const StepConfig& cfg, const std::vector<LayerRef>& layers,
                                   const std::vector<char>& chosen) {
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<ChunkResult> results(chunks.size());
  int64_t elements = 0;
  for (size_t i = 0; i < layers.size(); ++i) elements += chosen[i] ? layers[i].n : 0;
  parallel_items(int64_t(chunks.size()), cfg.threads, elements, [&](int64_t k) {
    const Chunk& c = chunks[k];
    if (!chosen[c.layer]) return;
    const LayerRef& l = layers[c.layer];
    dispatch(l.dtype, [&](auto tag) {
      using P = decltype(tag);
      sum_squares(static_cast<const P*>(l.value()) + c.begin, static_cast<const P*>(l.g) + c.begin,
                  math_t<P>(l.g_unscale), c.end - c.begin, results[k].w2, results[k].g2);
    });
  });
  return sum_chunks(layers.size(), chunks, results);
}

void apply_layers(const StepConfig& cfg, const std::vector<LayerRef>& layers, const ReductionIn& reduction,
                  bool skip, float lr, double* stats) {
  const size_t count = layers.size();
  const double nan = quiet_nan_double();
  std::vector<LayerRatio> ratios(count);
  std::vector<double> alphas(count), norms(2 * count);
  std::vector<float> new_ages(count);
  std::vector<char> measured(count), selects(count), unmeasured(count), read_first(count);
  for (size_t i = 0; i < count; ++i) {
    const LayerRef& l = layers[i];
    const bool* flags = reduction.flags + i * FLAG_COLUMNS;
    measured[i] = flags[FLAG_MEASURED];
    double kappa;
    if (cfg.lag && l.lagged_valid) {  // lag=1: ‖w‖, ‖g‖ and κ of the previous step's inputs
      norms[2 * i] = l.lagged[LAGGED_W_NORM];
      norms[2 * i + 1] = l.lagged[LAGGED_G_NORM];
      kappa = l.lagged[LAGGED_KAPPA];
    } else {
      // The reduction left the norms out (pass 1 of a layer that does not measure): this
      // pass takes them.
      unmeasured[i] = !flags[FLAG_NORMS];
      const double* sums = reduction.sums + i * SUM_COLUMNS;
      norms[2 * i] = unmeasured[i] ? nan : norm_from_sum(sums[SUM_W2]);
      norms[2 * i + 1] = unmeasured[i] ? nan : norm_from_sum(sums[SUM_G2]);
      kappa = current_kappa(cfg, reduction, i, norms[2 * i], norms[2 * i + 1]);
    }
    ratios[i] = layer_ratio(kappa, measured[i], *l.kappa, norms[2 * i], norms[2 * i + 1], l.adapt, cfg.ratio);
    read_first[i] = unmeasured[i] && (ratios[i].fallback || skip);
  }
  if (std::find(read_first.begin(), read_first.end(), 1) != read_first.end()) {
    const std::vector<LayerSums> first = input_norms(cfg, layers, read_first);
    for (size_t i = 0; i < count; ++i) {
      if (!read_first[i]) continue;
      norms[2 * i] = norm_from_sum(first[i].w2);
      norms[2 * i + 1] = norm_from_sum(first[i].g2);
      unmeasured[i] = false;
      const double kappa = current_kappa(cfg, reduction, i, norms[2 * i], norms[2 * i + 1]);  // LARS: of the norms
      ratios[i] = layer_ratio(kappa, measured[i], *layers[i].kappa, norms[2 * i], norms[2 * i + 1], layers[i].adapt,
                              cfg.ratio);
    }
  }
  for (size_t i = 0; i < count; ++i) {
    const LayerRef& l = layers[i];
    alphas[i] = layer_alpha(ratios[i].ratio, lr);
    new_ages[i] = next_age(*l.age, measured[i]);
    // The stash needs a median only where the next step will measure.
    selects[i] = cfg.lag && cfg.rule == RULE_MCLR && l.adapt &&
                 measurement_due(new_ages[i], cfg.curvature_interval);
    double* row = stats + i * STAT_COLUMNS;
    row[STAT_W_NORM] = norms[2 * i];
    row[STAT_G_NORM] = norms[2 * i + 1];
    row[STAT_STEP_NORM] = 0.0;
    row[STAT_KAPPA] = ratios[i].used;
    row[STAT_RATIO] = ratios[i].ratio;
    row[STAT_ALPHA] = alphas[i];
    row[STAT_FALLBACK] = ratios[i].fallback ? 1.0 : 0.0;
  }
  if (skip) return;
  MedianPlan plan(cfg, layers, selects, true);
  int64_t kept = 0;  // quotients kept for the fallback (lag=1)
  for (size_t i = 0; i < count; ++i) kept += selects[i] ? layers[i].n : 0;
  const bool stream = kept * 4 > kStreamBytes;
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<ChunkResult> results(chunks.size());
  parallel_items(int64_t(chunks.size()), cfg.threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    const LayerRef& l = layers[c.layer];
    const int lag = plan.selects(c.layer) ? 2 : cfg.lag || unmeasured[c.layer] ? 1 : 0;
    dispatch(l.dtype, [&](auto tag) {
      apply_chunk_dispatch<decltype(tag)>(cfg, l, c, alphas[c.layer], lag, plan, stream, results[k]);
    });
  });
  const std::vector<LayerSums> sums = sum_chunks(count, chunks, results);
  const std::vector<float> medians = finish_medians(layers, plan, sums, true, cfg.approx_median, cfg.weight_decay,
                                                      cfg.threads);
  for (size_t i = 0; i < count; ++i) {
    const LayerRef& l = layers[i];
    double* row = stats + i * STAT_COLUMNS;
    row[STAT_STEP_NORM] = norm_from_sum(sums[i].s2);
    if (unmeasured[i]) {
      row[STAT_W_NORM] = norm_from_sum(sums[i].w2);
      row[STAT_G_NORM] = norm_from_sum(sums[i].g2);
    }
    *l.kappa = ratios[i].new_bar;
    *l.age = new_ages[i];
    if (l.next_w2) *l.next_w2 = sums[i].next_w2;
    if (cfg.lag) {  // this step's inputs, for the next step (MCLR: its median where selected)
      const double w_norm = norm_from_sum(sums[i].w2), g_norm = norm_from_sum(sums[i].g2);
      const double* secant = reduction.sums + i * SUM_COLUMNS;
      l.lagged[LAGGED_W_NORM] = w_norm;
      l.lagged[LAGGED_G_NORM] = g_norm;
      l.lagged[LAGGED_KAPPA] = reduction_kappa(cfg.rule, w_norm, g_norm, secant[SUM_DIFF2], secant[SUM_STEP2],
                                               medians[i], cfg.ratio.weight_decay, cfg.ratio.eps);
    }
  }
}

}  // namespace cblr::cpu::CBLR_ISA

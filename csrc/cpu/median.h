// Exact lower median of a layer's curvature quotients h_i = |d_i| / |w_i| (w_i ≠ 0),
// found within a pass that streams the layer anyway (pass 1, or the update pass
// under lag=1):
//   1. before the pass, pivots lo ≤ hi from a fixed pseudo-random sample bracket the
//      median with high probability (small layers: the median itself, directly);
//   2. during the pass each chunk counts the quotients below lo and copies those in
//      [lo, hi] to its own slice of a candidate buffer;
//   3. after it, a radix selection over the few candidates (select_kth_between) gives the median;
//      when the bracket missed, a selection over all quotients (rare, still exact).
// median="approx" is this exact median with its low 16 bits cleared (layer_math.h): the
// same pass, then a count per bf16 bin over the candidates instead of the selection.
// Any NaN quotient makes the median NaN, as torch.median does.
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)

constexpr int64_t kDirectLimit = 16384;  // layers up to this size select directly
constexpr int64_t kSampleRuns = 256, kRunLength = 16;

// The sentinel quotient stored where w_i = 0 (real quotients are ≥ 0 or NaN).
template <typename T> constexpr T kNoQuotient = T(-1);

template <typename T>
struct Bracket {
  T lo = 0, hi = std::numeric_limits<T>::infinity();
  bool known = false;  // small layer: value is the median (NaN when undefined)
  T value = 0;
};

struct MedianCounts {
  int64_t below = 0, valid = 0, nan = 0, inside = 0;
  void add(const MedianCounts& o) {
    below += o.below; valid += o.valid; nan += o.nan; inside += o.inside;
  }
};

// Where each chunk of a layer left its candidates: (offset, count), in chunk order.
using Slices = std::vector<std::pair<int64_t, int64_t>>;

template <typename P>
inline math_t<P> quotient_at(const P* w, const P* g, math_t<P> gs, int64_t i, math_t<P> weight_decay) {
  using T = math_t<P>;
  T wv = load(w[i]);
  return curvature_quotient(decayed_grad(T(load(g[i])) * gs, wv, weight_decay), wv);
}

// Unsigned keys in the order of the quotients (≥ +0: curvature_quotient clears the sign):
// their bit patterns.
template <typename T>
inline auto order_key(T x) {
  std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t> bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

constexpr int kRadixBits = 11;           // 2048 bins of 64-bit counts: 16 KB, in L1
constexpr int64_t kNthElementLimit = 256;

// The k-th smallest of values[0, n) (≥ 0, no NaN; overwritten) whose keys all lie in
// [lowest, highest]: a radix select over the keys, one histogram of the next 11 bits per
// round, then the values of the bin that holds rank k compacted in place.  Rounds start at
// the highest bit in which lowest and highest differ, so a narrow range (a bracket's
// candidates) is not counted in one bin first.  Linear time with no data-dependent
// branches, unlike nth_element, whose mispredicted comparisons cost several times a
// counting pass.
// std::bit_width of x > 0 (C++20; torch 2.11's extensions build as C++17).
template <typename K>
inline int bit_width_of(K x) {
  return 64 - __builtin_clzll(static_cast<unsigned long long>(x));
}

template <typename T, typename K>
T select_kth_between(T* values, int64_t n, int64_t k, K lowest, K highest) {
  int shift = lowest == highest ? 0 : bit_width_of(K(lowest ^ highest));
  while (shift > 0 && n > kNthElementLimit) {  // shift = 0: every key is equal
    const int digit = std::min(kRadixBits, shift);
    shift -= digit;
    const K mask = (K(1) << digit) - 1;
    int64_t counts[1 << kRadixBits] = {};
    for (int64_t i = 0; i < n; ++i) ++counts[(order_key(values[i]) >> shift) & mask];
    K bin = 0;
    while (k >= counts[bin]) k -= counts[bin++];
    if (counts[bin] == n) continue;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {  // in place: kept ≤ i
      const T x = values[i];
      values[kept] = x;
      kept += ((order_key(x) >> shift) & mask) == bin;
    }
    n = kept;
  }
  if (shift == 0) return values[k];
  std::nth_element(values, values + k, values + n);
  return values[k];
}

// The k-th smallest of values[0, n) (≥ 0, no NaN; overwritten).
template <typename T>
T select_kth(T* values, int64_t n, int64_t k) {
  using K = decltype(order_key(T{}));
  K lowest = std::numeric_limits<K>::max(), highest = 0;
#pragma omp simd reduction(min : lowest) reduction(max : highest)
  for (int64_t i = 0; i < n; ++i) {
    const K key = order_key(values[i]);
    lowest = std::min(lowest, key);
    highest = std::max(highest, key);
  }
  return select_kth_between(values, n, k, lowest, highest);
}

// Pivots around rank k of the m sample values: the sample rank has standard deviation
// ≤ √m / 2, keep ±3 of them plus slack.  Overwrites sample.
template <typename T>
inline void bracket_pivots(std::vector<T>& sample, double fraction, T& lo, T& hi) {
  const int64_t m = int64_t(sample.size());
  const int64_t center = int64_t(fraction * double(m));
  const int64_t delta = int64_t(1.5 * std::sqrt(double(m))) + 16;
  const int64_t lo_rank = std::max<int64_t>(0, center - delta), hi_rank = std::min<int64_t>(m - 1, center + delta);
  std::vector<T> copy(sample);
  lo = select_kth(copy.data(), m, lo_rank);
  hi = std::max(select_kth(sample.data(), m, hi_rank), lo);
}

// The lower median of values[0, n) (≥ 0 or NaN; overwritten), NaN when n = 0 or any value
// is NaN.
template <typename T>
inline T select_lower_median(T* values, int64_t n) {
  if (n == 0) return std::numeric_limits<T>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
    if (values[i] != values[i]) return values[i];
  }
  return select_kth(values, n, lower_median_rank(n));
}

// The bracket of one layer of n elements, from quotient(i) (element i's quotient h_i ≥ 0
// or NaN, kNoQuotient where w_i = 0) and prefetch(i) (requests element i's inputs).
template <typename T, typename Quotient, typename Prefetch>
Bracket<T> bracket_of(int64_t n, Quotient&& quotient, Prefetch&& prefetch) {
  Bracket<T> b;
  std::vector<T> q;
  if (n <= kDirectLimit) {
    q.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const T h = quotient(i);
      if (!(h < 0)) q.push_back(h);  // NaN kept: it makes the median NaN
    }
    b.known = true;
    b.value = select_lower_median(q.data(), int64_t(q.size()));
    return b;
  }
  // kSampleRuns runs of kRunLength consecutive elements (a cache line each for fp32) at
  // pseudo-random positions: as cheap as kSampleRuns random loads.
  q.reserve(kSampleRuns * kRunLength);
  int64_t starts[kSampleRuns];
  uint64_t state = 0x9E3779B97F4A7C15ull ^ uint64_t(n);
  for (int64_t k = 0; k < kSampleRuns; ++k) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;  // LCG (Knuth MMIX)
    starts[k] = int64_t((state >> 33) % uint64_t(n - kRunLength)) & ~(kRunLength - 1);
    // All runs are requested before any is read: the misses overlap instead of queueing.
    prefetch(starts[k]);
  }
  for (const int64_t start : starts) {
    for (int64_t i = start; i < start + kRunLength; ++i) {
      const T h = quotient(i);
      if (h >= 0) q.push_back(h);  // neither w_i = 0 nor NaN
    }
  }
  if (q.size() < 256) return b;  // too few usable samples: the bracket is everything
  bracket_pivots(q, 0.5, b.lo, b.hi);
  return b;
}

// The bracket of the SGD base's quotients |g_i + β·w_i| / |w_i|.
template <typename P>
Bracket<math_t<P>> make_bracket(const P* w, const P* g, math_t<P> gs, int64_t n, math_t<P> weight_decay) {
  using T = math_t<P>;
  return bracket_of<T>(
      n, [&](int64_t i) { return load(w[i]) != 0 ? quotient_at(w, g, gs, i, weight_decay) : kNoQuotient<T>; },
      [&](int64_t i) {
        __builtin_prefetch(w + i);
        __builtin_prefetch(g + i);
      });
}

// Counts one block of quotients h[0, m) (kNoQuotient where w = 0) against the bracket
// and appends the ones inside it at cand[counts.inside].
template <typename T>
inline void collect_block(const T* h, int64_t m, const Bracket<T>& b, T* cand, MedianCounts& counts) {
  // 32-bit counters (m ≤ kSumBlock) and an explicit simd loop: with int64 counters gcc
  // left this loop scalar, the costliest part of the MCLR pass.
  int32_t below = 0, valid = 0, nan = 0, inside = 0;
  uint8_t in[kSumBlock];
  const T lo = b.lo, hi = b.hi;
#pragma omp simd reduction(+ : below, valid, nan, inside)
  for (int64_t j = 0; j < m; ++j) {
    const T x = h[j];
    const int32_t is_in = (x >= lo) & (x <= hi);
    valid += x >= 0;
    below += (x >= 0) & (x < lo);
    nan += x != x;
    in[j] = uint8_t(is_in);
    inside += is_in;
  }
  if (inside) {
    int64_t k = counts.inside;
    for (int64_t j0 = 0; j0 < m; j0 += 8) {
      if (j0 + 8 > m) {  // tail: branch-free, write always and advance when inside
        for (int64_t j = j0; j < m; ++j) {
          cand[k] = h[j];
          k += in[j];
        }
        break;
      }
      uint64_t group;
      std::memcpy(&group, in + j0, 8);
      // Eight 0/1 bytes to an 8-bit mask (byte i to bit i), then visit the set bits only.
      uint32_t bits = uint32_t((group * 0x0102040810204080ull) >> 56);
      while (bits) {
        cand[k++] = h[j0 + __builtin_ctz(bits)];
        bits &= bits - 1;
      }
    }
  }
  counts.below += below; counts.valid += valid; counts.nan += nan; counts.inside += inside;
}

#if defined(CBLR_ISA_AVX512)
// The AVX-512 variant for fp32 (the same counts and candidates, in the same order):
// lane masks count, and a compress packs the candidates of 16 quotients into one store.
// A full store at cand[k] stays inside the chunk's slice: k never exceeds the number of
// quotients before this group (the last, partial group stores only its candidates).
inline void collect_block(const float* h, int64_t m, const Bracket<float>& b, float* cand, MedianCounts& counts) {
  const __m512 lo = _mm512_set1_ps(b.lo), hi = _mm512_set1_ps(b.hi), zero = _mm512_setzero_ps();
  int64_t below = 0, valid = 0, nan = 0, k = counts.inside;
  for (int64_t j = 0; j < m; j += 16) {
    const bool full = m - j >= 16;
    const __mmask16 lanes = full ? __mmask16(0xFFFF) : __mmask16((1u << (m - j)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, h + j);
    const __mmask16 is_valid = _mm512_mask_cmp_ps_mask(lanes, x, zero, _CMP_GE_OQ);
    const __mmask16 is_below = _mm512_mask_cmp_ps_mask(is_valid, x, lo, _CMP_LT_OQ);
    const __mmask16 is_nan = _mm512_mask_cmp_ps_mask(lanes, x, x, _CMP_UNORD_Q);
    const __mmask16 is_in = _mm512_mask_cmp_ps_mask(_mm512_mask_cmp_ps_mask(lanes, x, lo, _CMP_GE_OQ), x, hi,
                                                    _CMP_LE_OQ);
    if (full) {
      _mm512_storeu_ps(cand + k, _mm512_maskz_compress_ps(is_in, x));
    } else {
      _mm512_mask_compressstoreu_ps(cand + k, is_in, x);
    }
    k += __builtin_popcount(is_in);
    valid += __builtin_popcount(is_valid);
    below += __builtin_popcount(is_below);
    nan += __builtin_popcount(is_nan);
  }
  counts.below += below; counts.valid += valid; counts.nan += nan; counts.inside = k;
}
#endif

// The quotients of one block (m ≤ kSumBlock elements), kNoQuotient where w = 0, and the
// block's Σw² and Σg² (in the same loop: the pass is bound by this loop's arithmetic
// and a separate norm loop would stall on memory without overlapping it).
template <typename P>
inline void block_quotients(const P* w, const P* g, math_t<P> gs, int64_t m, math_t<P> weight_decay,
                            math_t<P>* h, double& w2, double& g2) {
  using T = math_t<P>;
  double bw = 0, bg = 0;
#pragma omp simd reduction(+ : bw, bg)
  for (int64_t j = 0; j < m; ++j) {
    const T wv = load(w[j]), gv = load(g[j]) * gs;
    bw += square_in_double(wv);
    bg += square_in_double(gv);
    const T q = curvature_quotient(decayed_grad(gv, wv, weight_decay), wv);
    h[j] = wv != 0 ? q : kNoQuotient<T>;
  }
  w2 += bw;
  g2 += bg;
}

// Counts and collects the quotients of one block against the bracket; adds its Σw², Σg².
template <typename P>
inline void collect_quotients(const P* w, const P* g, math_t<P> gs, int64_t m, math_t<P> weight_decay,
                              const Bracket<math_t<P>>& b, math_t<P>* cand, MedianCounts& counts,
                              double& w2, double& g2) {
  alignas(64) math_t<P> h[kSumBlock];
  block_quotients(w, g, gs, m, weight_decay, h, w2, g2);
  collect_block(h, m, b, cand, counts);
}

// median="approx" needs only the k-th value truncated to bf16 (approx_median), and as
// truncation is monotone that is the k-th truncated value: a count per bf16 bin between
// lo and hi (≥ 0) over the chunks' candidates replaces the selection.  False when the
// bracket spans too many bins.
constexpr uint32_t kMaxApproxBins = 4096;

inline bool approx_kth(const float* cand, const Slices& slices, int64_t k, float lo, float hi, float& out) {
  const uint32_t shift = 32 - __builtin_popcount(kApproxMask);
  const uint32_t base = float_bits(lo) >> shift, top = float_bits(hi) >> shift;
  if (top - base >= kMaxApproxBins) return false;
  std::vector<int64_t> bins(top - base + 1, 0);
  for (const auto& [offset, count] : slices) {
    for (int64_t i = offset; i < offset + count; ++i) ++bins[(float_bits(cand[i]) >> shift) - base];
  }
  for (uint32_t bin = 0; bin <= top - base; ++bin) {
    if (k < bins[bin]) {
      out = bits_float((base + bin) << shift);
      return true;
    }
    k -= bins[bin];
  }
  return false;
}

inline bool approx_kth(const double*, const Slices&, int64_t, double, double, double&) { return false; }

// The median from the bracket and the summed counts.  ``slices`` lists each chunk's
// candidates in cand; ``all_quotients(out)`` writes every valid quotient of the layer to
// out (the fallback) and returns how many.
template <typename T, typename AllQuotients>
T finish_median(const Bracket<T>& b, const MedianCounts& c, const Slices& slices, T* cand, bool approx,
                AllQuotients&& all_quotients) {
  if (b.known) return b.value;
  if (c.nan > 0 || c.valid == 0) return std::numeric_limits<T>::quiet_NaN();
  int64_t k = lower_median_rank(c.valid);
  if (c.below <= k && k < c.below + c.inside) {
    T value;
    if (approx && approx_kth(cand, slices, k - c.below, b.lo, b.hi, value)) return value;
    int64_t filled = 0;
    for (const auto& [offset, count] : slices) {
      if (offset != filled) std::copy(cand + offset, cand + offset + count, cand + filled);
      filled += count;
    }
    return select_kth_between(cand, filled, k - c.below, order_key(b.lo), order_key(b.hi));
  }
  return select_lower_median(cand, all_quotients(cand));
}

}  // namespace cblr::cpu::CBLR_ISA

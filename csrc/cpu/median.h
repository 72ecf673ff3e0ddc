// Exact lower median of a layer's curvature quotients h_i = |d_i| / |w_i| (w_i ≠ 0),
// found within a pass that streams the layer anyway (pass 1, or the update pass
// under lag=1):
//   1. before the pass, pivots lo ≤ hi from a fixed pseudo-random sample bracket the
//      median with high probability (small layers: the median itself, directly);
//   2. during the pass each chunk counts the quotients below lo and copies those in
//      [lo, hi] to its own slice of a candidate buffer;
//   3. after it, nth_element over the few candidates gives the median; when the
//      bracket missed, a full nth_element over all quotients (rare, still exact).
// Any NaN quotient makes the median NaN, as torch.median does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "layers.h"

namespace cblr {
namespace cpu {

constexpr int64_t kBlock = 256;          // quotients per block between collections
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

template <typename P>
inline math_t<P> quotient_at(const P* w, const P* g, int64_t i, math_t<P> weight_decay) {
  using T = math_t<P>;
  T wv = load(w[i]);
  return curvature_quotient(decayed_grad(T(load(g[i])), wv, weight_decay), wv);
}

// The lower median of values[0, n) (reordered), NaN when n = 0 or any value is NaN.
template <typename T>
inline T select_lower_median(T* values, int64_t n) {
  if (n == 0) return std::numeric_limits<T>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
    if (values[i] != values[i]) return values[i];
  }
  T* mid = values + lower_median_rank(n);
  std::nth_element(values, mid, values + n);
  return *mid;
}

template <typename P>
Bracket<math_t<P>> make_bracket(const P* w, const P* g, int64_t n, math_t<P> weight_decay) {
  using T = math_t<P>;
  Bracket<T> b;
  std::vector<T> q;
  if (n <= kDirectLimit) {
    q.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      if (load(w[i]) != 0) q.push_back(quotient_at(w, g, i, weight_decay));
    }
    b.known = true;
    b.value = select_lower_median(q.data(), int64_t(q.size()));
    return b;
  }
  // kSampleRuns runs of kRunLength consecutive elements (a cache line each for fp32) at
  // pseudo-random positions: as cheap as kSampleRuns random loads.
  q.reserve(kSampleRuns * kRunLength);
  uint64_t state = 0x9E3779B97F4A7C15ull ^ uint64_t(n);
  for (int64_t k = 0; k < kSampleRuns; ++k) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;  // LCG (Knuth MMIX)
    const int64_t start = int64_t((state >> 33) % uint64_t(n - kRunLength)) & ~(kRunLength - 1);
    for (int64_t i = start; i < start + kRunLength; ++i) {
      if (load(w[i]) == 0) continue;
      T h = quotient_at(w, g, i, weight_decay);
      if (h == h) q.push_back(h);
    }
  }
  int64_t m = int64_t(q.size());
  if (m < 256) return b;  // too few usable samples: the bracket is everything
  // The sample median's rank has standard deviation √m / 2: keep ±3 of them plus slack.
  int64_t delta = int64_t(1.5 * std::sqrt(double(m))) + 16;
  int64_t lo = std::max<int64_t>(0, m / 2 - delta), hi = std::min<int64_t>(m - 1, m / 2 + delta);
  std::nth_element(q.begin(), q.begin() + lo, q.end());
  std::nth_element(q.begin() + lo + 1, q.begin() + hi, q.end());
  b.lo = q[lo];
  b.hi = std::max(q[hi], b.lo);
  return b;
}

// Counts one block of quotients h[0, m) (kNoQuotient where w = 0) against the bracket
// and appends the ones inside it at cand[counts.inside].
template <typename T>
inline void collect_block(const T* h, int64_t m, const Bracket<T>& b, T* cand, MedianCounts& counts) {
  int64_t below = 0, valid = 0, nan = 0, inside = 0;
  uint8_t in[kBlock];
  const T lo = b.lo, hi = b.hi;
  for (int64_t j = 0; j < m; ++j) {
    T x = h[j];
    valid += x >= 0;
    below += (x >= 0) & (x < lo);
    nan += x != x;
    in[j] = (x >= lo) & (x <= hi);
    inside += in[j];
  }
  if (inside) {
    int64_t k = counts.inside;
    for (int64_t j0 = 0; j0 < m; j0 += 8) {  // skip groups of eight without a candidate
      uint64_t group = 0;
      if (j0 + 8 <= m) std::memcpy(&group, in + j0, 8);
      if (j0 + 8 <= m && group == 0) continue;
      for (int64_t j = j0; j < std::min(j0 + 8, m); ++j) {  // branch-free: write, advance when inside
        cand[k] = h[j];
        k += in[j];
      }
    }
  }
  counts.below += below; counts.valid += valid; counts.nan += nan; counts.inside += inside;
}

// The median from the bracket and the summed counts.  ``slices`` lists each chunk's
// (offset into cand, count) in order; ``all_quotients(out)`` writes every valid quotient
// of the layer to out (the fallback) and returns how many.
template <typename T, typename AllQuotients>
T finish_median(const Bracket<T>& b, const MedianCounts& c,
                const std::vector<std::pair<int64_t, int64_t>>& slices, T* cand,
                AllQuotients&& all_quotients) {
  if (b.known) return b.value;
  if (c.nan > 0 || c.valid == 0) return std::numeric_limits<T>::quiet_NaN();
  int64_t k = lower_median_rank(c.valid);
  if (c.below <= k && k < c.below + c.inside) {
    int64_t filled = 0;
    for (const auto& s : slices) {
      if (s.first != filled) std::copy(cand + s.first, cand + s.first + s.second, cand + filled);
      filled += s.second;
    }
    std::nth_element(cand, cand + (k - c.below), cand + filled);
    return cand[k - c.below];
  }
  return select_lower_median(cand, all_quotients(cand));
}

}  // namespace cpu
}  // namespace cblr

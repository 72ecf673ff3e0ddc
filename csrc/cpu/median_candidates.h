// The sharded median's rounds after the gather (cblr_ext/distributed.py): the counts of
// the gathered candidate keys, a few per cent of a layer's, read alone instead of w and g.
// One thread: the keys are few, and the counts of each layer are added in key order.
#pragma once

#include <cstdint>

namespace cblr {
namespace cpu {

// counts[L][2^width] = 0, then per layer i, its layer_counts[i] keys (layer after layer)
// whose bits above shift + width equal prefixes[i]'s, by the width bits at shift.
inline void count_candidates(const int32_t* keys, const int64_t* layer_counts, const int64_t* prefixes,
                             int64_t layers, int shift, int width, double* counts) {
  const int64_t bins = int64_t(1) << width;
  const int top = shift + width;
  const uint32_t mask = uint32_t(bins - 1);
  for (int64_t i = 0; i < layers; ++i) {
    double* hist = counts + i * bins;
    for (int64_t b = 0; b < bins; ++b) hist[b] = 0.0;
    const uint32_t want = uint32_t(prefixes[i]) >> top;
    for (int64_t j = 0; j < layer_counts[i]; ++j) {
      const uint32_t key = uint32_t(keys[j]);
      if ((key >> top) == want) hist[(key >> shift) & mask] += 1.0;
    }
    keys += layer_counts[i];
  }
}

}  // namespace cpu
}  // namespace cblr

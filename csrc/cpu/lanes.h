// Deterministic vectorisable reductions: eight double accumulators, lane = index mod 8,
// summed in a fixed order, so a sum depends on the data and chunking only (never on
// the thread count), and gcc vectorises the loops without reassociating anything.
#pragma once

#include <cstdint>

namespace cblr {
namespace cpu {

struct Acc8 {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double total() const {
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
};

// Calls f(j, lane) for j in [0, m), in groups of eight consecutive indices.
template <typename F>
inline void for_lanes(int64_t m, F&& f) {
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    for (int u = 0; u < 8; ++u) f(j + u, u);
  }
  for (; j < m; ++j) f(j, int(j & 7));
}

}  // namespace cpu
}  // namespace cblr

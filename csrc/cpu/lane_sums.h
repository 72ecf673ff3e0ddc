// Sums in a fixed order: element j of a block adds to partial sum j % kLanes, in order,
// and the kLanes partial sums are added in a fixed tree.  Nothing depends on the vector
// width (the lanes are one 512-bit, two 256-bit or four 128-bit registers), so every
// instruction-set variant sums alike, and a sum taken inside another loop (the update
// pass measuring ‖w‖ of its result) equals the same sum taken alone (pass 1, next step).
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)

constexpr int kLanes = 16;

template <typename T>
T lane_total(const T (&lanes)[kLanes]) {
  T a[kLanes];
  std::copy(lanes, lanes + kLanes, a);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) a[l] = a[l] + a[l + width];
  }
  return a[0];
}

// Calls body(j, j % kLanes) for j in [0, m) in order; full groups of lanes as one simd
// loop (the lanes are independent: nothing is reassociated).
template <typename Body>
inline void for_lanes(int64_t m, Body&& body) {
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) body(j + l, l);
  }
  for (int l = 0; j + l < m; ++l) body(j + l, l);
}

}  // namespace cblr::cpu::CBLR_ISA

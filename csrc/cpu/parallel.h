// The work-list runner of the CPU passes.
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)

// Runs f(item) for item in [0, count) on up to `threads` threads, one item at a time
// (dynamic: chunks of one layer and whole small layers mix well).  Calls with less
// than one chunk of work stay on the calling thread.
template <typename F>
void parallel_items(int64_t count, int threads, int64_t elements, F&& f) {
  const int team = elements > kChunk ? threads : 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (int64_t item = 0; item < count; ++item) f(item);
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace cblr::cpu::CBLR_ISA

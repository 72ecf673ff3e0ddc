// Copies whose destination is not read again soon (snapshots and restores of whole
// parameter sets): non-temporal stores skip reading each destination line first, so a
// copy moves 2 bytes per byte instead of 3.  Plain copies where SSE2 is missing.
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)

// Calls moving more than this stream their copies: too large to be read back from cache.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Elements per streamed block of a pass that also computes on the data (fits in L1).
constexpr int64_t kStreamBlock = 2048;

// dst = src with non-temporal stores, not yet ordered: stream_fence() once after the
// last one, before the data is read by another thread.
inline void stream_copy_unfenced(void* to, const void* from, int64_t bytes) {
  char* dst = static_cast<char*>(to);
  const char* src = static_cast<const char*>(from);
#if defined(__SSE2__)
  int64_t i = std::min<int64_t>(bytes, (16 - int64_t(reinterpret_cast<uintptr_t>(dst) % 16)) % 16);
  std::memcpy(dst, src, size_t(i));
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
  std::memcpy(dst + i, src + i, size_t(bytes - i));
#else
  std::memcpy(dst, src, size_t(bytes));
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// dst = src, streamed or plain.
inline void copy_bytes(void* dst, const void* src, int64_t bytes, bool stream) {
  if (stream) {
    stream_copy_unfenced(dst, src, bytes);
  } else {
    std::memcpy(dst, src, size_t(bytes));
  }
}

}  // namespace cblr::cpu::CBLR_ISA

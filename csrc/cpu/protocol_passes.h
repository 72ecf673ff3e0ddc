// CBLR closure protocol over all layers of a group: bit-exact copies (snapshot and
// restore), the shift w ← w + s_{t−1}, and the secant norms.
#pragma once
#ifndef CBLR_ISA
#error "included by the isa_*.cpp units only (they name the variant)"
#endif

namespace cblr {
namespace cpu {
namespace CBLR_ISA {

namespace {

// Calls copying more than this stream their stores: too large to be read back from
// cache, and non-temporal stores skip reading the destination first (a ~25% faster copy).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

void stream_copy(char* dst, const char* src, int64_t bytes) {
#if defined(__SSE2__)
  int64_t i = std::min<int64_t>(bytes, (16 - int64_t(reinterpret_cast<uintptr_t>(dst) % 16)) % 16);
  std::memcpy(dst, src, size_t(i));
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
  std::memcpy(dst + i, src + i, size_t(bytes - i));
  _mm_sfence();  // the stores are visible before the parallel region ends
#else
  std::memcpy(dst, src, size_t(bytes));
#endif
}

}  // namespace

void copy_layers(const std::vector<const void*>& src, const std::vector<void*>& dst,
                 const std::vector<int64_t>& bytes, int threads) {
  struct Piece {
    size_t layer;
    int64_t begin, end;
  };
  constexpr int64_t kPieceBytes = kChunk * 4;
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    for (int64_t b = 0; b < bytes[i]; b += kPieceBytes) pieces.push_back({i, b, std::min(b + kPieceBytes, bytes[i])});
    total += bytes[i];
  }
  const bool stream = total > kStreamBytes;
  parallel_items(int64_t(pieces.size()), threads, total / 4, [&](int64_t k) {
    const Piece& p = pieces[k];
    char* to = static_cast<char*>(dst[p.layer]) + p.begin;
    const char* from = static_cast<const char*>(src[p.layer]) + p.begin;
    if (stream) {
      stream_copy(to, from, p.end - p.begin);
    } else {
      std::memcpy(to, from, size_t(p.end - p.begin));
    }
  });
}

void shift_layers(const std::vector<ShiftLayer>& layers, int threads) {
  const std::vector<Chunk> chunks = make_chunks(layers);
  parallel_items(int64_t(chunks.size()), threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    const ShiftLayer& l = layers[c.layer];
    dispatch(l.dtype, [&](auto tag) {
      using P = decltype(tag);
      using T = math_t<P>;
      P* w = static_cast<P*>(l.param);
      const T* s = static_cast<const T*>(l.step);
      // p.add_(s.to(p.dtype)): the step is rounded to the storage type first.
      for (int64_t i = c.begin; i < c.end; ++i) w[i] = store<P>(load(w[i]) + load(store<P>(s[i])));
    });
  });
}

void secant_layers(const std::vector<SecantLayer>& layers, double weight_decay, int threads, float* out) {
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<double> diff2(chunks.size()), step2(chunks.size());
  parallel_items(int64_t(chunks.size()), threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    const SecantLayer& l = layers[c.layer];
    dispatch(l.dtype, [&](auto tag) {
      using P = decltype(tag);
      using T = math_t<P>;
      const P* w_t = static_cast<const P*>(l.w_t) + c.begin;
      const P* g_t = static_cast<const P*>(l.g_t) + c.begin;
      const P* w_p = static_cast<const P*>(l.w_p) + c.begin;
      const P* g_p = static_cast<const P*>(l.g_p) + c.begin;
      const T* s = static_cast<const T*>(l.step) + c.begin;
      const T wd = T(weight_decay);
      const int64_t n = c.end - c.begin;
      double d2 = 0, s2 = 0;
      for (int64_t b = 0; b < n; b += kSumBlock) {  // partial sums in the math type, as in step_passes.h
        const int64_t m = std::min(kSumBlock, n - b);
        T bd = 0, bs = 0;
#pragma omp simd reduction(+ : bd, bs)
        for (int64_t j = b; j < b + m; ++j) {
          T diff = decayed_grad(T(load(g_t[j])), T(load(w_t[j])), wd) -
                   decayed_grad(T(load(g_p[j])), T(load(w_p[j])), wd);
          bd += diff * diff;
          bs += s[j] * s[j];
        }
        d2 += double(bd);
        s2 += double(bs);
      }
      diff2[k] = d2;
      step2[k] = s2;
    });
  });
  std::vector<double> layer_diff2(layers.size(), 0.0), layer_step2(layers.size(), 0.0);
  for (size_t k = 0; k < chunks.size(); ++k) {  // chunk order: independent of the thread count
    layer_diff2[chunks[k].layer] += diff2[k];
    layer_step2[chunks[k].layer] += step2[k];
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    out[2 * i] = float(std::sqrt(layer_diff2[i]));
    out[2 * i + 1] = float(std::sqrt(layer_step2[i]));
  }
}

}  // namespace CBLR_ISA
}  // namespace cpu
}  // namespace cblr

// CBLR closure protocol over all layers of a group: the shift w ← w + s_{t−1} that
// keeps w_t (and takes Σw_t² on the way, so that pass 1 need not read the copy), and
// bit-exact copies (the restore of a skipped or failed step; the update reads w_t from
// the copy otherwise, step_passes.h).
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)

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
    copy_bytes(to, from, p.end - p.begin, stream);
    if (stream) stream_fence();  // the stores are visible before the parallel region ends
  });
}

void shift_layers(const std::vector<ShiftLayer>& layers, int threads, double* w_sq) {
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<ChunkResult> results(chunks.size());
  const bool stream = total_elements(layers) * 4 > kStreamBytes;
  parallel_items(int64_t(chunks.size()), threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    const ShiftLayer& l = layers[c.layer];
    dispatch(l.dtype, [&](auto tag) {
      using P = decltype(tag);
      using T = math_t<P>;
      P* w = static_cast<P*>(l.param);
      P* saved = static_cast<P*>(l.saved);
      const T* s = static_cast<const T*>(l.step);
      T* delta = static_cast<T*>(l.displacement);
      // Per block: copy w_t out (it stays in cache for the shift and Σw_t² that follow).
      for (int64_t b = c.begin; b < c.end; b += kStreamBlock) {
        const int64_t e = std::min(b + kStreamBlock, c.end);
        copy_bytes(saved + b, w + b, (e - b) * int64_t(sizeof(P)), stream);
        for (int64_t sb = b; sb < e; sb += kSumBlock) {  // block sums as in sum_squares
          const int64_t se = std::min(sb + kSumBlock, e);
          double sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = sb; i < se; ++i) {
            const T wv = load(w[i]);
            sum += square_in_double(wv);
            w[i] = shifted(w[i], s[i]);
            delta[i] = realised_displacement(T(load(w[i])), wv);
          }
          results[k].w2 += sum;
        }
      }
    });
    if (stream) stream_fence();
  });
  const std::vector<LayerSums> sums = sum_chunks(layers.size(), chunks, results);
  for (size_t i = 0; i < layers.size(); ++i) w_sq[i] = sums[i].w2;
}

}  // namespace cblr::cpu::CBLR_ISA

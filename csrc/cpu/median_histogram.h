// One round of the radix select that finds the exact median of a sharded layer across
// ranks (cblr_ext/distributed.py): per layer, the counts of this rank's quotient keys
// by the `width` bits at `shift`, among the keys whose bits above shift + width equal
// the layer's prefix (the buckets chosen in earlier rounds).  The quotients are formed
// again from w and g each round rather than kept: a round reads 2 values per element and
// writes nothing.  gather_layers returns the keys under a prefix instead (a few per cent
// of them after the first round), so that the rounds after it read those alone.
#pragma once

namespace cblr::cpu::CBLR_ISA {  // one instruction-set variant (isa_unit.h)
namespace {

// The keys of one block (m ≤ kSumBlock elements): the fp32 bits of h = |d| / |w|
// (rounded to fp32 from the math type: rounding is monotone, so the median of the
// rounded quotients is the rounded median), and whether each lies under the prefix
// (never where w = 0 or h is NaN); returns the block's NaN quotients.
template <typename P>
inline int32_t block_keys(const P* w, const P* g, math_t<P> gs, int64_t m, math_t<P> weight_decay, int top,
                          uint32_t want, uint32_t* keys, uint8_t* kept) {
  using T = math_t<P>;
  int32_t nan = 0;
#pragma omp simd reduction(+ : nan)
  for (int64_t j = 0; j < m; ++j) {
    const T wv = load(w[j]);
    const float q = float(curvature_quotient(decayed_grad(T(load(g[j]) * gs), wv, weight_decay), wv));
    const bool is_nan = q != q;
    nan += is_nan & (wv != 0);
    const uint32_t key = float_bits(q);
    keys[j] = key;
    kept[j] = uint8_t((wv != 0) & !is_nan & ((key >> top) == want));
  }
  return nan;
}

// Visits one chunk's keys under the prefix (their bits above top equal the prefix's):
// all_kept(keys + j) for a group of 8 all kept, one_kept(key) for the others; returns the
// chunk's NaN quotients.  Groups of 8 keys with none kept are skipped whole (the later
// rounds keep a few keys only).
template <typename P, typename AllKept, typename OneKept>
int64_t visit_kept(const HistogramLayer& l, int64_t begin, int64_t end, int top, double weight_decay,
                   AllKept&& all_kept, OneKept&& one_kept) {
  using T = math_t<P>;
  const P* w = static_cast<const P*>(l.w);
  const P* g = static_cast<const P*>(l.g);
  const uint32_t want = uint32_t(l.prefix) >> top;  // top ≤ 31: a kept key's sign bit is 0
  int64_t nan = 0;
  alignas(64) uint32_t keys[kSumBlock];
  alignas(64) uint8_t kept[kSumBlock + 8] = {};
  for (int64_t b = begin; b < end; b += kSumBlock) {
    const int64_t m = std::min(kSumBlock, end - b);
    nan += block_keys(w + b, g + b, T(l.g_unscale), m, T(weight_decay), top, want, keys, kept);
    std::memset(kept + m, 0, size_t(kSumBlock + 8 - m));
    for (int64_t j0 = 0; j0 < m; j0 += 8) {
      uint64_t group;
      std::memcpy(&group, kept + j0, 8);
      if (group == 0) continue;
      if (group == 0x0101010101010101ull) {  // all eight kept (the first round, mostly)
        all_kept(keys + j0);
        continue;
      }
      // Eight 0/1 bytes to an 8-bit mask (byte i to bit i), then visit the set bits only.
      uint32_t bits = uint32_t((group * 0x0102040810204080ull) >> 56);
      while (bits) {
        one_kept(keys[j0 + __builtin_ctz(bits)]);
        bits &= bits - 1;
      }
    }
  }
  return nan;
}

// Adds one chunk's counts to hist (2^width bins) and returns its NaN quotients.  Two
// interleaved histograms: clustered keys hit one bin in a row, and the increments of one
// bin would otherwise wait on each other's stores.
template <typename P>
int64_t count_chunk(const HistogramLayer& l, int64_t begin, int64_t end, int shift, int width, double weight_decay,
                    int32_t* hist) {
  const uint32_t mask = (uint32_t(1) << width) - 1;
  int32_t* other = hist + (int64_t(1) << width);
  return visit_kept<P>(
      l, begin, end, shift + width, weight_decay,
      [&](const uint32_t* keys) {
        for (int j = 0; j < 8; j += 2) {
          ++hist[(keys[j] >> shift) & mask];
          ++other[(keys[j + 1] >> shift) & mask];
        }
      },
      [&](uint32_t key) { ++hist[(key >> shift) & mask]; });
}

}  // namespace

void gather_layers(const std::vector<HistogramLayer>& layers, int top, double weight_decay, int threads,
                   std::vector<int32_t>& keys, int64_t* layer_counts) {
  const std::vector<Chunk> chunks = make_chunks(layers);
  std::vector<std::vector<int32_t>> chunk_keys(chunks.size());
  parallel_items(int64_t(chunks.size()), threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    std::vector<int32_t>& out = chunk_keys[k];
    dispatch(layers[c.layer].dtype, [&](auto tag) {
      visit_kept<decltype(tag)>(
          layers[c.layer], c.begin, c.end, top, weight_decay,
          [&](const uint32_t* group) { out.insert(out.end(), group, group + 8); },
          [&](uint32_t key) { out.push_back(int32_t(key)); });
    });
  });
  // Chunks are in layer order: concatenated, each layer's keys are contiguous.
  std::fill(layer_counts, layer_counts + layers.size(), 0);
  size_t total = 0;
  for (size_t k = 0; k < chunks.size(); ++k) {
    layer_counts[chunks[k].layer] += int64_t(chunk_keys[k].size());
    total += chunk_keys[k].size();
  }
  keys.clear();
  keys.reserve(total);
  for (const auto& part : chunk_keys) keys.insert(keys.end(), part.begin(), part.end());
}

void histogram_layers(const std::vector<HistogramLayer>& layers, int shift, int width, double weight_decay,
                      int threads, double* counts, double* nans) {
  const int64_t bins = int64_t(1) << width;
  const std::vector<Chunk> chunks = make_chunks(layers);
  // Per chunk: its two interleaved histograms and NaN count, summed per layer after
  // (integers: the order of the sums does not matter).
  std::vector<int32_t> chunk_counts(chunks.size() * 2 * bins, 0);
  std::vector<int64_t> chunk_nans(chunks.size(), 0);
  parallel_items(int64_t(chunks.size()), threads, total_elements(layers), [&](int64_t k) {
    const Chunk& c = chunks[k];
    const HistogramLayer& l = layers[c.layer];
    dispatch(l.dtype, [&](auto tag) {
      chunk_nans[k] = count_chunk<decltype(tag)>(l, c.begin, c.end, shift, width, weight_decay,
                                                 chunk_counts.data() + k * 2 * bins);
    });
  });
  std::fill(counts, counts + layers.size() * bins, 0.0);
  std::fill(nans, nans + layers.size(), 0.0);
  std::vector<int64_t> sum(bins);
  size_t k = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    std::fill(sum.begin(), sum.end(), 0);
    int64_t nan = 0;
    for (; k < chunks.size() && size_t(chunks[k].layer) == i; ++k) {
      const int32_t* h = chunk_counts.data() + k * 2 * bins;
      for (int64_t b = 0; b < bins; ++b) sum[b] += int64_t(h[b]) + h[bins + b];
      nan += chunk_nans[k];
    }
    for (int64_t b = 0; b < bins; ++b) counts[i * bins + b] = double(sum[b]);
    nans[i] = double(nan);
  }
}

}  // namespace cblr::cpu::CBLR_ISA

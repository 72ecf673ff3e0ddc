// Torch-free description of one multi-tensor call: the layers, their storage types,
// and the (layer, chunk) work list that the CPU passes run in parallel.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../layer_math.h"

namespace cblr {
namespace cpu {

// Storage type of a parameter (and its gradient).  Math and optimizer state run in
// fp64 for F64 and in fp32 otherwise (functional.state_dtype).
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(Half x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, sizeof h);
  return float(h);
}
inline float load(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }

// The math type of a storage type (functional.state_dtype).
template <typename P> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <typename P> using math_t = typename MathOf<P>::type;

// Rounding to the storage type as torch does (round to nearest even).
template <typename P> P store(math_t<P> x);
template <> inline float store<float>(float x) { return x; }
template <> inline double store<double>(double x) { return x; }
template <> inline Half store<Half>(float x) {
  _Float16 h = _Float16(x);
  Half out;
  std::memcpy(&out.bits, &h, sizeof h);
  return out;
}
template <> inline BFloat16 store<BFloat16>(float x) {
  uint32_t bits = float_bits(x);
  BFloat16 out;
  if (x != x) {
    out.bits = 0x7FC0;
  } else {
    out.bits = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
  return out;
}

// w + s with s rounded to the storage type first, as p.add_(s.to(p.dtype)) does: the
// probe point of CBLR, recomputed bit-exactly by pass 1 from w_t.
template <typename P>
inline P shifted(P w, math_t<P> s) {
  return store<P>(load(w) + load(store<P>(s)));
}

// One layer of a call.  Pointers are to dense memory of n elements (any layout, the
// same for every tensor of the layer); v and prev are in the math type, or null.
struct LayerRef {
  DType dtype = DType::F32;
  int64_t n = 0;
  void* w = nullptr;
  const void* g = nullptr;
  float g_unscale = 1.0f;  // g is read as g·g_unscale (GradScaler's fl32(1/S); 1: not scaled)
  void* v = nullptr;     // momentum buffer
  void* prev = nullptr;  // s_{t−1} kept for CBLR (μ = 0 or Nesterov)
  double* kappa = nullptr;  // κ̄ (0-d state)
  float* age = nullptr;     // steps since the last measurement attempt (0-d state)
  double* lagged = nullptr;  // [3] (‖w‖, ‖g‖, κ) of the previous step's inputs, lag=1 only
  bool adapt = false;
  bool lagged_valid = false;  // lagged holds a stash from an earlier step
  // CBLR probe: where it measures (pass 1), the gradient at w_t + s_{t−1} and s_{t−1};
  // where shifted (pass 2), w_t in the storage type while the parameter sits at w_t + s.
  bool shifted = false, measures = false;
  const void* saved = nullptr;
  const void* probe_g = nullptr;
  const void* step = nullptr;  // math type
  // Σw² where already known (the previous update pass's, or the shift's Σw_t²), for pass 1
  // to use instead of reading w; and where the update pass writes Σw² of its result (null:
  // not wanted).
  bool has_known_w2 = false;
  double known_w2 = 0;
  double* next_w2 = nullptr;

  // Where w_t is read: the saved copy while the parameter sits at the probe point.
  const void* value() const { return shifted ? saved : w; }
};

// Calls a functor with a value of the layer's storage type (a type tag).
template <typename F>
auto dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F64: return f(double{});
    case DType::F16: return f(Half{});
    case DType::BF16: return f(BFloat16{});
    default: return f(float{});
  }
}

inline int64_t math_size(DType dtype) { return dtype == DType::F64 ? 8 : 4; }

// Elements per work item: large layers split across threads, small ones are one item.
constexpr int64_t kChunk = 65536;
// Elements per partial sum of squares (vectorised, in double); the partial sums are added
// in block order.
constexpr int64_t kSumBlock = 512;

struct Chunk {
  int layer;
  int64_t begin, end;
};

// The work list over the given layers (anything with a member n), in layer order.
template <typename Layer>
std::vector<Chunk> make_chunks(const std::vector<Layer>& layers) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < layers.size(); ++i) {
    for (int64_t b = 0; b < layers[i].n; b += kChunk) {
      chunks.push_back({int(i), b, b + kChunk < layers[i].n ? b + kChunk : layers[i].n});
    }
  }
  return chunks;
}

template <typename Layer>
int64_t total_elements(const std::vector<Layer>& layers) {
  int64_t total = 0;
  for (const auto& l : layers) total += l.n;
  return total;
}

}  // namespace cpu
}  // namespace cblr

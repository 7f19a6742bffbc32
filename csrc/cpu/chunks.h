#pragma once
// CPU counterpart of CUDA's multi-tensor apply: a tensor list is cut into fixed-size chunks
// (natasha/chunk.h: never spanning two tensors) that at::parallel_for distributes over threads
// (for_each_chunk: an equal number of elements per thread).
// Chunk boundaries do not depend on the thread count, so per-chunk partial reductions summed in
// chunk order give the same bits with 1 or N threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <array>
#include <vector>

#include "natasha/chunk.h"

namespace natasha {
namespace cpu {

constexpr int64_t kChunk = 16384;

// Chunks of at most `chunk` elements; chunk.index numbers them in list order.
inline std::vector<Chunk> make_chunks(at::TensorList ts, int64_t chunk = kChunk) {
  std::vector<Chunk> out;
  int64_t base = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t s = 0; s < n; s += chunk) {
      out.push_back(Chunk{static_cast<int>(i), s, std::min(chunk, n - s), base + s,
                          static_cast<int64_t>(out.size())});
    }
    base += n;
  }
  return out;
}

// Rows of logical elements that one tile of a Transposed input covers: `rows` rows of `n`
// elements, the first at chunk.start, each `row_step` after the last (rows = 1: a plain chunk).
struct TileChunk : Chunk {
  int64_t group = 1;     // spatial group size (adahessian_step)
  int64_t rows = 1;
  int64_t row_step = 0;
};

inline int64_t chunk_elements(const Chunk& c) { return c.n; }
inline int64_t chunk_elements(const TileChunk& c) { return c.n * c.rows; }

// Calls f(chunk) for every chunk, in parallel: one contiguous run of chunks per thread, cut at
// equal numbers of elements rather than of chunks (a list's small tensors make small chunks: an
// even split by count gave one thread 5 % more of ResNet-50's elements than the other).
template <typename ChunkT, typename F>
void for_each_chunk(const std::vector<ChunkT>& chunks, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (const auto& c : chunks) f(c);
    return;
  }
  std::vector<int64_t> elems(n + 1, 0);  // elements before chunk i
  for (int64_t i = 0; i < n; ++i) elems[i + 1] = elems[i] + chunk_elements(chunks[i]);
  // first chunk of share k: the first whose first element lies at or after total k / T (n for k = T)
  const auto share_start = [&](int64_t k) -> int64_t {
    const int64_t target = elems[n] / threads * k + elems[n] % threads * k / threads;
    return std::lower_bound(elems.begin(), elems.end() - 1, target) - elems.begin();
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = share_start(t), e = share_start(t + 1); i < e; ++i) f(chunks[i]);
  });
}

// t's sizes and strides, outermost first, without size-1 dims and with neighbours merged where
// one dim steps exactly over the next (so a tensor's contiguous runs show as one dim).
inline void coalesce(const at::Tensor& t, c10::SmallVector<int64_t, 8>& size, c10::SmallVector<int64_t, 8>& stride) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!size.empty() && stride.back() == t.stride(d) * t.size(d)) {
      size.back() *= t.size(d);
      stride.back() = t.stride(d);
    } else {
      size.push_back(t.size(d));
      stride.push_back(t.stride(d));
    }
  }
}

// Elements [start, start + n) of t in its logical (row-major) order, copied into out. Dims are
// coalesced first where the strides allow, so the transposed conv-weight H z of PyTorch's double
// backward ([O, I, kh, kw] with strides [kh kw, O kh kw, kw, 1]) is read as runs of kh * kw.
template <typename T>
void gather_chunk(const at::Tensor& t, int64_t start, int64_t n, T* out) {
  c10::SmallVector<int64_t, 8> size, stride;
  coalesce(t, size, stride);
  const T* base = t.const_data_ptr<T>();
  if (size.empty()) {  // one element
    if (n > 0) out[0] = base[0];
    return;
  }
  const int64_t last = static_cast<int64_t>(size.size()) - 1;
  c10::SmallVector<int64_t, 8> idx(size.size(), 0);
  int64_t offset = 0;
  for (int64_t d = last, rem = start; d >= 0; --d) {
    idx[d] = rem % size[d];
    rem /= size[d];
    offset += idx[d] * stride[d];
  }
  const int64_t inner = stride[last];
  for (int64_t done = 0; done < n;) {
    const int64_t run = std::min(size[last] - idx[last], n - done);
    const T* src = base + offset;
    if (inner == 1) {
      std::copy(src, src + run, out + done);
    } else {
      for (int64_t j = 0; j < run; ++j) out[done + j] = src[j * inner];
    }
    done += run;
    offset += run * inner;
    idx[last] += run;
    for (int64_t d = last; d > 0 && idx[d] == size[d]; --d) {  // carry into the outer dims
      offset += stride[d - 1] - size[d] * stride[d];
      idx[d] = 0;
      ++idx[d - 1];
    }
  }
}

// The chunk's elements of a read-only input (natasha/args/tensor_lists.h check_read_list): in
// place when t is contiguous, else gathered into buf (thread-local at the caller, so it stays in
// cache: cheaper than a whole-tensor .contiguous() beforehand, which writes a new tensor and
// reads it back).
template <typename T>
const T* read_chunk(const at::Tensor& t, const Chunk& c, std::vector<T>& buf) {
  if (t.is_contiguous()) return t.const_data_ptr<T>() + c.start;
  buf.resize(static_cast<size_t>(c.n));
  gather_chunk(t, c.start, c.n, buf.data());
  return buf.data();
}

// A strided input that is a transpose of blocks: logical [a, b, r] (row-major, r contiguous in
// both orders) stored as [b, a, r]. The conv-weight H z of PyTorch's double backward is one
// (a = out channels, b = in channels, r = kh * kw). Read in logical order, each run of r sits a
// whole a * r elements from the last: on a 2-core Xeon VM that read cost 28 ms for ResNet-18's
// list, as much as the .contiguous() it replaced; read tile by tile (tile_transposed) it is
// sequential.
struct Transposed {
  int64_t a = 0, b = 0, r = 0;
};

inline c10::optional<Transposed> as_transposed(const at::Tensor& t) {
  c10::SmallVector<int64_t, 8> size, stride;
  coalesce(t, size, stride);
  Transposed l;
  if (size.size() == 2 && stride[0] == 1 && stride[1] == size[0]) {
    l.a = size[0], l.b = size[1], l.r = 1;
  } else if (size.size() == 3 && stride[2] == 1 && stride[0] == size[2] && stride[1] == size[0] * size[2]) {
    l.a = size[0], l.b = size[1], l.r = size[2];
  } else {
    return c10::nullopt;
  }
  return l;
}

// The tiles of a Transposed tensor. The stored side is read in runs of >= 16 rows (>= 1 KB);
// the logical side (parameters, moments: several streams read and written) must stay long
// sequential runs too, or each short run pays the prefetchers' ramp-up: 16-row tiles of
// 113 columns cost ResNet-18's AdaHessian step 26 ms on a 2-core Xeon VM against 8 ms for the
// gather itself. So a tile spans whole rows (its rows are then one contiguous run) whenever they
// fit in kTileMax elements (an L2-sized buffer), else as many columns as fit. base: the
// tensor's first element in the list's numbering.
constexpr int64_t kTileMax = 8 * kChunk;

inline void append_tiles(std::vector<TileChunk>& out, int tensor, const Transposed& l, int64_t base,
                         int64_t group) {
  const int64_t row = l.b * l.r, min_rows = std::max<int64_t>(16, (256 + l.r - 1) / l.r);
  int64_t ta = std::max<int64_t>(min_rows, kChunk / row), tb = l.b;
  if (ta * row > kTileMax) {
    ta = min_rows;
    tb = std::min<int64_t>(l.b, std::max<int64_t>(1, kTileMax / (ta * l.r)));
  }
  ta = std::min(ta, l.a);
  for (int64_t a0 = 0; a0 < l.a; a0 += ta) {
    for (int64_t b0 = 0; b0 < l.b; b0 += tb) {
      TileChunk c;
      c.tensor = tensor;
      c.start = (a0 * l.b + b0) * l.r;
      c.n = std::min(tb, l.b - b0) * l.r;
      c.first = base + c.start;
      c.index = static_cast<int64_t>(out.size());
      c.group = group;
      c.rows = std::min(ta, l.a - a0);
      c.row_step = row;
      out.push_back(c);
    }
  }
}

// Row `row` of a tile as a plain chunk (Philox numbering included); a tile of whole rows is one
// contiguous run, its single row (tile_rows).
inline int64_t tile_rows(const TileChunk& c) { return c.n == c.row_step ? 1 : c.rows; }
inline TileChunk tile_row(const TileChunk& c, int64_t row) {
  TileChunk r = c;
  if (c.n == c.row_step) {
    r.n = c.rows * c.n;
  } else {
    r.start += row * c.row_step;
    r.first += row * c.row_step;
  }
  r.rows = 1;
  return r;
}

// A tile of t (Transposed l) gathered into out as [c.rows][c.n] in logical order: the stored
// side is read in runs of c.rows * r contiguous elements.
template <typename T>
void tile_transposed(const at::Tensor& t, const Transposed& l, const TileChunk& c, T* out) {
  const T* base = t.const_data_ptr<T>();
  const int64_t a0 = c.start / (l.b * l.r), b0 = (c.start % (l.b * l.r)) / l.r, nb = c.n / l.r;
  for (int64_t j = 0; j < nb; ++j) {
    const T* src = base + ((b0 + j) * l.a + a0) * l.r;  // rows a0.. of column b0 + j: contiguous
    for (int64_t i = 0; i < c.rows; ++i) {
      T* dst = out + i * c.n + j * l.r;
      for (int64_t k = 0; k < l.r; ++k) dst[k] = src[i * l.r + k];  // runs of kh * kw: no memmove call
    }
  }
}

// Sums an [n_chunks, R] buffer of partials in chunk order into R totals (deterministic).
template <int R, typename acc_t>
std::array<acc_t, R> sum_partials(const std::vector<acc_t>& partials) {
  std::array<acc_t, R> tot{};
  const size_t n = partials.size() / R;
  for (size_t i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r) tot[r] += partials[i * R + r];
  return tot;
}

}  // namespace cpu
}  // namespace natasha

// CPU kernels of the AdaHessian ops: hutchinson_diag_ and adahessian_step (spec:
// natasha_ext/ops/reference.py). Tensors are cut into chunks that never split a spatial group
// (conv kernel / block), so each chunk runs its whole update in cache: pass A forms the group
// means of |z * Hz| and updates v, pass B (vectorised) updates m and the parameters.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "chunks.h"
#include "streaming.h"
#include "natasha/adahessian.h"
#include "natasha/args/adahessian.h"
#include "natasha/philox.h"

namespace natasha {
namespace cpu {
namespace {

// ------------------------------------------------------------------ hutchinson_diag_
// D is written without being read: on lists larger than kStreamMinBytes it is streamed out
// (streaming.h; 8 instead of 12 B/param, and the stream of Hz stays in cache).
// D = alpha * z * Hz for fp32 without accumulation: whole 128-element probe blocks are formed in
// an L1 buffer (one Philox call, a loop the compiler vectorises) and copied (or streamed) out;
// the same products as the generic path, so the same bits.
void hutchinson_block_fp32(float* d, const float* h, uint64_t seed, uint64_t offset, uint64_t first, uint64_t n,
                           float alpha, bool stream) {
  alignas(32) float buf[128];
  uint64_t k = first;
  const uint64_t end = first + n;
  while (k < end) {
    const uint64_t block = k >> 7, stop = std::min(end, (block + 1) << 7);
    const Philox4 b = philox_block(seed, offset, block);
    if ((k & 127u) == 0 && stop - k == 128) {
      const float* hb = h + (k - first);
      for (int w = 0; w < 4; ++w)
        for (uint32_t j = 0; j < 32; ++j)
          buf[32 * w + j] = (static_cast<float>(static_cast<int32_t>((b.x[w] >> j) & 1u) * 2 - 1) * hb[32 * w + j]) * alpha;
      store_block(d + (k - first), buf, 128, stream);
    } else {
      for (uint64_t i = k; i < stop; ++i) d[i - first] = (rademacher_from_block(b, i) * h[i - first]) * alpha;
    }
    k = stop;
  }
  if (stream) stream_fence();
}

// The block path is fp32 only; false (nothing done) for other dtypes.
template <typename d_t, typename h_t>
bool try_hutchinson_block(d_t* d, const h_t* h, uint64_t seed, uint64_t offset, uint64_t first, uint64_t n,
                          double alpha, bool stream) {
  if constexpr (std::is_same_v<d_t, float> && std::is_same_v<h_t, float>) {
    hutchinson_block_fp32(d, h, seed, offset, first, n, static_cast<float>(alpha), stream);
    return true;
  }
  return false;
}

void hutchinson_diag_cpu(at::TensorList diag, at::TensorList hz, int64_t seed, int64_t offset, double alpha,
                         bool accumulate) {
  if (!check_hutchinson_diag_args(diag, hz)) return;
  const auto chunks = make_chunks(hz);
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const bool stream = worth_streaming({diag});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hz[0].scalar_type(), "hutchinson_diag_", [&] {
    using h_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, diag[0].scalar_type(), "hutchinson_diag_", [&] {
      using d_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<h_t, double> || std::is_same_v<d_t, double>, double, float>;
      const acc_t a = static_cast<acc_t>(alpha);
      auto one = [&](d_t* d, const h_t* h, acc_t z) {
        acc_t val = (z * static_cast<acc_t>(*h)) * a;
        if (accumulate) val = static_cast<acc_t>(*d) + val;
        *d = static_cast<d_t>(val);
      };
      for_each_chunk(chunks, [&](const Chunk& c) {
        thread_local std::vector<h_t> hz_buf;  // strided Hz (read_chunk)
        const h_t* h = read_chunk(hz[c.tensor], c, hz_buf);
        d_t* d = diag[c.tensor].data_ptr<d_t>() + c.start;
        if (!accumulate && try_hutchinson_block(d, h, s, o, static_cast<uint64_t>(c.first),
                                                static_cast<uint64_t>(c.n), alpha, stream))
          return;
        for_each_rademacher(s, o, static_cast<uint64_t>(c.first), static_cast<uint64_t>(c.n),
                            [&](uint64_t i, float z) { one(d + i, h + i, static_cast<acc_t>(z)); });
      });
    });
  });
}

// ------------------------------------------------------------------ adahessian_step
// Chunks of about kChunk elements holding whole groups of each tensor's group size; a tensor
// whose curvature input is Transposed (the double backward's conv-weight H z) is cut into tiles
// instead (chunks.h), when its runs hold whole groups.
std::vector<TileChunk> make_group_chunks(at::TensorList ts, at::IntArrayRef groups,
                                         const std::vector<c10::optional<Transposed>>& tiled) {
  std::vector<TileChunk> out;
  int64_t base = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].numel(), g = groups[i];
    if (tiled[i]) {
      append_tiles(out, static_cast<int>(i), *tiled[i], base, g);
    } else {
      const int64_t len = std::max<int64_t>(g, (kChunk / g) * g);
      for (int64_t s = 0; s < n; s += len) {
        TileChunk c;
        c.tensor = static_cast<int>(i);
        c.start = s;
        c.n = std::min(len, n - s);
        c.first = base + s;
        c.index = static_cast<int64_t>(out.size());
        c.group = g;
        out.push_back(c);
      }
    }
    base += n;
  }
  return out;
}

// Which curvature inputs are read tile by tile: Transposed, with whole groups in each run.
std::vector<c10::optional<Transposed>> tiled_inputs(at::TensorList curv, at::IntArrayRef groups) {
  std::vector<c10::optional<Transposed>> out(groups.size());
  for (size_t i = 0; i < curv.size(); ++i) {
    if (curv[i].is_contiguous()) continue;
    auto l = as_transposed(curv[i]);
    if (l && (groups[i] == 1 || l->r % groups[i] == 0)) out[i] = l;
  }
  return out;
}

template <typename scalar_t, typename acc_t, typename curv_t>
void second_moment_groups(const TileChunk& c, const curv_t* cv, acc_t* v, bool signed_probe, bool abs_first,
                          uint64_t seed, uint64_t offset, const AdaHessianCoef<acc_t>& k) {
  const int64_t G = c.group;
  if (G == 1) {  // |z * c| = |c|: no probe needed
    for (int64_t j = 0; j < c.n; ++j) v[j] = adahessian_second_moment<acc_t>(v[j], static_cast<acc_t>(cv[j]), k);
    return;
  }
  const uint64_t k0 = static_cast<uint64_t>(c.first);
  if (signed_probe && !abs_first) {
    // D = z * Hz formed first in a thread-local buffer (one Philox call per 128 elements, a loop
    // the compiler vectorises), then the group means of D as for a diagonal estimate: the same
    // products and the same sums in the same order as drawing z element by element, 3x faster.
    thread_local std::vector<acc_t> d;
    d.resize(static_cast<size_t>(c.n));
    for_each_rademacher(seed, offset, k0, static_cast<uint64_t>(c.n),
                        [&](uint64_t i, float zi) { d[i] = static_cast<acc_t>(zi) * static_cast<acc_t>(cv[i]); });
    second_moment_groups<scalar_t, acc_t, acc_t>(c, d.data(), v, false, false, seed, offset, k);
    return;
  }
  RademacherWalker z(seed, offset);
  int64_t s = 0;
  if (abs_first || !signed_probe) {
    // No probe needed: kLanes groups at a time, each summed in its own order (same bits as one
    // group at a time) but as kLanes independent chains, so the adds overlap instead of waiting
    // for each other (a G = 9 group alone is a 9-add latency chain per 9 elements).
    constexpr int kLanes = 8;
    for (; s + kLanes * G <= c.n; s += kLanes * G) {
      acc_t sum[kLanes] = {};
      for (int64_t j = 0; j < G; ++j)
        for (int l = 0; l < kLanes; ++l)
          sum[l] += adahessian_group_summand<acc_t>(static_cast<acc_t>(cv[s + l * G + j]), abs_first, false, z, 0);
      for (int l = 0; l < kLanes; ++l) {
        const acc_t ds = adahessian_group_value<acc_t>(sum[l], G);
        acc_t* vg = v + s + l * G;
        for (int64_t j = 0; j < G; ++j) vg[j] = adahessian_second_moment<acc_t>(vg[j], ds, k);
      }
    }
  }
  for (; s < c.n; s += G) {
    const int64_t e = std::min(c.n, s + G);
    acc_t sum = 0;
    for (int64_t j = s; j < e; ++j)
      sum += adahessian_group_summand<acc_t>(static_cast<acc_t>(cv[j]), abs_first, signed_probe, z, k0 + j);
    const acc_t ds = adahessian_group_value<acc_t>(sum, e - s);
    for (int64_t j = s; j < e; ++j) v[j] = adahessian_second_moment<acc_t>(v[j], ds, k);
  }
}

template <typename scalar_t, typename acc_t>
void update_chunk(int64_t n, scalar_t* p, const scalar_t* g, acc_t* m, const acc_t* v, const AdaHessianCoef<acc_t>& k) {
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec b1(k.beta1), omb1(k.one_minus_beta1), isbc2(k.inv_sqrt_bc2), pw(k.power), eps(k.eps), lr(k.lr),
        wd(k.weight_decay), ibc1(k.inv_bc1);
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec mv = b1 * Vec::loadu(m + j) + omb1 * Vec::loadu(g + j);
      mv.store(m + j);
      Vec den = Vec::loadu(v + j).sqrt() * isbc2;
      if (!k.power_one) den = den.pow(pw);
      den = den + eps;
      const Vec pv = Vec::loadu(p + j);
      (pv - lr * ((mv * ibc1) / den + wd * pv)).store(p + j);
    }
  }
  for (; j < n; ++j) {
    const acc_t mj = adahessian_first_moment<acc_t>(m[j], static_cast<acc_t>(g[j]), k);
    m[j] = mj;
    p[j] = static_cast<scalar_t>(adahessian_param<acc_t>(static_cast<acc_t>(p[j]), mj, v[j], k));
  }
}

void adahessian_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                         at::TensorList exp_hess_sq, at::TensorList curv, at::IntArrayRef group_sizes,
                         int64_t curv_mode, bool abs_first, int64_t seed, int64_t offset, double lr, double beta1,
                         double beta2, double eps, double weight_decay, double hessian_power,
                         double bias_correction1, double bias_correction2) {
  if (!check_adahessian_step_args(params, grads, exp_avg, exp_hess_sq, curv, group_sizes, curv_mode)) return;
  const auto tiled = tiled_inputs(curv, group_sizes);
  const auto chunks = make_group_chunks(params, group_sizes, tiled);
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adahessian_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_adahessian_coef<acc_t>(lr, beta1, beta2, eps, weight_decay, hessian_power, bias_correction1,
                                               bias_correction2);
    for_each_chunk(chunks, [&](const TileChunk& tile) {
      thread_local std::vector<scalar_t> g_buf, hz_buf;  // strided grads / Hz (read_chunk, tile_transposed)
      thread_local std::vector<acc_t> diag_buf;
      const auto& tl = tiled[tile.tensor];
      // the curvature of row r: read_chunk's view of the row, or row r of the tile, gathered
      // whole when row 0 asks
      auto curv_rows = [&](auto& buf, const TileChunk& row, int64_t r) {
        using T = typename std::decay_t<decltype(buf)>::value_type;
        if (!tl) return read_chunk(curv[tile.tensor], row, buf);
        if (r == 0) {
          buf.resize(static_cast<size_t>(tile.rows * tile.n));
          tile_transposed(curv[tile.tensor], *tl, tile, buf.data());
        }
        return static_cast<const T*>(buf.data() + r * tile.n);
      };
      for (int64_t r = 0, rows = tile_rows(tile); r < rows; ++r) {
        const TileChunk c = tile_row(tile, r);
        acc_t* m = exp_avg[c.tensor].data_ptr<acc_t>() + c.start;
        acc_t* v = exp_hess_sq[c.tensor].data_ptr<acc_t>() + c.start;
        if (curv_mode == kCurvHz) {
          second_moment_groups<scalar_t, acc_t, scalar_t>(c, curv_rows(hz_buf, c, r), v, true, abs_first, s, o, k);
        } else if (curv_mode == kCurvDiag) {
          second_moment_groups<scalar_t, acc_t, acc_t>(c, curv_rows(diag_buf, c, r), v, false, abs_first, s, o, k);
        }
        update_chunk<scalar_t, acc_t>(c.n, params[c.tensor].data_ptr<scalar_t>() + c.start,
                                      read_chunk(grads[c.tensor], c, g_buf), m, v, k);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CPU, m) {
  m.impl("hutchinson_diag_", &hutchinson_diag_cpu);
  m.impl("adahessian_step_", &adahessian_step_cpu);
}

}  // namespace cpu
}  // namespace natasha

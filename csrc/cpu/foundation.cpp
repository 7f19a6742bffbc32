// CPU kernels of the foundation ops: rademacher_ and global_norm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "chunks.h"
#include "natasha/args/foundation.h"
#include "natasha/philox.h"

namespace natasha {
namespace cpu {
namespace {

void rademacher_cpu(at::TensorList tensors, int64_t seed, int64_t offset) {
  check_rademacher_args(tensors);
  const auto chunks = make_chunks(tensors);
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const at::Tensor& t = tensors[c.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "rademacher_", [&] {
      scalar_t* p = t.data_ptr<scalar_t>() + c.start;
      for_each_rademacher(s, o, static_cast<uint64_t>(c.first), static_cast<uint64_t>(c.n),
                          [p](uint64_t i, float z) { p[i] = static_cast<scalar_t>(z); });
    });
  });
}

template <typename scalar_t, typename acc_t>
acc_t sumsq_chunk(const scalar_t* p, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // Four independent accumulators hide the FMA latency.
    constexpr int64_t W = Vec::size();
    Vec a0(0), a1(0), a2(0), a3(0);
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
      const Vec x0 = Vec::loadu(p + i), x1 = Vec::loadu(p + i + W);
      const Vec x2 = Vec::loadu(p + i + 2 * W), x3 = Vec::loadu(p + i + 3 * W);
      a0 = at::vec::fmadd(x0, x0, a0);
      a1 = at::vec::fmadd(x1, x1, a1);
      a2 = at::vec::fmadd(x2, x2, a2);
      a3 = at::vec::fmadd(x3, x3, a3);
    }
    for (; i + W <= n; i += W) {
      const Vec x = Vec::loadu(p + i);
      a0 = at::vec::fmadd(x, x, a0);
    }
    acc_t buf[W];
    ((a0 + a1) + (a2 + a3)).store(buf);
    acc_t tot = 0;
    for (int64_t j = 0; j < W; ++j) tot += buf[j];
    for (; i < n; ++i) tot += p[i] * p[i];
    return tot;
  } else {
    acc_t tot = 0;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = static_cast<acc_t>(p[i]);
      tot += x * x;
    }
    return tot;
  }
}

at::Tensor global_norm_cpu(at::TensorList tensors) {
  const auto acc = check_global_norm_args(tensors);
  const auto chunks = make_chunks(tensors);
  if (acc == at::kDouble) {  // any fp64 tensor: the whole (possibly mixed-dtype) list in fp64
    std::vector<double> part(chunks.size(), 0.0);
    for_each_chunk(chunks, [&](const Chunk& c) {
      const at::Tensor& t = tensors[c.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "global_norm", [&] {
        part[c.index] = sumsq_chunk<scalar_t, double>(t.data_ptr<scalar_t>() + c.start, c.n);
      });
    });
    return at::scalar_tensor(std::sqrt(sum_partials<1, double>(part)[0]), at::kDouble);
  }
  std::vector<float> part(chunks.size(), 0.0f);
  for_each_chunk(chunks, [&](const Chunk& c) {
    const at::Tensor& t = tensors[c.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "global_norm", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        part[c.index] = static_cast<float>(sumsq_chunk<double, double>(t.data_ptr<double>() + c.start, c.n));
      } else {
        part[c.index] = sumsq_chunk<scalar_t, float>(t.data_ptr<scalar_t>() + c.start, c.n);
      }
    });
  });
  return at::scalar_tensor(std::sqrt(sum_partials<1, float>(part)[0]), at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CPU, m) {
  m.impl("rademacher_", &rademacher_cpu);
  m.impl("global_norm", &global_norm_cpu);
}

}  // namespace cpu
}  // namespace natasha

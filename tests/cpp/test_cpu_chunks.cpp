// CPU multi-tensor chunking: boundaries, global element numbering, and the ops run through the
// dispatcher on lists that cross chunk boundaries.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "check.h"
#include "cpu/chunks.h"
#include "natasha/philox.h"

using natasha::cpu::make_chunks;

int main() {
  std::vector<at::Tensor> ts = {at::empty({0}), at::empty({1}), at::empty({16384}), at::empty({16385}),
                                at::empty({65537}), at::empty({22})};
  auto chunks = make_chunks(ts);
  // 0 -> none, 1 -> 1, 16384 -> 1, 16385 -> 2, 65537 -> 5, 22 -> 1
  CHECK(chunks.size() == 10);
  for (size_t j = 0; j < chunks.size(); ++j) CHECK(chunks[j].index == static_cast<int64_t>(j));
  int64_t covered = 0, expect_base = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    int64_t seen = 0;
    for (const auto& c : chunks) {
      if (c.tensor != static_cast<int>(i)) continue;
      CHECK(c.start == seen);
      CHECK(c.n > 0 && c.n <= natasha::cpu::kChunk);
      CHECK(c.first == expect_base + c.start);
      seen += c.n;
    }
    CHECK(seen == ts[i].numel());
    covered += seen;
    expect_base += ts[i].numel();
  }
  CHECK(covered == 1 + 16384 + 16385 + 65537 + 22);

  // rademacher_ through the dispatcher equals the header's per-element definition.
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("natasha::rademacher_", "")
                .typed<void(at::TensorList, int64_t, int64_t)>();
  op.call(ts, 99, 7);
  int64_t k = 0;
  for (const auto& t : ts) {
    auto acc = t.contiguous();
    const float* p = acc.data_ptr<float>();
    for (int64_t i = 0; i < t.numel(); ++i, ++k) CHECK(p[i] == natasha::rademacher_at(99, 7, k));
  }
  // global_norm of +-1 entries is sqrt(count).
  auto norm = c10::Dispatcher::singleton().findSchemaOrThrow("natasha::global_norm", "")
                  .typed<at::Tensor(at::TensorList)>();
  const double n = norm.call(ts).item<double>();
  CHECK(std::abs(n - std::sqrt(static_cast<double>(covered))) < 1e-3);

  // Strided reads: gather_chunk (any strides, from any start) and tile_transposed (the double
  // backward's transposed conv weights) give the logical-order values of .contiguous().
  {
    using natasha::cpu::as_transposed;
    using natasha::cpu::TileChunk;
    const at::Tensor tr = at::arange(600 * 20 * 9, at::kFloat).reshape({600, 20, 3, 3}).transpose(0, 1);
    const at::Tensor ct = tr.contiguous();
    const float* want = ct.data_ptr<float>();
    std::vector<float> buf(ct.numel());
    for (int64_t start : {int64_t(0), int64_t(5), int64_t(16379), int64_t(107990)}) {
      const int64_t n = std::min<int64_t>(20000, ct.numel() - start);
      natasha::cpu::gather_chunk(tr, start, n, buf.data());
      bool same = true;
      for (int64_t i = 0; i < n; ++i) same = same && buf[i] == want[start + i];
      CHECK(same);
    }
    const auto l = as_transposed(tr);
    CHECK(l.has_value() && l->a == 20 && l->b == 600 && l->r == 9);
    CHECK(!as_transposed(ct).has_value());
    CHECK(!as_transposed(at::zeros({10, 18}).slice(1, 0, 18, 2)).has_value());  // gapped
    std::vector<TileChunk> tiles;
    natasha::cpu::append_tiles(tiles, 0, *l, 100, 9);
    int64_t covered = 0;
    bool same = true;
    for (const auto& c : tiles) {
      CHECK(c.n % 9 == 0 && c.first == 100 + c.start);
      buf.assign(c.rows * c.n, -1.f);
      natasha::cpu::tile_transposed(tr, *l, c, buf.data());
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < c.n; ++j) same = same && buf[r * c.n + j] == want[c.start + r * c.row_step + j];
      covered += c.rows * c.n;
    }
    CHECK(same);
    CHECK(covered == ct.numel());
  }
  TEST_MAIN_END();
}

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
  TEST_MAIN_END();
}

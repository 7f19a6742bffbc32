#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// Counter-based: the value at counter c depends only on (key, c), so CPU, CUDA and the
// pure-PyTorch reference (natasha_ext/ops/reference.py) draw bit-identical streams and a
// kernel can regenerate a draw instead of storing it.
//
// Stream layout used by every op of this package (the spec lives in reference.py):
//   key     = (seed & 0xffffffff, seed >> 32)
//   element k of a tensor list (k counts across the concatenated list) uses
//   counter = offset + (k >> 7) as a 64-bit value in words (c0, c1), c2 = c3 = 0,
//   and bit (k & 31) of output word ((k >> 5) & 3).
// One Philox call therefore yields 128 Rademacher signs; a call consuming n elements
// advances the offset by ceil(n / 128).
#include <cstdint>
#include "natasha/macros.h"

namespace natasha {

struct Philox4 {
  uint32_t x[4];
};

NATASHA_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

NATASHA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0; k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 128 random bits for the block of elements [128*j, 128*j + 128) of a stream.
NATASHA_HD Philox4 philox_block(uint64_t seed, uint64_t offset, uint64_t j) {
  const uint64_t c = offset + j;
  return philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The Rademacher sign (+1 or -1) of element k, given its block's bits.
NATASHA_HD float rademacher_from_block(const Philox4& b, uint64_t k) {
  const uint32_t word = b.x[(k >> 5) & 3u];
  return ((word >> (k & 31u)) & 1u) ? 1.0f : -1.0f;
}

NATASHA_HD float rademacher_at(uint64_t seed, uint64_t offset, uint64_t k) {
  return rademacher_from_block(philox_block(seed, offset, k >> 7), k);
}

// Number of Philox counters a draw of n elements consumes (the offset advance).
NATASHA_HD uint64_t philox_blocks_for(uint64_t n) { return (n + 127u) >> 7; }

// Host loop over stream elements first .. first + n - 1: calls f(i, z) with i = 0 .. n - 1 and
// z = +-1.0f the Rademacher sign of element first + i. One Philox call per 128 elements; whole
// blocks run a branch-free loop per 32-bit word that the compiler vectorises (the per-element
// word select of rademacher_from_block does not).
template <typename F>
inline void for_each_rademacher(uint64_t seed, uint64_t offset, uint64_t first, uint64_t n, F&& f) {
  uint64_t k = first;
  const uint64_t end = first + n;
  while (k < end) {
    const Philox4 b = philox_block(seed, offset, k >> 7);
    const uint64_t stop = (end < (((k >> 7) + 1) << 7)) ? end : (((k >> 7) + 1) << 7);
    if ((k & 127u) == 0 && stop - k == 128) {
      const uint64_t i0 = k - first;
      for (int w = 0; w < 4; ++w) {
        const uint32_t word = b.x[w];
        for (uint32_t j = 0; j < 32; ++j)
          f(i0 + 32u * w + j, static_cast<float>(static_cast<int32_t>((word >> j) & 1u) * 2 - 1));
      }
      k = stop;
    }
    for (; k < stop; ++k) f(k - first, rademacher_from_block(b, k));
  }
}

}  // namespace natasha

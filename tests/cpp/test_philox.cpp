// Philox4x32-10 known-answer vectors (Random123) and the Rademacher stream layout.
#include <set>

#include "check.h"
#include "natasha/philox.h"

using natasha::philox4x32_10;

int main() {
  auto a = philox4x32_10(0, 0, 0, 0, 0, 0);
  CHECK_EQ_U32(a.x[0], 0x6627e8d5u); CHECK_EQ_U32(a.x[1], 0xe169c58du);
  CHECK_EQ_U32(a.x[2], 0xbc57ac4cu); CHECK_EQ_U32(a.x[3], 0x9b00dbd8u);
  auto b = philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  CHECK_EQ_U32(b.x[0], 0x408f276du); CHECK_EQ_U32(b.x[1], 0x41c83b0eu);
  CHECK_EQ_U32(b.x[2], 0xa20bc7c6u); CHECK_EQ_U32(b.x[3], 0x6d5451fdu);
  auto c = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  CHECK_EQ_U32(c.x[0], 0xd16cfe09u); CHECK_EQ_U32(c.x[1], 0x94fdccebu);
  CHECK_EQ_U32(c.x[2], 0x5001e420u); CHECK_EQ_U32(c.x[3], 0x24126ea1u);

  // Element k uses counter offset + k/128: shifting the offset by one shifts the stream by 128.
  const uint64_t seed = 0x123456789abcdefull;
  for (uint64_t k = 0; k < 1000; ++k)
    CHECK(natasha::rademacher_at(seed, 5, k + 128) == natasha::rademacher_at(seed, 6, k));
  // Signs only, and roughly balanced.
  int plus = 0;
  for (uint64_t k = 0; k < 100000; ++k) {
    const float s = natasha::rademacher_at(seed, 0, k);
    CHECK(s == 1.0f || s == -1.0f);
    plus += s > 0;
  }
  CHECK(plus > 49000 && plus < 51000);
  CHECK(natasha::philox_blocks_for(0) == 0);
  CHECK(natasha::philox_blocks_for(1) == 1);
  CHECK(natasha::philox_blocks_for(128) == 1);
  CHECK(natasha::philox_blocks_for(129) == 2);
  TEST_MAIN_END();
}

#pragma once
// Minimal assertion helpers for the ctest programs (no test framework dependency).
#include <cstdio>
#include <cstdlib>

static int g_failures = 0;
#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                              \
    }                                                                            \
  } while (0)
#define CHECK_EQ_U32(a, b)                                                                     \
  do {                                                                                         \
    unsigned _a = (a), _b = (b);                                                               \
    if (_a != _b) {                                                                            \
      std::fprintf(stderr, "%s:%d: %s = %08x, expected %08x\n", __FILE__, __LINE__, #a, _a, _b); \
      ++g_failures;                                                                            \
    }                                                                                          \
  } while (0)
#define TEST_MAIN_END()                                       \
  if (g_failures) {                                           \
    std::fprintf(stderr, "%d check(s) failed\n", g_failures); \
    return 1;                                                 \
  }                                                           \
  std::printf("all checks passed\n");                         \
  return 0;

#pragma once
// Streaming (non-temporal) stores for outputs that a kernel writes without reading: the line is
// written to memory without first being read for ownership (a write-only fp32 output costs 4
// instead of 8 B/param of traffic), and it does not evict the inputs still being streamed. The
// lines are not left in cache either, so a kernel streams only when its write-only outputs are
// larger than kStreamMinBytes (then the next pass would not find them in cache anyway).
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace natasha {
namespace cpu {

constexpr int64_t kStreamMinBytes = int64_t(16) << 20;  // half the L3 of a 2-core slice; larger L3s: still > L2

// Bytes of the write-only outputs `lists` (each a tensor list) that decide whether to stream.
inline bool worth_streaming(std::initializer_list<at::TensorList> lists) {
  int64_t bytes = 0;
  for (const auto& l : lists)
    for (const auto& t : l) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return bytes >= kStreamMinBytes;
}

// True when streaming stores are available and dst is aligned for them (32 B).
template <typename T>
inline bool can_stream(const T* dst) {
#if defined(__AVX__)
  return (reinterpret_cast<uintptr_t>(dst) & 31u) == 0 && at::vec::Vectorized<T>::size() * sizeof(T) == 32;
#else
  (void)dst;
  return false;
#endif
}

// Stores one Vectorized<float|double> to dst, streaming when `stream` (the caller checked can_stream).
template <typename T>
inline void store_vec(T* dst, const at::vec::Vectorized<T>& v, bool stream) {
#if defined(__AVX__) && defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(dst, static_cast<__m256>(v));
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(dst, static_cast<__m256d>(v));
      return;
    }
  }
#endif
  (void)stream;
  v.store(dst);
}

// Copies n floats (a multiple of 8) from a 32-byte aligned buffer to dst, streaming when `stream`
// and dst is aligned for it.
inline void store_block(float* dst, const float* buf, int64_t n, bool stream) {
#if defined(__AVX__)
  if (stream && can_stream(dst)) {
    for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_load_ps(buf + i));
    return;
  }
#endif
  std::memcpy(dst, buf, static_cast<size_t>(n) * sizeof(float));
}

// Streaming stores are weakly ordered: complete them before the op returns.
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace natasha

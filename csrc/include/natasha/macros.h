#pragma once
// Host/device qualifiers so the per-element math in this folder compiles for CPU and CUDA alike.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define NATASHA_HD __host__ __device__ __forceinline__
#else
#define NATASHA_HD inline
#endif

#pragma once
// The one chunk vocabulary of the CPU (cpu/chunks.h) and CUDA (cuda/multi_tensor_apply.cuh)
// multi-tensor loops: a tensor list is cut into chunks that never span two tensors; a kernel
// body sees one chunk at a time.
#include <cstdint>

namespace natasha {

struct Chunk {
  int tensor;     // the tensor: index into the list (CPU) or slot of the launch metadata (CUDA)
  int64_t start;  // first element of the chunk inside the tensor
  int64_t n;      // elements in the chunk
  int64_t first;  // index of the chunk's first element in the concatenated list (Philox counters)
  int64_t index;  // global chunk number: the row of its partial sums
};

}  // namespace natasha

// Shared helpers of the CUDA kernels: launch-error capture and grid sizing.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace reprokernels {

// Returns the launch error (and clears it) so launchers can hand it back to Python.
inline int last_launch_error() { return static_cast<int>(cudaGetLastError()); }

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Grid-stride kernels: enough blocks to fill the GPU, never more than there is work for.
inline unsigned grid_for(std::int64_t n, int threads, std::int64_t max_blocks = 65535) {
  std::int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace reprokernels

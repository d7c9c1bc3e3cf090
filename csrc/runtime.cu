// Runtime queries and the minimal fill kernel that exercises the launch path end to end.
#include "common.cuh"
#include "launchers.h"

namespace reprokernels {

int cuda_runtime_version() {
  int v = 0;
  cudaError_t err = cudaRuntimeGetVersion(&v);
  return err == cudaSuccess ? v : -static_cast<int>(err);
}

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // a missing driver is sticky in the error state otherwise
    return -static_cast<int>(err);
  }
  return n;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

namespace {
__global__ void fill_f32_kernel(float* __restrict__ out, std::int64_t n, float value) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = value;
  }
}
}  // namespace

int fill_f32(std::uintptr_t ptr, std::int64_t n, float value, std::uintptr_t stream) {
  if (n <= 0) return 0;
  constexpr int kThreads = 256;
  fill_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(reinterpret_cast<float*>(ptr), n,
                                                                             value);
  return last_launch_error();
}

}  // namespace reprokernels

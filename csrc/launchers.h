// Host-side entry points of the CUDA kernels. Plain C++ types only (no CUDA or torch headers), so the
// pybind11 module in bindings.cpp is compiled by the host compiler and never sees a CUDA type.
// Every launcher returns the cudaError_t of its launch (0 = success) as an int; Python raises on non-zero.
#pragma once
#include <cstdint>

namespace reprokernels {

int cuda_runtime_version();            // e.g. 13000; negative cudaError_t on failure
int device_count();                    // >= 0, or a negative cudaError_t (never throws without a driver)
const char* error_string(int code);    // cudaGetErrorString

// Fills n float32 elements at ptr with value on the given stream: the minimal end-to-end launcher.
int fill_f32(std::uintptr_t ptr, std::int64_t n, float value, std::uintptr_t stream);

}  // namespace reprokernels

// visual_prompt: the parameter block and the host-side entry points of the fused CUDA kernels.
//
// Plain C++ only (no CUDA, pybind11 or torch headers): visual_prompt.cu (nvcc) and
// visual_prompt_bindings.cpp (host compiler) both include it. Python fills a VisualPromptParams field by
// field (pybind11 def_readwrite) from tensors and the VPSpec; see reprokernels/cuda/visual_prompt.py.
//
// Semantics (the specification is reprokernels/reference/visual_prompt.py), per output element (b, c, y, xx):
//   placed p = sample of x[b, c] at (y - top, xx - left) when inside the (h2, w2) image, else fill
//   mask   m = tensor mask[b | 0, c | 0, y / kh, xx / kw]   or   (y, xx) in the rectangle XOR invert
//   t      = m * squash(delta[b | shared, c, y, xx])
//   out    = norm(clamp(p + t))  (order 0, pre_norm)   or   norm(p) + t  (order 1, post_norm)
#pragma once
#include <cstdint>

namespace reprokernels {

// Samples of one batch chunk handled by one backward thread: the thread sums the shared-delta gradient of
// a pixel over the chunk and keeps one dmask accumulator per sample of the chunk in registers.
constexpr int kVisualPromptMaxChunk = 8;

struct VisualPromptParams {
  // ---- tensors: data_ptr() as integers, 0 = absent --------------------------------------------------------
  std::uintptr_t x = 0;       // (B, C, h, w), any strides, dtype x_dtype
  std::uintptr_t delta = 0;   // (C, H, W) shared (delta_sb = 0) or (B, C, H, W); dtype float32 or x_dtype
  std::uintptr_t mask = 0;    // float32 (Bm, Cm, Hm, Wm), any strides; 0 = the fixed rectangle mask
  std::uintptr_t mean = 0;    // float32 (C,) contiguous, or 0
  std::uintptr_t stdev = 0;   // float32 (C,) contiguous, or 0 (the `std` argument)
  std::uintptr_t out = 0;     // forward: (B, C, H, W) contiguous, x_dtype
  std::uintptr_t grad = 0;    // backward: (B, C, H, W), any strides, x_dtype
  // backward outputs (0 = not needed):
  std::uintptr_t dx = 0;      // no resize: (B, C, h, w) contiguous x_dtype; resize: d_placed (B, C, h2, w2) float32
  std::uintptr_t ddelta = 0;  // per-sample delta: (B, C, H, W) contiguous delta_dtype;
                              // shared delta, nchunks == 1: (C, H, W) contiguous delta_dtype;
                              // shared delta, nchunks > 1: float32 partials (nchunks, C, H, W), summed by the caller
  std::uintptr_t dmask = 0;   // float32 partials, summed over dim 0 by the caller (nsplit = split_h * split_w):
                              // (nsplit, B, Cm, Hm, Wm) when Bm != 1, else (nchunks * nsplit, Cm, Hm, Wm)
  std::uintptr_t stream = 0;  // cudaStream_t of the launch (ignored by the host emulation)

  // ---- sizes -----------------------------------------------------------------------------------------------
  std::int64_t B = 0, C = 0, h = 0, w = 0;  // x
  std::int64_t H = 0, W = 0;                // canvas
  std::int64_t h2 = 0, w2 = 0;              // the image on the canvas (after the optional resize)
  std::int64_t top = 0, left = 0;           // its position
  std::int64_t rect_top = 0, rect_left = 0, rect_h = 0, rect_w = 0;  // fixed mask rectangle
  std::int64_t Bm = 1, Cm = 1, Hm = 1, Wm = 1;                       // tensor mask (Bm in {1, B}, Cm in {1, C})
  std::int64_t chunk = kVisualPromptMaxChunk;  // backward: samples per work item (<= kMaxChunk when the
                                               // dmask of a per-sample mask is asked for)
  std::int64_t split_h = 1, split_w = 1;       // backward: each kh x kw mask window is split into
                                               // split_h x split_w tiles, one work item each (1 with the
                                               // fixed mask); split_h divides kh, split_w divides kw

  // ---- strides in elements (0 on broadcast dims) -----------------------------------------------------------
  std::int64_t x_sb = 0, x_sc = 0, x_sh = 0, x_sw = 0;
  std::int64_t delta_sb = 0, delta_sc = 0, delta_sh = 0, delta_sw = 0;
  std::int64_t mask_sb = 0, mask_sc = 0, mask_sh = 0, mask_sw = 0;
  std::int64_t grad_sb = 0, grad_sc = 0, grad_sh = 0, grad_sw = 0;

  // ---- codes and flags -------------------------------------------------------------------------------------
  std::int32_t x_dtype = 0;      // 0 float32, 1 float16, 2 bfloat16 (x, out, grad, dx without resize)
  std::int32_t delta_dtype = 0;  // 0 float32, or equal to x_dtype
  std::int32_t delta_per_sample = 0;  // 1: delta is (B, C, H, W); 0: (C, H, W) shared (delta_sb = 0)
  std::int32_t squash = 0;       // 0 none, 1 sigmoid, 2 tanh
  std::int32_t order = 0;        // 0 pre_norm, 1 post_norm
  std::int32_t resize = 0;       // 0 none, 1 nearest, 2 bilinear
  std::int32_t align_corners = 0;
  std::int32_t invert = 0;       // fixed mask: 1 outside the rectangle instead of inside
  std::int32_t has_clamp = 0;    // pre_norm only
  float fill = 0.f;
  float clamp_lo = 0.f, clamp_hi = 0.f;
};

// Launch on params.stream. Return the cudaError_t of the launch as an int (0 = ok; 1 = cudaErrorInvalidValue
// for parameters the kernels cannot serve, e.g. an unsupported dtype pair). Nothing is launched when there
// is no work (B == 0).
int visual_prompt_fwd(const VisualPromptParams& params);
int visual_prompt_bwd(const VisualPromptParams& params);

// Host emulation: the very same per-thread functions run in plain CPU loops over host pointers (CPU
// tensors), one loop iteration per GPU thread's work item. Used to test the kernel code without a GPU.
int visual_prompt_fwd_host(const VisualPromptParams& params);
int visual_prompt_bwd_host(const VisualPromptParams& params);

// Number of backward batch chunks the caller must size partial buffers for: ceil(B / chunk).
std::int64_t visual_prompt_num_chunks(const VisualPromptParams& params);

}  // namespace reprokernels

// label_map: the parameter block and the host-side entry points of the CUDA kernels.
//
// Plain C++ only (no CUDA, pybind11 or torch headers): label_map.cu (nvcc) and label_map_bindings.cpp (host
// compiler) both include it. Python fills a LabelMapParams field by field (pybind11 def_readwrite) from tensors;
// see reprokernels/cuda/label_map.py.
//
// Semantics (the specification is reprokernels/reference/label_map.py). With f the identity (input 0), softmax
// (1) or log-softmax (2) over the K source classes of a row, computed from the row's (max, log sum exp(x - max)):
//   index mapping (T, M):  out[b, t] = w_t * sum_j f(x)[b, mapping[t, j]] over the entries j >= 0, with
//                          w_t = 1 (sum) or 1 / count_t (mean; a target without entries gives 0)
//   dense mapping (K, T):  out[b, t] = sum_k f(x)[b, k] * W[k, t]
// lse (B, 2) float32 receives (max, log sum exp(x - max)) of each row for inputs 1 and 2.
// Backward, with c = d out / d f:  d x = c (input 0), p * (c - S) (input 1), c - p * S (input 2), where p is the
// softmax and S the row scalar sum_t g_t out_t (input 1) or sum_t g_t tw_t (input 2; tw_t = the summed weights of
// target t). Index mappings compute S in the kernel; dense mappings get it from the caller (srow).
#pragma once
#include <cstdint>

namespace reprokernels {

struct LabelMapParams {
  // ---- tensors: data_ptr() as integers, 0 = absent --------------------------------------------------------
  std::uintptr_t x = 0;        // logits (B, K), any strides, x_dtype (element-aligned)
  std::uintptr_t mapping = 0;  // index: (T, M) int64/int32 (map_dtype), any strides
  std::uintptr_t w = 0;        // dense: (K, T) w_dtype, any strides
  std::uintptr_t out = 0;      // forward: (B, T) contiguous; index: x_dtype for input 0, float32 otherwise;
                               //   dense: out_dtype. Index backward, input 1: the saved float32 (B, T) output
  std::uintptr_t lse = 0;      // (B, 2) float32 contiguous: written by the forward, read by the backward
  std::uintptr_t grad = 0;     // backward: (B, T), any strides, grad_dtype
  std::uintptr_t tw = 0;       // index backward, input 2: float32 (T,) summed weights of each target
  std::uintptr_t srow = 0;     // dense backward, inputs 1/2: float32 (B,) the row scalar S
  std::uintptr_t esrc = 0;     // index backward: int64 (T * M,) the entries' sources sorted (stable), -1s first
  std::uintptr_t etgt = 0;     // index backward: int64 (T * M,) the target of each sorted entry
  std::uintptr_t ew = 0;       // index backward: float32 (T * M,) the weight of each sorted entry
  std::uintptr_t blk = 0;      // index backward: int64 (nchunks + 1,) chunk c owns entries [blk[c], blk[c + 1])
  std::uintptr_t dx = 0;       // backward: (B, K) contiguous x_dtype
  std::uintptr_t dw = 0;       // dense backward: (K, T) contiguous w_dtype
  std::uintptr_t stream = 0;   // cudaStream_t of the launch (ignored by the host emulation)

  // ---- sizes -----------------------------------------------------------------------------------------------
  std::int64_t B = 0, K = 0, T = 0, M = 0;
  std::int64_t chunk = 0;    // index backward: columns per block (a row is cut into nchunks chunks)
  std::int64_t nchunks = 1;  // index backward: at most 65535

  // ---- strides in elements ---------------------------------------------------------------------------------
  std::int64_t x_sb = 0, x_sk = 0;
  std::int64_t map_st = 0, map_sm = 0;
  std::int64_t w_sk = 0, w_st = 0;
  std::int64_t grad_sb = 0, grad_st = 0;

  // ---- codes and flags -------------------------------------------------------------------------------------
  std::int32_t x_dtype = 0;     // 0 float32, 1 float16, 2 bfloat16 (also w_dtype, out_dtype, grad_dtype)
  std::int32_t w_dtype = 0;
  std::int32_t out_dtype = 0;   // dense forward's output
  std::int32_t grad_dtype = 0;
  std::int32_t map_dtype = 0;   // 0 int64, 1 int32
  std::int32_t input = 0;       // 0 logits, 1 probs, 2 log_probs
  std::int32_t reduce = 0;      // 0 mean, 1 sum
  std::int32_t threads = 0;     // threads per block of the row kernels: 0 = chosen by the launcher, else a
                                //   multiple of 32 in [32, 1024] (tests use it to cover the reduction shapes)
};

// Launch on params.stream. Return the cudaError_t of the launch as an int (0 = ok; 1 = cudaErrorInvalidValue for
// parameters the kernels cannot serve: an unknown code, a missing pointer, a bad size). Nothing is launched when
// there is no work.
int label_map_fwd(const LabelMapParams& params);        // index mapping: out (and lse for inputs 1/2)
int label_map_bwd(const LabelMapParams& params);        // index mapping: dx
int label_map_dense_fwd(const LabelMapParams& params);  // dense mapping: lse (inputs 1/2) then out
int label_map_dense_bwd(const LabelMapParams& params);  // dense mapping: dx and/or dw (the non-zero pointers)

// Host emulation: the very same per-thread functions run in plain CPU loops over host pointers (CPU tensors),
// thread by thread and phase by phase, the block reductions in the device's tree order. Used to test the kernel
// code without a GPU.
int label_map_fwd_host(const LabelMapParams& params);
int label_map_bwd_host(const LabelMapParams& params);
int label_map_dense_fwd_host(const LabelMapParams& params);
int label_map_dense_bwd_host(const LabelMapParams& params);

}  // namespace reprokernels

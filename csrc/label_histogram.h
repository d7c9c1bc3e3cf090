// label_histogram: the parameter block and the host-side entry points of the CUDA kernels.
//
// Plain C++ only (no CUDA, pybind11 or torch headers): label_histogram.cu (nvcc) and label_histogram_bindings.cpp
// (host compiler) both include it. Python fills a LabelHistogramParams field by field (pybind11 def_readwrite) from
// tensors; see reprokernels/cuda/label_histogram.py.
//
// Semantics (the specification is reprokernels/reference/label_histogram.py): out (K, T) float32, any strides, +=
// the batch's joint statistic D[s, t]: sample b of target class t adds 1 at row argmax(x[b]) (or pred[b]) for
// weight 0 (count), softmax(x[b])[s] at every kept row s for weight 1 (prob; all rows, or with top-k the entries
// > thr[b] and the entries == thr[b] up to source index jstar[b]).
//
// The caller prepares, with torch, on B integers: perm (the samples sorted by target, stable) and starts (class t
// owns perm[starts[t] .. starts[t + 1])); with top-k, thr (each row's k-th largest logit as float32) and quota (k
// minus the number of entries strictly above thr). The launcher then runs the row kernel (argmax into pred, or the
// softmax statistics m / inv and the tie cut-off jstar) when logits are given, the histogram kernel (one block per
// (class, block of sources, split)), and with splits > 1 the ordered reduction of the partials into out.
#pragma once
#include <cstdint>

namespace reprokernels {

struct LabelHistogramParams {
  // ---- tensors: data_ptr() as integers, 0 = absent --------------------------------------------------------
  std::uintptr_t x = 0;       // logits (B, K), any strides, x_dtype (element-aligned); 0 = predictions are given
  std::uintptr_t pred = 0;    // (B,) predictions, stride pred_s, pred_dtype: given (count from predictions), or
                              //   written by the row kernel (count from logits: int32, contiguous)
  std::uintptr_t perm = 0;    // (B,) int64 contiguous: the samples sorted by target class (stable)
  std::uintptr_t starts = 0;  // (T + 1,) int64 contiguous: class offsets into perm
  std::uintptr_t m = 0;       // prob: (B,) float32 row maxima (written by the row kernel)
  std::uintptr_t inv = 0;     // prob: (B,) float32 1 / sum exp(x - m) (written by the row kernel)
  std::uintptr_t thr = 0;     // prob + top-k: (B,) float32 the k-th largest logit of each row
  std::uintptr_t quota = 0;   // prob + top-k: (B,) int32 how many entries == thr are kept
  std::uintptr_t jstar = 0;   // prob + top-k: (B,) int32 the source index of the last kept tie (K = all ties)
  std::uintptr_t part = 0;    // splits > 1: (splits, T, K) float32 contiguous partial sums
  std::uintptr_t out = 0;     // (K, T) float32, strides out_sk / out_st: the running statistic, updated in place
  std::uintptr_t stream = 0;  // cudaStream_t of the launch (ignored by the host emulation)

  // ---- sizes -----------------------------------------------------------------------------------------------
  std::int64_t B = 0, K = 0, T = 0;
  std::int64_t splits = 1;  // programs per (class, source block): 1 = add straight into out, else partials

  // ---- strides in elements ---------------------------------------------------------------------------------
  std::int64_t x_sb = 0, x_sk = 0;
  std::int64_t pred_s = 1;
  std::int64_t out_sk = 0, out_st = 0;

  // ---- codes and flags -------------------------------------------------------------------------------------
  std::int32_t x_dtype = 0;     // 0 float32, 1 float16, 2 bfloat16
  std::int32_t pred_dtype = 0;  // 0 int64, 1 int32
  std::int32_t weight = 0;      // 0 count, 1 prob
  std::int32_t topk = 0;        // prob: 1 = thr / quota are given (a top-k below K), 0 = keep every class
  std::int32_t threads = 0;     // threads per block of the histogram kernel (= sources per block): 0 = chosen by
                                //   the launcher, else a multiple of 32 in [32, 1024] (tests use it)
};

// Launch on params.stream: the row kernel (with logits), the histogram kernel, the reduction (splits > 1). Returns
// the cudaError_t of the launches as an int (0 = ok; 1 = cudaErrorInvalidValue for parameters the kernels cannot
// serve: an unknown code, a missing pointer, a bad size). Nothing is launched when B == 0.
int label_histogram_accumulate(const LabelHistogramParams& params);

// Host emulation: the very same per-thread functions run in plain CPU loops over host pointers (CPU tensors), lane
// by lane, the warp reductions and ballots in the device's order. Used to test the kernel code without a GPU.
int label_histogram_accumulate_host(const LabelHistogramParams& params);

}  // namespace reprokernels

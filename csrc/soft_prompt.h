// soft_prompt_concat: the parameter block and the host-side entry points of the fused CUDA kernels.
//
// Plain C++ only (no CUDA, pybind11 or torch headers): soft_prompt.cu (nvcc) and soft_prompt_bindings.cpp
// (host compiler) both include it. Python fills a SoftPromptParams field by field (pybind11 def_readwrite)
// from tensors; see reprokernels/cuda/soft_prompt.py.
//
// Semantics (the specification is reprokernels/reference/soft_prompt.py). With s = clamp(insert_at[b], 0, L)
// (0 without insert_at) and t = task_ids[b] (0 without task_ids), output row j of sample b is
//   prompt[t, j - s]                                  for s <= j < s + P  (cast to the token dtype, never scaled)
//   tokens[b, l] * embed_scale, l = j (j < s) or j - P  otherwise
// where tokens[b, l] = embedding_weight[input_ids[b, l]] or inputs_embeds[b, l]. An index outside its range
// (an id outside [0, V), a task outside [0, T)) reads nothing and gives a zero row: the op range-checks them
// before the launch, the kernels still never read out of bounds.
//
// Backward: dprompt[t] = sum over the samples b of task t (in increasing b: the order of a stable argsort of
// task_ids) of grad[b, s_b : s_b + P], accumulated in float32 in that fixed order (no atomics);
// dembeds[b, l] = grad[b, j(l)] * embed_scale.
#pragma once
#include <cstdint>

namespace reprokernels {

struct SoftPromptParams {
  // ---- tensors: data_ptr() as integers, 0 = absent --------------------------------------------------------
  std::uintptr_t prompt = 0;    // (T, P, D) (a (P, D) prompt: T = 1, prompt_st = 0), any strides, prompt_dtype
  std::uintptr_t tokens = 0;    // from_ids: embedding_weight (V, D); else inputs_embeds (B, L, D); tok_dtype
  std::uintptr_t ids = 0;       // from_ids: input_ids (B, L), any strides, integer ids_dtype
  std::uintptr_t task = 0;      // task_ids (B,), any stride, integer task_dtype; 0 = every sample task 0
  std::uintptr_t insert = 0;    // insert_at (B,), any stride, integer insert_dtype; 0 = every sample 0
  std::uintptr_t out = 0;       // forward: (B, P + L, D) contiguous, tok_dtype
  std::uintptr_t grad = 0;      // backward: (B, P + L, D), any strides, tok_dtype (the output's)
  std::uintptr_t order = 0;     // backward: int64 (B,) samples sorted by task (stable); 0 = identity
  std::uintptr_t offsets = 0;   // backward: int64 (T + 1,) task t owns order[offsets[t] : offsets[t + 1]];
                                //   0 = one task owning every sample
  std::uintptr_t dprompt = 0;   // backward: nchunks == 1: (T, P, D) contiguous prompt_dtype;
                                //   nchunks > 1: float32 partials (nchunks, T, P, D), summed by the caller
  std::uintptr_t dembeds = 0;   // backward: (B, L, D) contiguous tok_dtype
  std::uintptr_t stream = 0;    // cudaStream_t of the launch (ignored by the host emulation)

  // ---- sizes -----------------------------------------------------------------------------------------------
  std::int64_t B = 0, L = 0, P = 0, D = 0;
  std::int64_t T = 1;       // prompts in the table
  std::int64_t V = 0;       // rows of the embedding table (from_ids)
  std::int64_t chunk = 1;   // backward: samples of a task per work item (>= 1)
  std::int64_t nchunks = 1; // backward: chunks per task; > 1 writes float32 partials

  // ---- strides in elements ---------------------------------------------------------------------------------
  std::int64_t prompt_st = 0, prompt_sp = 0, prompt_sd = 0;
  std::int64_t tok_sv = 0;                        // from_ids: embedding_weight's row stride
  std::int64_t tok_sb = 0, tok_sl = 0;            // inputs_embeds: batch and token strides
  std::int64_t tok_sd = 0;                        // feature stride of either
  std::int64_t ids_sb = 0, ids_sl = 0;
  std::int64_t task_s = 0, insert_s = 0;
  std::int64_t grad_sb = 0, grad_sj = 0, grad_sd = 0;

  // ---- codes and flags -------------------------------------------------------------------------------------
  std::int32_t prompt_dtype = 0;  // 0 float32, 1 float16, 2 bfloat16
  std::int32_t tok_dtype = 0;     // same codes: the output's (forward) or grad's (backward) dtype
  std::int32_t ids_dtype = 0;     // 0 int64, 1 int32, 2 int16, 3 int8, 4 uint8 (also task_dtype, insert_dtype)
  std::int32_t task_dtype = 0;
  std::int32_t insert_dtype = 0;
  std::int32_t from_ids = 0;      // 1: gather rows of embedding_weight by input_ids; 0: read inputs_embeds
  float embed_scale = 1.f;        // applied to token rows (forward) and to dembeds (backward) when != 1
  // 16-byte vector access, decided by the caller from data_ptr and strides (the launcher re-checks and
  // answers cudaErrorInvalidValue when a flag does not hold). Rows are cut into groups of VEC = 16 /
  // sizeof(output type) features; a source group of VEC elements is read in packs of min(16, VEC * size) bytes.
  std::int32_t vec_out = 0;       // forward out / dembeds / dprompt (or partials): D % VEC == 0, 16-byte base
  std::int32_t vec_prompt = 0;    // prompt rows: pack-aligned base, prompt_sd == 1, row strides whole packs
  std::int32_t vec_tokens = 0;    // token rows (table or inputs_embeds), same rule
  std::int32_t vec_grad = 0;      // grad rows, same rule
};

// Launch on params.stream. Return the cudaError_t of the launch as an int (0 = ok; 1 = cudaErrorInvalidValue
// for parameters the kernels cannot serve: an unknown dtype code, a missing pointer, a vector flag that does
// not hold). Nothing is launched when there is no work.
int soft_prompt_fwd(const SoftPromptParams& params);
int soft_prompt_bwd(const SoftPromptParams& params);  // dprompt and/or dembeds (the non-zero pointers)

// Host emulation: the very same per-thread functions run in plain CPU loops over host pointers (CPU
// tensors), one loop iteration per GPU thread's work item. Used to test the kernel code without a GPU.
int soft_prompt_fwd_host(const SoftPromptParams& params);
int soft_prompt_bwd_host(const SoftPromptParams& params);

}  // namespace reprokernels

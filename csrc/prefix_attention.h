// prefix_attention (decode) and merge_attention_states: parameter blocks and host-side entry points of the CUDA
// kernels.
//
// Plain C++ only (no CUDA, pybind11 or torch headers): prefix_attention.cu (nvcc) and
// prefix_attention_bindings.cpp (host compiler) both include it. Python fills the blocks field by field
// (reprokernels/cuda/prefix_attention.py). The specification is reprokernels/reference/prefix_attention.py.
//
// Decode forward (Lq <= 16 queries per row, no gradients), two launches:
//   1. prefix_attention_partials: every block owns one work item and writes the normalised partial output
//      (float32, d) and natural-log LSE of each of its query rows over one key range into slot s of
//      part_o (NS, R, d) / part_lse (NS, R), R = B * Hq * Lq, NS = SP + S:
//        prefix items (task, kv head, prefix split sp < SP, query block): the queries of every row of the task and
//          every head of the GQA group, against prefix keys [sp * pchunk, (sp + 1) * pchunk): slot sp;
//        sequence items (row b, kv head, split s < S, query block): the row's G * Lq queries against its own keys
//          [s * kchunk, (s + 1) * kchunk), cut at kv_lengths[b] and the causal bound: slot SP + s.
//      An item with no visible key writes o = 0, lse = -inf.
//   2. prefix_attention_merge: one warp per query row combines its NS partials in slot order (fixed:
//      deterministic) and writes out (q's dtype) and lse (float32).
// merge_attention_states: the same merge over two partitions read with their own dtypes and strides.
#pragma once
#include <array>
#include <cstdint>

namespace reprokernels {

struct PrefixAttnParams {
  // ---- tensors: data_ptr() as integers, 0 = absent --------------------------------------------------------
  std::uintptr_t q = 0;         // (B, Hq, Lq, D) dtype, any strides
  std::uintptr_t k = 0;         // (B, Hkv, Lk, D) dtype, any strides
  std::uintptr_t v = 0;
  std::uintptr_t pk = 0;        // (Hkv, P, D) or (T, Hkv, P, D) p_dtype, any strides (pk_st = 0 when shared)
  std::uintptr_t pv = 0;
  std::uintptr_t rows = 0;      // int64 (B,): batch rows grouped by task (stable); absent = 0 .. B - 1
  std::uintptr_t task_off = 0;  // int64 (T + 1,): the rows of task t are rows[task_off[t] .. task_off[t + 1])
  std::uintptr_t kpm = 0;       // key_padding_mask (B, Lk) uint8 (bool), any strides; absent = all kept
  std::uintptr_t kv_len = 0;    // (B,) contiguous int64 / int32 (len_dtype); absent = Lk for every row
  std::uintptr_t part_o = 0;    // float32 (NS, R, D) contiguous
  std::uintptr_t part_lse = 0;  // float32 (NS, R) contiguous
  std::uintptr_t out = 0;       // (B, Hq, Lq, D) dtype contiguous
  std::uintptr_t lse = 0;       // float32 (B, Hq, Lq) contiguous
  std::uintptr_t stream = 0;    // cudaStream_t of the launch (ignored by the host emulation)

  // ---- sizes -----------------------------------------------------------------------------------------------
  std::int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, P = 0, D = 0;
  std::int64_t T = 1;        // tasks of the prefix table (1 when shared)
  std::int64_t SP = 0;       // prefix splits (0 without a prefix)
  std::int64_t pchunk = 0;   // prefix keys per split (a multiple of the key tile)
  std::int64_t S = 1;        // splits of the own keys (>= 1)
  std::int64_t kchunk = 0;   // own keys per split (a multiple of the key tile)
  std::int64_t max_blocks = 0;  // grid size cap (0 = the launcher's default); blocks loop over work items

  // ---- strides in elements ---------------------------------------------------------------------------------
  std::int64_t q_sb = 0, q_sh = 0, q_sl = 0, q_sd = 0;
  std::int64_t k_sb = 0, k_sh = 0, k_sl = 0, k_sd = 0;
  std::int64_t v_sb = 0, v_sh = 0, v_sl = 0, v_sd = 0;
  std::int64_t pk_st = 0, pk_sh = 0, pk_sl = 0, pk_sd = 0;
  std::int64_t pv_st = 0, pv_sh = 0, pv_sl = 0, pv_sd = 0;
  std::int64_t kpm_sb = 0, kpm_sl = 0;

  // ---- codes and flags -------------------------------------------------------------------------------------
  float scale = 1.f;           // score multiplier
  std::int32_t dtype = 0;      // q, k, v, out: 0 float32, 1 float16, 2 bfloat16
  std::int32_t p_dtype = 0;    // prefix (rounded to dtype before any product, as the reference does)
  std::int32_t len_dtype = 0;  // kv_len: 0 int64, 1 int32
  std::int32_t causal = 0;
};

// Limits of the kernels (the launcher checks them and returns cudaErrorInvalidValue beyond them).
constexpr int kPaMaxHeadDim = 512;  // head dims 1 .. 512 (tiles for d <= 64, 128, 256, 512)
constexpr int kPaMaxLq = 16;        // queries per row of the decode path
constexpr int kPaMaxParts = 32;     // NS = SP + S partial slots per query row

// Query rows per block (4 warps, rows split among them) for head dim D: 16 up to 128, 8 up to 256, 4 beyond.
int prefix_attention_query_block(std::int64_t D);
// Keys per shared-memory tile for head dim D: 32 up to 128, 16 up to 256, 8 beyond.
int prefix_attention_key_tile(std::int64_t D);

int prefix_attention_partials(const PrefixAttnParams& params);
int prefix_attention_merge(const PrefixAttnParams& params);
// Host emulation: the same per-thread phase functions in CPU loops over host pointers, every "lane" of a warp
// phase by phase and the warp shuffles in the device's order. Used to test the kernel code without a GPU.
int prefix_attention_partials_host(const PrefixAttnParams& params);
int prefix_attention_merge_host(const PrefixAttnParams& params);

struct MergeStatesParams {
  std::uintptr_t oa = 0, ob = 0;    // (..., L, D) oa_dtype / ob_dtype, any strides (rows as up to 4 leading dims)
  std::uintptr_t la = 0, lb = 0;    // (..., L) la_dtype / lb_dtype, any strides
  std::uintptr_t o = 0;             // (R, D) o_dtype contiguous
  std::uintptr_t lse = 0;           // (R,) float32 contiguous
  std::uintptr_t stream = 0;
  std::int64_t R = 0, D = 0;
  std::array<std::int64_t, 4> size = {1, 1, 1, 1};  // the leading dims (rows = their product), outermost first
  std::array<std::int64_t, 4> oa_s = {0, 0, 0, 0}, ob_s = {0, 0, 0, 0};
  std::array<std::int64_t, 4> la_s = {0, 0, 0, 0}, lb_s = {0, 0, 0, 0};
  std::int64_t oa_sd = 1, ob_sd = 1;    // stride of the last dim
  std::int32_t oa_dtype = 0, ob_dtype = 0, la_dtype = 0, lb_dtype = 0, o_dtype = 0;  // 0 f32, 1 f16, 2 bf16
};

int merge_attention_states(const MergeStatesParams& params);
int merge_attention_states_host(const MergeStatesParams& params);

}  // namespace reprokernels

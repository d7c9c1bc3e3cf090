"""Triton kernels of ``prefix_attention``: attention over [prefix keys ; the sequence's own keys] without
ever materialising the concatenation or a batch-expanded prefix.

Semantics (DESIGN.md): every query sees all P prefix keys; among the sequence's own Lk keys ``causal`` is
bottom-right aligned (query i of Lq sees keys j <= Lk - Lq + i); keys dropped by ``key_padding_mask``
(True = keep) or at/after ``kv_lengths[b]`` are never seen (these conditions intersect: causal alignment is
always relative to Lk). A query that sees nothing gets O = 0 and LSE = -inf, never NaN. LSE is natural-log
float32. GQA/MQA: query head h reads kv head h // (Hq // Hkv). Unseen keys may hold anything (NaN, inf: a KV
cache's unused slots): every kernel loads their K/V tile rows under the key-validity mask (``_load_keys``, as 0),
so they reach neither a score nor a product (masking only the scores would leave p = 0 times NaN in p @ V and
in dP = dO V^T), and their dk, dv are exactly 0. task_ids / kv_lengths are read as dense (B,) arrays
(``_dense_index``).

Grids: every launch uses grid axis 0 alone, (prod of the factors below,), and the kernel unflattens its
program id (``launch_grid``): CUDA caps axes 1 and 2 at 65,535, which B * Hq alone can pass. Index math that
can pass 2**31 elements (rows of B * H * L, element offsets) runs in int64.

Forward (``_pa_fwd_kernel``), B * Hq * cdiv(Lq, BLOCK_M) programs: a program owns one (batch, q head, query
block). It keeps its Q tile in registers, streams the prefix blocks of its row's task straight from the
un-batched (Hkv, P, d) / (T, Hkv, P, d) prefix tensor, then the sequence blocks up to the last key any of its
queries can see (causal bound and kv_lengths cut the loop; the padding mask is applied per key), with an
online softmax in the log2 domain and float32 accumulators; writes O once (input dtype) and the LSE.

Decode (``use_decode_path``: kv_lengths given, Lq <= DECODE_MAX_LQ = 16, P > 0), forward only:
  1. ``_pa_prefix_state_kernel``, T * Hkv * SP * cdiv(B * G * Lq, BLOCK_M) programs: the prefix attention of all
     queries that read one (task, kv head) -- M packs (row of the task, head of the GQA group, query) -- as one
     tiled GEMM, so the prefix is read once per BLOCK_M queries instead of once per (row, head). Program
     (task, kv head, sp, M block) covers prefix keys [sp * chunk, (sp + 1) * chunk) only, so the split leaves
     that total unchanged: each chunk is read once by each M block. It stores the unnormalised online-softmax
     state (m, l, acc) of its queries over its chunk in float32: (SP, B * Hq * Lq, d + 2) floats in all (no
     B * P * d).
     Split over the prefix (``decode_prefix_splits``, SP > 1): when stage 1 has fewer than
     DECODE_PREFIX_SPLIT_MIN_PROGRAMS = 264 programs with queries (two per SM of an H200; the count is
     ``decode_stage1_programs``, Hkv * (cdiv(B * G * Lq, BLOCK_M) + min(T, B) - 1), exact for one task, host
     sizes only: no device sync) and P >= 2 * DECODE_PREFIX_SPLIT_MIN_KEYS = 512, P is cut into
     SP = min(cdiv(P, 256), cdiv(264, programs)) chunks of a multiple of BLOCK_N keys (the last one shorter).
     Pass 2 merges the SP states when it loads its starting state (below): no extra pass.
  2. ``_pa_decode_seq_kernel``, B * Hkv * S * cdiv(G * Lq, BLOCK_M) programs: a program owns one (batch row, kv
     head) and packs the G * Lq queries of its GQA group into the M tile (the group's rows are contiguous in
     (B, Hq, Lq)), so each own key/value tile is loaded once for all G heads instead of once per q head. Its
     starting state is stage 1's: chunk 0's state, into which chunks 1 .. SP - 1 are merged in chunk order (a
     fixed order: deterministic; with SP = 1 this is exactly the unsplit state). It continues that state over
     the row's own keys, whose loads stop at kv_lengths[b]. With S = 1 it normalises and stores O and the LSE
     itself: the merge with the prefix is the online softmax, no merge pass.
  3. Split-K over the own keys (``decode_splits``, S > 1): when pass 2 has fewer than DECODE_SPLIT_MIN_PROGRAMS
     = 264 programs (two per SM of an H200) and the cache holds >= 2 * DECODE_SPLIT_MIN_KEYS keys, the own keys
     are cut into S chunks of >= DECODE_SPLIT_MIN_KEYS keys (a multiple of BLOCK_N; sized from the capacity Lk,
     so no device sync on kv_lengths). Split 0 starts from the (merged) prefix state, the others from the empty
     state; each stores its partial (m, l, acc) in float32 ((S, B * Hq * Lq, d + 2)), and
     ``_pa_decode_reduce_kernel``, cdiv(B * Hq * Lq, BLOCK_R) programs, combines them in split order (fixed:
     deterministic) and normalises. Both splits compose: stage 1 over the prefix, pass 2 over the own keys.
  Decisions at the issue's decode shapes (Hq = 32, Hkv = 8, Lq = 1, d = 128, so G * Lq = 4; 16-bit stage 1
  BLOCK_M = 64, BLOCK_N = 64; pass 2 one M block, BLOCK_N = 128):
     stage 1 over the prefix, SP x chunk (programs): B = 16 (8 programs unsplit): P = 512 -> 2 x 256 (16),
     2048 -> 8 x 256 (64), 8192 -> 32 x 256 (256); B = 64 (32): 512 -> 2 x 256 (64), 2048 -> 8 x 256 (256),
     8192 -> 9 x 960 (288); B = 256 (128): 512 -> 2 x 256 (256), 2048 -> 3 x 704 (384), 8192 -> 3 x 2752 (384).
     The cost is SP - 1 extra partial states written and read: (SP - 1) * B * Hq * Lq * (d + 2) * 4 bytes each
     way (B = 64, P = 8192: 8.5 MB, against 34 MB of bf16 prefix and 34 MB of own K/V at 128 keys), plus SP
     reads of q instead of one (0.5 MB per read there). Small batches stay below a wave by design: B = 16 at
     P = 512 has 16 queries per kv head x 2 chunks of 256 keys, and cutting further costs more partial-state
     traffic than the GEMM it parallelises.
     pass 2 over the own keys: only B = 16 with a 1024-key cache splits (3 chunks of 384 keys: 384 programs
     instead of 128, for ~0.8 MB of partials against 64 MB of bf16 own K/V); B >= 64 and 128-key caches never
     do. That split is there for small batches (B = 1: 8 programs on 132 SMs), where it matters most.
  Not done (yet): neither split nor the tile configs of the decode kernels have been timed on a GPU (the
  thresholds 264 programs / 256 keys are estimates from the work per program and the partial-state bytes);
  with many tasks (T close to B) stage 1's program count is an upper bound and it still launches
  T * Hkv * cdiv(B * G * Lq, BLOCK_M) * SP programs, most of which exit at once. The backward is the same for
  both paths (it never reads the decode state).

Backward, FlashAttention-2 style, everything recomputed from the saved LSE:
  1. ``_pa_bwd_pre_kernel``: delta = rowsum(dO * O) in float32, (B, Hq, Lq).
  2. ``_pa_bwd_dkdv_kernel``, B * Hkv * cdiv(Lk, BLOCK_N) programs: a program owns one block of sequence keys of
     one (batch, kv head), loops over the Hq // Hkv query heads of its group (the GQA sum happens in registers)
     and the query blocks that can see its keys, writes dk, dv once.
  3. ``_pa_bwd_dq_kernel``, B * Hq * cdiv(Lq, BLOCK_M) programs: the mirror of the forward loop, writes dq once.
  4. ``_pa_bwd_dprefix_kernel``, T * Hkv * S * cdiv(P, BLOCK_N) programs: a program owns one block of prefix
     keys of one (task, kv head) and one of S contiguous shares of that task's work items -- (batch row, q
     head of the group, query block), rows in increasing order (a stable sort of task_ids + per-task offsets,
     built on the device) -- and sums them in that fixed order in float32 registers. S
     (``prefix_grad_splits``) grows until about PREFIX_GRAD_SPLIT_MIN_PROGRAMS = 264 programs (the unsplit
     pass has one program per (task, kv head, key block): 32 at the training shapes, each walking the whole
     batch) while every share keeps >= PREFIX_GRAD_SPLIT_MIN_ITEMS query blocks. S = 1 stores the gradients
     directly; S > 1 stores float32 partials ((S, T * Hkv * P, d) each for dk and dv) and
     ``_pa_sum_splits_kernel`` adds them in split order and casts once: deterministic, no atomics, and no
     (B, P, d) partials are ever allocated. At the training shapes (B = 8, P = 64, d = 128, BLOCK_N = 64):
     Hq = Hkv = 32 -> S = 9 (288 programs, 4.7 MB each of dk / dv partials); Hq = 32, Hkv = 8, T = 4 -> S = 9
     (288); B = 2, Hq = Hkv = 8, Lq = 1024 -> S = 32 (256).

Precision: every tile is cast to one dot dtype before its tl.dot, and every dot gets
``input_precision="ieee"``. The dot dtype is the activations' (q, k, v) dtype: float16/bfloat16 activations
run on tensor cores with float32 accumulation -- a float32 prefix beside them (float32 master weights in
prefix tuning) is cast to the activation dtype for the dots, while its gradients still accumulate and are
stored in float32 -- and P and dS are cast to it before their dots (as in FlashAttention). float32
activations keep exact float32 dots (FMA; "ieee" so GPUs that default to TF32 do not round them); a 16-bit
prefix beside them is upcast exactly. Under TRITON_INTERPRET=1 bfloat16 dots are wrong, so there bfloat16
activations compute in float32.

Tiles: ``_GPU_CONFIGS``, per kernel, 16-bit or float32 dots and BLOCK_D, checked ahead of time for sm_80 and
sm_90 (tools/aot_audit.py): shared memory within both archs' per-block limit and no register spills
in the 16-bit kernels; float32 tiles are small because Triton's FMA dot holds a thread's whole rows of both
operands in registers.

Head dims: SUPPORTED_HEAD_DIMS; a non-power-of-2 d runs on a padded BLOCK_D with masked loads/stores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._alloc import empty_output

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)

_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _load_tile(base, rows, cols, s_r, s_c, n_rows, n_cols, DOT: tl.constexpr):
    """(len(rows), len(cols)) tile in the dot dtype DOT, zeros outside [0, n_rows) x [0, n_cols)."""
    ptrs = base + rows.to(tl.int64)[:, None] * s_r + cols[None, :] * s_c
    t = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
    return t.to(DOT)


@triton.jit
def _load_keys(base, rows, cols, s_r, s_c, row_ok, n_cols, DOT: tl.constexpr):
    """(len(rows), len(cols)) tile of sequence keys or values in DOT, zeros in every row that is not ``row_ok``:
    unseen keys (padded, past kv_lengths) may hold NaN/inf, and a probability of 0 times NaN is still NaN, so
    they are never loaded, only masking the scores would not do."""
    ptrs = base + rows.to(tl.int64)[:, None] * s_r + cols[None, :] * s_c
    t = tl.load(ptrs, mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
    return t.to(DOT)


@triton.jit
def _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM: tl.constexpr):
    """(BLOCK_N,) mask of the sequence keys n that exist and are not padded (kv_lengths folded into kvlen)."""
    ok = (n < Lk) & (n < kvlen)
    if HAS_KPM:
        keep = tl.load(kpm_ptr + b * s_mb + n.to(tl.int64) * s_mn, mask=n < Lk, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def _fwd_step(acc, m_i, l_i, q, kT, v, valid, qk_scale):
    """One online-softmax step over a key block: scores in the log2 domain, masked keys at -inf. A row that has
    seen nothing yet keeps m = -inf and is rescaled against 0 instead (exp2(-inf - -inf) would be NaN)."""
    s = tl.dot(q, kT, input_precision="ieee") * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _store_out(o_ptr, lse_ptr, row, rmask, acc, m_i, l_i, offs_d, D):
    """Normalise an online-softmax state (m in log2 units) and store O (output dtype) and the natural-log LSE of
    rows ``row`` of the flat (rows, D) output. A row that saw nothing (l = 0) gets O = 0 and LSE = -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(o_ptr + row.to(tl.int64)[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & (offs_d < D)[None, :])
    tl.store(lse_ptr + row, lse, mask=rmask)


@triton.jit
def _merge_state(m_i, l_i, acc, m_s, l_s, acc_s):
    """Combine two online-softmax states over disjoint key sets (m in log2 units). Two empty states (m = -inf)
    give an empty state, never NaN. Merging into the empty state returns the other state exactly."""
    m_new = tl.maximum(m_i, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: exp2(-inf - 0) = 0, no NaN
    alpha = tl.exp2(m_i - m_safe)
    beta = tl.exp2(m_s - m_safe)
    return acc * alpha[:, None] + acc_s * beta[:, None], m_new, l_i * alpha + l_s * beta


# ------------------------------------------------------------------------------------------------ forward


@triton.jit
def _pa_fwd_kernel(
    o_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, task_ptr, kpm_ptr, kvlen_ptr,
    Hq, G, Lq, Lk, P, D, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    s_mb, s_mn,
    CAUSAL: tl.constexpr, HAS_TASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one grid axis (B * Hq * query blocks can pass the 65,535 cap of axes 1 and 2); the query blocks of one
    # (row, head) are neighbours, so they share its K/V tiles in L2
    pid = tl.program_id(0).to(tl.int64)
    n_mb = tl.cdiv(Lq, BLOCK_M)
    bh = pid // n_mb
    pid_m = (pid % n_mb).to(tl.int32)
    b = bh // Hq
    h = bh % Hq
    kvh = h // G
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(q_ptr + b * s_qb + h * s_qh, m, offs_d, s_qm, s_qd, Lq, D, DOT)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)

    # 1. the prefix, read from the un-batched tensor of this row's task
    if HAS_TASK:
        t = tl.load(task_ptr + b).to(tl.int64)
    else:
        t = 0
    pk_base = pk_ptr + t * s_pkt + kvh * s_pkh
    pv_base = pv_ptr + t * s_pvt + kvh * s_pvh
    for n0 in range(0, P, BLOCK_N):
        n = n0 + offs_n
        kT = tl.trans(_load_tile(pk_base, n, offs_d, s_pkn, s_pkd, P, D, DOT))
        v = _load_tile(pv_base, n, offs_d, s_pvn, s_pvd, P, D, DOT)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kT, v, (n < P)[None, :], qk_scale)

    # 2. the sequence's own keys, up to the last one a query of this block can see
    if HAS_KVLEN:
        kvlen = tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), Lk)
    else:
        kvlen = tl.cast(Lk, tl.int32)
    n_end = kvlen
    diag = Lk - Lq  # query i sees sequence key j iff j <= i + diag (when causal)
    if CAUSAL:
        n_end = tl.minimum(n_end, diag + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq))
    k_base = k_ptr + b * s_kb + kvh * s_kh
    v_base = v_ptr + b * s_vb + kvh * s_vh
    for n0 in range(0, n_end, BLOCK_N):
        n = n0 + offs_n
        key_ok = _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM)
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= m[:, None] + diag)
        # K rows past kv_lengths are not loaded; a padded key's K may be garbage, but its score is replaced by
        # -inf (a select), so only V needs the per-key mask: masking K too spilled 132 B at d = 128 on sm_80
        kT = tl.trans(_load_tile(k_base, n, offs_d, s_kn, s_kd, kvlen, D, DOT))
        if HAS_KPM:
            v = _load_keys(v_base, n, offs_d, s_vn, s_vd, key_ok, D, DOT)
        else:
            v = _load_tile(v_base, n, offs_d, s_vn, s_vd, kvlen, D, DOT)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kT, v, valid, qk_scale)

    _store_out(o_ptr, lse_ptr, bh * Lq + m, m < Lq, acc, m_i, l_i, offs_d, D)


@triton.jit
def _pa_prefix_state_kernel(
    st_m_ptr, st_l_ptr, st_acc_ptr, q_ptr, pk_ptr, pv_ptr, order_ptr, off_ptr,
    Hq, Hkv, G, Lq, P, D, R, SP, chunk, n_mblocks, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Decode stage 1: the prefix attention of every query that reads prefix (task, kv head) as one tiled GEMM,
    split over the prefix keys. Grid (T * Hkv * SP * n_mblocks,): program id ((task * Hkv + kv head) * SP + sp)
    * n_mblocks + M block, so the M blocks that share a prefix chunk run side by side (L2 serves the re-reads).

    The M dimension packs (batch row of the task, head of the GQA group, query) so a block of BLOCK_M queries
    from many rows shares each prefix tile. sp owns prefix keys [sp * chunk, (sp + 1) * chunk) (chunk a multiple
    of BLOCK_N: no key block straddles two chunks), so each prefix key is read once per M block in total, split
    or not: cdiv(rows * G * Lq, BLOCK_M) times per task and kv head instead of once per (row, head). Writes the
    unnormalised online-softmax state (m in log2 units, l, acc) of each query over its chunk at rows
    sp * R + (b * Hq + h) * Lq + i of the (SP, R) / (SP, R, D) float32 state buffers (R = B * Hq * Lq); pass 2
    merges the SP states in chunk order and continues over the own keys."""
    prog = tl.program_id(0).to(tl.int64)
    pid = (prog % n_mblocks).to(tl.int32)
    rest = prog // n_mblocks
    sp = rest % SP
    th = rest // SP
    t = th // Hkv
    kvh = th % Hkv
    r0 = tl.load(off_ptr + t)
    r1 = tl.load(off_ptr + t + 1)
    GL = G * Lq
    nq = (r1 - r0) * GL
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < nq
    row = r // GL
    rem = r % GL
    g = rem // Lq
    i = rem % Lq
    b = tl.load(order_ptr + r0 + row, mask=rmask, other=0).to(tl.int64)
    h = kvh * G + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    q = tl.load(q_ptr + (b * s_qb + h * s_qh + i * s_qm)[:, None] + offs_d[None, :] * s_qd,
                mask=rmask[:, None] & dmask, other=0.0).to(DOT)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    n_lo = (sp * chunk).to(tl.int32)
    # this program's chunk; programs past this task's queries do nothing
    n_hi = tl.where(pid * BLOCK_M < nq, tl.minimum(P, n_lo + chunk), n_lo)
    pk_base = pk_ptr + t * s_pkt + kvh * s_pkh
    pv_base = pv_ptr + t * s_pvt + kvh * s_pvh
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + offs_n
        kT = tl.trans(_load_tile(pk_base, n, offs_d, s_pkn, s_pkd, n_hi, D, DOT))
        v = _load_tile(pv_base, n, offs_d, s_pvn, s_pvd, n_hi, D, DOT)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kT, v, (n < n_hi)[None, :], qk_scale)
    srow = sp * R + (b * Hq + h) * Lq + i
    tl.store(st_m_ptr + srow, m_i, mask=rmask)
    tl.store(st_l_ptr + srow, l_i, mask=rmask)
    tl.store(st_acc_ptr + srow[:, None] * D + offs_d[None, :], acc, mask=rmask[:, None] & dmask)


@triton.jit
def _pa_decode_seq_kernel(
    o_ptr, lse_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, st_m_ptr, st_l_ptr, st_acc_ptr,
    q_ptr, k_ptr, v_ptr, kpm_ptr, kvlen_ptr,
    Hq, Hkv, G, Lq, Lk, D, R, SP, chunk, n_split, n_mblocks, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Decode pass 2: the own keys of one (batch row, kv head), continuing the prefix state of stage 1.

    The M tile packs (head of the GQA group, query) -- G * Lq rows -- so every own key/value tile is loaded once
    per (row, kv head, M block) and serves all G heads, instead of once per q head. Grid
    (B * Hkv * n_split * n_mblocks,): program id (b * Hkv + kv head) * n_split * n_mblocks + split * n_mblocks +
    M block. Split s covers own keys [s * chunk, (s + 1) * chunk) (chunk a multiple of BLOCK_N, so no key block
    straddles two splits); split 0 starts from the prefix state (the SP partial states of stage 1 merged in
    chunk order), the others from the empty state (m = -inf, l = 0, acc = 0).
    SPLIT=False (one split, chunk >= Lk): normalise and store O and the LSE here. SPLIT=True: store the
    unnormalised partial (m, l, acc) at rows split * R + row of the float32 part buffers; the reduce kernel
    combines them. R = B * Hq * Lq."""
    prog = tl.program_id(0).to(tl.int64)
    per_row = n_split * n_mblocks
    bkv = prog // per_row
    pid = (prog % per_row).to(tl.int32)
    split = pid // n_mblocks
    mb = pid % n_mblocks
    b = bkv // Hkv
    kvh = bkv % Hkv
    r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < G * Lq
    g = r // Lq
    i = r % Lq
    h = kvh * G + g
    # (b * Hq + h) * Lq + i == (b * Hq + kvh * G) * Lq + r: the group's rows are contiguous in (B, Hq, Lq)
    row = (b * Hq + kvh * G) * Lq + r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    q = tl.load(q_ptr + (b * s_qb + h.to(tl.int64) * s_qh + i * s_qm)[:, None] + offs_d[None, :] * s_qd,
                mask=rmask[:, None] & dmask, other=0.0).to(DOT)

    # initial state: the prefix's (m, l, acc) for split 0, masked to the empty state for the other splits
    # (branch-free: a load whose mask is all false reads nothing). Written as one vector comparison: under the
    # interpreter `rmask & (split == 0)` (vector & scalar) gives a mask tl.load rejects. Stage 1 left SP partial
    # prefix states (one per prefix chunk, rows sp * R + row): chunk 0's is loaded as is, chunks 1 .. SP - 1 are
    # merged into it in chunk order (fixed: deterministic; SP = 1 is exactly the unsplit state).
    first = r < tl.where(split == 0, G * Lq, 0)
    m_i = tl.load(st_m_ptr + row, mask=first, other=float("-inf"))
    l_i = tl.load(st_l_ptr + row, mask=first, other=0.0)
    acc = tl.load(st_acc_ptr + row[:, None] * D + offs_d[None, :], mask=first[:, None] & dmask, other=0.0)
    for sp in range(1, SP):
        srow = tl.cast(sp, tl.int64) * R + row
        m_s = tl.load(st_m_ptr + srow, mask=first, other=float("-inf"))
        l_s = tl.load(st_l_ptr + srow, mask=first, other=0.0)
        acc_s = tl.load(st_acc_ptr + srow[:, None] * D + offs_d[None, :], mask=first[:, None] & dmask, other=0.0)
        acc, m_i, l_i = _merge_state(m_i, l_i, acc, m_s, l_s, acc_s)

    kvlen = tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), Lk)
    n_lo = split * chunk
    # No causal cut of the loop: the tile holds query Lq - 1 of some head whenever it holds a whole head, and
    # that query sees every key below Lk; causality is applied per (row, key) below.
    n_hi = tl.minimum(kvlen, n_lo + chunk)
    diag = Lk - Lq  # query i sees own key j iff j <= i + diag (when causal)
    k_base = k_ptr + b * s_kb + kvh * s_kh
    v_base = v_ptr + b * s_vb + kvh * s_vh
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + offs_n
        key_ok = _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM) & (n < n_hi)
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= i[:, None] + diag)
        # loads stop at n_hi (not at Lk): keys past kv_lengths[b] or in the next split are never fetched; with a
        # padding mask V is also masked per key (K's garbage only reaches scores, which the select replaces)
        kT = tl.trans(_load_tile(k_base, n, offs_d, s_kn, s_kd, n_hi, D, DOT))
        if HAS_KPM:
            v = _load_keys(v_base, n, offs_d, s_vn, s_vd, key_ok, D, DOT)
        else:
            v = _load_tile(v_base, n, offs_d, s_vn, s_vd, n_hi, D, DOT)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kT, v, valid, qk_scale)

    if SPLIT:
        prow = split.to(tl.int64) * R + row
        tl.store(part_m_ptr + prow, m_i, mask=rmask)
        tl.store(part_l_ptr + prow, l_i, mask=rmask)
        tl.store(part_acc_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=rmask[:, None] & dmask)
    else:
        _store_out(o_ptr, lse_ptr, row, rmask, acc, m_i, l_i, offs_d, D)


@triton.jit
def _pa_decode_reduce_kernel(
    o_ptr, lse_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, R, D, S,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Decode split-K reduce, grid (cdiv(R, BLOCK_R),): combines the S partial states of each of the R query rows
    in split order 0, 1, ..., S - 1 (a fixed order: deterministic), then normalises and stores O and the LSE.
    Every partial was written by its split (an empty chunk writes its initial state), so nothing is skipped."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < R
    offs_d = tl.arange(0, BLOCK_D)
    amask = rmask[:, None] & (offs_d < D)[None, :]
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for s in range(0, S):
        prow = tl.cast(s, tl.int64) * R + row
        m_s = tl.load(part_m_ptr + prow, mask=rmask, other=float("-inf"))
        l_s = tl.load(part_l_ptr + prow, mask=rmask, other=0.0)
        acc_s = tl.load(part_acc_ptr + prow[:, None] * D + offs_d[None, :], mask=amask, other=0.0)
        acc, m_i, l_i = _merge_state(m_i, l_i, acc, m_s, l_s, acc_s)
    _store_out(o_ptr, lse_ptr, row, rmask, acc, m_i, l_i, offs_d, D)


# ------------------------------------------------------------------------------------------------ backward


@triton.jit
def _pa_bwd_pre_kernel(
    delta_ptr, o_ptr, do_ptr, Hq, Lq, D,
    s_ob, s_oh, s_om, s_od, s_gb, s_gh, s_gm, s_gd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_mb = tl.cdiv(Lq, BLOCK_M)
    bh = pid // n_mb
    b = bh // Hq
    h = bh % Hq
    m = (pid % n_mb).to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(o_ptr + b * s_ob + h * s_oh, m, offs_d, s_om, s_od, Lq, D, tl.float32)
    do = _load_tile(do_ptr + b * s_gb + h * s_gh, m, offs_d, s_gm, s_gd, Lq, D, tl.float32)
    tl.store(delta_ptr + bh * Lq + m, tl.sum(o * do, 1), mask=m < Lq)


@triton.jit
def _bwd_kv_step(
    dk, dv, k, v, key_ok, n, m, q_base, do_base, row0, Lq, D, diag, qk_scale,
    s_qm, s_qd, s_gm, s_gd, lse_ptr, delta_ptr,
    CAUSAL: tl.constexpr, DOT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Accumulate into (dk, dv) of one key block (k, v: (BLOCK_N, BLOCK_D) in DOT) the contribution of the query
    block m of one (batch row, q head), whose LSE/delta rows start at row0. Works transposed (keys as rows) so no
    tile is transposed in the loop."""
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base, m, offs_d, s_qm, s_qd, Lq, D, DOT)
    do = _load_tile(do_base, m, offs_d, s_gm, s_gd, Lq, D, DOT)
    lse = tl.load(lse_ptr + row0 + m, mask=m < Lq, other=0.0)
    # a query that saw nothing (LSE -inf) sees none of these keys either: push its probabilities to 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + row0 + m, mask=m < Lq, other=0.0)
    valid = key_ok[:, None] & (m < Lq)[None, :]
    if CAUSAL:
        valid = valid & (n[:, None] <= m[None, :] + diag)
    sT = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
    pT = tl.where(valid, tl.exp2(sT - lse2[None, :]), 0.0)
    dv += tl.dot(pT.to(DOT), do, input_precision="ieee")
    dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(DOT), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _pa_bwd_dkdv_kernel(
    dk_ptr, dv_ptr, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, kpm_ptr, kvlen_ptr,
    Hq, Hkv, G, Lq, Lk, D, scale, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gm, s_gd,
    s_mb, s_mn,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv of the sequence's own keys: program (b * Hkv + kv head) * cdiv(Lk, BLOCK_N) + key block owns one
    key block, loops over the Hq // Hkv query heads of its group (the GQA sum happens in registers) and the query
    blocks that can see its keys, writes dk, dv once."""
    pid = tl.program_id(0).to(tl.int64)
    n_nb = tl.cdiv(Lk, BLOCK_N)
    bkv = pid // n_nb
    pid_n = (pid % n_nb).to(tl.int32)
    b = bkv // Hkv
    kvh = bkv % Hkv
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if HAS_KVLEN:
        kvlen = tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), Lk)
    else:
        kvlen = tl.cast(Lk, tl.int32)
    key_ok = _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM)
    # unseen keys load as 0: their scores, dP and so dS are then finite and 0, and their dk, dv exactly 0
    k = _load_keys(k_ptr + b * s_kb + kvh * s_kh, n, offs_d, s_kn, s_kd, key_ok, D, DOT)
    v = _load_keys(v_ptr + b * s_vb + kvh * s_vh, n, offs_d, s_vn, s_vd, key_ok, D, DOT)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    diag = Lk - Lq
    if CAUSAL:  # the first query that sees key n0 is n0 - diag
        m_start = (tl.maximum(pid_n * BLOCK_N - diag, 0) // BLOCK_M) * BLOCK_M
    else:
        m_start = tl.cast(0, tl.int32)
    # a block wholly past kv_lengths[b] skips the loop: its gradient is 0
    m_start = tl.where(pid_n * BLOCK_N >= kvlen, Lq, m_start)
    for g in range(0, G):
        h = kvh * G + g
        q_base = q_ptr + b * s_qb + h * s_qh
        do_base = do_ptr + b * s_gb + h * s_gh
        row0 = (b * Hq + h) * Lq
        for m0 in range(m_start, Lq, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            dk, dv = _bwd_kv_step(dk, dv, k, v, key_ok, n, m, q_base, do_base, row0, Lq, D, diag, qk_scale,
                                  s_qm, s_qd, s_gm, s_gd, lse_ptr, delta_ptr, CAUSAL, DOT, BLOCK_D)
    out_rows = bkv * Lk + n
    omask = (n < Lk)[:, None] & (offs_d < D)[None, :]
    tl.store(dk_ptr + out_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=omask)
    tl.store(dv_ptr + out_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _pa_bwd_dprefix_kernel(
    dk_ptr, dv_ptr, q_ptr, pk_ptr, pv_ptr, do_ptr, lse_ptr, delta_ptr, order_ptr, off_ptr,
    Hq, Hkv, G, Lq, P, D, TH, n_split, scale, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    s_gb, s_gh, s_gm, s_gd,
    SPLIT: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dk, dv of the prefix keys, summed over the batch rows of each task and the GQA group.

    Program ((task * Hkv + kv head) * n_split + split) * cdiv(P, BLOCK_N) + key block owns one block of prefix
    keys of one (task, kv head) and a contiguous share of that task's work items: the (row, q head of the group,
    query block) triples in increasing row order (rows from order[off[t]:off[t + 1]], a stable sort of
    task_ids), cut into n_split shares of cdiv(items, n_split). Its key blocks are neighbours so they share the
    q / dO tiles in L2. The sum within a share is a fixed-order float32 sum in registers; SPLIT=False (one
    share) stores dk * scale, dv in the prefix dtype, SPLIT=True stores the float32 share at rows
    (split * TH + task * Hkv + kv head) * P + key of (n_split, TH * P, D) partial buffers (TH = T * Hkv), which
    ``_pa_sum_splits_kernel`` adds up in split order: deterministic, no atomics."""
    pid = tl.program_id(0).to(tl.int64)
    n_nb = tl.cdiv(P, BLOCK_N)
    pid_n = (pid % n_nb).to(tl.int32)
    rest = pid // n_nb
    split = rest % n_split
    th = rest // n_split
    t = th // Hkv
    kvh = th % Hkv
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(pk_ptr + t * s_pkt + kvh * s_pkh, n, offs_d, s_pkn, s_pkd, P, D, DOT)
    v = _load_tile(pv_ptr + t * s_pvt + kvh * s_pvh, n, offs_d, s_pvn, s_pvd, P, D, DOT)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    key_ok = n < P
    r0 = tl.load(off_ptr + t)
    r1 = tl.load(off_ptr + t + 1)
    n_mb = tl.cdiv(Lq, BLOCK_M)
    per_row = G * n_mb
    share = tl.cdiv((r1 - r0) * per_row, n_split)
    j0 = split * share
    j1 = tl.minimum((r1 - r0) * per_row, j0 + share)
    for j in range(j0, j1):
        rr = j // per_row
        rem = j % per_row
        b = tl.load(order_ptr + r0 + rr).to(tl.int64)
        h = kvh * G + rem // n_mb
        m = (rem % n_mb).to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)
        dk, dv = _bwd_kv_step(dk, dv, k, v, key_ok, n, m, q_ptr + b * s_qb + h * s_qh,
                              do_ptr + b * s_gb + h * s_gh, (b * Hq + h) * Lq, Lq, D, 0, qk_scale,
                              s_qm, s_qd, s_gm, s_gd, lse_ptr, delta_ptr, False, DOT, BLOCK_D)
    omask = key_ok[:, None] & (offs_d < D)[None, :]
    if SPLIT:
        rows = (split * TH + th) * P + n
        tl.store(dk_ptr + rows[:, None] * D + offs_d[None, :], dk, mask=omask)
        tl.store(dv_ptr + rows[:, None] * D + offs_d[None, :], dv, mask=omask)
    else:
        rows = th * P + n
        tl.store(dk_ptr + rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
                 mask=omask)
        tl.store(dv_ptr + rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _pa_sum_splits_kernel(
    dk_ptr, dv_ptr, part_k_ptr, part_v_ptr, N, S, scale,
    BLOCK: tl.constexpr,
):
    """Second pass of the split prefix gradient, grid (cdiv(N, BLOCK),) over the N = T * Hkv * P * d elements:
    dk = scale * sum_s part_k[s], dv = sum_s part_v[s], added in split order 0 .. S - 1 (fixed: deterministic),
    float32, cast once at the store."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc_k = tl.zeros((BLOCK,), tl.float32)
    acc_v = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, S):
        acc_k += tl.load(part_k_ptr + tl.cast(s, tl.int64) * N + offs, mask=mask, other=0.0)
        acc_v += tl.load(part_v_ptr + tl.cast(s, tl.int64) * N + offs, mask=mask, other=0.0)
    tl.store(dk_ptr + offs, (acc_k * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offs, acc_v.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, valid, qk_scale):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision="ieee")


@triton.jit
def _pa_bwd_dq_kernel(
    dq_ptr, q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, do_ptr, lse_ptr, delta_ptr, task_ptr, kpm_ptr, kvlen_ptr,
    Hq, G, Lq, Lk, P, D, scale, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    s_gb, s_gh, s_gm, s_gd,
    s_mb, s_mn,
    CAUSAL: tl.constexpr, HAS_TASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_mb = tl.cdiv(Lq, BLOCK_M)
    bh = pid // n_mb
    pid_m = (pid % n_mb).to(tl.int32)
    b = bh // Hq
    h = bh % Hq
    kvh = h // G
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * s_qb + h * s_qh, m, offs_d, s_qm, s_qd, Lq, D, DOT)
    do = _load_tile(do_ptr + b * s_gb + h * s_gh, m, offs_d, s_gm, s_gd, Lq, D, DOT)
    lse = tl.load(lse_ptr + bh * Lq + m, mask=m < Lq, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + bh * Lq + m, mask=m < Lq, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    if HAS_TASK:
        t = tl.load(task_ptr + b).to(tl.int64)
    else:
        t = 0
    pk_base = pk_ptr + t * s_pkt + kvh * s_pkh
    pv_base = pv_ptr + t * s_pvt + kvh * s_pvh
    for n0 in range(0, P, BLOCK_N):
        n = n0 + offs_n
        k = _load_tile(pk_base, n, offs_d, s_pkn, s_pkd, P, D, DOT)
        v = _load_tile(pv_base, n, offs_d, s_pvn, s_pvd, P, D, DOT)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, (n < P)[None, :], qk_scale)

    if HAS_KVLEN:
        kvlen = tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), Lk)
    else:
        kvlen = tl.cast(Lk, tl.int32)
    n_end = kvlen
    diag = Lk - Lq
    if CAUSAL:
        n_end = tl.minimum(n_end, diag + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq))
    k_base = k_ptr + b * s_kb + kvh * s_kh
    v_base = v_ptr + b * s_vb + kvh * s_vh
    for n0 in range(0, n_end, BLOCK_N):
        n = n0 + offs_n
        key_ok = _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM)
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= m[:, None] + diag)
        k = _load_keys(k_base, n, offs_d, s_kn, s_kd, key_ok, D, DOT)
        v = _load_keys(v_base, n, offs_d, s_vn, s_vd, key_ok, D, DOT)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, valid, qk_scale)

    row = bh * Lq + m
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=(m < Lq)[:, None] & (offs_d < D)[None, :])


# ------------------------------------------------------------------------------------------------ launchers


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_head_dim(d: int) -> int:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"prefix_attention (triton backend): head dim d={d} is not supported; "
                         f"supported head dims are {SUPPORTED_HEAD_DIMS}")
    return triton.next_power_of_2(d)


# CUDA caps grid axis 0 at 2**31 - 1 programs and axes 1 and 2 at 65,535: every launch here uses axis 0 alone
# (the kernels unflatten their program id), so B * Hq and the like never meet the small caps.
MAX_GRID_X = 2**31 - 1


def launch_grid(*factors: int) -> tuple[int]:
    """The one-axis grid of prod(factors) programs. Raises on more than MAX_GRID_X programs -- unreachable from
    tensors that fit a GPU (B * Hq * Lq / 16 programs at the least), but a clear error beats a launch failure."""
    n = 1
    for f in factors:
        n *= int(f)
    if n > MAX_GRID_X:
        raise ValueError(f"prefix_attention (triton backend): {n} programs exceed the CUDA grid limit {MAX_GRID_X}")
    return (n,)


DECODE_MAX_LQ = 16
# Split-K of the decode pass over the own keys. Pass 2 runs B * Hkv * (M blocks) programs; below about two
# programs per SM (2 x 132 SMs on an H200) part of the GPU idles while each program streams its row's whole
# cache, so the own keys are cut into chunks run by separate programs and a small reduce kernel combines the
# partial states. A chunk is never shorter than DECODE_SPLIT_MIN_KEYS keys: shorter chunks would cost more in
# partial-state traffic and the extra launch than they win in parallelism. Module-level so tests can force a
# split under the interpreter (monkeypatch both; they are read at call time).
DECODE_SPLIT_MIN_PROGRAMS = 264
DECODE_SPLIT_MIN_KEYS = 256
# Split-K of decode stage 1 over the prefix keys. Stage 1 runs about Hkv * cdiv(B * G * Lq, BLOCK_M) programs
# (32 at B = 64, Hq = 32, Hkv = 8, Lq = 1 with BLOCK_M = 64), each streaming all P prefix keys, so the prefix
# is cut into SP chunks run by separate programs until there are about two programs per SM of an H200. A
# chunk is never shorter than DECODE_PREFIX_SPLIT_MIN_KEYS keys: every chunk costs a float32 partial state per
# query (BLOCK_M * (d + 2) * 4 bytes per program, 33 KB at d = 128, written by stage 1 and read by pass 2)
# against the chunk's BLOCK_M * chunk * d GEMM work. Module-level, read at call time.
DECODE_PREFIX_SPLIT_MIN_PROGRAMS = 264
DECODE_PREFIX_SPLIT_MIN_KEYS = 256
# Split of the prefix dK/dV reduction over its work items (batch row, q head of the group, query block). The
# unsplit pass runs cdiv(P, BLOCK_N) * T * Hkv programs (32 at the training shapes: P = 64, Hkv = 32), each
# walking the whole batch; split, each program takes a contiguous share of the items and stores a float32
# partial (BLOCK_N * d * 8 bytes: 64 KB at d = 128), which a second pass adds up in split order. Shares are cut
# until about two programs per SM, but never below PREFIX_GRAD_SPLIT_MIN_ITEMS query blocks: a share's partial
# costs about as much traffic as 4 of its q / dO blocks. Module-level, read at call time.
PREFIX_GRAD_SPLIT_MIN_PROGRAMS = 264
PREFIX_GRAD_SPLIT_MIN_ITEMS = 2


def use_decode_path(Lq: int, P: int, kv_lengths: torch.Tensor | None) -> bool:
    """The decode-specialised forward (shared-prefix GEMM stage, then the sequence pass from its state): a KV-cache
    call (kv_lengths given) with few queries per row and a prefix to share."""
    return kv_lengths is not None and Lq <= DECODE_MAX_LQ and P > 0


def _key_splits(n_programs: int, n_keys: int, block_n: int, min_programs: int, min_keys: int) -> tuple[int, int]:
    """(number of chunks, keys per chunk) that cut n_keys keys so that n_programs programs per chunk get close to
    min_programs in total, with chunks of >= min_keys keys rounded up to a multiple of block_n (the last chunk
    may be shorter). (1, n_keys) when there are enough programs already or fewer than 2 * min_keys keys."""
    if n_programs >= min_programs or n_keys < 2 * min_keys:
        return 1, n_keys
    n = min(triton.cdiv(n_keys, min_keys), triton.cdiv(min_programs, n_programs))
    chunk = triton.cdiv(triton.cdiv(n_keys, n), block_n) * block_n
    n = triton.cdiv(n_keys, chunk)
    return (n, chunk) if n > 1 else (1, n_keys)


def decode_splits(n_programs: int, Lk: int, block_n: int) -> tuple[int, int]:
    """(number of splits S, own keys per split) of decode pass 2 with ``n_programs`` programs per split and an own
    cache of Lk keys. Decided from the cache capacity Lk, not from kv_lengths (no device sync): splits past a
    row's kv_lengths exit at once. The chunk is a multiple of block_n so no key block straddles two splits."""
    return _key_splits(n_programs, Lk, block_n, DECODE_SPLIT_MIN_PROGRAMS, DECODE_SPLIT_MIN_KEYS)


def decode_prefix_splits(n_programs: int, P: int, block_n: int) -> tuple[int, int]:
    """(number of prefix chunks SP, prefix keys per chunk) of decode stage 1 with ``n_programs`` programs per chunk
    (see ``decode_stage1_programs``) and P prefix keys. Host-side sizes only (no device sync); the chunk is a
    multiple of block_n, every chunk holds at least one key."""
    return _key_splits(n_programs, P, block_n, DECODE_PREFIX_SPLIT_MIN_PROGRAMS, DECODE_PREFIX_SPLIT_MIN_KEYS)


def decode_stage1_programs(B: int, G: int, Lq: int, Hkv: int, T: int, block_m: int) -> int:
    """Programs of decode stage 1 that have queries, per prefix chunk: Hkv * sum over tasks of
    cdiv(rows of the task * G * Lq, block_m). The rows per task live on the device, so this is the bound
    Hkv * (cdiv(B * G * Lq, block_m) + min(T, B) - 1) (exact for one task); the rest of the T * Hkv * cdiv(B * G *
    Lq, block_m) launched programs exit at once."""
    return Hkv * (triton.cdiv(B * G * Lq, block_m) + min(T, B) - 1)


def prefix_grad_splits(n_programs: int, B: int, T: int, G: int, n_qblocks: int) -> int:
    """Number of shares the prefix dK/dV work of each (task, kv head, key block) is cut into, for ``n_programs``
    unsplit programs and B rows over T tasks with G q heads per kv head and n_qblocks query blocks per head.
    Host sizes only (the rows per task live on the device): a task's work is taken as cdiv(B, min(T, B)) rows.
    1 (no partials, no second pass) when there are enough programs already or too little work to share."""
    if n_programs >= PREFIX_GRAD_SPLIT_MIN_PROGRAMS or B == 0:
        return 1
    items = triton.cdiv(B, min(T, B)) * G * n_qblocks
    return max(1, min(triton.cdiv(PREFIX_GRAD_SPLIT_MIN_PROGRAMS, n_programs),
                      items // PREFIX_GRAD_SPLIT_MIN_ITEMS))


def _gpu_config(kind: str, block_d: int, fp32: bool) -> dict:
    return dict(_GPU_CONFIGS[(kind, 32 if fp32 else 16, block_d)])


def _fwd_config(block_d: int, fp32: bool) -> dict:
    if _interpret():  # small tiles: cheap in the interpreter, and the tests cross several blocks
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
    return _gpu_config("fwd", block_d, fp32)


def _stage1_config(block_d: int, fp32: bool) -> dict:
    if _interpret():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
    return _gpu_config("stage1", block_d, fp32)


def _decode_config(block_d: int, group_rows: int, fp32: bool) -> dict:
    """Decode pass 2: the M tile holds the G * Lq rows of a (batch row, kv head) -- at least 16 (the smallest
    tl.dot tile), at most the table's BLOCK_M -- with long key blocks. Not timed on a GPU yet."""
    if _interpret():  # 16 x 16: tests with G * Lq > 16 cross M blocks, and their caches cross key blocks
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
    rows = max(16, triton.next_power_of_2(group_rows))
    cfg = _gpu_config("decode" if rows <= 32 else "decode_wide", block_d, fp32)
    cfg["BLOCK_M"] = min(rows, cfg["BLOCK_M"])
    return cfg


def _bwd_config(block_d: int, fp32: bool) -> tuple[dict, dict, dict]:
    """(sequence dk/dv kernel config, dq kernel config, prefix dk/dv kernel config)."""
    if _interpret():
        c = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
        return c, c, c
    return tuple(_gpu_config(kind, block_d, fp32) for kind in ("dkdv", "dq", "dprefix"))


def _cfg(m: int, n: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


# GPU tile configs, (kernel, 16 = float16/bfloat16 dots on tensor cores | 32 = exact float32 FMA dots, BLOCK_D)
# -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Checked ahead of time for sm_80 and sm_90
# (tools/aot_audit.py) with every flag variant (causal or not, padding mask, kv_lengths, tasks, GQA) and a
# float32 prefix beside 16-bit activations: no register spill, shared memory within both archs' per-block
# limits. Not timed on a GPU yet. The dk/dv and dq kernels use 8 warps at d = 128 where 4 spilled on sm_80 (the
# accumulators of 4 warps took all 255 registers). Decode stage 1 uses BLOCK_M = 64 (32 at d = 256): at the
# decode shapes (B * G * Lq = 256 queries per kv head) that doubles the M blocks of 128 -- more programs before the
# prefix must be split, and the extra prefix reads are concurrent, so L2 serves them. Decode pass 2 packs up to 32
# G * Lq rows ("decode", BLOCK_M is a cap) with long key blocks, or more ("decode_wide"); it is memory-bound, so
# at d = 128 two stages (72 KB of shared memory: 2 CTAs per SM on sm_80, 3 on sm_90) rather than three (136 KB: 1).
_KINDS = ("fwd", "stage1", "decode", "decode_wide", "dkdv", "dq", "dprefix")
_TILES_16 = {
    32: ((128, 64, 4, 3), (64, 64, 8, 3), (32, 128, 4, 3), (128, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2),
         (32, 64, 8, 2)),
    64: ((128, 64, 8, 2), (64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2),
         (32, 64, 8, 2)),
    128: ((128, 32, 8, 2), (64, 64, 8, 3), (32, 128, 4, 2), (128, 64, 8, 3), (32, 64, 8, 2), (32, 64, 8, 2),
          (32, 64, 8, 2)),
    256: ((64, 32, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (64, 32, 8, 2), (16, 32, 8, 1), (32, 32, 8, 2),
          (16, 32, 8, 1)),
}

# float32: exact FMA dots. Triton's FMA dot keeps a thread's whole operand rows (all d of them for Q K^T) in
# registers, so the tiles are small and ptxas's register allocation swings widely between neighbouring tiles and
# the two archs: each entry is the first tile of a sweep (larger tiles first) that compiles with no spill on
# sm_80 and sm_90 and shared memory within sm_80's 163 KB (dq at d = 256 with 64 x 16 tiles needs 164 KB).
# The sweep was repeated with Triton 3.6 (the lent GPUs' version), whose ptxas input differs; no tile is clean
# for every kernel, arch and version, so a few float32 kernels keep a small spill (bytes of spill stores + loads,
# worst arch and version) rather than a tile that would multiply their memory traffic, e.g. decode stage 1 at
# BLOCK_M = 16 reads the prefix four times as often as at 64: dq at d = 128 (32 x 16) 16 B on sm_90 (3.9);
# stage 1 at d = 128 (64 x 16) 32 B on sm_80 (3.6) and at d = 256 56 B; dprefix at d = 256 (16 x 16) 40 B on
# sm_80 (3.9); decode pass 2 at d = 64 16 B on sm_90 (3.6). tools/aot_rules.py budgets exactly these
# (FP32_SPILL_BUDGET), so any growth fails CI.
# 16-bit tiles at d = 128 / 256 were re-swept the same way: fwd 128 x 32 (128 x 64 spilled 160 B on sm_80 with a
# padding mask and an fp32 prefix), dq 32 x 64 and 32 x 32 with 8 warps: 0 spills everywhere.
_FP32_TILES = {  # BLOCK_D: (BLOCK_M, BLOCK_N) per kernel of _KINDS; 8 warps (4 for "decode"), 2 stages
    32: ((64, 16), (64, 32), (32, 64), (64, 32), (32, 32), (64, 32), (32, 32)),
    64: ((64, 16), (64, 32), (32, 64), (64, 32), (32, 32), (64, 32), (32, 32)),
    128: ((32, 16), (64, 16), (32, 16), (32, 16), (32, 16), (32, 16), (16, 16)),
    256: ((64, 16), (32, 16), (32, 16), (32, 16), (32, 16), (32, 16), (16, 16)),
}
_GPU_CONFIGS: dict[tuple[str, int, int], dict] = {}
for _d in (32, 64, 128, 256):
    for _kind, _t16, (_m, _n) in zip(_KINDS, _TILES_16[_d], _FP32_TILES[_d], strict=True):
        _GPU_CONFIGS[(_kind, 16, _d)] = _cfg(*_t16)
        _GPU_CONFIGS[(_kind, 32, _d)] = _cfg(_m, _n, 4 if _kind == "decode" else 8, 2)
del _d, _kind, _t16, _m, _n

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(q: torch.Tensor) -> tl.dtype:
    """The dtype every tile is cast to before a tl.dot: the activations' (q, k, v) dtype, so a float32 prefix
    beside 16-bit activations (float32 master weights in prefix tuning) still runs on tensor cores; its
    gradients accumulate and are stored in float32 all the same. float32 activations keep exact float32 dots
    (input_precision="ieee"). Under the interpreter bfloat16 dots are wrong, so there bfloat16 runs in float32."""
    if q.dtype == torch.bfloat16 and _interpret():
        return tl.float32
    return _TL_DTYPES[q.dtype]


def _prefix_args(prefix: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(tensor, (task, head, key, d) strides) of a (Hkv, P, d) / (T, Hkv, P, d) prefix; task stride 0 if shared."""
    if prefix is None:
        return dummy, (0, 0, 0, 0)
    if prefix.dim() == 3:
        return prefix, (0, *prefix.stride())
    return prefix, tuple(prefix.stride())


def _mask_args(key_padding_mask: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if key_padding_mask is None:
        return dummy, 0, 0
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return kpm, kpm.stride(0), kpm.stride(1)


def _dense_index(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read task_ids / kv_lengths at ``ptr + b``: a (B,) copy for any other stride (an expanded,
    stride-0 tensor would otherwise be read as if it were dense; B elements, no host sync)."""
    return None if t is None else t.contiguous()


def _num_prefix(prefix_k: torch.Tensor | None) -> int:
    return 0 if prefix_k is None else prefix_k.shape[-2]


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
                     prefix_v: torch.Tensor | None, task_ids: torch.Tensor | None,
                     key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor | None, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (B, Hq, Lq, d) contiguous in q's dtype, lse (B, Hq, Lq) float32, -inf where a query
    sees nothing). Inputs are validated by the op layer; here only the head dim is checked."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_d = _check_head_dim(D)
    P = _num_prefix(prefix_k)
    task_ids, kv_lengths = _dense_index(task_ids), _dense_index(kv_lengths)
    out = empty_output((B, Hq, Lq, D), q.dtype, q.device)
    lse = empty_output((B, Hq, Lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    qk_scale = float(scale) * _LOG2E
    dot = _dot_dtype(q)
    if use_decode_path(Lq, P, kv_lengths):
        _decode_forward(out, lse, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal,
                        qk_scale, dot, block_d)
        return out, lse
    pk, s_pk = _prefix_args(prefix_k, q)
    pv, s_pv = _prefix_args(prefix_v, q)
    kpm, s_mb, s_mn = _mask_args(key_padding_mask, q)
    G = Hq // Hkv
    cfg = _fwd_config(block_d, q.dtype == torch.float32)
    _pa_fwd_kernel[launch_grid(triton.cdiv(Lq, cfg["BLOCK_M"]), B * Hq)](
        out, lse, q, k, v, pk, pv,
        task_ids if task_ids is not None else q, kpm, kv_lengths if kv_lengths is not None else q,
        Hq, G, Lq, Lk, P, D, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *s_pk, *s_pv, s_mb, s_mn,
        CAUSAL=bool(causal), HAS_TASK=task_ids is not None, HAS_KPM=key_padding_mask is not None,
        HAS_KVLEN=kv_lengths is not None, DOT=dot, BLOCK_D=block_d, **cfg,
    )
    return out, lse


def _decode_forward(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    prefix_k: torch.Tensor, prefix_v: torch.Tensor, task_ids: torch.Tensor | None,
                    key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor, causal: bool, qk_scale: float,
                    dot: tl.dtype, block_d: int) -> None:
    """The decode path (see the module docstring): stage 1 (split over the prefix or not), pass 2 (split over the
    own keys or not), and the reduce if pass 2 is split.
    (The op never passes key_padding_mask with kv_lengths; the kernels honour both anyway.)"""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = prefix_k.shape[-2]
    dev = q.device
    fp32 = q.dtype == torch.float32
    pk, s_pk = _prefix_args(prefix_k, q)
    pv, s_pv = _prefix_args(prefix_v, q)
    kpm, s_mb, s_mn = _mask_args(key_padding_mask, q)
    # stage 1: the prefix part of every query of a (task, kv head) as one tiled GEMM
    T = prefix_k.shape[0] if prefix_k.dim() == 4 else 1
    order, offsets = _task_rows(task_ids, B, T, dev)
    R = B * Hq * Lq
    cfg1 = _stage1_config(block_d, fp32)
    n_mb1 = triton.cdiv(B * G * Lq, cfg1["BLOCK_M"])
    n_psplit, pchunk = decode_prefix_splits(decode_stage1_programs(B, G, Lq, Hkv, T, cfg1["BLOCK_M"]), P,
                                            cfg1["BLOCK_N"])
    # the partial prefix states, one per chunk: (SP, R, d + 2) float32 in all
    st_m = empty_output((n_psplit, R), torch.float32, dev)
    st_l = empty_output((n_psplit, R), torch.float32, dev)
    st_acc = empty_output((n_psplit, R, D), torch.float32, dev)
    _pa_prefix_state_kernel[launch_grid(n_mb1, T * Hkv, n_psplit)](
        st_m, st_l, st_acc, q, pk, pv, order, offsets, Hq, Hkv, G, Lq, P, D, R, n_psplit, pchunk, n_mb1, qk_scale,
        *q.stride(), *s_pk, *s_pv, DOT=dot, BLOCK_D=block_d, **cfg1,
    )
    # pass 2: own keys of each (batch row, kv head), the GQA group packed into the M tile; its split 0 merges the
    # SP prefix states first
    cfg = _decode_config(block_d, G * Lq, fp32)
    n_mblocks = triton.cdiv(G * Lq, cfg["BLOCK_M"])
    n_split, chunk = decode_splits(n_mblocks * B * Hkv, Lk, cfg["BLOCK_N"])
    if n_split > 1:
        part_m = empty_output((n_split, R), torch.float32, dev)
        part_l = empty_output((n_split, R), torch.float32, dev)
        part_acc = empty_output((n_split, R, D), torch.float32, dev)
    else:
        part_m = part_l = part_acc = st_m  # unused (SPLIT=False)
    _pa_decode_seq_kernel[launch_grid(n_split * n_mblocks, B * Hkv)](
        out, lse, part_m, part_l, part_acc, st_m, st_l, st_acc, q, k, v, kpm, kv_lengths,
        Hq, Hkv, G, Lq, Lk, D, R, n_psplit, chunk, n_split, n_mblocks, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), s_mb, s_mn,
        CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, SPLIT=n_split > 1, DOT=dot,
        BLOCK_D=block_d, **cfg,
    )
    if n_split > 1:
        block_r = 16 if _interpret() else 32
        _pa_decode_reduce_kernel[launch_grid(triton.cdiv(R, block_r))](
            out, lse, part_m, part_l, part_acc, R, D, n_split, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=1 if _interpret() else 4,
        )


def _task_rows(task_ids: torch.Tensor | None, B: int, T: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows grouped by task, stable within a task; (T + 1,) offsets into them), built on the device with no host
    sync (no torch.tensor of a Python list, no bincount -- whose CUDA kernel reads max(task_ids) on the host)."""
    if task_ids is None:
        return (torch.arange(B, dtype=torch.int64, device=device),
                torch.arange(2, dtype=torch.int64, device=device) * B)
    sorted_ids, order = torch.sort(task_ids.long(), stable=True)
    # offsets[t] = the first sorted position with a task >= t (task_ids are in [0, T): checked by the op layer)
    offsets = torch.searchsorted(sorted_ids, torch.arange(T + 1, dtype=torch.int64, device=device))
    return order, offsets


def prefix_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                              task_ids: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                              kv_lengths: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, causal: bool,
                              scale: float, need_q: bool, need_k: bool, need_v: bool, need_pk: bool,
                              need_pv: bool) -> tuple[torch.Tensor | None, ...]:
    """Fused backward: (dq, dk, dv, d prefix_k, d prefix_v) in their inputs' dtypes and shapes (contiguous),
    each None when not needed (the prefix grads also when there is no prefix). Prefix grads are summed over the
    batch rows of each task in a fixed order (deterministic)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_d = _check_head_dim(D)
    P = _num_prefix(prefix_k)
    task_ids, kv_lengths = _dense_index(task_ids), _dense_index(kv_lengths)
    dev = q.device
    need_pk = need_pk and prefix_k is not None
    need_pv = need_pv and prefix_v is not None
    dq = empty_output((B, Hq, Lq, D), q.dtype, dev) if need_q else None
    dk = empty_output((B, Hkv, Lk, D), k.dtype, dev) if need_k else None
    dv = empty_output((B, Hkv, Lk, D), v.dtype, dev) if need_v else None
    dpk = empty_output(tuple(prefix_k.shape), prefix_k.dtype, dev) if need_pk else None
    dpv = empty_output(tuple(prefix_v.shape), prefix_v.dtype, dev) if need_pv else None

    dot = _dot_dtype(q)
    kpm, s_mb, s_mn = _mask_args(key_padding_mask, q)
    kvl = kv_lengths if kv_lengths is not None else q
    qk_scale = float(scale) * _LOG2E
    cfg_kv, cfg_q, cfg_p = _bwd_config(block_d, q.dtype == torch.float32)

    delta = empty_output((B, Hq, Lq), torch.float32, dev)
    if delta.numel():
        bm = 16 if _interpret() else 64
        _pa_bwd_pre_kernel[launch_grid(triton.cdiv(Lq, bm), B * Hq)](
            delta, out, grad_out, Hq, Lq, D, *out.stride(), *grad_out.stride(), BLOCK_M=bm, BLOCK_D=block_d)

    if (need_k or need_v) and B * Hkv * Lk:
        # dk and dv come out of the same loop; an unneeded one goes to a scratch buffer
        dk_buf = dk if dk is not None else torch.empty((B, Hkv, Lk, D), dtype=k.dtype, device=dev)
        dv_buf = dv if dv is not None else torch.empty((B, Hkv, Lk, D), dtype=v.dtype, device=dev)
        _pa_bwd_dkdv_kernel[launch_grid(triton.cdiv(Lk, cfg_kv["BLOCK_N"]), B * Hkv)](
            dk_buf, dv_buf, q, k, v, grad_out, lse, delta, kpm, kvl,
            Hq, Hkv, G, Lq, Lk, D, float(scale), qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), s_mb, s_mn,
            CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, HAS_KVLEN=kv_lengths is not None,
            DOT=dot, BLOCK_D=block_d, **cfg_kv,
        )

    if need_q and dq.numel():
        pk, s_pk = _prefix_args(prefix_k, q)
        pv, s_pv = _prefix_args(prefix_v, q)
        _pa_bwd_dq_kernel[launch_grid(triton.cdiv(Lq, cfg_q["BLOCK_M"]), B * Hq)](
            dq, q, k, v, pk, pv, grad_out, lse, delta, task_ids if task_ids is not None else q, kpm, kvl,
            Hq, G, Lq, Lk, P, D, float(scale), qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *s_pk, *s_pv, *grad_out.stride(), s_mb, s_mn,
            CAUSAL=bool(causal), HAS_TASK=task_ids is not None, HAS_KPM=key_padding_mask is not None,
            HAS_KVLEN=kv_lengths is not None, DOT=dot, BLOCK_D=block_d, **cfg_q,
        )

    if (need_pk or need_pv) and Hkv * P:
        T = prefix_k.shape[0] if prefix_k.dim() == 4 else 1
        shape = tuple(prefix_k.shape)
        dpk_buf = dpk if dpk is not None else torch.empty(shape, dtype=prefix_k.dtype, device=dev)
        dpv_buf = dpv if dpv is not None else torch.empty(shape, dtype=prefix_v.dtype, device=dev)
        _prefix_grads(dpk_buf, dpv_buf, q, prefix_k, prefix_v, grad_out, lse, delta, task_ids, T, float(scale),
                      qk_scale, dot, block_d, cfg_p)
    return dq, dk, dv, dpk, dpv


def _prefix_grads(dpk: torch.Tensor, dpv: torch.Tensor, q: torch.Tensor, prefix_k: torch.Tensor,
                  prefix_v: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                  task_ids: torch.Tensor | None, T: int, scale: float, qk_scale: float, dot: tl.dtype, block_d: int,
                  cfg: dict) -> None:
    """d prefix_k, d prefix_v (contiguous, the prefix's dtype): the split prefix pass and, when split, the
    fixed-order sum of its float32 partials."""
    B, Hq, Lq, D = q.shape
    Hkv, P = prefix_k.shape[-3], prefix_k.shape[-2]
    G = Hq // Hkv
    dev = q.device
    order, offsets = _task_rows(task_ids, B, T, dev)
    _, s_pk = _prefix_args(prefix_k, q)
    _, s_pv = _prefix_args(prefix_v, q)
    n_nb = triton.cdiv(P, cfg["BLOCK_N"])
    n_split = prefix_grad_splits(n_nb * T * Hkv, B, T, G, triton.cdiv(Lq, cfg["BLOCK_M"]))
    if n_split > 1:
        part_k = empty_output((n_split, T * Hkv * P, D), torch.float32, dev)
        part_v = empty_output((n_split, T * Hkv * P, D), torch.float32, dev)
    else:
        part_k, part_v = dpk, dpv
    _pa_bwd_dprefix_kernel[launch_grid(n_nb, n_split, T * Hkv)](
        part_k, part_v, q, prefix_k, prefix_v, grad_out, lse, delta, order, offsets,
        Hq, Hkv, G, Lq, P, D, T * Hkv, n_split, scale, qk_scale,
        *q.stride(), *s_pk, *s_pv, *grad_out.stride(),
        SPLIT=n_split > 1, DOT=dot, BLOCK_D=block_d, **cfg,
    )
    if n_split > 1:
        n = T * Hkv * P * D
        block = 256 if _interpret() else 1024
        _pa_sum_splits_kernel[launch_grid(triton.cdiv(n, block))](
            dpk, dpv, part_k, part_v, n, n_split, scale, BLOCK=block, num_warps=1 if _interpret() else 4)

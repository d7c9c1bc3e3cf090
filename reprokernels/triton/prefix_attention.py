"""Triton kernels of ``prefix_attention``: attention over [prefix keys ; the sequence's own keys] without
ever materialising the concatenation or a batch-expanded prefix.

Semantics (DESIGN.md): every query sees all P prefix keys; among the sequence's own Lk keys ``causal`` is
bottom-right aligned (query i of Lq sees keys j <= Lk - Lq + i); keys dropped by ``key_padding_mask``
(True = keep) or at/after ``kv_lengths[b]`` are never seen (these conditions intersect: causal alignment is
always relative to Lk). A query that sees nothing gets O = 0 and LSE = -inf, never NaN. LSE is natural-log
float32. GQA/MQA: query head h reads kv head h // (Hq // Hkv).

Forward (``_pa_fwd_kernel``), grid (cdiv(Lq, BLOCK_M), B * Hq): a program owns one (batch, q head, query
block). It keeps its Q tile in registers, streams the prefix blocks of its row's task straight from the
un-batched (Hkv, P, d) / (T, Hkv, P, d) prefix tensor, then the sequence blocks up to the last key any of its
queries can see (causal bound and kv_lengths cut the loop; the padding mask is applied per key), with an
online softmax in the log2 domain and float32 accumulators; writes O once (input dtype) and the LSE.

Decode (``use_decode_path``: kv_lengths given, Lq <= DECODE_MAX_LQ = 16, P > 0), forward only:
  1. ``_pa_prefix_state_kernel``, grid (cdiv(B * G * Lq, BLOCK_M), T * Hkv, SP): the prefix attention of all
     queries that read one (task, kv head) -- M packs (row of the task, head of the GQA group, query) -- as one
     tiled GEMM, so the prefix is read once per BLOCK_M queries instead of once per (row, head). Program
     (M block, task * Hkv + kv head, sp) covers prefix keys [sp * chunk, (sp + 1) * chunk) only, so the split
     leaves that total unchanged: each chunk is read once by each M block. It stores the unnormalised
     online-softmax state (m, l, acc) of its queries over its chunk in float32: (SP, B * Hq * Lq, d + 2) floats in
     all (no B * P * d).
     Split over the prefix (``decode_prefix_splits``, SP > 1): when stage 1 has fewer than
     DECODE_PREFIX_SPLIT_MIN_PROGRAMS = 264 programs with queries (two per SM of an H200; the count is
     ``decode_stage1_programs``, Hkv * (cdiv(B * G * Lq, BLOCK_M) + min(T, B) - 1), exact for one task, host
     sizes only: no device sync) and P >= 2 * DECODE_PREFIX_SPLIT_MIN_KEYS = 512, P is cut into
     SP = min(cdiv(P, 256), cdiv(264, programs)) chunks of a multiple of BLOCK_N keys (the last one shorter).
     Pass 2 merges the SP states when it loads its starting state (below): no extra pass.
  2. ``_pa_decode_seq_kernel``, grid (S * cdiv(G * Lq, BLOCK_M), B * Hkv): a program owns one (batch row, kv
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
     ``_pa_decode_reduce_kernel``, grid (cdiv(B * Hq * Lq, BLOCK_R),), combines them in split order (fixed:
     deterministic) and normalises. Both splits compose: stage 1 over the prefix, pass 2 over the own keys.
  Decisions at the issue's decode shapes (Hq = 32, Hkv = 8, Lq = 1, d = 128, so G * Lq = 4; stage 1 BLOCK_M = 128,
  BLOCK_N = 64; pass 2 one M block, BLOCK_N = 128):
     stage 1 over the prefix, SP x chunk (programs): B = 16 (8 programs unsplit): P = 512 -> 2 x 256 (16),
     2048 -> 8 x 256 (64), 8192 -> 32 x 256 (256); B = 64 (16): 512 -> 2 x 256 (32), 2048 -> 8 x 256 (128),
     8192 -> 16 x 512 (256); B = 256 (64): 512 -> 2 x 256 (128), 2048 -> 5 x 448 (320), 8192 -> 5 x 1664 (320).
     The cost is SP - 1 extra partial states written and read: (SP - 1) * B * Hq * Lq * (d + 2) * 4 bytes each
     way (B = 64, P = 8192: 16 MB, against 34 MB of bf16 prefix and 34 MB of own K/V at 128 keys), plus SP reads
     of q instead of one (each chunk's program loads its Q tile; 0.5 MB per read there), for 16x the programs
     on a GEMM that ran compute-bound on 16 of 132 SMs.
     pass 2 over the own keys: only B = 16 with a 1024-key cache splits (3 chunks of 384 keys: 384 programs
     instead of 128, for ~0.8 MB of partials against 64 MB of bf16 own K/V); B >= 64 and 128-key caches never
     do. That split is there for small batches (B = 1: 8 programs on 132 SMs), where it matters most.
  Not done (yet): neither split nor the tile configs of the decode kernels have been timed on a GPU (the
  thresholds 264 programs / 256 keys are estimates from the work per program and the partial-state bytes);
  with many tasks (T close to B) stage 1's program count is an upper bound and its grid still launches
  T * Hkv * cdiv(B * G * Lq, BLOCK_M) * SP programs, most of which exit at once. The backward is the same for
  both paths (it never reads the decode state).

Backward, FlashAttention-2 style, everything recomputed from the saved LSE:
  1. ``_pa_bwd_pre_kernel``: delta = rowsum(dO * O) in float32, (B, Hq, Lq).
  2. ``_pa_bwd_dkdv_kernel`` with IS_PREFIX=False, grid (cdiv(Lk, BLOCK_N), B * Hkv): a program owns one block
     of sequence keys of one (batch, kv head), loops over the Hq // Hkv query heads of its group (the GQA sum
     happens in registers) and the query blocks that can see its keys, writes dk, dv once.
  3. ``_pa_bwd_dq_kernel``, grid (cdiv(Lq, BLOCK_M), B * Hq): the mirror of the forward loop, writes dq once.
  4. ``_pa_bwd_dkdv_kernel`` with IS_PREFIX=True, grid (cdiv(P, BLOCK_N), T * Hkv): a program owns one block of
     prefix keys of one (task, kv head) and iterates that task's batch rows in increasing row order (a stable
     argsort of task_ids + per-task offsets), the group's query heads and all query blocks: the reduction over
     the batch and over the GQA group is a fixed-order float32 sum in registers -- deterministic, no atomics,
     and no (B, P, d) partials are ever allocated.

Precision: tl.dot always gets ``input_precision="ieee"`` (float32 inputs stay exact on GPUs that default to
TF32); float16/bfloat16 tiles feed the dot in their dtype with float32 accumulation, P and dS are cast to the
value dtype before their dots (as in FlashAttention). Under TRITON_INTERPRET=1 bfloat16 dots are wrong, so
there (UPCAST) tiles are converted to float32 first.

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
def _load_tile(base, rows, cols, s_r, s_c, n_rows, n_cols, UPCAST: tl.constexpr):
    """(len(rows), len(cols)) tile, zeros outside [0, n_rows) x [0, n_cols)."""
    ptrs = base + rows.to(tl.int64)[:, None] * s_r + cols[None, :] * s_c
    t = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


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
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    kvh = h // G
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(q_ptr + b * s_qb + h * s_qh, m, offs_d, s_qm, s_qd, Lq, D, UPCAST)
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
        kT = tl.trans(_load_tile(pk_base, n, offs_d, s_pkn, s_pkd, P, D, UPCAST))
        v = _load_tile(pv_base, n, offs_d, s_pvn, s_pvd, P, D, UPCAST)
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
        valid = _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM)[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= m[:, None] + diag)
        kT = tl.trans(_load_tile(k_base, n, offs_d, s_kn, s_kd, Lk, D, UPCAST))
        v = _load_tile(v_base, n, offs_d, s_vn, s_vd, Lk, D, UPCAST)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kT, v, valid, qk_scale)

    _store_out(o_ptr, lse_ptr, bh * Lq + m, m < Lq, acc, m_i, l_i, offs_d, D)


@triton.jit
def _pa_prefix_state_kernel(
    st_m_ptr, st_l_ptr, st_acc_ptr, q_ptr, pk_ptr, pv_ptr, order_ptr, off_ptr,
    Hq, Hkv, G, Lq, P, D, R, chunk, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Decode stage 1: the prefix attention of every query that reads prefix (task, kv head) as one tiled GEMM,
    split over the prefix keys. Grid (M blocks, T * Hkv, SP).

    The M dimension packs (batch row of the task, head of the GQA group, query) so a block of BLOCK_M queries
    from many rows shares each prefix tile. program_id(2) = sp owns prefix keys [sp * chunk, (sp + 1) * chunk)
    (chunk a multiple of BLOCK_N: no key block straddles two chunks), so each prefix key is read once per M
    block in total, split or not: cdiv(rows * G * Lq, BLOCK_M) times per task and kv head instead of once per
    (row, head). Writes the unnormalised online-softmax state (m in log2 units, l, acc) of each query over its
    chunk at rows sp * R + (b * Hq + h) * Lq + i of the (SP, R) / (SP, R, D) float32 state buffers
    (R = B * Hq * Lq); pass 2 merges the SP states in chunk order and continues over the own keys."""
    pid = tl.program_id(0)
    th = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
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
                mask=rmask[:, None] & dmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    n_lo = sp * chunk
    # this program's chunk; programs past this task's queries do nothing
    n_hi = tl.where(pid * BLOCK_M < nq, tl.minimum(P, n_lo + chunk), n_lo)
    pk_base = pk_ptr + t * s_pkt + kvh * s_pkh
    pv_base = pv_ptr + t * s_pvt + kvh * s_pvh
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + offs_n
        kT = tl.trans(_load_tile(pk_base, n, offs_d, s_pkn, s_pkd, n_hi, D, UPCAST))
        v = _load_tile(pv_base, n, offs_d, s_pvn, s_pvd, n_hi, D, UPCAST)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kT, v, (n < n_hi)[None, :], qk_scale)
    srow = sp.to(tl.int64) * R + (b * Hq + h) * Lq + i
    tl.store(st_m_ptr + srow, m_i, mask=rmask)
    tl.store(st_l_ptr + srow, l_i, mask=rmask)
    tl.store(st_acc_ptr + srow[:, None] * D + offs_d[None, :], acc, mask=rmask[:, None] & dmask)


@triton.jit
def _pa_decode_seq_kernel(
    o_ptr, lse_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, st_m_ptr, st_l_ptr, st_acc_ptr,
    q_ptr, k_ptr, v_ptr, kpm_ptr, kvlen_ptr,
    Hq, Hkv, G, Lq, Lk, D, R, SP, chunk, n_mblocks, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Decode pass 2: the own keys of one (batch row, kv head), continuing the prefix state of stage 1.

    The M tile packs (head of the GQA group, query) -- G * Lq rows -- so every own key/value tile is loaded once
    per (row, kv head, M block) and serves all G heads, instead of once per q head. program_id(0) is
    split * n_mblocks + M block, program_id(1) is b * Hkv + kv head. Split s covers own keys
    [s * chunk, (s + 1) * chunk) (chunk a multiple of BLOCK_N, so no key block straddles two splits); split 0
    starts from the prefix state (the SP partial states of stage 1 merged in chunk order), the others from the
    empty state (m = -inf, l = 0, acc = 0).
    SPLIT=False (one split, chunk >= Lk): normalise and store O and the LSE here. SPLIT=True: store the
    unnormalised partial (m, l, acc) at rows split * R + row of the float32 part buffers; the reduce kernel
    combines them. R = B * Hq * Lq."""
    pid = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
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
                mask=rmask[:, None] & dmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

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
        valid = (_seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM) & (n < n_hi))[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= i[:, None] + diag)
        # loads stop at n_hi (not at Lk): keys past kv_lengths[b] or in the next split are never fetched
        kT = tl.trans(_load_tile(k_base, n, offs_d, s_kn, s_kd, n_hi, D, UPCAST))
        v = _load_tile(v_base, n, offs_d, s_vn, s_vd, n_hi, D, UPCAST)
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
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(o_ptr + b * s_ob + h * s_oh, m, offs_d, s_om, s_od, Lq, D, True)
    do = _load_tile(do_ptr + b * s_gb + h * s_gh, m, offs_d, s_gm, s_gd, Lq, D, True)
    tl.store(delta_ptr + bh * Lq + m, tl.sum(o * do, 1), mask=m < Lq)


@triton.jit
def _bwd_kv_rows(
    dk, dv, k, v, key_ok, n, q_ptr, do_ptr, lse_ptr, delta_ptr,
    b, h, Hq, Lq, D, diag, m_start, qk_scale,
    s_qb, s_qh, s_qm, s_qd, s_gb, s_gh, s_gm, s_gd,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Accumulate into (dk, dv) of one key block (k, v: (BLOCK_N, BLOCK_D)) the contribution of the queries
    m_start.. of (batch b, q head h). Works transposed (keys as rows) so no tile is transposed in the loop."""
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * s_qb + h * s_qh
    do_base = do_ptr + b * s_gb + h * s_gh
    row0 = (b * Hq + h) * Lq
    for m0 in range(m_start, Lq, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, m, offs_d, s_qm, s_qd, Lq, D, UPCAST)
        do = _load_tile(do_base, m, offs_d, s_gm, s_gd, Lq, D, UPCAST)
        lse = tl.load(lse_ptr + row0 + m, mask=m < Lq, other=0.0)
        # a query that saw nothing (LSE -inf) sees none of these keys either: push its probabilities to 0
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(delta_ptr + row0 + m, mask=m < Lq, other=0.0)
        valid = key_ok[:, None] & (m < Lq)[None, :]
        if CAUSAL:
            valid = valid & (n[:, None] <= m[None, :] + diag)
        sT = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        pT = tl.where(valid, tl.exp2(sT - lse2[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision="ieee")
        dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _pa_bwd_dkdv_kernel(
    dk_ptr, dv_ptr, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, order_ptr, off_ptr, kpm_ptr, kvlen_ptr,
    Hq, Hkv, G, Lq, Lk, NK, D, scale, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gm, s_gd,
    s_mb, s_mn,
    IS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """IS_PREFIX: keys are the NK = P prefix keys of (task, kv head) = divmod(program_id(1), Hkv), k/v strides
    are the prefix's (task, head, key, d), and the batch rows of the task come from order[off[t]:off[t+1]].
    Otherwise: keys are the NK = Lk sequence keys of (batch, kv head) = divmod(program_id(1), Hkv)."""
    pid_n = tl.program_id(0)
    xh = tl.program_id(1).to(tl.int64)
    x = xh // Hkv  # the task (prefix) or the batch row (sequence)
    kvh = xh % Hkv
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + x * s_kb + kvh * s_kh, n, offs_d, s_kn, s_kd, NK, D, UPCAST)
    v = _load_tile(v_ptr + x * s_vb + kvh * s_vh, n, offs_d, s_vn, s_vd, NK, D, UPCAST)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if IS_PREFIX:
        key_ok = n < NK
        r0 = tl.load(off_ptr + x)
        r1 = tl.load(off_ptr + x + 1)
        for r in range(r0, r1):  # this task's rows in increasing row order: a fixed summation order
            b = tl.load(order_ptr + r).to(tl.int64)
            for g in range(0, G):
                dk, dv = _bwd_kv_rows(dk, dv, k, v, key_ok, n, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                      b, kvh * G + g, Hq, Lq, D, 0, 0, qk_scale,
                                      s_qb, s_qh, s_qm, s_qd, s_gb, s_gh, s_gm, s_gd,
                                      False, UPCAST, BLOCK_M, BLOCK_D)
    else:
        b = x
        if HAS_KVLEN:
            kvlen = tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), Lk)
        else:
            kvlen = tl.cast(Lk, tl.int32)
        key_ok = _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM)
        diag = Lk - Lq
        if CAUSAL:  # the first query that sees key n0 is n0 - diag
            m_start = (tl.maximum(pid_n * BLOCK_N - diag, 0) // BLOCK_M) * BLOCK_M
        else:
            m_start = tl.cast(0, tl.int32)
        # a block wholly past kv_lengths[b] skips the loop: its gradient is 0
        m_start = tl.where(pid_n * BLOCK_N >= kvlen, Lq, m_start)
        for g in range(0, G):
            dk, dv = _bwd_kv_rows(dk, dv, k, v, key_ok, n, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                  b, kvh * G + g, Hq, Lq, D, diag, m_start, qk_scale,
                                  s_qb, s_qh, s_qm, s_qd, s_gb, s_gh, s_gm, s_gd,
                                  CAUSAL, UPCAST, BLOCK_M, BLOCK_D)
    out_rows = (xh * NK + n).to(tl.int64)
    omask = (n < NK)[:, None] & (offs_d < D)[None, :]
    tl.store(dk_ptr + out_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=omask)
    tl.store(dv_ptr + out_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=omask)


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
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    kvh = h // G
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * s_qb + h * s_qh, m, offs_d, s_qm, s_qd, Lq, D, UPCAST)
    do = _load_tile(do_ptr + b * s_gb + h * s_gh, m, offs_d, s_gm, s_gd, Lq, D, UPCAST)
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
        k = _load_tile(pk_base, n, offs_d, s_pkn, s_pkd, P, D, UPCAST)
        v = _load_tile(pv_base, n, offs_d, s_pvn, s_pvd, P, D, UPCAST)
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
        valid = _seq_key_valid(kpm_ptr, kvlen, n, Lk, s_mb, s_mn, b, HAS_KPM)[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= m[:, None] + diag)
        k = _load_tile(k_base, n, offs_d, s_kn, s_kd, Lk, D, UPCAST)
        v = _load_tile(v_base, n, offs_d, s_vn, s_vd, Lk, D, UPCAST)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, valid, qk_scale)

    row = bh * Lq + m
    tl.store(dq_ptr + row.to(tl.int64)[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=(m < Lq)[:, None] & (offs_d < D)[None, :])


# ------------------------------------------------------------------------------------------------ launchers


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_head_dim(d: int) -> int:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"prefix_attention (triton backend): head dim d={d} is not supported; "
                         f"supported head dims are {SUPPORTED_HEAD_DIMS}")
    return triton.next_power_of_2(d)


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
# (16 at B = 64, Hq = 32, Hkv = 8, Lq = 1 with BLOCK_M = 128), each streaming all P prefix keys, so the prefix
# is cut into SP chunks run by separate programs (a third grid dimension) until there are about two programs
# per SM of an H200. A chunk is never shorter than DECODE_PREFIX_SPLIT_MIN_KEYS keys: every chunk costs a
# float32 partial state per query (BLOCK_M * (d + 2) * 4 bytes per program, 66 KB at d = 128, written by stage
# 1 and read by pass 2) against the chunk's BLOCK_M * chunk * d GEMM work. Module-level, read at call time.
DECODE_PREFIX_SPLIT_MIN_PROGRAMS = 264
DECODE_PREFIX_SPLIT_MIN_KEYS = 256


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


def _fwd_config(block_d: int) -> dict:
    if _interpret():  # small tiles: cheap in the interpreter, and the tests cross several blocks
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def _decode_config(block_d: int, group_rows: int) -> dict:
    """Decode pass 2: the M tile holds the G * Lq rows of a (batch row, kv head) -- at least 16 (the smallest
    tl.dot tile), at most 128 (64 for d = 256) -- with long key blocks. Not tuned on a GPU yet."""
    if _interpret():  # 16 x 16: tests with G * Lq > 16 cross M blocks, and their caches cross key blocks
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
    block_m = min(max(16, triton.next_power_of_2(group_rows)), 64 if block_d > 128 else 128)
    block_n = 64 if block_m >= 64 or block_d > 128 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m >= 64 else 4,
                num_stages=2 if block_d > 128 else 3)


def _bwd_config(block_d: int) -> tuple[dict, dict]:
    """(dk/dv kernel config, dq kernel config)."""
    if _interpret():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1), dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
    if block_d <= 128:
        return (dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
                dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2))
    return (dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
            dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1))


def _upcast(*tensors: torch.Tensor | None) -> bool:
    """Convert tiles to float32 before the dots: float32 inputs, mixed input dtypes (the op layer may allow a
    float32 prefix with float16 activations), or bfloat16 under the interpreter (its bf16 dots are wrong)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return (torch.float32 in dtypes or len(dtypes) > 1) or (torch.bfloat16 in dtypes and _interpret())


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
    out = empty_output((B, Hq, Lq, D), q.dtype, q.device)
    lse = empty_output((B, Hq, Lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    qk_scale = float(scale) * _LOG2E
    upcast = _upcast(q, k, v, prefix_k, prefix_v)
    if use_decode_path(Lq, P, kv_lengths):
        _decode_forward(out, lse, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal,
                        qk_scale, upcast, block_d)
        return out, lse
    pk, s_pk = _prefix_args(prefix_k, q)
    pv, s_pv = _prefix_args(prefix_v, q)
    kpm, s_mb, s_mn = _mask_args(key_padding_mask, q)
    G = Hq // Hkv
    cfg = _fwd_config(block_d)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * Hq)
    _pa_fwd_kernel[grid](
        out, lse, q, k, v, pk, pv,
        task_ids if task_ids is not None else q, kpm, kv_lengths if kv_lengths is not None else q,
        Hq, G, Lq, Lk, P, D, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *s_pk, *s_pv, s_mb, s_mn,
        CAUSAL=bool(causal), HAS_TASK=task_ids is not None, HAS_KPM=key_padding_mask is not None,
        HAS_KVLEN=kv_lengths is not None, UPCAST=upcast, BLOCK_D=block_d, **cfg,
    )
    return out, lse


def _decode_forward(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    prefix_k: torch.Tensor, prefix_v: torch.Tensor, task_ids: torch.Tensor | None,
                    key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor, causal: bool, qk_scale: float,
                    upcast: bool, block_d: int) -> None:
    """The decode path (see the module docstring): stage 1 (split over the prefix or not), pass 2 (split over the
    own keys or not), and the reduce if pass 2 is split.
    (The op never passes key_padding_mask with kv_lengths; the kernels honour both anyway.)"""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = prefix_k.shape[-2]
    dev = q.device
    pk, s_pk = _prefix_args(prefix_k, q)
    pv, s_pv = _prefix_args(prefix_v, q)
    kpm, s_mb, s_mn = _mask_args(key_padding_mask, q)
    # stage 1: the prefix part of every query of a (task, kv head) as one tiled GEMM
    T = prefix_k.shape[0] if prefix_k.dim() == 4 else 1
    order, offsets = _task_rows(task_ids, B, T, dev)
    R = B * Hq * Lq
    cfg1 = _fwd_config(block_d)
    n_mb1 = triton.cdiv(B * G * Lq, cfg1["BLOCK_M"])
    n_psplit, pchunk = decode_prefix_splits(decode_stage1_programs(B, G, Lq, Hkv, T, cfg1["BLOCK_M"]), P,
                                            cfg1["BLOCK_N"])
    # the partial prefix states, one per chunk: (SP, R, d + 2) float32 in all
    st_m = empty_output((n_psplit, R), torch.float32, dev)
    st_l = empty_output((n_psplit, R), torch.float32, dev)
    st_acc = empty_output((n_psplit, R, D), torch.float32, dev)
    _pa_prefix_state_kernel[(n_mb1, T * Hkv, n_psplit)](
        st_m, st_l, st_acc, q, pk, pv, order, offsets, Hq, Hkv, G, Lq, P, D, R, pchunk, qk_scale,
        *q.stride(), *s_pk, *s_pv, UPCAST=upcast, BLOCK_D=block_d, **cfg1,
    )
    # pass 2: own keys of each (batch row, kv head), the GQA group packed into the M tile; its split 0 merges the
    # SP prefix states first
    cfg = _decode_config(block_d, G * Lq)
    n_mblocks = triton.cdiv(G * Lq, cfg["BLOCK_M"])
    n_split, chunk = decode_splits(n_mblocks * B * Hkv, Lk, cfg["BLOCK_N"])
    if n_split > 1:
        part_m = empty_output((n_split, R), torch.float32, dev)
        part_l = empty_output((n_split, R), torch.float32, dev)
        part_acc = empty_output((n_split, R, D), torch.float32, dev)
    else:
        part_m = part_l = part_acc = st_m  # unused (SPLIT=False)
    _pa_decode_seq_kernel[(n_split * n_mblocks, B * Hkv)](
        out, lse, part_m, part_l, part_acc, st_m, st_l, st_acc, q, k, v, kpm, kv_lengths,
        Hq, Hkv, G, Lq, Lk, D, R, n_psplit, chunk, n_mblocks, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), s_mb, s_mn,
        CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, SPLIT=n_split > 1, UPCAST=upcast,
        BLOCK_D=block_d, **cfg,
    )
    if n_split > 1:
        block_r = 16 if _interpret() else 32
        _pa_decode_reduce_kernel[(triton.cdiv(R, block_r),)](
            out, lse, part_m, part_l, part_acc, R, D, n_split, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=1 if _interpret() else 4,
        )


def _task_rows(task_ids: torch.Tensor | None, B: int, T: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows grouped by task, stable within a task, (T + 1,) offsets into them)."""
    if task_ids is None:
        return torch.arange(B, dtype=torch.int64, device=device), torch.tensor([0, B], dtype=torch.int64,
                                                                               device=device)
    tid = task_ids.long()
    order = torch.argsort(tid, stable=True)
    offsets = torch.zeros(T + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(torch.bincount(tid, minlength=T), 0)
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
    dev = q.device
    need_pk = need_pk and prefix_k is not None
    need_pv = need_pv and prefix_v is not None
    dq = empty_output((B, Hq, Lq, D), q.dtype, dev) if need_q else None
    dk = empty_output((B, Hkv, Lk, D), k.dtype, dev) if need_k else None
    dv = empty_output((B, Hkv, Lk, D), v.dtype, dev) if need_v else None
    dpk = empty_output(tuple(prefix_k.shape), prefix_k.dtype, dev) if need_pk else None
    dpv = empty_output(tuple(prefix_v.shape), prefix_v.dtype, dev) if need_pv else None

    upcast = _upcast(q, k, v, prefix_k, prefix_v)
    kpm, s_mb, s_mn = _mask_args(key_padding_mask, q)
    kvl = kv_lengths if kv_lengths is not None else q
    flags = dict(HAS_KPM=key_padding_mask is not None, HAS_KVLEN=kv_lengths is not None, UPCAST=upcast,
                 BLOCK_D=block_d)
    qk_scale = float(scale) * _LOG2E
    cfg_kv, cfg_q = _bwd_config(block_d)

    delta = empty_output((B, Hq, Lq), torch.float32, dev)
    if delta.numel():
        bm = 16 if _interpret() else 64
        _pa_bwd_pre_kernel[(triton.cdiv(Lq, bm), B * Hq)](delta, out, grad_out, Hq, Lq, D, *out.stride(),
                                                          *grad_out.stride(), BLOCK_M=bm, BLOCK_D=block_d)

    if (need_k or need_v) and B * Hkv * Lk:
        # dk and dv come out of the same loop; an unneeded one goes to a scratch buffer
        dk_buf = dk if dk is not None else torch.empty((B, Hkv, Lk, D), dtype=k.dtype, device=dev)
        dv_buf = dv if dv is not None else torch.empty((B, Hkv, Lk, D), dtype=v.dtype, device=dev)
        grid = (triton.cdiv(Lk, cfg_kv["BLOCK_N"]), B * Hkv)
        _pa_bwd_dkdv_kernel[grid](
            dk_buf, dv_buf, q, k, v, grad_out, lse, delta, q, q, kpm, kvl,
            Hq, Hkv, G, Lq, Lk, Lk, D, float(scale), qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), s_mb, s_mn,
            IS_PREFIX=False, CAUSAL=bool(causal), **flags, **cfg_kv,
        )

    if need_q and dq.numel():
        pk, s_pk = _prefix_args(prefix_k, q)
        pv, s_pv = _prefix_args(prefix_v, q)
        grid = (triton.cdiv(Lq, cfg_q["BLOCK_M"]), B * Hq)
        _pa_bwd_dq_kernel[grid](
            dq, q, k, v, pk, pv, grad_out, lse, delta, task_ids if task_ids is not None else q, kpm, kvl,
            Hq, G, Lq, Lk, P, D, float(scale), qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *s_pk, *s_pv, *grad_out.stride(), s_mb, s_mn,
            CAUSAL=bool(causal), HAS_TASK=task_ids is not None, **flags, **cfg_q,
        )

    if (need_pk or need_pv) and Hkv * P:
        T = prefix_k.shape[0] if prefix_k.dim() == 4 else 1
        order, offsets = _task_rows(task_ids, B, T, dev)
        shape = tuple(prefix_k.shape)
        dpk_buf = dpk if dpk is not None else torch.empty(shape, dtype=prefix_k.dtype, device=dev)
        dpv_buf = dpv if dpv is not None else torch.empty(shape, dtype=prefix_v.dtype, device=dev)
        _, s_pk = _prefix_args(prefix_k, q)
        _, s_pv = _prefix_args(prefix_v, q)
        grid = (triton.cdiv(P, cfg_kv["BLOCK_N"]), T * Hkv)
        _pa_bwd_dkdv_kernel[grid](
            dpk_buf, dpv_buf, q, prefix_k, prefix_v, grad_out, lse, delta, order, offsets, kpm, kvl,
            Hq, Hkv, G, Lq, Lk, P, D, float(scale), qk_scale,
            *q.stride(), *s_pk, *s_pv, *grad_out.stride(), s_mb, s_mn,
            IS_PREFIX=True, CAUSAL=False, **flags, **cfg_kv,
        )
    return dq, dk, dv, dpk, dpv

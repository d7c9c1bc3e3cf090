"""Triton kernels of ``label_map``.

Row statistics (probs / log_probs only): the (max, log-sum-exp) of each row in one online pass. A row is cut
into ``nsplit`` column chunks, one program each (a vocabulary-sized row on a few rows of batch would otherwise
be one program per row: 64 programs for 132 SMs); each stores a (max, sum exp(x - max)) partial, and a small
kernel combines a row's partials in chunk order (deterministic). With a single chunk the partial kernel stores
the final pair itself. The (B, K_src) softmax is never materialised.

Index mappings (one-to-one, many-to-one): one program per (row, block of targets) gathers only the mapped
columns and applies the softmax / log-softmax from the row statistics. The backward needs, per column, the sum
of w * grad over the mapping entries that read it: the entries are sorted by source once per call (a stable
argsort and a searchsorted of the column-block starts: fixed output sizes, so no host sync), and one program per
(row, block of columns) walks only its block's entries, adding each to its column through a one-hot compare in
registers (repeated sources add up in entry order: no atomics, no write conflicts), then writes d logits once,
dense softmax term included.

Dense mappings: a GEMM whose prologue applies the softmax / log-softmax on the fly from the row statistics. Its
operands are cast to the logits' dtype before ``tl.dot`` (tensor cores for float16 / bfloat16 logits, a float32
mapping included), accumulation in float32; float32 logits keep exact float32 dots (input_precision="ieee").
Under TRITON_INTERPRET=1 bfloat16 dots are wrong, so there they run in float32. (float16 logits: a
log-probability below -65504, i.e. a logit spread beyond float16's range, saturates to -inf in the dot, as it
would under autocast.) The forward splits the K_src
reduction over programs (few rows x few targets leave a handful of output tiles) into float32 partials that a
second kernel sums in split order; the backward is two GEMMs (d logits, and d mapping reducing over the batch in
a fixed order, split over the batch into ordered partials when K_src is small). No atomics anywhere:
bitwise deterministic.

Every grid is one-dimensional (axis 0 allows 2**31 - 1 programs; axes 1 and 2 only 65,535), and offsets that
can pass 2**31 elements are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._alloc import empty_output
from ..reference.label_map import index_weights, out_dtype

_INPUT = {"logits": 0, "probs": 1, "log_probs": 2}

# Work splitting, read at call time (tests monkeypatch them to force splits at small sizes). A split of a row's
# statistics is at least STATS_MIN_CHUNK columns (shorter chunks cost more in partials than they win);
# splitting stops once there are about STATS_TARGET_PROGRAMS programs (4 per SM of an H100).
STATS_TARGET_PROGRAMS = 528
STATS_MIN_CHUNK = 8192
STATS_MAX_SPLITS = 64
STATS_MAX_BLOCK = 2048
# Dense GEMMs: split the reduction (K_src in the forward, the batch in d mapping) until about DENSE_TARGET_PROGRAMS
# programs (two waves of 132 SMs), each split at least DENSE_MIN_CHUNK long.
DENSE_TARGET_PROGRAMS = 264
DENSE_MIN_CHUNK = 256
DENSE_MAX_SPLITS = 512
# Index forward: target blocks shrink (down to 2 targets) until about this many programs.
INDEX_TARGET_PROGRAMS = 264
# Index backward: columns per program and mapping entries per step of its one-hot accumulation.
INDEX_BWD_BLOCK_K = 256
INDEX_BWD_BLOCK_E = 16


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _apply(v, mx, ls, INPUT: tl.constexpr):
    if INPUT == 1:
        return tl.exp((v - mx) - ls)
    elif INPUT == 2:
        return (v - mx) - ls
    else:
        return v


@triton.jit
def _dot_in(v, DOT: tl.constexpr):
    """A tl.dot operand in the dot dtype: 1 float16, 2 bfloat16 (tensor cores), 0 float32."""
    if DOT == 1:
        return v.to(tl.float16)
    elif DOT == 2:
        return v.to(tl.bfloat16)
    else:
        return v.to(tl.float32)


# ------------------------------------------------------------------------------------------ row statistics


@triton.jit
def _lm_stats_part_kernel(
    part_ptr, x_ptr, K, chunk, nsplit, s_xb, s_xk,
    FINAL: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(max, sum exp(x - max)) of columns [sp * chunk, (sp + 1) * chunk) of row b; FINAL (one chunk): (max, log
    sum). Max and log-sum stay apart so that f(x) = (x - max) - logsum is exact for large |x| (as torch's
    log_softmax)."""
    pid = tl.program_id(0)
    b = (pid // nsplit).to(tl.int64)
    sp = pid % nsplit
    x_row = x_ptr + b * s_xb
    offs = tl.arange(0, BLOCK_K)
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_K,), tl.float32)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, K)
    for k0 in range(lo, hi, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_row + k.to(tl.int64) * s_xk, mask=k < hi, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, v)
        # a lane still at -inf rescales by exp(-inf - 0) = 0 instead of exp(-inf - -inf) = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(v - m_safe)
        m = m_new
    m_all = tl.max(m, axis=0)
    m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.sum(s * tl.exp(m - m_all_safe), axis=0)
    if FINAL:
        total = tl.log(total)
    out = part_ptr + 2 * (b * nsplit + sp)
    tl.store(out, m_all)
    tl.store(out + 1, total)


@triton.jit
def _lm_stats_combine_kernel(lse_ptr, part_ptr, B, nsplit, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """lse[b] = (max, log sum) from row b's chunk partials, combined in a fixed order. A small kernel by design:
    it reads B * nsplit pairs (at most 64 per row), so a few programs do."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    sps = tl.arange(0, BLOCK_S)
    mask = (rows < B)[:, None] & (sps < nsplit)[None, :]
    base = part_ptr + 2 * (rows.to(tl.int64)[:, None] * nsplit + sps[None, :])
    m = tl.load(base, mask=mask, other=float("-inf"))
    s = tl.load(base + 1, mask=mask, other=0.0)
    m_all = tl.max(m, axis=1)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.sum(s * tl.exp(m - m_safe[:, None]), axis=1)
    tl.store(lse_ptr + 2 * rows, m_all, mask=rows < B)
    tl.store(lse_ptr + 2 * rows + 1, tl.log(tl.where(rows < B, total, 1.0)), mask=rows < B)


def stats_splits(B: int, K: int, block_k: int) -> tuple[int, int]:
    """(nsplit, chunk) of the row statistics: columns per split a multiple of block_k."""
    n = 1
    if B < STATS_TARGET_PROGRAMS and K >= 2 * STATS_MIN_CHUNK:
        n = min(triton.cdiv(STATS_TARGET_PROGRAMS, max(B, 1)), K // STATS_MIN_CHUNK, STATS_MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(max(K, 1), max(n, 1)), block_k) * block_k
    return max(1, triton.cdiv(K, chunk)), chunk


def _block_k(K: int) -> int:
    return min(STATS_MAX_BLOCK, triton.next_power_of_2(max(K, 1)))


def _lse(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) float32 (max, log-sum) of each row."""
    B, K = x.shape
    lse = empty_output((B, 2), torch.float32, x.device)
    if B == 0:
        return lse
    block_k = _block_k(K)
    nsplit, chunk = stats_splits(B, K, block_k)
    part = lse if nsplit == 1 else empty_output((B, nsplit, 2), torch.float32, x.device)
    _lm_stats_part_kernel[(B * nsplit,)](part, x, K, chunk, nsplit, *x.stride(), FINAL=nsplit == 1,
                                          BLOCK_K=block_k, num_warps=4)
    if nsplit > 1:
        block_r = 16
        _lm_stats_combine_kernel[(triton.cdiv(B, block_r),)](lse, part, B, nsplit, BLOCK_R=block_r,
                                                             BLOCK_S=triton.next_power_of_2(nsplit), num_warps=4)
    return lse


# ------------------------------------------------------------------------------------------ index mappings


@triton.jit
def _lm_index_fwd_kernel(
    out_ptr, lse_ptr, x_ptr, map_ptr, w_ptr,
    K, T, M, n_tblk, s_xb, s_xk, s_mt, s_mm,
    INPUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_tblk).to(tl.int64)
    ts = (pid % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    x_row = x_ptr + b * s_xb
    if INPUT != 0:
        mx = tl.load(lse_ptr + 2 * b)
        ls = tl.load(lse_ptr + 2 * b + 1)
    else:
        mx = 0.0
        ls = 0.0
    js = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_T,), tl.float32)
    for j0 in range(0, M, BLOCK_M):
        j = j0 + js
        valid = (ts < T)[:, None] & (j < M)[None, :]
        src = tl.load(map_ptr + ts[:, None].to(tl.int64) * s_mt + j[None, :] * s_mm, mask=valid,
                      other=-1).to(tl.int64)
        w = tl.load(w_ptr + ts[:, None].to(tl.int64) * M + j[None, :], mask=valid, other=0.0)
        # out-of-range sources (the device-side range check fails the stream) are never read
        v = tl.load(x_row + src * s_xk, mask=valid & (src >= 0) & (src < K), other=0.0).to(tl.float32)
        v = tl.where(w != 0.0, v, mx)  # unused lanes: a finite f(v), so 0 * f(v) stays 0
        acc += tl.sum(tl.where(w != 0.0, w * _apply(v, mx, ls, INPUT), 0.0), axis=1)
    tl.store(out_ptr + b * T + ts, acc.to(out_ptr.dtype.element_ty), mask=ts < T)


@triton.jit
def _lm_index_bwd_kernel(
    dx_ptr, g_ptr, x_ptr, lse_ptr, srow_ptr, esrc_ptr, etgt_ptr, ew_ptr, blk_ptr,
    K, n_kblk, s_xb, s_xk, s_gb, s_gt,
    INPUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_kblk).to(tl.int64)
    kb = pid % n_kblk
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    # c[k] = sum of w * g[b, t] over the entries (t, j) with mapping[t, j] == k: this block's entries, sorted by
    # source (stable: entry order within a source), in steps of BLOCK_E
    c = tl.zeros((BLOCK_K,), tl.float32)
    e0 = tl.load(blk_ptr + kb)
    e1 = tl.load(blk_ptr + kb + 1)
    for eb in range(e0, e1, BLOCK_E):
        es = eb + tl.arange(0, BLOCK_E)
        em = es < e1
        src = tl.load(esrc_ptr + es, mask=em, other=-1)
        t = tl.load(etgt_ptr + es, mask=em, other=0)
        w = tl.load(ew_ptr + es, mask=em, other=0.0)
        gv = tl.load(g_ptr + b * s_gb + t * s_gt, mask=em, other=0.0).to(tl.float32)
        hit = src[:, None] == k[None, :]
        c += tl.sum(tl.where(hit, (w * gv)[:, None], 0.0), axis=0)
    if INPUT != 0:
        mx = tl.load(lse_ptr + 2 * b)
        ls = tl.load(lse_ptr + 2 * b + 1)
        srow = tl.load(srow_ptr + b)  # probs: sum_t g_t out_t; log_probs: sum_t g_t W_t
        xv = tl.load(x_ptr + b * s_xb + k.to(tl.int64) * s_xk, mask=kmask, other=float("-inf")).to(tl.float32)
        p = _apply(xv, mx, ls, 1)
        if INPUT == 1:
            c = p * (c - srow)
        else:
            c = c - p * srow
    tl.store(dx_ptr + b * K + k, c.to(dx_ptr.dtype.element_ty), mask=kmask)


def _index_block_t(B: int, T: int) -> int:
    block_t = 16
    while block_t > 2 and B * triton.cdiv(T, block_t) < INDEX_TARGET_PROGRAMS:
        block_t //= 2
    return block_t


def _sorted_entries(mapping: torch.Tensor, w: torch.Tensor, K: int, block_k: int):
    """The mapping's entries sorted by source (stable), their targets and weights, and each column block's entry
    range [blk[i], blk[i + 1]). Entries outside [0, K) fall outside every range. Fixed sizes: no host sync."""
    dev = mapping.device
    M = mapping.shape[1]
    flat = mapping.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    esrc = flat[order]
    etgt = torch.div(order, max(M, 1), rounding_mode="floor")
    ew = w.reshape(-1)[order].contiguous()
    starts = torch.arange(triton.cdiv(K, block_k) + 1, device=dev, dtype=torch.int64) * block_k
    blk = torch.searchsorted(esrc, starts)
    return esrc, etgt, ew, blk


# ------------------------------------------------------------------------------------------ dense mappings


@triton.jit
def _lm_dense_fwd_kernel(
    part_ptr, x_ptr, w_ptr, lse_ptr,
    B, K, T, chunk, n_rb, n_cb, s_xb, s_xk, s_wk, s_wt,
    INPUT: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[sp] = f(x)[:, chunk sp] @ W[chunk sp, :] for one (row block, target block); part is ``out`` itself
    when there is one split."""
    pid = tl.program_id(0)
    rb = pid % n_rb
    cb = (pid // n_rb) % n_cb
    sp = pid // (n_rb * n_cb)
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = cb * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < B
    cmask = cols < T
    if INPUT != 0:
        mx = tl.load(lse_ptr + 2 * rows, mask=rmask, other=0.0)
        ls = tl.load(lse_ptr + 2 * rows + 1, mask=rmask, other=0.0)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * s_xb
    acc = tl.zeros((BLOCK_B, BLOCK_T), tl.float32)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, K)
    for k0 in range(lo, hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < hi
        k64 = k.to(tl.int64)
        a = tl.load(x_rows + k64[None, :] * s_xk, mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if INPUT != 0:
            a = tl.where(kmask[None, :] & rmask[:, None], _apply(a, mx[:, None], ls[:, None], INPUT), 0.0)
        w = tl.load(w_ptr + k64[:, None] * s_wk + cols[None, :] * s_wt, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += tl.dot(_dot_in(a, DOT), _dot_in(w, DOT), input_precision="ieee")
    o = part_ptr + (sp.to(tl.int64) * B + rows[:, None]) * T + cols[None, :]
    tl.store(o, acc.to(part_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _lm_sum_splits_kernel(out_ptr, part_ptr, N, S, BLOCK: tl.constexpr):
    """out[f] = sum over s, in order, of part[s, f] (contiguous). A small kernel by design: N is an output the
    size of (B, K_tgt) or (K_src, K_tgt) with few splits, a few hundred programs at most."""
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = f < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + tl.cast(s, tl.int64) * N + f, mask=valid, other=0.0)
    tl.store(out_ptr + f, acc.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _lm_dense_dx_kernel(
    dx_ptr, g_ptr, x_ptr, w_ptr, lse_ptr, srow_ptr,
    B, K, T, n_rb, s_xb, s_xk, s_wk, s_wt, s_gb, s_gt,
    INPUT: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid % n_rb) * BLOCK_B + tl.arange(0, BLOCK_B)
    k = (pid // n_rb) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    kmask = k < K
    k64 = k.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)  # c = g @ W^T
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < T
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * s_gb + t[None, :] * s_gt,
                    mask=rmask[:, None] & tmask[None, :], other=0.0)
        wt = tl.load(w_ptr + k64[None, :] * s_wk + t[:, None] * s_wt, mask=tmask[:, None] & kmask[None, :],
                     other=0.0)
        acc += tl.dot(_dot_in(g, DOT), _dot_in(wt, DOT), input_precision="ieee")
    mask2 = rmask[:, None] & kmask[None, :]
    if INPUT != 0:
        mx = tl.load(lse_ptr + 2 * rows, mask=rmask, other=0.0)
        ls = tl.load(lse_ptr + 2 * rows + 1, mask=rmask, other=0.0)
        srow = tl.load(srow_ptr + rows, mask=rmask, other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * s_xb + k64[None, :] * s_xk, mask=mask2,
                    other=0.0).to(tl.float32)
        p = _apply(x, mx[:, None], ls[:, None], 1)
        if INPUT == 1:
            acc = p * (acc - srow[:, None])
        else:
            acc = acc - p * srow[:, None]
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * K + k64[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _lm_dense_dw_kernel(
    part_ptr, g_ptr, x_ptr, lse_ptr,
    B, K, T, chunk, n_kb, n_cb, s_xb, s_xk, s_gb, s_gt,
    INPUT: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """part[sp] = f(x)[rows of chunk sp]^T @ g[rows of chunk sp], the batch summed in a fixed order."""
    pid = tl.program_id(0)
    kb = pid % n_kb
    cb = (pid // n_kb) % n_cb
    sp = pid // (n_kb * n_cb)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    t = cb * BLOCK_T + tl.arange(0, BLOCK_T)
    kmask = k < K
    tmask = t < T
    k64 = k.to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_T), tl.float32)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, B)
    for b0 in range(lo, hi, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < hi
        r64 = rows.to(tl.int64)
        a = tl.load(x_ptr + k64[:, None] * s_xk + r64[None, :] * s_xb,
                    mask=kmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # (K, B) tile of x^T
        if INPUT != 0:
            mx = tl.load(lse_ptr + 2 * r64, mask=rmask, other=0.0)
            ls = tl.load(lse_ptr + 2 * r64 + 1, mask=rmask, other=0.0)
            a = tl.where(kmask[:, None] & rmask[None, :], _apply(a, mx[None, :], ls[None, :], INPUT), 0.0)
        g = tl.load(g_ptr + r64[:, None] * s_gb + t[None, :] * s_gt, mask=rmask[:, None] & tmask[None, :],
                    other=0.0)
        acc += tl.dot(_dot_in(a, DOT), _dot_in(g, DOT), input_precision="ieee")
    o = part_ptr + (sp.to(tl.int64) * K + k64[:, None]) * T + t[None, :]
    tl.store(o, acc.to(part_ptr.dtype.element_ty), mask=kmask[:, None] & tmask[None, :])


def _dot_code(dtype: torch.dtype) -> int:
    """The dense GEMMs' operand dtype, that of the logits (the activation): 16-bit on tensor cores."""
    if dtype == torch.float16:
        return 1
    if dtype == torch.bfloat16 and not _interpret():
        return 2
    return 0


def _tile(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, triton.next_power_of_2(max(n, 1))))


def _dense_cfg(dtype: torch.dtype) -> dict:
    """Tile sizes of the dense GEMMs: 16 (the smallest tl.dot tile) under the interpreter, so that tests at small
    sizes cross several blocks in every dimension."""
    if _interpret():
        return dict(bb=16, bk=16, bt=16, warps=1)
    # 8 warps for the (64 x 64) float32 tiles of the forward and d logits: the softmax epilogue next to the MMA
    # accumulator needs about 250 registers per thread with 4 warps (2 blocks per SM), half that with 8.
    # float32 logits: the dot is an FMA loop (exact float32, no TF32) whose operands live in registers; a K step
    # of 64 spilled 752 B on sm_80, a step of 32 spills nothing.
    return dict(bb=64, bk=64 if dtype != torch.float32 else 32, bt=64, warps=4, wide_warps=8)


def reduction_splits(n_programs: int, n: int, block: int) -> tuple[int, int]:
    """(splits, chunk) of a reduction of length n over which n_programs programs each loop: split until about
    DENSE_TARGET_PROGRAMS programs, chunks of at least DENSE_MIN_CHUNK, a multiple of block."""
    s = 1
    if n_programs < DENSE_TARGET_PROGRAMS and n >= 2 * DENSE_MIN_CHUNK:
        s = min(triton.cdiv(DENSE_TARGET_PROGRAMS, n_programs), n // DENSE_MIN_CHUNK, DENSE_MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(max(n, 1), s), block) * block
    return max(1, triton.cdiv(n, chunk)), chunk


def _sum_splits(out: torch.Tensor, part: torch.Tensor, splits: int) -> None:
    n = out.numel()
    block = 256
    _lm_sum_splits_kernel[(triton.cdiv(n, block),)](out, part, n, splits, BLOCK=block, num_warps=2)


def _dense_fwd(logits: torch.Tensor, mapping: torch.Tensor, lse: torch.Tensor, mode: int, odt: torch.dtype
               ) -> torch.Tensor:
    B, K = logits.shape
    T = mapping.shape[1]
    dev = logits.device
    out = empty_output((B, T), odt, dev)
    if B == 0 or T == 0:
        return out
    cfg = _dense_cfg(logits.dtype)
    bb, bt, bk = _tile(B, 16, cfg["bb"]), _tile(T, 16, cfg["bt"]), cfg["bk"]
    n_rb, n_cb = triton.cdiv(B, bb), triton.cdiv(T, bt)
    splits, chunk = reduction_splits(n_rb * n_cb, K, bk)
    part = out if splits == 1 else empty_output((splits, B, T), torch.float32, dev)
    _lm_dense_fwd_kernel[(n_rb * n_cb * splits,)](
        part, logits, mapping, lse if mode else part, B, K, T, chunk, n_rb, n_cb, *logits.stride(),
        *mapping.stride(), INPUT=mode, DOT=_dot_code(logits.dtype), BLOCK_B=bb, BLOCK_T=bt, BLOCK_K=bk,
        num_warps=cfg.get("wide_warps", cfg["warps"]))
    if splits > 1:
        _sum_splits(out, part, splits)
    return out


def label_map(logits: torch.Tensor, mapping: torch.Tensor, reduce: str, input: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (B, K_tgt), row stats (B, 2) float32 (max, log-sum), empty for raw logits)."""
    B, K = logits.shape
    dev = logits.device
    mode = _INPUT[input]
    odt = out_dtype(logits, input)
    lse = _lse(logits) if mode else torch.empty((0,), dtype=torch.float32, device=dev)
    if mapping.is_floating_point():
        return _dense_fwd(logits, mapping, lse, mode, odt), lse
    T, M = mapping.shape
    w = index_weights(mapping, reduce, torch.float32).contiguous()
    out = empty_output((B, T), odt, dev)
    if B and T:
        block_t = _index_block_t(B, T)
        block_m = min(16, triton.next_power_of_2(max(M, 1)))
        n_tblk = triton.cdiv(T, block_t)
        _lm_index_fwd_kernel[(B * n_tblk,)](out, lse if mode else out, logits, mapping, w, K, T, M, n_tblk,
                                            *logits.stride(), *mapping.stride(), INPUT=mode, BLOCK_T=block_t,
                                            BLOCK_M=block_m, num_warps=max(1, min(4, block_t * block_m // 64)))
    return out, lse


def label_map_backward(grad: torch.Tensor, logits: torch.Tensor, mapping: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, reduce: str, input: str, need_logits: bool, need_mapping: bool
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fused backward: (d logits (B, K_src) in logits' dtype, d mapping for dense mappings), None if unneeded."""
    B, K = logits.shape
    dev = logits.device
    mode = _INPUT[input]
    dense = mapping.is_floating_point()
    T = mapping.shape[1] if dense else mapping.shape[0]
    g32 = grad.float()
    # the per-row scalar of the softmax's backward: probs: sum_t g_t out_t; log_probs: sum_t g_t (weight of t)
    if mode == 1:
        srow = (g32 * out.float()).sum(-1)
    elif mode == 2:
        tw = mapping.float().sum(0) if dense else index_weights(mapping, reduce, torch.float32).sum(1)
        srow = g32 @ tw
    else:
        srow = lse  # unused
    srow = srow.contiguous()
    dx = dw = None
    dot = _dot_code(logits.dtype)
    cfg = _dense_cfg(logits.dtype)
    if need_logits:
        dx = empty_output((B, K), logits.dtype, dev)
        if B and K and dense:
            bb, bk, bt = _tile(B, 16, cfg["bb"]), cfg["bk"], _tile(T, 16, min(32, cfg["bt"]))
            n_rb = triton.cdiv(B, bb)
            _lm_dense_dx_kernel[(n_rb * triton.cdiv(K, bk),)](
                dx, grad, logits, mapping, lse if mode else dx, srow if mode else dx, B, K, T, n_rb,
                *logits.stride(), *mapping.stride(), *grad.stride(), INPUT=mode, DOT=dot, BLOCK_B=bb, BLOCK_K=bk,
                BLOCK_T=bt, num_warps=cfg.get("wide_warps", cfg["warps"]))
        elif B and K:
            block_k = INDEX_BWD_BLOCK_K
            w = index_weights(mapping, reduce, torch.float32)
            esrc, etgt, ew, blk = _sorted_entries(mapping, w, K, block_k)
            n_kblk = triton.cdiv(K, block_k)
            _lm_index_bwd_kernel[(B * n_kblk,)](
                dx, grad, logits, lse if mode else dx, srow if mode else dx, esrc, etgt, ew, blk, K, n_kblk,
                *logits.stride(), *grad.stride(), INPUT=mode, BLOCK_K=block_k, BLOCK_E=INDEX_BWD_BLOCK_E,
                num_warps=4)
    if need_mapping and dense:
        dw = empty_output((K, T), torch.float32, dev)
        if B and K and T:
            bk, bt, bb = cfg["bk"], _tile(T, 16, cfg["bt"]), 16 if _interpret() else 32
            n_kb, n_cb = triton.cdiv(K, bk), triton.cdiv(T, bt)
            splits, chunk = reduction_splits(n_kb * n_cb, B, bb)
            part = dw if splits == 1 else empty_output((splits, K, T), torch.float32, dev)
            _lm_dense_dw_kernel[(n_kb * n_cb * splits,)](
                part, grad, logits, lse if mode else part, B, K, T, chunk, n_kb, n_cb, *logits.stride(),
                *grad.stride(), INPUT=mode, DOT=dot, BLOCK_K=bk, BLOCK_T=bt, BLOCK_B=bb, num_warps=cfg["warps"])
            if splits > 1:
                _sum_splits(dw, part, splits)
        else:
            dw.zero_()
        dw = dw.to(mapping.dtype)
    return dx, dw

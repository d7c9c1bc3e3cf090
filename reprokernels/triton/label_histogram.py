"""Triton kernels of ``label_histogram``: a per-row pass, then per-(target, source block) partial histograms with an
ordered, atomic-free reduction straight into the running statistic ``out``.

Plan (B samples, K = K_src, T = K_tgt):

0. Torch pre-steps on B integers, no host sync: a stable sort of the targets (``perm``: the samples grouped by
   target class, in sample order inside a class) and the class offsets (a searchsorted of the sorted targets).
   With ``weight="prob"`` and a top-k, ``torch.topk(logits, k).values`` gives each row's k-th largest logit
   ``thr`` and the number of entries strictly above it: this is the one pre-step that reads the logits (the
   k-th *value* is unique whatever ``torch.topk`` picks among ties; the kernels then keep every entry > thr and
   the first entries == thr by source index, so ties follow the reference's lowest-index rule exactly).
1. ``_row_stats_kernel``, one read of the row: ``weight="count"``: the argmax (``torch.argmax``'s rule: first
   maximal index, the first NaN wins); ``weight="prob"``: the online max and sum of exponentials (softmax
   statistics, never materialising the (B, K) softmax) and, with top-k, the source index of the last tie kept
   (a running tie count and an in-block cumsum). A few rows of a large K are cut into column chunks, one
   program each, whose partials (argmax: best value, its first index, the first NaN; prob: max, sum, tie count)
   ``_row_combine_kernel`` combines in chunk order; with top-k it rescans the one chunk where the running tie
   count reaches the quota.
2. ``_hist_kernel``, one program per (source block, target t, split): it walks the samples of class t (its
   share of them when the class is split), forms the [BLOCK_N, BLOCK_S] contributions in registers (count:
   ``pred == s``; prob: ``exp(x - max) / sum`` where kept) and sums them. Softmax and scatter are fused here:
   the probabilities exist only in registers. Unsplit, the program is the only writer of
   ``out[s_block, t]``: it adds its sums in place, touching only cells with a non-zero sum (a batch's counts
   touch B cells, not K columns). Split (few, large classes on a small statistic: more programs), each split
   stores a float32 partial tile and ``_reduce_kernel`` adds the splits in order into ``out``. (source block,
   target) share grid axis 0, so any K_tgt fits (axis 1 allows 65,535).

No atomics anywhere, and every sum has a fixed order: the result is deterministic, bit for bit, for counts and
probabilities alike. Counts are exact integers in float32 up to 2**24 per cell (float32 cannot add 1 beyond
16,777,216); each tile of counts is summed exactly before it is added.

Memory: counts read the logits once (``weight="count"`` from predictions reads only B indices); probabilities
read them twice (row statistics, then the contributions), plus once in ``torch.topk`` with a top-k (and, when
the row pass is split, a rescan of the one chunk per row where the last kept tie lies).
``out`` is read and written once per touched cell.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty_output

# Tile sizes: a [BLOCK_N samples x BLOCK_S sources] contribution tile per loop step of the histogram kernel.
BLOCK_N = 16
MAX_BLOCK_S = 256
MAX_ROW_BLOCK = 2048
# Split classes into several programs only while the statistic's partials stay small and programs are few.
TARGET_PROGRAMS = 1024
MAX_SPLITS = 64
MAX_PARTIAL_BYTES = 1 << 26
# The row pass cuts a row into chunks (one program each, partials combined in chunk order) until about
# ROW_TARGET_PROGRAMS programs (4 per SM of an H100), chunks of at least ROW_MIN_CHUNK columns: a few rows of a
# vocabulary-sized K would otherwise be a few programs. Read at call time (tests force splits).
ROW_TARGET_PROGRAMS = 528
ROW_MIN_CHUNK = 8192
ROW_MAX_SPLITS = 64


@triton.jit
def _row_stats_kernel(
    x_ptr, pred_ptr, m_ptr, inv_ptr, thr_ptr, quota_ptr, jstar_ptr, pf_ptr, pi_ptr,
    K, chunk, nsplit, sxb, sxs,
    PROB: tl.constexpr, TOPK: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Columns [sp * chunk, (sp + 1) * chunk) of row b. FINAL (one chunk per row): the row's statistics. Else a
    partial: prob: (max, sum exp) in pf and, with top-k, the number of ties at thr in pi; count: (best value) in
    pf and (first index of the best, first NaN index or K) in pi."""
    pid = tl.program_id(0)
    b = (pid // nsplit).to(tl.int64)
    sp = pid % nsplit
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, K)
    row = x_ptr + b * sxb
    lanes = tl.arange(0, BLOCK)
    part = b * nsplit + sp
    if PROB:
        m = tl.cast(float("-inf"), tl.float32)
        s = tl.cast(0.0, tl.float32)
        if TOPK:
            thr = tl.load(thr_ptr + b)
            seen = tl.cast(0, tl.int32)
            if FINAL:
                quota = tl.load(quota_ptr + b)
                jstar = tl.cast(K, tl.int32)
        for k0 in range(lo, hi, BLOCK):
            offs = k0 + lanes
            valid = offs < hi
            v = tl.load(row + offs.to(tl.int64) * sxs, mask=valid, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(v, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix adds exp(-inf) = 0
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(v - m_safe), axis=0)
            m = m_new
            if TOPK:
                eq = valid & (v == thr)
                if FINAL:
                    rank = seen + tl.cumsum(eq.to(tl.int32), axis=0)  # 1-based rank of each tie in source order
                    hit = eq & (rank == quota)
                    jstar = tl.minimum(jstar, tl.min(tl.where(hit, offs, K), axis=0))
                seen += tl.sum(eq.to(tl.int32), axis=0)
        if FINAL:
            tl.store(m_ptr + b, m)
            tl.store(inv_ptr + b, 1.0 / s)
            if TOPK:
                tl.store(jstar_ptr + b, jstar)
        else:
            tl.store(pf_ptr + 2 * part, m)
            tl.store(pf_ptr + 2 * part + 1, s)
            if TOPK:
                tl.store(pi_ptr + 2 * part, seen)
    else:
        best = tl.cast(float("-inf"), tl.float32)
        best_i = tl.cast(0, tl.int32)  # an all -inf row: index 0, as torch.argmax
        nan_i = tl.cast(K, tl.int32)
        for k0 in range(lo, hi, BLOCK):
            offs = k0 + lanes
            valid = offs < hi
            v = tl.load(row + offs.to(tl.int64) * sxs, mask=valid, other=float("-inf")).to(tl.float32)
            isnan = valid & (v != v)
            vv = tl.where(isnan, float("-inf"), v)
            bm = tl.max(vv, axis=0)
            bi = tl.min(tl.where(valid & (vv == bm), offs, K), axis=0)
            best_i = tl.where(bm > best, bi, best_i)  # strictly greater: the earlier block keeps a tie
            best = tl.maximum(best, bm)
            nan_i = tl.minimum(nan_i, tl.min(tl.where(isnan, offs, K), axis=0))
        if FINAL:
            tl.store(pred_ptr + b, tl.where(nan_i < K, nan_i, best_i))
        else:
            tl.store(pf_ptr + 2 * part, best)
            tl.store(pi_ptr + 2 * part, best_i)
            tl.store(pi_ptr + 2 * part + 1, nan_i)


@triton.jit
def _row_combine_kernel(
    x_ptr, pred_ptr, m_ptr, inv_ptr, thr_ptr, quota_ptr, jstar_ptr, pf_ptr, pi_ptr,
    K, chunk, nsplit, sxb, sxs,
    PROB: tl.constexpr, TOPK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Row b's statistics from its chunk partials, combined in chunk order. One program per row, a small kernel
    by design: it reads at most 64 partials, and with top-k rescans only the one chunk holding the last kept tie
    (1 / nsplit of the row)."""
    b = tl.program_id(0).to(tl.int64)
    sps = tl.arange(0, BLOCK_S)
    smask = sps < nsplit
    part = b * nsplit + sps
    if PROB:
        m = tl.load(pf_ptr + 2 * part, mask=smask, other=float("-inf"))
        s = tl.load(pf_ptr + 2 * part + 1, mask=smask, other=0.0)
        m_all = tl.max(m, axis=0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        tl.store(m_ptr + b, m_all)
        tl.store(inv_ptr + b, 1.0 / tl.sum(s * tl.exp(m - m_safe), axis=0))
        if TOPK:
            ties = tl.load(pi_ptr + 2 * part, mask=smask, other=0)
            quota = tl.load(quota_ptr + b)
            cum = tl.cumsum(ties, axis=0)
            # the chunk where the running tie count reaches the quota, and the quota left for it
            s_hit = tl.min(tl.where(smask & (cum >= quota), sps, nsplit), axis=0)
            left = quota - tl.sum(tl.where(sps < s_hit, ties, 0), axis=0)
            thr = tl.load(thr_ptr + b)
            lo = tl.minimum(s_hit * chunk, K)  # no such chunk (a NaN threshold): an empty rescan, jstar = K
            hi = tl.minimum(lo + chunk, K)
            row = x_ptr + b * sxb
            lanes = tl.arange(0, BLOCK)
            seen = tl.cast(0, tl.int32)
            jstar = tl.cast(K, tl.int32)
            for k0 in range(lo, hi, BLOCK):
                offs = k0 + lanes
                valid = offs < hi
                v = tl.load(row + offs.to(tl.int64) * sxs, mask=valid, other=float("-inf")).to(tl.float32)
                eq = valid & (v == thr)
                rank = seen + tl.cumsum(eq.to(tl.int32), axis=0)
                jstar = tl.minimum(jstar, tl.min(tl.where(eq & (rank == left), offs, K), axis=0))
                seen += tl.sum(eq.to(tl.int32), axis=0)
            tl.store(jstar_ptr + b, jstar)
    else:
        best = tl.load(pf_ptr + 2 * part, mask=smask, other=float("-inf"))
        best_i = tl.load(pi_ptr + 2 * part, mask=smask, other=0)
        nan_i = tl.min(tl.load(pi_ptr + 2 * part + 1, mask=smask, other=K), axis=0)
        top = tl.max(best, axis=0)
        # the first chunk holding the maximum has its first index; an all -inf row gives index 0
        idx = tl.min(tl.where(smask & (best == top), best_i, K), axis=0)
        idx = tl.where(top == float("-inf"), 0, idx)
        tl.store(pred_ptr + b, tl.where(nan_i < K, nan_i, idx))


@triton.jit
def _hist_kernel(
    out_ptr, part_ptr, x_ptr, pred_ptr, perm_ptr, start_ptr, m_ptr, inv_ptr, thr_ptr, jstar_ptr,
    K, T, n_sblk, S, sxb, sxs, so0, so1,
    PROB: tl.constexpr, TOPK: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = pid % n_sblk
    t = (pid // n_sblk).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    src = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    svalid = src < K
    src64 = src.to(tl.int64)
    start = tl.load(start_ptr + t)
    end = tl.load(start_ptr + t + 1)
    chunk = (end - start + S - 1) // S
    lo = start + sp * chunk
    hi = tl.minimum(lo + chunk, end)
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jv = j < hi
        b = tl.load(perm_ptr + j, mask=jv, other=0)
        tile = jv[:, None] & svalid[None, :]
        if PROB:
            v = tl.load(x_ptr + b[:, None] * sxb + src64[None, :] * sxs, mask=tile, other=float("-inf"))
            v = v.to(tl.float32)
            mb = tl.load(m_ptr + b, mask=jv, other=0.0)
            ib = tl.load(inv_ptr + b, mask=jv, other=0.0)
            p = tl.exp(v - mb[:, None]) * ib[:, None]
            keep = tile
            if TOPK:
                th = tl.load(thr_ptr + b, mask=jv, other=0.0)
                js = tl.load(jstar_ptr + b, mask=jv, other=0)
                keep = keep & ((v > th[:, None]) | ((v == th[:, None]) & (src[None, :] <= js[:, None])))
            acc += tl.sum(tl.where(keep, p, 0.0), axis=0)
        else:
            pr = tl.load(pred_ptr + b, mask=jv, other=-1)
            acc += tl.sum(tl.where(tile & (pr[:, None] == src64[None, :]), 1.0, 0.0), axis=0)
    if DIRECT:
        # the only program writing out[s_block, t]: read-modify-write the cells this batch touched
        w = svalid & (acc != 0.0)
        o_ptrs = out_ptr + src64 * so0 + t * so1
        o = tl.load(o_ptrs, mask=w, other=0.0)
        tl.store(o_ptrs, o + acc, mask=w)
    else:
        tl.store(part_ptr + (sp * T + t) * K + src64, acc, mask=svalid)


@triton.jit
def _reduce_kernel(out_ptr, part_ptr, K, T, S, so0, so1, BLOCK: tl.constexpr):
    """out[s, t] += sum over splits, in split order, of part[split, t, s]."""
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n = K * T
    valid = f < n
    t = f // K
    s = f % K
    acc = tl.zeros((BLOCK,), tl.float32)
    for sp in range(S):
        acc += tl.load(part_ptr + tl.cast(sp, tl.int64) * n + f, mask=valid, other=0.0)
    w = valid & (acc != 0.0)
    o_ptrs = out_ptr + s * so0 + t * so1
    o = tl.load(o_ptrs, mask=w, other=0.0)
    tl.store(o_ptrs, o + acc, mask=w)


def choose_splits(K: int, T: int, n_sblk: int, B: int) -> int:
    """How many programs share one class: enough programs to fill a GPU when T * n_sblk is small, each with at
    least a few tiles of samples (B bounds a class's size: no host sync to count them), and only while the
    (splits, T, K) float32 partials stay under 64 MiB."""
    base = T * n_sblk
    if base >= TARGET_PROGRAMS or B <= 4 * BLOCK_N:
        return 1
    splits = min(triton.cdiv(TARGET_PROGRAMS, base), triton.cdiv(B, 4 * BLOCK_N), MAX_SPLITS)
    while splits > 1 and splits * K * T * 4 > MAX_PARTIAL_BYTES:
        splits //= 2
    return max(1, splits)


def row_splits(B: int, K: int, block: int) -> tuple[int, int]:
    """(nsplit, chunk) of the row pass: a row is cut into chunks (a multiple of block) until about
    ROW_TARGET_PROGRAMS programs, each chunk at least ROW_MIN_CHUNK columns."""
    n = 1
    if B < ROW_TARGET_PROGRAMS and K >= 2 * ROW_MIN_CHUNK:
        n = min(triton.cdiv(ROW_TARGET_PROGRAMS, max(B, 1)), K // ROW_MIN_CHUNK, ROW_MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(max(K, 1), n), block) * block
    return max(1, triton.cdiv(K, chunk)), chunk


def hist_grid(K: int, T: int, splits: int, block_s: int) -> tuple[int, int]:
    """The histogram kernel's grid: (source block, target) folded into axis 0 (2**31 - 1 programs; axis 1 allows
    only 65,535, fewer than a K_tgt may be), the splits (at most MAX_SPLITS) on axis 1."""
    return (triton.cdiv(K, block_s) * T, splits)


def label_histogram_accumulate(out: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, topk: int, weight: str,
                               *, splits: int | None = None) -> None:
    """out (K, T) float32, any strides, += the batch's statistic. x: (B, K) float logits (any strides) or (B,)
    integer predictions; targets (B,) integer in [0, T); topk 0 = all. ``splits`` overrides the heuristic."""
    B = targets.shape[0]
    K, T = out.shape
    if B == 0:
        return
    dev = out.device
    prob = weight == "prob"
    use_topk = prob and 0 < topk < K
    # samples grouped by class, sample order inside; the class offsets by a search of the sorted targets (a
    # bincount would size its output from the largest target: a host sync on CUDA). Targets outside [0, T)
    # (the device-side range check fails the stream) fall outside every class's range.
    sorted_t, perm = torch.sort(targets, stable=True)
    starts = torch.searchsorted(sorted_t, torch.arange(T + 1, device=dev, dtype=sorted_t.dtype))

    dummy = out  # never read: flags switch these pointers off
    pred = m = inv = thr = quota = jstar = dummy
    sxb = sxs = 0
    if x.is_floating_point():
        sxb, sxs = x.stride()
        if prob:
            m = empty_output((B,), torch.float32, dev)
            inv = empty_output((B,), torch.float32, dev)
            if use_topk:
                vals = torch.topk(x, topk, dim=1, sorted=True).values
                kth = vals[:, topk - 1:]
                thr = kth.squeeze(1).to(torch.float32).contiguous()
                quota = (topk - (vals > kth).sum(dim=1)).to(torch.int32).contiguous()
                jstar = torch.empty((B,), dtype=torch.int32, device=dev)
        else:
            pred = torch.empty((B,), dtype=torch.int32, device=dev)
        block = min(MAX_ROW_BLOCK, triton.next_power_of_2(K))
        nsplit, chunk = row_splits(B, K, block)
        pf = pi = dummy
        if nsplit > 1:
            pf = empty_output((B, nsplit, 2), torch.float32, dev)
            pi = torch.empty((B, nsplit, 2), dtype=torch.int32, device=dev)
        args = (x, pred, m, inv, thr, quota, jstar, pf, pi, K, chunk, nsplit, sxb, sxs)
        _row_stats_kernel[(B * nsplit,)](*args, PROB=prob, TOPK=use_topk, FINAL=nsplit == 1, BLOCK=block,
                                         num_warps=4)
        if nsplit > 1:
            _row_combine_kernel[(B,)](*args, PROB=prob, TOPK=use_topk, BLOCK=block,
                                      BLOCK_S=triton.next_power_of_2(nsplit), num_warps=4)
    else:
        pred = x.contiguous()

    block_s = min(MAX_BLOCK_S, triton.next_power_of_2(K))
    n_sblk = triton.cdiv(K, block_s)
    if splits is None:
        splits = choose_splits(K, T, n_sblk, B)
    direct = splits == 1
    part = dummy if direct else empty_output((splits, T, K), torch.float32, dev)
    # float32 prob + top-k on sm_90 with Triton 3.6 spills 40 B (stores + loads; 0 with 3.9): accepted and
    # budgeted in tools/aot_rules.py, a memory-bound pass where 8 warps would halve the cells per thread for nothing
    _hist_kernel[hist_grid(K, T, splits, block_s)](
        out, part, x, pred, perm, starts, m, inv, thr, jstar, K, T, n_sblk, splits, sxb, sxs, *out.stride(),
        PROB=prob, TOPK=use_topk, DIRECT=direct, BLOCK_N=BLOCK_N, BLOCK_S=block_s, num_warps=4,
    )
    if not direct:
        # K * T cells, each summing the splits' partials in order (splits * K * T * 4 bytes): blocks shrink to
        # 64 cells for about two programs per SM on a small statistic (ImageNet-1k -> 10 classes)
        block = max(64, min(1024, triton.next_power_of_2(triton.cdiv(K * T, 264))))
        _reduce_kernel[(triton.cdiv(K * T, block),)](out, part, K, T, splits, *out.stride(), BLOCK=block,
                                                     num_warps=max(1, min(4, block // 256)))

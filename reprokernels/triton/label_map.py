"""Triton kernels of ``label_map``.

Index mappings (one-to-one, many-to-one): one program per row computes the row's max and log-sum-exp in
one online pass (only for probs / log_probs), then gathers only the mapped columns: the (B, K_src) softmax is
never materialised and a vocabulary-sized row is read once. The backward writes the dense part of
d logits (-p_k * S, or 0 for raw logits) over the row, then, after a barrier, overwrites the mapped columns
with their full value, whose sparse term is summed over the targets that map to each column through an
inverse (source-sorted) table built once per call: no atomics, no write conflicts for repeated entries.

Dense mappings: a GEMM whose prologue applies the softmax / log-softmax on the fly from the row's
log-sum-exp (tl.dot in float32, input_precision="ieee"); its backward is two such GEMMs (d logits and
d mapping), the latter reducing over the batch in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty_output
from ..reference.label_map import index_weights, out_dtype

_INPUT = {"logits": 0, "probs": 1, "log_probs": 2}


@triton.jit
def _row_stats(x_row, K, s_xk, BLOCK_K: tl.constexpr):
    """(max, log sum exp(x - max)) of one row of K values, in one online pass. Kept apart rather than as
    their sum so that f(x) = (x - max) - logsum stays exact for large |x| (as torch's log_softmax does)."""
    offs = tl.arange(0, BLOCK_K)
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_row + k * s_xk, mask=k < K, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, v)
        # a lane still at -inf rescales by exp(-inf - 0) = 0 instead of exp(-inf - -inf) = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(v - m_safe)
        m = m_new
    m_all = tl.max(m, axis=0)
    m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.sum(s * tl.exp(m - m_all_safe), axis=0)
    return m_all, tl.log(total)


@triton.jit
def _apply(v, mx, ls, INPUT: tl.constexpr):
    if INPUT == 1:
        return tl.exp((v - mx) - ls)
    elif INPUT == 2:
        return (v - mx) - ls
    else:
        return v


@triton.jit
def _lm_index_fwd_kernel(
    out_ptr, lse_ptr, x_ptr, map_ptr, w_ptr,
    K, T, M, s_xb, s_xk, s_mt, s_mm,
    INPUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + b * s_xb
    if INPUT != 0:
        mx, ls = _row_stats(x_row, K, s_xk, BLOCK_K)
        tl.store(lse_ptr + 2 * b, mx)
        tl.store(lse_ptr + 2 * b + 1, ls)
    else:
        mx = 0.0
        ls = 0.0
    js = tl.arange(0, BLOCK_M)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T,), tl.float32)
        for j0 in range(0, M, BLOCK_M):
            j = j0 + js
            valid = (ts < T)[:, None] & (j < M)[None, :]
            src = tl.load(map_ptr + ts[:, None] * s_mt + j[None, :] * s_mm, mask=valid, other=-1).to(tl.int64)
            w = tl.load(w_ptr + ts[:, None] * M + j[None, :], mask=valid, other=0.0)
            v = tl.load(x_row + src * s_xk, mask=valid & (src >= 0), other=0.0).to(tl.float32)
            v = tl.where(w != 0.0, v, mx)  # unused lanes: a finite f(v), so 0 * f(v) stays 0
            acc += tl.sum(tl.where(w != 0.0, w * _apply(v, mx, ls, INPUT), 0.0), axis=1)
        tl.store(out_ptr + b * T + ts, acc, mask=ts < T)


@triton.jit
def _lm_index_bwd_kernel(
    dx_ptr, g_ptr, x_ptr, lse_ptr, srow_ptr,
    u_src_ptr, u_ptr_ptr, e_tgt_ptr, e_w_ptr, blk_ptr,
    K, T, max_deg, s_xb, s_xk, s_gb, s_gt,
    INPUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    x_row = x_ptr + b * s_xb
    dx_row = dx_ptr + b * K
    if INPUT != 0:
        mx = tl.load(lse_ptr + 2 * b)
        ls = tl.load(lse_ptr + 2 * b + 1)
        srow = tl.load(srow_ptr + b)  # probs: sum_t g_t out_t; log_probs: sum_t g_t W_t
        p = _apply(tl.load(x_row + k * s_xk, mask=kmask, other=float("-inf")).to(tl.float32), mx, ls, 1)
        dense = -p * srow
    else:
        dense = tl.zeros((BLOCK_K,), tl.float32)
    tl.store(dx_row + k, dense, mask=kmask)
    tl.debug_barrier()  # the mapped columns below overwrite some of these stores
    u0 = tl.load(blk_ptr + kb)
    u1 = tl.load(blk_ptr + kb + 1)
    for ub in range(u0, u1, BLOCK_U):
        us = ub + tl.arange(0, BLOCK_U)
        umask = us < u1
        e0 = tl.load(u_ptr_ptr + us, mask=umask, other=0)
        e1 = tl.load(u_ptr_ptr + us + 1, mask=umask, other=0)
        c = tl.zeros((BLOCK_U,), tl.float32)
        for d in range(0, max_deg):
            e = e0 + d
            em = umask & (e < e1)
            t = tl.load(e_tgt_ptr + e, mask=em, other=0).to(tl.int64)
            w = tl.load(e_w_ptr + e, mask=em, other=0.0)
            c += w * tl.load(g_ptr + b * s_gb + t * s_gt, mask=em, other=0.0).to(tl.float32)
        col = tl.load(u_src_ptr + us, mask=umask, other=0).to(tl.int64)
        if INPUT != 0:
            pc = _apply(tl.load(x_row + col * s_xk, mask=umask, other=float("-inf")).to(tl.float32), mx, ls, 1)
            if INPUT == 1:
                val = pc * (c - srow)
            else:
                val = c - pc * srow
        else:
            val = c
        tl.store(dx_row + col, val, mask=umask)


@triton.jit
def _lm_dense_fwd_kernel(
    out_ptr, x_ptr, w_ptr, lse_ptr,
    B, K, T, s_xb, s_xk, s_wk, s_wt,
    INPUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < B
    cmask = cols < T
    if INPUT != 0:
        mx = tl.load(lse_ptr + 2 * rows, mask=rmask, other=0.0)
        ls = tl.load(lse_ptr + 2 * rows + 1, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_B, BLOCK_T), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xb + k[None, :] * s_xk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if INPUT != 0:
            a = tl.where(kmask[None, :] & rmask[:, None], _apply(a, mx[:, None], ls[:, None], INPUT), 0.0)
        w = tl.load(w_ptr + k[:, None] * s_wk + cols[None, :] * s_wt, mask=kmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(a, w, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * T + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _lm_dense_dx_kernel(
    dx_ptr, g_ptr, x_ptr, w_ptr, lse_ptr, srow_ptr,
    B, K, T, s_xb, s_xk, s_wk, s_wt, s_gb, s_gt,
    INPUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    kmask = k < K
    acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)  # c = g @ W^T
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < T
        g = tl.load(g_ptr + rows[:, None] * s_gb + t[None, :] * s_gt, mask=rmask[:, None] & tmask[None, :],
                    other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + k[None, :] * s_wk + t[:, None] * s_wt, mask=tmask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(g, wt, input_precision="ieee")
    mask2 = rmask[:, None] & kmask[None, :]
    if INPUT != 0:
        mx = tl.load(lse_ptr + 2 * rows, mask=rmask, other=0.0)
        ls = tl.load(lse_ptr + 2 * rows + 1, mask=rmask, other=0.0)
        srow = tl.load(srow_ptr + rows, mask=rmask, other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xb + k[None, :] * s_xk, mask=mask2,
                    other=0.0).to(tl.float32)
        p = _apply(x, mx[:, None], ls[:, None], 1)
        if INPUT == 1:
            acc = p * (acc - srow[:, None])
        else:
            acc = acc - p * srow[:, None]
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + k[None, :], acc, mask=mask2)


@triton.jit
def _lm_dense_dw_kernel(
    dw_ptr, g_ptr, x_ptr, lse_ptr,
    B, K, T, s_xb, s_xk, s_gb, s_gt,
    INPUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    kmask = k < K
    tmask = t < T
    acc = tl.zeros((BLOCK_K, BLOCK_T), tl.float32)  # f(x)^T @ g, batch summed in a fixed order
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        a = tl.load(x_ptr + k[:, None] * s_xk + rows[None, :].to(tl.int64) * s_xb,
                    mask=kmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # (K, B) tile of x^T
        if INPUT != 0:
            mx = tl.load(lse_ptr + 2 * rows, mask=rmask, other=0.0)
            ls = tl.load(lse_ptr + 2 * rows + 1, mask=rmask, other=0.0)
            a = tl.where(kmask[:, None] & rmask[None, :], _apply(a, mx[None, :], ls[None, :], INPUT), 0.0)
        g = tl.load(g_ptr + rows[:, None] * s_gb + t[None, :] * s_gt, mask=rmask[:, None] & tmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(a, g, input_precision="ieee")
    tl.store(dw_ptr + k[:, None] * T + t[None, :], acc, mask=kmask[:, None] & tmask[None, :])


_DOT = 16  # tl.dot needs tiles of at least 16 in each dimension


def _lse(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) float32 row (max, log-sum) through the index kernel with an empty mapping (one pass per row)."""
    B, K = x.shape
    lse = empty_output((B, 2), torch.float32, x.device)
    if B:
        empty_map = torch.empty((0, 1), dtype=torch.int64, device=x.device)
        _lm_index_fwd_kernel[(B,)](lse, lse, x, empty_map, lse, K, 0, 1, *x.stride(), 1, 1, INPUT=1,
                                   BLOCK_K=_block_k(K), BLOCK_T=16, BLOCK_M=1)
    return lse


def _block_k(K: int) -> int:
    return min(2048, triton.next_power_of_2(max(K, 1)))


def label_map(logits: torch.Tensor, mapping: torch.Tensor, reduce: str, input: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (B, K_tgt), row stats (B, 2) float32 (max, log-sum), empty for raw logits)."""
    B, K = logits.shape
    dev = logits.device
    mode = _INPUT[input]
    odt = out_dtype(logits, input)
    if mapping.is_floating_point():
        T = mapping.shape[1]
        lse = _lse(logits) if mode else torch.empty((0,), dtype=torch.float32, device=dev)
        out = empty_output((B, T), torch.float32, dev)
        if B and T:
            grid = (triton.cdiv(B, 32), triton.cdiv(T, 32))
            _lm_dense_fwd_kernel[grid](out, logits, mapping, lse if mode else out, B, K, T, *logits.stride(),
                                       *mapping.stride(), INPUT=mode, BLOCK_B=32, BLOCK_T=32, BLOCK_K=32)
        elif B:
            out.zero_()
        return out.to(odt), lse
    T, M = mapping.shape
    w = index_weights(mapping, reduce, torch.float32).contiguous()
    out = empty_output((B, T), odt, dev)
    lse = empty_output((B, 2), torch.float32, dev) if mode else torch.empty((0,), dtype=torch.float32, device=dev)
    if B:
        _lm_index_fwd_kernel[(B,)](out, lse if mode else out, logits, mapping, w, K, T, M, *logits.stride(),
                                   *mapping.stride(), INPUT=mode, BLOCK_K=_block_k(K), BLOCK_T=16,
                                   BLOCK_M=min(16, triton.next_power_of_2(max(M, 1))))
    return out, lse


def _inverse_table(mapping: torch.Tensor, w: torch.Tensor, K: int, block_k: int):
    """Entries sorted by source: unique sources, their entry ranges, the entries' targets and weights, and
    each K block's range of unique sources."""
    dev = mapping.device
    T, M = mapping.shape
    flat = mapping.reshape(-1).long()
    keep = flat >= 0
    src = flat[keep]
    tgt = torch.arange(T, device=dev).repeat_interleave(M)[keep]
    wts = w.reshape(-1)[keep]
    order = torch.argsort(src, stable=True)
    src, tgt, wts = src[order], tgt[order].contiguous(), wts[order].contiguous()
    u_src, counts = torch.unique_consecutive(src, return_counts=True)
    u_ptr = torch.zeros(u_src.numel() + 1, dtype=torch.int64, device=dev)
    u_ptr[1:] = torch.cumsum(counts, 0)
    starts = torch.arange(0, triton.cdiv(K, block_k) + 1, device=dev) * block_k
    blk = torch.searchsorted(u_src, starts)
    max_deg = int(counts.max()) if counts.numel() else 0
    return u_src.contiguous(), u_ptr, tgt, wts, blk, max_deg


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
    if need_logits:
        dx = empty_output((B, K), logits.dtype, dev)
        if B and dense:
            grid = (triton.cdiv(B, 32), triton.cdiv(K, 32))
            _lm_dense_dx_kernel[grid](dx, grad, logits, mapping, lse if mode else dx, srow if mode else dx,
                                      B, K, T, *logits.stride(), *mapping.stride(), *grad.stride(), INPUT=mode,
                                      BLOCK_B=32, BLOCK_K=32, BLOCK_T=_DOT)
        elif B:
            block_k = min(1024, triton.next_power_of_2(max(K, 1)))
            w = index_weights(mapping, reduce, torch.float32)
            u_src, u_ptr, tgt, wts, blk, max_deg = _inverse_table(mapping, w, K, block_k)
            grid = (B, triton.cdiv(K, block_k))
            _lm_index_bwd_kernel[grid](dx, grad, logits, lse if mode else dx, srow if mode else dx,
                                       u_src, u_ptr, tgt, wts, blk, K, T, max_deg, *logits.stride(),
                                       *grad.stride(), INPUT=mode, BLOCK_K=block_k, BLOCK_U=16)
    if need_mapping and dense:
        dw = empty_output((K, T), torch.float32, dev)
        if B:
            grid = (triton.cdiv(K, 32), triton.cdiv(T, 32))
            _lm_dense_dw_kernel[grid](dw, grad, logits, lse if mode else dw, B, K, T, *logits.stride(),
                                      *grad.stride(), INPUT=mode, BLOCK_K=32, BLOCK_T=32, BLOCK_B=_DOT)
        else:
            dw.zero_()
        dw = dw.to(mapping.dtype)
    return dx, dw

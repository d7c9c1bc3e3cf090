"""Composite prefix attention: a batched GEMM for the prefix, ATen's flash attention for the sequence, an
exact log-sum-exp merge.

Forward
    prefix part: for each kv head, the queries of all B rows and of the Hq / Hkv query heads that share it are
        laid out as one (B * G * Lq, d) matrix and multiplied by the **un-expanded** (P, d) prefix: one batched
        GEMM over the Hkv heads (a (T, Hkv, P, d) table: rows grouped by task, one batched GEMM per task
        present). Softmax in float32 (float64 inputs: float64). The prefix is never expanded or copied to the
        batch: nothing of size B * P * d is allocated (tests/test_prefix_attention.py checks it).
    sequence part: ATen's flash attention that returns the LSE. CPU:
        ``aten._scaled_dot_product_flash_attention_for_cpu`` (GQA native). Its ``is_causal`` is top-left
        aligned, so it is used only when Lq == Lk with no padding; bottom-right causality, ``key_padding_mask``
        and ``kv_lengths`` go through its additive float ``attn_mask`` (B, 1, Lq, Lk) (it refuses bool masks).
        It returns out = 0 and LSE = 0 for a query whose keys are all masked; the LSE of such a query is set
        to -inf here, so the merge gives it weight 0. Empty sizes (B, Lq or Lk = 0; Lk = 0 crashes the ATen op
        with a floating-point exception) never reach it.
        CUDA (NOT TESTED: this project's CI has no GPU): ``aten._scaled_dot_product_efficient_attention``
        with ``compute_log_sumexp=True`` and an additive bias always given (padded to a multiple of 16 keys as
        SDPA does), keys/values repeated to Hq heads for GQA, and its backward op. The triton backend is the
        intended GPU path; use this one on CUDA only after ``tests/test_prefix_attention.py``'s GPU test.
    merge: :func:`reprokernels.reference.prefix_attention.merge_attention_states` (exact).

Backward (no autograd; every step is one ATen kernel or a GEMM)
    sequence part: the flash backward called with the **global** output and LSE: its probabilities
        exp(s - lse) and D = rowsum(dO * O) are then those of the full softmax over prefix + sequence keys, so
        dk, dv are exact and dq is the sequence keys' share of dq.
    prefix part: the same identities as GEMMs on the grouped query rows: P = exp(s - lse), dS = P (dO V^T - D),
        dq += scale dS K_p, d prefix_k = scale dS^T Q, d prefix_v = P^T dO, each reduced over all B * G * Lq
        rows inside the GEMM (deterministic; per task for a table, tasks without rows get zeros).
"""

from __future__ import annotations

import torch

from ..reference.prefix_attention import compute_dtype, lse_dtype, merge_attention_states, sequence_keep

_NEG_INF = float("-inf")


# ---------------------------------------------------------------- sequence part (ATen flash attention)


def _seq_mask(q: torch.Tensor, Lk: int, key_padding_mask, kv_lengths, causal: bool):
    """(additive mask (B, 1, Lq, Lk) in q's dtype or None, use is_causal, rows that see a key (B, 1, Lq) or None)."""
    B, _, Lq, _ = q.shape
    if causal and Lq == Lk and key_padding_mask is None and kv_lengths is None:
        return None, True, None  # top-left == bottom-right when square; every query sees its own key
    keep = sequence_keep(B, Lq, Lk, key_padding_mask, kv_lengths, causal, q.device)
    if keep is None:
        return None, False, None
    keep = keep.unsqueeze(1)
    mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, _NEG_INF)
    return mask, False, keep.any(-1)


def _cuda_bias(mask: torch.Tensor | None, q: torch.Tensor, Lk: int) -> torch.Tensor:
    """The efficient kernel's bias: (B, Hq, Lq, Lk) view of a buffer whose last dim is padded to 16 (as SDPA)."""
    B, Hq, Lq, _ = q.shape
    padded = (Lk + 15) // 16 * 16
    buf = torch.zeros(B, 1, Lq, padded, dtype=q.dtype, device=q.device)
    if mask is not None:
        buf[..., :Lk] = mask
    return buf[..., :Lk].expand(B, Hq, Lq, Lk)


def _repeat_kv(t: torch.Tensor, G: int) -> torch.Tensor:
    return t if G == 1 else t.repeat_interleave(G, dim=1)


def _seq_forward(q, k, v, mask, is_causal, scale):
    if q.device.type == "cuda":  # untested here (no GPU in CI); see the module docstring
        G = q.shape[1] // k.shape[1]
        bias = _cuda_bias(mask, q, k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, _repeat_kv(k, G), _repeat_kv(v, G), bias, True, 0.0, False, scale=scale)[:2]
        return out, lse[..., : q.shape[2]].float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                          scale=scale)
    return out, lse


def _seq_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale):
    if q.device.type == "cuda":  # untested here (no GPU in CI); see the module docstring
        B, Hq, Lq, d = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        bias = _cuda_bias(mask, q, Lk)
        lse_pad = torch.zeros(B, Hq, (Lq + 31) // 32 * 32, dtype=torch.float32, device=q.device)
        lse_pad[..., :Lq] = lse
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, _repeat_kv(k, G), _repeat_kv(v, G), bias, out, lse_pad, seed, seed, 0.0,
            [True, True, True, False], False, scale=scale)
        if G > 1:
            dk, dv = dk.view(B, Hkv, G, Lk, d).sum(2), dv.view(B, Hkv, G, Lk, d).sum(2)
        return dq, dk, dv
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------- prefix part (batched GEMMs)


def _group(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, Hq, Lq, e) -> (Hkv, B * G * Lq, e): every query row that reads kv head h, as one matrix."""
    B, Hq, Lq, e = x.shape
    return x.reshape(B, Hkv, Hq // Hkv, Lq, e).transpose(0, 1).reshape(Hkv, -1, e)


def _ungroup(y: torch.Tensor, B: int, Hq: int, Lq: int) -> torch.Tensor:
    Hkv, _, e = y.shape
    return y.reshape(Hkv, B, Hq // Hkv, Lq, e).transpose(0, 1).reshape(B, Hq, Lq, e)


def _segments(task_ids: torch.Tensor | None, B: int, T: int):
    """(row order or None, [(task, first row, number of rows)]) — rows of one task are contiguous in that order."""
    if task_ids is None:
        return None, [(None, 0, B)]
    order = torch.argsort(task_ids, stable=True)
    counts = torch.bincount(task_ids.long(), minlength=T).tolist()
    segs, start = [], 0
    for t, c in enumerate(counts):
        if c:
            segs.append((t, start, c))
        start += c
    return order, segs


def _prefix_of(prefix: torch.Tensor, t: int | None, cdt: torch.dtype) -> torch.Tensor:
    return (prefix if t is None else prefix[t]).to(cdt)  # (Hkv, P, d): one task's, never the batch's


def _prefix_forward(q, prefix_k, prefix_v, task_ids, scale, cdt):
    """(o_p (B, Hq, Lq, d) in cdt, lse_p (B, Hq, Lq) in cdt)."""
    B, Hq, Lq, d = q.shape
    Hkv = prefix_k.shape[-3]
    order, segs = _segments(task_ids, B, prefix_k.shape[0] if prefix_k.dim() == 4 else 1)
    qo = q if order is None else q[order]
    rows = Lq * (Hq // Hkv)  # rows of the grouped matrix per batch row
    qg = _group(qo.to(cdt), Hkv)
    o = torch.empty(Hkv, qg.shape[1], d, dtype=cdt, device=q.device)
    lse = torch.empty(Hkv, qg.shape[1], dtype=cdt, device=q.device)
    for t, start, count in segs:
        lo, hi = start * rows, (start + count) * rows
        s = torch.bmm(qg[:, lo:hi], _prefix_of(prefix_k, t, cdt).transpose(1, 2)).mul_(scale)
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp_(s.sub_(m.unsqueeze(-1)))
        torch.bmm(p, _prefix_of(prefix_v, t, cdt), out=o[:, lo:hi])
        lse[:, lo:hi] = m
    o = _ungroup(o, B, Hq, Lq)
    lse = _ungroup(lse.unsqueeze(-1), B, Hq, Lq).squeeze(-1)
    if order is not None:
        inv = torch.argsort(order)
        o, lse = o[inv], lse[inv]
    return o, lse


@torch.no_grad()
def prefix_attention(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Lq, d) in q's dtype, lse (B, Hq, Lq) float32 (float64 for float64 q), -inf if nothing seen)."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    cdt = compute_dtype(q, k, v, prefix_k, prefix_v)
    ldt = lse_dtype(q)
    has_prefix = prefix_k is not None and prefix_k.shape[-2] > 0
    if B == 0 or Lq == 0:
        return q.new_zeros(q.shape), torch.zeros(B, Hq, Lq, dtype=ldt, device=q.device)
    o_s = lse_s = None
    if Lk > 0:
        mask, is_causal, seen = _seq_mask(q, Lk, key_padding_mask, kv_lengths, causal)
        o_s, lse_s = _seq_forward(q, k, v, mask, is_causal, scale)
        lse_s = lse_s.to(cdt)
        if seen is not None:  # ATen gives LSE 0 (not -inf) to a query whose keys are all masked
            lse_s = lse_s.masked_fill(~seen, _NEG_INF)
            o_s = o_s.masked_fill(~seen.unsqueeze(-1), 0.0)
    if not has_prefix:
        if o_s is None:
            return q.new_zeros(q.shape), torch.full((B, Hq, Lq), _NEG_INF, dtype=ldt, device=q.device)
        return o_s.to(q.dtype).contiguous(), lse_s.to(ldt).contiguous()
    o_p, lse_p = _prefix_forward(q, prefix_k, prefix_v, task_ids, scale, cdt)
    if o_s is None:
        return o_p.to(q.dtype), lse_p.to(ldt)
    out, lse = merge_attention_states(o_p, lse_p, o_s, lse_s)
    return out.to(q.dtype).contiguous(), lse.to(ldt).contiguous()


@torch.no_grad()
def prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, out,
                              lse, causal, scale, need_q, need_k, need_v, need_pk, need_pv):
    """(dq, dk, dv, d prefix_k, d prefix_v), each None when not needed (see the module docstring)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    cdt = compute_dtype(q, k, v, prefix_k, prefix_v)
    has_prefix = prefix_k is not None and prefix_k.shape[-2] > 0
    empty = B == 0 or Lq == 0
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # no-key rows: P = 0 whatever the LSE
    dq_acc = dk = dv = None
    if (need_q or need_k or need_v) and Lk > 0 and not empty:
        mask, is_causal, _ = _seq_mask(q, Lk, key_padding_mask, kv_lengths, causal)
        flash_lse = lse_safe.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        dq_s, dk, dv = _seq_backward(grad_out.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype), flash_lse, mask,
                                     is_causal, scale)
        dq_acc = dq_s.to(cdt)
    dpk = dpv = None
    if has_prefix and not empty and (need_q or need_pk or need_pv):
        order, segs = _segments(task_ids, B, prefix_k.shape[0] if prefix_k.dim() == 4 else 1)
        perm = (lambda x: x) if order is None else (lambda x: x[order])
        g = grad_out.to(cdt)
        D = (g * out.to(cdt)).sum(-1, keepdim=True)  # (B, Hq, Lq, 1)
        qg, gg = _group(perm(q).to(cdt), Hkv), _group(perm(g), Hkv)
        Lg, Dg = _group(perm(lse_safe.to(cdt).unsqueeze(-1)), Hkv), _group(perm(D), Hkv)
        rows = Lq * (Hq // Hkv)
        dqg = torch.empty_like(qg) if need_q else None
        dpk = torch.zeros(prefix_k.shape, dtype=cdt, device=q.device) if need_pk else None
        dpv = torch.zeros(prefix_v.shape, dtype=cdt, device=q.device) if need_pv else None
        for t, start, count in segs:
            lo, hi = start * rows, (start + count) * rows
            pk, pv = _prefix_of(prefix_k, t, cdt), _prefix_of(prefix_v, t, cdt)
            qs, gs = qg[:, lo:hi], gg[:, lo:hi]
            p = torch.exp_(torch.bmm(qs, pk.transpose(1, 2)).mul_(scale).sub_(Lg[:, lo:hi]))  # (Hkv, n, P)
            if need_pv:
                (dpv if t is None else dpv[t]).copy_(torch.bmm(p.transpose(1, 2), gs))
            if need_q or need_pk:
                ds = p.mul_(torch.bmm(gs, pv.transpose(1, 2)).sub_(Dg[:, lo:hi]))  # dS, in p's storage
                if need_q:
                    torch.bmm(ds, pk, out=dqg[:, lo:hi])
                if need_pk:
                    (dpk if t is None else dpk[t]).copy_(torch.bmm(ds.transpose(1, 2), qs).mul_(scale))
        if need_q:
            dq_p = _ungroup(dqg.mul_(scale), B, Hq, Lq)
            if order is not None:
                dq_p = dq_p[torch.argsort(order)]
            dq_acc = dq_p if dq_acc is None else dq_acc.add_(dq_p)
    dq = None
    if need_q:
        dq = (dq_acc if dq_acc is not None else torch.zeros(q.shape, dtype=cdt, device=q.device)).to(q.dtype)
        dq = dq.contiguous()
    if need_k:
        dk = k.new_zeros(k.shape) if dk is None else dk.to(k.dtype).contiguous()
    else:
        dk = None
    if need_v:
        dv = v.new_zeros(v.shape) if dv is None else dv.to(v.dtype).contiguous()
    else:
        dv = None
    if need_pk and prefix_k is not None:
        dpk = prefix_k.new_zeros(prefix_k.shape) if dpk is None else dpk.to(prefix_k.dtype)
    else:
        dpk = None
    if need_pv and prefix_v is not None:
        dpv = prefix_v.new_zeros(prefix_v.shape) if dpv is None else dpv.to(prefix_v.dtype)
    else:
        dpv = None
    return dq, dk, dv, dpk, dpv

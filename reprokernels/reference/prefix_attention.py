"""Reference of the hidden-space interface: attention with prefix keys/values, and the log-sum-exp merge.

``prefix_attention``: q (B, Hq, Lq, d) attends to ``cat([prefix_k (expanded to the batch), k])`` with values
``cat([prefix_v, v])``. Query head h uses kv head h // (Hq // Hkv). Every query sees all P prefix keys; among
the sequence's own Lk keys, ``causal`` is bottom-right aligned (query i sees keys 0 ... Lk - Lq + i); keys
masked by ``key_padding_mask`` (True = keep) or at positions >= ``kv_lengths[b]`` are never seen. A query
that sees no key returns zeros and LSE = -inf, never NaN. LSE is the natural-log log-sum-exp of the scaled
scores of the keys a query sees.

This file materialises the concatenation and the boolean mask on purpose: it is the specification every
backend is tested against, not a fast path. Math runs in float32 (float64 inputs: float64).

Dtypes (every backend): ``out`` in q's dtype; ``lse`` float32 (float64 when q is float64, so that float64
gradchecks see no float32 rounding); dq/dk/dv in their inputs' dtypes; d prefix in the prefix's dtype, summed
over the batch (a (T, Hkv, P, d) table: per task, over that task's rows).
"""

from __future__ import annotations

import torch


def compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def sequence_keep(B: int, Lq: int, Lk: int, key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor | None,
                  causal: bool, device: torch.device) -> torch.Tensor | None:
    """(B, Lq, Lk) bool: which of its own keys each query sees (True = seen), or None when it sees all of them."""
    keep = None
    if causal:
        i = torch.arange(Lq, device=device).view(Lq, 1)
        j = torch.arange(Lk, device=device).view(1, Lk)
        keep = (j <= i + (Lk - Lq)).view(1, Lq, Lk).expand(B, Lq, Lk)
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool)
    elif kv_lengths is not None:
        pad = torch.arange(Lk, device=device).view(1, Lk) < kv_lengths.view(B, 1).to(torch.int64)
    if pad is not None:
        pad = pad.view(B, 1, Lk).expand(B, Lq, Lk)
        keep = pad if keep is None else keep & pad
    return keep


def _expand_prefix(prefix: torch.Tensor | None, task_ids: torch.Tensor | None, B: int) -> torch.Tensor | None:
    """(B, Hkv, P, d): the prefix of every row (the copy the fused backends never make)."""
    if prefix is None:
        return None
    if prefix.dim() == 4:
        return prefix[task_ids.long()]
    return prefix.unsqueeze(0).expand(B, *prefix.shape)


def _full_kv(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal, cdt):
    """Keys/values with the prefix in front, repeated to Hq heads, and the (B, 1, Lq, P + Lk) keep mask."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    pk, pv = _expand_prefix(prefix_k, task_ids, B), _expand_prefix(prefix_v, task_ids, B)
    P = 0 if pk is None else pk.shape[2]
    kk, vv = k.to(cdt), v.to(cdt)
    if P:
        kk = torch.cat([pk.to(cdt), kk], dim=2)
        vv = torch.cat([pv.to(cdt), vv], dim=2)
    G = Hq // Hkv
    kk, vv = kk.repeat_interleave(G, dim=1), vv.repeat_interleave(G, dim=1)
    keep_seq = sequence_keep(B, Lq, Lk, key_padding_mask, kv_lengths, causal, q.device)
    if keep_seq is None:
        keep = torch.ones(B, Lq, P + Lk, dtype=torch.bool, device=q.device)
    else:
        keep = torch.cat([torch.ones(B, Lq, P, dtype=torch.bool, device=q.device), keep_seq], dim=2)
    return kk, vv, keep.unsqueeze(1), P, G


def _probs(q, kk, keep, scale, cdt):
    """Scores -> (probabilities with masked keys exactly 0, lse with -inf where nothing is seen)."""
    s = (q.to(cdt) @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe.unsqueeze(-1))  # exp(-inf) = 0 for unseen keys, whole rows of 0 when nothing seen
    return p, lse


def prefix_attention_values(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal, scale):
    """(out, lse) in plain differentiable PyTorch (the tests take autograd of this)."""
    cdt = compute_dtype(q, k, v, prefix_k, prefix_v)
    kk, vv, keep, _, _ = _full_kv(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal, cdt)
    p, lse = _probs(q, kk, keep, scale, cdt)
    return (p @ vv).to(q.dtype), lse.to(lse_dtype(q))


def prefix_attention(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Lq, d) in q's dtype, lse (B, Hq, Lq) float32, -inf where a query sees nothing)."""
    with torch.no_grad():
        out, lse = prefix_attention_values(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths,
                                           causal, scale)
    return out.contiguous(), lse.contiguous()


def _reduce_prefix(d_full: torch.Tensor, P: int, task_ids: torch.Tensor | None, prefix: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, P + Lk, d) key/value gradient -> the prefix's: summed over rows (or per task), prefix dtype."""
    d_pre = d_full[:, :, :P]
    if prefix.dim() == 4:
        out = torch.zeros(prefix.shape, dtype=d_pre.dtype, device=d_pre.device)
        out.index_add_(0, task_ids.long(), d_pre)
    else:
        out = d_pre.sum(0)
    return out.to(prefix.dtype)


def prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, out,
                              lse, causal, scale, need_q, need_k, need_v, need_pk, need_pv):
    """(dq, dk, dv, d prefix_k, d prefix_v), each None when not needed. Written out (no autograd), so that it
    runs inside the registered op: with P = softmax probabilities (recomputed from the saved LSE),
    D_i = sum_j dO_ij O_ij, dS = P (dO V^T - D); dq = scale dS K, dK = scale dS^T q, dV = P^T dO, each key
    gradient summed over the Hq / Hkv query heads that share a kv head."""
    cdt = compute_dtype(q, k, v, prefix_k, prefix_v)
    B, _, _, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    kk, vv, keep, P, G = _full_kv(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal, cdt)
    qc, g = q.to(cdt), grad_out.to(cdt)
    s = (qc @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    L = lse.to(cdt)
    L = torch.where(torch.isinf(L), torch.zeros_like(L), L).unsqueeze(-1)
    p = torch.exp(s - L)
    D = (g * out.to(cdt)).sum(-1, keepdim=True)
    ds = p * (g @ vv.transpose(-1, -2) - D)
    dq = (ds @ kk * scale).to(q.dtype) if need_q else None
    need_kfull = need_k or need_pk
    need_vfull = need_v or need_pv
    dK = (ds.transpose(-1, -2) @ qc * scale).view(B, Hkv, G, P + Lk, d).sum(2) if need_kfull else None
    dV = (p.transpose(-1, -2) @ g).view(B, Hkv, G, P + Lk, d).sum(2) if need_vfull else None
    dk = dK[:, :, P:].to(k.dtype).contiguous() if need_k else None
    dv = dV[:, :, P:].to(v.dtype).contiguous() if need_v else None
    dpk = _reduce_prefix(dK, P, task_ids, prefix_k) if need_pk and prefix_k is not None else None
    dpv = _reduce_prefix(dV, P, task_ids, prefix_v) if need_pv and prefix_v is not None else None
    return dq, dk, dv, dpk, dpv


def merge_attention_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets (plain differentiable PyTorch).

    o_*: (..., L, d) each normalised over its own keys; lse_*: (..., L). Returns (o, lse) with
    lse = log(e^lse_a + e^lse_b) and o = (e^lse_a o_a + e^lse_b o_b) / e^lse. A -inf partition has weight 0
    (its o is ignored in the forward); two -inf give o = 0 and lse = -inf, with zero (not NaN) gradients
    (for finite o). Computed in float32 (float64 if any input is); o in the result dtype of o_a and o_b, lse in
    float32 (float64 if either lse is float64).
    """
    cdt = compute_dtype(o_a, o_b, lse_a, lse_b)
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    m = torch.maximum(la, lb).detach()  # the result does not depend on m: no gradient needed through it
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)  # 0 for a -inf partition
    s = wa + wb
    seen = s > 0
    s_safe = torch.where(seen, s, torch.ones_like(s))
    lse = torch.where(seen, m + torch.log(s_safe), torch.full_like(s, float("-inf")))
    a = torch.where((wa > 0).unsqueeze(-1), o_a.to(cdt) * (wa / s_safe).unsqueeze(-1), 0.0)
    b = torch.where((wb > 0).unsqueeze(-1), o_b.to(cdt) * (wb / s_safe).unsqueeze(-1), 0.0)
    out_dtype = torch.promote_types(o_a.dtype, o_b.dtype)
    ldt = torch.float64 if torch.float64 in (lse_a.dtype, lse_b.dtype) else torch.float32
    return (a + b).to(out_dtype), lse.to(ldt)

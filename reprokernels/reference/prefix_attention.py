"""Reference of the hidden-space interface: attention with prefix keys/values, and the log-sum-exp merge.

``prefix_attention``: q (B, Hq, Lq, d) attends to ``cat([prefix_k (expanded to the batch), k])`` with values
``cat([prefix_v, v])``. Query head h uses kv head h // (Hq // Hkv). Every query sees all P prefix keys; among
the sequence's own Lk keys, ``causal`` is bottom-right aligned (query i sees keys 0 ... Lk - Lq + i); keys
masked by ``key_padding_mask`` (True = keep) or at positions >= ``kv_lengths[b]`` are never seen. A query
that sees no key returns zeros and LSE = -inf, never NaN. LSE is the natural-log log-sum-exp of the scaled
scores of the keys a query sees.

This file materialises the concatenation and the boolean mask on purpose: it is the specification every
backend is tested against, not a fast path.

Dtypes, one rule for every backend (docs/contracts-attention.md): q, k, v share one dtype; the math runs in
float32 (float64 when q is float64) -- ``compute_dtype``; the prefix is rounded once to q's dtype before any
product (the fused kernels feed tensor cores with it; an exact upcast when q's dtype is wider, e.g. a bf16 prefix
beside float32 q), while its gradient flows straight through that rounding, is accumulated in the compute dtype
and returned in the prefix's own dtype (float32 master weights keep float32 gradients). ``out`` in q's dtype;
``lse`` float32 (float64 when q is float64, so that float64 gradchecks see no float32 rounding); dq/dk/dv in
their inputs' dtypes; d prefix summed over the batch (a (T, Hkv, P, d) table: per task, over that task's rows).

Garbage in masked keys: keys at positions >= ``kv_lengths[b]`` or under a False ``key_padding_mask`` may hold
anything (NaN, inf: a KV cache's unused slots). They are replaced by 0 (``torch.where``) before any product, so
neither a score nor ``p @ v`` ever sees them (0 * NaN would be NaN even with p = 0), and their gradients are
exactly 0. Keys hidden only by ``causal`` are real data and must be finite.
"""

from __future__ import annotations

import torch


def compute_dtype(q: torch.Tensor, *_ignored: torch.Tensor | None) -> torch.dtype:
    """The dtype of the math: float64 for float64 q, else float32 (a prefix never widens it: it is rounded to q's
    dtype first; extra arguments are accepted and ignored so call sites may pass every input)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def round_prefix(prefix: torch.Tensor, q_dtype: torch.dtype, cdt: torch.dtype) -> torch.Tensor:
    """The prefix's values rounded once to q's dtype, in ``cdt``; differentiable as the identity (straight
    through), so its gradient is never rounded to q's dtype on the way back."""
    x = prefix.to(cdt)
    if prefix.dtype == q_dtype or torch.promote_types(prefix.dtype, q_dtype) == q_dtype:
        return x  # the rounding is exact (same dtype, or q's dtype is wider)
    return x + (prefix.to(q_dtype).to(cdt) - x).detach()


def key_valid(B: int, Lk: int, key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor | None,
              device: torch.device) -> torch.Tensor | None:
    """(B, Lk) bool: the sequence keys that hold data (not padded, below kv_lengths), or None when all do."""
    if key_padding_mask is not None:
        return key_padding_mask.to(torch.bool)
    if kv_lengths is not None:
        return torch.arange(Lk, device=device).view(1, Lk) < kv_lengths.view(B, 1).to(torch.int64)
    return None


def zero_invalid(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Lk, d) keys or values with the rows of unseen keys replaced by 0 (whatever they held: NaN too)."""
    if valid is None:
        return t
    return torch.where(valid.view(valid.shape[0], 1, valid.shape[1], 1), t, torch.zeros((), dtype=t.dtype,
                                                                                      device=t.device))


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
    pad = key_valid(B, Lk, key_padding_mask, kv_lengths, device)
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
    """Keys/values with the prefix in front, repeated to Hq heads, and the (B, 1, Lq, P + Lk) keep mask. Unseen
    sequence keys/values are 0 here, whatever the inputs held."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    pk, pv = _expand_prefix(prefix_k, task_ids, B), _expand_prefix(prefix_v, task_ids, B)
    P = 0 if pk is None else pk.shape[2]
    valid = key_valid(B, Lk, key_padding_mask, kv_lengths, q.device)
    kk, vv = zero_invalid(k.to(cdt), valid), zero_invalid(v.to(cdt), valid)
    if P:
        kk = torch.cat([round_prefix(pk, q.dtype, cdt), kk], dim=2)
        vv = torch.cat([round_prefix(pv, q.dtype, cdt), vv], dim=2)
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


def merge_dtypes(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                 ) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(o dtype, lse dtype, compute dtype) of ``merge_attention_states``: o in ``promote_types(o_a, o_b)``; lse in
    float32, float64 if either lse is float64 (never 16-bit: an LSE rounded to 16 bits loses the relative
    weights); the math in float32, float64 if any input is float64."""
    o_dt = torch.promote_types(o_a.dtype, o_b.dtype)
    l_dt = torch.float64 if torch.float64 in (lse_a.dtype, lse_b.dtype) else torch.float32
    cdt = torch.float64 if torch.float64 in (o_a.dtype, o_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    return o_dt, l_dt, cdt


def merge_attention_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets (plain differentiable PyTorch).

    o_*: (..., L, d) each normalised over its own keys; lse_*: (..., L). Returns (o, lse) with
    lse = log(e^lse_a + e^lse_b) and o = (e^lse_a o_a + e^lse_b o_b) / e^lse, and these limits:

    - a -inf partition has weight 0: its o is never multiplied in (it may be NaN or inf), its o and lse get
      gradient 0; two -inf give o = 0 and lse = -inf;
    - a +inf partition beside a finite or -inf one has weight 1 (the limit lse_a -> +inf): o = its o, lse = +inf;
      two +inf have weight 1/2 each (the limit of lse_a = lse_b -> +inf): o = (o_a + o_b) / 2, lse = +inf; the
      lse inputs of a +inf row get gradient 0 (the limit does not depend on them);
    - finite lse up to the dtype's maximum never overflow (the larger one is subtracted first);
    - NaN in an lse that is not -inf, or in the o of a partition with weight > 0, propagates (NaN out).

    Dtypes: see :func:`merge_dtypes`. The forward and backward give no NaN from inputs within these limits.
    """
    o_dt, l_dt, cdt = merge_dtypes(o_a, lse_a, o_b, lse_b)
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    inf_a, inf_b = la == float("inf"), lb == float("inf")
    inf_any = inf_a | inf_b
    # +inf rows: the finite math below runs on placeholders (0), then the limit replaces it
    la_f = torch.where(inf_any, torch.zeros_like(la), la)
    lb_f = torch.where(inf_any, torch.zeros_like(lb), lb)
    m = torch.maximum(la_f, lb_f).detach()  # the result does not depend on m: no gradient needed through it
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la_f - m), torch.exp(lb_f - m)  # 0 for a -inf partition, <= 1 otherwise: no overflow
    wa = torch.where(inf_any, inf_a.to(cdt), wa)
    wb = torch.where(inf_any, inf_b.to(cdt), wb)
    s = wa + wb
    seen = s != 0  # NaN counts as seen: a NaN lse propagates instead of passing for an empty row
    s_safe = torch.where(seen, s, torch.ones_like(s))
    lse = torch.where(seen, m + torch.log(s_safe), torch.full_like(s, float("-inf")))
    lse = torch.where(inf_any, torch.full_like(s, float("inf")), lse)
    # a weight-0 partition's o is replaced before the product: 0 * NaN would be NaN, in the backward too
    use_a, use_b = (wa != 0).unsqueeze(-1), (wb != 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=cdt, device=o_a.device)
    a = torch.where(use_a, o_a.to(cdt), zero) * (wa / s_safe).unsqueeze(-1)
    b = torch.where(use_b, o_b.to(cdt), zero) * (wb / s_safe).unsqueeze(-1)
    return (a + b).to(o_dt), lse.to(l_dt)

"""Composite prefix attention: ATen's flash attention for the sequence, the prefix as flash attention against its
**un-expanded** keys (or as batched GEMMs), an exact log-sum-exp merge.

Forward
    sequence part (CPU): ``aten._scaled_dot_product_flash_attention_for_cpu`` (GQA native; it returns the LSE).
        Its ``is_causal`` is top-left aligned, and while the keys fit in its one 512-key block it computes every
        key for every query block (it skips nothing), so causal attention with Lq >= 128 and Lk <= 512 is split
        into query chunks, each against only the keys it can see: from the end, the last half of the queries,
        the quarter before them, ... down to 64 queries, the rest first (Lq = Lk = 256: [0, 64) | [64, 128) |
        [128, 256), 31 % fewer FLOPs; measured single-threaded: 14 % faster forward and 22 % faster backward
        than one call). A chunk whose causal block is square and starts at key 0 uses ``is_causal``; otherwise
        bottom-right causality, ``key_padding_mask`` and ``kv_lengths`` go through its additive float
        ``attn_mask``: a (Lq', Lk') causal block shared by the batch, (B, 1, 1, Lk) broadcast for padding alone,
        (B, 1, Lq', Lk') for both (it refuses bool masks). It returns out = 0 and LSE = 0 for a query whose keys
        are all masked; that LSE is set to -inf here (weight 0 in the merge). Queries that see no key of the
        sequence (causal with Lq > Lk) and empty sizes (B, Lq or Lk = 0; Lk = 0 crashes the ATen op with a
        floating-point exception) never reach it. Without a padding mask, and where the strides allow it, the
        calls see q, k, v (backward: also dO, O, LSE) as (B * Hkv, G, L, d) views, every kv head a batch item of
        the kernel: it allocates its outputs and zeroed gradients in (batch, L, heads, d) order, which is then
        the (B, Hkv, L, d) order of dk and dv, so they need no transposing copy (measured at the CPU training
        target: peak memory 28 -> 23 MiB, about 5 % faster single-threaded).
        CUDA (NOT TESTED: this project's CI has no GPU): ``aten._scaled_dot_product_efficient_attention``
        with ``compute_log_sumexp=True`` and an additive bias always given (padded to a multiple of 16 keys as
        SDPA does), keys/values repeated to Hq heads for GQA, and its backward op, in one call. The triton
        backend is the intended GPU path; use this one on CUDA only after ``tests/test_prefix_attention.py``'s
        GPU test.
    prefix part, "flash" plan (CPU, q and prefix both float32 or both float64, G * Lq >= 64 query rows per
        batch row and kv head): the same flash kernel with the (Hkv, P, d) prefix passed as
        ``prefix.expand(B, Hkv, P, d)``, a stride-0 view (a table: one call per run of rows with the same task),
        so the prefix is read in place, never copied to the batch.
    prefix part, "gemm" plan (every other case: GPU, half precision or mixed dtypes, short rows such as
        decoding): for each kv head, the queries of all B rows and of the Hq / Hkv query heads that share it are
        laid out as one (B * G * Lq, d) matrix and multiplied by the un-expanded (P, d) prefix: one batched GEMM
        over the Hkv heads (a (T, Hkv, P, d) table: rows grouped by task, one batched GEMM per task present).
        Softmax in float32 (float64 inputs: float64).
    Neither plan allocates anything of size B * P * d (tests/test_prefix_attention.py checks it). A prefix of
        another dtype than q is rounded once to q's dtype before its products (the contract's promotion rule).
    unseen keys: with a padding mask or kv_lengths, k and v are copied once with the unseen rows set to 0
        (``_sanitize``) before any flash call, forward and backward: they may hold NaN/inf, which an additive
        -inf mask alone would still multiply in (0 * NaN = NaN); their dk, dv come out exactly 0.
    merge, per chunk, straight into the contiguous output: lse = logaddexp(lse_p, lse_s), out = lerp(o_p, o_s,
        e^(lse_s - lse)) = e^(lse_s - lse) o_s + e^(lse_p - lse) o_p (the exact identity of
        :func:`reprokernels.reference.prefix_attention.merge_attention_states`, specialised to a finite prefix
        LSE; one pass; half precision or mixed dtypes: float32 math, one rounding).

Backward (no autograd; every step is one ATen kernel or a GEMM)
    sequence part: the flash backward of each chunk called with the **global** output and LSE: its
        probabilities exp(s - lse) and D = rowsum(dO * O) are then those of the full softmax over prefix +
        sequence keys, so dk, dv (summed over the chunks) are exact and dq is the sequence keys' share of dq.
    prefix part, "flash" plan: the flash backward once per batch row (its Hkv kv heads as the kernel's batch,
        the G query heads of each as its heads, against the (Hkv, 1, P, d) prefix: no copy of dO for G = 1) and
        with the global output and LSE: it gives that row's dq share and its d prefix, summed over the rows here
        in row order (deterministic; nothing larger than P * d per head is allocated for it). dq = the rows'
        prefix shares + the chunks' sequence shares.
    prefix part, "gemm" plan: the same identities as GEMMs on the grouped query rows: P = exp(s - lse),
        dS = P (dO V^T - D), dq += scale dS K_p, d prefix_k = scale dS^T Q, d prefix_v = P^T dO, each reduced
        over all B * G * Lq rows inside the GEMM (deterministic; per task for a table, tasks without rows get
        zeros).
"""

from __future__ import annotations

import functools
import itertools

import torch

from ..reference.prefix_attention import compute_dtype, key_valid, lse_dtype, sequence_keep, zero_invalid

_NEG_INF = float("-inf")
_FLASH_DTYPES = (torch.float32, torch.float64)
_FLASH_PREFIX_MIN_ROWS = 64  # G * Lq below this (decoding, short rows): the prefix goes through the GEMM plan
_CHUNK_MAX_KEYS = 512  # the CPU flash kernel's key block: above it, its own causal block skipping works
_CHUNK_MIN_QUERIES = 128
_CHUNK_MIN_SIZE = 64

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ---------------------------------------------------------------- sequence part, CPU (ATen flash attention)


class _Chunk:
    """Queries [a, b) against keys [0, kend): the additive mask (or None), is_causal, which rows see a key."""

    __slots__ = ("a", "b", "is_causal", "kend", "mask", "seen")

    def __init__(self, a, b, kend, mask, is_causal, seen):
        self.a, self.b, self.kend, self.mask, self.is_causal, self.seen = a, b, kend, mask, is_causal, seen


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, _NEG_INF)


def _seq_chunks(q: torch.Tensor, Lk: int, key_padding_mask, kv_lengths, causal: bool) -> list[_Chunk]:
    """The flash calls of the sequence part (CPU). Rows outside every chunk see no key of the sequence."""
    B, _, Lq, _ = q.shape
    dev = q.device
    off = Lk - Lq  # bottom-right causal: query i sees keys j <= i + off
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool)
    elif kv_lengths is not None:
        pad = torch.arange(Lk, device=dev).view(1, Lk) < kv_lengths.view(B, 1).to(torch.int64)
    if not causal:
        if pad is None:
            return [_Chunk(0, Lq, Lk, None, False, None)]
        return [_Chunk(0, Lq, Lk, _additive(pad.view(B, 1, 1, Lk), q.dtype), False, pad.any(-1).view(B, 1, 1))]
    a0 = max(0, -off)  # queries before a0 see no key
    bounds = [Lq]  # from the end: the last half of the queries, then a quarter ... while >= _CHUNK_MIN_SIZE
    if Lk <= _CHUNK_MAX_KEYS and Lq - a0 >= _CHUNK_MIN_QUERIES:
        size = (Lq - a0) // 2
        while size >= _CHUNK_MIN_SIZE and bounds[0] - size - a0 >= _CHUNK_MIN_SIZE:
            bounds.insert(0, bounds[0] - size)
            size //= 2
    bounds.insert(0, a0)
    first = None
    if pad is not None:  # index of each row's first kept key (Lk if none)
        idx = torch.arange(Lk, device=dev).view(1, Lk).expand(B, Lk)
        first = torch.where(pad, idx, Lk).amin(-1) if Lk else torch.zeros(B, dtype=torch.int64, device=dev)
    chunks = []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        kend = b + off
        if pad is None and a + off == 0:  # a square causal block from key 0: top-left == bottom-right
            chunks.append(_Chunk(a, b, kend, None, True, None))
            continue
        i = torch.arange(a, b, device=dev).view(b - a, 1)
        keep = torch.arange(kend, device=dev).view(1, kend) <= i + off  # (b - a, kend)
        seen = None
        if pad is not None:
            keep = keep.view(1, 1, b - a, kend) & pad[:, :kend].view(B, 1, 1, kend)
            seen = (first.view(B, 1) <= torch.arange(a, b, device=dev).view(1, b - a) + off).view(B, 1, b - a)
        chunks.append(_Chunk(a, b, kend, _additive(keep, q.dtype), False, seen))
    return chunks


# ---------------------------------------------------------------- sequence part, CUDA (untested, see docstring)


def _cuda_seq_mask(q: torch.Tensor, Lk: int, key_padding_mask, kv_lengths, causal: bool):
    """(additive mask (B, 1, Lq, Lk) in q's dtype or None, rows that see a key (B, 1, Lq) or None)."""
    B, _, Lq, _ = q.shape
    keep = sequence_keep(B, Lq, Lk, key_padding_mask, kv_lengths, causal, q.device)
    if keep is None:
        return None, None
    keep = keep.unsqueeze(1)
    return _additive(keep, q.dtype), keep.any(-1)


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


def _cuda_seq_forward(q, k, v, mask, scale):
    G = q.shape[1] // k.shape[1]
    bias = _cuda_bias(mask, q, k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, _repeat_kv(k, G), _repeat_kv(v, G), bias, True, 0.0, False, scale=scale)[:2]
    return out, lse[..., : q.shape[2]].float()


def _cuda_seq_backward(grad_out, q, k, v, out, lse, mask, scale):
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bias = _cuda_bias(mask, q, Lk)
    lse_pad = torch.zeros(B, Hq, (Lq + 31) // 32 * 32, dtype=torch.float32, device=q.device)
    lse_pad[..., :Lq] = lse
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out.contiguous(), q, _repeat_kv(k, G), _repeat_kv(v, G), bias, out, lse_pad, seed, seed, 0.0,
        [True, True, True, False], False, scale=scale)
    if G > 1:
        dk, dv = dk.view(B, Hkv, G, Lk, d).sum(2), dv.view(B, Hkv, G, Lk, d).sum(2)
    return dq, dk, dv


# ---------------------------------------------------------------- sequence part: one list of (rows, out, lse)


def _fold(t: torch.Tensor, Hkv: int) -> torch.Tensor | None:
    """(B, H, L, ...) -> (B * Hkv, H // Hkv, L, ...) as a view, None where the strides forbid it (e.g. (B, L, H, d)
    projections). Every kv head is then a batch item of the flash kernel, whose outputs (and zeroed gradients)
    come out in (B, Hkv, L, d) order: dk, dv need no transposing copy."""
    try:
        return t.view(t.shape[0] * Hkv, t.shape[1] // Hkv, *t.shape[2:])
    except RuntimeError:
        return None


def _seq_layout(tensors, Hkv: int, padded: bool):
    """(the tensors as the flash calls take them, folded?): folded (see :func:`_fold`) unless a per-row padding
    mask is needed (its rows are per batch row, not per kv head) or a stride forbids it."""
    if not padded:
        folded = [_fold(t, Hkv) for t in tensors]
        if all(t is not None for t in folded):
            return folded, True
    return list(tensors), False


def _seq_forward_parts(q, k, v, key_padding_mask, kv_lengths, causal, scale):
    """[(a, b, o_s rows [a, b) (B, Hkv, G, b - a, d), lse_s (B, Hkv, G, b - a) with -inf where no key is seen)]."""
    B, Hq = q.shape[:2]
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if Lk == 0:
        return []
    if q.device.type == "cuda":
        mask, seen = _cuda_seq_mask(q, Lk, key_padding_mask, kv_lengths, causal)
        o, lse = _cuda_seq_forward(q, k, v, mask, scale)
        if seen is not None:
            lse = lse.masked_fill(~seen, _NEG_INF)
            o = o.masked_fill(~seen.unsqueeze(-1), 0.0)
        return [(0, q.shape[2], o.unflatten(1, (Hkv, G)), lse.unflatten(1, (Hkv, G)))]
    (qc, kc, vc), folded = _seq_layout((q, k, v), Hkv, key_padding_mask is not None or kv_lengths is not None)
    parts = []
    for c in _seq_chunks(q, Lk, key_padding_mask, kv_lengths, causal):
        o, lse = _flash_fwd(qc[:, :, c.a:c.b], kc[:, :, :c.kend], vc[:, :, :c.kend], 0.0, c.is_causal,
                            attn_mask=c.mask, scale=scale)
        if c.seen is not None:  # ATen gives LSE 0 (not -inf) and out 0 to a query whose keys are all masked
            lse = lse.masked_fill(~c.seen, _NEG_INF)
        if folded:
            parts.append((c.a, c.b, o.unflatten(0, (B, Hkv)), lse.unflatten(0, (B, Hkv))))
        else:
            parts.append((c.a, c.b, o.unflatten(1, (Hkv, G)), lse.unflatten(1, (Hkv, G))))
    return parts


# ---------------------------------------------------------------- prefix part


def _flash_prefix(q: torch.Tensor, prefix_k: torch.Tensor) -> bool:
    """The flash plan (see the module docstring) for these inputs?"""
    G = q.shape[1] // prefix_k.shape[-3]
    return (q.device.type == "cpu" and q.dtype in _FLASH_DTYPES and prefix_k.dtype == q.dtype
            and G * q.shape[2] >= _FLASH_PREFIX_MIN_ROWS)


def _task_runs(task_ids: torch.Tensor | None, B: int) -> list[tuple[int | None, int, int]]:
    """[(task or None, first row, end row)]: maximal runs of rows with the same task, in row order."""
    if task_ids is None:
        return [(None, 0, B)]
    ids = task_ids.tolist()
    runs, start = [], 0
    for i in range(1, B + 1):
        if i == B or ids[i] != ids[start]:
            runs.append((ids[start], start, i))
            start = i
    return runs


def _flash_prefix_forward(q, prefix_k, prefix_v, task_ids, scale):
    """(o_p (B, Hq, Lq, d), lse_p (B, Hq, Lq)) from the flash kernel against the stride-0 expanded prefix."""
    runs = _task_runs(task_ids, q.shape[0])
    if len(runs) == 1:  # a shared prefix, or every row on the same task
        t, B = runs[0][0], q.shape[0]
        pk, pv = (prefix_k, prefix_v) if t is None else (prefix_k[t], prefix_v[t])
        return _flash_fwd(q, pk.expand(B, *pk.shape), pv.expand(B, *pv.shape), 0.0, False, scale=scale)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q), device=q.device)
    for t, lo, hi in runs:
        pk, pv = prefix_k[t], prefix_v[t]
        o_r, lse_r = _flash_fwd(q[lo:hi], pk.expand(hi - lo, *pk.shape), pv.expand(hi - lo, *pv.shape), 0.0, False,
                                scale=scale)
        o[lo:hi], lse[lo:hi] = o_r, lse_r
    return o, lse


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


def _prefix_of(prefix: torch.Tensor, t: int | None, q_dtype: torch.dtype, cdt: torch.dtype) -> torch.Tensor:
    """(Hkv, P, d): one task's, never the batch's; rounded once to q's dtype (the contract), computed in cdt."""
    return (prefix if t is None else prefix[t]).to(q_dtype).to(cdt)


def _sanitize(k: torch.Tensor, v: torch.Tensor, key_padding_mask, kv_lengths):
    """k, v with unseen keys (padded, or past kv_lengths) set to 0: they may hold NaN or inf, which the flash
    kernels would multiply by their probability 0 (0 * NaN = NaN) in the forward and the backward. One
    copy of k and v, only when a padding mask or kv_lengths is given."""
    valid = key_valid(k.shape[0], k.shape[2], key_padding_mask, kv_lengths, k.device)
    return zero_invalid(k, valid), zero_invalid(v, valid)


def _gemm_prefix_forward(q, prefix_k, prefix_v, task_ids, scale, cdt):
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
        s = torch.bmm(qg[:, lo:hi], (_prefix_of(prefix_k, t, q.dtype, cdt) * scale).transpose(1, 2))
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp_(s.sub_(m.unsqueeze(-1)))
        torch.bmm(p, _prefix_of(prefix_v, t, q.dtype, cdt), out=o[:, lo:hi])
        lse[:, lo:hi] = m
    o = _ungroup(o, B, Hq, Lq)
    lse = _ungroup(lse.unsqueeze(-1), B, Hq, Lq).squeeze(-1)
    if order is not None:
        inv = torch.argsort(order)
        o, lse = o[inv], lse[inv]
    return o, lse


# ---------------------------------------------------------------- forward


def _merge_into(out, lse, o_p, lse_p, o_s, lse_s) -> None:
    """out, lse (views of the result rows) <- the exact merge of a finite prefix part and a sequence part:
    lse = logaddexp(lse_p, lse_s), out = o_p + w (o_s - o_p) with w = e^(lse_s - lse) (= e^(lse_s - lse) o_s +
    e^(lse_p - lse) o_p, one pass, as the two weights sum to 1)."""
    m = torch.logaddexp(lse_p, lse_s)
    w = torch.exp(lse_s - m).unsqueeze(-1)  # 0 where the row sees no key of the sequence
    lse.copy_(m)
    if out.dtype in _FLASH_DTYPES and o_p.dtype == o_s.dtype == out.dtype:
        torch.lerp(o_p, o_s, w, out=out)
    else:  # half precision or mixed: float32 math, one rounding
        out.copy_(torch.lerp(o_p.to(w.dtype), o_s.to(w.dtype), w))


@torch.no_grad()
def prefix_attention(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Lq, d) in q's dtype, lse (B, Hq, Lq) float32 (float64 for float64 q), -inf if nothing seen)."""
    B, Hq, Lq, _ = q.shape
    ldt = lse_dtype(q)
    has_prefix = prefix_k is not None and prefix_k.shape[-2] > 0
    if B == 0 or Lq == 0:
        return q.new_zeros(q.shape), torch.zeros(B, Hq, Lq, dtype=ldt, device=q.device)
    k, v = _sanitize(k, v, key_padding_mask, kv_lengths)
    o_p = lse_p = None
    if has_prefix:
        if _flash_prefix(q, prefix_k):
            o_p, lse_p = _flash_prefix_forward(q, prefix_k, prefix_v, task_ids, scale)
        else:
            o_p, lse_p = _gemm_prefix_forward(q, prefix_k, prefix_v, task_ids, scale,
                                              compute_dtype(q, k, v, prefix_k, prefix_v))
    Hkv = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=ldt, device=q.device)
    out5, lse5 = out.unflatten(1, (Hkv, Hq // Hkv)), lse.unflatten(1, (Hkv, Hq // Hkv))  # views
    if o_p is not None:
        o_p, lse_p = o_p.unflatten(1, (Hkv, Hq // Hkv)), lse_p.unflatten(1, (Hkv, Hq // Hkv))
    covered = 0
    for a, b, o_s, lse_s in _seq_forward_parts(q, k, v, key_padding_mask, kv_lengths, causal, scale):
        rows = slice(a, b)
        if o_p is None:
            out5[..., rows, :], lse5[..., rows] = o_s, lse_s
        else:
            _merge_into(out5[..., rows, :], lse5[..., rows], o_p[..., rows, :], lse_p[..., rows], o_s, lse_s)
        covered += b - a
    if covered < Lq:  # rows [0, Lq - covered) see no key of the sequence (causal with Lq > Lk, or Lk = 0)
        n = Lq - covered
        if o_p is None:
            out5[..., :n, :], lse5[..., :n] = 0.0, _NEG_INF
        else:
            out5[..., :n, :], lse5[..., :n] = o_p[..., :n, :], lse_p[..., :n]
    return out, lse


# ---------------------------------------------------------------- backward


def _seq_backward(grad_out, q, k, v, out, lse, key_padding_mask, kv_lengths, causal, scale):
    """([(a, b, the sequence keys' share of dq for rows [a, b) (B, Hkv, G, b - a, d))], dk, dv); rows outside
    every part get 0."""
    B, Hq = q.shape[:2]
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if q.device.type == "cuda":
        mask, _ = _cuda_seq_mask(q, Lk, key_padding_mask, kv_lengths, causal)
        dq_s, dk, dv = _cuda_seq_backward(grad_out, q, k, v, out, lse.float(), mask, scale)
        return [(0, q.shape[2], dq_s.unflatten(1, (Hkv, G)))], dk, dv
    (gc, qc, kc, vc, oc, lc), folded = _seq_layout((grad_out, q, k, v, out, lse), Hkv,
                                                    key_padding_mask is not None or kv_lengths is not None)
    parts, dk, dv = [], None, None
    for c in reversed(_seq_chunks(q, Lk, key_padding_mask, kv_lengths, causal)):  # the last chunk sees all keys
        rows = slice(c.a, c.b)
        dq_c, dk_c, dv_c = _flash_bwd(gc[:, :, rows], qc[:, :, rows], kc[:, :, :c.kend], vc[:, :, :c.kend],
                                      oc[:, :, rows], lc[:, :, rows], 0.0, c.is_causal, attn_mask=c.mask,
                                      scale=scale)
        if folded:  # (B * Hkv, G, rows, d); dk_c, dv_c (B * Hkv, 1, kend, d) contiguous in (B, Hkv, kend, d)
            dq_c = dq_c.unflatten(0, (B, Hkv))
            dk_c, dv_c = dk_c.reshape(B, Hkv, c.kend, -1), dv_c.reshape(B, Hkv, c.kend, -1)
        else:
            dq_c = dq_c.unflatten(1, (Hkv, G))
        parts.insert(0, (c.a, c.b, dq_c))
        if dk is None:
            if c.kend == Lk:
                dk, dv = dk_c, dv_c
                continue
            dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
            dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        dk[:, :, :c.kend].add_(dk_c)
        dv[:, :, :c.kend].add_(dv_c)
    return parts, dk, dv


def _assemble_dq(dq, parts, dq_p) -> None:
    """dq (B, Hkv, G, Lq, d) <- the sequence parts [(a, b, rows [a, b) of it)] + dq_p (None: 0), each row written
    once."""
    a0 = parts[0][0] if parts else dq.shape[-2]
    if a0:
        if dq_p is None:
            dq[..., :a0, :].zero_()
        else:
            dq[..., :a0, :].copy_(dq_p[..., :a0, :])
    for a, b, dq_s in parts:
        if dq_p is None:
            dq[..., a:b, :].copy_(dq_s)
        else:
            torch.add(dq_s, dq_p[..., a:b, :], out=dq[..., a:b, :])


def _flash_prefix_backward(grad_out, q, prefix_k, prefix_v, task_ids, out, lse, scale, dq, parts, need_pk,
                           need_pv):
    """dq (B, Hkv, G, Lq, d) <- the prefix's share + the sequence parts; (d prefix_k, d prefix_v) in
    float32/float64 or None. One flash backward per batch row, its kv heads as the kernel's batch and the G query
    heads of each as its heads (no grad_out copy for G = 1, d prefix comes out as (Hkv, P, d))."""
    Hkv = prefix_k.shape[-3]
    acc = compute_dtype(q, prefix_k)
    dpk = torch.zeros(prefix_k.shape, dtype=acc, device=q.device) if need_pk else None
    dpv = torch.zeros(prefix_v.shape, dtype=acc, device=q.device) if need_pv else None
    ids = task_ids.tolist() if task_ids is not None else None
    for b in range(q.shape[0]):
        t = None if ids is None else ids[b]
        pk, pv = (prefix_k, prefix_v) if t is None else (prefix_k[t], prefix_v[t])
        dq_b, dpk_b, dpv_b = _flash_bwd(*(x[b].unflatten(0, (Hkv, -1)) for x in (grad_out, q)), pk.unsqueeze(1),
                                        pv.unsqueeze(1), out[b].unflatten(0, (Hkv, -1)),
                                        lse[b].unflatten(0, (Hkv, -1)), 0.0, False, scale=scale)
        if dq is not None:
            dq[b].copy_(dq_b)
        if need_pk:
            (dpk if t is None else dpk[t]).add_(dpk_b[:, 0])
        if need_pv:
            (dpv if t is None else dpv[t]).add_(dpv_b[:, 0])
    if dq is not None:  # fewer, larger ops than adding the parts row by row
        for a, e, dq_s in parts:
            dq[..., a:e, :].add_(dq_s)
    return dpk, dpv


def _gemm_prefix_backward(grad_out, q, prefix_k, prefix_v, task_ids, out, lse, scale, cdt, need_q, need_pk,
                          need_pv):
    """(the prefix's share of dq (B, Hq, Lq, d) or None, d prefix_k, d prefix_v), in cdt."""
    B, Hq, Lq, _ = q.shape
    Hkv = prefix_k.shape[-3]
    order, segs = _segments(task_ids, B, prefix_k.shape[0] if prefix_k.dim() == 4 else 1)
    perm = (lambda x: x) if order is None else (lambda x: x[order])
    g = grad_out.to(cdt)
    D = (g * out.to(cdt)).sum(-1, keepdim=True)  # (B, Hq, Lq, 1)
    qg, gg = _group(perm(q).to(cdt), Hkv), _group(perm(g), Hkv)
    Lg, Dg = _group(perm(lse.to(cdt).unsqueeze(-1)), Hkv), _group(perm(D), Hkv)
    rows = Lq * (Hq // Hkv)
    dqg = torch.empty_like(qg) if need_q else None
    dpk = torch.zeros(prefix_k.shape, dtype=cdt, device=q.device) if need_pk else None
    dpv = torch.zeros(prefix_v.shape, dtype=cdt, device=q.device) if need_pv else None
    for t, start, count in segs:
        lo, hi = start * rows, (start + count) * rows
        pk, pv = _prefix_of(prefix_k, t, q.dtype, cdt), _prefix_of(prefix_v, t, q.dtype, cdt)
        qs, gs = qg[:, lo:hi], gg[:, lo:hi]
        p = torch.exp_(torch.bmm(qs, (pk * scale).transpose(1, 2)).sub_(Lg[:, lo:hi]))  # (Hkv, n, P)
        if need_pv:
            (dpv if t is None else dpv[t]).copy_(torch.bmm(p.transpose(1, 2), gs))
        if need_q or need_pk:
            ds = p.mul_(torch.bmm(gs, pv.transpose(1, 2)).sub_(Dg[:, lo:hi]))  # dS, in p's storage
            if need_q:
                torch.bmm(ds, pk * scale, out=dqg[:, lo:hi])
            if need_pk:
                (dpk if t is None else dpk[t]).copy_(torch.bmm(ds.transpose(1, 2), qs).mul_(scale))
    dq_p = None
    if need_q:
        dq_p = _ungroup(dqg, B, Hq, Lq)
        if order is not None:
            dq_p = dq_p[torch.argsort(order)]
    return dq_p, dpk, dpv


@torch.no_grad()
def prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, out,
                              lse, causal, scale, need_q, need_k, need_v, need_pk, need_pv):
    """(dq, dk, dv, d prefix_k, d prefix_v), each None when not needed (see the module docstring)."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    cdt = compute_dtype(q, k, v, prefix_k, prefix_v)
    has_prefix = prefix_k is not None and prefix_k.shape[-2] > 0
    empty = B == 0 or Lq == 0
    if not has_prefix:  # rows that see no key: P = 0 whatever the LSE (with a prefix every LSE is finite)
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    flash_prefix = has_prefix and _flash_prefix(q, prefix_k)
    parts, dk, dv = [], None, None
    if (need_q or need_k or need_v) and Lk > 0 and not empty:
        k, v = _sanitize(k, v, key_padding_mask, kv_lengths)
        parts, dk, dv = _seq_backward(grad_out, q, k, v, out, lse, key_padding_mask, kv_lengths, causal, scale)
    # dq in q's dtype when every part computes in it, else float32/float64; each of its rows written once
    dq = torch.empty(q.shape, dtype=q.dtype if flash_prefix or not has_prefix else cdt, device=q.device) \
        if need_q else None
    dq5 = None if dq is None else dq.unflatten(1, (k.shape[1], -1))  # (B, Hkv, G, Lq, d) view
    dq_p = dpk = dpv = None
    dq_done = False
    if has_prefix and not empty and (need_q or need_pk or need_pv):
        if flash_prefix:  # writes dq row by row
            dpk, dpv = _flash_prefix_backward(grad_out, q, prefix_k, prefix_v, task_ids, out, lse, scale, dq5,
                                              parts, need_pk, need_pv)
            dq_done = True
        else:
            dq_p, dpk, dpv = _gemm_prefix_backward(grad_out, q, prefix_k, prefix_v, task_ids, out, lse, scale, cdt,
                                                   need_q, need_pk, need_pv)
            dq_p = None if dq_p is None else dq_p.unflatten(1, (k.shape[1], -1))
    if need_q and not dq_done:
        _assemble_dq(dq5, parts, dq_p)
    dq = dq.to(q.dtype) if need_q else None
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


# --- small CPU problems: the concatenation the user's code makes, as plain autograd ------------------------------
#
# The plan above is one ATen flash call per causal chunk and per task run, an LSE merge and a hand-written backward:
# about a hundred small ATen calls and their Python, 300 us before any arithmetic. Where the prefix copied to every
# row is small, PEFT's own chain (expand, cat, one SDPA call, autograd's backward) is faster, so auto on CPU takes
# it there (``ops/prefix_attention.py``: ``CONCAT_MAX_KEYS``); same math, same masks.
CONCAT_MAX_KEYS = 1 << 20  # B * Hkv * (P + Lk) * d elements of the concatenated keys, at most


_CACHED_ORDER_MAX = 1 << 16  # masks of at most 64 KiB are remembered (64 of them: at most 4 MiB)


@functools.lru_cache(maxsize=64)
def _causal_order(Lq: int, S: int, P: int, device: torch.device | None = None) -> torch.Tensor:
    """(Lq, S) bool: query i sees the own keys j <= i + Lk - Lq, i.e. s <= i + S - Lq, and every prefix key (s < P).
    Remembered per size on the CPU (four ATen calls, ~15 us a call at small sizes; read-only: SDPA reads it and
    ``mask & order`` makes a new tensor). Made outside inference mode: a mask remembered from an inference call is
    a normal tensor for the later calls that record a backward."""
    with torch.inference_mode(False):
        last = (torch.arange(Lq, device=device) + (S - Lq)).clamp_(min=P - 1)
        return torch.arange(S, device=device).view(1, S) <= last.view(Lq, 1)


def concat_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                task_ids: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                kv_lengths: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """(B, Hq, Lq, d) prefix attention as one ``F.scaled_dot_product_attention`` over ``cat([prefix, k])``.

    q (B, Hq, Lq, d), k, v (B, Hkv, Lk, d), prefix_k/v (Hkv, P, d) or (T, Hkv, P, d) with task_ids (B,), all of
    one dtype, P >= 1 (so every query sees a key and no row of the softmax is empty). Unseen keys (padding,
    kv_lengths) are replaced by 0 before the product, so whatever they hold never reaches the output, and their
    gradients are 0. Differentiable in every float input through autograd (the prefix's gradient summed over rows).
    """
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    S = P + Lk
    # As few ATen calls as the chain allows (each costs several us at these sizes, as much as the arithmetic): one
    # validity test over the concatenated key axis (seen: (B, S), the prefix always) serves as the mask, and its
    # sequence part zeroes the unseen keys and values before the concatenation (k and v alone: not the prefix).
    if key_padding_mask is not None:
        seen = torch.cat((torch.ones(B, P, dtype=torch.bool, device=q.device), key_padding_mask.to(torch.bool)), 1)
    elif kv_lengths is not None:
        seen = torch.arange(S, device=q.device) < (kv_lengths.view(B, 1).to(torch.int64) + P)
    else:
        seen = None
    mask = None
    if seen is not None:
        own = seen[:, P:].view(B, 1, Lk, 1)
        k, v = torch.where(own, k, 0.0), torch.where(own, v, 0.0)
        mask = seen.view(B, 1, 1, S)
    if prefix_k.dim() == 4:
        rows = task_ids.long()
        pk, pv = prefix_k[rows], prefix_v[rows]
    else:
        pk, pv = prefix_k.expand(B, Hkv, P, prefix_k.shape[-1]), prefix_v.expand(B, Hkv, P, prefix_v.shape[-1])
    keys, values = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
    if causal and Lq > 1:
        small = q.is_cpu and Lq * S <= _CACHED_ORDER_MAX
        order = _causal_order(Lq, S, P) if small else _causal_order.__wrapped__(Lq, S, P, q.device)
        mask = order if mask is None else mask & order
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                                            enable_gqa=Hq != Hkv)

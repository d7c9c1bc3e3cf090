"""cpu backend of ``prefix_attention``: the decode forward, tensors -> ``PrefixAttnParams`` ->
csrc/cpu/prefix_attention.cpp.

Scope: at most ``MAX_LQ`` = 16 queries per row (decoding against a KV cache, short prefills), no backward (the op
layer refuses gradients on this backend and auto keeps them on composite), q/k/v float32/float16/bfloat16 with a
prefix in any of the three (rounded once to q's dtype, as the reference does), a shared (Hkv, P, d) prefix or a
(T, Hkv, P, d) table with ``task_ids``, kv_lengths or a key-padding mask, causal or not, GQA, any strides.

Work items are (kv head, block of batch rows): a shared prefix is read once per block of ``rows_per_item`` rows
(every query of the block's rows and of the head's GQA group against each staged chunk of prefix keys), not once
per row as concatenating it to every row's keys does.
"""

from __future__ import annotations

import torch

from .. import _cpu
from .._alloc import empty_output
from . import DTYPE_CODES, check_cpu, float_code

MAX_LQ = 16
# query rows (rows x GQA group x Lq) an item takes against one staging of the prefix: the scores of a block stay
# in L2 beside the staged keys
ITEM_QUERY_ROWS = 64
# floats of scores (query rows x (P + Lk)) one work item holds at a time, per thread: rows per item are fewer, and
# the kernel splits an item's rows into parts, so a long cache with many queries per kv head stays within 16 MiB
SCORE_BUDGET = 1 << 22
LEN_CODES = {torch.int64: 0, torch.int32: 1, torch.int16: 2, torch.int8: 3, torch.uint8: 4}


def unsupported(q: torch.Tensor) -> str:
    """Why the cpu kernel cannot serve a call with these queries ("" when it can)."""
    if q.shape[2] > MAX_LQ:
        return (f"the cpu backend of prefix_attention serves decoding with at most {MAX_LQ} queries per row, got "
                f"Lq={q.shape[2]} (prefill and training: backend='composite')")
    if q.dtype not in DTYPE_CODES:
        return f"the cpu backend supports float32, float16 and bfloat16, got {q.dtype} (backend='composite')"
    return ""


def rows_per_item(B: int, Hq: int, Hkv: int, Lq: int, S: int, table: bool) -> int:
    """Batch rows per work item: as many as share a staging of the prefix within ITEM_QUERY_ROWS query rows and
    SCORE_BUDGET floats of scores (S = P + Lk keys). With fewer items than threads the kernel splits an item's rows
    into parts itself (a per-row sum never depends on either: any value gives the same bits)."""
    if table:
        return 1
    per_row = (Hq // Hkv) * Lq
    return max(1, min(B, ITEM_QUERY_ROWS // max(per_row, 1), SCORE_BUDGET // max(per_row * S, 1)))


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
                     prefix_v: torch.Tensor | None, task_ids: torch.Tensor | None,
                     key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor | None, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode forward: (out (B, Hq, Lq, d) contiguous in q's dtype, lse (B, Hq, Lq) float32, -inf where a query
    sees nothing). Shapes are validated by the op layer; task_ids and kv_lengths are range-checked by the kernel
    (``_cpu.IndexRangeError``)."""
    check_cpu(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, task_ids=task_ids,
              key_padding_mask=key_padding_mask, kv_lengths=kv_lengths)
    why = unsupported(q)
    if why:
        raise ValueError(f"q: {why}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    out = empty_output((B, Hq, Lq, D), q.dtype, q.device)
    lse = empty_output((B, Hq, Lq), torch.float32, q.device)
    if out.numel() == 0:
        if lse.numel():  # d = 0 is refused by the op; kept total: nothing seen
            lse.fill_(float("-inf"))
        return out, lse
    q, k, v = _unit(q), _unit(k), _unit(v)
    p = _cpu.Params()
    p.B, p.Hq, p.Hkv, p.Lq, p.Lk, p.P, p.D = B, Hq, Hkv, Lq, Lk, P, D
    p.dtype = float_code(q, "q")
    float_code(k, "k")
    float_code(v, "v")
    p.q, p.k, p.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    p.q_sb, p.q_sh, p.q_sl = q.stride()[:3]
    p.k_sb, p.k_sh, p.k_sl = k.stride()[:3]
    p.v_sb, p.v_sh, p.v_sl = v.stride()[:3]
    keep = [q, k, v]  # tensors whose pointers the kernel reads: alive until it has run
    if P:
        pk, pv = _unit(prefix_k), _unit(prefix_v)
        keep += [pk, pv]
        p.p_dtype = float_code(pk, "prefix_k")
        float_code(pv, "prefix_v")
        p.pk, p.pv = pk.data_ptr(), pv.data_ptr()
        p.pk_st, p.pk_sh, p.pk_sl = (0, *pk.stride()[:2]) if pk.dim() == 3 else pk.stride()[:3]
        p.pv_st, p.pv_sh, p.pv_sl = (0, *pv.stride()[:2]) if pv.dim() == 3 else pv.stride()[:3]
        if pk.dim() == 4:
            p.T = pk.shape[0]
            p.task, p.task_s, p.task_dtype = task_ids.data_ptr(), task_ids.stride(0), LEN_CODES[task_ids.dtype]
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        p.kpm = kpm.data_ptr()
        p.kpm_sb, p.kpm_sl = kpm.stride()
    elif kv_lengths is not None:
        p.kv_len, p.len_s, p.len_dtype = kv_lengths.data_ptr(), kv_lengths.stride(0), LEN_CODES[kv_lengths.dtype]
    p.causal = int(bool(causal))
    p.scale = float(scale)
    p.rows_per_item = rows_per_item(B, Hq, Hkv, Lq, P + Lk, P > 0 and prefix_k.dim() == 4)
    p.score_budget = SCORE_BUDGET
    p.check_index = 1
    p.out, p.lse = out.data_ptr(), lse.data_ptr()
    _cpu.run("prefix_attention_fwd", p)
    del keep
    return out, lse


def prefix_attention_backward(*args: object, **kwargs: object) -> None:
    raise NotImplementedError("the cpu backend of prefix_attention is forward-only (decode): gradients run on "
                              "backend='composite'")

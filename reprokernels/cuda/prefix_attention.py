"""CUDA backend of ``prefix_attention`` (the decode forward) and ``merge_attention_states``: tensors ->
``PrefixAttnParams`` / ``MergeStatesParams`` -> the kernels of csrc/prefix_attention.cu.

Scope: the decode forward -- at most ``MAX_LQ`` = 16 queries per row, head dims 1 .. ``MAX_HEAD_DIM`` = 512,
float32 / float16 / bfloat16 activations with a prefix in any of the three (rounded once to the activations'
dtype, as the reference does), a shared (Hkv, P, d) prefix or a (T, Hkv, P, d) table with ``task_ids``, an own
cache with ``kv_lengths`` or a key-padding mask, causal or not, GQA. No backward: training and prefill stay on
the Triton kernels (the op layer refuses gradients on this backend and names them).

Two launches, no host sync (sizes come from shapes; the task grouping of rows is a device sort):
  1. partials: work items (task, kv head, prefix split, query block) and (row, kv head, own-key split, query
     block); each writes its queries' normalised float32 partial output and LSE over its key range into one slot
     of (NS, B * Hq * Lq, d) / (NS, B * Hq * Lq) buffers. A prefix item reads its prefix keys once for all the
     rows of its task and every head of the GQA group in its query block (16 queries at d <= 128), so a
     shared prefix is read once per kv head and split at small batch, not once per row;
  2. merge: one warp per query row combines its NS = SP + S partials in slot order (fixed: deterministic).
Splits (``splits``) are chosen from sizes so that the partial launch has about ``TARGET_BLOCKS`` blocks (two per
SM of an H200), never cutting a range below ``MIN_SPLIT_KEYS`` keys.

``emulate=True`` runs the very same per-thread C++ functions in CPU loops over CPU tensors (the ``*_host`` entry
points; warp shuffles replayed lane by lane in the device's order): how the kernel code is tested without a GPU.
The op layer never passes it, and without it CPU tensors are refused.
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import empty_output
from ._launch import DTYPE_CODES, check_devices, float_code, launch

MAX_LQ = 16
MAX_HEAD_DIM = 512
MAX_PARTS = 32
TARGET_BLOCKS = 264
MIN_SPLIT_KEYS = 128
LEN_CODES = {torch.int64: 0, torch.int32: 1}


def query_block(d: int) -> int:
    """Query rows per block of the partial kernel (its 4 warps share them)."""
    return 16 if d <= 128 else 8 if d <= 256 else 4


def key_tile(d: int) -> int:
    """Keys per shared-memory tile of the partial kernel."""
    return 32 if d <= 128 else 16 if d <= 256 else 8


def unsupported(q: torch.Tensor, k: torch.Tensor) -> str:
    """Why the decode kernels cannot serve these shapes ("" when they can)."""
    d, lq = q.shape[-1], q.shape[2]
    if lq > MAX_LQ:
        return (f"the cuda backend serves decoding with at most {MAX_LQ} queries per row, got Lq={lq} "
                "(training and prefill: backend='triton', or 'composite')")
    if d > MAX_HEAD_DIM:
        return f"the cuda backend serves head dims up to {MAX_HEAD_DIM}, got d={d} (backend='composite' serves any)"
    if q.dtype not in DTYPE_CODES:
        return f"the cuda backend supports float32, float16 and bfloat16, got {q.dtype}"
    return ""


def _splits(n_items: int, n_keys: int, tile: int) -> tuple[int, int]:
    """(number of splits, keys per split): enough splits for about TARGET_BLOCKS blocks when ``n_items`` work
    items per split are too few, never below MIN_SPLIT_KEYS keys per split; the chunk is a multiple of the key
    tile. Host sizes only (the own-key split is sized from the capacity Lk, not kv_lengths: no sync)."""
    if n_keys <= 0:
        return 1, tile
    want = max(1, min(-(-TARGET_BLOCKS // max(n_items, 1)), n_keys // MIN_SPLIT_KEYS, MAX_PARTS // 2))
    chunk = -(-n_keys // want)
    chunk = -(-chunk // tile) * tile
    return -(-n_keys // chunk), chunk


def splits(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, P: int, T: int, d: int) -> tuple[int, int, int, int]:
    """(SP, prefix keys per split, S, own keys per split) the launcher uses for these sizes."""
    G, qb, tile = Hq // Hkv, query_block(d), key_tile(d)
    SP, pchunk = (0, tile) if P == 0 else _splits(Hkv * -(-B * G * Lq // qb), P, tile)
    S, kchunk = _splits(B * Hkv * -(-G * Lq // qb), Lk, tile)
    return SP, pchunk, S, kchunk


def _task_rows(task_ids: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows grouped by task, stable; (T + 1,) offsets), on the device with no host sync."""
    sorted_ids, order = torch.sort(task_ids.long(), stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(T + 1, dtype=torch.int64, device=task_ids.device))
    return order.contiguous(), offsets.contiguous()


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(int(s) for s in t.stride())


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
                     prefix_v: torch.Tensor | None, task_ids: torch.Tensor | None,
                     key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor | None, causal: bool,
                     scale: float, *, emulate: bool = False, split: tuple[int, int, int, int] | None = None,
                     max_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode forward: (out (B, Hq, Lq, d) contiguous in q's dtype, lse (B, Hq, Lq) float32, -inf where a query
    sees nothing). Inputs are validated by the op layer (shapes, index ranges); here the kernel limits.

    ``split`` = (SP, pchunk, S, kchunk) overrides :func:`splits` and ``max_blocks`` caps the grid (blocks then
    loop over work items): both for tests that must cross splits and the grid-stride loop on small inputs."""
    check_devices(emulate, q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, task_ids=task_ids,
                  key_padding_mask=key_padding_mask, kv_lengths=kv_lengths)
    why = unsupported(q, k)
    if why:
        raise ValueError(f"q: {why}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    T = prefix_k.shape[0] if prefix_k is not None and prefix_k.dim() == 4 else 1
    dev = q.device
    out = empty_output((B, Hq, Lq, D), q.dtype, dev)
    lse = empty_output((B, Hq, Lq), torch.float32, dev)
    if out.numel() == 0:
        return out, lse
    SP, pchunk, S, kchunk = split if split is not None else splits(B, Hq, Hkv, Lq, Lk, P, T, D)
    if P == 0:
        SP = 0
    if SP + S > MAX_PARTS or S < 1 or (P and SP < 1) or (SP and SP * pchunk < P) or S * kchunk < Lk:
        raise ValueError(f"split: ({SP}, {pchunk}, {S}, {kchunk}) does not cover P={P}, Lk={Lk} in at most "
                         f"{MAX_PARTS} slots")
    ext = _cuda.extension()
    p = ext.PrefixAttnParams()
    p.B, p.Hq, p.Hkv, p.Lq, p.Lk, p.P, p.D, p.T = B, Hq, Hkv, Lq, Lk, P, D, T
    p.SP, p.pchunk, p.S, p.kchunk, p.max_blocks = SP, pchunk, S, kchunk, int(max_blocks)
    p.dtype = float_code(q, "q")
    p.q, p.k, p.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    p.q_sb, p.q_sh, p.q_sl, p.q_sd = _strides4(q)
    p.k_sb, p.k_sh, p.k_sl, p.k_sd = _strides4(k)
    p.v_sb, p.v_sh, p.v_sl, p.v_sd = _strides4(v)
    keep = []  # tensors whose pointers the launch reads: alive until it is enqueued
    if P:
        p.p_dtype = float_code(prefix_k, "prefix_k")
        float_code(prefix_v, "prefix_v")
        p.pk, p.pv = prefix_k.data_ptr(), prefix_v.data_ptr()
        spk = (0, *prefix_k.stride()) if prefix_k.dim() == 3 else tuple(prefix_k.stride())
        spv = (0, *prefix_v.stride()) if prefix_v.dim() == 3 else tuple(prefix_v.stride())
        p.pk_st, p.pk_sh, p.pk_sl, p.pk_sd = (int(s) for s in spk)
        p.pv_st, p.pv_sh, p.pv_sl, p.pv_sd = (int(s) for s in spv)
        if task_ids is not None:
            rows, offs = _task_rows(task_ids, T)
            keep += [rows, offs]
            p.rows, p.task_off = rows.data_ptr(), offs.data_ptr()
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        p.kpm = kpm.data_ptr()
        p.kpm_sb, p.kpm_sl = (int(s) for s in kpm.stride())
    if kv_lengths is not None:
        kvl = kv_lengths if kv_lengths.dtype in LEN_CODES else kv_lengths.to(torch.int32)
        kvl = kvl.contiguous()
        keep.append(kvl)
        p.kv_len, p.len_dtype = kvl.data_ptr(), LEN_CODES[kvl.dtype]
    p.causal = int(bool(causal))
    p.scale = float(scale)
    R = B * Hq * Lq
    part_o = empty_output((SP + S, R, D), torch.float32, dev)
    part_lse = empty_output((SP + S, R), torch.float32, dev)
    p.part_o, p.part_lse = part_o.data_ptr(), part_lse.data_ptr()
    p.out, p.lse = out.data_ptr(), lse.data_ptr()
    p.stream = 0 if emulate else _cuda.stream_of(q)
    launch("prefix_attention_partials", p, dev, emulate)
    launch("prefix_attention_merge", p, dev, emulate)
    del keep
    return out, lse


def prefix_attention_backward(*args: object, **kwargs: object) -> None:
    raise NotImplementedError("the cuda backend of prefix_attention is forward-only (decode): gradients run on "
                              "backend='triton' (CUDA) or 'composite'")


def _rows_view(t: torch.Tensor, lead: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """(tensor, leading sizes, leading strides) with the ``lead`` leading dims coalesced to at most 4 (copied to
    contiguous only when more remain), padded in front with size-1 dims."""
    sizes, strides = list(t.shape[:lead]), list(t.stride()[:lead])
    cs, cst = [], []
    for n, s in zip(sizes, strides, strict=True):
        if n == 1:
            continue
        if cs and cst[-1] == s * n:  # the previous dim steps over exactly this one: merge them
            cs[-1] *= n
            cst[-1] = s
        else:
            cs.append(n)
            cst.append(s)
    if len(cs) > 4:
        t = t.contiguous()
        return _rows_view(t, lead)
    pad = 4 - len(cs)
    return t, [1] * pad + cs, [0] * pad + cst


def merge_attention_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, *,
                           emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(o in promote_types(o_a, o_b), lse float32) of the exact merge (reference semantics, limits included).
    Inputs: float32 / float16 / bfloat16, any strides, shapes checked by the op layer."""
    check_devices(emulate, o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b)
    o_dt = torch.promote_types(o_a.dtype, o_b.dtype)
    shape = tuple(o_a.shape)
    D = shape[-1]
    o = empty_output(shape, o_dt, o_a.device)
    lse = empty_output(shape[:-1], torch.float32, o_a.device)
    if o.numel() == 0:
        if lse.numel():  # d = 0: nothing to weigh, the lse is still the merge of the two
            lse.copy_(torch.logaddexp(lse_a.float(), lse_b.float()))
        return o, lse
    ext = _cuda.extension()
    p = ext.MergeStatesParams()
    lead = len(shape) - 1
    # one walk of the rows for all four: their leading dims must coalesce alike, else all four are made contiguous
    views = [_rows_view(t, lead) for t in (o_a, o_b, lse_a, lse_b)]
    if any(sizes != views[0][1] for _, sizes, _ in views):
        views = [_rows_view(t.contiguous(), lead) for t in (o_a, o_b, lse_a, lse_b)]
    ts = [t for t, _, _ in views]
    p.size = views[0][1]
    p.oa_s, p.ob_s, p.la_s, p.lb_s = (strides for _, _, strides in views)
    oa, ob, la, lb = ts
    p.oa, p.ob, p.la, p.lb = (t.data_ptr() for t in ts)
    p.oa_sd, p.ob_sd = int(oa.stride(-1)), int(ob.stride(-1))
    p.oa_dtype, p.ob_dtype = float_code(oa, "o_a"), float_code(ob, "o_b")
    p.la_dtype, p.lb_dtype = float_code(la, "lse_a"), float_code(lb, "lse_b")
    p.o_dtype = DTYPE_CODES[o_dt]
    p.o, p.lse = o.data_ptr(), lse.data_ptr()
    p.R, p.D = o.numel() // D, D
    p.stream = 0 if emulate else _cuda.stream_of(o)
    launch("merge_attention_states", p, o.device, emulate)
    return o, lse

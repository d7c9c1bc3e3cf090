"""Triton kernels of ``soft_prompt_concat``.

Forward: one program writes a tile of BLOCK_R output rows x BLOCK_D features of one sample; each row is a
prompt row (from the (T, P, D) table, task chosen per sample) or a token row (gathered from the frozen
embedding table by id, or read from inputs_embeds), so every gathered row is read once and the output is
written once, with no (B, L, D) embedding in between.

Backward: the prompt gradient is a per-task reduction of the prompt slice of the incoming gradient. Rows are
grouped by task (a stable argsort) and one program per (task, prompt rows, features) sums its task's rows in
a fixed order: deterministic, no atomics. The token gradient is the inverse gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty_output


@triton.jit
def _sp_fwd_kernel(
    out_ptr, prompt_ptr, tok_ptr, ids_ptr, task_ptr, ins_ptr,
    L, P, D, V,
    s_pt, s_pp, s_pd, s_tb, s_tl, s_td, s_ib, s_il,
    scale,
    FROM_IDS: tl.constexpr, HAS_TASK: tl.constexpr, HAS_INSERT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_r = j < P + L
    valid_c = cols < D
    if HAS_INSERT:
        s = tl.load(ins_ptr + b).to(tl.int32)
    else:
        s = 0
    if HAS_TASK:
        t = tl.load(task_ptr + b).to(tl.int64)
    else:
        t = 0
    is_p = valid_r & (j >= s) & (j < s + P)
    l = tl.where(j < s, j, j - P)
    is_t = valid_r & (is_p == 0)
    if FROM_IDS:
        ids = tl.load(ids_ptr + b * s_ib + l * s_il, mask=is_t, other=0).to(tl.int64)
        is_t = is_t & (ids >= 0) & (ids < V)  # defence in depth: ids are range-checked before the launch
        tok_rows = ids * s_tb
    else:
        tok_rows = b * s_tb + l.to(tl.int64) * s_tl
    pv = tl.load(prompt_ptr + t * s_pt + ((j - s).to(tl.int64) * s_pp)[:, None] + (cols * s_pd)[None, :],
                 mask=is_p[:, None] & valid_c[None, :], other=0.0)
    tv = tl.load(tok_ptr + tok_rows[:, None] + (cols * s_td)[None, :], mask=is_t[:, None] & valid_c[None, :],
                 other=0.0)
    if HAS_SCALE:
        tv = tv.to(tl.float32) * scale
    v = tl.where(is_p[:, None], pv.to(tl.float32), tv.to(tl.float32))
    out_rows = (b * (P + L) + j.to(tl.int64)) * D
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], v, mask=valid_r[:, None] & valid_c[None, :])


@triton.jit
def _sp_bwd_prompt_kernel(
    dp_ptr, g_ptr, order_ptr, off_ptr, ins_ptr,
    P, D, s_gb, s_gj, s_gd,
    HAS_INSERT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = (p < P)[:, None] & (cols < D)[None, :]
    start = tl.load(off_ptr + t)
    end = tl.load(off_ptr + t + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for i in range(start, end):  # this task's rows, in increasing row order: a fixed summation order
        b = tl.load(order_ptr + i).to(tl.int64)
        if HAS_INSERT:
            s = tl.load(ins_ptr + b).to(tl.int64)
        else:
            s = 0
        g = tl.load(g_ptr + b * s_gb + ((s + p) * s_gj)[:, None] + (cols * s_gd)[None, :], mask=valid, other=0.0)
        acc += g.to(tl.float32)
    tl.store(dp_ptr + (t * P + p)[:, None] * D + cols[None, :], acc, mask=valid)


@triton.jit
def _sp_bwd_embeds_kernel(
    de_ptr, g_ptr, ins_ptr,
    L, P, D, s_gb, s_gj, s_gd,
    scale,
    HAS_INSERT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    l = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = (l < L)[:, None] & (cols < D)[None, :]
    if HAS_INSERT:
        s = tl.load(ins_ptr + b).to(tl.int32)
    else:
        s = 0
    j = tl.where(l < s, l, l + P).to(tl.int64)
    g = tl.load(g_ptr + b * s_gb + (j * s_gj)[:, None] + (cols * s_gd)[None, :], mask=valid, other=0.0)
    if HAS_SCALE:
        g = g.to(tl.float32) * scale
    tl.store(de_ptr + (b * L + l)[:, None] * D + cols[None, :], g, mask=valid)


def _blocks(D: int) -> tuple[int, int]:
    return 8, min(1024, triton.next_power_of_2(max(D, 1)))


def soft_prompt_concat(prompt: torch.Tensor, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                       embedding_weight: torch.Tensor | None, task_ids: torch.Tensor | None,
                       insert_at: torch.Tensor | None, embed_scale: float) -> torch.Tensor:
    """Fused forward: (B, P + L, D) contiguous in the token embeddings' dtype."""
    P, D = prompt.shape[-2], prompt.shape[-1]
    from_ids = inputs_embeds is None
    src = embedding_weight if from_ids else inputs_embeds
    B, L = input_ids.shape if from_ids else inputs_embeds.shape[:2]
    out = empty_output((B, P + L, D), src.dtype, src.device)
    if out.numel() == 0:
        return out
    sp = (0, *prompt.stride()) if prompt.dim() == 2 else prompt.stride()
    if from_ids:
        st, si, V = (src.stride(0), 0, src.stride(1)), input_ids.stride(), src.shape[0]
    else:
        st, si, V = src.stride(), (0, 0), 0
    block_r, block_d = _blocks(D)
    grid = (B, triton.cdiv(P + L, block_r), triton.cdiv(D, block_d))
    _sp_fwd_kernel[grid](
        out, prompt, src, input_ids if from_ids else out, task_ids if task_ids is not None else out,
        insert_at if insert_at is not None else out,
        L, P, D, V, *sp, *st, *si, float(embed_scale),
        FROM_IDS=from_ids, HAS_TASK=task_ids is not None, HAS_INSERT=insert_at is not None,
        HAS_SCALE=embed_scale != 1.0, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out


def soft_prompt_concat_backward(grad: torch.Tensor, prompt: torch.Tensor, task_ids: torch.Tensor | None,
                                insert_at: torch.Tensor | None, L: int, embed_scale: float, need_prompt: bool,
                                need_embeds: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d prompt in prompt's dtype, d inputs_embeds (B, L, D) in grad's dtype), each None when not needed."""
    B, PL, D = grad.shape
    P = PL - L
    dev = grad.device
    block_r, block_d = _blocks(D)
    ins = insert_at if insert_at is not None else grad
    dprompt = dembeds = None
    if need_prompt:
        dprompt = empty_output(tuple(prompt.shape), prompt.dtype, dev)
        T = prompt.shape[0] if prompt.dim() == 3 else 1
        if task_ids is not None:
            order = torch.argsort(task_ids, stable=True)
            offsets = torch.zeros(T + 1, dtype=torch.int64, device=dev)
            offsets[1:] = torch.cumsum(torch.bincount(task_ids, minlength=T), 0)
        else:
            order = torch.arange(B, device=dev)
            offsets = torch.tensor([0, B], dtype=torch.int64, device=dev)
        if dprompt.numel():
            block_p = 4
            grid = (T, triton.cdiv(P, block_p), triton.cdiv(D, block_d))
            _sp_bwd_prompt_kernel[grid](dprompt, grad, order, offsets, ins, P, D, *grad.stride(),
                                        HAS_INSERT=insert_at is not None, BLOCK_P=block_p, BLOCK_D=block_d,
                                        num_warps=4)
    if need_embeds:
        dembeds = empty_output((B, L, D), grad.dtype, dev)
        if dembeds.numel():
            grid = (B, triton.cdiv(L, block_r), triton.cdiv(D, block_d))
            _sp_bwd_embeds_kernel[grid](dembeds, grad, ins, L, P, D, *grad.stride(), float(embed_scale),
                                        HAS_INSERT=insert_at is not None, HAS_SCALE=embed_scale != 1.0,
                                        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return dprompt, dembeds

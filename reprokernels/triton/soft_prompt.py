"""Triton kernels of ``soft_prompt_concat``.

Forward: one program writes a tile of BLOCK_R output rows x BLOCK_D features of one sample; each row is a
prompt row (from the (T, P, D) table, task chosen per sample) or a token row (gathered from the frozen
embedding table by id, or read from inputs_embeds), so every gathered row is read once and the output is
written once, with no (B, L, D) embedding in between.

Backward: the prompt gradient is a per-task reduction of the prompt slice of the incoming gradient. Rows are
grouped by task (a stable argsort; per-task offsets by searchsorted, no host sync) and one program per (batch
chunk, task, prompt rows, features) sums the rows of its task that fall in its chunk, in a fixed order. With
more than one chunk the programs write float32 partials that a second pass sums in a fixed order:
deterministic, no atomics. The token gradient is the inverse gather.

Grids put the batch x row blocks on axis 0 (up to 2**31 - 1; axes 1 and 2 stop at 65535, which the row blocks
of a long P + L would pass) and only the few feature blocks on axis 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty_output


@triton.jit
def _sp_fwd_kernel(
    out_ptr, prompt_ptr, tok_ptr, ids_ptr, task_ptr, ins_ptr,
    L, P, D, V, n_r,
    s_pt, s_pp, s_pd, s_tb, s_tl, s_td, s_ib, s_il,
    scale,
    FROM_IDS: tl.constexpr, HAS_TASK: tl.constexpr, HAS_INSERT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_r).to(tl.int64)
    j = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
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
        ids = tl.load(ids_ptr + b * s_ib + l.to(tl.int64) * s_il, mask=is_t, other=0).to(tl.int64)
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
    B, T, P, D, chunk, n_p, n_d, s_gb, s_gj, s_gd,
    HAS_ORDER: tl.constexpr, HAS_INSERT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = pid % n_d
    rest = pid // n_d
    pid_p = rest % n_p
    rest = rest // n_p
    t = (rest % T).to(tl.int64)
    ck = (rest // T).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = (p < P)[:, None] & (cols < D)[None, :]
    # this program's rows: positions [start, end) of the task-sorted batch, its task's range cut to its chunk
    start = ck * chunk
    end = tl.minimum(start + chunk, B)
    if HAS_ORDER:
        start = tl.maximum(start, tl.load(off_ptr + t))
        end = tl.minimum(end, tl.load(off_ptr + t + 1))
    acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for i in range(start, end):  # increasing position: a fixed summation order
        if HAS_ORDER:
            b = tl.load(order_ptr + i).to(tl.int64)
        else:
            b = i
        if HAS_INSERT:
            s = tl.load(ins_ptr + b).to(tl.int64)
        else:
            s = 0
        g = tl.load(g_ptr + b * s_gb + ((s + p) * s_gj)[:, None] + (cols * s_gd)[None, :], mask=valid, other=0.0)
        acc += g.to(tl.float32)
    # one (T, P, D) slab per chunk; with a single chunk it is d prompt itself (cast at the store)
    tl.store(dp_ptr + ((ck * T + t) * P + p)[:, None] * D + cols[None, :], acc, mask=valid)


@triton.jit
def _sp_bwd_embeds_kernel(
    de_ptr, g_ptr, ins_ptr,
    L, P, D, n_r, s_gb, s_gj, s_gd,
    scale,
    HAS_INSERT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_r).to(tl.int64)
    l = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
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


# Grid axis 0 holds up to 2**31 - 1 programs, axes 1 and 2 only 65535.
MAX_PROGRAMS = 2**31 - 1
MAX_AXIS12 = 65535


def grid_1d(programs: int, what: str) -> tuple[int]:
    """A one-axis grid of ``programs`` programs, or a clear error (no launch) past axis 0's limit."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{what}: {programs} programs exceed a CUDA grid's {MAX_PROGRAMS} (input too large)")
    return (max(programs, 1),)


def grid_2d(rows: int, cols: int, what: str) -> tuple[int, int]:
    """(rows, cols) programs: the big extent (batch x row blocks) on axis 0, the feature blocks (D / 1024,
    below the cap for any real D) on axis 1 -- one div/mod fewer per program than folding both."""
    if cols > MAX_AXIS12:
        raise ValueError(f"{what}: {cols} feature blocks exceed a CUDA grid's axis-1 limit {MAX_AXIS12}")
    return grid_1d(rows, what)[0], max(cols, 1)


def _dense_index(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _blocks(D: int) -> tuple[int, int]:
    return 8, min(1024, triton.next_power_of_2(max(D, 1)))


# Prompt backward plan: a (T, P, D) reduction over B rows has only T * P/BLOCK_P * D/BLOCK_D programs
# (64 for one 64 x 4096 prompt). The batch is split into chunks until there are about TARGET_PROGRAMS (two per
# SM of an H100), each chunk at least MIN_CHUNK rows, and only while the float32 partials (written and read
# once: 8 bytes per element per chunk) cost at most half the bytes of the gradient slice they reduce.
BLOCK_P = 4
TARGET_PROGRAMS = 2 * 132
MIN_CHUNK = 8


def prompt_chunks(B: int, T: int, P: int, D: int, itemsize: int, target: int = TARGET_PROGRAMS,
                  min_chunk: int = MIN_CHUNK) -> tuple[int, int]:
    """(rows per chunk, number of chunks) of the prompt backward, from shapes alone (no host sync)."""
    _, block_d = _blocks(D)
    base = T * triton.cdiv(P, BLOCK_P) * triton.cdiv(D, block_d)
    want = min(triton.cdiv(target, max(base, 1)), triton.cdiv(B, min_chunk), B * itemsize // (16 * T))
    n = max(1, want)
    chunk = max(1, triton.cdiv(B, n))
    return chunk, max(1, triton.cdiv(B, chunk))


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
    # the kernels read task_ids / insert_at at element b: an expanded (stride-0) or strided (B,) index would be
    # read past its storage, so such an index is copied (B integers, no host sync)
    task_ids, insert_at = _dense_index(task_ids), _dense_index(insert_at)
    if from_ids:
        st, si, V = (src.stride(0), 0, src.stride(1)), input_ids.stride(), src.shape[0]
    else:
        st, si, V = src.stride(), (0, 0), 0
    block_r, block_d = _blocks(D)
    n_r, n_d = triton.cdiv(P + L, block_r), triton.cdiv(D, block_d)
    # 8 warps: a thread holds both candidate rows (prompt and token) of its elements; with 4 warps that is
    # 70-106 registers on sm_80/90 and a small spill in the task + insert variant, with 8 warps 48 and none
    _sp_fwd_kernel[grid_2d(B * n_r, n_d, "soft_prompt_concat")](
        out, prompt, src, input_ids if from_ids else out, task_ids if task_ids is not None else out,
        insert_at if insert_at is not None else out,
        L, P, D, V, n_r, *sp, *st, *si, float(embed_scale),
        FROM_IDS=from_ids, HAS_TASK=task_ids is not None, HAS_INSERT=insert_at is not None,
        HAS_SCALE=embed_scale != 1.0, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=8,
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
    task_ids, insert_at = _dense_index(task_ids), _dense_index(insert_at)
    ins = insert_at if insert_at is not None else grad
    dprompt = dembeds = None
    if need_prompt:
        T = prompt.shape[0] if prompt.dim() == 3 else 1
        chunk, n_chunks = prompt_chunks(B, T, P, D, grad.element_size())
        order = offsets = grad  # (unread without task_ids)
        if task_ids is not None:
            # sizes come from shapes: searchsorted over the sorted ids gives the per-task offsets without the
            # host sync of bincount (which sizes its output from the largest id); ids are range-checked before
            order = torch.argsort(task_ids, stable=True)
            offsets = torch.searchsorted(task_ids[order].to(torch.int64),
                                         torch.arange(T + 1, dtype=torch.int64, device=dev))
        dprompt = (empty_output(tuple(prompt.shape), prompt.dtype, dev) if n_chunks == 1
                   else empty_output((n_chunks, T, P, D), torch.float32, dev))
        if dprompt.numel():
            n_p, n_d = triton.cdiv(P, BLOCK_P), triton.cdiv(D, block_d)
            _sp_bwd_prompt_kernel[grid_1d(n_chunks * T * n_p * n_d, "soft_prompt_concat backward")](
                dprompt, grad, order, offsets, ins, B, T, P, D, chunk, n_p, n_d, *grad.stride(),
                HAS_ORDER=task_ids is not None, HAS_INSERT=insert_at is not None, BLOCK_P=BLOCK_P,
                BLOCK_D=block_d, num_warps=4)
        if n_chunks > 1:  # second pass over the float32 partials: torch's sum, a fixed order for given shapes
            dprompt = dprompt.sum(0).reshape(prompt.shape).to(prompt.dtype)
    if need_embeds:
        dembeds = empty_output((B, L, D), grad.dtype, dev)
        if dembeds.numel():
            n_r, n_d = triton.cdiv(L, block_r), triton.cdiv(D, block_d)
            _sp_bwd_embeds_kernel[grid_2d(B * n_r, n_d, "soft_prompt_concat backward")](
                dembeds, grad, ins, L, P, D, n_r, *grad.stride(), float(embed_scale),
                HAS_INSERT=insert_at is not None, HAS_SCALE=embed_scale != 1.0,
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return dprompt, dembeds

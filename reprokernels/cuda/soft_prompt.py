"""CUDA backend of ``soft_prompt_concat``: tensors -> ``SoftPromptParams`` -> the kernels of csrc/soft_prompt.cu.

``soft_prompt_concat`` / ``soft_prompt_concat_backward`` have the signatures every backend module has (see
``reprokernels/ops/soft_prompt.py``) and run the fused kernels on CUDA tensors, on the current stream.

``emulate=True`` runs the very same per-thread C++ functions in plain CPU loops over CPU tensors (the ``*_host``
entry points of the extension): that is how the kernel code is tested on machines without a GPU. The op layer
never passes it, and without it CPU tensors are refused, so the public call on CPU tensors with
``backend="cuda"`` keeps failing in backend selection and never falls back to the emulation.

Type plan: the prompt and the token embeddings (embedding_weight or inputs_embeds) in float32, float16 or
bfloat16, any pair; the output in the token dtype; input_ids / task_ids / insert_at in any integer dtype, read
in place with any strides. The prompt gradient is accumulated in float32 and stored in the prompt's dtype; the
inputs_embeds gradient is in grad's dtype.

Vectorisation: rows are copied in groups of 16 bytes of the output type. Whether a tensor's rows may be read
with 16-byte (or, for a narrower source, whole-group) loads is decided here from ``data_ptr()`` and the strides
(``_rows_vec``); the launcher re-checks the flags and refuses a launch where one does not hold.

Backward of the prompt: deterministic, no atomics. Samples are grouped by task with a stable argsort of
task_ids plus per-task offsets (``searchsorted`` over the sorted ids, so an id outside [0, T) is simply never
reached); each work item sums its chunk of a task's samples in increasing sample order. A single (P, D) prompt
is split into batch chunks (float32 partials, summed here by torch: deterministic) when that is needed to have
enough work items in flight; a (T, P, D) table uses one chunk per task (no host sync to size the partials).
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import empty_output
from ._launch import DTYPE_CODES, check_devices, float_code, launch

INDEX_CODES = {torch.int64: 0, torch.int32: 1, torch.int16: 2, torch.int8: 3, torch.uint8: 4}

# A single prompt's backward splits the batch into chunks only as far as needed to have about this many work
# items in flight (each chunk costs a float32 partial of the prompt's size), and never below MIN_CHUNK samples.
BWD_TARGET_ITEMS = 1 << 17
MIN_CHUNK = 8


def _index(t: torch.Tensor) -> torch.Tensor:
    """An integer index tensor as the kernels read it (any listed dtype in place; anything else as int64)."""
    return t if t.dtype in INDEX_CODES else t.to(torch.int64)


def _vec(out_dtype: torch.dtype) -> int:
    """Features per group: 16 bytes of the output type."""
    return 16 // out_dtype.itemsize


def _rows_vec(t: torch.Tensor, out_dtype: torch.dtype, feature_stride: int, row_strides: tuple[int, ...]) -> bool:
    """Rows of ``t`` may be read a group at a time: packs of min(16, VEC * size) bytes, pack-aligned base, unit
    feature stride, every row stride a whole number of packs (the launcher's rows_vectorisable)."""
    es = t.element_size()
    pack = min(16, _vec(out_dtype) * es) // es
    return t.data_ptr() % (pack * es) == 0 and feature_stride == 1 and all(s % pack == 0 for s in row_strides)


def _outs_vec(D: int, out_dtype: torch.dtype, *bufs: torch.Tensor | None) -> bool:
    """Contiguous outputs whose rows all start 16-byte aligned: D a whole number of groups, aligned bases."""
    return D % _vec(out_dtype) == 0 and all(b.data_ptr() % 16 == 0 for b in bufs if b is not None)


def _set_insert_task(p, task_ids: torch.Tensor | None, insert_at: torch.Tensor | None) -> tuple:
    """Fill the task / insert fields; returns the index tensors it pointed at (kept alive by the caller)."""
    task_k = insert_k = None
    if task_ids is not None:
        task_k = _index(task_ids)
        p.task, p.task_s, p.task_dtype = task_k.data_ptr(), task_k.stride(0), INDEX_CODES[task_k.dtype]
    if insert_at is not None:
        insert_k = _index(insert_at)
        p.insert, p.insert_s, p.insert_dtype = insert_k.data_ptr(), insert_k.stride(0), INDEX_CODES[insert_k.dtype]
    return task_k, insert_k


def soft_prompt_concat(prompt: torch.Tensor, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                       embedding_weight: torch.Tensor | None, task_ids: torch.Tensor | None,
                       insert_at: torch.Tensor | None, embed_scale: float, *, emulate: bool = False) -> torch.Tensor:
    """Fused forward: (B, P + L, D) contiguous in the token embeddings' dtype. Any input strides."""
    check_devices(emulate, prompt=prompt, input_ids=input_ids, inputs_embeds=inputs_embeds,
                   embedding_weight=embedding_weight, task_ids=task_ids, insert_at=insert_at)
    from_ids = inputs_embeds is None
    src = embedding_weight if from_ids else inputs_embeds
    assert src is not None and (not from_ids or input_ids is not None)
    P, D = prompt.shape[-2], prompt.shape[-1]
    B, L = input_ids.shape if from_ids else inputs_embeds.shape[:2]
    p = _cuda.extension().SoftPromptParams()
    p.prompt_dtype = float_code(prompt, "prompt")
    p.tok_dtype = float_code(src, "embedding_weight" if from_ids else "inputs_embeds")
    out = empty_output((B, P + L, D), src.dtype, src.device)
    if out.numel() == 0:
        return out
    p.B, p.L, p.P, p.D = B, L, P, D
    p.T = prompt.shape[0] if prompt.dim() == 3 else 1
    p.prompt = prompt.data_ptr()
    p.prompt_st, p.prompt_sp, p.prompt_sd = prompt.stride() if prompt.dim() == 3 else (0, *prompt.stride())
    p.vec_prompt = int(_rows_vec(prompt, src.dtype, p.prompt_sd, (p.prompt_st, p.prompt_sp)))
    p.tokens = src.data_ptr()
    p.from_ids = int(from_ids)
    ids_k = None
    if from_ids:
        ids_k = _index(input_ids)
        p.ids, p.ids_dtype = ids_k.data_ptr(), INDEX_CODES[ids_k.dtype]
        p.ids_sb, p.ids_sl = ids_k.stride()
        p.V = src.shape[0]
        p.tok_sv, p.tok_sd = src.stride()
        p.vec_tokens = int(_rows_vec(src, src.dtype, p.tok_sd, (p.tok_sv,)))
    else:
        p.tok_sb, p.tok_sl, p.tok_sd = src.stride()
        p.vec_tokens = int(_rows_vec(src, src.dtype, p.tok_sd, (p.tok_sb, p.tok_sl)))
    task_k, insert_k = _set_insert_task(p, task_ids, insert_at)
    p.embed_scale = float(embed_scale)
    p.out = out.data_ptr()
    p.vec_out = int(_outs_vec(D, src.dtype, out))
    p.stream = 0 if emulate else _cuda.stream_of(out)
    launch("soft_prompt_fwd", p, out.device, emulate)
    del ids_k, task_k, insert_k  # alive until the launch was enqueued (their memory is stream-ordered)
    return out


def _default_chunk(B: int, items_per_chunk: int, table: bool) -> int:
    """Samples per prompt-backward work item: the whole batch for a table (one chunk per task); for a single
    prompt as few chunks as give about BWD_TARGET_ITEMS items, of at least MIN_CHUNK samples."""
    if table or B <= MIN_CHUNK:
        return max(B, 1)
    want = max(1, -(-BWD_TARGET_ITEMS // max(items_per_chunk, 1)))
    nchunks = min(want, -(-B // MIN_CHUNK))
    return -(-B // nchunks)


def soft_prompt_concat_backward(grad: torch.Tensor, prompt: torch.Tensor, task_ids: torch.Tensor | None,
                                insert_at: torch.Tensor | None, L: int, embed_scale: float, need_prompt: bool,
                                need_embeds: bool, *, emulate: bool = False, chunk: int | None = None
                                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d prompt in prompt's dtype and shape, d inputs_embeds (B, L, D) in grad's dtype), None where not needed.

    grad (B, P + L, D) may have any strides (stride 0 included). ``chunk`` overrides the samples per prompt
    work item (tests use it to cover the partials path, also with a task table).
    """
    if not (need_prompt or need_embeds):
        return None, None
    check_devices(emulate, grad=grad, prompt=prompt, task_ids=task_ids, insert_at=insert_at)
    B, PL, D = grad.shape
    P = PL - L
    if P != prompt.shape[-2] or D != prompt.shape[-1]:
        raise ValueError(f"grad: expected (B, P + L = {prompt.shape[-2] + L}, D = {prompt.shape[-1]}), "
                         f"got {tuple(grad.shape)}")
    dev = grad.device
    grad_k = grad if grad.dtype in DTYPE_CODES else grad.to(torch.float32)
    p = _cuda.extension().SoftPromptParams()
    p.prompt_dtype = float_code(prompt, "prompt")
    p.tok_dtype = DTYPE_CODES[grad_k.dtype]
    T = prompt.shape[0] if prompt.dim() == 3 else 1
    p.B, p.L, p.P, p.D, p.T = B, L, P, D, T
    p.grad = grad_k.data_ptr()
    p.grad_sb, p.grad_sj, p.grad_sd = grad_k.stride()
    p.vec_grad = int(_rows_vec(grad_k, grad_k.dtype, p.grad_sd, (p.grad_sb, p.grad_sj)))
    task_k, insert_k = _set_insert_task(p, task_ids, insert_at)
    p.embed_scale = float(embed_scale)

    dp_buf = dembeds = order = offsets = None
    nchunks = 1
    if need_prompt:
        vec = _vec(grad_k.dtype)
        if chunk is None:
            chunk = _default_chunk(B, P * -(-D // vec), task_ids is not None)
        chunk = max(1, int(chunk))
        nchunks = max(1, -(-B // chunk))
        p.chunk, p.nchunks = chunk, nchunks
        if task_ids is not None:
            order = torch.argsort(task_k, stable=True)
            sorted_ids = task_k[order].to(torch.int64)
            offsets = torch.searchsorted(sorted_ids, torch.arange(T + 1, dtype=torch.int64, device=dev))
            p.order, p.offsets = order.data_ptr(), offsets.data_ptr()
        if nchunks == 1:
            dp_buf = empty_output(tuple(prompt.shape), prompt.dtype, dev)
        else:  # a float32 partial per chunk, written in full by the kernel
            dp_buf = empty_output((nchunks, T, P, D), torch.float32, dev)
        p.dprompt = dp_buf.data_ptr()
    if need_embeds:
        dembeds = empty_output((B, L, D), grad_k.dtype, dev)
        p.dembeds = dembeds.data_ptr()
    p.vec_out = int(_outs_vec(D, grad_k.dtype, dp_buf, dembeds))
    p.stream = 0 if emulate else _cuda.stream_of(grad)
    if (dp_buf is not None and dp_buf.numel()) or (dembeds is not None and dembeds.numel()):
        launch("soft_prompt_bwd", p, dev, emulate)
    del task_k, insert_k, order, offsets  # alive until the launch was enqueued

    dprompt = None
    if dp_buf is not None:
        dprompt = dp_buf if nchunks == 1 else dp_buf.sum(0).reshape(prompt.shape).to(prompt.dtype)
    if dembeds is not None and dembeds.dtype != grad.dtype:
        dembeds = dembeds.to(grad.dtype)
    return dprompt, dembeds

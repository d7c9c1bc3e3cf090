"""cpu backend of ``soft_prompt_concat``: tensors -> ``SoftPromptParams`` -> csrc/cpu/soft_prompt.cpp.

Forward: one thread per output row (b, j), copied from its source (an embedding-table row looked up from
input_ids, an inputs_embeds row, or the row's task prompt), scaled and cast on the way: the (B, L, D) token
embedding is never materialised. Backward: d prompt summed over the batch in sample order, one thread per
(task, prompt row), in float32, stored in the prompt's dtype; d inputs_embeds the token slices of grad times
embed_scale. Prompt / tokens / grad in float32, float16 or bfloat16, any strides (stride 0 included); index
tensors in any integer dtype, read in place.
"""

from __future__ import annotations

import torch

from .. import _cpu
from .._alloc import empty_output
from ..cuda.soft_prompt import INDEX_CODES, _index, _set_insert_task  # same parameter fields in both extensions
from . import DTYPE_CODES, case_dict, check_cpu, dtype_reason, float_code


def supports(case: tuple) -> str:
    """case keys: prompt_dtype, tokens_dtype (inputs_embeds' or embedding_weight's).

    auto takes the cpu kernels for every case they implement (docs/cpu-backend.md): token embeddings (ids with the
    gather fused, or inputs_embeds) and a prompt of any kernel dtype. Full shapes (float32, bfloat16; AVX2
    host): 5.3-7.9x PEFT's eager chain and 3.0-3.9x its torch.compile; at B4 0.9-1.1x eager, 0.9-1.6x compile.
    """
    return dtype_reason(case_dict(case), "prompt_dtype", "tokens_dtype")


def soft_prompt_concat(prompt: torch.Tensor, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                       embedding_weight: torch.Tensor | None, task_ids: torch.Tensor | None,
                       insert_at: torch.Tensor | None, embed_scale: float) -> torch.Tensor:
    check_cpu(prompt=prompt, input_ids=input_ids, inputs_embeds=inputs_embeds, embedding_weight=embedding_weight,
              task_ids=task_ids, insert_at=insert_at)
    from_ids = inputs_embeds is None
    src = embedding_weight if from_ids else inputs_embeds
    assert src is not None
    P, D = prompt.shape[-2], prompt.shape[-1]
    B, L = input_ids.shape if from_ids else inputs_embeds.shape[:2]
    p = _cpu.Params()
    p.prompt_dtype = float_code(prompt, "prompt")
    p.tok_dtype = float_code(src, "embedding_weight" if from_ids else "inputs_embeds")
    out = empty_output((B, P + L, D), src.dtype, src.device)
    if out.numel() == 0:
        return out
    p.B, p.L, p.P, p.D = B, L, P, D
    p.T = prompt.shape[0] if prompt.dim() == 3 else 1
    p.prompt = prompt.data_ptr()
    p.prompt_st, p.prompt_sp, p.prompt_sd = prompt.stride() if prompt.dim() == 3 else (0, *prompt.stride())
    p.tokens = src.data_ptr()
    p.from_ids = int(from_ids)
    ids_k = None
    if from_ids:
        ids_k = _index(input_ids)
        p.ids, p.ids_dtype = ids_k.data_ptr(), INDEX_CODES[ids_k.dtype]
        p.ids_sb, p.ids_sl = ids_k.stride()
        p.V = src.shape[0]
        p.tok_sv, p.tok_sd = src.stride()
    else:
        p.tok_sb, p.tok_sl, p.tok_sd = src.stride()
    task_k, insert_k = _set_insert_task(p, task_ids, insert_at)
    p.embed_scale = float(embed_scale)
    p.out = out.data_ptr()
    p.check_index = 1  # ids, task ids and insert positions range-checked in the launch (IndexRangeError)
    _cpu.run("soft_prompt_fwd", p)
    del ids_k, task_k, insert_k
    return out


def soft_prompt_concat_backward(grad: torch.Tensor, prompt: torch.Tensor, task_ids: torch.Tensor | None,
                                insert_at: torch.Tensor | None, L: int, embed_scale: float, need_prompt: bool,
                                need_embeds: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not (need_prompt or need_embeds):
        return None, None
    check_cpu(grad=grad, prompt=prompt, task_ids=task_ids, insert_at=insert_at)
    B, PL, D = grad.shape
    P = PL - L
    if P != prompt.shape[-2] or D != prompt.shape[-1]:
        raise ValueError(f"grad: expected (B, P + L = {prompt.shape[-2] + L}, D = {prompt.shape[-1]}), "
                         f"got {tuple(grad.shape)}")
    grad_k = grad if grad.dtype in DTYPE_CODES else grad.to(torch.float32)
    p = _cpu.Params()
    p.prompt_dtype = float_code(prompt, "prompt")
    p.tok_dtype = p.grad_dtype = DTYPE_CODES[grad_k.dtype]
    p.B, p.L, p.P, p.D = B, L, P, D
    p.T = prompt.shape[0] if prompt.dim() == 3 else 1
    p.grad = grad_k.data_ptr()
    p.grad_sb, p.grad_sj, p.grad_sd = grad_k.stride()
    task_k, insert_k = _set_insert_task(p, task_ids, insert_at)
    p.embed_scale = float(embed_scale)
    dprompt = empty_output(tuple(prompt.shape), prompt.dtype, grad.device) if need_prompt else None
    dembeds = empty_output((B, L, D), grad_k.dtype, grad.device) if need_embeds else None
    p.dprompt = dprompt.data_ptr() if dprompt is not None else 0
    p.dembeds = dembeds.data_ptr() if dembeds is not None else 0
    if (dprompt is not None and dprompt.numel()) or (dembeds is not None and dembeds.numel()):
        _cpu.run("soft_prompt_bwd", p)
    del task_k, insert_k
    if dembeds is not None and dembeds.dtype != grad.dtype:
        dembeds = dembeds.to(grad.dtype)
    return dprompt, dembeds


# the per-token tensors the layout kernel reads and writes in place: a bool mask as bytes (float masks stay with
# torch); uint8 labels get -100 wrapped to 156, exactly as torch's new_full does
_MASK_CODES = {**INDEX_CODES, torch.bool: INDEX_CODES[torch.uint8]}


def prompt_layout(attention_mask: torch.Tensor | None, labels: torch.Tensor | None, insert_at: torch.Tensor | None,
                  P: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
    """(mask_out, labels_out, position_ids), each (B, P + L) laid out like the forward's output, in one pass; None
    where a dtype is not one the kernel reads (the caller then builds them with torch)."""
    if ((attention_mask is not None and attention_mask.dtype not in _MASK_CODES)
            or (labels is not None and labels.dtype not in INDEX_CODES)):
        return None
    check_cpu(attention_mask=attention_mask, labels=labels, insert_at=insert_at)
    B, L = (attention_mask if attention_mask is not None else labels).shape
    p = _cpu.Params()
    p.B, p.L, p.P = B, L, P
    mask_out = labels_out = position_ids = None
    if attention_mask is not None:
        mask_out = torch.empty((B, P + L), dtype=attention_mask.dtype)
        position_ids = torch.empty((B, P + L), dtype=torch.int64)
        p.with_mask, p.mask, p.mask_dtype = 1, attention_mask.data_ptr(), _MASK_CODES[attention_mask.dtype]
        p.mask_out = mask_out.data_ptr()
        p.mask_sb, p.mask_sl = attention_mask.stride()
        p.position_ids = position_ids.data_ptr()
    if labels is not None:
        labels_out = torch.empty((B, P + L), dtype=labels.dtype)
        p.with_labels = 1
        p.labels, p.labels_dtype, p.labels_out = labels.data_ptr(), INDEX_CODES[labels.dtype], labels_out.data_ptr()
        p.labels_sb, p.labels_sl = labels.stride()
    _, insert_k = _set_insert_task(p, None, insert_at)
    _cpu.run("soft_prompt_layout", p)
    del insert_k
    return mask_out, labels_out, position_ids

"""Reference of ``soft_prompt_concat``: the embedding interface (prompt tuning), in plain PyTorch ops.

Row b of the output is ``cat([tokens[b, :s], prompt[task_b], tokens[b, s:]])`` with ``s = insert_at[b]``
(0 by default: the prompt first, as PEFT), where ``tokens = embedding(input_ids) * embed_scale`` or
``inputs_embeds * embed_scale``. The output has the token embeddings' dtype (the model's); the prompt is
cast into it. Index tensors of any integer dtype are read as integers (never as a boolean mask). This file is
the specification every kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prompt_rows(prompt: torch.Tensor, task_ids: torch.Tensor | None, B: int) -> torch.Tensor:
    """(B, P, D): each row's prompt, from a (P, D) prompt or a (T, P, D) table indexed by task_ids."""
    if prompt.dim() == 2:
        return prompt.unsqueeze(0).expand(B, -1, -1)
    # .long(): a uint8 index would be taken as a boolean mask, int16/int8 are refused by advanced indexing
    return prompt[task_ids.long()]


def _starts(insert_at: torch.Tensor | None, B: int) -> list[int]:
    return [0] * B if insert_at is None else [int(v) for v in insert_at.tolist()]


def soft_prompt_concat(prompt: torch.Tensor, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                       embedding_weight: torch.Tensor | None, task_ids: torch.Tensor | None,
                       insert_at: torch.Tensor | None, embed_scale: float) -> torch.Tensor:
    """(B, P + L, D) in the token embeddings' dtype. Differentiable in prompt and inputs_embeds."""
    if inputs_embeds is None:
        # frozen: never a gradient to the table; any integer id dtype (F.embedding takes int32/int64 only)
        tokens = F.embedding(input_ids.long(), embedding_weight.detach())
    else:
        tokens = inputs_embeds
    if embed_scale != 1.0:
        tokens = tokens * embed_scale
    B, L, D = tokens.shape
    rows = prompt_rows(prompt, task_ids, B).to(tokens.dtype)
    P = rows.shape[1]
    if B == 0:
        return tokens.new_empty((0, P + L, D))
    starts = _starts(insert_at, B)
    return torch.stack([torch.cat([tokens[b, :s], rows[b], tokens[b, s:]]) for b, s in enumerate(starts)])


def soft_prompt_concat_backward(grad: torch.Tensor, prompt: torch.Tensor, task_ids: torch.Tensor | None,
                                insert_at: torch.Tensor | None, L: int, embed_scale: float, need_prompt: bool,
                                need_embeds: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d prompt, d inputs_embeds), each None when not needed.

    d prompt: the prompt slice of grad, summed over the rows (per task for a table: index_add), in float32
    (float64 for float64) then cast; d inputs_embeds: the token slices of grad put back in place, times
    embed_scale. Written out (not autograd) so it runs inside the registered op; the tests check it against
    autograd of the forward.
    """
    B, PL, D = grad.shape
    P = PL - L
    starts = _starts(insert_at, B)
    # the token dtype (grad's) sets the accumulation, as in the kernels: a float64 prompt on float32 tokens is
    # summed in float32 and cast, like every other parameter
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dprompt = dembeds = None
    if need_prompt:
        slices = torch.stack([grad[b, s:s + P] for b, s in enumerate(starts)]).to(acc) if B else (
            grad.new_zeros((0, P, D), dtype=acc))
        if prompt.dim() == 2:
            dprompt = slices.sum(0)
        else:
            dprompt = torch.zeros(prompt.shape, dtype=acc, device=grad.device)
            dprompt.index_add_(0, task_ids.long(), slices)
        dprompt = dprompt.to(prompt.dtype)
    if need_embeds:
        dembeds = torch.stack([torch.cat([grad[b, :s], grad[b, s + P:]]) for b, s in enumerate(starts)]) if B else (
            grad.new_empty((0, L, D)))
        if embed_scale != 1.0:
            dembeds = dembeds * embed_scale
    return dprompt, dembeds

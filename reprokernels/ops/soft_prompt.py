"""``soft_prompt_concat``: fused embedding lookup + per-example task prompts + concatenation."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._apply import backend_module, direct_call, op_outputs, run_function
from .._backend import register_op
from .._cpu import IndexRangeError
from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    KERNEL_DTYPES,
    check_float,
    check_index_dtype,
    check_index_range,
    check_ndim,
    check_same_device,
    check_tensor,
    resolve_backend_for,
)

OP = "soft_prompt_concat"
register_op(OP, ("reference", "triton", "cuda", "cpu"))

_MODULES = {
    "reference": "reprokernels.reference.soft_prompt",
    "triton": "reprokernels.triton.soft_prompt",
    "cuda": "reprokernels.cuda.soft_prompt",
    "cpu": "reprokernels.cpu.soft_prompt",
}
INT_DTYPES = INDEX_DTYPES


class PromptedInputs(NamedTuple):
    """What a Hugging Face model's forward takes: ``model(**prompted._asdict())`` (drop the None fields)."""

    inputs_embeds: torch.Tensor  # (B, P + L, D)
    attention_mask: torch.Tensor | None  # (B, P + L), 1 at prompt positions
    labels: torch.Tensor | None  # (B, P + L), -100 at prompt positions
    position_ids: torch.Tensor | None  # (B, P + L), cumsum(mask) - 1, 0 where masked; None without a mask


torch.library.define(
    "reprokernels::soft_prompt_concat_fwd",
    "(Tensor prompt, Tensor? input_ids, Tensor? inputs_embeds, Tensor? embedding_weight, Tensor? task_ids, "
    "Tensor? insert_at, float embed_scale, str backend) -> Tensor",
)
torch.library.define(
    "reprokernels::soft_prompt_concat_bwd",
    "(Tensor grad, Tensor prompt, Tensor? task_ids, Tensor? insert_at, int L, float embed_scale, bool[] needs, "
    "str backend) -> (Tensor, Tensor)",
)


def _kernel_prompt(prompt: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The kernels read float32/float16/bfloat16 prompts: a float64 one is rounded straight into ``dtype`` (the
    output's), exactly the reference's single rounding of the prompt into the token dtype."""
    if backend != "reference" and prompt.dtype not in KERNEL_DTYPES:
        return prompt.to(dtype)
    return prompt


def _fwd(prompt, input_ids, inputs_embeds, embedding_weight, task_ids, insert_at, embed_scale, backend):
    mod = backend_module(_MODULES, backend)
    tokens = inputs_embeds if inputs_embeds is not None else embedding_weight
    return mod.soft_prompt_concat(_kernel_prompt(prompt, tokens.dtype, backend), input_ids, inputs_embeds,
                                  embedding_weight, task_ids, insert_at, embed_scale)


torch.library.impl("reprokernels::soft_prompt_concat_fwd", ["CPU", "CUDA"])(_fwd)


@torch.library.register_fake("reprokernels::soft_prompt_concat_fwd")
def _fwd_fake(prompt, input_ids, inputs_embeds, embedding_weight, task_ids, insert_at, embed_scale, backend):
    P, D = prompt.shape[-2], prompt.shape[-1]
    if inputs_embeds is not None:
        B, L, _ = inputs_embeds.shape
        return inputs_embeds.new_empty((B, P + L, D))
    B, L = input_ids.shape
    return embedding_weight.new_empty((B, P + L, D))


def _bwd(grad, prompt, task_ids, insert_at, L, embed_scale, needs, backend):
    mod = backend_module(_MODULES, backend)
    # (the backward reads only the prompt's shape and dtype: its gradient is accumulated in float32 and cast)
    dp, de = mod.soft_prompt_concat_backward(grad, _kernel_prompt(prompt, torch.float32, backend), task_ids,
                                             insert_at, L, embed_scale, *needs)
    if dp is not None:
        dp = dp.to(prompt.dtype)
    return dp, de


def _bwd_op(grad, prompt, task_ids, insert_at, L, embed_scale, needs, backend):
    return op_outputs(grad, _bwd(grad, prompt, task_ids, insert_at, L, embed_scale, needs, backend))


torch.library.impl("reprokernels::soft_prompt_concat_bwd", ["CPU", "CUDA"])(_bwd_op)


@torch.library.register_fake("reprokernels::soft_prompt_concat_bwd")
def _bwd_fake(grad, prompt, task_ids, insert_at, L, embed_scale, needs, backend):
    dp = prompt.new_empty(prompt.shape) if needs[0] else grad.new_empty((0,))
    de = grad.new_empty((grad.shape[0], L, grad.shape[2])) if needs[1] else grad.new_empty((0,))
    return dp, de


class SoftPromptConcatFunction(torch.autograd.Function):
    """``direct``: call the backend's Python implementation instead of the registered op (see ``direct_call``)."""

    @staticmethod
    def forward(prompt, input_ids, inputs_embeds, embedding_weight, task_ids, insert_at, embed_scale, backend,
                direct):
        fwd = _fwd if direct else torch.ops.reprokernels.soft_prompt_concat_fwd
        return fwd(prompt, input_ids, inputs_embeds, embedding_weight, task_ids, insert_at, embed_scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        prompt, input_ids, inputs_embeds, _, task_ids, insert_at, ctx.embed_scale, ctx.backend, ctx.direct = inputs
        ctx.L = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        ctx.save_for_backward(prompt, task_ids, insert_at)

    @staticmethod
    def backward(ctx, grad):
        prompt, task_ids, insert_at = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[2])]
        bwd = _bwd if ctx.direct else torch.ops.reprokernels.soft_prompt_concat_bwd
        dp, de = bwd(grad, prompt, task_ids, insert_at, ctx.L, ctx.embed_scale, needs, ctx.backend)
        # embedding_weight (input 3) is frozen: no gradient, ever
        return (dp if needs[0] else None, None, de if needs[1] else None, None, None, None, None, None, None)


def _check_index(t: torch.Tensor | None, name: str, shape: tuple[int, ...]) -> None:
    """Integer dtype and exact shape (the values: ``_check_index_values``)."""
    if t is None:
        return
    check_tensor(t, name)
    check_index_dtype(t, name)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _check_index_values(input_ids: torch.Tensor | None, v_max: int, task_ids: torch.Tensor | None, t_max: int,
                        insert_at: torch.Tensor | None, L: int) -> None:
    """Every index in its range, before any kernel reads memory through it (the cpu kernels check them in their
    own launch instead: ``_cpu.IndexRangeError``, after which this names the value)."""
    if input_ids is not None:
        check_index_range(input_ids, 0, v_max, "input_ids", "rows of embedding_weight")
    if task_ids is not None:
        check_index_range(task_ids, 0, t_max, "task_ids", "tasks of the prompt table")
    if insert_at is not None:
        check_index_range(insert_at, 0, L, "insert_at", "tokens kept before the prompt")


def _extend(t: torch.Tensor, is_prompt: torch.Tensor, tok: torch.Tensor, prompt_value: int) -> torch.Tensor:
    """A (B, L) per-token tensor laid out like the output: ``prompt_value`` at prompt positions."""
    if t.shape[1] == 0:
        return torch.full(is_prompt.shape, prompt_value, dtype=t.dtype, device=t.device)
    return torch.where(is_prompt, torch.full((), prompt_value, dtype=t.dtype, device=t.device), t.gather(1, tok))


def soft_prompt_concat(
    prompt: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    embedding_weight: torch.Tensor | None = None,
    task_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    insert_at: torch.Tensor | None = None,
    embed_scale: float | None = None,
    backend: str = "auto",
) -> PromptedInputs:
    """Prepend (or insert) soft-prompt vectors into the token embeddings in one pass.

    Args:
        prompt: (P, D) one task's prompt, or (T, P, D) a table of task prompts chosen per row by ``task_ids``.
        input_ids: (B, L) token ids, looked up in ``embedding_weight`` (V, D) by the kernel itself (the
            (B, L, D) embedding is never materialised). The table is frozen: read only, never written, never
            given a gradient, even if it requires grad.
        inputs_embeds: (B, L, D) ready token embeddings (instead of input_ids); gets a gradient.
        task_ids: (B,) task of each row (required with a (T, P, D) table).
        attention_mask: (B, L) -> (B, P + L), 1 at prompt positions.
        labels: (B, L) -> (B, P + L), -100 at prompt positions.
        insert_at: (B,) per row, how many leading tokens stay before the prompt (0 <= s <= L); default 0.
        embed_scale: multiplier of the token embeddings (e.g. sqrt(D) for Gemma); never applied to the prompt.

    Returns:
        ``PromptedInputs(inputs_embeds, attention_mask, labels, position_ids)``. ``inputs_embeds`` has the
        token embeddings' dtype (``inputs_embeds``'s or ``embedding_weight``'s: the model's), the prompt rounded
        into it once (a float32 prompt with bfloat16 embeddings gives bfloat16 prompt rows; a float64 prompt is
        accepted by every backend). The prompt's gradient is summed in float32 (float64 when the embeddings
        are float64) and returned in the prompt's dtype. Float64 token embeddings run on the reference backend
        only (``auto`` on CPU). Index tensors (input_ids, task_ids, insert_at) may be
        int64/int32/int16/int8/uint8 with any strides, stride 0 included; uint8 is an index, never a mask.
        ``position_ids`` (cumsum of the mask minus 1, 0 where masked) is given when ``attention_mask`` is, so
        left- and right-padded batches both work; else None.
    """
    check_float(prompt, "prompt")
    check_ndim(prompt, (2, 3), "prompt", "(P, D) or (T, P, D)")
    P, D = prompt.shape[-2], prompt.shape[-1]
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids/inputs_embeds: expected exactly one of them, got "
                         + ("both" if input_ids is not None else "neither"))
    if inputs_embeds is not None:
        if embedding_weight is not None:
            raise ValueError("embedding_weight: only used with input_ids, not with inputs_embeds")
        check_float(inputs_embeds, "inputs_embeds")
        check_ndim(inputs_embeds, 3, "inputs_embeds", "(B, L, D)")
        B, L, De = inputs_embeds.shape
        if De != D:
            raise ValueError(f"inputs_embeds: expected (B, L, D={D}) (D of the prompt), "
                             f"got {tuple(inputs_embeds.shape)}")
        tokens_dtype = inputs_embeds.dtype
    else:
        if embedding_weight is None:
            raise ValueError("embedding_weight: input_ids need the (V, D) embedding table, got None")
        check_float(embedding_weight, "embedding_weight")
        check_ndim(embedding_weight, 2, "embedding_weight", "(V, D)")
        if embedding_weight.shape[1] != D:
            raise ValueError(f"embedding_weight: expected (V, D={D}) (D of the prompt), "
                             f"got {tuple(embedding_weight.shape)}")
        check_tensor(input_ids, "input_ids")
        check_ndim(input_ids, 2, "input_ids", "(B, L)")
        B, L = input_ids.shape
        _check_index(input_ids, "input_ids", (B, L))
        tokens_dtype = embedding_weight.dtype
    if prompt.dim() == 3:
        if task_ids is None:
            raise ValueError(f"task_ids: a (T, P, D) prompt table needs task_ids (B={B},), got None")
        _check_index(task_ids, "task_ids", (B,))
    elif task_ids is not None:
        raise ValueError("task_ids: only used with a (T, P, D) prompt table, got a (P, D) prompt")
    _check_index(insert_at, "insert_at", (B,))
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None:
            check_tensor(t, name)
            if tuple(t.shape) != (B, L):
                raise ValueError(f"{name}: expected shape (B={B}, L={L}), got {tuple(t.shape)}")
    if labels is not None and labels.dtype not in INT_DTYPES:
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    check_same_device(("prompt", prompt), ("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                      ("embedding_weight", embedding_weight), ("task_ids", task_ids), ("insert_at", insert_at),
                      ("attention_mask", attention_mask), ("labels", labels))
    scale = 1.0 if embed_scale is None else float(embed_scale)
    chosen = resolve_backend_for(OP, backend, prompt.device, case=(f"prompt_dtype={prompt.dtype}",
                                                                  f"tokens_dtype={tokens_dtype}"))
    if chosen != "reference":
        if tokens_dtype not in KERNEL_DTYPES:
            raise TypeError(f"{'inputs_embeds' if inputs_embeds is not None else 'embedding_weight'}: expected a "
                            f"floating dtype (float32/float16/bfloat16), got {tokens_dtype}")
    assert tokens_dtype in FLOAT_DTYPES
    v_max = embedding_weight.shape[0] - 1 if embedding_weight is not None else 0
    t_max = prompt.shape[0] - 1 if prompt.dim() == 3 else 0
    if chosen != "cpu" or B * (P + L) * D == 0:  # (the cpu kernels check the indices of a call they run)
        _check_index_values(input_ids, v_max, task_ids, t_max, insert_at, L)
    direct = direct_call(chosen, prompt, input_ids, inputs_embeds, embedding_weight, task_ids, insert_at,
                         attention_mask, labels)
    try:
        embeds = run_function(SoftPromptConcatFunction, _fwd, prompt, input_ids, inputs_embeds, embedding_weight,
                              task_ids, insert_at, scale, chosen, direct=direct)
    except IndexRangeError:
        _check_index_values(input_ids, v_max, task_ids, t_max, insert_at, L)  # raises, naming the value
        raise
    mask_out = labels_out = position_ids = None
    laid_out = None
    if direct and (attention_mask is not None or labels is not None):  # the cpu kernels: one pass, no torch ops
        laid_out = backend_module(_MODULES, "cpu").prompt_layout(attention_mask, labels, insert_at, P)
    if laid_out is not None:
        mask_out, labels_out, position_ids = laid_out
    elif insert_at is None and (attention_mask is not None or labels is not None):
        # the prompt prepended (PEFT's layout): each per-token tensor is a prompt block and itself, one cat
        if attention_mask is not None:
            mask_out = torch.cat((attention_mask.new_ones((B, P)), attention_mask), dim=1)
            keep = mask_out != 0
            position_ids = (keep.long().cumsum(-1) - 1).masked_fill(~keep, 0)
        if labels is not None:
            labels_out = torch.cat((labels.new_full((B, P), -100), labels), dim=1)
    elif attention_mask is not None or labels is not None:
        j = torch.arange(P + L, device=prompt.device).view(1, -1)
        s = insert_at.view(B, 1).long() if insert_at is not None else torch.zeros(B, 1, dtype=torch.long,
                                                                                  device=prompt.device)
        is_prompt = (j >= s) & (j < s + P)
        tok = torch.where(j < s, j, j - P).clamp(0, max(L - 1, 0)).expand(B, -1)
        if attention_mask is not None:
            mask_out = _extend(attention_mask, is_prompt, tok, 1)
            keep = mask_out != 0
            position_ids = (keep.long().cumsum(-1) - 1).masked_fill(~keep, 0)
        if labels is not None:
            labels_out = _extend(labels, is_prompt, tok, -100)
    return PromptedInputs(embeds, mask_out, labels_out, position_ids)

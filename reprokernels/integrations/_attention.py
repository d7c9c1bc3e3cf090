"""The transformers attention function behind prefix tuning: each attention layer of a wrapped model calls
:func:`reprokernels.prefix_attention` with that layer's prefix, read from a :class:`PrefixState` the wrapper
attached to the layer. The prefix never enters the model's KV cache and is never expanded to the batch.

Registered under :data:`ATTN_IMPLEMENTATION` in transformers' ``AttentionInterface`` (the function) and
``AttentionMaskInterface`` (the mask builder: transformers' flash-attention one, which hands over the 2-D
(B, Lk) padding mask, or None when nothing is padded, instead of building a 4-D mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.prefix_attention import prefix_attention

ATTN_IMPLEMENTATION = "reprokernels_prefix"
STATE_ATTR = "_reprokernels_prefix_state"


@dataclass
class PrefixState:
    """What the attention layers of one wrapped model read during a call.

    ``layers``: one (prefix_k, prefix_v) per layer index, (Hkv, P, d) or (T, Hkv, P, d), or None outside a
    call (the model then attends without a prefix). ``task_ids``: (B,) with per-task tables.
    """

    backend: str = "auto"
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    task_ids: torch.Tensor | None = None
    calls: int = field(default=0, compare=False)  # attention calls served (tests check the path was taken)


def prefix_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q (B, Hq, Lq, d), k/v (B, Hkv, Lk, d) (cache included),
    the 2-D (B, Lk) padding mask or None -> ((B, Lq, Hq, d), None)."""
    if dropout:
        raise NotImplementedError(
            f"{type(module).__name__}: attention dropout p={dropout} is not supported by prefix_attention; set the "
            "model config's attention dropout (attention_dropout / attn_pdrop) to 0 or call model.eval()")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("output_attentions: prefix_attention never forms the attention matrix")
    state: PrefixState | None = getattr(module, STATE_ATTR, None)
    prefix_k = prefix_v = task_ids = None
    backend = "auto"
    if state is not None:
        backend = state.backend
        state.calls += 1
        if state.layers is not None:
            prefix_k, prefix_v = state.layers[module.layer_idx]
            task_ids = state.task_ids
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: the {ATTN_IMPLEMENTATION} attention expects the 2-D (B, Lk) padding "
                             f"mask its mask function builds, got shape {tuple(attention_mask.shape)} (a custom 4-D "
                             "mask cannot be honoured without materialising it)")
        mask = attention_mask[:, -key.shape[2]:].bool()
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    out = prefix_attention(query, key, value, prefix_k, prefix_v, task_ids=task_ids, causal=causal,
                           key_padding_mask=mask, scale=scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns their name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    return ATTN_IMPLEMENTATION

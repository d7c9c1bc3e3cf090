"""``generate()`` of a wrapped model: the backbone's own ``generate`` (every decoding strategy, its own KV cache)
with a hook on the inputs of each step, which inserts the soft prompt at prefill or numbers the positions
after a prefix. The hook is installed on the instance for the call only (as PEFT does) and always removed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Inputs = dict[str, Any]


def cache_length(inputs: Inputs) -> int:
    """Tokens already in the KV cache of a call's or a step's inputs (0 at prefill, without a cache, or for a
    legacy tuple cache, which transformers 5 ignores)."""
    cache = inputs.get("cache", inputs.get("past_key_values"))
    return 0 if cache is None or isinstance(cache, (tuple, list)) else int(cache.get_seq_length())


def step_tokens(inputs: Inputs) -> torch.Tensor:
    """The step's (B, n) ids or (B, n, D) embeddings."""
    tokens = inputs.get("input_ids")
    return tokens if tokens is not None else inputs["inputs_embeds"]


def positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    """(1, length) position ids start ... start + length - 1 (the backbone's own numbering without a mask)."""
    return torch.arange(start, start + length, device=device).unsqueeze(0)


def generate_with_hook(model: nn.Module, hook: Callable[[Inputs], Inputs], **kwargs: Any) -> Any:
    """``model.generate(**kwargs)`` with ``hook`` applied to what ``prepare_inputs_for_generation`` returns."""
    original = model.prepare_inputs_for_generation
    shadowed = "prepare_inputs_for_generation" in model.__dict__

    @functools.wraps(original)  # generate validates its kwargs against this signature
    def prepare(*args: Any, **kw: Any) -> Inputs:
        return hook(original(*args, **kw))

    model.prepare_inputs_for_generation = prepare
    try:
        return model.generate(**kwargs)
    finally:
        if shadowed:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation

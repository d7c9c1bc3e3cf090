"""Hugging Face transformers models on the fused ops: prefix tuning through the model's own attention
interface, and prompt tuning with a correct ``generate()``.

Needs ``transformers`` (the ``hf`` extra; ``import reprokernels`` never imports it). Tested with transformers
5.24 on Llama (GQA), Mistral/Qwen2-style decoders (same attention contract) and GPT-2.

:class:`PrefixTunedModel`
    Registers a transformers attention function (``AttentionInterface``, name
    :data:`ATTN_IMPLEMENTATION`) and switches the model to it. Each attention layer then calls
    :func:`reprokernels.prefix_attention` with its own keys/values (the model's KV cache included) and that
    layer's prefix from the :class:`~reprokernels.nn.PrefixKV`: the prefix is computed once per call (one MLP
    evaluation with the reparametrisation, not one per row), never expanded to the batch and never stored in
    the KV cache. Positions of the sequence's tokens are shifted by P (``P + past + arange(L)``) exactly as
    PEFT's prefix tuning numbers them; a given ``position_ids`` gets + P as in PEFT. Padding (left or right)
    comes in as the model's 2-D ``attention_mask`` over its own tokens (no prefix columns).
:class:`PromptTunedCausalLM`
    :class:`reprokernels.nn.PromptTunedModel` plus ``generate()``: the soft prompt is inserted once, at
    prefill, and decoding steps feed one token into the model's cache (with P extra ones in the mask).

``generate()`` of both is the backbone's own ``generate`` (any decoding strategy and its own cache), with a
hook on each step's inputs. Positions follow the training forward (the model's own ``arange`` numbering, as a
PEFT forward without ``position_ids``), not transformers' mask-cumsum numbering of left-padded prompts, so
generation reproduces greedy decoding by repeated full forwards of the same model token for token; a
``position_ids`` passed to ``generate`` is ignored.

Limits: no attention dropout (set it to 0 or use ``eval()``), no ``output_attentions``, no gradient
checkpointing of the backbone (the recomputed attention would run without the prefix; refused), and 4-D
custom attention masks are refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from ..nn._adapter_state import save_adapter_only
from ..nn.soft_prompt import PromptTunedModel, SoftPrompt
from ..nn.visual_prompt import freeze_backbone
from ..ops.soft_prompt import soft_prompt_concat
from ._attention import ATTN_IMPLEMENTATION, STATE_ATTR, PrefixState, register
from ._generation import Inputs, cache_length, generate_with_hook, positions, step_tokens

__all__ = ["ATTN_IMPLEMENTATION", "PrefixSource", "PrefixTunedModel", "PromptTunedCausalLM", "attention_layers",
           "register"]


class PrefixSource(Protocol):
    """What :class:`PrefixTunedModel` reads its prefixes from (:class:`~reprokernels.nn.PrefixKV` is one)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_virtual_tokens: int
    num_tasks: int

    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers model that dispatch through ``AttentionInterface``
    (an ``*Attention`` module with an integer ``layer_idx``; cross-attention excluded)."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
            and not getattr(m, "is_cross_attention", False)]


def _kv_geometry(config: Any) -> tuple[int, int]:
    """(Hkv, d) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


class PrefixTunedModel(nn.Module):
    """A frozen transformers decoder steered by per-layer prefix keys/values (prefix tuning, P-tuning v2, a
    shared instruction prefix), with attention computed by :func:`reprokernels.prefix_attention`.

    Args:
        model: a transformers model whose attention layers dispatch through ``AttentionInterface`` (Llama,
            Mistral, Qwen2, GPT-2, ... causal LMs or sequence classifiers). Frozen here; switched to the
            :data:`ATTN_IMPLEMENTATION` attention (``unwrap()`` switches it back).
        prefix_kv: a :class:`~reprokernels.nn.PrefixKV` (or any :class:`PrefixSource`) with one prefix per
            attention layer and the model's kv heads and head dim.
        backend: the ``prefix_attention`` backend ("auto" | "reference" | "composite" | "triton").

    Forward: ``forward(input_ids=None, attention_mask=None, labels=None, *, inputs_embeds=None, task_ids=None,
    position_ids=None, **kwargs)`` -> what ``model`` returns. input_ids (B, L), attention_mask (B, L) over the
    model's own tokens (past included when a cache is passed), task_ids (B,) with ``num_tasks > 1``.

    State: ``state_dict()`` holds only the prefix (keys ``prefix_kv.*``); the frozen backbone keeps its own
    checkpoint (``self.model.state_dict()``).
    """

    def __init__(self, model: nn.Module, prefix_kv: PrefixSource, *, backend: str = "auto") -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
        if not callable(getattr(prefix_kv, "prefixes", None)):
            raise TypeError(f"prefix_kv: expected a reprokernels.nn.PrefixKV (or an object with prefixes()), got "
                            f"{type(prefix_kv).__name__}")
        layers = attention_layers(model)
        if not layers:
            raise ValueError(f"model: {type(model).__name__} has no attention layers that dispatch through "
                             "transformers' AttentionInterface (an *Attention module with layer_idx)")
        n_layers = max(m.layer_idx for m in layers) + 1
        if prefix_kv.num_layers != n_layers:
            raise ValueError(f"prefix_kv: expected num_layers={n_layers} (the model's attention layers), got "
                             f"{prefix_kv.num_layers}")
        kv_heads, head_dim = _kv_geometry(config)
        if (prefix_kv.num_kv_heads, prefix_kv.head_dim) != (kv_heads, head_dim):
            raise ValueError(f"prefix_kv: expected num_kv_heads={kv_heads}, head_dim={head_dim} (the model's), got "
                             f"{prefix_kv.num_kv_heads}, {prefix_kv.head_dim}")
        self.model = freeze_backbone(model)
        if isinstance(prefix_kv, nn.Module):
            self.prefix_kv = prefix_kv
        else:
            object.__setattr__(self, "prefix_kv", prefix_kv)
        self._state = PrefixState(backend=backend)
        self._layers = layers
        self._previous_attn = config._attn_implementation
        register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for layer in layers:
            setattr(layer, STATE_ATTR, self._state)
        save_adapter_only(self, ("model.",))

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix_kv.num_virtual_tokens

    def unwrap(self) -> nn.Module:
        """Detach from the model: its previous attention implementation back, the prefix state removed."""
        for layer in self._layers:
            if getattr(layer, STATE_ATTR, None) is self._state:
                delattr(layer, STATE_ATTR)
        self.model.set_attn_implementation(self._previous_attn)
        return self.model

    @contextmanager
    def prefixes_active(self, task_ids: torch.Tensor | None = None):
        """Within the block every attention layer of the model sees its prefix (computed once here)."""
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if checkpointing is None:
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if checkpointing:
            raise ValueError("model: gradient checkpointing is on; its recomputed attention would run without the "
                             "prefix (PEFT refuses prefix tuning with it too): model.gradient_checkpointing_disable()")
        if self.prefix_kv.num_tasks > 1 and task_ids is None:
            raise ValueError(f"task_ids: the prefix has num_tasks={self.prefix_kv.num_tasks}; pass task_ids (B,)")
        if self.prefix_kv.num_tasks == 1 and task_ids is not None:
            raise ValueError("task_ids: only used with a per-task prefix (num_tasks > 1)")
        self._state.layers = self.prefix_kv.prefixes()
        self._state.task_ids = task_ids
        try:
            yield
        finally:
            self._state.layers = None
            self._state.task_ids = None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("input_ids/inputs_embeds: expected one of them, got neither")
        P = self.num_virtual_tokens
        if position_ids is None:
            position_ids = positions(P + cache_length(kwargs), tokens.shape[1], tokens.device)
        else:
            position_ids = position_ids + P  # PEFT's shift for the cache-held prefix
        call = dict(kwargs, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids)
        if labels is not None:
            call["labels"] = labels
        with self.prefixes_active(task_ids):
            return self.model(**call)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The model's ``generate`` with every layer's prefix: the model's cache holds only its own tokens."""
        P = self.num_virtual_tokens

        def number_positions(inputs: Inputs) -> Inputs:
            tokens = step_tokens(inputs)
            inputs["position_ids"] = positions(P + cache_length(inputs), tokens.shape[1], tokens.device)
            return inputs

        kwargs.pop("position_ids", None)
        with torch.no_grad(), self.prefixes_active(task_ids):
            return generate_with_hook(self.model, number_positions, input_ids=input_ids,
                                      attention_mask=attention_mask, **kwargs)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, backend={self._state.backend!r}"


def prompt_generation_hook(prompt: torch.Tensor, embedding_weight: torch.Tensor, *,
                           task_ids: torch.Tensor | None = None, embed_scale: float | None = None,
                           backend: str = "auto"):
    """The per-step input hook of prompt-tuned generation: at prefill (empty cache) the step's ids become
    ``soft_prompt_concat(prompt, ids)`` embeddings; every step's mask gets P leading ones and its positions
    continue the cache (0 ... P + L - 1 at prefill, as a PEFT forward numbers them)."""
    P = prompt.shape[-2]

    def hook(inputs: Inputs) -> Inputs:
        past = cache_length(inputs)
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask: prompt-tuned generation needs a 2-D mask, got {tuple(mask.shape)}")
        if past == 0:
            ids = inputs.get("input_ids")
            if ids is None:
                raise ValueError("inputs_embeds: prompt-tuned generation starts from input_ids")
            prompted = soft_prompt_concat(prompt, input_ids=ids, embedding_weight=embedding_weight,
                                          task_ids=task_ids, attention_mask=mask, embed_scale=embed_scale,
                                          backend=backend)
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = prompted.inputs_embeds
            if mask is not None:
                inputs["attention_mask"] = prompted.attention_mask
        elif mask is not None:
            inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
        tokens = step_tokens(inputs)
        inputs["position_ids"] = positions(past, tokens.shape[1], tokens.device)
        return inputs

    return hook


class PromptTunedCausalLM(PromptTunedModel):
    """:class:`reprokernels.nn.PromptTunedModel` around a transformers causal LM, with ``generate()``.

    ``generate(input_ids, attention_mask=None, *, task_ids=None, **kwargs)``: the model's own ``generate``;
    the prompt is evaluated once (its encoder too) and inserted at prefill only.
    """

    def __init__(self, model: nn.Module, soft_prompt: SoftPrompt, **kwargs: Any) -> None:
        if not hasattr(model, "generate"):
            raise TypeError(f"model: expected a transformers model with generate(), got {type(model).__name__}")
        super().__init__(model, soft_prompt, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        kwargs.pop("position_ids", None)
        with torch.no_grad():
            hook = prompt_generation_hook(self.soft_prompt.prompt_embeddings(), self.embedding_weight,
                                          task_ids=task_ids, embed_scale=self.embed_scale,
                                          backend=self.soft_prompt.backend)
            return generate_with_hook(self.model, hook, input_ids=input_ids, attention_mask=attention_mask,
                                      **kwargs)

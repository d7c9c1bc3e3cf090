"""Run an existing PEFT prompt-learning model on the fused ops: ``accelerate(peft_model)``.

Needs ``peft`` and ``transformers`` (the ``hf`` extra). Tested with PEFT 0.21 + transformers 5.24.

================================  =====================================================================
PEFT config                        accelerated path
================================  =====================================================================
``PROMPT_TUNING`` / ``P_TUNING``   the prompt (its encoder too) evaluated **once** per call by PEFT's own
                                   ``get_prompt(batch_size=1)``, then :func:`reprokernels.soft_prompt_concat`
                                   gathers the token rows and inserts the prompt in one pass (causal LM and
                                   sequence classification)
``MULTITASK_PROMPT_TUNING``        the (T, P, D) table of every task evaluated once, rows choose by
                                   ``task_ids`` inside the op (causal LM, sequence classification)
``PREFIX_TUNING``                  the prefix encoder (with or without ``prefix_projection``) evaluated once
                                   (not once per row), the result handed layer by layer to
                                   :func:`reprokernels.prefix_attention` through
                                   :class:`~reprokernels.integrations.transformers.PrefixTunedModel`: never
                                   expanded to the batch, never in the KV cache (causal LM)
================================  =====================================================================

The accelerated model owns no parameter of its own: it holds the PEFT model (``.peft_model``), whose
trainable parameters are the ones optimised and saved, so ``save_pretrained`` writes a plain PEFT adapter
that ``PeftModel.from_pretrained`` loads. Logits, loss and the gradients of PEFT's trainable parameters match
the PEFT model's forward (the tests compare them on left-padded batches).

``generate()`` is correct where PEFT 0.21.2's is not (with transformers 5.24): PEFT re-inserts the virtual
tokens at every decoding step for prompt tuning, and drops the prefix at prefill for prefix tuning (it hands
``past_key_values``, which transformers 5 ignores in favour of ``cache``). Here the prompt is inserted once at
prefill, the prefix is read by every layer at every step, and tokens equal greedy decoding by repeated full
forwards of the PEFT model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.soft_prompt import soft_prompt_concat
from ._generation import generate_with_hook
from .transformers import PrefixTunedModel, prompt_generation_hook

__all__ = ["AcceleratedPeftModel", "PeftPrefix", "accelerate"]

_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
_SUPPORTED = (*_PROMPT_TYPES, "PREFIX_TUNING")


def _name(enum_or_str: Any) -> str:
    return getattr(enum_or_str, "value", enum_or_str) if enum_or_str is not None else ""


class PeftPrefix:
    """A :class:`~reprokernels.integrations.transformers.PrefixSource` over a PEFT ``PrefixEncoder``: every
    layer's (Hkv, P, d) key and value prefix from **one** encoder evaluation on the P virtual tokens (PEFT
    evaluates it on B copies of them). In ``inference_mode`` the stored embedding is used as PEFT does."""

    num_tasks = 1

    def __init__(self, peft_model: nn.Module) -> None:
        config = peft_model.active_peft_config
        self._peft_model = peft_model
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_attention_heads  # PEFT stores the kv heads there for GQA models
        self.head_dim = config.token_dim // config.num_attention_heads
        self.num_virtual_tokens = config.num_virtual_tokens

    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model = self._peft_model
        config = model.active_peft_config
        encoder = model.prompt_encoder[model.active_adapter]
        P = self.num_virtual_tokens
        if config.inference_mode:
            flat = encoder.embedding.weight  # (P, 2 * layers * token_dim)
        else:
            tokens = model.prompt_tokens[model.active_adapter][:P].to(encoder.embedding.weight.device)
            flat = encoder(tokens)
        if model.base_model_torch_dtype is not None:
            flat = flat.to(model.base_model_torch_dtype)
        # PEFT's layout: (P, 2 * layers, H, d); row 2i is layer i's keys, 2i + 1 its values
        kv = flat.view(P, 2 * self.num_layers, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]


class AcceleratedPeftModel(nn.Module):
    """A PEFT prompt-learning model whose forward and ``generate`` run on the fused ops (see the module doc).

    ``forward(input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, task_ids=None, **kwargs)``
    takes what the PEFT model's forward takes and returns what it returns.
    """

    def __init__(self, peft_model: nn.Module, *, backend: str = "auto") -> None:
        super().__init__()
        from peft import PeftModel

        if not isinstance(peft_model, PeftModel):
            raise TypeError(f"peft_model: expected a peft.PeftModel, got {type(peft_model).__name__}")
        config = peft_model.active_peft_config
        self.peft_type = _name(config.peft_type)
        self.task_type = _name(getattr(config, "task_type", None))
        if self.peft_type not in _SUPPORTED:
            raise ValueError(f"peft_model: expected a prompt-learning config ({', '.join(_SUPPORTED)}), got "
                             f"{self.peft_type}")
        supported_tasks = ("CAUSAL_LM", "SEQ_CLS") if self.peft_type in _PROMPT_TYPES else ("CAUSAL_LM",)
        if self.task_type not in supported_tasks:
            raise ValueError(f"peft_model: {self.peft_type} is accelerated for task types {supported_tasks}, got "
                             f"{self.task_type or None}")
        if getattr(config, "num_transformer_submodules", 1) != 1:
            raise ValueError("peft_model: encoder-decoder models are not supported")
        self.peft_model = peft_model
        self.backend = backend
        if self.peft_type == "PREFIX_TUNING":
            from peft.utils import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING

            model_type = getattr(peft_model.get_base_model().config, "model_type", "")
            if model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING:
                raise ValueError(f"peft_model: {model_type} reorders PEFT's prefix cache (a post-process function); "
                                 "not supported")
            # not a registered submodule: its parameters are the PEFT model's, registered once (above)
            object.__setattr__(self, "_prefixed", PrefixTunedModel(peft_model.get_base_model(),
                                                                   PeftPrefix(peft_model), backend=backend))

    @property
    def base_model(self) -> nn.Module:
        """The frozen transformers model."""
        return self.peft_model.get_base_model()

    @property
    def num_virtual_tokens(self) -> int:
        return self.peft_model.active_peft_config.num_virtual_tokens

    def unwrap(self) -> nn.Module:
        """The PEFT model, with its base model's attention implementation restored (prefix tuning)."""
        if self.peft_type == "PREFIX_TUNING":
            self._prefixed.unwrap()
        return self.peft_model

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """PEFT's ``save_pretrained`` (the adapter is the PEFT model's own parameters)."""
        return self.peft_model.save_pretrained(*args, **kwargs)

    def prompt(self) -> torch.Tensor:
        """The soft prompt of one call: (P, D), or (T, P, D) for multitask prompt tuning (one encoder call)."""
        model = self.peft_model
        if self.peft_type == "MULTITASK_PROMPT_TUNING":
            T = model.active_peft_config.num_tasks
            device = model.prompt_encoder[model.active_adapter].embedding.weight.device
            return model.get_prompt(batch_size=T, task_ids=torch.arange(T, device=device))
        return model.get_prompt(batch_size=1)[0]

    def _prompt_task_ids(self, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        if self.peft_type == "MULTITASK_PROMPT_TUNING":
            if task_ids is None:
                raise ValueError("task_ids: multitask prompt tuning needs task_ids (B,)")
            return task_ids
        if task_ids is not None:
            raise ValueError(f"task_ids: not used by {self.peft_type}")
        return None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self.peft_type == "PREFIX_TUNING":
            if task_ids is not None:
                raise ValueError("task_ids: PEFT prefix tuning has one prefix; for per-task prefixes use "
                                 "PrefixTunedModel with PrefixKV(num_tasks=T)")
            return self._prefixed(input_ids, attention_mask, labels, inputs_embeds=inputs_embeds, **kwargs)
        return self._prompted_forward(input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs)

    def _prompted_forward(self, input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs):
        kwargs.pop("position_ids", None)  # PEFT drops them too (with a warning): positions count the prompt
        task_ids = self._prompt_task_ids(task_ids)
        per_token = self.task_type == "CAUSAL_LM" and labels is not None
        weight = self.peft_model.word_embeddings.weight if input_ids is not None else None
        prompted = soft_prompt_concat(self.prompt(), input_ids=input_ids, inputs_embeds=inputs_embeds,
                                      embedding_weight=weight, task_ids=task_ids, attention_mask=attention_mask,
                                      labels=labels if per_token else None, backend=self.backend)
        P = self.num_virtual_tokens
        token_type_ids = kwargs.get("token_type_ids")
        if token_type_ids is not None:
            if self.task_type != "SEQ_CLS":
                raise ValueError("token_type_ids: PEFT drops them for this task type; do not pass them")
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(token_type_ids.shape[0], P),
                                                  token_type_ids], dim=1)
        call = dict(kwargs, inputs_embeds=prompted.inputs_embeds)
        if attention_mask is not None:
            call["attention_mask"] = prompted.attention_mask
        if labels is not None:
            call["labels"] = prompted.labels if per_token else labels
        return self.peft_model.base_model(**call)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the prompt (inserted once) or the prefix (read every step)."""
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"generate: needs a causal LM, the PEFT task type is {self.task_type}")
        if self.peft_type == "PREFIX_TUNING":
            return self._prefixed.generate(input_ids, attention_mask, **kwargs)
        kwargs.pop("position_ids", None)
        task_ids = self._prompt_task_ids(task_ids)
        with torch.no_grad():
            hook = prompt_generation_hook(self.prompt(), self.peft_model.word_embeddings.weight, task_ids=task_ids,
                                          backend=self.backend)
            return generate_with_hook(self.base_model, hook, input_ids=input_ids, attention_mask=attention_mask,
                                      **kwargs)


def accelerate(peft_model: nn.Module, *, backend: str = "auto") -> AcceleratedPeftModel:
    """Wrap a PEFT ``PROMPT_TUNING`` / ``P_TUNING`` / ``MULTITASK_PROMPT_TUNING`` / ``PREFIX_TUNING`` model so
    its forward and ``generate`` run on the fused ops (see the module docstring). The PEFT model is used, not
    copied: train its parameters through the returned module, save with ``save_pretrained``.

    For prefix tuning the base model's attention implementation is switched to
    :data:`~reprokernels.integrations.transformers.ATTN_IMPLEMENTATION` (plain attention when no prefix is
    active, so the base model alone still works); ``result.unwrap()`` switches it back.
    """
    return AcceleratedPeftModel(peft_model, backend=backend)

"""The reprogrammed model: input prompt -> frozen backbone -> label mapping, as one ``nn.Module``.

    out = label_mapping(backbone(input_prompt(x)))         (a missing prompt or mapping is the identity)

:class:`Reprogrammer` owns the three parts and enforces what model reprogramming means: the backbone's weights
never change.

- Frozen: every backbone parameter gets ``requires_grad=False`` at construction (gradients still flow *through*
  the backbone to the prompt). A prompt or mapping whose *trainable* parameter is also a backbone parameter (tied
  weights) is refused with a ValueError naming the part and the parameter, never frozen silently; a shared
  parameter already marked ``requires_grad=False`` is a fixed map and is accepted.
- Always in eval mode: ``train()`` puts the prompt and the mapping in training mode but keeps the backbone in
  eval mode, so BatchNorm running statistics are neither used from the batch nor updated, and dropout is off.
  After any number of training steps every backbone parameter *and buffer* is bit-identical.
- Checkpoints hold only what was learned: ``state_dict()`` leaves out every ``backbone.*`` entry, so it holds the
  prompt (δ, a mask network's weights and BatchNorm statistics) and the mapping's persistent buffers
  (``mapping``, ``num_updates``): kilobytes, whatever the backbone's size. ``load_state_dict`` restores them onto
  a Reprogrammer built around a fresh copy of the same backbone; the backbone is never loaded through the
  wrapper (load its own weights with ``backbone.load_state_dict``). An incoming state dict that carries
  ``backbone.*`` entries (it is not a reprogramming checkpoint) gets them reported as unexpected keys: an error
  under ``strict=True``, ignored (the backbone keeps its weights) under ``strict=False``. Both rules hold when
  the Reprogrammer is nested in another module (they are state-dict hooks, not overrides of the top-level
  methods).

The backbone is a registered submodule, so ``.to(device)``, ``.half()``, ``print`` and forward hooks reach it,
and ``parameters()`` lists its (frozen) parameters too; an optimiser should get :meth:`trainable_parameters`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["Reprogrammer"]

_BACKBONE = "backbone."


class Reprogrammer(nn.Module):
    """A frozen ``backbone`` reprogrammed at its input (``input_prompt``) and output (``label_mapping``).

    Args:
        backbone: the pre-trained model; frozen in place (``requires_grad=False``) and kept in eval mode.
        input_prompt: a module x -> backbone input (e.g. :class:`ExpansivePrompter`); None: the identity.
        label_mapping: a module backbone output -> task output (e.g. :class:`LabelMapping`); None: the identity.

    Shapes: whatever the three parts take and give; ``forward(x) = label_mapping(backbone(input_prompt(x)))``.
    """

    def __init__(self, backbone: nn.Module, input_prompt: nn.Module | None = None,
                 label_mapping: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone: expected an nn.Module, got {type(backbone).__name__}")
        for name, part in (("input_prompt", input_prompt), ("label_mapping", label_mapping)):
            if part is not None and not isinstance(part, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module or None, got {type(part).__name__}")
        # before freezing: a parameter the user left trainable in a part that the backbone shares (a label mapping
        # built on the backbone's own head, a prompt tied to its embedding) would otherwise be frozen silently.
        # Refused: training it would change the backbone, which reprogramming never does.
        backbone_ids = {id(p) for p in backbone.parameters()}
        for name, part in (("input_prompt", input_prompt), ("label_mapping", label_mapping)):
            if part is None:
                continue
            tied = [n for n, p in part.named_parameters() if p.requires_grad and id(p) in backbone_ids]
            if tied:
                raise ValueError(
                    f"{name}: expected parameters of its own, got trainable parameter(s) {', '.join(tied)} shared "
                    f"with the backbone, which Reprogrammer freezes; use a copy (e.g. copy.deepcopy of the "
                    f"layer) to train it, or set requires_grad=False on it to use it as a fixed map")
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone
        self.add_module("input_prompt", input_prompt)
        self.add_module("label_mapping", label_mapping)
        self.register_state_dict_post_hook(_drop_backbone_entries)
        self.register_load_state_dict_pre_hook(_keep_backbone_on_load)
        self.train(self.training)

    def forward(self, x: Any) -> Any:
        if self.input_prompt is not None:
            x = self.input_prompt(x)
        y = self.backbone(x)
        if self.label_mapping is not None:
            y = self.label_mapping(y)
        return y

    def train(self, mode: bool = True) -> Reprogrammer:
        """Set the prompt and mapping to ``mode``; the backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The learnable parameters (prompt, mask network, linear mapping) with ``requires_grad``: give these
        to the optimiser."""
        for part in (self.input_prompt, self.label_mapping):
            if part is not None:
                for p in part.parameters():
                    if p.requires_grad:
                        yield p

    @property
    def num_trainable(self) -> int:
        """Elements of the trainable tensors as stored (a prompter's ``num_parameters`` may count fewer: only
        the elements that can change the output)."""
        return sum(p.numel() for p in self.trainable_parameters())

    @property
    def num_frozen(self) -> int:
        """Elements of the backbone's parameters."""
        return sum(p.numel() for p in self.backbone.parameters())

    def extra_repr(self) -> str:
        return f"trainable={self.num_trainable:,}, frozen={self.num_frozen:,}"


def _drop_backbone_entries(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                           local_metadata: dict[str, Any]) -> None:
    start = prefix + _BACKBONE
    for key in [k for k in state_dict if k.startswith(start)]:
        del state_dict[key]
    # the backbone's per-module metadata (version numbers) is kept in state_dict._metadata: harmless, tiny


def _keep_backbone_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                           local_metadata: dict[str, Any], strict: bool, missing_keys: list[str],
                           unexpected_keys: list[str], error_msgs: list[str]) -> None:
    # ``state_dict`` is load_state_dict's own copy: filling it here never touches the caller's dict.
    start = prefix + _BACKBONE
    incoming = [k for k in state_dict if k.startswith(start)]
    # reported as unexpected: an error under strict=True, ignored under strict=False (torch passes strict=True
    # to every hook and applies the caller's strictness to these lists at the end)
    unexpected_keys.extend(incoming)
    backbone = module.backbone  # type: ignore[union-attr]
    # the backbone reloads its own tensors (a copy onto itself: bit-identical, nothing missing)
    own = backbone.state_dict(prefix=start, keep_vars=True)
    for key in incoming:
        if key not in own:
            del state_dict[key]
    for key, value in own.items():
        state_dict[key] = value.detach() if isinstance(value, torch.Tensor) else value

"""``state_dict`` of a wrapper around a frozen backbone: only the adapter (prompt, prefix, delta).

The backbone is frozen and lives in its own checkpoint; a per-task checkpoint of a few thousand numbers is the
point of reprogramming (PEFT saves only the adapter too). These hooks drop the backbone's keys when saving and
accept their absence when loading, also when the wrapper is nested in another module. They are module-level
functions reading attributes of the module, so a wrapped model still pickles (``torch.save(module)``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

_PREFIXES = "_backbone_key_prefixes"


def save_adapter_only(module: nn.Module, backbone_prefixes: tuple[str, ...]) -> None:
    """Register the hooks on ``module``: keys starting with one of ``backbone_prefixes`` (relative to
    ``module``, e.g. ``("model.",)``) are left out of its ``state_dict`` and not expected by ``load_state_dict``."""
    setattr(module, _PREFIXES, tuple(backbone_prefixes))
    module.register_state_dict_post_hook(_drop_backbone)
    module.register_load_state_dict_pre_hook(_remember_prefix)
    module.register_load_state_dict_post_hook(_ignore_missing_backbone)


def _is_backbone(module: nn.Module, key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix):].startswith(getattr(module, _PREFIXES))


def _drop_backbone(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if _is_backbone(module, k, prefix)]:
        del state_dict[key]


def _remember_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    module._adapter_load_prefix = prefix


def _ignore_missing_backbone(module: nn.Module, incompatible: Any) -> None:
    prefix = getattr(module, "_adapter_load_prefix", "")
    missing = incompatible.missing_keys
    missing[:] = [k for k in missing if not _is_backbone(module, k, prefix)]

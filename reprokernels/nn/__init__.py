"""nn.Modules built on the ops."""

from .label_mapping import LabelMapping
from .prefix_kv import PrefixKV
from .reprogrammer import Reprogrammer
from .soft_prompt import PromptEncoder, PromptTunedModel, SoftPrompt
from .visual_prompt import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExpansivePrompter,
    FullPrompter,
    MaskGenerator,
    PadPrompter,
    PatchPrompter,
    SampleSpecificMaskPrompter,
    freeze_backbone,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ExpansivePrompter",
    "FullPrompter",
    "LabelMapping",
    "MaskGenerator",
    "PadPrompter",
    "PatchPrompter",
    "PrefixKV",
    "PromptEncoder",
    "PromptTunedModel",
    "Reprogrammer",
    "SampleSpecificMaskPrompter",
    "SoftPrompt",
    "freeze_backbone",
]

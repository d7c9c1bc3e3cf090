"""reprokernels: fused GPU kernels for reprogramming frozen pre-trained models.

Importing the package is cheap: Triton and the CUDA extension are loaded on first use.
"""

from __future__ import annotations

from ._backend import BackendUnavailableError, default_backend, use_backend
from ._cuda import CudaUnavailableError, cuda_available
from ._info import info
from ._validation import eager_checks
from .ops.label_estimators import bayesian_label_mapping, greedy_label_mapping
from .ops.label_histogram import label_histogram
from .ops.label_map import label_map
from .ops.prefix_attention import merge_attention_states, prefix_attention
from .ops.soft_prompt import PromptedInputs, soft_prompt_concat
from .ops.visual_prompt import visual_prompt

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CudaUnavailableError",
    "PromptedInputs",
    "__version__",
    "bayesian_label_mapping",
    "cuda_available",
    "default_backend",
    "eager_checks",
    "greedy_label_mapping",
    "info",
    "label_histogram",
    "label_map",
    "merge_attention_states",
    "prefix_attention",
    "soft_prompt_concat",
    "use_backend",
    "visual_prompt",
]

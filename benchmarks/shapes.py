"""The one place benchmark shapes live. Each op's script reads its entry; `quick` shapes keep CPU runs short.

``SHAPES[op]`` is ``{"full": [...], "quick": [...]}``; each entry is a dict the op's script understands (its
keys are documented next to the entry).
"""

from __future__ import annotations

SHAPES: dict[str, dict[str, list[dict]]] = {}

# visual_prompt. Keys: name; B, C; h, w (the image x); H, W (the canvas = the model's input); mask ("outside"
# | "full" | "frame" | "patch" | "tensor"); mask_res (H', W') and mask_channels for a tensor mask (per sample,
# float32, learnable: it gets a gradient); squash; order; norm ("imagenet" | None); dtypes (of x; delta is
# always float32); modes ("fwd", "fwd+bwd": gradients of delta and of a tensor mask, x is data).
_EXPANSIVE = dict(name="expansive", C=3, h=32, w=32, H=224, W=224, mask="outside", squash="sigmoid",
                  order="pre_norm", norm="imagenet", dtypes=("float32", "float16"), modes=("fwd", "fwd+bwd"))
_SMM = dict(name="smm", C=3, h=224, w=224, H=224, W=224, mask="tensor", mask_res=(28, 28), mask_channels=3,
            squash="none", order="pre_norm", norm="imagenet", dtypes=("float32", "float16"),
            modes=("fwd", "fwd+bwd"))
SHAPES["visual_prompt"] = {
    # ILM-VP / BLM: a 32x32 (CIFAR) image centred on a 224 canvas, sigmoid(delta) outside, ImageNet norm;
    # SMM: a 224 image, delta times a per-sample 3x28x28 mask upsampled by k=8, ImageNet norm.
    "full": [dict(_EXPANSIVE, B=256), dict(_SMM, B=256)],
    "quick": [dict(_EXPANSIVE, B=8), dict(_SMM, B=8)],
}

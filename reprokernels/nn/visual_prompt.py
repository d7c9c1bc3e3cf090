"""Input-space reprogramming modules: every published visual-prompt / visual-reprogramming (VR) recipe as an
``nn.Module`` whose forward is one call of the fused op :func:`reprokernels.visual_prompt`.

The modules own the learnable tensors (the perturbation δ and, for SMM, the mask generator) and the
recipe's constants (geometry, mask kind, squash, order, normalisation); all the per-pixel math (placing and
resizing the image, masking, squashing, adding, clamping, normalising, and the backward of all of it) is the
op's. None of them re-implements it.

=============================  ==========  ============  =========  ==========  ============  ==============
module                         mask        δ init        squash     order       norm inside   paper
=============================  ==========  ============  =========  ==========  ============  ==============
:class:`PadPrompter`           frame p     randn         none       post_norm   optional      VP (Bahng 22)
:class:`ExpansivePrompter`     outside     zeros         sigmoid    pre_norm    ImageNet      ILM-VP, BLM
:class:`FullPrompter`          full        zeros         any        any         optional      watermark VR
:class:`PatchPrompter`         patch       randn         none       post_norm   optional      VP random patch
:class:`SampleSpecificMask..`  CNN mask    zeros         none       pre_norm    ImageNet      SMM (Cai 24)
=============================  ==========  ============  =========  ==========  ============  ==============

Shapes: x is (B, C, h, w); every module returns (B, C, H, W) in x's dtype (the canvas H x W is the frozen
model's input size). δ is stored in float32 whatever x's dtype (fp16/bf16 images with fp32 δ is the intended
mixed-precision use; the op computes in float32). Mean/std are non-persistent float32 buffers: they follow
``.to(device)`` but stay out of ``state_dict`` (they are constants of the recipe, given to the constructor).

``backend`` ("auto" | "reference" | "triton" | "cuda") is passed to every op call; see
:mod:`reprokernels._backend`. ``num_parameters`` counts the trainable elements that can change the output
(see each class for what that means when δ is stored on the whole canvas but only a region is active).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import BACKENDS
from .._validation import _as_real, check_nonzero, check_pair, check_reals
from ..ops.visual_prompt import visual_prompt
from ..reference.visual_prompt import ORDERS, RESIZE_MODES, SQUASHES

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Size = int | Sequence[int]
Channelwise = float | Sequence[float] | torch.Tensor | None

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ExpansivePrompter",
    "FullPrompter",
    "PadPrompter",
    "PatchPrompter",
    "SampleSpecificMaskPrompter",
    "freeze_backbone",
]


def _pair(value: Size | None, name: str) -> tuple[int, int] | None:
    return check_pair(value, name, minimum=1)


def _channel_buffer(value: Channelwise, name: str, channels: int) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        # host numbers are checked on the host: under ``with torch.device("meta")`` (FSDP2-style construction)
        # the tensor below has no values to look at
        scalar = _as_real(value)
        vals = [scalar] if scalar is not None else check_reals(
            value, name, f"None, a number, {channels} numbers (one per channel) or a tensor")
        if name == "std" and any(v == 0 for v in vals):
            raise ValueError(f"std: expected non-zero values, got {vals}")
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone().reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ValueError(f"{name}: expected 1 or {channels} values (one per channel), got {t.numel()}")
    if name == "std":
        check_nonzero(t, "std")  # (skips meta tensors)
    return t


class _Prompter(nn.Module):
    """Shared plumbing: backend, channel count, non-persistent mean/std buffers, input checks."""

    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __init__(self, channels: int, mean: Channelwise, std: Channelwise, backend: str) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels: expected an int >= 1, got {channels!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        self.channels = channels
        self.backend = backend
        self.register_buffer("mean", _channel_buffer(mean, "mean", channels), persistent=False)
        self.register_buffer("std", _channel_buffer(std, "std", channels), persistent=False)

    def _check_input(self, x: torch.Tensor, size: tuple[int, int] | None, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a (B, C={self.channels}, h, w) tensor, got {shape}")
        if size is not None and tuple(x.shape[-2:]) != size:
            raise ValueError(f"x: expected images of {what} {size}, got {tuple(x.shape)}")

    @property
    def num_parameters(self) -> int:
        """Trainable elements (parameters with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class PadPrompter(_Prompter):
    """VP's padding prompt (Bahng et al. 2022): a learnable frame of width ``pad_size`` added to the image.

    out = norm(x) + m_frame * δ          (norm is the identity unless ``mean``/``std`` are given)

    VP adds the raw (unsquashed) δ to the already normalised image, so by default there is no normalisation
    here: feed the normalised image, as VP does. Passing ``mean``/``std`` fuses the normalisation into the
    same pass (feed raw images then); the result equals VP with ``Normalize`` in the data transform.

    Args:
        image_size: the canvas (H, W) = the model's input size; x must already be that size.
        pad_size: the frame width p (2p <= H and W).
        channels: C.
        mean, std: optional per-channel normalisation of x (None: x is already normalised).
        backend: backend of the op.

    Shapes: x (B, C, H, W) -> (B, C, H, W) in x's dtype. ``delta``: (C, H, W) float32.

    The parameter is stored on the full canvas (one contiguous (C, H, W) tensor: the layout a fused kernel
    reads with the output's strides, no concatenation of four strips per forward), but only the frame is
    active: the op multiplies δ by the frame mask, so the gradient of every interior element is exactly 0
    and the interior never changes the output (it is initialised to 0). ``num_parameters`` therefore counts
    the frame only: C * (H*W - (H-2p)*(W-2p)), 69,840 for p=30 on 3x224x224, as in VP. (An optimiser with
    weight decay still sees the inactive zeros; decay keeps them at 0.)

    Initialisation: the frame is filled from ``torch.randn`` exactly as VP draws its four strips (up, down,
    left, right in that order), so under the same seed this module reproduces VP's ``PadPrompter``.
    """

    def __init__(self, image_size: Size = 224, pad_size: int = 30, channels: int = 3, *,
                 mean: Channelwise = None, std: Channelwise = None, backend: str = "auto") -> None:
        super().__init__(channels, mean, std, backend)
        H, W = _pair(image_size, "image_size")  # type: ignore[misc]
        if isinstance(pad_size, bool) or not isinstance(pad_size, int) or pad_size < 0 or 2 * pad_size > min(H, W):
            raise ValueError(f"pad_size: expected an int p with 0 <= 2p <= min(image_size)={min(H, W)}, "
                             f"got {pad_size!r}")
        self.image_size = (H, W)
        self.pad_size = p = pad_size
        delta = torch.zeros(channels, H, W)
        if p > 0:
            # VP: pad_up, pad_down (1, C, p, W), then pad_left, pad_right (1, C, H - 2p, p), each randn
            up, down = torch.randn(channels, p, W), torch.randn(channels, p, W)
            left, right = torch.randn(channels, H - 2 * p, p), torch.randn(channels, H - 2 * p, p)
            delta[:, :p] = up
            delta[:, H - p:] = down
            delta[:, p:H - p, :p] = left
            delta[:, p:H - p, W - p:] = right
        self.delta = nn.Parameter(delta)

    @property
    def num_parameters(self) -> int:
        """Active (frame) elements of δ: C * (H*W - (H-2p)*(W-2p)); 0 when δ is frozen."""
        if not self.delta.requires_grad:
            return 0
        H, W = self.image_size
        p = self.pad_size
        return self.channels * (H * W - (H - 2 * p) * (W - 2 * p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        self._check_input(x, self.image_size, "image_size")
        return visual_prompt(x, self.delta, mask="frame", mask_width=self.pad_size, squash="none",
                             order="post_norm", mean=self.mean, std=self.std, backend=self.backend)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, pad_size={self.pad_size}, channels={self.channels}"


class ExpansivePrompter(_Prompter):
    """ILM-VP / BLM padding reprogramming: the image centred on a larger canvas, a learnable border around it.

    out = norm(clamp(place(x) + m_outside * sigmoid(δ)))     (clamp only when ``clamp`` is given)

    ``place`` optionally resizes x (fused: the resized image is never materialised; AutoVP's "resize then
    pad") and centres it with top/left pad ``(H - h2 + 1) // 2``, the rest of the canvas being 0. This is
    ILM-VP's ``ExpansiveVisualPrompt`` (``normalize(F.pad(x) + sigmoid(program) * mask)``): no clamp, which
    is the default here too (the image is in [0, 1] and sigmoid(δ) lands outside it, so nothing exceeds
    [0, 1] anyway); pass ``clamp=(0, 1)`` to clamp before normalising.

    Args:
        output_size: the canvas (H, W) = the model's input size.
        input_size: the size x must have (checked); None accepts any size that fits.
        resize: resize x to this size before placing it (bilinear by default); None: place x at its size.
        mean, std: normalisation after the prompt is added (ImageNet by default; None to skip).
        channels: C.
        resize_mode: "bilinear" | "nearest" (``F.interpolate`` semantics, ``align_corners=False``).
        squash: "sigmoid" (ILM-VP, BLM) | "tanh" | "none".
        clamp: optional (lo, hi) before normalisation.
        backend: backend of the op.

    Shapes: x (B, C, h, w) -> (B, C, H, W) in x's dtype; ``delta`` (C, H, W) float32, initialised to 0
    (ILM-VP's default ``init="zero"``: the border starts at sigmoid(0) = 0.5).

    δ is stored on the whole canvas; the part under the image is inactive (exactly zero gradient).
    ``num_parameters`` counts the border, C * (H*W - h2*w2), when the image size on the canvas is known
    (``resize`` or ``input_size`` given), and the whole of δ otherwise.
    """

    def __init__(self, output_size: Size = 224, input_size: Size | None = None, resize: Size | None = None, *,
                 mean: Channelwise = IMAGENET_MEAN, std: Channelwise = IMAGENET_STD, channels: int = 3,
                 resize_mode: str = "bilinear", squash: str = "sigmoid", clamp: Sequence[float] | None = None,
                 backend: str = "auto") -> None:
        super().__init__(channels, mean, std, backend)
        self.output_size = H, W = _pair(output_size, "output_size")  # type: ignore[misc]
        self.input_size = _pair(input_size, "input_size")
        self.resize = _pair(resize, "resize")
        placed = self.resize or self.input_size
        if placed is not None and (placed[0] > H or placed[1] > W):
            raise ValueError(f"{'resize' if self.resize else 'input_size'}: the image {placed} is larger than "
                             f"output_size={(H, W)}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode: expected one of {RESIZE_MODES}, got {resize_mode!r}")
        if squash not in SQUASHES:
            raise ValueError(f"squash: expected one of {SQUASHES}, got {squash!r}")
        self.resize_mode = resize_mode
        self.squash = squash
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.delta = nn.Parameter(torch.zeros(channels, H, W))

    @property
    def num_parameters(self) -> int:
        """Active (border) elements of δ, or all of δ when the image size is only known per call."""
        if not self.delta.requires_grad:
            return 0
        H, W = self.output_size
        placed = self.resize or self.input_size
        inner = placed[0] * placed[1] if placed is not None else 0
        return self.channels * (H * W - inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) -> (B, C, H, W)."""
        self._check_input(x, self.input_size, "input_size")
        return visual_prompt(x, self.delta, resize=self.resize, resize_mode=self.resize_mode, mask="outside",
                             squash=self.squash, order="pre_norm", clamp=self.clamp, mean=self.mean, std=self.std,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, input_size={self.input_size}, resize={self.resize}, "
                f"squash={self.squash!r}, clamp={self.clamp}, channels={self.channels}")


class FullPrompter(_Prompter):
    """Watermark reprogramming: a learnable perturbation over the whole image (resizing-based VR).

    out = norm(x) + g(δ)                 order="post_norm" (default)
    out = norm(clamp(x + g(δ)))          order="pre_norm"

    with g the squash ("none", "sigmoid", "tanh"; adversarial reprogramming uses tanh) and norm the identity
    unless ``mean``/``std`` are given. x must already be ``image_size`` (resize it in the data pipeline, or
    use :class:`ExpansivePrompter` with ``resize=output_size``, which fuses the resize).

    Shapes: x (B, C, H, W) -> (B, C, H, W) in x's dtype; ``delta`` (C, H, W) float32, initialised to 0; every
    element is active (``num_parameters`` = C*H*W).
    """

    def __init__(self, image_size: Size, channels: int = 3, squash: str = "none", order: str = "post_norm",
                 mean: Channelwise = None, std: Channelwise = None, *, clamp: Sequence[float] | None = None,
                 backend: str = "auto") -> None:
        super().__init__(channels, mean, std, backend)
        self.image_size = H, W = _pair(image_size, "image_size")  # type: ignore[misc]
        if squash not in SQUASHES:
            raise ValueError(f"squash: expected one of {SQUASHES}, got {squash!r}")
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
        if clamp is not None and order != "pre_norm":
            raise ValueError("clamp: only allowed with order='pre_norm'")
        self.squash = squash
        self.order = order
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.delta = nn.Parameter(torch.zeros(channels, H, W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        self._check_input(x, self.image_size, "image_size")
        return visual_prompt(x, self.delta, mask="full", squash=self.squash, order=self.order, clamp=self.clamp,
                             mean=self.mean, std=self.std, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, squash={self.squash!r}, order={self.order!r}, "
                f"channels={self.channels}")


class PatchPrompter(_Prompter):
    """VP's patch prompts: a learnable (C, ph, pw) patch added at a fixed or a random position.

    out = norm(x) + m_patch(top, left) * place(δ_patch)     (norm: identity unless mean/std are given)

    Position:
        * training with ``random_position=True`` (VP's ``RandomPatchPrompter``): a new (top, left) per forward,
          shared by the batch, drawn uniformly over *all* positions where the patch fits,
          top in [0, H - ph], left in [0, W - pw] (VP draws from [0, H - ph), never touching the last row or
          column; this is the unbiased version). Draws come from the module's own ``torch.Generator`` (CPU),
          seeded by ``seed`` (or, when None, from torch's global RNG at construction, so
          ``torch.manual_seed`` makes it reproducible too); ``manual_seed`` re-seeds it. The generator's
          state is not part of ``state_dict``.
        * in eval mode, or with ``random_position=False`` (VP's ``FixedPatchPrompter``): ``position``,
          (0, 0) = the top-left corner by default, as in VP.
        ``last_position`` holds the (top, left) of the latest forward.

    Shapes: x (B, C, H, W) -> (B, C, H, W) in x's dtype; ``delta`` (C, ph, pw) float32, ``torch.randn`` as VP
    (same draw under the same seed). ``num_parameters`` = C*ph*pw.

    The op takes a canvas-sized δ, so each forward places the patch on a zero (C, H, W) canvas with one
    ``F.pad`` (C*H*W elements, shared by the batch: negligible next to the (B, C, H, W) output); the op's
    ``mask="patch"`` then confines the addition to the patch, and the gradient flows back through the pad.
    Drawing the position calls ``.item()`` on a CPU tensor (no device sync; a graph break under
    ``torch.compile``).
    """

    def __init__(self, image_size: Size = 224, patch_size: Size = 30, channels: int = 3,
                 random_position: bool = True, *, position: Sequence[int] = (0, 0), seed: int | None = None,
                 mean: Channelwise = None, std: Channelwise = None, backend: str = "auto") -> None:
        super().__init__(channels, mean, std, backend)
        self.image_size = H, W = _pair(image_size, "image_size")  # type: ignore[misc]
        self.patch_size = ph, pw = _pair(patch_size, "patch_size")  # type: ignore[misc]
        if ph > H or pw > W:
            raise ValueError(f"patch_size: the patch {(ph, pw)} is larger than image_size={(H, W)}")
        top, left = (int(v) for v in position)
        if top < 0 or left < 0 or top + ph > H or left + pw > W:
            raise ValueError(f"position: a {(ph, pw)} patch at (top, left)={(top, left)} leaves the canvas {(H, W)}")
        self.position = (top, left)
        self.random_position = bool(random_position)
        self.delta = nn.Parameter(torch.randn(channels, ph, pw))
        if seed is None:
            # drawn on the CPU explicitly: a meta device context (FSDP2-style construction) has no values to draw
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        self._generator = torch.Generator()
        self.manual_seed(seed)
        self.last_position: tuple[int, int] | None = None

    def manual_seed(self, seed: int) -> PatchPrompter:
        """Re-seed the position generator (the sequence of random positions restarts)."""
        self.seed = int(seed)
        self._generator.manual_seed(self.seed)
        return self

    def next_position(self) -> tuple[int, int]:
        """The (top, left) the next forward uses (draws from the generator when random)."""
        if not (self.training and self.random_position):
            return self.position
        (H, W), (ph, pw) = self.image_size, self.patch_size
        # the generator is a CPU one: draw on the CPU whatever the ambient device (a meta context included)
        top = int(torch.randint(0, H - ph + 1, (), generator=self._generator, device="cpu").item())
        left = int(torch.randint(0, W - pw + 1, (), generator=self._generator, device="cpu").item())
        return top, left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        self._check_input(x, self.image_size, "image_size")
        top, left = self.last_position = self.next_position()
        (H, W), (ph, pw) = self.image_size, self.patch_size
        canvas_delta = F.pad(self.delta, (left, W - left - pw, top, H - top - ph))
        return visual_prompt(x, canvas_delta, mask="patch", patch=(top, left, ph, pw), squash="none",
                             order="post_norm", mean=self.mean, std=self.std, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, patch_size={self.patch_size}, channels={self.channels}, "
                f"random_position={self.random_position}, position={self.position}, seed={self.seed}")


class MaskGenerator(nn.Module):
    """SMM's lightweight mask generator ("AttributeNet"): (B, C, H, W) -> (B, mask_channels, H/k, W/k).

    ``layers - 1`` blocks of 3x3 conv (widths 8, 16, 32, 64, ...) + BatchNorm + ReLU, a 2x2 max-pool after
    each of the first log2(k) blocks, then a 3x3 conv to ``mask_channels`` = C (one mask per channel), or,
    for ``mask_channels=1``, the mean over the last block's features (SMM's choice). The output is
    real-valued and unbounded, as in SMM. k must be a power of two with log2(k) <= layers - 1.
    """

    def __init__(self, in_channels: int = 3, mask_channels: int = 3, patch_size: int = 8, layers: int = 5) -> None:
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size: expected a power of two (the mask is pooled by 2 per block), "
                             f"got {patch_size!r}")
        pools = int(math.log2(patch_size))
        if layers < 2 or pools > layers - 1:
            raise ValueError(f"layers: a patch size of {patch_size} needs {pools} pooling blocks, so layers >= "
                             f"{pools + 1} (and >= 2), got {layers!r}")
        if mask_channels not in (1, in_channels):
            raise ValueError(f"mask_channels: expected 1 or {in_channels}, got {mask_channels!r}")
        self.patch_size, self.mask_channels = patch_size, mask_channels
        blocks: list[nn.Module] = []
        width_in = in_channels
        for i in range(layers - 1):
            width = 8 * 2**i
            blocks += [nn.Conv2d(width_in, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < pools:
                blocks.append(nn.MaxPool2d(2, 2))
            width_in = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width_in, mask_channels, 3, 1, 1) if mask_channels != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        return self.head(y) if self.head is not None else y.mean(dim=1, keepdim=True)


class SampleSpecificMaskPrompter(_Prompter):
    """SMM (Cai et al. 2024): a shared δ masked by a per-sample mask that a small CNN predicts from the image.

    r = resize(x) to the canvas (bilinear; the identity when x is already the canvas size)
    m = MaskGenerator(r)                                   (B, C or 1, H/k, W/k), k = ``patch_size``
    out = norm(clamp(r + upsample_k(m) * g(δ)))             upsample_k: each mask value covers a k x k patch

    The op receives x (not r) with ``resize=output_size`` and the patch-resolution mask, and does the resize,
    the k-fold nearest upsampling ("patch-wise interpolation"), the product, the addition and the
    normalisation in one pass; only the CNN's input r is materialised (the CNN needs it). g is the identity
    by default (SMM adds the raw δ); ``mean``/``std`` normalise after the addition (ImageNet by default).

    Args:
        output_size: the canvas (H, W), divisible by ``patch_size``.
        input_size: the size x must have (checked); None accepts any size <= the canvas.
        patch_size: k, a power of two (8 in SMM for 224 inputs).
        channels: C.
        mean, std: normalisation after the addition; None skips it.
        mask_channels: C (a mask per channel, SMM's default) or 1 (one mask shared by the channels).
        layers: depth of the mask generator (5 for ResNets, 6 for ViTs in SMM).
        squash: applied to δ ("none" in SMM).
        clamp: optional (lo, hi) before normalisation.
        backend: backend of the op.

    Shapes: x (B, C, h, w) -> (B, C, H, W) in x's dtype. ``delta`` (C, H, W) float32, initialised to 0 (as in
    SMM; note the mask generator gets no gradient while δ is exactly 0, since d out / d m = δ).
    ``mask_generator`` is the CNN; ``num_parameters`` counts δ and the CNN's trainable parameters.
    """

    def __init__(self, output_size: Size = 224, input_size: Size | None = None, patch_size: int = 8,
                 channels: int = 3, mean: Channelwise = IMAGENET_MEAN, std: Channelwise = IMAGENET_STD, *,
                 mask_channels: int | None = None, layers: int = 5, squash: str = "none",
                 clamp: Sequence[float] | None = None, backend: str = "auto") -> None:
        super().__init__(channels, mean, std, backend)
        self.output_size = H, W = _pair(output_size, "output_size")  # type: ignore[misc]
        self.input_size = _pair(input_size, "input_size")
        if self.input_size is not None and (self.input_size[0] > H or self.input_size[1] > W):
            raise ValueError(f"input_size: {self.input_size} is larger than output_size={(H, W)}")
        if H % patch_size or W % patch_size:
            raise ValueError(f"patch_size: must divide output_size={(H, W)}, got {patch_size!r}")
        if squash not in SQUASHES:
            raise ValueError(f"squash: expected one of {SQUASHES}, got {squash!r}")
        self.patch_size = patch_size
        self.squash = squash
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.mask_generator = MaskGenerator(channels, channels if mask_channels is None else mask_channels,
                                            patch_size, layers)
        self.delta = nn.Parameter(torch.zeros(channels, H, W))

    def resize_input(self, x: torch.Tensor) -> torch.Tensor:
        """r(x): x bilinearly resized to the canvas (the mask generator's input)."""
        if tuple(x.shape[-2:]) == self.output_size:
            return x
        return F.interpolate(x, size=self.output_size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) -> (B, C, H, W)."""
        self._check_input(x, self.input_size, "input_size")
        if x.shape[-2] > self.output_size[0] or x.shape[-1] > self.output_size[1]:
            raise ValueError(f"x: images {tuple(x.shape[-2:])} larger than output_size={self.output_size}")
        r = self.resize_input(x)
        # the CNN runs in its own parameters' dtype (fp16 images with an fp32 CNN work; autocast still applies)
        weight = next(self.mask_generator.parameters(), None)
        mask = self.mask_generator(r if weight is None else r.to(weight.dtype))
        resize = None if r is x else self.output_size
        return visual_prompt(x, self.delta, resize=resize, mask=mask, squash=self.squash, order="pre_norm",
                             clamp=self.clamp, mean=self.mean, std=self.std, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, input_size={self.input_size}, patch_size={self.patch_size}, "
                f"squash={self.squash!r}, channels={self.channels}")


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``model`` and return it (train/eval mode untouched)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model

"""CUDA backend of ``visual_prompt``: tensors -> ``VisualPromptParams`` -> the kernels of csrc/visual_prompt.cu.

``visual_prompt`` / ``visual_prompt_backward`` have the signatures every backend module has (see
``reprokernels/ops/visual_prompt.py``) and run the fused kernels on CUDA tensors, on the current stream.

``emulate=True`` runs the very same per-thread C++ functions in plain CPU loops over CPU tensors (the ``*_host``
entry points of the extension): that is how the kernel code is tested on machines without a GPU. The op layer
never passes it, and without it CPU tensors are refused, so the public call on CPU tensors with
``backend="cuda"`` keeps failing in backend selection and never falls back to the (slow) emulation.

Type plan: x / out / grad / dx in x's dtype (float32, float16, bfloat16); delta in float32 or x's dtype (any other
float dtype is cast to float32 and its gradient cast back); a tensor mask in float32 (cast when it is not: a mask
is small); mean / std float32 (C,). Everything is computed in float32 and rounded once at the store.

Backward: one fused kernel writes dx (or, with a resize, the float32 gradient of the placed image), ddelta and
dmask without atomics. Reductions go through float32 partials (ddelta: one per batch chunk; dmask: one per chunk
and mask-window tile), summed here by torch: deterministic (see ``_backward_plan`` for their number).
The one non-fused step: with a resize, dx is finished by ATen's ``upsample_{bilinear,nearest}2d_backward`` of the
placed-image gradient (dx is rare in visual reprogramming: the image is data, not a parameter). On CUDA that ATen
kernel uses atomics, so that dx alone is not bitwise deterministic.
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import empty_output
from ..reference.visual_prompt import VPSpec
from ._launch import DTYPE_CODES, check_devices, float_code, launch

SQUASH_CODES = {"none": 0, "sigmoid": 1, "tanh": 2}
ORDER_CODES = {"pre_norm": 0, "post_norm": 1}
RESIZE_CODES = {"none": 0, "nearest": 1, "bilinear": 2}

# The backward splits the batch into chunks (and mask windows into tiles) only as far as needed to have about
# this many work items (threads) in flight, roughly a full wave on a large GPU (132 SMs x 2048 threads): every
# extra chunk of a shared delta costs one more float32 partial of delta's size to write and sum.
BWD_TARGET_ITEMS = 1 << 18


def _check_inputs(emulate: bool, **tensors: torch.Tensor | None) -> None:
    """Every tensor on a CUDA device (or, emulating, on the CPU); x in a kernel dtype."""
    check_devices(emulate, **tensors)
    x = tensors["x"]
    assert x is not None
    float_code(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, h, w), got shape {tuple(x.shape)}")


def _kernel_delta(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """delta as the kernels read it: float32 or x's dtype (the instantiated pairs); any strides."""
    if delta.dtype in (torch.float32, x.dtype):
        return delta
    return delta.to(torch.float32)


def _kernel_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor mask as a float32 (Bm, Cm, Hm, Wm) view (leading size-1 dims added), any strides."""
    if mask is None:
        return None
    m = mask if mask.dtype == torch.float32 else mask.to(torch.float32)
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m


def _channel(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(device=x.device, dtype=torch.float32).contiguous()


def _params(x: torch.Tensor, delta: torch.Tensor, mask4: torch.Tensor | None, mean: torch.Tensor | None,
            std: torch.Tensor | None, spec: VPSpec, emulate: bool):
    """The parameter block shared by forward and backward (inputs, sizes, strides, codes; no outputs)."""
    p = _cuda.extension().VisualPromptParams()
    B, C, h, w = x.shape
    p.B, p.C, p.h, p.w = B, C, h, w
    p.H, p.W, p.h2, p.w2, p.top, p.left = spec.H, spec.W, spec.h2, spec.w2, spec.top, spec.left
    p.rect_top, p.rect_left, p.rect_h, p.rect_w = spec.rect_top, spec.rect_left, spec.rect_h, spec.rect_w
    p.invert = int(spec.invert)
    p.x = x.data_ptr()
    p.x_sb, p.x_sc, p.x_sh, p.x_sw = x.stride()
    p.x_dtype = DTYPE_CODES[x.dtype]
    p.delta = delta.data_ptr()
    p.delta_dtype = DTYPE_CODES[delta.dtype]
    p.delta_per_sample = int(delta.dim() == 4)
    # a shared (C, H, W) delta is read with batch stride 0
    p.delta_sb, p.delta_sc, p.delta_sh, p.delta_sw = delta.stride() if delta.dim() == 4 else (0, *delta.stride())
    if mask4 is not None:
        p.mask = mask4.data_ptr()
        p.Bm, p.Cm, p.Hm, p.Wm = mask4.shape
        sb, sc, sh, sw = mask4.stride()
        # broadcast dims read index 0 through stride 0
        p.mask_sb, p.mask_sc, p.mask_sh, p.mask_sw = (0 if p.Bm == 1 else sb), (0 if p.Cm == 1 else sc), sh, sw
    p.mean = mean.data_ptr() if mean is not None else 0
    p.stdev = std.data_ptr() if std is not None else 0
    p.squash = SQUASH_CODES[spec.squash]
    p.order = ORDER_CODES[spec.order]
    p.resize = RESIZE_CODES[spec.resize_mode]
    p.align_corners = int(spec.align_corners)
    p.fill = spec.fill
    p.has_clamp = int(spec.has_clamp)
    if spec.has_clamp:
        p.clamp_lo, p.clamp_hi = spec.clamp_lo, spec.clamp_hi
    p.stream = 0 if emulate else _cuda.stream_of(x)
    return p


def visual_prompt(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, mean: torch.Tensor | None,
                  std: torch.Tensor | None, spec: VPSpec, *, emulate: bool = False) -> torch.Tensor:
    """Forward. x (B, C, h, w) any strides; delta (C, H, W) | (B, C, H, W); mask None | (Bm, Cm, H', W') (2-4 dims);
    mean/std None | (C,). Returns (B, C, H, W) contiguous in x's dtype."""
    _check_inputs(emulate, x=x, delta=delta, mask=mask, mean=mean, std=std)
    B, C = x.shape[:2]
    out = empty_output((B, C, spec.H, spec.W), x.dtype, x.device)
    if out.numel() == 0:
        return out
    delta_k, mask4 = _kernel_delta(delta, x), _kernel_mask(mask)
    mean_k, std_k = _channel(mean, x), _channel(std, x)
    p = _params(x, delta_k, mask4, mean_k, std_k, spec, emulate)
    p.out = out.data_ptr()
    launch("visual_prompt_fwd", p, x.device, emulate)
    return out


def _divisor_pair(kh: int, kw: int, need: int) -> tuple[int, int]:
    """(split_h, split_w) dividing (kh, kw) with the fewest tiles >= need (all of them if none suffices);
    ties go to more column splits: narrow tiles put adjacent threads on adjacent pixels."""
    best = (kh, kw)
    for sh in (d for d in range(1, kh + 1) if kh % d == 0):
        for sw in (d for d in range(1, kw + 1) if kw % d == 0):
            n, n_best = sh * sw, best[0] * best[1]
            if n >= need and (n < n_best or (n == n_best and sw > best[1])):
                best = (sh, sw)
    return best


def _backward_plan(B: int, C: int, H: int, W: int, mask4: torch.Tensor | None, need_mask: bool,
                   shared_delta_grad: bool, itemsize: int) -> tuple[int, int, int]:
    """(chunk, split_h, split_w) of the backward's work items: enough items (about BWD_TARGET_ITEMS) at the
    least cost in float32 partials.

    Chunks (samples per item) come first, but for a shared delta's gradient each chunk beyond the first costs a
    float32 partial of delta's size (written, then read by the sum), so their number is capped at about a
    quarter of the grad bytes it splits. With a per-sample mask whose gradient is asked for, a chunk holds at
    most VISUAL_PROMPT_MAX_CHUNK samples (one register accumulator each). Then mask windows are split into
    tiles: fully (one pixel per item) when no mask gradient is asked for, else only as far as needed, since each
    split adds a dmask partial.
    """
    max_chunk = int(_cuda.extension().VISUAL_PROMPT_MAX_CHUNK)
    Bp = max(B, 1)
    # max(..., 1): with C == 0 there is no work item (the caller launches nothing), only a plan to return
    if mask4 is None:
        kh = kw = 1
        cells = max(C * H * W, 1)
    else:
        _, Cm, Hm, Wm = mask4.shape
        kh, kw = H // Hm, W // Wm
        cells = max((1 if Cm == 1 and need_mask else C) * Hm * Wm, 1)
    if need_mask and mask4 is not None and mask4.shape[0] != 1:
        chunk = min(Bp, max_chunk)
    else:
        cap = max(1, B * itemsize // 32) if shared_delta_grad else Bp
        want = -(-BWD_TARGET_ITEMS // (cells * kh * kw))  # chunks needed even with one pixel per item
        chunk = -(-Bp // max(1, min(cap, Bp, want)))
    if mask4 is None:
        return chunk, 1, 1
    if not need_mask:
        return chunk, kh, kw
    nchunks = -(-Bp // chunk)
    sh, sw = _divisor_pair(kh, kw, -(-BWD_TARGET_ITEMS // (nchunks * cells)))
    return chunk, sh, sw


def visual_prompt_backward(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None,
                           mean: torch.Tensor | None, std: torch.Tensor | None, spec: VPSpec, need_x: bool,
                           need_delta: bool, need_mask: bool, *, emulate: bool = False, chunk: int | None = None,
                           split: tuple[int, int] | None = None
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, ddelta, dmask) for grad (B, C, H, W) (any strides); None where not needed.

    dx: (B, C, h, w) contiguous in x's dtype; ddelta: delta's shape and dtype; dmask: mask's shape and dtype.
    ``chunk`` (samples per work item) and ``split`` (tiles per mask window) override the launch plan of
    ``_backward_plan``; tests use them to cover every partial-sum path.
    """
    need_mask = bool(need_mask) and mask is not None
    if not (need_x or need_delta or need_mask):
        return None, None, None
    _check_inputs(emulate, grad=grad, x=x, delta=delta, mask=mask, mean=mean, std=std)
    B, C, h, w = x.shape
    H, W, h2, w2 = spec.H, spec.W, spec.h2, spec.w2
    if tuple(grad.shape) != (B, C, H, W):
        raise ValueError(f"grad: expected shape {(B, C, H, W)} (the output's), got {tuple(grad.shape)}")
    grad_k = grad if grad.dtype == x.dtype else grad.to(x.dtype)  # the reference casts it to out's dtype too
    delta_k, mask4 = _kernel_delta(delta, x), _kernel_mask(mask)
    mean_k, std_k = _channel(mean, x), _channel(std, x)
    p = _params(x, delta_k, mask4, mean_k, std_k, spec, emulate)
    p.grad = grad_k.data_ptr()
    p.grad_sb, p.grad_sc, p.grad_sh, p.grad_sw = grad_k.stride()

    plan = _backward_plan(B, C, H, W, mask4, need_mask, need_delta and delta.dim() == 3, x.element_size())
    p.chunk = int(chunk) if chunk is not None else plan[0]
    p.split_h, p.split_w = (int(v) for v in split) if split is not None else plan[1:]
    nchunks, nsplit = -(-B // p.chunk), p.split_h * p.split_w
    f32, dev = torch.float32, x.device

    dx_buf = dd_buf = dm_buf = None
    if need_x:  # every x element (or placed-image element) is written by the kernel
        dx_buf = (empty_output((B, C, h2, w2), f32, dev) if spec.resize_mode != "none"
                  else empty_output((B, C, h, w), x.dtype, dev))
        p.dx = dx_buf.data_ptr()
    if need_delta:
        if delta.dim() == 4:
            dd_buf = empty_output((B, C, H, W), delta_k.dtype, dev)
        elif nchunks == 1:
            dd_buf = empty_output((C, H, W), delta_k.dtype, dev)
        else:  # one float32 partial per chunk (none when B == 0: the sum is then 0)
            dd_buf = empty_output((nchunks, C, H, W), f32, dev)
        p.ddelta = dd_buf.data_ptr()
    if need_mask:
        assert mask4 is not None
        Bm, Cm, Hm, Wm = mask4.shape
        # float32 partials: per tile of a window, and per chunk too when the mask is shared by the batch
        shape = (nsplit, Bm, Cm, Hm, Wm) if Bm != 1 else (nchunks * nsplit, Cm, Hm, Wm)
        dm_buf = empty_output(shape, f32, dev)
        p.dmask = dm_buf.data_ptr()

    if nchunks > 0 and C > 0:
        launch("visual_prompt_bwd", p, x.device, emulate)
    else:  # no work item ran (B == 0 or C == 0): every gradient is zero
        for buf in (dx_buf, dd_buf, dm_buf):
            if buf is not None:
                buf.zero_()

    dx = ddelta = dmask = None
    if dx_buf is not None:
        if spec.resize_mode == "none":
            dx = dx_buf
        elif B == 0 or C == 0:
            dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        else:  # the one non-fused step: the resize's adjoint, by ATen
            if spec.resize_mode == "bilinear":
                dxf = torch.ops.aten.upsample_bilinear2d_backward(dx_buf, [h2, w2], [B, C, h, w],
                                                                  spec.align_corners, None, None)
            else:
                dxf = torch.ops.aten.upsample_nearest2d_backward(dx_buf, [h2, w2], [B, C, h, w], None, None)
            dx = dxf.to(x.dtype).contiguous()
    if dd_buf is not None:
        if delta.dim() == 3 and nchunks != 1:
            dd_buf = dd_buf.sum(0)
        ddelta = dd_buf.to(delta.dtype)
    if dm_buf is not None:
        assert mask is not None and mask4 is not None
        dm = dm_buf[0] if dm_buf.shape[0] == 1 else dm_buf.sum(0)
        dmask = dm.reshape(mask.shape).to(mask.dtype)
    return dx, ddelta, dmask

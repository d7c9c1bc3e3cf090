"""cpu backend of ``visual_prompt``: tensors -> ``VisualPromptParams`` -> csrc/cpu/visual_prompt.cpp.

Every mask kind (outside / full / frame / patch rectangles, real tensor masks at canvas or patch resolution,
broadcast over batch and channels), squash none / sigmoid / tanh, pre_norm (with clamp) and post_norm, mean /
std, shared or per-sample delta. Not implemented: ``resize`` (the fused bilinear / nearest resample): such calls
raise BackendUnavailableError here, and ``supports`` tells auto to keep the reference for them.

Type plan: x / out / grad / dx in x's dtype (float32, float16, bfloat16); delta in any of the three (float64 is
cast to float32 and its gradient cast back); a tensor mask read as float32; mean / std float32 (C,). Computed in
float32, rounded once at the store (float16 rows are converted by the CPU's conversion instructions where it has
them, bitwise as the scalar code). Both passes walk blocks of canvas rows, the batch in sample order inside a
block: the shared delta's gradient is summed over the batch and the mask gradient over each mask cell in a fixed
order by the thread that owns the block: deterministic.
"""

from __future__ import annotations

import torch

from .. import _cpu
from .._alloc import empty_output
from .._backend import BackendUnavailableError
from ..reference.visual_prompt import VPSpec
from . import DTYPE_CODES, case_dict, check_cpu, dtype_reason, float_code

SQUASH_CODES = {"none": 0, "sigmoid": 1, "tanh": 2}
ORDER_CODES = {"pre_norm": 0, "post_norm": 1}


def supports(case: tuple) -> str:
    """case keys: dtype (of x), resize (the spec's resize_mode), mask ("fixed": a string mask kind, or "tensor"),
    delta ("shared" (C, H, W) or "per_sample").

    auto takes the cpu kernels for x of any kernel dtype without resize: every mask kind and delta layout, any
    squash, order, clamp, mean/std. Measured (benchmarks/shapes.py quick B8 and full B256 shapes: ILM-VP expansive
    32 -> 224 sigmoid and SMM per-sample 3x28x28 masks; float32 / float16 / bfloat16; fwd and fwd+bwd; interleaved
    medians) faster than the eager chain on every point (1.4-20x) and than torch.compile of it on all but these,
    where it ties or trails: expansive float32 fwd+bwd at B8 (1.0x on 1 thread), per-sample deltas at B8 (a tie),
    and B1, where the op's fixed per-call cost leaves it behind both eager and compile (auto cannot route by size:
    case carries none). Not implemented: resize.
    """
    d = case_dict(case)
    if d.get("resize", "none") != "none":
        return f"resize={d['resize']!r}: the cpu kernels place the image at its own size only (no fused resample)"
    return dtype_reason(d, "dtype")


def _check(x: torch.Tensor, spec: VPSpec) -> None:
    float_code(x, "x")
    if spec.resize_mode != "none":
        raise BackendUnavailableError(f"resize: the cpu backend does not implement a fused resize "
                                      f"(resize_mode={spec.resize_mode!r}); use backend='reference' or 'auto'")


def _kernel_delta(delta: torch.Tensor) -> torch.Tensor:
    return delta if delta.dtype in DTYPE_CODES else delta.to(torch.float32)


def _kernel_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    m = mask if mask.dtype == torch.float32 else mask.to(torch.float32)
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m


def _params(x, delta, mask4, mean, std, spec: VPSpec):
    p = _cpu.Params()
    B, C, h, w = x.shape
    p.B, p.C, p.h, p.w = B, C, h, w
    p.H, p.W, p.top, p.left = spec.H, spec.W, spec.top, spec.left
    p.rect_top, p.rect_left, p.rect_h, p.rect_w = spec.rect_top, spec.rect_left, spec.rect_h, spec.rect_w
    p.invert = int(spec.invert)
    p.x = x.data_ptr()
    p.x_sb, p.x_sc, p.x_sh, p.x_sw = x.stride()
    p.x_dtype = DTYPE_CODES[x.dtype]
    p.delta = delta.data_ptr()
    p.delta_dtype = DTYPE_CODES[delta.dtype]
    p.delta_per_sample = int(delta.dim() == 4)
    p.delta_sb, p.delta_sc, p.delta_sh, p.delta_sw = delta.stride() if delta.dim() == 4 else (0, *delta.stride())
    if mask4 is not None:
        p.mask = mask4.data_ptr()
        p.Bm, p.Cm, p.Hm, p.Wm = mask4.shape
        sb, sc, sh, sw = mask4.stride()
        p.mask_sb, p.mask_sc, p.mask_sh, p.mask_sw = (0 if p.Bm == 1 else sb), (0 if p.Cm == 1 else sc), sh, sw
    p.mean = mean.data_ptr() if mean is not None else 0
    p.stdev = std.data_ptr() if std is not None else 0
    p.squash = SQUASH_CODES[spec.squash]
    p.order = ORDER_CODES[spec.order]
    p.fill = spec.fill
    p.has_clamp = int(spec.has_clamp)
    if spec.has_clamp:
        p.clamp_lo, p.clamp_hi = spec.clamp_lo, spec.clamp_hi
    return p


def _channel(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def visual_prompt(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, mean: torch.Tensor | None,
                  std: torch.Tensor | None, spec: VPSpec) -> torch.Tensor:
    check_cpu(x=x, delta=delta, mask=mask, mean=mean, std=std)
    _check(x, spec)
    B, C = x.shape[:2]
    out = empty_output((B, C, spec.H, spec.W), x.dtype, x.device)
    if out.numel() == 0:
        return out
    delta_k, mask4, mean_k, std_k = _kernel_delta(delta), _kernel_mask(mask), _channel(mean), _channel(std)
    p = _params(x, delta_k, mask4, mean_k, std_k, spec)
    p.out = out.data_ptr()
    _cpu.run("visual_prompt_fwd", p)
    return out


def visual_prompt_backward(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None,
                           mean: torch.Tensor | None, std: torch.Tensor | None, spec: VPSpec, need_x: bool,
                           need_delta: bool, need_mask: bool
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    need_mask = bool(need_mask) and mask is not None
    if not (need_x or need_delta or need_mask):
        return None, None, None
    check_cpu(grad=grad, x=x, delta=delta, mask=mask, mean=mean, std=std)
    _check(x, spec)
    B, C, h, w = x.shape
    if tuple(grad.shape) != (B, C, spec.H, spec.W):
        raise ValueError(f"grad: expected shape {(B, C, spec.H, spec.W)} (the output's), got {tuple(grad.shape)}")
    grad_k = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    delta_k, mask4, mean_k, std_k = _kernel_delta(delta), _kernel_mask(mask), _channel(mean), _channel(std)
    p = _params(x, delta_k, mask4, mean_k, std_k, spec)
    p.grad = grad_k.data_ptr()
    p.grad_sb, p.grad_sc, p.grad_sh, p.grad_sw = grad_k.stride()
    dev = x.device
    dx = empty_output((B, C, h, w), x.dtype, dev) if need_x else None
    dd = empty_output(tuple(delta_k.shape), delta_k.dtype, dev) if need_delta else None
    dm = empty_output(tuple(mask4.shape), torch.float32, dev) if need_mask else None
    p.dx = dx.data_ptr() if dx is not None else 0
    p.ddelta = dd.data_ptr() if dd is not None else 0
    p.dmask = dm.data_ptr() if dm is not None else 0
    if C == 0 or B == 0:
        for t in (dx, dd, dm):
            if t is not None:
                t.zero_()
    else:
        _cpu.run("visual_prompt_bwd", p)
    ddelta = dd.to(delta.dtype) if dd is not None else None
    dmask = dm.reshape(mask.shape).to(mask.dtype) if dm is not None else None
    return dx, ddelta, dmask

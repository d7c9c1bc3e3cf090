"""Benchmark of ``visual_prompt``: ``python -m benchmarks.run visual_prompt [--quick]``.

Shapes: ``SHAPES["visual_prompt"]`` in benchmarks/shapes.py (ILM-VP expansive padding, SMM per-sample mask).

Providers
    eager              what a user writes today (ILM-VP / SMM code): F.pad (or F.interpolate of the mask),
                       sigmoid, * mask, +, Normalize as separate ops, then a cast to x's dtype (the model
                       consumes x's dtype). The baseline.
    eager+compile      ``torch.compile`` of that chain (inductor fuses it); the best a compiler does with the
                       user's code.
    reference          ``reprokernels.visual_prompt(..., backend="reference")`` (the spec, behind the op).
    cpu                ``backend="cpu"``: the C++/OpenMP kernels (csrc/cpu/); a skipped row on a GPU, without the
                       built extension or for what it does not implement (resize), with the reason.
    auto               ``backend="auto"``: what a user gets by default (docs/cpu-backend.md says what it picks).
    triton / cuda      the fused kernels; on a CPU they get a skipped row (the interpreter is not timed, CUDA
                       needs a GPU), as does any provider that cannot run (with the reason).

Minimum bytes (what a one-pass kernel must move): fwd = x + delta + tensor mask + out (a fixed mask kind is a
rule, not a tensor: 0 bytes); fwd+bwd adds the output gradient read once, d delta written once and, for a
tensor mask, d mask written once. x is data (no gradient).

Before timing, each provider's forward (and, in fwd+bwd, its gradients) is checked against the eager
baseline; a mismatch is written in the row's note. On the CPU the providers of a case and mode are timed
interleaved, round by round (benchmarks/common.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import reprokernels
from benchmarks.common import Row, op_provider, run_shapes
from benchmarks.shapes import SHAPES

OP = "visual_prompt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROVIDERS = ("eager", "eager+compile", "reference", "cpu", "auto", "triton", "cuda")


def shape_name(s: dict) -> str:
    base = f"{s['name']} B{s['B']} {s['C']}x{s['h']}x{s['w']}"
    if (s["h"], s["w"]) != (s["H"], s["W"]):
        base += f"->{s['H']}x{s['W']}"
    if s["mask"] == "tensor":
        base += f" m{s['mask_channels']}x{s['mask_res'][0]}x{s['mask_res'][1]}"
    return base


class Case:
    """Inputs of one (shape, dtype) and the op's keyword arguments."""

    def __init__(self, s: dict, dtype: torch.dtype, device: torch.device) -> None:
        self.s, self.dtype, self.device = s, dtype, device
        B, C, h, w, H, W = (s[k] for k in ("B", "C", "h", "w", "H", "W"))
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.rand(B, C, h, w, generator=g).to(device=device, dtype=dtype)
        self.delta = torch.randn(C, H, W, generator=g).to(device).requires_grad_()
        self.mask = None
        if s["mask"] == "tensor":
            mh, mw = s["mask_res"]
            self.mask = torch.rand(B, s["mask_channels"], mh, mw, generator=g).to(device).requires_grad_()
        norm = s.get("norm") == "imagenet"
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, C, 1, 1) if norm else None
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, C, 1, 1) if norm else None
        self.kwargs = dict(size=(H, W), mask=self.mask if self.mask is not None else s["mask"], squash=s["squash"],
                           order=s["order"], mean=self.mean.view(-1) if norm else None,
                           std=self.std.view(-1) if norm else None)  # device tensors, as a module's buffers
        # the fixed mask of the eager baseline, built once (ILM-VP registers it as a buffer)
        self.top, self.left = (H - h + 1) // 2, (W - w + 1) // 2
        if s["mask"] == "outside":
            self.fixed_mask = F.pad(torch.zeros(C, h, w, device=device),
                                    (self.left, W - self.left - w, self.top, H - self.top - h), value=1)
        elif s["mask"] == "full":
            self.fixed_mask = torch.ones(C, H, W, device=device)
        elif s["mask"] != "tensor":
            raise ValueError(f"benchmark: mask kind {s['mask']!r} has no eager baseline here")
        self.grad_out = torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype)

    @property
    def wrt(self) -> list[torch.Tensor]:
        return [self.delta] + ([self.mask] if self.mask is not None else [])

    def min_bytes(self, mode: str) -> int:
        x_b = self.x.numel() * self.x.element_size()
        d_b = self.delta.numel() * self.delta.element_size()
        m_b = self.mask.numel() * self.mask.element_size() if self.mask is not None else 0
        out_b = self.grad_out.numel() * self.x.element_size()
        fwd = x_b + d_b + m_b + out_b
        return fwd if mode == "fwd" else fwd + out_b + d_b + m_b

    # -- providers: each a function (x, delta, mask) -> out

    def eager(self, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        s = self.s
        H, W = s["H"], s["W"]
        squashed = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}.get(s["squash"], lambda t: t)(delta)
        if mask is None:
            m = self.fixed_mask
        else:  # SMM's patch-wise interpolation
            m = F.interpolate(mask, size=(H, W), mode="nearest")
        canvas = x if (s["h"], s["w"]) == (H, W) else F.pad(
            x, (self.left, W - self.left - s["w"], self.top, H - self.top - s["h"]), value=0)
        if s["order"] == "pre_norm":
            v = canvas + squashed * m
            if self.mean is not None:
                v = (v - self.mean) / self.std
        else:
            v = canvas if self.mean is None else (canvas - self.mean) / self.std
            v = v + squashed * m
        return v.to(x.dtype)

    def op(self, backend: str) -> Callable[..., torch.Tensor]:
        kwargs = dict(self.kwargs)

        def f(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            if mask is not None:
                kwargs["mask"] = mask
            return reprokernels.visual_prompt(x, delta, backend=backend, **kwargs)

        return f

    def compiled_eager(self) -> Callable[..., torch.Tensor]:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across shapes/dtypes
        return torch.compile(self.eager, dynamic=False)

    def runner(self, f: Callable[..., torch.Tensor], mode: str) -> Callable[[], object]:
        x, delta, mask, g, wrt = self.x, self.delta, self.mask, self.grad_out, self.wrt
        if mode == "fwd":
            def fwd() -> object:
                with torch.no_grad():
                    return f(x, delta, mask)
            return fwd

        def fwd_bwd() -> object:
            return torch.autograd.grad(f(x, delta, mask), wrt, g)
        return fwd_bwd

    def check(self, f: Callable[..., torch.Tensor], mode: str) -> str:
        """'' when f agrees with the eager baseline (output, and gradients in fwd+bwd), else what differs."""
        tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[self.dtype]
        out = f(self.x, self.delta, self.mask)
        ref = self.eager(self.x, self.delta, self.mask)
        got, want = [out], [ref]
        names = ["out"]
        if mode != "fwd":
            got += torch.autograd.grad(out, self.wrt, self.grad_out)
            want += torch.autograd.grad(ref, self.wrt, self.grad_out)
            names += ["ddelta", "dmask"][:len(self.wrt)]
        bad = []
        for name, a, b in zip(names, got, want, strict=True):
            a, b = a.detach().float(), b.detach().float()
            err = float(((a - b).abs() / (1 + b.abs())).max()) if a.numel() else 0.0
            # gradients are float32 sums over the batch in every provider (from the same grad_out): they
            # differ only by summation order (~1e-5 relative at B=256)
            if a.shape != b.shape or not err <= (tol if name == "out" else 1e-3):
                bad.append(f"{name} err {err:.2g}")
        return "MISMATCH vs eager: " + ", ".join(bad) if bad else ""


def _provider_fn(case: Case, provider: str) -> tuple[Callable[..., torch.Tensor] | None, str]:
    """(function, '') or (None, why it cannot run here)."""
    return op_provider(case, provider, "eager")


def run(device: torch.device | str, quick: bool = False) -> list[Row]:
    return run_shapes(OP, SHAPES[OP]["quick" if quick else "full"], Case, PROVIDERS, _provider_fn, shape_name,
                      device, quick)

"""Benchmark of ``label_map`` and ``label_histogram``: ``python -m benchmarks.run label_map [--quick]``.

Shapes: ``SHAPES["label_map"]`` in benchmarks/shapes.py (entries with ``op="label_map"`` or
``op="label_histogram"``).

label_map providers
    eager              the chain research code writes: ``logits[:, idx]``, ``log_softmax(logits)[:, idx]``,
                       ``softmax(logits)[:, idx].mean(-1)`` (many-to-one), ``logits @ omega`` (BLM's dense
                       omega). The baseline.
    eager+compile      ``torch.compile`` of that chain (inductor fuses it); the best a compiler does with it.
    reference          ``reprokernels.label_map(..., backend="reference")`` (the spec behind the op).
    cpu                ``backend="cpu"``: the C++/OpenMP kernels (csrc/cpu/); a skipped row on a GPU or without
                       the built extension (the reason is the row's note).
    auto               ``backend="auto"``: what a user gets by default (on CPU tensors ``cpu`` where measured
                       faster, else the reference; docs/cpu-backend.md).
    triton / cuda      the fused kernels. On a CPU they get a skipped row (the interpreter is not timed, CUDA
                       needs a GPU); on a GPU a kernel module that does not exist yet
                       (reprokernels/triton/label_map.py, reprokernels/cuda/label_map.py) or that cannot run
                       gets a skipped row with the reason.

label_histogram providers (the running statistic of FLM/ILM/BLM/BLM+, accumulated into a float32 ``out``)
    eager              what BLM's code does: ``bincount(argmax * K_tgt + y)`` for counts; softmax, ``topk``,
                       ``index_put_(accumulate=True)`` for the top-k probability mass. The baseline.
    eager+compile      ``torch.compile`` of that function.
    reference          ``reprokernels.label_histogram(..., backend="reference")``.
    cpu / auto         ``backend="cpu"`` / ``backend="auto"`` (as for label_map).
    triton             the fused kernels (skipped on a CPU).
    cuda               the CUDA kernels (reprokernels/cuda/label_histogram.py; skipped on a CPU).

Minimum bytes: label_map fwd = logits + mapping + out; fwd+bwd adds the output gradient and d logits.
label_histogram = logits + targets + the statistic read and written once (counts: at most B cells of it).
FLOPs: dense mappings only, 2 * B * K_src * K_tgt per GEMM (fwd one, fwd+bwd two: the mapping is fixed).

Before timing, each provider's output (and, fwd+bwd, its d logits) is checked against the eager chain; a
mismatch is written in the row's note. On the CPU the providers of a case and mode are timed interleaved, round
by round (benchmarks/common.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

import reprokernels as rk
from benchmarks.common import Row, expect_cases, gpu_provider, measure_providers, op_provider
from benchmarks.shapes import SHAPES

OP = "label_map"
HIST_OP = "label_histogram"
PROVIDERS = ("eager", "eager+compile", "reference", "cpu", "auto", "triton", "cuda")
HIST_PROVIDERS = PROVIDERS
_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def shape_name(s: dict) -> str:
    base = f"{s['name']} B{s['B']} {s['K_src']}->{s['K_tgt']}"
    if s["op"] == HIST_OP:
        return base + f" {s['weight']}" + (f" top{s['topk']}" if s.get("topk") else "")
    if s["mapping"] == "dense":
        return base + f" dense {s['input']}"
    return base + (f" m{s['m']} {s['reduce']}" if s["m"] > 1 else "") + f" {s['input']}"


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float(((a - b).abs() / (1 + b.abs())).max()) if a.numel() else 0.0


def _kernel_module(backend: str) -> str:
    """'' when reprokernels/<backend>/label_map.py exists, else why the row is skipped."""
    name = f"reprokernels.{backend}.label_map"
    return "" if importlib.util.find_spec(name) is not None else f"{name.replace('.', '/')}.py does not exist yet"


class MapCase:
    """Inputs of one label_map (shape, dtype)."""

    def __init__(self, s: dict, dtype: torch.dtype, device: torch.device) -> None:
        self.s, self.dtype, self.device = s, dtype, device
        B, K, T, m = s["B"], s["K_src"], s["K_tgt"], s["m"]
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = (3 * torch.randn(B, K, generator=g)).to(device=device, dtype=dtype).requires_grad_()
        if s["mapping"] == "dense":
            self.mapping = torch.rand(K, T, generator=g).to(device)
            self.mapping /= self.mapping.sum(0, keepdim=True)  # column-normalised, as BLM's omega
        else:
            perm = torch.randperm(K, generator=g)[:T * m].to(device)
            self.mapping = perm if m == 1 else perm.view(T, m)
        out_dtype = torch.float32 if s["input"] != "logits" else dtype
        self.grad_out = torch.randn(B, T, generator=g).to(device=device, dtype=out_dtype)

    def min_bytes(self, mode: str) -> int:
        x_b = self.x.numel() * self.x.element_size()
        w_b = self.mapping.numel() * self.mapping.element_size()
        out_b = self.grad_out.numel() * self.grad_out.element_size()
        return x_b + w_b + out_b if mode == "fwd" else 2 * x_b + w_b + 2 * out_b

    def flops(self, mode: str) -> int:
        if self.s["mapping"] != "dense":
            return 0
        one = 2 * self.s["B"] * self.s["K_src"] * self.s["K_tgt"]
        return one if mode == "fwd" else 2 * one

    def op(self, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        s, mapping = self.s, self.mapping

        def f(x: torch.Tensor) -> torch.Tensor:
            return rk.label_map(x, mapping, reduce=s["reduce"], input=s["input"], backend=backend)

        return f

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        """The user's chain: transform the logits (none, softmax, log_softmax), then index, average the
        columns of each target (many-to-one) or multiply by the dense omega."""
        s, mapping = self.s, self.mapping
        if s["input"] == "logits":
            v = x
        else:
            v = (torch.softmax if s["input"] == "probs" else torch.log_softmax)(x.float(), dim=-1)
        if s["mapping"] == "dense":
            return (v.float() @ mapping).to(v.dtype)
        if mapping.dim() == 1:
            return v[:, mapping]
        g = v[:, mapping]  # (B, K_tgt, m)
        return g.mean(-1) if s["reduce"] == "mean" else g.sum(-1)

    def compiled_eager(self) -> Callable[[torch.Tensor], torch.Tensor]:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across shapes/dtypes
        return torch.compile(self.eager, dynamic=False)

    def runner(self, f: Callable[[torch.Tensor], torch.Tensor], mode: str) -> Callable[[], object]:
        x, g = self.x, self.grad_out
        if mode == "fwd":
            def fwd() -> object:
                with torch.no_grad():
                    return f(x)
            return fwd

        def fwd_bwd() -> object:
            return torch.autograd.grad(f(x), x, g)
        return fwd_bwd

    def check(self, f: Callable[[torch.Tensor], torch.Tensor], mode: str) -> str:
        """'' when f agrees with the eager chain (output, and d logits in fwd+bwd), else what differs."""
        got, want = f(self.x), self.eager(self.x)
        bad = []
        if got.shape != want.shape or not _err(got, want) <= _TOL[self.dtype]:
            bad.append(f"out err {_err(got, want):.2g}")
        if mode != "fwd":
            (dg,) = torch.autograd.grad(got, self.x, self.grad_out)
            (dw,) = torch.autograd.grad(want, self.x, self.grad_out)
            if not _err(dg, dw) <= max(1e-3, _TOL[self.dtype]):
                bad.append(f"dlogits err {_err(dg, dw):.2g}")
        return "MISMATCH vs eager: " + ", ".join(bad) if bad else ""


class HistCase:
    """Inputs of one label_histogram (shape, dtype), accumulated into a preallocated running statistic."""

    def __init__(self, s: dict, dtype: torch.dtype, device: torch.device) -> None:
        self.s, self.dtype, self.device = s, dtype, device
        B, K, T = s["B"], s["K_src"], s["K_tgt"]
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = (3 * torch.randn(B, K, generator=g)).to(device=device, dtype=dtype)
        self.y = torch.randint(0, T, (B,), generator=g).to(device)
        self.out = torch.zeros(K, T, dtype=torch.float32, device=device)

    def min_bytes(self, mode: str = "fwd") -> int:
        s = self.s
        cells = min(s["B"], s["K_src"] * s["K_tgt"]) if s["weight"] == "count" else s["K_src"] * s["K_tgt"]
        return self.x.numel() * self.x.element_size() + self.y.numel() * 8 + 2 * 4 * cells

    def eager(self, out: torch.Tensor) -> torch.Tensor:
        s, x, y = self.s, self.x, self.y
        K, T = s["K_src"], s["K_tgt"]
        if s["weight"] == "count":
            out += torch.bincount(x.argmax(dim=1) * T + y, minlength=K * T).view(K, T)
            return out
        p = torch.softmax(x.float(), dim=1)
        if s["topk"]:
            vals, idx = p.topk(s["topk"], dim=1)
            out.index_put_((idx.reshape(-1), y.repeat_interleave(s["topk"])), vals.reshape(-1), accumulate=True)
        else:
            out.index_add_(1, y, p.T)
        return out

    def op(self, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        s, x, y = self.s, self.x, self.y

        def f(out: torch.Tensor) -> torch.Tensor:
            return rk.label_histogram(x, y, s["K_src"], s["K_tgt"], topk=s["topk"], weight=s["weight"], out=out,
                                      backend=backend)

        return f

    def compiled_eager(self) -> Callable[[torch.Tensor], torch.Tensor]:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across shapes/dtypes
        return torch.compile(self.eager, dynamic=False)

    def runner(self, f: Callable[[torch.Tensor], torch.Tensor], mode: str) -> Callable[[], object]:
        out = self.out

        def fwd() -> object:
            return f(out)
        return fwd

    def check(self, f: Callable[[torch.Tensor], torch.Tensor], mode: str = "fwd") -> str:
        """'' when f accumulates what the eager code does into a zeroed statistic, else the error."""
        got = f(torch.zeros_like(self.out))
        want = self.eager(torch.zeros_like(self.out))
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1))
        return "" if err <= 1e-5 else f"MISMATCH vs eager: err {err:.2g}"


def _gpu_kernel(case_op: Callable[[str], Callable], backend: str, device: torch.device, module_check: bool
                ) -> tuple:
    if module_check and device.type == "cuda" and (why := _kernel_module(backend)):
        return None, why
    return gpu_provider(case_op, backend, device)


def _provider(case: MapCase | HistCase, provider: str) -> tuple[Callable | None, str]:
    """(function, '') or (None, why it cannot run here), for label_map and label_histogram cases alike."""
    return op_provider(case, provider, "eager", gpu=lambda backend: _gpu_kernel(
        case.op, backend, case.device, module_check=isinstance(case, MapCase)))


def run(device: torch.device | str, quick: bool = False) -> list[Row]:
    device = torch.device(device)
    rows: list[Row] = []
    shapes = SHAPES[OP]["quick" if quick else "full"]
    expect_cases(sum(len(s["dtypes"]) * len(PROVIDERS) * len(s.get("modes", ("fwd",))) for s in shapes))
    for s in shapes:
        name = shape_name(s)
        for dtype_name in s["dtypes"]:
            dtype = getattr(torch, dtype_name)
            if s["op"] == HIST_OP:
                rows += measure_providers(HIST_OP, name, dtype, ("fwd",), HistCase(s, dtype, device),
                                          HIST_PROVIDERS, _provider, device, quick)
            else:
                rows += measure_providers(OP, name, dtype, s["modes"], MapCase(s, dtype, device), PROVIDERS,
                                          _provider, device, quick)
    return rows

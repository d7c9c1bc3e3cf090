"""Benchmark of ``prefix_attention``: ``python -m benchmarks.run prefix_attention [--quick]``.

Shapes: ``SHAPES["prefix_attention"]`` in benchmarks/shapes.py: training (Lq = Lk = L, causal, a shared
(Hkv, P, d) prefix) and decoding (Lq = 1 against each row's own cache of Lk keys, right-padded by kv_lengths
drawn in [Lk / 2, Lk], plus a long shared prefix). ``gpu_only`` shapes get a skipped row on the CPU.

Providers
    peft-cat+sdpa   what PEFT + transformers do today: the prefix expanded to the batch and ``torch.cat`` in
                    front of the keys/values (B copies written, then read), ``repeat_kv`` to Hq heads for GQA
                    (as transformers' SDPA path), a (B, 1, Lq, P + Lk) bool mask (prefix visible, bottom-right
                    causal, padding), ``F.scaled_dot_product_attention``. The baseline.
    ideal-sdpa      SDPA over already concatenated (B, Hq, P + L, d) keys/values with no mask (train only): the
                    flash speed the issue asks to keep; not a correct prefix attention (no causal mask).
    reference       ``prefix_attention(..., backend="reference")`` (the spec).
    composite       ``backend="composite"``: ATen flash for the sequence (causal split into query chunks) and
                    for the un-expanded prefix, exact LSE merge (the CPU default).
    triton          the fused kernels; a skipped row without a GPU.

Peak memory (``peak_mem_mb``, MiB above what was allocated before the call, i.e. the inputs): on a GPU
``torch.cuda.max_memory_allocated``; on the CPU the peak running total of PyTorch's CPU-allocator events during one
call (``benchmarks.common.cpu_peak_memory_bytes``), which sees the allocations made inside ATen kernels and inside
the custom op (the flash kernels' zeroed gradients, SDPA's float copy of the bool mask, ``torch.cat``'s copies).

CPU times use the process's thread count (the row's device string); rows written before 2026-11-29 15:15 UTC
(git sha 6425d05 and earlier) were timed single-threaded (``torch.utils.benchmark.Timer``'s default).

Minimum bytes: fwd reads q, each row's own k and v once, the prefix once (2 Hkv P d), writes out;
fwd+bwd adds reading dO, O, q, k, v and the prefix again and writing dq, dk, dv, d prefix. FLOPs: 4 d per
(query, seen key) pair forward (causal pairs counted exactly), 2.5 times that for the backward.
Each provider's output (and in fwd+bwd its prefix gradient) is checked against peft-cat+sdpa first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import reprokernels
from benchmarks.common import Row, gpu_provider, run_shapes
from benchmarks.shapes import SHAPES

OP = "prefix_attention"
PROVIDERS = ("peft-cat+sdpa", "ideal-sdpa", "reference", "composite", "triton")
Leaves = tuple[torch.Tensor, ...]  # q, k, v, prefix_k, prefix_v


def shape_name(s: dict) -> str:
    seq = f"L{s['L']}" if s["kind"] == "train" else f"Lq1 Lk{s['Lk']}"
    return f"{s['name']} B{s['B']} H{s['Hq']}/{s['Hkv']} {seq} P{s['P']} d{s['d']}"


class Case:
    def __init__(self, s: dict, dtype: torch.dtype, device: torch.device) -> None:
        self.s, self.dtype, self.device = s, dtype, device
        B, Hq, Hkv, P, d = (s[k] for k in ("B", "Hq", "Hkv", "P", "d"))
        self.Lq, self.Lk = (s["L"], s["L"]) if s["kind"] == "train" else (1, s["Lk"])
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        self.leaves: Leaves = tuple(t.requires_grad_() for t in (
            rnd(B, Hq, self.Lq, d), rnd(B, Hkv, self.Lk, d), rnd(B, Hkv, self.Lk, d), rnd(Hkv, P, d), rnd(Hkv, P, d)))
        self.kv_lengths = (torch.randint(self.Lk // 2, self.Lk + 1, (B,), generator=g).to(device)
                           if s["kind"] == "decode" else None)
        self.grad_out = rnd(B, Hq, self.Lq, d)
        with torch.no_grad():  # the ideal provider's pre-concatenated keys/values
            _, k, v, pk, pv = self.leaves
            self.k_cat = torch.cat([pk.expand(B, *pk.shape), k], 2).repeat_interleave(Hq // Hkv, 1).requires_grad_()
            self.v_cat = torch.cat([pv.expand(B, *pv.shape), v], 2).repeat_interleave(Hq // Hkv, 1).requires_grad_()

    def pairs(self) -> int:
        """(query, seen key) pairs over the batch and heads."""
        s = self.s
        P, Lq = s["P"], self.Lq
        if s["kind"] == "train":
            seq = Lq * (Lq + 1) // 2
        else:
            seq = int(self.kv_lengths.sum()) // s["B"]
        return s["B"] * s["Hq"] * (Lq * P + seq)

    def flops(self, mode: str) -> int:
        f = 4 * self.s["d"] * self.pairs()
        return f if mode == "fwd" else int(3.5 * f)

    def min_bytes(self, mode: str) -> int:
        es = self.leaves[0].element_size()
        q, k, v, pk, pv = (t.numel() for t in self.leaves)
        fwd = (2 * q + k + v + pk + pv) * es
        return fwd if mode == "fwd" else fwd + (3 * q + k + v + pk + pv) * es + (q + k + v + pk + pv) * es

    # -- providers: each a function of the leaves -> out (B, Hq, Lq, d)

    def peft(self, q, k, v, pk, pv) -> torch.Tensor:
        B, Hq, Lq, _ = q.shape
        Hkv, Lk, P = k.shape[1], k.shape[2], pk.shape[1]
        kc = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        vc = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
        if Hq != Hkv:
            kc, vc = kc.repeat_interleave(Hq // Hkv, 1), vc.repeat_interleave(Hq // Hkv, 1)
        seq = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq).expand(B, Lq, Lk)
        if self.kv_lengths is not None:
            seq = seq & (torch.arange(Lk, device=q.device) < self.kv_lengths[:, None])[:, None, :]
        mask = torch.cat([torch.ones(B, Lq, P, dtype=torch.bool, device=q.device), seq], dim=2).unsqueeze(1)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)

    def ideal(self, q, k, v, pk, pv) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, self.k_cat, self.v_cat)

    def op(self, backend: str) -> Callable[..., torch.Tensor]:
        def f(q, k, v, pk, pv):
            return reprokernels.prefix_attention(q, k, v, pk, pv, kv_lengths=self.kv_lengths, backend=backend)
        return f

    def runner(self, f: Callable[..., torch.Tensor], mode: str) -> Callable[[], object]:
        leaves, g = self.leaves, self.grad_out
        if mode == "fwd":
            def fwd() -> object:
                with torch.no_grad():
                    return f(*leaves)
            return fwd
        inputs = (*leaves, self.k_cat, self.v_cat) if f == self.ideal else leaves

        def fwd_bwd() -> object:
            return torch.autograd.grad(f(*leaves), inputs, g, allow_unused=True)
        return fwd_bwd

    def check(self, f: Callable[..., torch.Tensor], mode: str) -> str:
        if f == self.ideal:
            return "no causal mask, keys pre-concatenated: a speed bound, not the op"
        got, want = f(*self.leaves), self.peft(*self.leaves)
        pairs = [("out", got, want)]
        if mode != "fwd":
            pairs.append(("dprefix_k", torch.autograd.grad(got, self.leaves[3], self.grad_out)[0],
                          torch.autograd.grad(want, self.leaves[3], self.grad_out)[0]))
        tol = 1e-3 if self.dtype == torch.float32 else 3e-2
        bad = []
        for name, a, b in pairs:
            a, b = a.detach().float(), b.detach().float()
            err = float(((a - b).abs() / (1 + b.abs())).max()) if a.numel() else 0.0
            if not err <= tol:
                bad.append(f"{name} err {err:.2g}")
        return "MISMATCH vs peft-cat+sdpa: " + ", ".join(bad) if bad else ""


def _provider_fn(case: Case, provider: str) -> tuple[Callable | None, str]:
    if provider == "peft-cat+sdpa":
        return case.peft, ""
    if provider == "ideal-sdpa":
        return (case.ideal, "") if case.s["kind"] == "train" else (None, "training shapes only")
    if provider in ("reference", "composite"):
        return case.op(provider), ""
    if provider == "triton":
        return gpu_provider(case.op, provider, case.device)
    raise ValueError(f"unknown provider {provider!r}")


def _skip(s: dict, device: torch.device) -> str | None:
    return "GPU shape: not timed on the CPU" if s["gpu_only"] and device.type != "cuda" else None


def run(device: torch.device | str, quick: bool = False) -> list[Row]:
    return run_shapes(OP, SHAPES[OP]["quick" if quick else "full"], Case, PROVIDERS, _provider_fn, shape_name,
                      device, quick, skip=_skip)

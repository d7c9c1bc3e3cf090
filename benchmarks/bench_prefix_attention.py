"""Benchmark of ``prefix_attention``: ``python -m benchmarks.run prefix_attention [--quick]``.

Shapes: ``SHAPES["prefix_attention"]`` in benchmarks/shapes.py: training (Lq = Lk = L, causal, a shared
(Hkv, P, d) prefix) and decoding (Lq = 1 against each row's own cache of Lk keys, right-padded by kv_lengths
drawn in [Lk / 2, Lk], plus a long shared prefix, or with ``T`` a (T, Hkv, P, d) prefix table and task_ids that
give every task at least one row when B >= T). ``gpu_only`` shapes get a skipped row on the CPU.
``run(device, quick, select=...)`` times only the shapes ``select(shape dict)`` accepts; the decode rows alone:

    python -m benchmarks.bench_prefix_attention --decode-max-batch 16 [--device cuda] [--results-dir DIR]
        [--summary FILE]

(benchmarks/gpu_check.sh runs that: a side-by-side table, and per shape one line of cuda vs triton in --summary).

Providers
    peft-cat+sdpa   what PEFT + transformers do today: the prefix expanded to the batch and ``torch.cat`` in
                    front of the keys/values (B copies written, then read), ``repeat_kv`` to Hq heads for GQA
                    (as transformers' SDPA path), a (B, 1, Lq, P + Lk) bool mask (prefix visible, bottom-right
                    causal, padding), ``F.scaled_dot_product_attention``. The baseline.
    peft-cat+sdpa+compile
                    ``torch.compile`` of that function; the best a compiler does with the user's code.
    ideal-sdpa      SDPA over already concatenated (B, Hq, P + L, d) keys/values with no mask (train only): the
                    flash speed the issue asks to keep; not a correct prefix attention (no causal mask).
    reference       ``prefix_attention(..., backend="reference")`` (the spec).
    composite       ``backend="composite"``: ATen flash for the sequence (causal split into query chunks) and
                    for the un-expanded prefix, exact LSE merge (what auto picks on CPU tensors for training).
    cpu             ``backend="cpu"``: the C++ decode kernel (csrc/cpu/prefix_attention.cpp; at most 16 queries per
                    row, forward only), decode rows on CPU tensors only (what auto picks there).
    auto            ``backend="auto"``: what a user gets by default.
    triton          the fused kernels; a skipped row without a GPU.
    cuda            ``backend="cuda"``: the CUDA C++ decode kernels (csrc/prefix_attention.cu; at most 16 queries
                    per row, forward only), decode rows only; a skipped row without a GPU or without the built
                    extension (the reason is the row's note).

Peak memory (``peak_mem_mb``, MiB above what was allocated before the call, i.e. the inputs): on a GPU
``torch.cuda.max_memory_allocated``; on the CPU the peak running total of PyTorch's CPU-allocator events during one
call (``benchmarks.common.cpu_peak_memory_bytes``), which sees the allocations made inside ATen kernels and inside
the custom op (the flash kernels' zeroed gradients, SDPA's float copy of the bool mask, ``torch.cat``'s copies).

CPU times use the process's thread count (the row's device string); rows written before 2026-11-29 15:15 UTC
(git sha 6425d05 and earlier) were timed single-threaded (``torch.utils.benchmark.Timer``'s default).

Minimum bytes (``Case.min_bytes``; GB/s = these bytes / the median time, which ``reprokernels bench`` also gives as
a % of the measured copy bandwidth):
    train   fwd reads q, each row's own k and v once, the prefix once (2 Hkv P d), writes out; fwd+bwd adds reading
            dO, O, q, k, v and the prefix again and writing dq, dk, dv, d prefix.
    decode  the bytes one decode step of the whole batch must move, i.e. per generated token of every row: q read
            (B Hq Lq d), out written (B Hq Lq d), the prefix's K and V read once (2 Hkv P d, times the number of
            distinct tasks the rows use for a prefix table), and each row's own K and V only up to its
            kv_lengths[b] (2 Hkv kv_lengths[b] d): the cache's capacity Lk beyond that is never read, so it is not
            counted. Elements times the activation size (the prefix is in the same dtype here); the few bytes
            of kv_lengths / task_ids are left out.
FLOPs: 4 d per (query, seen key) pair forward (causal pairs and each row's kv_lengths counted exactly), 2.5 times
that for the backward.
Each provider's output (and in fwd+bwd its prefix gradient) is checked against peft-cat+sdpa first.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import reprokernels
from benchmarks.common import Row, compiled_provider, gpu_provider, run_shapes
from benchmarks.shapes import SHAPES
from reprokernels.ops.prefix_attention import CPU_MAX_LQ, CUDA_MAX_LQ  # the decode kernels' limits (queries per row)

OP = "prefix_attention"
PROVIDERS = ("peft-cat+sdpa", "peft-cat+sdpa+compile", "ideal-sdpa", "reference", "composite", "cpu", "auto",
             "triton", "cuda")
Leaves = tuple[torch.Tensor, ...]  # q, k, v, prefix_k, prefix_v


def shape_name(s: dict) -> str:
    seq = f"L{s['L']}" if s["kind"] == "train" else f"Lq1 Lk{s['Lk']}"
    tasks = f" T{s['T']}" if s.get("T") else ""
    return f"{s['name']} B{s['B']} H{s['Hq']}/{s['Hkv']} {seq} P{s['P']}{tasks} d{s['d']}"


class Case:
    def __init__(self, s: dict, dtype: torch.dtype, device: torch.device) -> None:
        self.s, self.dtype, self.device = s, dtype, device
        B, Hq, Hkv, P, d = (s[k] for k in ("B", "Hq", "Hkv", "P", "d"))
        self.train = s["kind"] == "train"
        self.Lq, self.Lk = (s["L"], s["L"]) if self.train else (1, s["Lk"])
        self.T = s.get("T") or 0
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        pshape = ((self.T,) if self.T else ()) + (Hkv, P, d)
        self.leaves: Leaves = (rnd(B, Hq, self.Lq, d), rnd(B, Hkv, self.Lk, d), rnd(B, Hkv, self.Lk, d),
                               rnd(*pshape), rnd(*pshape))
        if self.train:  # decode is forward only (and backend="cuda" refuses inputs that require gradients)
            for t in self.leaves:
                t.requires_grad_()
        # decode: each row's cache holds kv_lengths[b] in [Lk / 2, Lk] keys (the rest of its capacity is padding)
        self.kv_lengths_cpu = None if self.train else torch.randint(self.Lk // 2, self.Lk + 1, (B,), generator=g)
        self.kv_lengths = None if self.train else self.kv_lengths_cpu.to(device)
        # a prefix table: rows cycle through the tasks in a shuffled order (every task used when B >= T)
        self.task_ids_cpu = torch.randperm(B, generator=g) % self.T if self.T else None
        self.task_ids = None if self.task_ids_cpu is None else self.task_ids_cpu.to(device)
        self.grad_out = rnd(B, Hq, self.Lq, d)
        self.k_cat = self.v_cat = None
        if self.train:  # the ideal provider's pre-concatenated keys/values (train only: at decode shapes they
            with torch.no_grad():  # would take B * Hq / Hkv times the prefix's memory, for a provider not run)
                _, k, v, pk, pv = self.leaves
                self.k_cat = torch.cat([pk.expand(B, *pk.shape), k], 2).repeat_interleave(Hq // Hkv, 1)
                self.v_cat = torch.cat([pv.expand(B, *pv.shape), v], 2).repeat_interleave(Hq // Hkv, 1)
                self.k_cat.requires_grad_()
                self.v_cat.requires_grad_()

    def pairs(self) -> int:
        """(query, seen key) pairs over the batch and heads."""
        s = self.s
        B, Hq, P, Lq = s["B"], s["Hq"], s["P"], self.Lq
        if self.train:
            return B * Hq * (Lq * P + Lq * (Lq + 1) // 2)
        # decode (Lq = 1, causal: the query is the last position, so it sees all kv_lengths[b] own keys)
        return Hq * (B * Lq * P + Lq * int(self.kv_lengths_cpu.sum()))

    def flops(self, mode: str) -> int:
        f = 4 * self.s["d"] * self.pairs()
        return f if mode == "fwd" else int(3.5 * f)

    def min_bytes(self, mode: str) -> int:
        """The op's minimum traffic in bytes (the model in the module docstring)."""
        es = self.leaves[0].element_size()
        q, k, v, pk, pv = (t.numel() for t in self.leaves)
        if not self.train:
            # bytes per decode step of the batch (= per generated token of each of its B rows):
            # q read + out written + the prefix K/V once (once per task used) + each row's own K/V up to kv_lengths
            s = self.s
            Hkv, P, d = s["Hkv"], s["P"], s["d"]
            tasks = len(torch.unique(self.task_ids_cpu)) if self.T else 1
            prefix = 2 * tasks * Hkv * P * d
            own = 2 * Hkv * d * int(self.kv_lengths_cpu.sum())
            return (2 * q + prefix + own) * es
        fwd = (2 * q + k + v + pk + pv) * es
        return fwd if mode == "fwd" else fwd + (3 * q + k + v + pk + pv) * es + (q + k + v + pk + pv) * es

    # -- providers: each a function of the leaves -> out (B, Hq, Lq, d)

    def peft(self, q, k, v, pk, pv) -> torch.Tensor:
        B, Hq, Lq, _ = q.shape
        Hkv, Lk, P = k.shape[1], k.shape[2], pk.shape[-2]
        if self.task_ids is not None:  # a PEFT model with one adapter per task: each row's prefix gathered
            pk, pv = pk[self.task_ids], pv[self.task_ids]
        else:
            pk, pv = pk.unsqueeze(0).expand(B, -1, -1, -1), pv.unsqueeze(0).expand(B, -1, -1, -1)
        kc = torch.cat([pk, k], dim=2)
        vc = torch.cat([pv, v], dim=2)
        if Hq != Hkv:
            kc, vc = kc.repeat_interleave(Hq // Hkv, 1), vc.repeat_interleave(Hq // Hkv, 1)
        seq = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq).expand(B, Lq, Lk)
        if self.kv_lengths is not None:
            seq = seq & (torch.arange(Lk, device=q.device) < self.kv_lengths[:, None])[:, None, :]
        mask = torch.cat([torch.ones(B, Lq, P, dtype=torch.bool, device=q.device), seq], dim=2).unsqueeze(1)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)

    def compiled_peft(self) -> Callable[..., torch.Tensor]:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across shapes/dtypes
        return torch.compile(self.peft, dynamic=False)

    def ideal(self, q, k, v, pk, pv) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, self.k_cat, self.v_cat)

    def op(self, backend: str) -> Callable[..., torch.Tensor]:
        def f(q, k, v, pk, pv):
            return reprokernels.prefix_attention(q, k, v, pk, pv, task_ids=self.task_ids, kv_lengths=self.kv_lengths,
                                                 backend=backend)
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
        with torch.set_grad_enabled(mode != "fwd"):
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
    if provider == "peft-cat+sdpa+compile":
        return compiled_provider(case.compiled_peft)
    if provider in ("reference", "composite", "auto"):
        return case.op(provider), ""
    if provider == "cpu":
        if case.device.type != "cpu":
            return None, "CPU tensors only"
        if case.train or case.Lq > CPU_MAX_LQ:
            return None, f"decode only: the cpu backend serves at most {CPU_MAX_LQ} queries per row, forward"
        from reprokernels import _cpu

        if not _cpu.available():
            return None, f"cpu backend unavailable: {_cpu.unavailable_reason()}"
        return case.op(provider), ""
    if provider == "triton":
        return gpu_provider(case.op, provider, case.device)
    if provider == "cuda":
        if case.train or case.Lq > CUDA_MAX_LQ:
            return None, f"decode only: the cuda backend serves at most {CUDA_MAX_LQ} queries per row, forward"
        f, why = gpu_provider(case.op, provider, case.device)
        if f is not None and not reprokernels.cuda_available():
            from reprokernels import _cuda

            return None, f"cuda backend unavailable: {_cuda.unavailable_reason()}"
        return f, why
    raise ValueError(f"unknown provider {provider!r}")


def _skip(s: dict, device: torch.device) -> str | None:
    return "GPU shape: not timed on the CPU" if s["gpu_only"] and device.type != "cuda" else None


def run(device: torch.device | str, quick: bool = False, *, select: Callable[[dict], bool] | None = None
        ) -> list[Row]:
    """Rows of every shape (``select``: only those it accepts) x dtype x provider x mode."""
    shapes = [s for s in SHAPES[OP]["quick" if quick else "full"] if select is None or select(s)]
    return run_shapes(OP, shapes, Case, PROVIDERS, _provider_fn, shape_name, device, quick, skip=_skip)


def decode_lines(rows: list[Row], copy_gbps: float | None = None) -> list[str]:
    """One line per decode shape: the cuda and triton medians (and the fastest other provider), cuda over triton,
    the cuda row's GB/s against the decode bytes model and its % of the copy bandwidth; notes of untimed rows."""
    shapes: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.shape.startswith("decode"):
            shapes.setdefault((r.shape, r.dtype), {})[r.provider] = r

    def ms(r: Row | None) -> str:
        return f"{r.median_ms:.4f}" if r is not None and r.median_ms is not None else "-"

    out = []
    for (shape, dtype), by in shapes.items():
        cu, tr = by.get("cuda"), by.get("triton")
        others = [r for p, r in by.items() if p not in ("cuda", "triton") and r.median_ms is not None]
        best = min(others, key=lambda r: r.median_ms, default=None)
        line = f"{shape} {dtype}: cuda {ms(cu)} ms, triton {ms(tr)} ms"
        if best is not None:
            line += f", best other {best.provider} {best.median_ms:.4f} ms"
        if cu is not None and cu.median_ms is not None:
            if tr is not None and tr.median_ms is not None:
                line += f"; cuda {tr.median_ms / cu.median_ms:.2f}x triton"
            if cu.gbps is not None:
                line += f"; cuda {cu.gbps:.0f} GB/s"
                if copy_gbps:
                    line += f" = {100 * cu.gbps / copy_gbps:.0f}% of copy BW"
        elif cu is not None:
            line += f"; cuda not timed: {cu.note}"
        elif not any(r.median_ms is not None for r in by.values()):
            line += f"; not timed: {next(iter(by.values())).note}"
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import write_rows
    from benchmarks.device_limits import measure_limits
    from reprokernels.bench import side_by_side

    ap = argparse.ArgumentParser(description="prefix_attention benchmark rows (the decode rows alone with "
                                             "--decode-max-batch)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the quick shapes and short timing")
    ap.add_argument("--decode-max-batch", type=int, default=None, metavar="N",
                    help="only the decode shapes with B <= N")
    ap.add_argument("--results-dir", type=Path, default=None, help="append the rows to DIR/prefix_attention[_cpu].csv")
    ap.add_argument("--summary", type=Path, default=None, help="append one line per decode shape to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    select = None
    if args.decode_max_batch is not None:
        def select(s: dict) -> bool:
            return s["kind"] == "decode" and s["B"] <= args.decode_max_batch
    limits = measure_limits(device, quick=True)
    print(f"measured limits: {limits.describe()}")
    rows = run(device, args.quick, select=select)
    print(side_by_side(rows, limits))
    if args.results_dir is not None:
        from benchmarks.run import results_name

        print("results:", *write_rows(rows, results_name(OP, device), args.results_dir))
    lines = decode_lines(rows, limits.copy_gbps)
    if args.summary is not None:
        with args.summary.open("a") as f:
            f.writelines(f"  {ln}\n" for ln in lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

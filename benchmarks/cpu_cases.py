"""The cpu backend on the cases of issue 15, side by side: the user's eager chain, torch.compile of it, the
reference, the cpu backend and auto, fwd+bwd, outputs checked equal first.

Timing: torch.utils.benchmark at the process's thread count, providers interleaved round by round, the median
over rounds of each round's median (so a burst of load from other processes hits every provider alike).
GB/s: the case's minimum bytes (inputs read once, outputs and gradients written once) over the median time,
next to this machine's copy bandwidth (a large tensor copy, read + write counted). Peak memory: the profiler's
CPU allocator events (benchmarks/common.py). Rows are appended to <out>/bench_cpu.csv (default
./reprokernels-bench/); benchmarks/results is never written.

    python -m benchmarks.cpu_cases [--rounds 15] [--out DIR] [--quick] [--case WORD] [--providers eager,cpu]
                                   [--dtype float32|float16|bfloat16]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import reprokernels as rk
from benchmarks.common import cpu_peak_memory_bytes, git_sha, versions


def copy_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = benchmark.Timer("dst.copy_(src)", globals=dict(src=src, dst=dst)).blocked_autorange(min_run_time=1.0).median
    return 2 * nbytes / t / 1e9


def _grad_of(out):
    return torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)


def case_label_words(B=64, V=128_256, T=10, dtype=torch.float32):
    x = torch.randn(B, V, dtype=dtype, requires_grad=True)
    idx = torch.randperm(V)[:T]
    go = _grad_of(torch.empty(B, T))

    def eager(x):
        return torch.log_softmax(x, -1)[:, idx]

    def ours(backend):
        return lambda x: rk.label_map(x, idx, input="log_probs", backend=backend)

    nbytes = 2 * x.numel() * x.element_size()  # read logits, write d logits
    return "label words log_probs B64 V128256", [x], eager, ours, go, nbytes


def case_soft_prompt(B=64, L=128, P=20, D=768, V=32_000, dtype=torch.float32):
    weight = torch.randn(V, D, dtype=dtype)
    ids = torch.randint(0, V, (B, L))
    prompt = torch.randn(P, D, requires_grad=True)
    go = _grad_of(torch.empty(B, P + L, D, dtype=dtype))

    def eager(prompt):  # PEFT casts the float32 prompt to the embedding's dtype
        return torch.cat([prompt.to(dtype).unsqueeze(0).expand(B, -1, -1), F.embedding(ids, weight)], 1)

    def ours(backend):
        return lambda prompt: rk.soft_prompt_concat(prompt, input_ids=ids, embedding_weight=weight,
                                                    backend=backend).inputs_embeds

    es = weight.element_size()
    nbytes = (B * L * D * es) + 2 * (B * (P + L) * D * es)  # gathered rows, out written, grad read once
    return "soft prompt B64 L128 P20 D768 (ids)", [prompt], eager, ours, go, nbytes


def case_vp_frame(B=128, S=224, p=30, dtype=torch.float32):
    x = torch.rand(B, 3, S, S).to(dtype)
    delta = torch.zeros(3, S, S).normal_(0, 0.1).requires_grad_()
    mask = torch.ones(S, S)
    mask[p:S - p, p:S - p] = 0
    go = _grad_of(torch.empty(B, 3, S, S, dtype=dtype))

    def eager(delta):  # a float32 delta beside 16-bit images: the sum in x's dtype, as the op returns
        return (x + delta * mask).to(dtype)

    def ours(backend):
        return lambda delta: rk.visual_prompt(x, delta, mask="frame", mask_width=p, backend=backend)

    nbytes = 3 * x.numel() * x.element_size()  # x read, out written, grad read
    return "VP pad frame 30px at 224 B128", [delta], eager, ours, go, nbytes


def case_ilm_vp(B=128, h=32, S=224, dtype=torch.float32):
    x = torch.rand(B, 3, h, h).to(dtype)
    delta = torch.zeros(3, S, S).normal_(0, 0.1).requires_grad_()
    pad = (S - h + 1) // 2
    mask = torch.ones(3, S, S)
    mask[:, pad:pad + h, pad:pad + h] = 0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    go = _grad_of(torch.empty(B, 3, S, S, dtype=dtype))

    def eager(delta):
        v = F.pad(x, (pad, S - h - pad, pad, S - h - pad)) + torch.sigmoid(delta) * mask
        return ((v - mean) / std).to(dtype)

    def ours(backend):
        return lambda delta: rk.visual_prompt(x, delta, squash="sigmoid", mean=[0.485, 0.456, 0.406],
                                              std=[0.229, 0.224, 0.225], backend=backend)

    nbytes = (x.numel() + 2 * B * 3 * S * S) * x.element_size()
    return "ILM-VP expansive 32->224 B128", [delta], eager, ours, go, nbytes


def case_flm(N=20_000, K=1000, T=10, dtype=torch.float32):
    logits = torch.randn(N, K, dtype=dtype)
    y = torch.randint(0, T, (N,))

    def eager():
        D = torch.zeros(K, T)
        D.index_put_((logits.argmax(-1), y), torch.ones(N), accumulate=True)
        return D

    def ours(backend):
        return lambda: rk.label_histogram(logits, y, K, T, backend=backend)

    return "FLM histogram N20000 1000->10", [], eager, ours, None, logits.numel() * logits.element_size()


CASES = [case_label_words, case_soft_prompt, case_vp_frame, case_ilm_vp, case_flm]


def fwd_bwd(fn, params, go):
    def step():
        out = fn(*params)
        if go is not None:
            torch.autograd.grad(out, params, go)
        return out
    return step


PROVIDERS = ("eager", "eager+compile", "reference", "cpu", "auto")


def _provider(name, eager, ours):
    if name == "eager":
        return eager
    if name == "eager+compile":
        return torch.compile(eager)
    return ours(name)


def run(rounds: int, out_dir: Path, case: str = "", providers_wanted: tuple[str, ...] = PROVIDERS,
        dtype: torch.dtype = torch.float32) -> list[dict]:
    bw = copy_bandwidth_gbs()
    threads = torch.get_num_threads()
    print(f"copy bandwidth {bw:.1f} GB/s, {threads} threads; medians of {rounds} interleaved rounds")
    rows = []
    for make in CASES:
        name, params, eager, ours, go, nbytes = make(dtype=dtype)
        name = name if dtype == torch.float32 else f"{name} {str(dtype).replace('torch.', '')}"
        if case.lower() not in name.lower():
            continue
        # eager always runs: it is the check of every output and the denominator of the ratios
        providers = {p: fwd_bwd(_provider(p, eager, ours), params, go)
                     for p in PROVIDERS if p == "eager" or p in providers_wanted}
        want = providers["eager"]()
        for prov, fn in providers.items():  # warm up (compile) and check outputs first
            got = fn()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=f"{name} {prov}")
        times: dict[str, list[float]] = {p: [] for p in providers}
        for _ in range(rounds):
            for prov, fn in providers.items():
                t = benchmark.Timer("fn()", globals=dict(fn=fn)).timeit(3).median
                times[prov].append(t)
        med = {p: statistics.median(v) for p, v in times.items()}
        for prov, fn in providers.items():
            peak = cpu_peak_memory_bytes(fn)
            row = dict(case=name, provider=prov, mode="fwd+bwd" if go is not None else "fwd",
                       median_ms=med[prov] * 1e3, p20_ms=sorted(times[prov])[len(times[prov]) // 5] * 1e3,
                       vs_eager=med["eager"] / med[prov],
                       vs_compile=med["eager+compile"] / med[prov] if "eager+compile" in med else float("nan"),
                       gbs=nbytes / med[prov] / 1e9, copy_gbs=bw,
                       peak_mib=None if peak is None else peak / 2**20, threads=threads,
                       versions=versions(), git=git_sha(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
            rows.append(row)
            print(f"{name:<38} {prov:<14} {row['median_ms']:9.2f} ms  x{row['vs_eager']:5.2f} eager  "
                  f"x{row['vs_compile']:5.2f} compile  {row['gbs']:6.1f} GB/s  "
                  f"peak {row['peak_mib'] if row['peak_mib'] is None else round(row['peak_mib'], 1)} MiB")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_cpu.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"rows appended to {path}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("reprokernels-bench"))
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--case", default="", help="only the cases whose name contains this (case-insensitive)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset (eager always runs)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="of the activations (logits, images, the embedding table); parameters stay float32")
    args = ap.parse_args(argv)
    wanted = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    unknown = sorted(set(wanted) - set(PROVIDERS))
    if unknown:
        ap.error(f"--providers: unknown {unknown}; expected a subset of {', '.join(PROVIDERS)}")
    run(3 if args.quick else args.rounds, args.out, args.case, wanted, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()

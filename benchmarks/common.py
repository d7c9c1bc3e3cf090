"""Benchmark plumbing shared by every bench_<op>.py: timing, memory, environment, and the result writer.

Timing: ``triton.testing.do_bench`` on a GPU, one provider after another; on the CPU ``torch.utils.benchmark``
blocks at the process's thread count, the providers of one case and mode interleaved round by round
(:func:`time_interleaved`: a burst of load from another process hits every provider alike), the median and the
20th/80th percentiles of the per-round block means. Throughput is reported against the op's *minimum* traffic
(each input read once, each output written once), so 100 % means a perfect one-pass kernel at the measured time.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"

# The progress bar of the running ``reprokernels bench`` op (None outside it): measure() and skipped() tick it,
# run_shapes() grows its total as cases are known, so scripts need no progress code of their own.
_progress = None


@contextlib.contextmanager
def progress_bar(desc: str):
    """A tqdm bar over the cases timed inside the block (shown on a terminal only; nothing without tqdm)."""
    global _progress
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield None
        return
    with tqdm(total=0, desc=desc, unit="case", file=sys.stderr, disable=None, leave=False,
              dynamic_ncols=True) as bar:
        _progress = bar
        try:
            yield bar
        finally:
            _progress = None


def expect_cases(n: int) -> None:
    if _progress is not None:
        _progress.total += n
        _progress.refresh()


def tick(label: str = "") -> None:
    if _progress is not None:
        if _progress.n >= _progress.total:  # a script that did not announce its cases
            _progress.total = _progress.n + 1
        if label:
            _progress.set_postfix_str(label[:60], refresh=False)
        _progress.update(1)


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    mode: str  # fwd | bwd | fwd+bwd
    provider: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    min_bytes: int = 0
    gbps: float | None = None
    flops: int = 0
    tflops: float | None = None
    peak_mem_mb: float | None = None
    note: str = ""
    device: str = ""
    versions: str = ""
    git_sha: str = ""
    timestamp: str = ""


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    arch = " ".join(filter(None, (platform.processor() or platform.machine(), _vector_isa())))
    return f"cpu ({arch}, {torch.get_num_threads()} threads)"


def _vector_isa() -> str:
    """The widest x86 vector extension the CPU reports (Linux), which sets the cpu kernels' tile and lane widths
    (csrc/cpu/gemm_tile.h, the RK_CLONES functions): rows measured on different CPUs are told apart by it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""


def versions() -> str:
    parts = [f"torch={torch.__version__}"]
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except ImportError:
        parts.append("triton=none")
    try:
        from reprokernels import _cuda

        parts.append(f"cuda_C={_cuda.runtime_version() or 'none'}")
    except ImportError:
        pass
    return " ".join(parts)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_fn(fn: Callable[[], object], device: torch.device | str, *, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    from torch.utils import benchmark

    fn()  # warm-up (and compilation for compiled providers)
    # num_threads: the Timer defaults to 1 thread; rows say "N threads" (device_name), so time with those
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.2 if quick else 1.0)
    times = np.asarray(m.times) * 1e3
    return float(np.median(times)), float(np.quantile(times, 0.2)), float(np.quantile(times, 0.8))


CPU_ROUNDS = {True: 7, False: 15}  # rounds per case and mode (quick, full)
CPU_BLOCK_S = {True: 0.02, False: 0.1}  # seconds of calls per provider per round (quick, full)


def time_interleaved(fns: dict[str, Callable[[], object]], *, quick: bool = False, rounds: int | None = None,
                     block_s: float | None = None) -> dict[str, tuple[float, float, float]]:
    """CPU: {provider: (median, p20, p80) ms}, the providers timed round-robin.

    Each provider is warmed up (a compiled one compiles here) and calibrated to a block of ``number`` calls of
    about ``block_s`` seconds; then ``rounds`` rounds each time one block of every provider (the order reversed
    every other round, so no provider always follows the same one) with ``torch.utils.benchmark.Timer.timeit``
    at the process's thread count. A provider's statistics are over its per-round block means, so a burst of
    load from another process during one round shifts one sample of every provider, not one provider's result.
    """
    from torch.utils import benchmark

    rounds = rounds or CPU_ROUNDS[quick]
    block_s = block_s or CPU_BLOCK_S[quick]
    threads = torch.get_num_threads()
    timers: dict[str, tuple[benchmark.Timer, int]] = {}
    for name, fn in fns.items():
        fn()  # warm-up (compilation, first-touch of caches and allocator)
        one = 1.0
        for _ in range(3):  # the fastest of three calls: one descheduled call would give too few per block
            t0 = time.perf_counter()
            fn()
            one = min(one, time.perf_counter() - t0)
        one = max(one, 1e-7)
        timers[name] = (benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads),
                        max(1, min(10_000, round(block_s / one))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            timer, number = timers[name]
            samples[name].append(timer.timeit(number).median * 1e3)
    out = {}
    for name, v in samples.items():
        a = np.asarray(v)
        out[name] = (float(np.median(a)), float(np.quantile(a, 0.2)), float(np.quantile(a, 0.8)))
    return out


# Kineto's C++ logger writes these straight to file descriptor 2 at every profiler start/stop ("USDT:... ]
# profiler_start"), whatever KINETO_LOG_LEVEL / TORCH_CPP_LOG_LEVEL say, so they can only be filtered there.
_KINETO_LINE = re.compile(rb"^(USDT|STAGE|INFO|WARNING):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def quiet_profiler():
    """Run the block with fd 2 sent to a temporary file, then pass on every line except Kineto's log lines
    (a real error printed meanwhile still reaches stderr, only later)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().splitlines(keepends=True) if not _KINETO_LINE.match(ln)]
            if kept:
                os.write(fd, b"".join(kept))


def cpu_peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak CPU memory of one call above what was allocated before it, in bytes (None if it cannot be measured).

    One call runs under ``torch.profiler.profile(profile_memory=True)``, which records every allocation and free
    of PyTorch's CPU allocator (those made inside ATen kernels and inside custom ops included, e.g. the zeroed
    gradients the flash backward allocates) as a ``[memory]`` event with a signed byte count; the peak is the
    maximum of their running total in time order. Not seen: scratch a kernel obtains outside PyTorch's allocator
    (``std::make_unique`` buffers) and Python objects. Checked on known allocations: ``torch.empty`` of 10 MiB,
    freed, then 5 MiB gives 10 MiB; the flash backward at (8, 8, 256, 64) float32 gives its three 4 MiB
    gradients, its 4 MiB contiguous grad_out and its 0.25 MiB per-thread buffer.
    """
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except AttributeError:  # a profiler without these internals: not measured
        return None
    total = peak = 0
    for _, nbytes in mem:
        total += nbytes
        peak = max(peak, total)
    return peak


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak memory of one call above what was allocated before it, in MiB: CUDA's max_memory_allocated on a
    GPU, :func:`cpu_peak_memory_bytes` (profiler allocator events) on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        peak = cpu_peak_memory_bytes(fn)
        return None if peak is None else peak / 2**20
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def make_row(op: str, shape: str, dtype: torch.dtype, mode: str, provider: str,
             times: tuple[float, float, float], fn: Callable[[], object], device: torch.device | str, *,
             min_bytes: int = 0, flops: int = 0, note: str = "") -> Row:
    """A timed row: ``times`` (median, p20, p80) in ms; the peak memory of one more call of ``fn``."""
    med, p20, p80 = times
    return Row(
        op=op, shape=shape, dtype=str(dtype).removeprefix("torch."), mode=mode, provider=provider,
        median_ms=med, p20_ms=p20, p80_ms=p80, min_bytes=min_bytes,
        gbps=(min_bytes / (med * 1e-3) / 1e9) if min_bytes and med else None,
        flops=flops, tflops=(flops / (med * 1e-3) / 1e12) if flops and med else None,
        peak_mem_mb=peak_memory_mb(fn, device), note=note, device=device_name(device), versions=versions(),
        git_sha=git_sha(), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def measure(op: str, shape: str, dtype: torch.dtype, mode: str, provider: str, fn: Callable[[], object],
            device: torch.device | str, *, min_bytes: int = 0, flops: int = 0, quick: bool = False,
            note: str = "") -> Row:
    """One provider timed alone (:func:`time_fn`)."""
    tick(f"{shape} {mode} {provider}")
    return make_row(op, shape, dtype, mode, provider, time_fn(fn, device, quick=quick), fn, device,
                    min_bytes=min_bytes, flops=flops, note=note)


def skipped(op: str, shape: str, dtype: torch.dtype, mode: str, provider: str, device: torch.device | str,
            why: str) -> Row:
    """A row for a provider that cannot be timed here (kept so tables show the gap and why)."""
    tick()
    return Row(op=op, shape=shape, dtype=str(dtype).removeprefix("torch."), mode=mode, provider=provider,
               median_ms=None, p20_ms=None, p80_ms=None, note=why, device=device_name(device),
               versions=versions(), git_sha=git_sha(), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))


def write_rows(rows: Iterable[Row], name: str, results_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Append rows to results/<name>.csv and results/<name>.jsonl (headers written once)."""
    rows = list(rows)
    results_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = results_dir / f"{name}.csv", results_dir / f"{name}.jsonl"
    fields = [f.name for f in dataclasses.fields(Row)]
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    with json_path.open("a") as f:
        for r in rows:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    return csv_path, json_path


def format_table(rows: Iterable[Row]) -> str:
    """A plain-text side-by-side table, one line per row."""
    head = (f"{'op':<14} {'shape':<34} {'dtype':<8} {'mode':<8} {'provider':<22} {'median ms':>10} {'GB/s':>8} "
            f"{'peak MiB':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        med = f"{r.median_ms:10.3f}" if r.median_ms is not None else f"{'-':>10}"
        gb = f"{r.gbps:8.1f}" if r.gbps is not None else f"{'-':>8}"
        mem = f"{r.peak_mem_mb:9.2f}" if r.peak_mem_mb is not None else f"{'-':>9}"
        lines.append(f"{r.op:<14} {r.shape:<34} {r.dtype:<8} {r.mode:<8} {r.provider:<22} {med} {gb} {mem}  {r.note}")
    return "\n".join(lines)


def why_failed(e: BaseException) -> str:
    """'ExcType: first line of the message' (for a row's note)."""
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def gpu_provider(make: Callable[[str], Callable], backend: str, device: torch.device
                 ) -> tuple[Callable | None, str]:
    """A kernel backend's function, or None and why it is not timed here (no GPU: the interpreter or nothing)."""
    if device.type != "cuda":
        return None, ("interpreter: not timed (Triton needs a GPU to be timed)" if backend == "triton"
                      else "needs a GPU")
    return make(backend), ""


def compiled_provider(make: Callable[[], Callable]) -> tuple[Callable | None, str]:
    try:
        return make(), ""
    except Exception as e:
        return None, f"torch.compile failed: {why_failed(e)}"


def measure_providers(op: str, name: str, dtype: torch.dtype, modes: Iterable[str], case, providers: Iterable[str],
                      provider_fn: Callable, device: torch.device, quick: bool) -> list[Row]:
    """Rows for every provider x mode of one case. ``case`` has check(f, mode) -> note (its first call also
    compiles and loads kernels), runner(f, mode) -> a no-argument callable, min_bytes(mode) and optionally
    flops(mode); ``provider_fn(case, provider)`` gives (f, '') or (None, why it cannot run here).

    On a GPU each provider is timed alone (:func:`time_fn`, ``do_bench``); on the CPU the providers that run of
    one mode are checked first, then timed together round by round (:func:`time_interleaved`)."""
    device = torch.device(device)
    if device.type == "cuda":
        rows = []
        for provider in providers:
            f, why = provider_fn(case, provider)
            for mode in modes:
                if f is None:
                    rows.append(skipped(op, name, dtype, mode, provider, device, why))
                    continue
                try:
                    note = case.check(f, mode)
                except Exception as e:  # an unavailable backend, a compile error at first call ...
                    rows.append(skipped(op, name, dtype, mode, provider, device, why_failed(e)))
                    continue
                flops = case.flops(mode) if hasattr(case, "flops") else 0
                rows.append(measure(op, name, dtype, mode, provider, case.runner(f, mode), device,
                                    min_bytes=case.min_bytes(mode), flops=flops, quick=quick, note=note))
        return rows
    providers = list(providers)
    made = {p: provider_fn(case, p) for p in providers}
    rows = []
    for mode in modes:
        by: dict[str, Row] = {}
        ready: dict[str, tuple[Callable[[], object], str]] = {}
        for provider in providers:
            f, why = made[provider]
            if f is None:
                by[provider] = skipped(op, name, dtype, mode, provider, device, why)
                continue
            try:
                note = case.check(f, mode)
            except Exception as e:  # an unavailable backend, a compile error at first call ...
                by[provider] = skipped(op, name, dtype, mode, provider, device, why_failed(e))
                continue
            ready[provider] = (case.runner(f, mode), note)
        try:
            times = time_interleaved({p: fn for p, (fn, _) in ready.items()}, quick=quick)
        except Exception:  # a provider that passed its check but fails when timed: time each alone
            times = {}
            for p, (fn, _) in ready.items():
                try:
                    times[p] = time_interleaved({p: fn}, quick=quick)[p]
                except Exception as e1:
                    by[p] = skipped(op, name, dtype, mode, p, device, why_failed(e1))
        flops = case.flops(mode) if hasattr(case, "flops") else 0
        for p, (fn, note) in ready.items():
            if p in times:
                tick(f"{name} {mode} {p}")
                by[p] = make_row(op, name, dtype, mode, p, times[p], fn, device, min_bytes=case.min_bytes(mode),
                                 flops=flops, note=note)
        rows += [by[p] for p in providers]
    return rows


def run_shapes(op: str, shapes: Iterable[dict], make_case: Callable, providers: Iterable[str],
               provider_fn: Callable, shape_name: Callable[[dict], str], device: torch.device | str, quick: bool,
               skip: Callable[[dict, torch.device], str | None] | None = None) -> list[Row]:
    """Rows for every shape x dtype (``s["dtypes"]``) x provider x mode (``s["modes"]``) of one op's script.
    ``make_case(s, dtype, device)`` builds a case for :func:`measure_providers`; ``skip(s, device)`` may give
    a reason not to time a shape here (one skipped row records it)."""
    device = torch.device(device)
    providers = list(providers)
    rows: list[Row] = []
    shapes = list(shapes)
    expect_cases(sum(len(s["dtypes"]) * len(providers) * len(s["modes"]) for s in shapes))
    for s in shapes:
        for dtype_name in s["dtypes"]:
            dtype = getattr(torch, dtype_name)
            why = skip(s, device) if skip is not None else None
            if why:
                rows.append(skipped(op, shape_name(s), dtype, s["modes"][0], providers[0], device, why))
                if _progress is not None:  # the shape's other announced cases will not run
                    _progress.update(len(providers) * len(s["modes"]) - 1)
                continue
            rows += measure_providers(op, shape_name(s), dtype, s["modes"], make_case(s, dtype, device), providers,
                                      provider_fn, device, quick)
    return rows


def op_provider(case, provider: str, baseline: str, gpu: Callable[[str], tuple[Callable | None, str]] | None = None
                ) -> tuple[Callable | None, str]:
    """The providers every op script shares, for a case with ``eager`` (the user's chain, named ``baseline`` in
    the rows), ``compiled_eager`` (torch.compile of it), ``op(backend)`` and ``device``: (function, '') or (None,
    why it cannot run here). ``gpu(backend)`` overrides how triton / cuda are made (default: gpu_provider)."""
    if provider == baseline:
        return case.eager, ""
    if provider == baseline + "+compile":
        return compiled_provider(case.compiled_eager)
    if provider in ("reference", "auto"):
        return case.op(provider), ""
    if provider == "cpu":
        return cpu_provider(case.op, case.device)
    if provider in ("triton", "cuda"):
        return gpu(provider) if gpu is not None else gpu_provider(case.op, provider, case.device)
    raise ValueError(f"unknown provider {provider!r}")


def cpu_provider(make: Callable[[str], Callable], device: torch.device) -> tuple[Callable | None, str]:
    """The ``cpu`` backend's function, or None and why it is not timed here (CUDA tensors; the extension not
    built, with the reason ``reprokernels info`` gives)."""
    if device.type != "cpu":
        return None, "CPU tensors only"
    from reprokernels import _cpu

    if not _cpu.available():
        return None, f"cpu backend unavailable: {_cpu.unavailable_reason()}"
    return make("cpu"), ""

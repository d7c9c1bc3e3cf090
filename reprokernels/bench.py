"""``reprokernels bench``: run the benchmark suite and print one side-by-side table per op/shape/dtype/mode.

    reprokernels bench [--ops OP ...] [--quick] [--device DEV] [--out DIR] [--results-dir DIR] [--no-save]

1. Measures the device's own limits (``benchmarks/device_limits.py``): the copy bandwidth of a large tensor copy
   (read + write bytes / time) and the matmul rate (float32 on the CPU, bfloat16 on a GPU), and prints them.
2. Runs ``run(device, quick)`` of every ``benchmarks/bench_<op>.py`` (or the ``--ops`` chosen) and prints, per
   (op, shape, dtype, mode), a table with the providers as columns: median ms, speed-up over the op's baseline
   (the code a user has today: ``eager``, ``peft-eager`` or ``peft-cat+sdpa``; else ``reference``), GB/s against
   the op's minimum traffic and its % of the measured copy bandwidth, TFLOP/s and % of the measured matmul rate
   where the op counts FLOPs, peak memory (CUDA's allocator on a GPU, the profiler's allocator events on a CPU).
   Providers that cannot run here are listed with why.
3. Appends the rows to ``<out>/<op>[_cpu].csv`` / ``.jsonl`` and the limits to ``<out>/device_limits.jsonl``
   (``--out`` defaults to ``./reprokernels-bench/``; ``--results-dir DIR`` sends the rows elsewhere, e.g.
   ``benchmarks/results`` to update the tracked results on purpose), and draws PNGs into ``--out``: bars per
   shape and time vs size per provider and shape family (``benchmarks/plot.py``), from this run's timed rows.
   A progress bar (tqdm, on a terminal) counts the cases.

The benchmark scripts live in the source checkout (``benchmarks/`` next to ``reprokernels/``), not in the
installed package: they are found from this package's path (an editable or in-tree install), or given with
``--benchmarks-dir`` / ``$REPROKERNELS_BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

DEFAULT_OUT = "reprokernels-bench"  # relative to the working directory: a run never writes into the checkout
BASELINES = ("eager", "peft-eager", "peft-cat+sdpa")  # what users run today; "reference" when none of these ran
ENV_DIR = "REPROKERNELS_BENCHMARKS"


class BenchmarksNotFound(RuntimeError):
    pass


def default_benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def locate_benchmarks(explicit: str | os.PathLike | None = None) -> Path:
    """The ``benchmarks/`` folder of the source checkout: ``explicit``, else ``$REPROKERNELS_BENCHMARKS``, else
    the folder next to this package. Raises BenchmarksNotFound with what to do when it is not there."""
    given = explicit or os.environ.get(ENV_DIR)
    path = Path(given).expanduser().resolve() if given else default_benchmarks_dir()
    if (path / "common.py").is_file() and any(path.glob("bench_*.py")):
        if path.name != "benchmarks":
            raise BenchmarksNotFound(f"{path}: the scripts import themselves as the package `benchmarks`, so the "
                                     "folder must be named benchmarks/")
        return path
    where = "given" if given else "next to the installed package"
    raise BenchmarksNotFound(
        f"no benchmark scripts (benchmarks/common.py and benchmarks/bench_<op>.py) in {path} ({where}).\n"
        "`reprokernels bench` runs the scripts of the source checkout; they are not part of the installed package. "
        "Install from a checkout (git clone ...; pip install -e '.[bench]') or point at one with "
        f"--benchmarks-dir PATH/benchmarks (or ${ENV_DIR}).")


def import_benchmarks(path: Path) -> ModuleType:
    """Import ``benchmarks`` (the package at ``path``), putting its parent on sys.path; refuse another one."""
    loaded = sys.modules.get("benchmarks")
    if loaded is not None:
        where = Path(getattr(loaded, "__file__", "") or "").resolve().parent
        if where != path:
            raise BenchmarksNotFound(f"another module named `benchmarks` is already imported (from {where}); "
                                     f"cannot load {path}")
        return loaded
    parent = str(path.parent)
    if not sys.path or sys.path[0] != parent:  # first, so a `benchmarks` folder in the cwd does not shadow it
        sys.path.insert(0, parent)
    importlib.invalidate_caches()
    mod = importlib.import_module("benchmarks")
    where = Path(mod.__file__ or "").resolve().parent
    if where != path:
        raise BenchmarksNotFound(f"`import benchmarks` found {where}, not {path}")
    return mod


# -- the side-by-side table ----------------------------------------------------------------------------------------


def _get(r, name: str):
    return r[name] if isinstance(r, dict) else getattr(r, name)


def baseline_of(providers: Iterable[str]) -> str | None:
    """The provider speed-ups are taken against: the first of BASELINES that was timed, else ``reference``."""
    providers = list(providers)
    for b in BASELINES:
        if b in providers:
            return b
    return "reference" if "reference" in providers else None


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v >= 0.1 else f"{v:.4f}" if v >= 0.001 else f"{v:.2e}"


def side_by_side(rows: list, limits=None) -> str:
    """One block per (op, shape, dtype, mode) in first-seen order: the timed providers as columns; the others
    listed below with why they are not timed. ``limits`` (a DeviceLimits) adds the "% of copy BW / matmul" lines.
    """
    blocks: dict[tuple, list] = {}
    for r in rows:
        blocks.setdefault((_get(r, "op"), _get(r, "shape"), _get(r, "dtype"), _get(r, "mode")), []).append(r)
    out = []
    for (op, shape, dtype, mode), group in blocks.items():
        timed = [r for r in group if _get(r, "median_ms") is not None]
        untimed = [r for r in group if _get(r, "median_ms") is None]
        base_name = baseline_of(_get(r, "provider") for r in timed)
        base = next((_get(r, "median_ms") for r in timed if _get(r, "provider") == base_name), None)
        title = f"{op} | {shape} | {dtype} | {mode}"
        out.append(title + (f"   (speed-up over {base_name})" if base_name else ""))
        if timed:
            names = [_get(r, "provider") for r in timed]
            widths = [max(len(n), 9) for n in names]
            lines = {"": names, "median ms": [_ms(_get(r, "median_ms")) for r in timed]}
            lines["p20-p80 ms"] = [f"{_ms(_get(r, 'p20_ms'))}-{_ms(_get(r, 'p80_ms'))}" for r in timed]
            lines["speed-up"] = [f"{base / _get(r, 'median_ms'):.2f}x" if base and _get(r, "median_ms") else "-"
                                 for r in timed]
            gbps = [_get(r, "gbps") for r in timed]
            if any(g is not None for g in gbps):
                lines["GB/s"] = [_num(g, ".1f") for g in gbps]
                if limits is not None and limits.copy_gbps:
                    lines["% copy BW"] = [_num(None if g is None else 100 * g / limits.copy_gbps, ".1f")
                                          for g in gbps]
            tfl = [_get(r, "tflops") for r in timed]
            if any(t is not None for t in tfl):
                lines["TFLOP/s"] = [_num(t, ".3g") for t in tfl]
                if limits is not None and limits.matmul_tflops:
                    lines[f"% matmul ({limits.matmul_dtype})"] = [
                        _num(None if t is None else 100 * t / limits.matmul_tflops, ".1f") for t in tfl]
            mem = [_get(r, "peak_mem_mb") for r in timed]
            if any(m is not None for m in mem):
                lines["peak MB"] = [_num(m, ".1f") for m in mem]
            widths = [max(w, *(len(v[i]) for v in lines.values())) for i, w in enumerate(widths)]
            label_w = max(len(k) for k in lines) + 2
            for label, values in lines.items():
                out.append("  " + f"{label:<{label_w}}" + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths,
                                                                                             strict=True)))
            for r in timed:
                if _get(r, "note"):
                    out.append(f"  note: {_get(r, 'provider')}: {_get(r, 'note')}")
        if untimed:
            out.append("  not run here: " + "; ".join(f"{_get(r, 'provider')} ({_get(r, 'note') or 'no reason given'})"
                                                      for r in untimed))
        out.append("")
    return "\n".join(out)


# -- the command -----------------------------------------------------------------------------------------------------


def _parser(ops_help: str) -> argparse.ArgumentParser:
    import torch

    p = argparse.ArgumentParser(prog="reprokernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"ops to run (default: all; {ops_help})")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder for the rows (CSV/JSONL) and the PNG plots (default: ./{DEFAULT_OUT}/)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="folder the CSV/JSONL rows are appended to instead of --out (benchmarks/results updates the "
                        "repository's tracked results)")
    p.add_argument("--no-save", action="store_true",
                   help="write no CSV/JSONL rows (plots only when --out is given)")
    p.add_argument("--no-plots", action="store_true", help="draw no PNGs")
    p.add_argument("--benchmarks-dir", default=None,
                   help=f"the checkout's benchmarks/ folder (default: next to the package, or ${ENV_DIR})")
    p.add_argument("--list", action="store_true", help="list the ops and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        bdir = locate_benchmarks(_peek(argv, "--benchmarks-dir"))
        import_benchmarks(bdir)
    except BenchmarksNotFound as e:
        if any(a in ("-h", "--help") for a in argv):
            _parser("the benchmarks folder was not found").print_help()
            return 0
        print(f"reprokernels bench: {e}", file=sys.stderr)
        return 2
    from benchmarks import device_limits
    from benchmarks import plot as bplot
    from benchmarks.common import device_name, git_sha, progress_bar, versions, write_rows
    from benchmarks.run import available_ops, results_name

    ops_available = available_ops()
    parser = _parser(", ".join(ops_available))
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(ops_available))
        return 0
    ops = args.ops or ops_available
    unknown = [op for op in ops if op not in ops_available]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; available: {ops_available}")

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("reprokernels bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    out_dir = (args.out or Path(DEFAULT_OUT)).resolve()
    results_dir = (args.results_dir or out_dir).resolve()
    plots_dir = out_dir
    save = not args.no_save
    draw = not args.no_plots and (save or args.out is not None)
    if not out_dir.exists() and (draw or (save and args.results_dir is None)):
        # run from a checkout, ./reprokernels-bench/ would show up in `git status`; a folder we create ignores itself
        out_dir.mkdir(parents=True)
        (out_dir / ".gitignore").write_text("# created by reprokernels bench\n*\n")

    t0 = time.perf_counter()
    print(f"reprokernels bench{' --quick' if args.quick else ''}: {device_name(device)}; {versions()}; "
          f"git {git_sha()}; ops: {' '.join(ops)}")
    limits = device_limits.measure_limits(device, quick=args.quick)
    print(f"measured limits: {limits.describe()}")
    if device.type != "cuda":
        print("peak MB: from the profiler's CPU allocator events (PyTorch allocations only, not scratch memory a "
              "kernel obtains elsewhere)")
    print("GB/s and TFLOP/s are against each op's minimum traffic / FLOPs (each input read once, each output "
          "written once)\n")

    all_rows, failed, written = [], [], []
    for op in ops:
        t_op = time.perf_counter()
        try:
            with progress_bar(op):
                rows = importlib.import_module(f"benchmarks.bench_{op}").run(device, quick=args.quick)
        except Exception as e:  # one broken script must not hide the others' results
            failed.append(op)
            print(f"== {op}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            continue
        print(f"== {op} ({time.perf_counter() - t_op:.1f} s)\n")
        print(side_by_side(rows, limits))
        all_rows += rows
        if save and rows:
            written += write_rows(rows, results_name(op, device), results_dir)
    if save:
        written.append(device_limits.append(limits, results_dir))
    if written:
        print("results:", *written, sep="\n  ")
    if draw and all_rows:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plots: skipped (needs matplotlib: pip install matplotlib, or the bench extra)")
        else:
            dicts = [dataclasses.asdict(r) for r in all_rows]
            pngs = bplot.plot(dicts, plots_dir) + bplot.plot_size(dicts, plots_dir)
            print("plots:", *pngs, sep="\n  ") if pngs else print("plots: none (no timed rows)")
    print(f"done in {time.perf_counter() - t0:.1f} s" + (f"; FAILED: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _peek(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in argv (``--flag V`` or ``--flag=V``) before the full parse (which needs the ops)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    raise SystemExit(main())

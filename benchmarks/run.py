"""Run the benchmark scripts: ``python -m benchmarks.run [op ...] [--quick] [--device cuda]``.

Every ``benchmarks/bench_<op>.py`` exposes ``run(device, quick) -> list[Row]``; results append to
``benchmarks/results/<op>.csv`` / ``.jsonl`` and a table is printed.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from benchmarks.common import format_table, write_rows


def available_ops() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))


def results_name(op: str, device: torch.device | str) -> str:
    """The results file stem of an op's rows: ``<op>`` on a GPU, ``<op>_cpu`` on the CPU."""
    return op if torch.device(device).type == "cuda" else f"{op}_cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ops", nargs="*", help=f"ops to run (default: all of {available_ops()})")
    parser.add_argument("--quick", action="store_true", help="small shapes and short timing (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true", help="print only, do not append to results/")
    args = parser.parse_args(argv)
    ops = args.ops or available_ops()
    if not ops:
        print("no benchmarks yet")
        return 0
    for op in ops:
        if op not in available_ops():
            parser.error(f"unknown op {op!r}; available: {available_ops()}")
        mod = importlib.import_module(f"benchmarks.bench_{op}")
        rows = mod.run(torch.device(args.device), quick=args.quick)
        print(format_table(rows))
        if not args.no_save:
            print("results:", *write_rows(rows, results_name(op, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

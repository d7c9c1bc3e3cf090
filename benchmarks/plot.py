"""Draw benchmark results: ``python -m benchmarks.plot [results/*.csv ...] [--out DIR] [--device SUBSTR]``.

Two kinds of PNG (``--kind``):

bars   one per (op, shape, device) with at least one timed row: grouped bars of the median time (ms, log scale,
       p20-p80 as error bars), one group per (dtype, mode), one bar per provider.
size   one per (op, device): time vs size, one panel per (dtype, mode), one line per (provider, shape family);
       the size of a shape is the op's minimum traffic (``min_bytes``: each input read once, each output written
       once). A family is the shape name's first word (``train``, ``decode``, ``expansive``, ``smm`` ...): shapes of
       different families are different computations, so their points are never joined (a family with one size
       is a lone marker). Log-log; each point is labelled with its shape.

``plot`` and ``plot_size`` take rows as dicts: CSV rows (strings) or ``dataclasses.asdict(Row)`` (numbers), so
``reprokernels bench`` draws the rows of its run without reading the CSVs back.

Each CSV is the append-only log written by ``benchmarks.run`` / ``reprokernels bench``; when a configuration
(op, shape, dtype, mode, provider, device) was measured more than once the latest row wins. Skipped rows (no
time) are left out of the bars and listed under the chart. Needs matplotlib
(``pip install matplotlib``, or the ``bench`` extra); without it the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROVIDER_ORDER = ("eager", "peft-eager", "peft-cat+sdpa", "peft-eager+compile", "ideal-sdpa", "reference",
                  "reference+compile", "composite", "triton", "cuda")


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "", "None") else None
    except ValueError:
        return None


def load(paths: list[Path], device: str | None = None) -> list[dict]:
    """The rows of the CSVs, the latest per configuration, optionally only devices containing ``device``."""
    latest: dict[tuple, dict] = {}
    for path in paths:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if device and device.lower() not in row.get("device", "").lower():
                    continue
                key = (row["op"], row["shape"], row["dtype"], row["mode"], row["provider"], row.get("device", ""))
                if key not in latest or row.get("timestamp", "") >= latest[key].get("timestamp", ""):
                    latest[key] = row
    return list(latest.values())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def family(shape: str) -> str:
    """The shape family: the first word of the shape name (shapes are named "<family> <sizes>")."""
    return shape.split()[0] if shape.split() else shape


def _provider_key(p: str) -> tuple[int, str]:
    return (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER), p)


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_figure: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_figure[(r["op"], r["shape"], r.get("device", ""))].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (op, shape, device), group in sorted(by_figure.items()):
        timed = [r for r in group if _float(r["median_ms"]) is not None]
        if not timed:  # an empty chart says nothing; the untimed reasons are in the CSV and the printed table
            continue
        untimed = sorted({f"{r['provider']}: {r.get('note', '')}" for r in group if _float(r["median_ms"]) is None})
        configs = sorted({(r["dtype"], r["mode"]) for r in group})
        providers = sorted({r["provider"] for r in timed}, key=_provider_key)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(configs) * max(1, len(providers)) / 2), 4.5))
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            xs, meds, lo, hi = [], [], [], []
            for j, cfg in enumerate(configs):
                match = [r for r in timed if (r["dtype"], r["mode"]) == cfg and r["provider"] == provider]
                if not match:
                    continue
                r = match[0]
                med = _float(r["median_ms"])
                p20, p80 = _float(r["p20_ms"]), _float(r["p80_ms"])
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                meds.append(med)
                lo.append(max(0.0, med - p20) if p20 is not None else 0.0)
                hi.append(max(0.0, p80 - med) if p80 is not None else 0.0)
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=provider)
        ax.set_xticks(range(len(configs)), [f"{d}\n{m}" for d, m in configs])
        ax.set_ylabel("median time (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{op}: {shape}\n{device}", fontsize=9)
        if providers:
            ax.legend(fontsize=8)
        if untimed:
            fig.text(0.01, 0.01, "not timed: " + "; ".join(untimed), fontsize=6, wrap=True)
            fig.subplots_adjust(bottom=0.22)
        path = out_dir / f"{_slug(op)}__{_slug(shape)}__{_slug(device)[:40]}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def plot_size(rows: list[dict], out_dir: Path) -> list[Path]:
    """Time vs size per provider: one PNG per (op, device), a log-log panel per (dtype, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    by_figure: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if _float(r.get("median_ms")) is not None and (_float(r.get("min_bytes")) or 0) > 0:
            by_figure[(r["op"], r.get("device", ""))].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (op, device), group in sorted(by_figure.items()):
        panels = sorted({(r["dtype"], r["mode"]) for r in group})
        ncol = min(2, len(panels))
        nrow = (len(panels) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.0 * ncol, 4.2 * nrow), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (dtype, mode) in zip(axes.flat[:len(panels)], panels, strict=True):
            sub = [r for r in group if (r["dtype"], r["mode"]) == (dtype, mode)]
            families = sorted({family(r["shape"]) for r in sub})
            markers = dict(zip(families, "osD^v<>ph*", strict=False))
            for provider in sorted({r["provider"] for r in sub}, key=_provider_key):
                color = None
                for fam in families:
                    pts = sorted((_float(r["min_bytes"]) / 1e6, _float(r["median_ms"]), r["shape"])
                                 for r in sub if r["provider"] == provider and family(r["shape"]) == fam)
                    if not pts:
                        continue
                    label = provider if len(families) == 1 else f"{provider} · {fam}"
                    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(fam, "o"),
                                    color=color, label=label)
                    color = line.get_color()  # one colour per provider across its families
            shapes = {}
            for r in sub:  # one label per shape, at its size and its fastest time
                x, y = _float(r["min_bytes"]) / 1e6, _float(r["median_ms"])
                if r["shape"] not in shapes or y < shapes[r["shape"]][1]:
                    shapes[r["shape"]] = (x, y)
            for shape, (x, y) in shapes.items():
                ax.annotate(shape, (x, y), textcoords="offset points", xytext=(3, -10), fontsize=6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # 3, 5, 10 rather than 3x10^0 ...
                axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else ""))
            ax.set_xlabel("size: minimum traffic (MB)")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{dtype} {mode}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{op}: time vs size\n{device}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{_slug(op)}__time_vs_size__{_slug(device)[:40]}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="*", type=Path, help="result CSVs (default: benchmarks/results/*.csv)")
    parser.add_argument("--out", type=Path, default=RESULTS / "plots", help="output folder for the PNGs")
    parser.add_argument("--device", default=None, help="only rows whose device contains this text")
    parser.add_argument("--kind", choices=("bars", "size", "all"), default="all",
                        help="bars per shape, time vs size per op, or both (default)")
    args = parser.parse_args(argv)
    paths = args.csv or sorted(RESULTS.glob("*.csv"))
    if not paths:
        print(f"no result CSVs in {RESULTS} (run: python -m benchmarks.run <op>)", file=sys.stderr)
        return 1
    rows = load(paths, args.device)
    if not rows:
        print("no rows to plot", file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks.plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')",
              file=sys.stderr)
        return 2
    paths = (plot(rows, args.out) if args.kind in ("bars", "all") else []) + (
        plot_size(rows, args.out) if args.kind in ("size", "all") else [])
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

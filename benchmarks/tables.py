"""The README's benchmark tables, generated from the result CSVs: ``python -m benchmarks.tables [--check]``.

Every number in a README table is a ``median_ms`` (or ``peak_mem_mb``) of one CSV row in ``benchmarks/results/``,
the last row of that (shape, dtype, mode, provider) in the file; each table row names the device and thread
count, the date and the providers as they were recorded. Two kinds of table: ``Entry`` rows (a baseline and
chosen others, named one by one) and ``Grid`` rows (every (shape, dtype, mode) of a file that has a row of the
grid's last provider, e.g. ``auto``, in file order, with fixed provider columns: the user's eager chain,
torch.compile of it, the reference, the cpu backend and auto, each as median ms, GB/s on the op's minimum bytes
and peak MiB, and auto's speed against the eager chain and its compiled form). ``--write`` (the default)
replaces the text between ``<!-- bench-table: NAME -->`` and ``<!-- /bench-table -->`` in README.md; ``--check``
exits 1 when the README differs from what the CSVs give (``tests/test_examples.py`` runs it).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


@dataclass(frozen=True)
class Entry:
    """One README row: ``rows`` are (shape, provider) pairs of ``file``; the first provider is the baseline."""

    title: str
    file: str
    dtype: str
    mode: str
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Grid:
    """Every (shape, dtype, mode) of ``file`` (of ``ops``) with a row of ``providers[-1]``, one table row each,
    ``providers`` as columns (read as: eager chain, compiled chain, reference, fast path, auto); "a|b": a where
    it was timed, else b."""

    file: str
    ops: tuple[str, ...]
    providers: tuple[str, ...]


def _same_shape(shape: str, *providers: str) -> tuple[tuple[str, str], ...]:
    return tuple((shape, p) for p in providers)


_CPU_COLUMNS = ("eager", "eager+compile", "reference", "cpu", "auto")

TABLES: dict[str, tuple[Entry | Grid, ...]] = {
    "ops-cpu": (
        Grid("visual_prompt_cpu", ("visual_prompt",), _CPU_COLUMNS),
        Grid("soft_prompt_cpu", ("soft_prompt",), ("peft-eager", "peft-eager+compile", "reference", "cpu", "auto")),
        Grid("label_map_cpu", ("label_map", "label_histogram"), _CPU_COLUMNS),
        Grid("prefix_attention_cpu", ("prefix_attention",),
             ("peft-cat+sdpa", "peft-cat+sdpa+compile", "reference", "cpu|composite", "auto")),
    ),
    "ops-cpu-full": (
        Entry("prefix_attention decode, B64 H8 P2048 own 128 d64", "prefix_attention_cpu", "float32", "fwd",
              _same_shape("decode B64 H8/8 Lq1 Lk128 P2048 d64", "peft-cat+sdpa", "cpu", "composite", "reference")),
        Entry("prefix_attention train, B8 H8 L256 P64 d64", "prefix_attention_cpu", "float32", "fwd+bwd",
              _same_shape("train B8 H8/8 L256 P64 d64", "peft-cat+sdpa", "composite", "reference")),
    ),
    "integrations-cpu": (
        Entry("prefix tuning P=128, train step B32 L128", "integrations_cpu", "float32", "train-step",
              (("prefix B32 L128 P128 layers4 d_model512", "peft"),
               ("prefix B32 L128 P128 layers4 d_model512", "accelerated"),
               ("B32 L128 P128 layers4 d_model512", "no-prompt"))),
        Entry("prompt tuning P=128, train step B32 L128", "integrations_cpu", "float32", "train-step",
              _same_shape("prompt B32 L128 P128 layers4 d_model512", "peft", "accelerated")),
        Entry("prompt tuning P=128, generate 64 tokens B32", "integrations_cpu", "float32", "generate",
              (("prompt P128 B32 prompt32 new64", "peft"), ("prompt P128 B32 prompt32 new64", "accelerated"),
               ("B32 prompt32 new64", "no-prompt"))),
        Entry("prefix tuning P=128, generate 64 tokens B32", "integrations_cpu", "float32", "generate",
              (("prefix P128 B32 prompt32 new64", "peft-expanded-cache"),
               ("prefix P128 B32 prompt32 new64", "accelerated"), ("B32 prompt32 new64", "no-prompt"))),
        Entry("prefix tuning P=2048, generate 64 tokens B32", "integrations_cpu", "float32", "generate",
              (("prefix P2048 B32 prompt32 new64", "peft-expanded-cache"),
               ("prefix P2048 B32 prompt32 new64", "accelerated"), ("B32 prompt32 new64", "no-prompt"))),
    ),
}

GRID_HEADER = ("| op | shape | dtype | mode | measured on | eager chain | torch.compile of it | reference "
               "| cpu (attention: cpu decode, else composite) | auto | auto vs eager | auto vs compile |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|")
HEADER = ("| op, shape, dtype | mode | measured on | baseline: median | others: median (vs the baseline) |\n"
          "|---|---|---|---|---|")


def load(file: str, results: Path = RESULTS) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """The last row of each (shape, dtype, mode, provider) in ``<results>/<file>.csv``."""
    return {(r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in load_rows(file, results)}


def load_rows(file: str, results: Path = RESULTS) -> list[dict[str, str]]:
    """Every row of ``<results>/<file>.csv``, in file order."""
    path = results / f"{file}.csv"
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _ms(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.0f} s"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    return f"{v:.3g} ms" if v >= 0.01 else f"{v:.2g} ms"


def _vs(base: float, v: float) -> str:
    """Speed relative to the baseline, in words: a ratio under 1 is 'slower', never 'faster'."""
    if abs(v - base) <= 0.02 * base:
        return "same as the baseline"
    return f"{base / v:.3g}× faster" if v < base else f"{v / base:.3g}× slower"


def _cell(r: dict[str, str]) -> str:
    text = f"{r['provider']} {_ms(float(r['median_ms']))}"
    if r.get("peak_mem_mb"):
        mib = float(r["peak_mem_mb"])
        text += f", peak {mib:.0f} MiB" if mib >= 100 else f", peak {mib:.3g} MiB"
    return text


def _ratio(base: dict[str, str] | None, r: dict[str, str] | None) -> str:
    """base / r as a speed ratio ('1.52×': r is 1.52 times as fast; under 1: r is slower); '—' if either is
    untimed."""
    if base is None or r is None or not base.get("median_ms") or not r.get("median_ms"):
        return "—"
    x = float(base["median_ms"]) / float(r["median_ms"])
    return f"{x:.2f}×" + (" (slower)" if x < 0.98 else "")


def _grid_cell(r: dict[str, str] | None) -> str:
    if r is None:
        return "—"
    if not r["median_ms"]:
        return f"not run: {r['note']}" if r["note"] else "not run"
    parts = [_ms(float(r["median_ms"]))]
    if r.get("gbps"):
        parts.append(f"{float(r['gbps']):.3g} GB/s")
    if r.get("peak_mem_mb"):
        mib = float(r["peak_mem_mb"])
        parts.append(f"{mib:.0f} MiB" if mib >= 100 else f"{mib:.3g} MiB")
    if "MISMATCH" in r.get("note", ""):
        parts.append(r["note"])
    return ", ".join(parts)


def _first_timed(last: dict, key: tuple, providers: str) -> dict[str, str] | None:
    """The row of the first of ``providers`` ("a|b": a where it was timed, else b) that was timed, else the
    first one's row (untimed, or None)."""
    names = providers.split("|")
    for p in names:
        r = last.get((*key, p))
        if r is not None and r["median_ms"]:
            return r
    return last.get((*key, names[0]))


def render_grid(grids: tuple[Grid, ...], results: Path = RESULTS) -> str:
    lines = [GRID_HEADER]
    for g in grids:
        rows = load_rows(g.file, results)
        last = {(r["op"], r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in rows}
        keys = list(dict.fromkeys((r["op"], r["shape"], r["dtype"], r["mode"]) for r in rows
                                  if r["op"] in g.ops and r["provider"] == g.providers[-1]))
        for key in keys:
            found = [_first_timed(last, key, p) for p in g.providers]
            timed = [r for r in found if r is not None and r["median_ms"]]
            where = "; ".join(sorted({f"{r['device']}, {r['timestamp'][:10]}" for r in timed})) or "—"
            eager, comp, auto = found[0], found[1], found[-1]
            cells = " | ".join(_grid_cell(r) for r in found)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {where} | {cells} "
                         f"| {_ratio(eager, auto)} | {_ratio(comp, auto)} |")
    return "\n".join(lines)


def render(name: str, results: Path = RESULTS) -> str:
    if all(isinstance(e, Grid) for e in TABLES[name]):
        return render_grid(TABLES[name], results)
    lines = [HEADER]
    cache: dict[str, dict] = {}
    for e in TABLES[name]:
        rows = cache.setdefault(e.file, load(e.file, results))
        found = []
        for shape, provider in e.rows:
            r = rows.get((shape, e.dtype, e.mode, provider))
            if r is None or not r["median_ms"]:
                raise KeyError(f"{e.file}.csv: expected a timed row for shape={shape!r} dtype={e.dtype} "
                               f"mode={e.mode} provider={provider!r}, got none")
            found.append(r)
        base = float(found[0]["median_ms"])
        where = sorted({f"{r['device']}, {r['timestamp'][:10]}" for r in found})
        others = "; ".join(f"{_cell(r)} ({_vs(base, float(r['median_ms']))})" for r in found[1:])
        lines.append(f"| {e.title}, {e.dtype} | {e.mode} | {'; '.join(where)} | {_cell(found[0])} | {others} |")
    return "\n".join(lines)


_BLOCK = re.compile(r"(<!-- bench-table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- /bench-table -->)", re.S)


def rewrite(text: str, results: Path = RESULTS) -> str:
    """README text with every bench-table block regenerated from the CSVs."""
    return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), results) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--check", action="store_true", help="exit 1 if the README's tables differ from the CSVs")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = rewrite(text, args.results_dir)
    if args.check:
        if new != text:
            print(f"{args.readme}: the benchmark tables differ from {args.results_dir}/*.csv; "
                  "regenerate with: python -m benchmarks.tables", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"{args.readme}: tables regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

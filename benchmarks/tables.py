"""The README's benchmark tables, generated from the result CSVs: ``python -m benchmarks.tables [--check]``.

Every number in a README table is a ``median_ms`` (or ``peak_mem_mb``) of one CSV row in ``benchmarks/results/``,
the last row of that (shape, dtype, mode, provider) in the file; each table row names the device and thread
count, the date and the providers as they were recorded. ``--write`` (the default) replaces the text between
``<!-- bench-table: NAME -->`` and ``<!-- /bench-table -->`` in README.md; ``--check`` exits 1 when the README
differs from what the CSVs give (``tests/test_examples.py`` runs it).
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


def _same_shape(shape: str, *providers: str) -> tuple[tuple[str, str], ...]:
    return tuple((shape, p) for p in providers)


TABLES: dict[str, tuple[Entry, ...]] = {
    "ops-cpu": (
        Entry("visual_prompt, expansive B8 3×32×32→224×224", "visual_prompt_cpu", "float32", "fwd",
              _same_shape("expansive B8 3x32x32->224x224", "eager", "reference", "reference+compile")),
        Entry("visual_prompt, SMM B8 3×224×224, mask 28×28", "visual_prompt_cpu", "float32", "fwd+bwd",
              _same_shape("smm B8 3x224x224 m3x28x28", "eager", "reference", "reference+compile")),
        Entry("soft_prompt_concat, B4 L32 P8 D256, 8 tasks", "soft_prompt_cpu", "bfloat16", "fwd",
              _same_shape("llama3 B4 L32 P8 D256 T8", "peft-eager", "reference", "peft-eager+compile")),
        Entry("label_map, 128,256-token vocab → 10, log_probs", "label_map_cpu", "float32", "fwd",
              _same_shape("verbalizer B2 128256->10 m4 mean log_probs", "reference", "reference+compile")),
        Entry("label_histogram, B2000 1000 → 10, counts", "label_map_cpu", "float32", "fwd",
              _same_shape("cifar10-train B2000 1000->10 count", "eager", "reference")),
        Entry("prefix_attention decode, B64 H8 P2048 own 128 d64", "prefix_attention_cpu", "float32", "fwd",
              _same_shape("decode B64 H8/8 Lq1 Lk128 P2048 d64", "peft-cat+sdpa", "composite", "reference")),
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

HEADER = ("| op, shape, dtype | mode | measured on | baseline: median | others: median (vs the baseline) |\n"
          "|---|---|---|---|---|")


def load(file: str, results: Path = RESULTS) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """The last row of each (shape, dtype, mode, provider) in ``<results>/<file>.csv``."""
    path = results / f"{file}.csv"
    with path.open(newline="") as f:
        return {(r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in csv.DictReader(f)}


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


def render(name: str, results: Path = RESULTS) -> str:
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

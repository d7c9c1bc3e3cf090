"""Every file in examples/ runs as a user would run it, and the README shows each one unchanged.

The README's Python blocks are the example files (each block follows an ``<!-- example: examples/NAME.py -->``
marker), so what a reader copies is what CI runs. The README's benchmark tables are what
``python -m benchmarks.tables`` generates from benchmarks/results/*.csv.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import tables

from .hf_models import need_hf

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NEEDS = {"hf_peft.py": ("transformers", "peft")}  # optional extras an example imports
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
MARKED = re.compile(r"<!-- example: (?P<path>\S+) -->\n```python\n(?P<code>.*?)```", re.S)


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"ops_tour.py", "hf_peft.py"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path: Path, tmp_path: Path):
    need_hf(*NEEDS.get(path.name, ()))
    # a clean working directory: an example must not rely on files next to it or write into the checkout
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{path.name} printed nothing"


def test_readme_python_blocks_are_the_examples():
    text = README.read_text()
    marked = list(MARKED.finditer(text))
    assert len(marked) == len(BLOCK.findall(text)), "every ```python block needs an <!-- example: PATH --> marker"
    shown = set()
    for m in marked:
        path = ROOT / m.group("path")
        assert path.is_file(), f"README shows {m.group('path')}, which does not exist"
        assert m.group("code") == path.read_text(), f"README's block differs from {m.group('path')}"
        shown.add(path)
    assert shown == set(EXAMPLES), f"examples not shown in the README: {sorted(set(EXAMPLES) - shown)}"


def test_readme_tables_come_from_the_csvs():
    text = README.read_text()
    assert "<!-- bench-table: ops-cpu -->" in text
    assert tables.rewrite(text) == text, "README's tables differ from the CSVs: run python -m benchmarks.tables"


def test_readme_points_only_at_files_that_exist():
    text = README.read_text()
    for ref in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (ROOT / ref).exists(), ref
    assert "DESIGN.md" not in text

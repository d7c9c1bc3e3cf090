"""Command line: ``reprokernels info | demo | bench | methods`` (each subcommand has its own ``--help``)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# subcommand -> module with ``main(argv) -> int`` (imported only when used: the CLI starts fast)
SUBCOMMANDS = {
    "demo": ("reprokernels.demo", "an end-to-end reprogramming run on real data (scikit-learn digits)"),
    "bench": ("reprokernels.bench", "the benchmark suite: side-by-side tables, CSV/JSON rows and plots"),
    "methods": ("reprokernels.methods", "the reprogramming methods implemented, by the survey's taxonomy"),
}


def _version() -> str:
    # the installed distribution's version, without importing torch (the CLI's --version stays instant)
    import importlib.metadata

    try:
        return importlib.metadata.version("reprokernels")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="reprokernels", description="Fused kernels for model reprogramming.")
    parser.add_argument("--version", action="version", version=f"reprokernels {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, and which backend runs here")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import _info

        if args.json:
            print(json.dumps(_info.info_dict(), indent=1))
        else:
            _info.info()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

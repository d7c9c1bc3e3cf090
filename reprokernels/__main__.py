"""Command line: ``reprokernels info``."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprokernels", description="Fused kernels for model reprogramming.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, and which backend runs here")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
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

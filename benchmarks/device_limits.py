"""The device's own limits, measured (not from a datasheet): ``python -m benchmarks.device_limits [--device cuda]``.

copy bandwidth  ``dst.copy_(src)`` of a large contiguous tensor (256 MiB on the CPU, 1 GiB on a GPU; half that
                with ``quick``), counted as read + write bytes / median time. Large enough to leave the caches,
                so it is what a one-pass, memory-bound kernel can reach at best: a benchmark row's GB/s over
                this number is its "% of copy bandwidth".
matmul rate     a square ``a @ b`` (float32 on the CPU, n = 2048, 1024 with ``quick``; bfloat16 on a GPU,
                n = 8192), 2 n^3 FLOPs / median time: the compute roof a row's TFLOP/s is compared with. On a
                GPU it is the bf16 tensor-core rate, so float32 rows are compared with a roof they cannot reach.

Timing goes through ``benchmarks.common.time_fn`` like every benchmark (do_bench on a GPU,
``torch.utils.benchmark`` on the CPU), so the limits and the rows are measured the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, time_fn


@dataclasses.dataclass
class DeviceLimits:
    device: str
    copy_gbps: float  # read + write GB/s (1e9 bytes) of a large tensor copy
    copy_bytes: int  # bytes of the copied tensor (one side)
    matmul_tflops: float
    matmul_dtype: str
    matmul_n: int
    timestamp: str = ""

    def describe(self) -> str:
        return (f"copy bandwidth {self.copy_gbps:.1f} GB/s (read+write, {self.copy_bytes / 2**20:.0f} MiB tensor "
                f"copy); matmul {self.matmul_tflops:.3g} TFLOP/s ({self.matmul_dtype}, "
                f"{self.matmul_n}x{self.matmul_n} @ {self.matmul_n}x{self.matmul_n})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_copy_bandwidth(device: torch.device | str, quick: bool = False, nbytes: int | None = None
                           ) -> tuple[float, int]:
    """(GB/s counting the bytes read and written, bytes of one side) of ``dst.copy_(src)``."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30 if device.type == "cuda" else 256 << 20) >> (1 if quick else 0)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)  # touched: no first-touch page faults in the timing
    dst = torch.zeros_like(src)
    med_ms, _, _ = time_fn(lambda: dst.copy_(src), device, quick=quick)
    return 2 * n * 4 / (med_ms * 1e-3) / 1e9, n * 4


def measure_matmul_rate(device: torch.device | str, quick: bool = False, n: int | None = None,
                        dtype: torch.dtype | None = None) -> tuple[float, int, torch.dtype]:
    """(TFLOP/s, n, dtype) of a square matmul: float32 on the CPU, bfloat16 on a GPU."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else (1024 if quick else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    med_ms, _, _ = time_fn(lambda: a @ b, device, quick=quick)
    return 2 * n**3 / (med_ms * 1e-3) / 1e12, n, dtype


def measure_limits(device: torch.device | str, quick: bool = False) -> DeviceLimits:
    device = torch.device(device)
    gbps, nbytes = measure_copy_bandwidth(device, quick)
    tflops, n, dtype = measure_matmul_rate(device, quick)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return DeviceLimits(device=device_name(device), copy_gbps=gbps, copy_bytes=nbytes, matmul_tflops=tflops,
                        matmul_dtype=str(dtype).removeprefix("torch."), matmul_n=n,
                        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))


def append(limits: DeviceLimits, results_dir: Path) -> Path:
    """Append the limits to ``results_dir/device_limits.jsonl`` (the rows' "% of" columns can be recomputed)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "device_limits.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(limits.to_dict()) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    limits = measure_limits(args.device, args.quick)
    print(json.dumps(limits.to_dict(), indent=1) if args.json else f"{limits.device}: {limits.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

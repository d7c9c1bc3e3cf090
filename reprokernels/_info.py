"""``reprokernels.info()``: versions, devices and which backend can run here (and why not)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import warnings
from typing import TextIO

import torch

from . import _backend, _cpu, _cuda


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# Public ops that are plain PyTorch (no backend choice): listed so `info` names every op the package exports.
_PLAIN_OPS = {
    "greedy_label_mapping": "plain PyTorch (one-to-one mapping from a label histogram)",
    "bayesian_label_mapping": "plain PyTorch (probabilistic mapping from a label histogram)",
}


# How auto routes the ops whose choice depends on the call, not only on the device (the rules live in the ops).
AUTO_ROUTES = {
    "prefix_attention": (
        "CUDA: cuda for decode (Lq <= 16, no gradients, d <= 512) with at most 16 queries per prefix kv head "
        "(B * Hq / Hkv * Lq) or no prefix -- CUDA-core kernels, memory-bound there; triton for training, prefill "
        "and larger decode batches (the shared prefix as a tensor-core GEMM); composite for head dims triton "
        "lacks. CPU: the cpu decode kernel for a call without gradients, Lq <= 16, float32/float16/bfloat16; "
        "else composite, and in eager mode a float32 (or float64) call with a prefix "
        "whose concatenated keys are small (B * Hkv * (P + Lk) * d <= 2**20) and no return_lse runs as concat + "
        "SDPA (PEFT's chain, unseen keys zeroed), where the composite plan's many small calls cost more than the "
        "math"),
    "merge_attention_states": "CUDA: cuda when no input needs a gradient and none is float64, else reference. "
                              "CPU: reference",
    "label_map": (
        "CPU, eager mode: a one-to-one map of logits with every source real runs as torch.index_select; index "
        "maps otherwise: cpu; dense maps: cpu for a fixed map of at most 16 targets over at least 32 rows and 2**17 "
        "logits (softmax inputs: rows of at most 4096), or of any width over at least 128 rows and 4,000,000 "
        "logits that get a gradient (its blocked "
        "register-tile GEMM beats the BLAS there), else the reference as plain PyTorch (a BLAS GEMM). "
        "Compiled or traced: the registered op (cpu for index maps, reference for dense)"),
    "visual_prompt": "CPU: cpu unless resize is asked (the reference, as plain PyTorch in eager mode)",
    "cpu backend, eager mode": (
        "the autograd Functions call the cpu launchers directly (not the registered ops), and a call that needs "
        "no gradient runs the launcher alone; under the profiler, torch.compile, functorch or a dispatch mode "
        "the registered ops run, so profiles and traces name them"),
}


def _devices() -> tuple[list[str], str]:
    """(CUDA device names, why there are none). Asks torch only: a CPU wheel never touches a driver."""
    if torch.version.cuda is None:
        return [], "no GPU: this torch is a CPU-only build"
    with warnings.catch_warnings():  # torch warns about a missing driver; the reason below says it plainly
        warnings.simplefilter("ignore")
        if not torch.cuda.is_available():
            return [], "no GPU: torch finds no usable NVIDIA GPU or driver"
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], ""


def info_dict() -> dict:
    devices, no_gpu = _devices()
    backends = {}
    dev = "cuda" if devices else "cpu"
    for name in ("reference", "composite", "cpu", "triton", "cuda"):
        ok, why = _backend.backend_status(name, "cpu" if name == "cpu" else dev)
        if name == "triton" and not devices and ok:
            why = "runs here only through the Triton interpreter (TRITON_INTERPRET=1): for testing, not speed"
        elif name == "triton" and not devices:
            why = f"{no_gpu}; Triton kernels need CUDA tensors (TRITON_INTERPRET=1 runs them slowly on the CPU)"
        elif name == "cpu" and ok:
            why = ("auto picks it for a call whose op passes its case (dtypes, options) to the backend choice and "
                   "the kernels serve it; docs/cpu-backend.md")
        elif name == "cuda" and not devices:
            ok, why = False, f"{no_gpu}; the CUDA kernels need one"
        elif name == "cuda" and not _cuda.cuda_available():
            ok, why = False, _cuda.unavailable_reason()
        backends[name] = {"available": ok, "why_not": why, "device": dev}
    ops = {op: list(bks) for op, bks in _backend._OPS.items()}
    ops.update({op: [what] for op, what in _PLAIN_OPS.items()})
    return {
        "reprokernels": _version("reprokernels"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "triton_interpreter": _backend.interpreter_enabled(),
        "cuda_extension": _cuda.build_info() or None,
        "cuda_extension_loaded": _cuda.extension_built(),
        "cuda_runtime_of_C": _cuda.runtime_version(),
        "cpu_module": _cpu.describe(),
        "cpu_module_loaded": _cpu.available(),
        "devices": devices,
        "no_gpu_reason": no_gpu,
        "default_backend": _backend.default_backend(),
        "backends": backends,
        "ops": dict(sorted(ops.items())),
        "auto_routes": AUTO_ROUTES,
    }


def info(file: TextIO | None = None) -> None:
    """Print versions, devices, and for each backend whether it is available here and why not."""
    d = info_dict()
    out = file or sys.stdout
    ext = d["cuda_extension"] or {}
    no_gpu = d["no_gpu_reason"] + " (the CPU runs the cpu, reference and composite backends)"
    lines = [
        f"reprokernels {d['reprokernels']}  (python {d['python']})",
        f"torch        {d['torch']}  (CUDA {d['torch_cuda'] or 'none'})",
        f"triton       {d['triton']}{'  (interpreter: TRITON_INTERPRET=1)' if d['triton_interpreter'] else ''}",
        f"_C           {'loaded' if d['cuda_extension_loaded'] else 'not loaded'}; "
        f"{ext.get('reason', 'no build record')}; archs {ext.get('archs') or '-'}; "
        f"CUDA runtime {d['cuda_runtime_of_C'] or '-'}",
        f"_C_cpu       {d['cpu_module']}",
        f"devices      {', '.join(d['devices']) or no_gpu}",
        f"default      backend={d['default_backend']!r}",
        "backends:",
    ]
    for name, b in d["backends"].items():
        if b["available"]:
            state = f"available ({b['why_not']})" if b["why_not"] else "available"
        else:
            state = f"unavailable: {b['why_not']}"
        lines.append(f"  {name:<10} {state}")
    lines.append("ops:" if d["ops"] else "ops: none registered yet")
    for op, bks in d["ops"].items():
        lines.append(f"  {op:<24} {', '.join(bks)}")
    lines.append("auto, by call:")
    for op, how in d["auto_routes"].items():
        lines.append(f"  {op:<24} {how}")
    print("\n".join(lines), file=out)

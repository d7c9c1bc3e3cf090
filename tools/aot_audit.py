#!/usr/bin/env python
"""GPU-readiness audit without a GPU: does every Triton launch of the public ops fit an A100/H100?

    python tools/aot_audit.py [--arch 90,80] [--jobs N] [--out DIR] [--only SUBSTR] [--gate]

1. Capture. ``JITFunction.run`` is replaced so that ``kernel[grid](...)`` records the launch instead of
   running it, and the ``triton`` backend is allowed on CPU tensors. Each scenario (tools/aot_scenarios.py:
   the full shapes of benchmarks/shapes.py plus coverage of every config the launchers pick) calls a public op
   forward and backward. TRITON_INTERPRET is off, so the launchers choose their *GPU* block sizes and warps.
   Value checks run as on CUDA tensors (``eager_checks(False)``: device-side asserts).
2. Host syncs. While an op runs, a TorchDispatchMode counts what would make the host wait on CUDA
   (``item``/``bool``/``int`` of a tensor, ``nonzero``, ``unique``, boolean-mask indexing, ``torch.tensor(list)``
   copied to the device) and ``Tensor.tolist`` is counted by a wrapper. The CUDA-extension launchers (``auto``'s
   choice on CUDA tensors where built) are run the same way with the extension call stubbed out: every
   scenario whose ``launchers`` include ``cuda`` (tools/aot_scenarios.py: the ops with a CUDA kernel,
   prefix_attention's decode scenarios -- Lq <= 16, forward only; its training scenarios stay Triton-only --
   and merge_attention_states, which has no Triton kernel).
3. Compile. Every distinct specialisation (as the JIT would specialise it on a CUDA device) is compiled with
   ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``; ptxas (Triton's own) reports registers and spills,
   the metadata shared memory, the PTX the matrix instructions (wgmma / mma.sync, or none: an FMA dot).
4. Rules (``--gate`` exits 1 on any violation):
   - no compile error; shared memory within the per-block limit, and room for 2 CTAs/SM in a kernel with no
     dot (memory-bound);
   - a kernel that touches 16-bit data: 0 spilled bytes, and its dots on tensor cores;
   - an fp32-only kernel: spills at most its budget in ``FP32_SPILL_BUDGET`` (each budget explained in the
     kernel's source);
   - 0 host syncs per op call, forward and backward, Triton and CUDA launchers;
   - grids within CUDA's limits, and in the benchmark-shape scenarios >= 132 programs per launch unless the
     kernel is listed in ``SMALL_BY_DESIGN`` with its reason.

Outputs in --out (default ./aot-audit): report.txt (the tables), report.json, launches.txt, ptx/ and
triton_cache/ (a rerun compiles nothing it compiled before).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
ap.add_argument("--out", default="aot-audit", help="output directory")
ap.add_argument("--only", default=None, help="only scenarios whose op/name contains this")
ap.add_argument("--gate", action="store_true", help="exit 1 on any violation of the rules")
ARGS = ap.parse_args() if __name__ == "__main__" else ap.parse_args([])

OUT = Path(ARGS.out).resolve()
(OUT / "ptx").mkdir(parents=True, exist_ok=True)
os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real GPU configs, not the interpreter's
os.environ.setdefault("TRITON_CACHE_DIR", str(OUT / "triton_cache"))
os.environ["REPROKERNELS_POISON_OUTPUTS"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a GPU run uses (Triton 3.9 warns when unset)

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

from aot_rules import SMEM_PER_BLOCK, violations  # noqa: E402

# ------------------------------------------------------------------------------------------- capturing launches
LAUNCHES: list[dict] = []
CURRENT = {"phase": ""}


def _record(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> None:
    if callable(grid):
        grid = grid(dict(zip(self.arg_names, args, strict=False)))
    g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
    LAUNCHES.append(dict(fn=self, args=args, kwargs=dict(kwargs), grid=g, phase=CURRENT["phase"]))


JITFunction.run = _record  # type: ignore[method-assign]

import reprokernels._backend as _backend  # noqa: E402
from reprokernels._validation import eager_checks  # noqa: E402

_status = _backend.backend_status


def _allow_on_cpu(backend: str, device_type: str) -> tuple[bool, str]:
    return (True, "") if backend in ("triton", "cuda") else _status(backend, device_type)


_backend.backend_status = _allow_on_cpu  # type: ignore[assignment]

# the CUDA launchers: everything up to the extension call runs; the call itself is stubbed out
import reprokernels.cuda._launch as _cuda_launch  # noqa: E402

_originals = {"check_devices": _cuda_launch.check_devices, "launch": _cuda_launch.launch}
_cuda_launch.check_devices = lambda emulate, **tensors: None  # type: ignore[assignment]
_cuda_launch.launch = lambda name, p, device, emulate: None  # type: ignore[assignment]
for _name, _mod in list(sys.modules.items()):  # a launcher imported already bound the originals by name
    if _name.startswith("reprokernels.cuda.") and _mod is not _cuda_launch:
        for _attr, _fn in _originals.items():
            if getattr(_mod, _attr, None) is _fn:
                setattr(_mod, _attr, getattr(_cuda_launch, _attr))


import reprokernels._cuda as _cuda_mod  # noqa: E402

# The launchers fill the extension's real parameter structs (pybind11 classes: usable without a GPU), so the
# CUDA launchers are audited where the extension is built (CI builds it); elsewhere the report says so.
CUDA_LAUNCHERS = _cuda_mod.extension_built()
_cuda_mod.stream_of = lambda t: 0  # type: ignore[assignment]
# the extension entry point an op's CUDA launcher needs beyond the first ones: a _C built before it was added
# (a stale local build) cannot fill its parameter struct, so those scenarios are reported as not audited
CUDA_ENTRY = {"prefix_attention": "prefix_attention_partials", "merge_attention_states": "merge_attention_states"}


def cuda_scenarios(selected: list) -> tuple[list, list[str]]:
    """(the scenarios the CUDA launchers run here, why others are not audited)."""
    if not CUDA_LAUNCHERS:
        return [], ["reprokernels._C is not built here: the CUDA launchers' host syncs are not audited"]
    ext = _cuda_mod.extension()
    run, missing = [], collections.Counter()
    for s in selected:
        if "cuda" not in s.launchers:
            continue
        entry = CUDA_ENTRY.get(s.op)
        if entry and not hasattr(ext, entry):
            missing[(s.op, entry)] += 1
        else:
            run.append(s)
    notes = [f"the built reprokernels._C has no {entry} (built before it was added; rebuild): {n} {op} "
             "scenario(s) on the CUDA launcher not audited" for (op, entry), n in missing.items()]
    return run, notes

# ------------------------------------------------------------------------------------------- counting host syncs
_SYNC_OPS = {
    "_local_scalar_dense": "item()/bool()/int() of a tensor",
    "item": "item()/bool()/int() of a tensor",
    "is_nonzero": "bool() of a tensor",
    "nonzero": "nonzero (output size)",
    "unique_consecutive": "unique_consecutive (output size)",
    "_unique2": "unique (output size)",
    "unique_dim": "unique (output size)",
    "masked_select": "masked_select (output size)",
    "repeat_interleave": "repeat_interleave without output_size",
    "bincount": "bincount (output size from the largest value)",
    "lift_fresh": "torch.tensor(python data) copied to the device (pageable H2D; breaks graph capture)",
}


def _nbytes(tree: object) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(t) for t in tree)
    return 0


class SyncCounter(TorchDispatchMode):
    """Counts host syncs, and the bytes the op's registered kernels take and return (its minimum traffic)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()
        self.op_bytes = 0
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if func.namespace == "reprokernels":  # look inside the custom op's CPU implementation
            self._depth += 1
            try:
                with self:
                    out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            finally:
                self._depth -= 1
            if self._depth == 0:
                self.op_bytes += _nbytes(list(args)) + _nbytes(list(kwargs.values())) + _nbytes(out)
            return out
        if name in _SYNC_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self.syncs[_SYNC_OPS[name]] += 1
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])):
            self.syncs["boolean-mask indexing (nonzero: output size)"] += 1
        return func(*args, **kwargs)


_tolist = torch.Tensor.tolist
_ACTIVE: list[SyncCounter] = []


def _counting_tolist(self: torch.Tensor):  # type: ignore[no-untyped-def]
    if _ACTIVE:
        _ACTIVE[-1].syncs["Tensor.tolist()"] += 1
    return _tolist(self)


torch.Tensor.tolist = _counting_tolist  # type: ignore[method-assign]


def run_scenarios(selected: list, backend: str = "triton") -> list[dict]:
    """Run each scenario forward (+ backward) on ``backend``, recording launches and syncs per phase."""
    import aot_scenarios

    aot_scenarios.BACKEND = backend
    records = []
    for sc in (s for s in selected if backend in s.launchers):
        rec: dict = dict(op=sc.op, name=sc.name, wave=sc.wave, launcher=backend, phases={})
        try:
            fwd, has_bwd = sc.build()
            out = None
            for phase in ("fwd", "bwd") if has_bwd else ("fwd",):
                CURRENT["phase"] = f"{sc.key}/{phase}"
                n0 = len(LAUNCHES)
                ctr = SyncCounter()
                _ACTIVE.append(ctr)
                try:
                    with eager_checks(False), ctr:
                        if phase == "fwd":
                            out = fwd()
                            if isinstance(out, tuple):
                                out = out[0]
                        else:
                            out.backward(torch.empty_like(out))
                finally:
                    _ACTIVE.pop()
                rec["phases"][phase] = dict(
                    launch_ids=list(range(n0, len(LAUNCHES))), syncs=dict(ctr.syncs), op_bytes=ctr.op_bytes,
                    launches=[(L["fn"].__name__, L["grid"]) for L in LAUNCHES[n0:]])
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------------- compiling
def specialise(launch: dict, arch: int) -> tuple:
    """(signature, constexprs, attrs, options) exactly as the JIT would specialise the launch on a CUDA GPU."""
    fn, kw = launch["fn"], dict(launch["kwargs"])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw.setdefault("debug", False)
    bound, specialization, options = binder(*launch["args"], **kw)
    options, sig, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    return sig, constexprs, attrs, options


def _ptxas(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    tool = get_ptxas(arch) if "arch" in get_ptxas.__code__.co_varnames else get_ptxas()
    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([tool.path, "-v", "--gpu-name", sm_arch_from_capability(arch), str(p), "-o",
                            str(p) + ".o"], capture_output=True, text=True)
        return r.stdout + r.stderr


def compile_job(job_index: int) -> list[dict]:
    job = JOBS[job_index]
    rows = []
    for arch in ARCHS:
        row: dict = dict(arch=arch)
        t0 = time.time()
        try:
            sig, cx, attrs, options = specialise(job["launch"], arch)
            src = ASTSource(fn=job["launch"]["fn"], signature=sig, constexprs=cx, attrs=attrs)
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
            ptx = ck.asm["ptx"]
            ttgir = str(ck.asm.get("ttgir", ""))
            (OUT / "ptx" / f"{job['kernel']}_{job['key'][:10]}_sm{arch}.ptx").write_text(ptx)
            log = _ptxas(ptx, arch)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            row["spill"] = int(m.group(1)) + int(m.group(2)) if m else -1
            m = re.search(r"Used (\d+) registers", log)
            row["regs"] = int(m.group(1)) if m else -1
            row["smem"] = int(ck.metadata.shared)
            row["warps"] = int(ck.metadata.num_warps)
            row["dots"] = len(re.findall(r"\btt\.dot\b|warp_group_dot", ttgir))
            row["mma"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if re.search(r"\bmma\.sync", ptx)
                          else "FMA" if row["dots"] else "-")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
        row["secs"] = round(time.time() - t0, 1)
        rows.append(row)
    return rows


def _dtype_class(sig: dict) -> str:
    """'16bit' when the kernel reads or writes 16-bit floats (mixed included), else 'fp32'."""
    ptrs = {v[1:] for v in sig.values() if isinstance(v, str) and v.startswith("*")}
    return "16bit" if ptrs & {"bf16", "fp16"} else "fp32"


def _config(launch: dict, cx: dict, options: object) -> str:
    names = launch["fn"].arg_names
    parts = []
    for k, v in cx.items():
        n = names[k[0]] if isinstance(k, tuple) else k
        if n.isupper() and len(n) > 1 and not (isinstance(v, bool) and not v):
            parts.append(n if v is True else f"{n}={v}")
    return " ".join(parts) + f" w{options.num_warps}s{options.num_stages}"


# ----------------------------------------------------------------------------------------------------------- main
ARCHS: list[int] = []
JOBS: list[dict] = []


def main() -> int:
    from aot_scenarios import scenarios

    ARCHS[:] = [int(a) for a in ARGS.arch.split(",")]
    selected = [s for s in scenarios() if not ARGS.only or ARGS.only in s.key]
    t0 = time.time()
    records = run_scenarios(selected)
    n_triton = len(LAUNCHES)
    cuda_selected, cuda_notes = cuda_scenarios(selected)
    cuda_records = run_scenarios(cuda_selected, backend="cuda")
    for note in cuda_notes:
        print(f"aot-audit: {note}")
    del LAUNCHES[n_triton:]  # a cuda launcher may fall back on no Triton kernel; nothing to compile from there

    jobs: dict[str, dict] = {}
    for rec in records:
        for d in rec.get("phases", {}).values():
            for i in d["launch_ids"]:
                L = LAUNCHES[i]
                sig, cx, attrs, options = specialise(L, ARCHS[0])
                key = hashlib.sha1(repr((L["fn"].__name__, sorted(sig.items()), sorted(map(repr, cx.items())),
                                         sorted(map(repr, attrs.items())), options.num_warps,
                                         options.num_stages)).encode()).hexdigest()
                j = jobs.setdefault(key, dict(kernel=L["fn"].__name__, key=key, launch=L, dtype=_dtype_class(sig),
                                              config=_config(L, cx, options), grids=set()))
                j["grids"].add(L["grid"])
    JOBS[:] = list(jobs.values())
    print(f"aot-audit: {len(records)} scenarios on Triton ({n_triton} launches), {len(cuda_records)} on the CUDA "
          f"launchers; {len(JOBS)} distinct kernels x "
          f"{len(ARCHS)} archs, {ARGS.jobs} jobs ({time.time() - t0:.0f} s capturing)", flush=True)
    with ProcessPoolExecutor(ARGS.jobs) as pool:
        compiled = list(pool.map(compile_job, range(len(JOBS))))
    results = []
    for j, rows in zip(JOBS, compiled, strict=True):
        for r in rows:
            results.append(dict(kernel=j["kernel"], config=j["config"], dtype=j["dtype"],
                                grids=sorted(j["grids"]), **r))

    bad = violations(records, cuda_records, results)
    write_reports(records, cuda_records, results, bad, cuda_notes)
    print(f"aot-audit: {len(results)} compiles in {time.time() - t0:.0f} s; "
          f"{sum('error' in r for r in results)} errors, "
          f"{sum(r.get('spill', 0) > 0 for r in results)} spilling, "
          f"{sum(r.get('smem', 0) > SMEM_PER_BLOCK[r['arch']] for r in results)} over the smem limit, "
          f"{sum(r.get('mma') == 'FMA' for r in results)} FMA dots; "
          f"{sum(sum(d['syncs'].values()) for rec in records + cuda_records for d in rec.get('phases', {}).values())}"
          f" host syncs; {len(bad)} violations. Report: {OUT / 'report.txt'}")
    for b in bad:
        print("  VIOLATION", b)
    return 1 if (ARGS.gate and bad) else 0


def write_reports(records: list[dict], cuda_records: list[dict], results: list[dict], bad: list[str],
                  cuda_notes: list[str] = ()) -> None:
    lines = [f"{'kernel':28} {'config':58} {'dtype':5} {'arch':4} {'regs':>4} {'spill':>6} {'smem':>7} {'mma':>8} "
             f"{'programs (max / min)':>22}"]
    for r in results:
        progs = [a * b * c for a, b, c in r["grids"]]
        if "error" in r:
            err = " ".join(r["error"].split())[:200]
            lines.append(f"{r['kernel']:28} {r['config'][:58]:58} {r['dtype']:5} sm{r['arch']} ERROR {err}")
            continue
        lines.append(f"{r['kernel']:28} {r['config'][:58]:58} {r['dtype']:5} sm{r['arch']} {r['regs']:>4} "
                     f"{r['spill']:>6} {r['smem']:>7} {r['mma']:>8} {max(progs):>11} / {min(progs):<9}")
    lines += ["", "host syncs per op call (Triton launchers, then CUDA launchers):"]
    lines += [f"  (not audited: {n})" for n in cuda_notes]
    for rec in records + cuda_records:
        kind = rec["launcher"]
        ph = {p: sum(d["syncs"].values()) for p, d in rec.get("phases", {}).items()}
        lines.append(f"  {kind:6} {rec['op']}/{rec['name']}: " + (rec.get("error") or
                     ", ".join(f"{p} {n}" for p, n in ph.items())))
    lines += ["", f"{len(bad)} violations:"] + [f"  {b}" for b in bad]
    (OUT / "report.txt").write_text("\n".join(lines) + "\n")
    with open(OUT / "launches.txt", "w") as f:
        for rec in records:
            f.write(f"## {rec['op']}/{rec['name']}{' (benchmark shape)' if rec['wave'] else ''}\n")
            for p, d in rec.get("phases", {}).items():
                for name, g in d["launches"]:
                    f.write(f"  {p} {name} grid={g} programs={g[0] * g[1] * g[2]}\n")
    json.dump(dict(triton=triton.__version__, torch=torch.__version__, archs=ARCHS, results=results,
                   scenarios=[{k: v for k, v in r.items()} for r in records],
                   cuda_launchers=cuda_records, cuda_not_audited=list(cuda_notes), violations=bad),
              open(OUT / "report.json", "w"), indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())

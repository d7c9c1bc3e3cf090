"""Build script of the CPU extension ``reprokernels._C_cpu`` (always) and the optional CUDA extension
``reprokernels._C``.

``reprokernels._C_cpu``: C++ + OpenMP kernels on raw pointers (csrc/cpu/), a pybind11 module without torch
headers, built with the host compiler on every install in seconds (portable flags: -O3 -fopenmp, no
-march=native). Its failure never fails the install: one line is printed, the reason is recorded in
reprokernels/_build_info.json and ``reprokernels info`` reports it (the cpu backend is then unavailable).
Without OpenMP it is built single-threaded. ``REPROKERNELS_BUILD_CPU=0`` skips it.

The extension is raw-pointer CUDA kernels plus a pybind11 module: no torch headers, static cudart, so it
builds against any torch (CPU wheels included) and has no torch ABI to mismatch. This file never imports
torch and never downloads anything. pip hides a build's output unless ``-v``, so a build nobody can use must
not happen silently: left to itself (switch unset) it builds only where nvcc *and* an NVIDIA driver with a GPU
are present (read from /proc/driver/nvidia, else ``nvidia-smi -L``); the nvcc step takes about 80 s.

Switches (environment variables):
  REPROKERNELS_BUILD_CUDA=1        build the extension; fail loudly if nvcc (or pybind11) is missing
  REPROKERNELS_BUILD_CUDA=0        skip it (pure Python + Triton install)
  (unset)                          build it when nvcc is found and this machine has an NVIDIA GPU
  REPROKERNELS_CUDA_ARCHS="80;90"  SASS targets; PTX of the newest is embedded too (default "80;90")
  REPROKERNELS_STRICT_BUILD=1      warnings are errors and any register spill reported by ptxas fails the build;
                                   the CPU module is built with -Wall -Wextra -Werror and its failure fails the build
  REPROKERNELS_BUILD_CPU=0         skip the CPU module (default: build it)
  CUDA_HOME / CUDA_PATH            the toolkit (default: the directory above the nvcc on PATH)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_SRC = CSRC / "cpu"
BUILD_INFO = ROOT / "reprokernels" / "_build_info.json"
DEFAULT_ARCHS = "80;90"


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _archs() -> list[str]:
    raw = os.environ.get("REPROKERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    bad = [a for a in archs if not a.isdigit()]
    if not archs or bad:
        sys.exit(f"reprokernels: REPROKERNELS_CUDA_ARCHS must list compute capabilities like '80;90', got {raw!r}")
    return sorted(set(archs), key=int)


def _gencode_flags(archs: tuple[str, ...]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = archs[-1]
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX for future GPUs
    return flags


def _nvidia_gpu_present() -> bool:
    """Whether an NVIDIA driver reports a GPU here, without importing torch or initialising CUDA."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return any(gpus.iterdir())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in out.splitlines())


def _decide() -> tuple[bool, str, str | None]:
    """(build?, reason, nvcc path)."""
    switch = os.environ.get("REPROKERNELS_BUILD_CUDA", "").strip()
    nvcc = _find_nvcc()
    if switch == "0":
        return False, "skipped: REPROKERNELS_BUILD_CUDA=0", nvcc
    if switch == "1":
        if nvcc is None:
            sys.exit("reprokernels: REPROKERNELS_BUILD_CUDA=1 but nvcc was not found "
                     "(set CUDA_HOME or put nvcc on PATH)")
        return True, "built: REPROKERNELS_BUILD_CUDA=1", nvcc
    if switch not in ("",):
        sys.exit(f"reprokernels: REPROKERNELS_BUILD_CUDA must be 0, 1 or unset, got {switch!r}")
    if nvcc is None:
        return False, "skipped: nvcc not found at install time (REPROKERNELS_BUILD_CUDA=1 requires it)", None
    if not _nvidia_gpu_present():
        return False, ("skipped: no NVIDIA GPU at install time, nothing here could run it "
                       "(REPROKERNELS_BUILD_CUDA=1 builds it anyway, about 80 s)"), nvcc
    return True, "built: nvcc and an NVIDIA GPU found at install time", nvcc


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _cuda_home(nvcc: str) -> Path:
    """The toolkit root: CUDA_HOME/CUDA_PATH, else above nvcc (through wrappers), else /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parent.parent)]
    try:  # nvcc may be a wrapper script: its dry run names the real toolkit directory
        dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        m = re.search(r"TOP=(\S+)", dry)
        if m:
            candidates.append(str(Path(m.group(1)).resolve()))
    except OSError:
        pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    sys.exit(f"reprokernels: cannot find the CUDA toolkit next to {nvcc} (set CUDA_HOME)")


def _record_cpu(built: bool, reason: str) -> None:
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        info = {}
    info.update(cpu_build=built, cpu_reason=reason)
    BUILD_INFO.write_text(json.dumps(info, indent=1) + "\n")


class NvccBuildExt(build_ext):
    """Builds reprokernels._C_cpu with the host compiler (never failing the install unless strict), and
    reprokernels._C by compiling csrc/*.cu with nvcc, then linking with the host compiler."""

    nvcc: str = ""
    archs: tuple[str, ...] = ()
    strict: bool = False

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "reprokernels._C_cpu":
            self._build_cpu(ext)
            return
        self._build_cuda(ext)

    def _build_cpu(self, ext: Extension) -> None:
        base_args, base_link = list(ext.extra_compile_args), list(ext.extra_link_args)
        errors = []
        for openmp in (True, False):
            ext.extra_compile_args = base_args + (["-fopenmp"] if openmp else [])
            ext.extra_link_args = base_link + (["-fopenmp"] if openmp else [])
            try:
                super().build_extension(ext)
            except Exception as exc:  # any compiler/linker failure: try without OpenMP, then give up
                errors.append(f"{type(exc).__name__}: {exc}")
                if self.strict:
                    raise
                continue
            how = "with OpenMP" if openmp else "WITHOUT OpenMP (single-threaded; the compiler lacks -fopenmp)"
            _record_cpu(True, f"built {how} by the host compiler at install time")
            return
        reason = ("build failed at install time (" + errors[-1].splitlines()[0][:200]
                  + "); reinstall with pip install -v to see the compiler output")
        _record_cpu(False, reason)
        print(f"reprokernels: the CPU module reprokernels._C_cpu was not built: {reason}", file=sys.stderr)

    def _build_cuda(self, ext: Extension) -> None:
        cuda_home = _cuda_home(self.nvcc)
        objdir = Path(self.build_temp) / "cuda"
        objdir.mkdir(parents=True, exist_ok=True)
        flags = [
            "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
            f"-I{CSRC}", *_gencode_flags(self.archs),
        ]
        if self.strict:
            flags += ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
        log_lines = []
        for src in sorted(CSRC.glob("*.cu")):
            obj = objdir / (src.stem + ".o")
            cmd = [self.nvcc, *flags, "-c", str(src), "-o", str(obj)]
            print("reprokernels: " + " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            log_lines.append(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise RuntimeError(f"reprokernels: nvcc failed on {src.name}")
            ext.extra_objects.append(str(obj))
        log = "".join(log_lines)
        (Path(self.build_temp) / "ptxas.log").write_text(log)
        spills = [ln for ln in log.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", ln)]
        if spills:
            msg = "reprokernels: ptxas reports register spills:\n" + "\n".join(spills)
            if self.strict:
                raise RuntimeError(msg)
            print(msg)
        ext.include_dirs += [str(CSRC), str(cuda_home / "include")]
        ext.library_dirs += [str(cuda_home / "lib64"), str(cuda_home / "lib")]
        super().build_extension(ext)


def _cpu_extension(strict: bool) -> tuple[Extension | None, str]:
    """The CPU module's Extension, or None and why it is skipped."""
    if os.environ.get("REPROKERNELS_BUILD_CPU", "").strip() == "0":
        return None, "skipped: REPROKERNELS_BUILD_CPU=0"
    try:
        import pybind11
    except ImportError:
        return None, ("skipped: pybind11 is missing at install time (with --no-build-isolation, "
                      "pip install \"pybind11>=2.10\" first)")
    # -fno-trapping-math: without it GCC keeps every float compare-and-select as a branch (a compare could set an
    # FP exception flag nobody reads), so no loop with a clamp, max or mask select vectorises. -fno-math-errno:
    # the kernels never read errno. Neither changes a rounded result (no -ffast-math).
    flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno"]
    if strict:
        flags += ["-Wall", "-Wextra", "-Werror"]
    ext = Extension(
        "reprokernels._C_cpu",
        sources=[str(p.relative_to(ROOT)) for p in sorted(CPU_SRC.glob("*.cpp"))],
        include_dirs=[pybind11.get_include(), str(CPU_SRC)],
        extra_compile_args=flags,
        language="c++",
    )
    return ext, ""


def main() -> None:
    build, reason, nvcc = _decide()
    strict = os.environ.get("REPROKERNELS_STRICT_BUILD", "") == "1"
    info = {"cuda_build": build, "reason": reason, "archs": [], "nvcc": None}
    ext_modules: list[Extension] = []
    cmdclass = {"build_ext": NvccBuildExt}
    NvccBuildExt.strict = strict
    cpu_ext, cpu_reason = _cpu_extension(strict)
    info.update(cpu_build=False, cpu_reason=cpu_reason or "not built yet (the install stopped before it)")
    if cpu_ext is not None:
        ext_modules.append(cpu_ext)
    else:
        print(f"reprokernels: CPU module {cpu_reason}", file=sys.stderr)
    if build:
        try:  # a build requirement; with --no-build-isolation it must already be in the environment
            import pybind11
        except ImportError:
            sys.exit("reprokernels: building the CUDA extension needs pybind11, which this environment lacks "
                     "(with --no-build-isolation, pip install \"pybind11>=2.10\" first)")

        archs = _archs()
        info.update(archs=archs, nvcc=_nvcc_version(nvcc), strict=strict)
        NvccBuildExt.nvcc, NvccBuildExt.archs, NvccBuildExt.strict = nvcc, tuple(archs), strict
        cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
        if strict:
            cxx_flags += ["-Wall", "-Wextra", "-Werror"]
        ext_modules.append(
            Extension(
                "reprokernels._C",
                sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp"))],
                include_dirs=[pybind11.get_include()],
                extra_compile_args=cxx_flags,
                # static cudart: the module only needs the driver (libcuda) at run time
                libraries=["cudart_static", "rt", "pthread", "dl"],
                language="c++",
            )
        )
        # stderr: the one line pip shows with -v, and what a plain setup.py run prints
        print(f"reprokernels: building the CUDA extension for sm_{', sm_'.join(archs)} (+PTX) with nvcc "
              f"{info['nvcc']} ({reason}); about 80 s", file=sys.stderr)
    else:
        print(f"reprokernels: CUDA extension {reason}; installing pure Python + Triton", file=sys.stderr)
    BUILD_INFO.write_text(json.dumps(info, indent=1) + "\n")
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()

#!/usr/bin/env bash
# One-shot GPU check: on a machine with an NVIDIA GPU, the CUDA toolkit and torch already installed (nothing
# of ours, no network), build reprokernels._C for the present GPU, run the gpu-marked tests and the whole
# suite with real Triton compilation, then the quick benchmarks; logs and result files land in one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else ./gpu-check-<date>)
#
# ``dest`` receives summary.txt and gpu_check.tgz (every log, ptxas report, info, result CSV).
# Offline dependencies: pybind11 (build), pytest, hypothesis, pytest-xdist (tests) must be importable. If not,
# wheels in ./.gpu-deps/ are installed from there (prepare on a networked machine with
# `pip download setuptools wheel pybind11 pytest hypothesis pytest-xdist -d .gpu-deps --python-version 3.12
# --only-binary :all:`).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${1:-${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}}
# logs go to a scratch folder; dest receives summary.txt and one tarball of everything (a lent machine
# returns only a few files)
out=$(mktemp -d)
mkdir -p "$dest"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/summary.txt"; }
start=$(date +%s)

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"
cap=$(python - <<'EOF' 2>/dev/null
import torch
major, minor = torch.cuda.get_device_capability()
print(f"{major}{minor}")
EOF
)
log "device: $(python -c 'import torch; print(torch.cuda.get_device_name())' 2>&1), sm_${cap:-?}"
log "torch $(python -c 'import torch; print(torch.__version__)'), triton $(python -c 'import triton; print(triton.__version__)' 2>&1)"

missing=$(python - <<'EOF'
import importlib.util
print(" ".join(m for m in ("setuptools", "wheel", "pybind11", "pytest", "hypothesis", "xdist")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  log "missing: $missing; installing from .gpu-deps/ (offline)"
  pip install -q --no-index --find-links .gpu-deps setuptools wheel pybind11 pytest hypothesis pytest-xdist \
    >> "$out/install.log" 2>&1 \
    || log "offline install failed (see install.log)"
fi

log "building _C for sm_${cap}"
REPROKERNELS_BUILD_CUDA=1 REPROKERNELS_CUDA_ARCHS="${cap:-90}" \
  pip install -v --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  && log "build ok" || log "BUILD FAILED (see build.log)"
grep -E "registers|spill" "$out/build.log" > "$out/ptxas.txt" 2>/dev/null
python -m reprokernels info > "$out/info.txt" 2>&1

unset TRITON_INTERPRET
export HYPOTHESIS_PROFILE=ci
log "no host sync + CUDA-graph replay of every op (tests/test_gpu_graphs.py)"
timeout 240 python -m pytest -q tests/test_gpu_graphs.py -p no:cacheprovider > "$out/tests_graphs.log" 2>&1
log "  $(tail -n 1 "$out/tests_graphs.log")"
log "gpu-marked tests"
timeout 300 python -m pytest -q -m gpu tests -p no:cacheprovider > "$out/tests_gpu.log" 2>&1
log "  $(tail -n 1 "$out/tests_gpu.log")"
log "whole suite, real Triton compilation"
timeout 420 python -m pytest -q -x -n 4 tests -p no:cacheprovider > "$out/tests_all.log" 2>&1
log "  $(tail -n 1 "$out/tests_all.log")"
log "quick benchmarks"
timeout 300 python -m reprokernels bench --quick --results-dir "$out/results" --out "$out/plots" \
  > "$out/bench_quick.log" 2>&1
log "done in $(( $(date +%s) - start )) s; results in $dest"
tar czf "$dest/gpu_check.tgz" -C "$out" . && cp "$out/summary.txt" "$dest/"

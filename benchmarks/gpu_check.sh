#!/usr/bin/env bash
# One-shot GPU check: on a machine with an NVIDIA GPU, the CUDA toolkit and torch already installed (nothing
# of ours, no network), build reprokernels._C for the present GPU, then, in this order: the no-sync + CUDA-graph
# tests, the decode benchmark rows (B <= 16, where the cuda decode kernel is timed beside triton), the other
# gpu-marked tests, the quick benchmarks, and the rest of the suite with real Triton compilation; logs and
# result files land in one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else ./gpu-check-<date>)
#
# ``dest`` receives summary.txt and gpu_check.tgz (every log, ptxas report, info, result CSV). summary.txt also
# gets the ptxas table of csrc/prefix_attention.cu (registers, spills, static shared memory per kernel) and one
# line per decode shape (cuda vs triton, GB/s against the decode bytes model and % of the copy bandwidth).
# Time: the script aims at GPU_CHECK_BUDGET_S seconds in all (default 600: ~10 min on an H100). Each step's
# timeout is its own cap or what is left of the budget, whichever is less; a step with under 30 s left is
# skipped and the summary says so. The suite's non-gpu tests go last and get what remains.
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
budget=${GPU_CHECK_BUDGET_S:-600}
# tmo CAP: the timeout of the next step: CAP, or what is left of the budget if less (0: under 30 s are left)
tmo() {
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

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
  timeout 300 pip install -v --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  && log "build ok ($(( $(date +%s) - start )) s since the start)" || log "BUILD FAILED (see build.log)"
python -m reprokernels info > "$out/info.txt" 2>&1

# ptxas -v of csrc/prefix_attention.cu, in the background while the tests run. The build keeps nvcc's output to
# itself (setup.py writes it into pip's temporary build folder), so the file is compiled once more with the
# build's own command (its "reprokernels: nvcc ..." line in build.log; setup.py's flags for this GPU if the line
# is not there) into a scratch object, and the log is turned into a table at the end.
pa_src=csrc/prefix_attention.cu
pa_log="$out/ptxas_prefix_attention.log"
ptxas_pid=
if [ -f "$pa_src" ]; then
  nvcc_cmd=$(grep -m1 -oE "reprokernels: [^ ]*nvcc .* -c [^ ]*${pa_src} -o [^ ]+" "$out/build.log" \
             | sed -E 's/^reprokernels: //; s/ -o [^ ]+$//')
  if [ -z "$nvcc_cmd" ]; then
    nvcc_bin=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    nvcc_cmd="$nvcc_bin -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC -Xptxas -v -Icsrc"
    nvcc_cmd+=" -gencode=arch=compute_${cap:-90},code=sm_${cap:-90} -c $pa_src"
  fi
  echo "$nvcc_cmd -o $out/prefix_attention.o" > "$pa_log"
  # shellcheck disable=SC2086  # the command line is split into words on purpose
  ( timeout 300 $nvcc_cmd -o "$out/prefix_attention.o" >> "$pa_log" 2>&1
    rm -f "$out/prefix_attention.o" ) &
  ptxas_pid=$!
else
  log "no $pa_src: no ptxas table"
fi

unset TRITON_INTERPRET
export HYPOTHESIS_PROFILE=ci
# step NAME CAP LOG CMD...: CMD under the budgeted timeout, its output in $out/LOG, its last line in the summary
step() {
  local name=$1 cap=$2 logf=$3 t rc
  shift 3
  t=$(tmo "$cap")
  if [ "$t" -eq 0 ]; then
    log "$name: SKIPPED (the ${budget} s budget is spent)"
    return
  fi
  log "$name (timeout ${t} s)"
  timeout "$t" "$@" > "$out/$logf" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && log "  TIMED OUT after ${t} s (see $logf)"
  log "  $(tail -n 1 "$out/$logf")"
}

# 4 workers: the cases are independent, and most of their time is Triton compiling on the CPU
step "no host sync + CUDA-graph replay of every op (tests/test_gpu_graphs.py)" 210 tests_graphs.log \
  python -m pytest -q -n 4 tests/test_gpu_graphs.py -p no:cacheprovider
echo "  decode rows, one line per shape (median ms; GB/s = (q + out + the prefix K/V once + each row's own K/V" \
  "up to kv_lengths) / time):" > "$out/bench_decode_summary.txt"
step "decode benchmark rows, B <= 16: every provider, cuda and triton included" 150 bench_decode.log \
  python -m benchmarks.bench_prefix_attention --device cuda --decode-max-batch 16 \
    --results-dir "$out/results" --summary "$out/bench_decode_summary.txt"
cat "$out/bench_decode_summary.txt" >> "$out/summary.txt"
step "gpu-marked tests (tests/test_gpu_graphs.py ran above)" 150 tests_gpu.log \
  python -m pytest -q -m gpu tests --ignore tests/test_gpu_graphs.py -p no:cacheprovider
step "quick benchmarks" 120 bench_quick.log \
  python -m reprokernels bench --quick --results-dir "$out/results" --out "$out/plots"
step "the rest of the suite (not gpu-marked), real Triton compilation" 420 tests_all.log \
  python -m pytest -q -x -n 4 -m "not gpu" tests -p no:cacheprovider

if [ -n "$ptxas_pid" ]; then
  wait "$ptxas_pid"
  log "ptxas -v of $pa_src (smem: static only; dynamic shared memory is sized at launch):"
  python - "$pa_log" >> "$out/summary.txt" 2>&1 <<'PY'
import re
import shutil
import subprocess
import sys

text = open(sys.argv[1]).read()
rows, cur = {}, None
for line in text.splitlines():
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
    if m:
        cur = (m.group(1), m.group(2))
        rows[cur] = {}
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        rows[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        sm = re.search(r"(\d+) bytes smem", line)
        rows[cur].update(regs=int(m.group(1)), smem=int(sm.group(1)) if sm else 0)
        cur = None
if not rows:
    print("  no ptxas output; the end of the log:")
    print("\n".join("    " + ln for ln in text.splitlines()[-8:]))
    sys.exit(0)
names = [name for name, _ in rows]
if shutil.which("c++filt"):
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    names = dem if len(dem) == len(names) else names
names = [re.sub(r"\(anonymous namespace\)::|reprokernels::|\([^()]*\)$", "", n) for n in names]
print(f"  {'arch':6} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}  kernel")
for name, ((_, arch), r) in zip(names, rows.items()):
    spill = f"{r.get('spill_st', '?')}/{r.get('spill_ld', '?')}"
    print(f"  {arch:6} {r.get('regs', '?'):>4} {r.get('stack', '?'):>5} {spill:>11} {r.get('smem', '?'):>6}  {name}")
spilling = sum(1 for r in rows.values() if r.get("spill_st", 0) or r.get("spill_ld", 0))
print(f"  {len(rows)} kernels, {spilling} spilling, at most {max(r.get('regs', 0) for r in rows.values())} registers")
PY
fi
log "done in $(( $(date +%s) - start )) s; results in $dest"
tar czf "$dest/gpu_check.tgz" -C "$out" . && cp "$out/summary.txt" "$dest/"

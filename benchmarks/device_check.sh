#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA device: the CUDA tests, then the
# Hessian benchmark (bench_hessian) on the GPU. Everything lands in $OUT (default
# runs/device): gpu.txt, cuda_tests.log, bench_hessian_cuda.md and the raw JSON results.
# The peers may come as wheels in .whl/ (a machine without a package index); the project's
# own modules are used from this checkout, so no ray or mlflow is needed there.
set -uo pipefail
OUT=${OUT:-runs/device}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/analysis/hessian/test_cuda.py \
    tests/analysis/hessian/test_modelutil.py \
    tests/trainables/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
tests=$?
HESSWEEP_BENCH_DEVICE=cuda HESSWEEP_BENCH_RESULTS="$OUT" timeout "$BENCH_TIMEOUT" \
    python3 -m benchmarks.bench_hessian | tee "$OUT/bench_hessian_cuda.md"
bench=$?
echo "device_check: CUDA tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

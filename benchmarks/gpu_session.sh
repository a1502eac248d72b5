#!/usr/bin/env bash
# The GPU checks and benchmarks of one session on a CUDA machine, from the repository root:
#
#     bash benchmarks/gpu_session.sh DATA OUT [engine_speed.py options]
#
# DATA holds clones/ and reference/ as ../shared/data does (the two files engine_speed.py reads);
# OUT receives the logs, the result tables and the profiles (profiles.tgz): first the GPU tests
# (-m gpu: the Triton kernels against the CPU kernel, CUDA against CPU), then every configuration,
# then transfer_speed.py (fit_transfer with and without plans).
set -u
DATA=${1:-../shared/data}
OUT=${2:-gpu_out}
shift $(($# < 2 ? $# : 2))
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BLASE_SHARED_DATA=$(cd "$DATA" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, triton, numba, numpy; print('torch', torch.__version__, 'triton', triton.__version__,
'numba', numba.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/machine.txt"
speed() {  # speed NAME ARGS...: one engine_speed.py run, results in $OUT/NAME.json
    local name=$1; shift
    timeout ${SPEED_TIMEOUT:-300} python3 benchmarks/engine_speed.py --device cuda --data "$DATA" --epochs 50 \
        --profile-dir "$OUT/profiles" --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
}
# PYTEST_FILES: the test files to run (default: every file with GPU tests)
timeout ${PYTEST_TIMEOUT:-180} python3 -m pytest -q -p no:cacheprovider -m gpu \
    ${PYTEST_FILES:-tests/core/test_backends.py tests/core/test_gpu_kernel.py tests/core/test_training.py tests/core/test_plan.py tests/core/test_transfer.py} 2>&1 \
    | tee "$OUT/pytest_gpu.log"
speed engine_speed_cuda "$@"
# transfer learning (fit_transfer) with and without plans (CUDA graphs), one HPF order's size
timeout ${TRANSFER_TIMEOUT:-240} python3 benchmarks/transfer_speed.py --device cuda --data "$DATA" \
    --json "$OUT/transfer_speed_cuda.json" 2>&1 | tee "$OUT/transfer_speed.log"
tar czf "$OUT/profiles.tgz" -C "$OUT" profiles && rm -rf "$OUT/profiles"
ls -la "$OUT"

#!/usr/bin/env bash
# The GPU checks of benchmarks/README.md ("GPU check"), in one call of at most 8 minutes (the steps' time limits add
# up to 470 s): the chunked loss's tests and golden cases on CUDA, then benchmarks/loss_memory.py and
# benchmarks/step_time.py on CUDA. Everything is
# written under $OUT (default: gpu_check_out/). Without a CUDA device it runs the same steps on the CPU at the quick
# sizes (a smoke run of the script itself).
#
# The GPU machine has torch, transformers, accelerate and peft but neither trl nor datasets, and no internet. Carry
# their wheels in (about 7 MiB), prepared beforehand on a machine with the project's environment:
#
#   pip download "trl==$(python -c 'import trl; print(trl.__version__)')" \
#       "datasets==$(python -c 'import datasets; print(datasets.__version__)')" \
#       --no-deps --only-binary=:all: -d wheels/
#
# then, in the repository root on the GPU machine:
#
#   bash benchmarks/gpu_check.sh wheels/          # or SDPO_WHEELS=wheels/ bash benchmarks/gpu_check.sh
#
# Tolerances of the loss checks (tests/test_loss_chunked.py, run with SDPO_TEST_DEVICE=cuda): in float32 the golden
# cases' loss within 1e-5 relative and the logits' gradient within 1e-6 absolute of the reference's float64 values;
# the chunked loss and gradients equal the loss from logits on the same device within 1e-5 relative + 1e-7 absolute
# (in float64); with bfloat16 inputs the loss is float32 and within 2e-2 relative of the float32 loss; under
# bfloat16 autocast the chunked loss equals its float32 result within 1e-5 relative + 1e-7 absolute.
set -uo pipefail

OUT=${OUT:-gpu_check_out}
WHEELS=${1:-${SDPO_WHEELS:-}}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRL_EXPERIMENTAL_SILENCE=1
status=0
SLOWER=1  # the time limits' factor: the CPU fallback's quick sizes still run far slower than the GPU's

step() {  # step NAME SECONDS COMMAND...: COMMAND with a time limit, output in $OUT/NAME.log, status in summary.txt
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    timeout "$((limit * SLOWER))" "$@" >"$OUT/$name.log" 2>&1
    local code=$?
    echo "$name: exit $code in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    [ "$code" -eq 0 ] || status=1
}

if [ -n "$WHEELS" ]; then
    step install_wheels 30 "$PYTHON" -m pip install --no-index --no-deps "$WHEELS"/*.whl
fi
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    DEVICE=cuda
    STEP_TIME=(--model qwen2.5-0.5b --dtype bfloat16)
    LOSS_MEMORY=(--lengths 1024 4096)
else
    DEVICE=cpu
    SLOWER=5
    STEP_TIME=(--quick)
    LOSS_MEMORY=(--quick)
fi
step environment 30 "$PYTHON" -c "
import torch, transformers, trl
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl',
      trl.__version__)
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
print('tf32 matmul:', torch.backends.cuda.matmul.allow_tf32)"

step loss_tests 100 env SDPO_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_loss_chunked.py \
    -k "golden or equals or normalizer or nothing_distilled or bfloat16 or autocast" --junitxml="$OUT/loss_tests.xml"
step loss_memory 140 "$PYTHON" benchmarks/loss_memory.py --device "$DEVICE" "${LOSS_MEMORY[@]}" \
    --results "$OUT/loss_memory.json"
step step_time 170 "$PYTHON" benchmarks/step_time.py --device "$DEVICE" "${STEP_TIME[@]}" --results "$OUT/step_time.json"
exit $status

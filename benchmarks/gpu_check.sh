#!/usr/bin/env bash
# The checks of bncore.torch that need a GPU, in one run of under ten minutes: the tests of
# tests/test_torch.py (the CUDA cases with the others), then the GPU table of
# benchmarks/bench_bncore.py (times, launches per training step, the targets row by row).
#
#   bash benchmarks/gpu_check.sh              # both
#   bash benchmarks/gpu_check.sh tests        # or one of them
#   bash benchmarks/gpu_check.sh bench
#
# From any folder of a copy of the working tree. It uses the machine's own Python ($PYTHON,
# else python3), which must have torch, Triton, pytest, hypothesis and NumPy; bncore is
# imported from the tree, nothing is installed. The logs go to $OUT when it is set, else to a
# new temporary folder. The exit status is the first failing step's (2: no GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
WHAT=${1:-all}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "logs in $LOGS"

"$PYTHON" - <<'PY' 2>&1 | tee "$LOGS/versions.txt"
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, Triton {triton.__version__}, {gpu}")
raise SystemExit(0 if torch.cuda.is_available() else "gpu_check: CUDA is not available here")
PY
(( PIPESTATUS[0] == 0 )) || exit 2

status=0
if [[ $WHAT == all || $WHAT == tests ]]; then
    # Several processes: most of the time goes to compiling kernels, which they share.
    workers=$("$PYTHON" -c 'import xdist' 2>/dev/null && echo "-n 8" || echo "")
    timeout 270 "$PYTHON" -m pytest -q -p no:cacheprovider $workers -ra \
        --junitxml="$LOGS/tests.xml" tests/test_torch.py 2>&1 | tee "$LOGS/tests.txt"
    status=${PIPESTATUS[0]}
fi
if [[ $WHAT == all || $WHAT == bench ]]; then
    timeout 270 "$PYTHON" benchmarks/bench_bncore.py --device cuda 2>&1 | tee "$LOGS/bench.txt"
    bench=${PIPESTATUS[0]}
    (( status == 0 )) && status=$bench
fi
echo "gpu_check: exit $status"
exit "$status"

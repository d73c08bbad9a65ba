#!/usr/bin/env bash
# The GPU run, one command: on a machine whose python3 already has a CUDA build of torch and
# apache-tvm / apache-tvm-ffi installed, build the runtime library against that torch, put the
# Python package into the installed TVM and run the GPU tests.
#   bash scripts/run_gpu_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/gpu}
cmake -S . -B "$BUILD" -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j "$(nproc)" >/dev/null
TVM_DIR=$("$PY" -c "import os, tvm; print(os.path.dirname(tvm.__file__))")
mkdir -p "$TVM_DIR/contrib/torch"
cp -r python/tvm/contrib/torch/. "$TVM_DIR/contrib/torch/"  # subpackages (partitioning) too
cp "$BUILD/_build_info.py" "$TVM_DIR/contrib/torch/"
cp python/tvm/contrib/pt_op.py "$TVM_DIR/contrib/"
export TVM_TORCH_RUNTIME_LIBRARY="$PWD/$BUILD/libtvm_torch_runtime.so"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())"
# Every test with a CUDA case: compile/partition per device, the zoo models on CUDA, streams,
# save/load, the torch.compile backend, tuning (MetaSchedule needs xgboost).
"$PY" -m pytest -ra -p no:cacheprovider tests/python/contrib/test_torch -k "cuda or gpu" "$@"

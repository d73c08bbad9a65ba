#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the pinned stack, then build and
# install tvm.contrib.torch (the C++ runtime library and the Python package) into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first: the runtime library is compiled against this exact version.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q "apache-tvm==0.27.0.post1" "apache-tvm-ffi==0.1.14.post1" \
  "scikit-build-core>=0.10" ninja
# oneDNN for the CPU convolutions (headers and library; x86-64 Linux wheels only).
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  .venv/bin/python -m pip install -q "onednn-devel-cpu-gomp==2023.2.0"
fi
.venv/bin/python -m pip install -q --no-build-isolation ".[test]"
.venv/bin/python -c "import tvm.contrib.torch as t; print('tvm.contrib.torch ready:', t.runtime_library_path())"

"""Loading the runtime library: a missing or unloadable library is a clear Python error."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def _import_with_library(path: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TVM_TORCH_RUNTIME_LIBRARY=path)
    return subprocess.run([sys.executable, "-c", "import tvm.contrib.torch"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_missing_library_is_reported(tmp_path):
    proc = _import_with_library(str(tmp_path / "nowhere.so"), str(tmp_path))
    assert proc.returncode == 1
    assert "RuntimeError: tvm.contrib.torch: runtime library not found at " \
           f"{tmp_path / 'nowhere.so'}" in proc.stderr


def test_corrupt_library_is_reported(tmp_path):
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"\x7fELF this is not a shared library")
    proc = _import_with_library(str(broken), str(tmp_path))
    assert proc.returncode == 1
    assert f"RuntimeError: tvm.contrib.torch: cannot load {broken}: " in proc.stderr
    assert "see the loader error above" in proc.stderr  # same torch version: no rebuild hint


def test_library_with_unresolved_symbols_is_reported(tmp_path):
    """What a library built against another torch looks like to the loader."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "stale.cc"
    source.write_text('extern "C" void torch_symbol_from_another_version();\n'
                      'extern "C" void entry() { torch_symbol_from_another_version(); }\n')
    library = tmp_path / "libstale.so"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    proc = _import_with_library(str(library), str(tmp_path))
    assert proc.returncode == 1
    assert "undefined symbol: torch_symbol_from_another_version" in proc.stderr
    assert f"cannot load {library}" in proc.stderr

"""The contract between the Python package and the C++ runtime library, checked directly.

The end-to-end tests would catch a drift too, but only as an obscure load failure; these say
which constant disagrees. The library's side comes from ``tvm_torch.runtime_contract``.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import tvm

import tvm.contrib.torch
from tvm.contrib.torch import GraphModule, export
from tvm.contrib.torch._library import runtime_contract, runtime_library_path
from conftest import assert_outputs_close

_PACKAGE_DIR = os.path.dirname(os.path.abspath(tvm.contrib.torch.__file__))
_FFI_NAME = re.compile(r"tvm_torch\.[A-Za-z_][A-Za-z0-9_]*")


@pytest.fixture(scope="module")
def contract():
    return runtime_contract()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_contract_reports_the_versions_and_dtypes(contract):
    assert set(contract) == {"manifest_format_version", "state_format_version",
                             "oldest_state_format_version", "supported_dtypes"}
    assert 1 <= contract["oldest_state_format_version"] <= contract["state_format_version"]
    assert isinstance(contract["manifest_format_version"], int)
    assert isinstance(contract["state_format_version"], int)
    assert contract["supported_dtypes"]
    assert all(isinstance(getattr(torch, name), torch.dtype)
               for name in contract["supported_dtypes"])


def test_manifest_version_written_by_python_is_the_one_cpp_reads(contract, cpu_program):
    assert export.MANIFEST_FORMAT_VERSION == contract["manifest_format_version"]
    with open(cpu_program.files.graph_path, encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["format_version"] == export.MANIFEST_FORMAT_VERSION
    lib, params = _read(cpu_program.files.lib_path), _read(cpu_program.files.params_path)

    module = GraphModule(num_inputs=1, num_outputs=2)
    module.load_bytes(lib, json.dumps(manifest), params)
    x = torch.randn(4, 8)
    assert_outputs_close(module([x]), cpu_program.reference(x))

    newer = dict(manifest, format_version=export.MANIFEST_FORMAT_VERSION + 1)
    with pytest.raises(RuntimeError, match=r"graph manifest format version "
                       rf"{export.MANIFEST_FORMAT_VERSION + 1} is not supported \(this library "
                       rf"reads version {contract['manifest_format_version']}\)"):
        GraphModule(num_inputs=1, num_outputs=2).load_bytes(lib, json.dumps(newer), params)


def test_state_format_version_is_the_one_the_library_writes_and_reads(contract, cpu_program):
    module = GraphModule(num_inputs=1, num_outputs=2)
    module.init([cpu_program.shape], *cpu_program.files.as_tuple())
    (version, header, blobs), _ = module.engine.__getstate__()
    assert version == contract["state_format_version"]
    assert isinstance(json.loads(header), dict)
    assert all(b.dtype == torch.uint8 and b.dim() == 1 for b in blobs)
    fresh = torch.classes.tvm_class.TvmGraphModule(1, 2, "cpu")
    fresh.load_state((contract["state_format_version"], header, blobs))
    x = torch.randn(4, 8)
    assert_outputs_close(fresh.forward([x]), cpu_program.reference(x))


def _ffi_names_in_package() -> dict:
    """``{name: [file, ...]}`` for every string literal that is a ``tvm_torch.*`` name."""
    found: dict = {}
    for root, _, files in os.walk(_PACKAGE_DIR):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                        _FFI_NAME.fullmatch(node.value):
                    found.setdefault(node.value, []).append(os.path.relpath(path, _PACKAGE_DIR))
    return found


def test_every_ffi_name_python_uses_is_registered():
    names = _ffi_names_in_package()
    # The scan must see the callers: the contract function and the vendor kernels.
    assert "tvm_torch.runtime_contract" in names
    assert "tvm_torch.matmul" in names
    missing = {name: where for name, where in names.items()
               if tvm.get_global_func(name, allow_missing=True) is None}
    assert not missing, f"not registered by {runtime_library_path()}: {missing}"


def _python_dtype_lists() -> dict:
    """Every supported-dtype constant the package defines, wherever it lives today."""
    lists = {}
    for module_name in ("dtypes", "options", "graph_partition", "partitioning.classification"):
        try:
            module = importlib.import_module(f"tvm.contrib.torch.{module_name}")
        except ModuleNotFoundError:
            continue
        for attr in ("SUPPORTED_DTYPES", "_DTYPES"):
            if hasattr(module, attr):
                lists[f"{module_name}.{attr}"] = getattr(module, attr)
    return lists


def test_supported_dtypes_agree_between_python_and_cpp(contract):
    lists = _python_dtype_lists()
    assert lists, "no supported-dtype constant found in the package"
    cpp = sorted(contract["supported_dtypes"])
    assert len(set(cpp)) == len(cpp)
    for where, dtypes in lists.items():
        assert sorted(dtypes) == cpp, f"{where} differs from the C++ list"
    try:
        from tvm.contrib.torch.dtypes import COMPUTE_DTYPES
    except ImportError:
        return
    assert set(COMPUTE_DTYPES) <= set(cpp)


def test_library_exports_none_of_its_own_symbols():
    """Built with hidden visibility: registration runs from static initialisers, and nothing
    of tvm_torch:: is there for another library opened RTLD_GLOBAL to bind to."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    out = subprocess.run([nm, "-D", "-C", "--defined-only", runtime_library_path()],
                         capture_output=True, text=True, check=True).stdout
    own = [line for line in out.splitlines() if line.split(" ", 2)[-1].startswith("tvm_torch::")]
    assert not own, own[:10]

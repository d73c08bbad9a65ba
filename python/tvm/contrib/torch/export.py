"""Export of a built Relax program: compiled library, graph (manifest + Relax text), params.

The files of one program, for a bucket named ``NAME`` inside ``export_dir``:

``NAME.so``
    the compiled code (``Executable.export_library``);
``NAME.graph.json``
    the manifest the runtime reads: inputs (names, shapes with symbolic dims as strings,
    dtypes), dim ranges, outputs, the params' order, target, TVM and torch versions;
``NAME.relax``
    the optimized Relax program as readable text (for people; not read back);
``NAME.params``
    the params in TVM's param-dict format, passed after the inputs to the entry function.

Every file is written to a temp file in the same directory and renamed into place, so an
interrupted export never leaves a half-written file under the final name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Dict, List, Sequence

import torch
import tvm

#: Version of the manifest format; the C++ runtime reads exactly this version.
MANIFEST_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ExportedFiles:
    """Paths of one exported program."""

    lib_path: str
    graph_path: str
    params_path: str
    relax_path: str

    def as_tuple(self):
        """``(lib_path, graph_path, params_path)`` in the order ``GraphModule.init`` takes."""
        return self.lib_path, self.graph_path, self.params_path


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_manifest(
    inputs: Sequence[Dict[str, Any]],
    num_outputs: int,
    outputs: Sequence[Dict[str, Any]],
    param_names: Sequence[str],
    target: tvm.target.Target,
    dim_ranges: Dict[str, Sequence[int]] | None = None,
    transform_params: str | None = None,
    extra: Dict[str, Any] | None = None,
) -> Dict[str, Any]:
    """Build the graph manifest dict of one program.

    Parameters
    ----------
    inputs : list of dict
        ``{"name", "shape", "dtype"}`` per input; a symbolic dim is its name (a string).
    num_outputs : int
        Number of tensors the entry function returns (tuples flattened).
    outputs : list of dict
        ``{"shape", "dtype"}`` per output, for information.
    param_names : list of str
        Names of the params in the order they follow the inputs.
    target : tvm.target.Target
        The target the program was built for.
    dim_ranges : dict, optional
        ``{dim_name: [min, max]}`` for symbolic dims.
    transform_params : str, optional
        Name of a function run once at load time on the params; its outputs replace them.
    extra : dict, optional
        Additional informational fields.
    """
    manifest = {
        "format": "tvm.contrib.torch/graph",
        "format_version": MANIFEST_FORMAT_VERSION,
        "entry": "main",
        "inputs": [
            {"name": i["name"], "shape": list(i["shape"]), "dtype": i["dtype"]} for i in inputs
        ],
        "dim_ranges": {k: [int(v[0]), int(v[1])] for k, v in (dim_ranges or {}).items()},
        "num_outputs": int(num_outputs),
        "outputs": list(outputs),
        "params": list(param_names),
        "transform_params": transform_params,
        # The device kind the code runs on; the runtime refuses to load it for another kind.
        "device_type": "cuda" if target.kind.name == "cuda" else "cpu",
        "target": str(target.export()) if hasattr(target, "export") else str(target),
        "tvm_version": tvm.__version__,
        "torch_version": torch.__version__,
    }
    manifest.update(extra or {})
    return manifest


def export_program(
    executable: tvm.relax.Executable,
    relax_mod: tvm.IRModule,
    manifest: Dict[str, Any],
    params: Dict[str, tvm.runtime.Tensor],
    export_dir: str,
    name: str,
) -> ExportedFiles:
    """Write the four files of one program into ``export_dir``.

    Parameters
    ----------
    executable : tvm.relax.Executable
        The built program.
    relax_mod : tvm.IRModule
        The Relax module it was built from (written as text).
    manifest : dict
        From :func:`make_manifest`.
    params : dict of str to tvm.runtime.Tensor
        The params named in ``manifest["params"]``.
    export_dir : str
        Output directory (created if missing).
    name : str
        Base name of the files.
    """
    os.makedirs(export_dir, exist_ok=True)
    missing = [p for p in manifest["params"] if p not in params]
    if missing:
        raise ValueError(f"params missing for export: {missing[:5]}")
    files = ExportedFiles(
        lib_path=os.path.abspath(os.path.join(export_dir, f"{name}.so")),
        graph_path=os.path.abspath(os.path.join(export_dir, f"{name}.graph.json")),
        params_path=os.path.abspath(os.path.join(export_dir, f"{name}.params")),
        relax_path=os.path.abspath(os.path.join(export_dir, f"{name}.relax")),
    )
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=".build_") as tmp:
        tmp_lib = os.path.join(tmp, "lib.so")
        executable.export_library(tmp_lib)
        with open(tmp_lib, "rb") as f:
            _atomic_write(files.lib_path, f.read())
    _atomic_write(files.params_path, bytes(tvm.runtime.save_param_dict(params)))
    _atomic_write(files.graph_path, json.dumps(manifest, indent=1).encode())
    _atomic_write(files.relax_path, relax_mod.script(show_meta=False).encode())
    return files


def read_manifest(graph_path: str) -> Dict[str, Any]:
    """Read a graph manifest written by :func:`export_program`."""
    with open(graph_path, encoding="utf-8") as f:
        return json.load(f)


def list_exported(export_dir: str) -> List[ExportedFiles]:
    """All programs exported into ``export_dir``, sorted by name."""
    out = []
    for entry in sorted(os.listdir(export_dir)):
        if entry.endswith(".graph.json"):
            name = entry[: -len(".graph.json")]
            base = os.path.abspath(os.path.join(export_dir, name))
            out.append(ExportedFiles(base + ".so", base + ".graph.json", base + ".params",
                                     base + ".relax"))
    return out

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
interrupted export never leaves a half-written file under the final name. One build writes
``programs.json`` last: the programs it exported with the SHA-256 of each file, which is all
``load_tvm`` reads (a program left by an earlier build is not picked up, a file changed since
is refused). Builds into one directory take its lock (:func:`locked`), across threads and
processes, so that concurrent compiles never load each other's files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Sequence

import torch
import tvm

logger = logging.getLogger(__name__)

#: Version of the manifest format; the C++ runtime reads exactly this version.
MANIFEST_FORMAT_VERSION = 1

#: The index one build writes last: its programs and the SHA-256 of each of their files.
INDEX_NAME = "programs.json"


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


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` through a temp file in its directory and a rename: complete or absent."""
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


def target_cpu_features(target: tvm.target.Target) -> List[str]:
    """The LLVM features of the CPU ``target``'s host code is compiled for (its ``mcpu`` and
    ``mattr``), sorted; empty for a target without LLVM host code.

    The runtime refuses to open a library whose features this CPU lacks (its first call would
    stop with an illegal instruction), naming them.
    """
    host = target if target.kind.name == "llvm" else target.host
    if host is None or host.kind.name != "llvm":
        return []
    return sorted(tvm.target.codegen.llvm_get_cpu_features(host))


def save_module(module: torch.jit.ScriptModule, path: str) -> None:
    """Save a TorchScript module to ``path`` so that ``path`` is always a complete file.

    The module is written into a temp file created exclusively (``O_EXCL``, unpredictable
    name) in ``path``'s directory, given the mode of the file it replaces (0644 for a new
    one), flushed to disk, then renamed over ``path``. A
    crash, a kill or a full disk during the save leaves the previous file untouched; a symlink
    planted in the directory cannot redirect the write; a reader that opens ``path`` meanwhile
    gets the old file or the new one, never a mix.

    Raises
    ------
    OSError
        When the directory is missing or not writable, or the disk is full (the message
        names ``path``).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "the directory to save into does not exist",
                                directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        # mkstemp's 0600 would make the model unreadable to a server running as another user.
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            torch.jit.save(module, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
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
        Name of a function run once (at the first call) on the params; its outputs replace them.
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
        # What the host code may execute; checked against the loading machine's CPU.
        "cpu_features": target_cpu_features(target),
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
            atomic_write(files.lib_path, f.read())
    atomic_write(files.params_path, bytes(tvm.runtime.save_param_dict(params)))
    atomic_write(files.graph_path, json.dumps(manifest, indent=1).encode())
    atomic_write(files.relax_path, relax_mod.script(show_meta=False).encode())
    return files


def read_manifest(graph_path: str) -> Dict[str, Any]:
    """Read a graph manifest written by :func:`export_program`."""
    with open(graph_path, encoding="utf-8") as f:
        return json.load(f)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: The file kinds of one program, as named by :class:`ExportedFiles`.
_KINDS = tuple(field.name for field in dataclasses.fields(ExportedFiles))


def write_index(export_dir: str, programs: Sequence[ExportedFiles]) -> None:
    """Record ``programs`` as what ``export_dir`` holds (see :func:`read_index`)."""
    entries = []
    for files in programs:
        entries.append({kind: {"file": os.path.basename(getattr(files, kind)),
                               "sha256": _sha256(getattr(files, kind))} for kind in _KINDS})
    atomic_write(os.path.join(export_dir, INDEX_NAME),
                  json.dumps({"programs": entries}, indent=1).encode())


def read_index(export_dir: str) -> List[ExportedFiles]:
    """The programs the last build wrote into ``export_dir``, their files checked.

    Raises
    ------
    FileNotFoundError
        When ``export_dir`` has no index (no build finished writing into it).
    ValueError
        When a file is missing or differs from what the build wrote.
    """
    path = os.path.join(export_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tvm.contrib.torch: no exported program in {export_dir} "
                                f"(no {INDEX_NAME}: build_tvm() writes it last)")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    out = []
    for entry in index["programs"]:
        paths = {}
        for kind in _KINDS:
            file_path = os.path.abspath(os.path.join(export_dir, entry[kind]["file"]))
            if not os.path.isfile(file_path) or _sha256(file_path) != entry[kind]["sha256"]:
                raise ValueError(f"tvm.contrib.torch: {file_path} is missing or changed since "
                                 f"the build that wrote {path}; rebuild into {export_dir}")
            paths[kind] = file_path
        out.append(ExportedFiles(**paths))
    return out


def remove_indexed(export_dir: str) -> None:
    """Delete the files of the programs the last build recorded (before a new build)."""
    path = os.path.join(export_dir, INDEX_NAME)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        entries = json.load(f).get("programs", [])
    os.unlink(path)
    for entry in entries:
        for kind in _KINDS:
            name = os.path.basename(entry.get(kind, {}).get("file", ""))
            if name and os.path.isfile(os.path.join(export_dir, name)):
                os.unlink(os.path.join(export_dir, name))


_LOCKS: Dict[str, list] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def locked(export_dir: str) -> Iterator[None]:
    """Hold ``export_dir``'s lock: exclusive across processes (``flock``) and threads,
    re-entrant within a thread."""
    os.makedirs(export_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(export_dir, ".lock"))
    with _LOCKS_GUARD:
        entry = _LOCKS.setdefault(path, [threading.RLock(), None, 0])
    with entry[0]:
        if entry[2] == 0:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another build into %s", export_dir)
                fcntl.flock(fd, fcntl.LOCK_EX)
            entry[1] = fd
        entry[2] += 1
        try:
            yield
        finally:
            entry[2] -= 1
            if entry[2] == 0:
                fcntl.flock(entry[1], fcntl.LOCK_UN)
                os.close(entry[1])
                entry[1] = None

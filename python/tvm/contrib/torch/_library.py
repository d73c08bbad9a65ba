"""Locating and loading the C++ runtime library that registers ``torch.classes.tvm_class``."""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Dict

import torch
import tvm

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_LOADED_PATH: str | None = None

#: Environment variable that points at a runtime library built outside the package.
LIBRARY_PATH_ENV = "TVM_TORCH_RUNTIME_LIBRARY"

#: File name of the runtime library (CMake target ``tvm_torch_runtime``), installed in the
#: package's ``lib/`` folder. The one place Python spells it.
RUNTIME_LIBRARY_NAME = "libtvm_torch_runtime.so"

#: TVM-FFI global function, registered by the library, that describes what it reads.
_CONTRACT_FUNC = "tvm_torch.runtime_contract"

#: TVM-FFI global function, registered by the library, that returns the file it was loaded from.
_LIBRARY_PATH_FUNC = "tvm_torch.runtime_library_path"


def _build_info():
    try:
        from . import _build_info as info  # pylint: disable=import-outside-toplevel
    except ImportError:  # a source tree that was never built
        return None
    return info


def runtime_library_path() -> str:
    """Absolute path of the runtime library (:data:`RUNTIME_LIBRARY_NAME`).

    C++ programs need it to link against or ``dlopen`` the library before loading a saved
    model. ``$TVM_TORCH_RUNTIME_LIBRARY`` overrides the installed location.

    Returns
    -------
    path : str
        The absolute path; the file may be missing if the package was not built.
    """
    override = os.environ.get(LIBRARY_PATH_ENV)
    if override:
        return os.path.abspath(override)
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", RUNTIME_LIBRARY_NAME)


def load_runtime_library() -> str:
    """Load the runtime library into this process once.

    Returns
    -------
    path : str
        The path that was loaded.

    Raises
    ------
    RuntimeError
        If the library is missing or cannot be loaded; the message says why (for example a
        torch version other than the one it was built against).
    """
    global _LOADED_PATH  # pylint: disable=global-statement
    with _LOCK:
        if _LOADED_PATH is not None:
            return _LOADED_PATH
        path = runtime_library_path()
        # Another copy may be loaded already (by a C++ host, or torch.ops.load_library): a
        # second copy cannot register the same classes, so that one serves.
        loaded = tvm.get_global_func(_LIBRARY_PATH_FUNC, allow_missing=True)
        if loaded is not None:
            loaded_path = str(loaded())
            if os.path.realpath(loaded_path) != os.path.realpath(path):
                logger.warning("tvm.contrib.torch: the runtime library is already loaded from "
                               "%s; using it instead of %s", loaded_path, path)
            _LOADED_PATH = loaded_path
            return loaded_path
        if not os.path.isfile(path):
            raise RuntimeError(
                f"tvm.contrib.torch: runtime library not found at {path}; the package was not "
                "built or installed correctly (reinstall it with `pip install .` from the "
                f"source tree, or set ${LIBRARY_PATH_ENV})"
            )
        try:
            torch.ops.load_library(path)
        except OSError as err:
            info = _build_info()
            built = info.TORCH_VERSION if info else "unknown"
            installed = torch.__version__.split("+")[0]
            hint = (
                f"it was built against torch {built} but torch {installed} is installed; "
                "rebuild it against the installed torch"
                if built != installed
                else "see the loader error above"
            )
            raise RuntimeError(f"tvm.contrib.torch: cannot load {path}: {err}; {hint}") from err
        _LOADED_PATH = path
        return path


def runtime_contract() -> Dict[str, Any]:
    """What the loaded runtime library reads, as it reports it.

    Python writes manifests and checks dtypes with its own constants; this is the library's
    side of that contract, for tests and diagnostics to compare against.

    Returns
    -------
    contract : dict
        ``manifest_format_version`` (int, the graph manifest version it loads),
        ``state_format_version`` (int, the pickled module state version it writes),
        ``oldest_state_format_version`` (int, the oldest state version it still reads)
        and ``supported_dtypes`` (list of str, the input dtypes a program may take).

    Raises
    ------
    RuntimeError
        If the library cannot be loaded or does not register the contract function (a
        library older than this package).
    """
    load_runtime_library()
    func = tvm.get_global_func(_CONTRACT_FUNC, allow_missing=True)
    if func is None:
        raise RuntimeError(
            f"tvm.contrib.torch: the runtime library at {_LOADED_PATH} does not register "
            f"{_CONTRACT_FUNC}; it is older than this package, rebuild it"
        )
    return json.loads(str(func()))

"""Locating and loading the C++ runtime library that registers ``torch.classes.tvm_class``."""
from __future__ import annotations

import os
import threading

import torch

_LOCK = threading.Lock()
_LOADED_PATH: str | None = None

#: Environment variable that points at a runtime library built outside the package.
LIBRARY_PATH_ENV = "TVM_TORCH_RUNTIME_LIBRARY"


def _build_info():
    try:
        from . import _build_info as info  # pylint: disable=import-outside-toplevel
    except ImportError:  # a source tree that was never built
        return None
    return info


def runtime_library_path() -> str:
    """Absolute path of the runtime library (``libtvm_torch_runtime.so``).

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
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "libtvm_torch_runtime.so")


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

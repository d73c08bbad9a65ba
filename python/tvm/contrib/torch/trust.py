"""Which compiled libraries this process may load: the opt-in trust policy.

A saved TVM module (``.pt``) holds native code, which runs as soon as the module is loaded:
load one only if you would run a shared library from the same source. A server can go
further and load only the libraries it was told to trust, by their SHA-256 digests:

- ``$TVM_TORCH_TRUSTED_LIBRARIES``: the digests, separated by commas or spaces, or the path
  of a file with one digest at the start of each line (``sha256sum *.so`` output works;
  ``#`` starts a comment). A value that is neither refuses every library.
- :func:`set_trusted_libraries` in Python (it takes precedence over the variable).

The C++ runtime enforces the policy before it opens a library (``dlopen``), whether the
module is loaded from Python or from a C++ program, so an untrusted library's code (its
constructors included) never runs. The digest of a program is that of its ``.so`` file in
``export_dir``, of ``library_digests(module)``, and is named in the refusal's message.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, List, Optional

import torch
import tvm

from ._library import load_runtime_library

#: The environment variable the C++ runtime reads when no policy was set from Python.
TRUSTED_LIBRARIES_ENV = "TVM_TORCH_TRUSTED_LIBRARIES"


def _func(name: str):
    load_runtime_library()
    return tvm.get_global_func(name)


def set_trusted_libraries(digests: Optional[Iterable[str]]) -> None:
    """Load only compiled libraries whose SHA-256 is in ``digests``.

    Parameters
    ----------
    digests : iterable of str, or None
        Hex SHA-256 digests (an empty list trusts no library). ``None`` removes the policy
        set here: ``$TVM_TORCH_TRUSTED_LIBRARIES`` decides again (unset: every library).

    Raises
    ------
    RuntimeError
        If a digest is not 64 hex digits.
    """
    if digests is None:
        _func("tvm_torch.set_trusted_libraries")(None)
        return
    if isinstance(digests, str):
        digests = [digests]
    _func("tvm_torch.set_trusted_libraries")([str(d) for d in digests])


def trusted_libraries() -> Optional[List[str]]:
    """The digests the runtime loads, or ``None`` when it loads every library."""
    result = _func("tvm_torch.trusted_libraries")()
    return None if result is None else [str(d) for d in result]


def library_digest(data: bytes) -> str:
    """SHA-256 (hex) of a compiled library's bytes, as the trust policy names it."""
    return hashlib.sha256(data).hexdigest()


def _engines(module) -> List[torch.ScriptObject]:
    """The tvm_class engines inside a module: attributes of eager modules, and of TorchScript
    modules (found through TorchScript's own attribute walk)."""
    if isinstance(module, torch.ScriptObject):
        return [module]
    found = []
    if isinstance(module, torch.jit.ScriptModule):
        # pylint: disable-next=protected-access
        attrs = torch._C._jit_debug_module_iterators(module._c)["named_attributes_r"]
        found += [value for _, value in attrs if isinstance(value, torch.ScriptObject)
                  and not isinstance(value, torch._C.ScriptModule)]
    else:
        for sub in module.modules():
            if isinstance(sub, torch.jit.ScriptModule):
                found += _engines(sub)
            else:
                found += [v for v in vars(sub).values() if isinstance(v, torch.ScriptObject)]
    return found


def _is_engine(obj: torch.ScriptObject) -> bool:
    """Whether a TorchScript object is a ``torch.classes.tvm_class`` module."""
    try:
        return "tvm_class" in obj._type().qualified_name()  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
        return False


def library_digests(module) -> List[str]:
    """SHA-256 digests of every compiled library held by ``module``, to list in the trust
    policy (for example in the file ``$TVM_TORCH_TRUSTED_LIBRARIES`` names).

    Parameters
    ----------
    module : torch.nn.Module, torch.jit.ScriptModule or a tvm_class engine
        A compiled or partitioned model (searched recursively), or one engine.

    Returns
    -------
    digests : list of str
        In the order the programs were loaded, without repeats.
    """
    digests: List[str] = []
    for engine in _engines(module):
        if not _is_engine(engine):
            continue
        (_, header, blobs), _ = engine.__getstate__()
        for i, program in enumerate(json.loads(header)["programs"]):
            digests.append(program.get("lib_sha256")
                           or library_digest(blobs[2 * i].numpy().tobytes()))
    return list(dict.fromkeys(digests))

"""What ``torch.export`` needs to trace, save and load models holding compiled modules.

``torch.export`` cannot run a ``torch.classes.tvm_class`` engine on fake tensors, so this
module registers

* a fake class per runtime class (:func:`torch._library.register_fake_class`), built by
  ``__obj_unflatten__`` from the state header the C++ ``__obj_flatten__`` returns: the
  manifests of the loaded programs, which name each program's input and output shapes;
* the operator ``tvm_torch::run_graph_module`` / ``tvm_torch::run_vm_module`` (one per runtime
  class): it runs the engine, and its fake kernel gives the output shapes and dtypes of the
  program the inputs select (symbolic dims bound to the inputs' sizes).

:class:`~tvm.contrib.torch.module.GraphModule` / ``VMModule`` call the operator outside
TorchScript, so an exported program records one call of it with the engine as a constant.
``torch.export.save`` pickles that engine with its programs (the runtime class's
``def_pickle``); ``torch.export.load`` needs ``import tvm.contrib.torch`` first.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import torch

from ._library import load_runtime_library

#: runtime class -> the operator that runs one of its engines.
OPERATORS = {"TvmGraphModule": "run_graph_module", "TvmVMModule": "run_vm_module"}

_library: Optional[torch.library.Library] = None


class _FakeEngine:
    """The fake of a runtime engine: its programs' manifests, read from the state header."""

    def __init__(self, header: str):
        state = json.loads(header)
        self.class_name = state["class"]
        self.num_outputs_value = int(state["num_outputs"])
        self.device_name = state["device"]
        self.manifests = [json.loads(program["graph"]) for program in state["programs"]]

    @classmethod
    def __obj_unflatten__(cls, flattened):  # pylint: disable=bad-dunder-name
        return cls(**dict(flattened))

    # The engine's read-only methods answer from the header; the rest cannot run on a fake.
    def num_outputs(self) -> int:  # pylint: disable=missing-function-docstring
        return self.num_outputs_value

    def num_inputs(self) -> int:  # pylint: disable=missing-function-docstring
        return len(self.manifests[0]["inputs"]) if self.manifests else 0

    def device(self) -> str:  # pylint: disable=missing-function-docstring
        return self.device_name

    def _unavailable(self, *args: Any) -> Any:
        raise RuntimeError(f"tvm_class.{self.class_name}: this method cannot run while "
                           "torch.export traces; call the module (its forward) instead")

    load_tvm_module = load_tvm_module_from_bytes = forward = accepts = to = signatures = \
        set_bucket_padding = bucket_padding = call_counts = last_signature = load_state = \
        _unavailable

    def outputs_for(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Empty tensors shaped like the outputs of the program these inputs select."""
        for manifest in self.manifests:
            bound = _bind(manifest, inputs)
            if bound is None:
                continue
            outputs = manifest.get("outputs") or []
            if len(outputs) != self.num_outputs_value or any(
                    o.get("shape") is None or o.get("dtype") is None for o in outputs):
                raise RuntimeError(f"tvm_class.{self.class_name}: the program's manifest names "
                                   "no output shapes (built by an older tvm.contrib.torch); "
                                   "rebuild it to use it in torch.export")
            device = torch.device(self.device_name)
            return [torch.empty([bound[d] if isinstance(d, str) else d for d in o["shape"]],
                                dtype=getattr(torch, o["dtype"]), device=device)
                    for o in outputs]
        signatures = ["(" + ", ".join(f"{i['dtype']}{i['shape']}" for i in m["inputs"]) + ")"
                      for m in self.manifests]
        got = ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in inputs)
        raise RuntimeError(f"tvm_class.{self.class_name}: no compiled program takes ({got}); "
                           f"compiled for {', '.join(signatures)}")


def _bind(manifest: Dict[str, Any], inputs: Sequence[torch.Tensor]) -> Optional[Dict[str, Any]]:
    """Symbol -> size when the inputs fit the manifest's inputs, else None."""
    specs = manifest["inputs"]
    if len(specs) != len(inputs):
        return None
    bound: Dict[str, Any] = {}
    for spec, tensor in zip(specs, inputs):
        if str(tensor.dtype).replace("torch.", "") != spec["dtype"] or \
                tensor.dim() != len(spec["shape"]):
            return None
        for dim, size in zip(spec["shape"], tensor.shape):
            if isinstance(dim, str):
                if bound.setdefault(dim, size) is not size and bound[dim] != size:
                    return None
            elif not isinstance(size, int) or size != dim:
                # A symbolic size against a static program: export can't prove it fits.
                return None
    return bound


def _run(engine: Any, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    return engine.forward(inputs)


def _fake_run(engine: Any, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    fake = getattr(engine, "wrapped_obj", None)
    if fake is None:
        # A real engine given meta tensors outside torch.export: it raises, saying why.
        return engine.forward(inputs)
    return fake.outputs_for(inputs)


def register() -> None:
    """Register the fake classes and operators (once per process)."""
    global _library  # pylint: disable=global-statement
    if _library is not None:
        return
    load_runtime_library()
    library = torch.library.Library("tvm_torch", "FRAGMENT")
    for class_name, op_name in OPERATORS.items():
        qualified = f"tvm_class::{class_name}"
        torch._library.register_fake_class(qualified)(  # pylint: disable=protected-access
            # torch looks __obj_unflatten__ up in the class's own __dict__.
            type(f"Fake{class_name}", (_FakeEngine,),
                 {"__obj_unflatten__": _FakeEngine.__dict__["__obj_unflatten__"]}))
        library.define(f"{op_name}(__torch__.torch.classes.tvm_class.{class_name} engine, "
                       "Tensor[] inputs) -> Tensor[]")
        library.impl(op_name, _run, "CompositeExplicitAutograd")
        torch.library.register_fake(f"tvm_torch::{op_name}", _fake_run, lib=library)
    _library = library


def run_engine(engine: Any, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """Run an engine: through its operator when something may be tracing the call
    (torch.export, torch.compile, torch.jit.trace, FX: they record the operator), else
    directly (the operator's Python dispatch costs ~25 us a call)."""
    if isinstance(engine, torch.ScriptObject) and \
            all(type(t) is torch.Tensor for t in inputs) and \
            not torch.jit.is_tracing() and not torch.compiler.is_compiling() and \
            torch._C._len_torch_dispatch_stack() == 0 and \
            not torch._C._is_torch_function_mode_enabled():  # pylint: disable=protected-access
        return engine.forward(inputs)
    register()
    # torch.export hands the module a FakeScriptObject in place of the engine while tracing.
    qualified = getattr(engine, "script_class_name", None) or \
        engine._type().qualified_name()  # pylint: disable=protected-access
    op_name = OPERATORS[qualified.rsplit(".", 1)[-1]]
    return getattr(torch.ops.tvm_torch, op_name)(engine, inputs)


__all__ = ["OPERATORS", "register", "run_engine"]

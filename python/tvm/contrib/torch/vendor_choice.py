"""Keep the faster of the vendor kernel and a tuned TVM kernel, per CPU convolution.

The offload (:mod:`.vendor_kernels`) puts every CPU convolution on oneDNN, whose kernels are
not the fastest for every shape (depthwise convolutions of small images, for one), and
MetaSchedule can tune TVM's own kernel for each. With ``tuning_compare_vendor``, tuning
races the two for each convolution (:func:`race`):

1. each convolution the offload puts on oneDNN, with its bias, epilogue and residual add as
   the model has them, is built alone twice, through the model's passes: once on oneDNN, once
   as TVM code (so the TVM kernel tuned here is the one the model's program has); one of each
   variant (geometry and chain) is raced;
2. MetaSchedule tunes the TVM versions, all in one module (one trial budget);
3. both versions run on random inputs, timed by TVM's time evaluator, each on this machine;
4. where every variant of a geometry in the program has a TVM kernel that is :data:`MARGIN`
   faster, TVM code replaces oneDNN for every convolution of that geometry.

The times are recorded next to the tuning log (``tuning_log_file + ".vendor.json"``), per
target: a later compile with the log applies the same choices (:func:`tvm_wins`) without
measuring again, as it applies the log's tuning records.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import relax

from . import build as build_mod
from . import export as export_mod
from . import passes, tuning, vendor_kernels
from .vendor_kernels import ConvSite

logger = logging.getLogger(__name__)

#: A tuned TVM kernel replaces the vendor kernel when it takes less than this share of the
#: vendor kernel's time (a margin against timing noise).
MARGIN = 0.95

#: Format of the record file.
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Race:
    """The measured times of one convolution geometry (:attr:`ConvSite.key`).

    Attributes
    ----------
    key : str
        The convolution's :attr:`ConvSite.variant` (geometry and chain).
    vendor_us, tvm_us : float
        Median microseconds per call of the vendor kernel and of the tuned TVM kernel (each
        with the convolution's bias, epilogue and residual add).
    """

    key: str
    vendor_us: float
    tvm_us: float

    @property
    def tvm_wins(self) -> bool:
        """Whether the TVM kernel replaces the vendor kernel."""
        return self.tvm_us < MARGIN * self.vendor_us


def record_path(log_file: str) -> str:
    """Where the races of ``log_file``'s tuning are recorded."""
    return os.path.abspath(log_file) + ".vendor.json"


def _foreign(path: str, err: Exception) -> ValueError:
    return ValueError(f"tvm.contrib.torch: {path} is not a vendor-kernel race record "
                      f"({type(err).__name__}: {err}); delete it to measure again")


def _read(path: str) -> dict:
    """The record file at ``path``, checked to be one this module wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return data
    except (OSError, ValueError, AttributeError) as err:
        raise _foreign(path, err) from err


def load(log_file: Optional[str], target: tvm.target.Target) -> Dict[str, Race]:
    """The races recorded next to ``log_file`` for ``target`` (none if there is no record).

    Raises
    ------
    ValueError
        If the record file exists but is not one this module wrote.
    """
    if not log_file or not os.path.exists(record_path(log_file)):
        return {}
    path = record_path(log_file)
    data = _read(path)
    try:
        races = data["targets"].get(_target_key(target), {})
        return {key: Race(key, float(r["vendor_us"]), float(r["tvm_us"]))
                for key, r in races.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _foreign(path, err) from err


def tvm_wins(log_file: Optional[str], target: tvm.target.Target) -> Dict[str, bool]:
    """Per recorded convolution variant, whether its tuned TVM kernel won (``tvm_wins`` of
    :func:`~tvm.contrib.torch.vendor_kernels.offload_pass`)."""
    return {key: r.tvm_wins for key, r in load(log_file, target).items()}


def _save(log_file: str, target: tvm.target.Target, races: Dict[str, Race]) -> None:
    """Add ``races`` to the record file (refused if the file there is not a record; the new
    file is complete or absent)."""
    path = record_path(log_file)
    data = {"format": FORMAT, "targets": {}}
    if os.path.exists(path):
        load(log_file, target)  # refuses a foreign file before it is overwritten
        data = _read(path)
    entries = data["targets"].setdefault(_target_key(target), {})
    for key, r in races.items():
        entries[key] = {"vendor_us": r.vendor_us, "tvm_us": r.tvm_us}
    export_mod.atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))


def _target_key(target: tvm.target.Target) -> str:
    return str(target)


def _module(sites: Sequence[ConvSite]) -> Tuple[tvm.IRModule, List[List[int]]]:
    """``main`` running each site's chain on inputs of its own, and the input shapes."""
    bb = relax.BlockBuilder()
    params = [p for site in sites for p in site.inputs]
    with bb.function("main", params, attrs={"num_input": len(params)}):
        with bb.dataflow():
            outputs = [bb.emit(site.expr) for site in sites]
            result = bb.emit_output(outputs[0] if len(outputs) == 1 else relax.Tuple(outputs))
        bb.emit_func_output(result)
    shapes = [[int(d) for d in p.ty.shape.values] for p in params]
    return bb.get(), shapes


def _prepare(sites: Sequence[ConvSite], vendor: bool):
    """:func:`_module` through the model's passes, on oneDNN (``vendor``) or as TVM code."""
    mod, shapes = _module(sites)
    bfloat16 = sites[0].compute_dtype == "bfloat16"
    extra = [vendor_kernels.offload_pass(bfloat16=bfloat16)] if vendor else []
    return passes.prepare_for_build(mod, [], shapes, "float32", extra)


def _time_us(prepared, target: tvm.target.Target, database, repeat: int = 7) -> float:
    """Median microseconds per call of a prepared single-site program."""
    mod, values, names, transform = prepared
    executable = build_mod.build(mod, target, database)
    device = tvm.cpu()
    vm = relax.VirtualMachine(executable, device)
    rng = np.random.default_rng(0)
    num_input = int(mod["main"].attrs["num_input"])
    inputs = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.ty.shape.values])
                                 .astype(str(p.ty.dtype)), device)
              for p in mod["main"].params[:num_input]]
    params = [values[name] for name in names]
    if transform is not None:
        params = list(vm[transform](params))
    timer = vm.time_evaluator("main", device, number=1, repeat=repeat, min_repeat_ms=20)
    return float(timer(*inputs, *params).median) * 1e6


def race(sites: Sequence[ConvSite], target: tvm.target.Target, log_file: str, n_trials: int,
         settings: Optional[tuning.TuneSettings] = None) -> Dict[str, Race]:
    """Tune a TVM kernel for each convolution geometry of ``sites`` that ``log_file`` has no
    race for, time it and the vendor kernel, and record both (see the module docstring).

    Parameters
    ----------
    sites : sequence of ConvSite
        The convolutions the offload put on oneDNN (``sites`` of
        :func:`~tvm.contrib.torch.vendor_kernels.offload_pass`).
    target : tvm.target.Target
        A CPU target (the race runs here).
    log_file : str
        The tuning log: records of the TVM kernels go there, the races next to it.
    n_trials : int
        MetaSchedule's trial budget for the TVM kernels of the new geometries.
    settings : TuneSettings, optional
        MetaSchedule's other knobs (as for the program's tuning).

    Returns
    -------
    dict of str to Race
        Per :attr:`ConvSite.variant` of ``sites``, measured now or recorded before.
    """
    if build_mod.is_cuda(target):
        raise ValueError("tvm.contrib.torch: tuning_compare_vendor races CPU convolutions "
                         "against oneDNN; the target is CUDA")
    if settings is not None and settings.rpc is not None:
        raise ValueError("tvm.contrib.torch: tuning_compare_vendor times both kernels on this "
                         "machine; with tuning_rpc the candidates run on other machines")
    recorded = load(log_file, target)
    new: Dict[str, ConvSite] = {}
    for site in sites:
        if site.variant not in recorded:
            new.setdefault(site.variant, site)
    if not new:
        return {site.variant: recorded[site.variant] for site in sites}
    logger.info("racing %d convolutions: oneDNN against tuned TVM kernels", len(new))
    tuning.tune(_prepare(list(new.values()), vendor=False)[0], target, n_trials, log_file,
                settings)
    database = tuning.open_database(log_file)
    races = {}
    for key, site in new.items():
        races[key] = Race(key, vendor_us=_time_us(_prepare([site], True), target, None),
                          tvm_us=_time_us(_prepare([site], False), target, database))
        logger.info("%s: oneDNN %.1f us, tuned TVM %.1f us -> %s", site.key, races[key].vendor_us,
                    races[key].tvm_us, "TVM" if races[key].tvm_wins else "oneDNN")
    _save(log_file, target, races)
    recorded.update(races)
    return {site.variant: recorded[site.variant] for site in sites}


__all__ = ["MARGIN", "Race", "load", "race", "record_path", "tvm_wins"]

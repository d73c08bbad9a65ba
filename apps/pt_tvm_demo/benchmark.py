"""Benchmark: this project against PyTorch's own runners, measured side by side in one run.

Rows per model: PyTorch eager, TorchScript frozen (freeze + optimize_for_inference),
torch.compile (Inductor, freezing on), tvm.contrib.torch untuned (whole model), partitioned
(``partition()`` of the scripted model: TVM subgraphs inside TorchScript), and tuned when
``--tuning-log`` names a MetaSchedule log. ``resnet18_custom_b1`` has a custom operator TVM
cannot take between two stages: only partitioning compiles it. Columns: median and p90 latency, ratio to eager
(> 1 is faster than eager) and compile time. Then the per-call overhead of the custom class on a
tiny model against calling the Relax VM directly, and dynamic-vs-static shape cost.

    python apps/pt_tvm_demo/benchmark.py [--models resnet18_b1,resnet18_custom_b1,transformer_gelu]
                                         [--repeat 30] [--tuning-log tuning.log]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch
import torchvision

import tvm
from tvm import relax
from tvm.contrib.torch import ConversionError
from tvm.contrib.torch import compile as tvm_compile
from tvm.contrib.torch import export as tvm_export
from tvm.contrib.torch import partition, partition_report
from tvm.contrib.torch.timing import measure

_LIBRARY = torch.library.Library("pt_tvm_bench", "DEF")
_LIBRARY.define("channel_gate(Tensor x) -> Tensor")
_LIBRARY.impl("channel_gate", lambda x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)),
              "CompositeExplicitAutograd")


class ResNetWithCustomOp(torch.nn.Module):
    """ResNet-18 with a custom operator (which TVM cannot take) after its second stage."""

    def __init__(self):
        super().__init__()
        net = torchvision.models.resnet18()
        self.stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                                        net.layer2)
        self.rest = torch.nn.Sequential(net.layer3, net.layer4, net.avgpool, torch.nn.Flatten(),
                                        net.fc)

    def forward(self, x):
        return self.rest(torch.ops.pt_tvm_bench.channel_gate(self.stem(x)))


def models_to_run(names: List[str]) -> Dict[str, Tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    out = {}
    for name in names:
        if name.startswith("resnet18_custom_b"):
            batch = int(name.split("_b")[1])
            out[name] = (ResNetWithCustomOp().eval(), torch.rand(batch, 3, 224, 224))
        elif name.startswith("resnet18_b"):
            batch = int(name.split("_b")[1])
            out[name] = (torchvision.models.resnet18().eval(), torch.rand(batch, 3, 224, 224))
        elif name in ("transformer", "transformer_gelu"):
            layer = torch.nn.TransformerEncoderLayer(
                512, 8, 2048, dropout=0.0, batch_first=True,
                activation="gelu" if name.endswith("gelu") else "relu").eval()
            out[name] = (layer, torch.rand(1, 128, 512))
        else:
            raise ValueError(f"unknown model {name}")
    return out


def bench_model(name: str, model: torch.nn.Module, x: torch.Tensor, repeat: int,
                tuning_log: Optional[str], trials: int) -> List[Tuple]:
    rows = []
    with torch.no_grad():
        eager = measure(lambda: model(x), repeat)
        rows.append(("PyTorch eager", eager, 0.0))

        start = time.perf_counter()
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
        frozen(x)
        rows.append(("TorchScript frozen", measure(lambda: frozen(x), repeat),
                     time.perf_counter() - start))

        torch._inductor.config.freezing = True  # pylint: disable=protected-access
        start = time.perf_counter()
        compiled = torch.compile(model)
        compiled(x)
        rows.append(("torch.compile (freezing)", measure(lambda: compiled(x), repeat),
                     time.perf_counter() - start))
        torch._dynamo.reset()  # pylint: disable=protected-access

        with tempfile.TemporaryDirectory() as export_dir:
            start = time.perf_counter()
            try:
                tvm_module = tvm_compile(torch.jit.trace(model, x),
                                         {"input_infos": [("x", tuple(x.shape))],
                                          "export_dir": export_dir})
            except ConversionError as err:
                print(f"{name}: whole-model compile not possible: {str(err).splitlines()[-1]}")
                tvm_module = None
            compile_s = time.perf_counter() - start
            if tvm_module is not None:
                torch.testing.assert_close(tvm_module([x])[0], model(x), rtol=1e-3, atol=1e-3)
                rows.append(("tvm.contrib.torch untuned", measure(lambda: tvm_module([x]),
                                                                  repeat), compile_s))
            start = time.perf_counter()
            partitioned = partition(torch.jit.script(model), [x],
                                    {"export_dir": os.path.join(export_dir, "partition")})
            compile_s = time.perf_counter() - start
            torch.testing.assert_close(partitioned(x), model(x), rtol=1e-3, atol=1e-3)
            rows.append(("tvm.contrib.torch partition", measure(lambda: partitioned(x), repeat),
                         compile_s))
            print(f"{name}: partition: {partition_report(partitioned).summary().splitlines()[0]}")
            if tuning_log and tvm_module is not None:
                start = time.perf_counter()
                tuned = tvm_compile(torch.jit.trace(model, x),
                                    {"input_infos": [("x", tuple(x.shape))],
                                     "export_dir": export_dir, "tuning_n_trials": trials,
                                     "tuning_log_file": tuning_log})
                compile_s = time.perf_counter() - start
                rows.append(("tvm.contrib.torch tuned", measure(lambda: tuned([x]), repeat),
                             compile_s))
    print(f"\n{name}: input {tuple(x.shape)}")
    print(f"  {'runner':<28}{'median ms':>10}{'p90 ms':>10}{'vs eager':>10}{'compile s':>11}")
    for runner, (median, p90), compile_s in rows:
        print(f"  {runner:<28}{median:>10.2f}{p90:>10.2f}{eager[0] / median:>9.2f}x"
              f"{compile_s:>11.1f}")
    return rows


def bench_call_overhead(repeat: int) -> None:
    """Custom-class call vs Relax VM call on a program that does almost nothing."""
    from tvm.contrib.torch import GraphModule  # pylint: disable=import-outside-toplevel

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([4], "float32"))
    with bb.function("main", [xv], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(xv, xv))
        bb.emit_func_output(out)
    mod = bb.get()
    target = tvm.target.Target({"kind": "llvm"})
    executable = tvm.compile(mod, target)
    with tempfile.TemporaryDirectory() as d:
        files = tvm_export.export_program(
            executable, mod, tvm_export.make_manifest(
                [{"name": "x", "shape": [4], "dtype": "float32"}], 1, [], [], target), {}, d,
            "tiny")
        module = GraphModule(1, 1)
        module.init([[4]], *files.as_tuple())
        scripted = torch.jit.script(module)
        vm = relax.VirtualMachine(executable, tvm.cpu())
        x = torch.rand(4)
        x_tvm = tvm.runtime.tensor(x.numpy())
        n = max(repeat, 1) * 1000

        def per_call_us(fn):
            fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - start) / n * 1e6

        vm_main = vm["main"]
        vm_us = per_call_us(lambda: vm_main(x_tvm))
        engine_us = per_call_us(lambda: module.engine.forward([x]))
        script_us = per_call_us(lambda: scripted([x]))
        module_us = per_call_us(lambda: module([x]))
    print("\nper-call overhead (tiny program, from Python):")
    print(f"  Relax VM called directly          {vm_us:8.2f} us")
    print(f"  TvmGraphModule.forward            {engine_us:8.2f} us  (+{engine_us - vm_us:.2f})")
    print(f"  scripted GraphModule              {script_us:8.2f} us  (+{script_us - vm_us:.2f})")
    print(f"  GraphModule (nn.Module)           {module_us:8.2f} us  (+{module_us - vm_us:.2f})")


def bench_dynamic(repeat: int) -> None:
    """Latency of a symbolic-batch module against a static one at the same shape."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.rand(4, 3, 224, 224)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        static = tvm_compile(model, {"input_infos": [("x", (4, 3, 224, 224))],
                                     "export_dir": os.path.join(d, "s")})
        dynamic = tvm_compile(model, {"input_infos": [("x", ("batch", 3, 224, 224))],
                                      "dim_ranges": {"batch": (1, 16)},
                                      "export_dir": os.path.join(d, "d")})
        s, _ = measure(lambda: static([x]), repeat)
        dyn, _ = measure(lambda: dynamic([x]), repeat)
    print(f"\nResNet-18 batch 4: static {s:.1f} ms, dynamic (batch in 1..16) {dyn:.1f} ms "
          f"({dyn / s:.2f}x the static latency)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models",
                        default="resnet18_b1,resnet18_b8,resnet18_custom_b1,transformer,"
                                "transformer_gelu")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tuning-log", help="MetaSchedule log: adds a tuned row")
    parser.add_argument("--trials", type=int, default=0,
                        help="trials to run for the tuned row (0: only apply the log)")
    parser.add_argument("--skip-dynamic", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, tvm {tvm.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for name, (model, x) in models_to_run(args.models.split(",")).items():
        bench_model(name, model, x, args.repeat, args.tuning_log, args.trials)
    bench_call_overhead(args.repeat)
    if not args.skip_dynamic:
        bench_dynamic(max(5, args.repeat // 3))


if __name__ == "__main__":
    main()

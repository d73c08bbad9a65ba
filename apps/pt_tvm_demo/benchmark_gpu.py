"""GPU benchmark: ResNet-18/50 in float16 against PyTorch eager and torch.compile, one run.

    python apps/pt_tvm_demo/benchmark_gpu.py [--models resnet18,resnet50] [--batches 1,16]

Prints, per model and batch: median and p90 latency (CUDA-synchronised), speed against eager
(> 1 is faster) and compile time. The TVM rows are untuned: TVM's default GPU schedules for
the elementwise work, cuDNN/cuBLAS through ATen for convolutions and matrix products.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torchvision

from tvm.contrib.torch import compile as tvm_compile
from tvm.contrib.torch import timing


def measure(fn, repeat: int):
    """(median, p90) ms with the GPU synchronised around every call."""
    return timing.measure(fn, repeat, warmup=5, sync=torch.cuda.synchronize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--no-torch-compile", action="store_true")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        for batch in map(int, args.batches.split(",")):
            x32 = torch.rand(batch, 3, 224, 224, device="cuda")
            x16 = x32.half()
            half = model.half().cuda()
            rows = []
            with torch.no_grad():
                eager = measure(lambda: half(x16), args.repeat)
                rows.append(("PyTorch eager fp16", eager, 0.0))
                if not args.no_torch_compile:
                    start = time.perf_counter()
                    compiled = torch.compile(half)
                    compiled(x16)
                    torch.cuda.synchronize()
                    rows.append(("torch.compile fp16", measure(lambda: compiled(x16), args.repeat),
                                 time.perf_counter() - start))
                    torch._dynamo.reset()  # pylint: disable=protected-access
                model32 = model.float()
                with tempfile.TemporaryDirectory() as export_dir:
                    start = time.perf_counter()
                    tvm_module = tvm_compile(model32.cuda(), {
                        "input_infos": [("x", (batch, 3, 224, 224))],
                        "default_dtype": "float16", "export_dir": export_dir})
                    tvm_module([x16])
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - start
                    got = tvm_module([x16])[0].float()
                    want = model32(x32).float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    rows.append((f"tvm.contrib.torch fp16 (rel err {err:.1e})",
                                 measure(lambda: tvm_module([x16]), args.repeat), compile_s))
            print(f"\n{name} batch {batch}")
            print(f"  {'runner':<40}{'median ms':>10}{'p90 ms':>10}{'vs eager':>10}"
                  f"{'compile s':>11}")
            for runner, (median, p90), compile_s in rows:
                print(f"  {runner:<40}{median:>10.3f}{p90:>10.3f}{eager[0] / median:>9.2f}x"
                      f"{compile_s:>11.1f}")


if __name__ == "__main__":
    main()

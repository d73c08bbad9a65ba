"""GPU spot check on zoo models: PyTorch eager vs ``compile()`` (untuned), fp32 and fp16.

    python apps/pt_tvm_demo/zoo_gpu_spotcheck.py [resnet50 bert_base vit_small ...]

The models are zoo_benchmark.py's (full-size configs, random weights, batch 1, SDPA attention).
TF32 is off for both runners (true fp32). Per model and dtype: median latency of 50 calls
timed with CUDA events after 10 warm-up calls, the ratio to eager (> 1 is faster), compile
seconds and the largest absolute difference from eager's output. torch.compile is not run here
(see benchmark_gpu.py for it on ResNet-18/50).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_benchmark import MODELS  # noqa: E402  pylint: disable=wrong-import-position

import tvm.contrib.torch as tvm_torch  # noqa: E402  pylint: disable=wrong-import-position


def median_ms(fn, n: int = 50) -> float:
    """Median of ``n`` calls timed with CUDA events, after 10 warm-up calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name in sys.argv[1:] or ["resnet50", "bert_base", "vit_small"]:
        for dtype in (torch.float32, torch.float16):
            model, inputs = MODELS[name][1]("sdpa")
            model = model.cuda().to(dtype)
            inputs = tuple(x.cuda().to(dtype) if x.is_floating_point() else x.cuda()
                           for x in inputs)
            with torch.no_grad():
                ref = model(*inputs)
                traced = torch.jit.trace(model, inputs, strict=False)
                started = time.time()
                infos = [(f"i{i}", tuple(x.shape), str(x.dtype).replace("torch.", ""))
                         for i, x in enumerate(inputs)]
                try:
                    compiled = tvm_torch.compile(traced, {
                        "input_infos": infos, "export_dir": tempfile.mkdtemp(),
                        "default_dtype": str(dtype).replace("torch.", "")})
                except tvm_torch.ConversionError as err:  # reported, the others still run
                    print(f"{name} {dtype}: compile failed: {str(err)[:300]}")
                    continue
                compile_s = time.time() - started
                out = compiled(list(inputs))[0]
                err = (out.float() - ref.float()).abs().max().item()
                eager_ms = median_ms(lambda: model(*inputs))
                tvm_ms = median_ms(lambda: compiled(list(inputs)))
            print(f"{name:10s} {str(dtype):14s} eager {eager_ms:7.3f} ms  tvm {tvm_ms:7.3f} ms  "
                  f"ratio {eager_ms / tvm_ms:5.2f}x  compile {compile_s:5.1f} s  "
                  f"max|err| {err:.2e}", flush=True)


if __name__ == "__main__":
    main()

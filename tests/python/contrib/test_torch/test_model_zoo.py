"""The models people serve, traced the way each library documents, through ``compile()`` and
``partition()``: outputs match eager, and the saved modules match again in a fresh process.

Small configurations (see ``zoo_models.py``) keep this fast; the benchmarks use full sizes.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import HAS_CUDA, exact_fp32, run_fresh_python
from zoo_models import HF_MODELS, VISION_MODELS, input_infos

pytest.importorskip("transformers")
pytest.importorskip("timm")

import tvm.contrib.torch as tvm_torch  # noqa: E402
from tvm.contrib.torch.verify import flatten_outputs  # noqa: E402

#: Operators that carry the time of these models: partition() must offload all of them.
HEAVY_OPERATORS = frozenset({
    "aten::linear", "aten::matmul", "aten::bmm", "aten::addmm", "aten::baddbmm",
    "aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::scaled_dot_product_attention",
    "aten::softmax", "aten::layer_norm", "aten::group_norm", "aten::batch_norm",
})

CASES = [pytest.param(name, attn, id=f"{name}-{attn}")
         for name in HF_MODELS for attn in ("sdpa", "eager")]
CASES += [pytest.param(name, None, id=name) for name in VISION_MODELS]


#: One of each family on the GPU: masked and SDPA attention, a float attention bias (T5), a
#: decoder, conv1d, depthwise and grouped convolutions, window attention.
GPU_CASES = [pytest.param(name, attn, id=f"{name}-{attn}" if attn else name)
             for name, attn in [("bert", "eager"), ("bert", "sdpa"), ("gpt2", "sdpa"),
                                ("t5_encoder", "eager"), ("whisper_encoder", "sdpa"),
                                ("llama", "sdpa"), ("timm_resnet", None),
                                ("timm_efficientnet", None), ("timm_regnet", None),
                                ("timm_swin", None), ("timm_mobilenetv3", None),
                                ("torchvision_mobilenet_v2", None)]]


def _assert_matches(actual, expected, tol: float = 1e-4):
    """Within ``tol`` (fp32: 1e-4), relative to each output's magnitude."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape and a.device == e.device
        scale = max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name,attn", CASES)
def test_zoo_model(name, attn, tmp_path):
    model, inputs = HF_MODELS[name](attn) if attn else VISION_MODELS[name]()
    with torch.no_grad():
        expected = flatten_outputs(model(*inputs))
        traced = torch.jit.trace(model, inputs, strict=False)

    compiled = tvm_torch.compile(traced, {"input_infos": input_infos(inputs),
                                          "export_dir": str(tmp_path / "compiled")})
    _assert_matches(compiled(list(inputs)), expected)
    torch.jit.script(compiled).save(str(tmp_path / "compiled.pt"))

    partitioned = tvm_torch.partition(traced, list(inputs),
                                      {"export_dir": str(tmp_path / "partitioned")})
    with torch.no_grad():
        _assert_matches(flatten_outputs(partitioned(*inputs)), expected)
    report = tvm_torch.partition_report(partitioned)
    assert report.num_subgraphs >= 1
    kept_heavy = set(report.kept_operators) & HEAVY_OPERATORS
    assert not kept_heavy, report.summary()
    partitioned.save(str(tmp_path / "partitioned.pt"))

    torch.save({"inputs": list(inputs), "expected": expected}, str(tmp_path / "data.pt"))
    out = run_fresh_python(f"""
        import torch
        import tvm.contrib.torch
        from tvm.contrib.torch.verify import flatten_outputs
        data = torch.load("data.pt")
        compiled = torch.jit.load("compiled.pt")
        partitioned = torch.jit.load("partitioned.pt")
        with torch.no_grad():
            results = [list(compiled(data["inputs"])),
                       flatten_outputs(partitioned(*data["inputs"]))]
        for actual in results:
            assert len(actual) == len(data["expected"])
            for a, e in zip(actual, data["expected"]):
                scale = max(1.0, float(e.abs().max()))
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * scale)
        print("fresh process ok")
    """, cwd=str(tmp_path))
    assert "fresh process ok" in out
    assert os.path.getsize(tmp_path / "compiled.pt") > 0


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU present")
@pytest.mark.parametrize("name,attn", GPU_CASES)
def test_zoo_model_on_cuda(name, attn, tmp_path):
    """The same models on the GPU: weights and inputs on CUDA, compiled for CUDA, outputs on
    CUDA matching eager CUDA."""
    model, inputs = HF_MODELS[name](attn) if attn else VISION_MODELS[name]()
    model = model.cuda()
    inputs = tuple(t.cuda() for t in inputs)
    with torch.no_grad(), exact_fp32():
        expected = flatten_outputs(model(*inputs))
        traced = torch.jit.trace(model, inputs, strict=False)
        compiled = tvm_torch.compile(traced, {"input_infos": input_infos(inputs),
                                              "export_dir": str(tmp_path / "compiled")})
        actual = compiled(list(inputs))
    # GPU kernels reduce in other orders than cuDNN/cuBLAS: 1e-4 of the magnitude is kept.
    _assert_matches(actual, expected)

"""Zoo benchmark: the models people serve, on every CPU runner a user would pick, in one run.

Models (full-size configs, random weights): Hugging Face BERT-base, DistilBERT, GPT-2 small,
BART-base encoder, T5-small encoder, Whisper-tiny encoder and ViT-base (sequence 128 / 224x224
images, batch 1), and timm ResNet-50, EfficientNet-B0, MobileNetV3-L, ConvNeXt-T, ViT-S,
Swin-T, RegNetY-016 and DeiT-S.

Runners: PyTorch eager, TorchScript frozen (freeze + optimize_for_inference), torch.compile
(Inductor, freezing), ONNX Runtime and OpenVINO (optional: ``pip install .[bench]``; skipped
with a note when absent), and this project: untuned, tuned (when ``--tuning-log`` names a
MetaSchedule log), partition (``partition()`` of the traced model) and its torch.compile
backend (``tvm_dynamo``), next to TVM's own ``relax_dynamo`` (torch.compile's ``"tvm"``).

Runners are timed *interleaved*: each round calls every runner once, so that load from other
processes on a shared machine falls on all runners alike and the ratios stay fair. Columns:
median and p90 latency, ratio to eager (> 1 is faster), compile (or export) seconds, and the
largest absolute difference from eager's output. Then the geometric mean of the ratios per
runner and the machine's CPU and flags.

    python apps/pt_tvm_demo/zoo_benchmark.py [--models bert_base,resnet50] [--repeat 20]
        [--runners eager,ts_frozen,inductor,onnxruntime,openvino,tvm,tvm_partition,
                   tvm_dynamo,relax_dynamo]
        [--attn sdpa|eager] [--dtype float32|bfloat16]
        [--tuning-log tuning.log [--trials N] [--tuning-kernels heavy|all] [--compare-vendor]
                                 [--tuning-rpc HOST:PORT --tuning-key KEY]]
        [--json results.json] [--markdown table.md]

``--json`` appends each model's rows as it finishes, so that a long run can be split
(``--table-from results.json`` prints the table of earlier runs without measuring).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: Sequence length of the text models, image size of the vision models.
SEQ = 128
IMAGE = 224


class FirstOutput(torch.nn.Module):
    """Calls a model with positional tensors as keyword arguments; returns its first output
    (the last hidden state), so that every runner gets the same one-tensor model."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.names, inputs)))
        if isinstance(out, (tuple, list)):
            return out[0]
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _hf(model_class: str, config_class: str, attn: str, names: Sequence[str],
        encoder: bool = False, **config):
    import transformers  # pylint: disable=import-outside-toplevel

    cfg = getattr(transformers, config_class)(torchscript=True, attn_implementation=attn,
                                              **config)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(cfg).eval()
    if encoder:  # the encoder of an encoder-decoder model
        model = model.get_encoder()
    return FirstOutput(model, names).eval()


def _text_inputs(vocab: int) -> Tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (1, SEQ), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones(1, SEQ, dtype=torch.long)


def _timm(name: str):
    import timm  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return model, (torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)),)


def _torchvision(name: str):
    import torchvision  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    return model, (torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)),)


def _text(model_class, config_class, **config):
    def build(attn):
        model = _hf(model_class, config_class, attn, ("input_ids", "attention_mask"), **config)
        return model, _text_inputs(config.get("vocab_size", 30522))
    return build


def _whisper(attn):
    model = _hf("WhisperModel", "WhisperConfig", attn, ("input_features",), encoder=True,
                d_model=384, encoder_layers=4, encoder_attention_heads=6, decoder_layers=4,
                decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
                num_mel_bins=80, max_source_positions=1500)
    return model, (torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1)),)


def _hf_vit(attn):
    model = _hf("ViTModel", "ViTConfig", attn, ("pixel_values",))
    return model, (torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)),)


#: name -> (table label, builder(attn) -> (model, inputs)).
MODELS: Dict[str, Tuple[str, Callable[[str], Tuple[torch.nn.Module, tuple]]]] = {
    "bert_base": ("HF BERT-base, seq 128", _text("BertModel", "BertConfig")),
    "distilbert": ("HF DistilBERT, seq 128", _text("DistilBertModel", "DistilBertConfig")),
    "gpt2": ("HF GPT-2 small, seq 128", _text("GPT2Model", "GPT2Config", vocab_size=50257,
                                              use_cache=False)),
    "bart_base_encoder": ("HF BART-base encoder, seq 128",
                          _text("BartModel", "BartConfig", encoder=True, vocab_size=50265,
                                d_model=768,
                                encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                                decoder_attention_heads=12, encoder_ffn_dim=3072,
                                decoder_ffn_dim=3072)),
    "t5_small_encoder": ("HF T5-small encoder, seq 128",
                         _text("T5EncoderModel", "T5Config", vocab_size=32128, d_model=512,
                               d_kv=64, d_ff=2048, num_layers=6, num_heads=8)),
    "whisper_tiny_encoder": ("HF Whisper-tiny encoder, 30 s audio", _whisper),
    "vit_base": ("HF ViT-base 224", _hf_vit),
    "resnet50": ("timm ResNet-50", lambda attn: _timm("resnet50")),
    "efficientnet_b0": ("timm EfficientNet-B0", lambda attn: _timm("efficientnet_b0")),
    "mobilenetv3_large": ("timm MobileNetV3-L", lambda attn: _timm("mobilenetv3_large_100")),
    "convnext_tiny": ("timm ConvNeXt-T", lambda attn: _timm("convnext_tiny")),
    "vit_small": ("timm ViT-S/16", lambda attn: _timm("vit_small_patch16_224")),
    "swin_tiny": ("timm Swin-T (nn.Module input)",
                  lambda attn: _timm("swin_tiny_patch4_window7_224")),
    "regnety_016": ("timm RegNetY-016", lambda attn: _timm("regnety_016")),
    "deit_small": ("timm DeiT-S", lambda attn: _timm("deit_small_patch16_224")),
    "mobilenet_v2": ("torchvision MobileNetV2", lambda attn: _torchvision("mobilenet_v2")),
}

#: Models this project compiles as ``nn.Module`` (through torch.export): the TorchScript of a
#: traced Swin computes its window partition from traced sizes that torch's TorchScript-to-
#: ExportedProgram converter cannot prove static.
MODULE_INPUT = {"swin_tiny"}

#: runner key -> table label.
RUNNERS = {
    "eager": "PyTorch eager",
    "ts_frozen": "TorchScript frozen",
    "inductor": "torch.compile (Inductor, freezing)",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
    "tvm": "tvm.contrib.torch untuned",
    "tvm_tuned": "tvm.contrib.torch tuned",
    "tvm_partition": "tvm.contrib.torch partition",
    "tvm_dynamo": "torch.compile (tvm_contrib_torch)",
    "relax_dynamo": "torch.compile (TVM's relax_dynamo)",
}


class Skip(Exception):
    """A runner that cannot run here (a missing optional package): noted, not an error."""


def _autocast(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _flat(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "__array__") and not isinstance(out, (list, tuple)):  # numpy (ORT)
        return [torch.from_numpy(out.__array__())]
    if hasattr(out, "values"):  # dict, OpenVINO's OVDict
        out = list(out.values())
    flat: List[torch.Tensor] = []
    for item in out:
        flat.extend(_flat(item))
    return flat


def build_runner(key: str, model: torch.nn.Module, inputs: tuple, dtype: torch.dtype,
                 workdir: str, tuning: Dict[str, Any],
                 module_input: bool = False) -> Callable[[], Any]:
    """Prepare one runner; returns the call to time. Raises :class:`Skip` when unavailable.

    ``tuning`` holds the tuned row's compile options (``tuning_log_file``,
    ``tuning_n_trials``, ``tuning_kernels``, ``tuning_compare_vendor``, ``tuning_rpc``)."""
    threads = torch.get_num_threads()
    if key == "eager":
        def eager():
            with _autocast(dtype):
                return model(*inputs)
        return eager
    if key == "ts_frozen":
        with _autocast(dtype):
            frozen = torch.jit.optimize_for_inference(
                torch.jit.freeze(torch.jit.trace(model, inputs, check_trace=False)))

        def ts():
            with _autocast(dtype):
                return frozen(*inputs)
        return ts
    if key == "inductor":
        torch._inductor.config.freezing = True  # pylint: disable=protected-access
        compiled = torch.compile(model)

        def inductor():
            with _autocast(dtype):
                return compiled(*inputs)
        return inductor
    if key == "onnxruntime":
        try:
            import onnxruntime as ort  # pylint: disable=import-outside-toplevel
        except ImportError as err:
            raise Skip("onnxruntime is not installed (pip install .[bench])") from err
        if dtype != torch.float32:
            raise Skip("ONNX Runtime's CPU provider has no bfloat16 kernels for these models")
        path = os.path.join(workdir, "model.onnx")
        names = [f"input{i}" for i in range(len(inputs))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, path, input_names=names, dynamo=False,
                              opset_version=17)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {n: x.numpy() for n, x in zip(names, inputs)}
        return lambda: session.run(None, feed)
    if key == "openvino":
        try:
            import openvino as ov  # pylint: disable=import-outside-toplevel
        except ImportError as err:
            raise Skip("openvino is not installed (pip install .[bench])") from err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(model, example_input=inputs)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                  "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32"}
        compiled = ov.Core().compile_model(ov_model, "CPU", config)
        request = compiled.create_infer_request()
        feed = [x.numpy() for x in inputs]
        return lambda: request.infer(feed)
    if key in ("tvm", "tvm_tuned"):
        from tvm.contrib.torch import compile as tvm_compile  # pylint: disable=import-outside-toplevel

        if key == "tvm_tuned" and not tuning.get("tuning_log_file"):
            raise Skip("no --tuning-log given")
        option = {"input_infos": [(f"input{i}", tuple(x.shape), str(x.dtype)[6:])
                                  for i, x in enumerate(inputs)],
                  "export_dir": os.path.join(workdir, key),
                  "default_dtype": str(dtype)[6:]}
        if key == "tvm_tuned":
            option.update(tuning)
        source = model if module_input else torch.jit.trace(model, inputs, check_trace=False)
        module = tvm_compile(source, option)
        # A bfloat16 program takes its float inputs in bfloat16 (as autocast hands them on).
        listed = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
        return lambda: module(listed)
    if key in ("tvm_dynamo", "relax_dynamo"):
        import tvm.contrib.torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

        backend = "tvm_contrib_torch" if key == "tvm_dynamo" else "tvm"
        options = {"cache_dir": os.path.join(workdir, key)} if key == "tvm_dynamo" else None
        compiled = torch.compile(model, backend=backend, options=options)

        def dynamo():
            with _autocast(dtype):
                return compiled(*inputs)
        return dynamo
    if key == "tvm_partition":
        from tvm.contrib.torch import partition  # pylint: disable=import-outside-toplevel

        if dtype != torch.float32:
            raise Skip("partition is measured in float32 only")
        module = partition(torch.jit.trace(model, inputs, check_trace=False), list(inputs),
                           {"export_dir": os.path.join(workdir, key)})
        return lambda: module(*inputs)
    raise ValueError(f"unknown runner {key!r}; known: {', '.join(RUNNERS)}")


def bench_model(name: str, runners: Sequence[str], repeat: int, attn: str, dtype: torch.dtype,
                tuning: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one model on every runner; returns its result record."""
    label, builder = MODELS[name]
    # Dynamo keys its caches on code objects that models share (FirstOutput.forward, a timm
    # block's forward): past its recompile limit it would run this model eagerly, unmeasured.
    torch._dynamo.reset()  # pylint: disable=protected-access
    model, inputs = builder(attn)
    record: Dict[str, Any] = {"model": name, "label": label, "rows": {}, "notes": []}
    calls: Dict[str, Callable[[], Any]] = {}
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="zoo_bench_") as workdir:
        with _autocast(dtype):
            reference = [t.float() for t in _flat(model(*inputs))]
        for key in runners:
            start = time.perf_counter()
            try:
                call = build_runner(key, model, inputs, dtype, workdir, tuning,
                                    module_input=name in MODULE_INPUT)
                out = call()  # the first call finishes lazy compilation (Inductor)
            except Skip as why:
                record["notes"].append(f"{RUNNERS[key]}: skipped: {why}")
                continue
            except Exception as err:  # pylint: disable=broad-except
                # Backend failures wrap the cause: its line is the informative one.
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                cause = next((line for line in lines if "Error" in line and
                              not line.startswith("backend=")), lines[0] if lines else "")
                record["notes"].append(f"{RUNNERS[key]}: failed: {type(err).__name__}: "
                                       f"{cause[:300]}")
                continue
            compile_s = time.perf_counter() - start
            flat = [torch.as_tensor(t).float() for t in _flat(out)]
            error = max((float((a - b).abs().max()) for a, b in zip(flat, reference)),
                        default=float("nan"))
            record["rows"][key] = {"compile_s": compile_s, "max_error": error}
            calls[key] = call
            print(f"  {name}: {RUNNERS[key]} ready in {compile_s:.1f} s", flush=True)
        # Interleaved rounds: every runner once per round.
        for call in calls.values():
            for _ in range(2):
                call()
        times: Dict[str, List[float]] = {key: [] for key in calls}
        for _ in range(repeat):
            for key, call in calls.items():
                begin = time.perf_counter()
                call()
                times[key].append((time.perf_counter() - begin) * 1e3)
    for key, samples in times.items():
        samples.sort()
        record["rows"][key].update(median_ms=statistics.median(samples),
                                   p90_ms=samples[int(0.9 * (len(samples) - 1))])
    return record


def cpu_description() -> str:
    """The CPU's model name and the vector/matrix flags that matter for these kernels."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "unknown CPU", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"]
    present = [f for f in wanted if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(present) or 'none of ' + ' '.join(wanted)}"


def render(records: List[Dict[str, Any]], header: str) -> str:
    """The markdown table of the records, with a geometric-mean row per runner."""
    runners = [k for k in RUNNERS if any(k in r["rows"] for r in records)]
    lines = [header, "",
             "| model | " + " | ".join(RUNNERS[k] for k in runners) + " |",
             "|---|" + "---:|" * len(runners)]
    ratios: Dict[str, List[float]] = {k: [] for k in runners}
    for rec in records:
        eager = rec["rows"].get("eager", {}).get("median_ms")
        cells = []
        for key in runners:
            row = rec["rows"].get(key)
            if row is None or "median_ms" not in row or not eager:
                cells.append("—")
                continue
            ratio = eager / row["median_ms"]
            ratios[key].append(ratio)
            cells.append(f"{ratio:.2f}x ({row['median_ms']:.1f} ms)")
        lines.append(f"| {rec['label']} | " + " | ".join(cells) + " |")
    lines.append("| **geometric mean** | " + " | ".join(
        f"**{math.exp(sum(map(math.log, v)) / len(v)):.2f}x** ({len(v)})" if v else "—"
        for v in ratios.values()) + " |")
    lines += ["", "Per runner: median / p90 ms, compile s, max |error| vs eager:", ""]
    for rec in records:
        parts = [f"{RUNNERS[k]} {row['median_ms']:.1f}/{row['p90_ms']:.1f} ms, "
                 f"{row['compile_s']:.0f} s, {row['max_error']:.1e}"
                 for k, row in rec["rows"].items() if "median_ms" in row]
        lines.append(f"- {rec['label']}: " + "; ".join(parts))
        lines += [f"  - {note}" for note in rec["notes"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated; "
                        f"known: {', '.join(MODELS)}")
    parser.add_argument("--runners", default="eager,ts_frozen,inductor,onnxruntime,openvino,"
                        "tvm,tvm_tuned,tvm_partition")
    parser.add_argument("--repeat", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="attention implementation of the Hugging Face models")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tuning-log", help="MetaSchedule log: enables the tuned row")
    parser.add_argument("--trials", type=int, default=0,
                        help="trials to run for the tuned row (0: only apply the log)")
    parser.add_argument("--tuning-kernels", default="heavy", choices=["heavy", "all"],
                        help="tune only the TVM kernels a profile shows as heavy (default), "
                             "or all of them")
    parser.add_argument("--compare-vendor", action="store_true",
                        help="tuned row: also race tuned TVM kernels against oneDNN per "
                             "convolution and keep the faster (tuning_compare_vendor)")
    parser.add_argument("--tuning-rpc", metavar="HOST:PORT",
                        help="measure the tuned row's candidates on this RPC tracker's servers")
    parser.add_argument("--tuning-key", default="tvm-torch",
                        help="the servers' key on the tracker (with --tuning-rpc)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads every runner uses (default: torch's default, one per "
                             "core)")
    parser.add_argument("--json", help="append each model's record to this JSON file")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--table-from", help="print the table of a --json file and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # TVM's pool starts at first use
    header = (f"{cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, batch 1, {args.dtype}, HF attention: {args.attn}")
    if args.table_from:
        with open(args.table_from, encoding="utf-8") as f:
            saved = json.load(f)
        print(render(saved["records"], saved["header"]))
        return
    dtype = getattr(torch, args.dtype)
    tuning: Dict[str, Any] = {"tuning_log_file": args.tuning_log, "tuning_n_trials": args.trials,
                              "tuning_kernels": args.tuning_kernels,
                              "tuning_compare_vendor": args.compare_vendor}
    if args.tuning_rpc:
        tuning["tuning_rpc"] = {"tracker": args.tuning_rpc, "key": args.tuning_key}
    print(header, flush=True)
    records = []
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        records.append(bench_model(name, args.runners.split(","), args.repeat, args.attn,
                                   dtype, tuning))
        print(render(records[-1:], ""), flush=True)
        if args.json:
            saved = {"header": header, "records": []}
            if os.path.exists(args.json):
                with open(args.json, encoding="utf-8") as f:
                    saved = json.load(f)
            saved["records"] = [r for r in saved["records"] if r["model"] != name] + [records[-1]]
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(saved, f, indent=1)
    table = render(records, header)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

"""The seed's guide-level example, end to end on CPU.

A ``Predictor`` pipeline (decode images with ``torchvision.io.read_image``, ``Resize``,
``CenterCrop``, ``ConvertImageDtype``, ``Normalize``, then a torchvision ResNet-18) and its
``PredictorTVM`` twin whose ResNet-18 is the module returned by
``tvm.contrib.pt_op.compile``. Both are scripted; the demo checks they predict the same
classes, prints per-batch timings, saves ``model_tvm.pt`` and checks it again in a fresh
process.

Weights cannot be downloaded on machines without network access: the ResNet gets
deterministic random weights unless ``--weights resnet18.pth`` names a state dict.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List

import torch
import torchvision
from torch import nn
from torchvision import transforms as T

from tvm.contrib.pt_op import compile  # pylint: disable=redefined-builtin
from tvm.contrib.torch.timing import measure

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_images(directory: str, count: int) -> List[str]:
    """Write ``count`` deterministic JPEG images of varied sizes; return their paths."""
    os.makedirs(directory, exist_ok=True)
    generator = torch.Generator().manual_seed(2024)
    paths = []
    for i in range(count):
        h, w = 240 + 16 * i, 320 - 8 * i
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([xx, yy, (xx + yy) / 2]) * 255
        noise = torch.rand((3, h, w), generator=generator) * 64
        image = ((base + noise) % 256).to(torch.uint8)
        path = os.path.join(directory, f"image_{i}.jpg")
        torchvision.io.write_jpeg(image, path, quality=90)
        paths.append(path)
    return paths


def load_images(paths: List[str]) -> List[torch.Tensor]:
    """Decode images as uint8 CHW tensors."""
    return [torchvision.io.read_image(p) for p in paths]


def preprocess() -> nn.Module:
    """The seed's preprocessing, scriptable."""
    return nn.Sequential(T.Resize([256], antialias=True), T.CenterCrop(224),
                         T.ConvertImageDtype(torch.float), T.Normalize(MEAN, STD))


class Predictor(nn.Module):
    """Images in, class ids out, all in PyTorch."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet18 = resnet
        self.transforms = preprocess()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's scores for a preprocessed batch."""
        return self.resnet18(x)

    def forward(self, images: List[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            x = torch.stack([self.transforms(image) for image in images])
            return self.logits(x).argmax(dim=1)


class PredictorTVM(Predictor):
    """The same pipeline with the ResNet-18 compiled by TVM (List[Tensor] in and out)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's scores for a preprocessed batch."""
        return self.resnet18([x])[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="a ResNet-18 state dict (default: random, seeded)")
    parser.add_argument("--out", default="pt_tvm_demo_out", help="output directory")
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--repeat", type=int, default=10, help="timed batches per pipeline")
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule trials (0: none)")
    args = parser.parse_args()

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    if args.weights:
        resnet.load_state_dict(torch.load(args.weights, map_location="cpu"))
    images = load_images(make_images(os.path.join(args.out, "images"), args.batch))
    print(f"{len(images)} images, sizes {[tuple(i.shape[1:]) for i in images]}")

    x = torch.rand(args.batch, 3, 224, 224)
    option = {
        "input_infos": [("x", (args.batch, 3, 224, 224))],
        "default_dtype": "float32",
        "export_dir": os.path.join(args.out, "pytorch_compiled"),
        "num_outputs": 1,
        "tuning_n_trials": args.trials,
        "tuning_log_file": os.path.join(args.out, "tuning.log"),
    }
    start = time.perf_counter()
    with torch.no_grad():
        resnet_tvm = compile(torch.jit.trace(resnet, x), option)
    print(f"compiled ResNet-18 with TVM in {time.perf_counter() - start:.1f} s")

    predictor = torch.jit.script(Predictor(resnet))
    predictor_tvm = torch.jit.script(PredictorTVM(resnet_tvm))
    want, got = predictor(images), predictor_tvm(images)
    print(f"PyTorch classes: {want.tolist()}\nTVM classes:     {got.tolist()}")
    if not torch.equal(want, got):
        print("FAIL: the pipelines disagree", file=sys.stderr)
        return 1
    torch_ms = measure(lambda: predictor(images), args.repeat, warmup=1)[0]
    tvm_ms = measure(lambda: predictor_tvm(images), args.repeat, warmup=1)[0]
    print(f"per batch of {args.batch}: PyTorch {torch_ms:.1f} ms, TVM {tvm_ms:.1f} ms "
          f"({torch_ms / tvm_ms:.2f}x)")

    saved = os.path.abspath(os.path.join(args.out, "model_tvm.pt"))
    predictor_tvm.save(saved)
    torch.save({"paths": [os.path.abspath(p) for p in sorted(
        os.path.join(args.out, "images", f) for f in os.listdir(os.path.join(args.out, "images")))],
        "want": want}, os.path.join(args.out, "expected.pt"))
    check = (
        "import torch, torchvision, tvm.contrib.torch\n"
        f"m = torch.jit.load({saved!r})\n"
        f"e = torch.load({os.path.abspath(os.path.join(args.out, 'expected.pt'))!r})\n"
        "got = m([torchvision.io.read_image(p) for p in e['paths']])\n"
        "assert torch.equal(got, e['want']), (got, e['want'])\n"
        "print('fresh process: model_tvm.pt predicts', got.tolist())\n")
    subprocess.run([sys.executable, "-c", check], check=True)
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

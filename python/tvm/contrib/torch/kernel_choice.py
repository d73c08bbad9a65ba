"""Choices between vendor kernels, measured at compile time on this machine.

A 1x1 convolution with stride 1 and no padding is a matrix product over the pixels of an NHWC
tensor. oneDNN's convolution and its linear (inner-product) kernel both compute it, and which
one is faster depends on the shape and the CPU: the linear kernel wins by up to 2.5x on few
input channels and many pixels (MobileNetV3's first blocks), the convolution on ResNet-50's
shapes. Each distinct shape is timed once per process, both kernels on the same random input,
interleaved, and the minimum of each is compared.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

logger = logging.getLogger(__name__)

#: The linear kernel is chosen when it takes at most this share of the convolution's time: a
#: margin over timing noise, so that near-ties keep the convolution.
LINEAR_MARGIN = 0.9
#: Timed calls per kernel, after two warm-up calls each.
ROUNDS = 12


def _min_time(fns, rounds: int):
    """Per function, the shortest of ``rounds`` interleaved calls (seconds)."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def pointwise_conv_as_linear(height: int, width: int, in_channels: int,
                             out_channels: int) -> bool:
    """Whether oneDNN's linear kernel beats its convolution on a float32 1x1 convolution of a
    ``[1, in_channels, height, width]`` channels-last input, on this CPU (with prepacked
    weights, as the program runs them)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, in_channels, height, width, generator=generator).contiguous(
        memory_format=torch.channels_last)
    weight = torch.rand(out_channels, in_channels, 1, 1, generator=generator)
    bias = torch.zeros(out_channels)
    mkldnn = torch.ops.mkldnn
    with torch.no_grad():
        conv_weight = mkldnn._reorder_convolution_weight(  # pylint: disable=protected-access
            weight, [0, 0], [1, 1], [1, 1], 1, list(x.shape))
        rows = x.permute(0, 2, 3, 1).reshape(height * width, in_channels)
        linear_weight = mkldnn._reorder_linear_weight(  # pylint: disable=protected-access
            weight.reshape(out_channels, in_channels), rows.shape[0])
        conv_s, linear_s = _min_time([
            lambda: mkldnn._convolution_pointwise(  # pylint: disable=protected-access
                x, conv_weight, bias, [0, 0], [1, 1], [1, 1], 1, "none", [], None),
            lambda: mkldnn._linear_pointwise(  # pylint: disable=protected-access
                rows, linear_weight, bias, "none", [], ""),
        ], ROUNDS)
    chosen = linear_s <= LINEAR_MARGIN * conv_s
    logger.debug("1x1 conv %dx%d %d->%d: conv %.1f us, linear %.1f us -> %s", height, width,
                 in_channels, out_channels, conv_s * 1e6, linear_s * 1e6,
                 "linear" if chosen else "conv")
    return chosen


__all__ = ["pointwise_conv_as_linear"]

"""Transposed convolutions, fastconv against torch: forward and forward+backward, float32, median.

Layers: U-Net's up-convolution (2x2, stride 2: kernel == stride, so ``algo='auto'`` takes the
``patch_gemm`` path) and DCGAN's generator up-sampling (4x4, stride 2, padding 1: overlapping windows,
the registry's input-gradient kernels). Each case first checks its result (and, for the backward, the
input, weight and bias gradients) against torch in float64, then times it. Each layer and pass is its
own benchmark group, so the ratio to torch is the ratio of the two rows' medians in the same run.

    python -m pytest bench/bench_transposed.py --benchmark-only
    python -m pytest bench/bench_transposed.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.tolerances import tolerance

# name: (input shape, weight shape (C_in, C_out, kH, kW), kwargs)
LAYERS = {
    "unet_up_2x2s2_512to256_28": ((4, 512, 28, 28), (512, 256, 2, 2), dict(stride=2)),
    "dcgan_4x4s2p1_512to256_4": ((64, 512, 4, 4), (512, 256, 4, 4), dict(stride=2, padding=1)),
    "dcgan_4x4s2p1_128to64_16": ((64, 128, 16, 16), (128, 64, 4, 4), dict(stride=2, padding=1)),
}
IMPLS = {"fastconv": F.conv_transpose2d, "torch": TF.conv_transpose2d}
#: Relative error bound (max |error| / max |reference|) of a float32 result against float64: the float32
#: rtol of fastconv.tolerances (the float32 bias gradient sums 65536 terms: torch itself lands near 3e-5).
TOLERANCE = tolerance(torch.float32)["rtol"]


def _inputs(layer: str):
    x_shape, w_shape, kw = LAYERS[layer]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen)
    # Scaled like a trained layer (fan-in), so the float32 error is judged on values of order one.
    w = torch.randn(w_shape, generator=gen) / math.sqrt(w_shape[0] * w_shape[2] * w_shape[3] / 4)
    b = torch.randn(w_shape[1], generator=gen)
    return x, w, b, kw


def _forward(fn, x, w, b, kw):
    with torch.no_grad():
        return fn(x, w, b, **kw)


def _forward_backward(fn, x, w, b, kw, grad):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b, **kw)
    return (y, *torch.autograd.grad(y, (x, w, b), grad))


def _relative_error(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_conv_transpose2d(benchmark, layer, pass_, impl):
    """Check against torch (float64), then time 7 rounds after a warm-up; GFLOP/s in extra_info."""
    fn = IMPLS[impl]
    x, w, b, kw = _inputs(layer)
    x64, w64, b64 = x.double(), w.double(), b.double()
    if pass_ == "forward":
        args = (fn, x, w, b, kw)
        got, want = (_forward(*args),), (_forward(TF.conv_transpose2d, x64, w64, b64, kw),)
        run = _forward
    else:
        grad = torch.randn(TF.conv_transpose2d(x[:1], w, None, **kw).shape[1:]).expand(
            x.shape[0], -1, -1, -1).contiguous()
        args = (fn, x, w, b, kw, grad)
        got = _forward_backward(*args)
        want = _forward_backward(TF.conv_transpose2d, x64, w64, b64, kw, grad.double())
        run = _forward_backward
    for what, g, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
        err = _relative_error(g, e)
        assert err <= TOLERANCE, f"{layer} {pass_} {impl}: {what} relative error {err:.2e} > {TOLERANCE:.0e}"

    # torch's FlopCounterMode rule for transposed convs: the work follows the input's spatial size.
    flops = 2 * x.shape[0] * math.prod(x.shape[2:]) * math.prod(w.shape)
    flops *= 3 if pass_ == "forward_backward" else 1
    benchmark.group = f"{layer} {pass_}"
    benchmark.extra_info.update(layer=layer, pass_=pass_, impl=impl, flops=flops)
    benchmark.pedantic(run, args=args, rounds=7, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable: the check above still ran
        benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.median / 1e9

"""conv1d/2d/3d against torch in float64: forward, gradients, gradcheck, opcheck, compile, layouts.

Runs on whichever backend is active (``FASTCONV_BACKEND``), over every algorithm registered for it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import backends, registry
from helpers import assert_close

TARGET = backends.current()
ALGOS = ["auto"] + [row["name"] for row in fastconv.algorithms()
                     if TARGET in row["targets"] and row["family"] == "conv"]

# (N, C, H, W, K, kernel, kwargs) — stride/padding/dilation/groups geometry matrix for conv2d.
CASES_2D = {
    "3x3_pad1": (2, 3, 8, 7, 4, (3, 3), dict(padding=1)),
    "stride2_pad1": (2, 3, 9, 8, 5, (3, 3), dict(stride=2, padding=1)),
    "mixed_tuple_args": (2, 4, 11, 9, 3, (3, 2), dict(stride=(2, 3), padding=(1, 2), dilation=(2, 1))),
    "same_odd_dilated": (1, 3, 9, 8, 4, (3, 3), dict(padding="same", dilation=2)),
    "same_even_kernel": (2, 2, 7, 6, 3, (4, 2), dict(padding="same")),
    "same_even_dilated": (1, 2, 8, 9, 3, (2, 4), dict(padding="same", dilation=(3, 2))),
    "valid": (2, 3, 6, 7, 2, (3, 3), dict(padding="valid")),
    "groups2": (2, 4, 7, 7, 6, (3, 3), dict(padding=1, groups=2)),
    "groups2_8wide": (1, 16, 5, 4, 16, (3, 3), dict(padding=1, groups=2)),  # group_lanes' 8-channel groups
    "groups2_8wide_stride2": (1, 16, 6, 5, 16, (3, 3), dict(stride=2, padding=1, groups=2)),
    "depthwise": (2, 4, 8, 8, 4, (3, 3), dict(padding=1, groups=4)),
    "depthwise_multiplier2": (2, 3, 7, 9, 6, (3, 3), dict(stride=2, padding=1, groups=3)),
    "kernel_equals_input": (2, 3, 5, 4, 4, (5, 4), dict()),
    "pointwise_1x1": (2, 6, 5, 7, 5, (1, 1), dict()),
    "pointwise_strided": (2, 6, 7, 7, 5, (1, 1), dict(stride=2)),
    "even_2x2_stride2": (2, 3, 8, 8, 4, (2, 2), dict(stride=2)),
    "5x5_pad2": (1, 3, 9, 9, 5, (5, 5), dict(padding=2)),
    "many_channels": (1, 9, 6, 6, 13, (3, 3), dict(padding=1)),
    "asymmetric_pad_stride": (1, 2, 10, 5, 3, (3, 1), dict(stride=(3, 1), padding=(2, 0))),
}


def _make(case, dtype=torch.float64, bias=True, requires_grad=True):
    n, c, h, w, k, ks, kw = case
    groups = kw.get("groups", 1)
    x = torch.randn(n, c, h, w, dtype=dtype, requires_grad=requires_grad)
    weight = torch.randn(k, c // groups, *ks, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(k, dtype=dtype, requires_grad=requires_grad) if bias else None
    return x, weight, b, kw


def _refusal(algo, x, weight, kw):
    """The registry's reason ``algo`` can't run this case, or None (checked by calling it)."""
    if algo == "auto":
        return None
    try:
        F.conv2d(x.detach(), weight.detach(), None, algo=algo, **kw)
    except ValueError as e:
        assert "cannot run this convolution" in str(e) and "Algorithms that can" in str(e)
        return str(e)
    return None


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", list(CASES_2D), ids=list(CASES_2D))
def test_conv2d_forward_and_gradients_match_torch(case, algo):
    x, weight, b, kw = _make(CASES_2D[case])
    reason = _refusal(algo, x, weight, kw)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])  # the refusal's wording is asserted in _refusal
    y = F.conv2d(x, weight, b, algo=algo, **kw)
    ref = TF.conv2d(x, weight, b, **kw)
    assert_close(y, ref, algo=algo, what="forward")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, weight, b), g)
    want = torch.autograd.grad(ref, (x, weight, b), g)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert_close(a, e, algo=algo, what=name)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", ["stride2_pad1", "mixed_tuple_args", "same_even_kernel", "groups2",
                                  "depthwise_multiplier2", "pointwise_1x1"])
def test_conv2d_gradcheck_and_gradgradcheck(case, algo):
    x, weight, b, kw = _make(CASES_2D[case])
    reason = _refusal(algo, x, weight, kw)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    fn = lambda x, w, b: F.conv2d(x, w, b, algo=algo, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, weight, b), fast_mode=True)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", ["stride2_pad1", "same_even_kernel", "depthwise"])
def test_opcheck_conv2d_ops(case, algo):
    x, weight, b, kw = _make(CASES_2D[case])
    reason = _refusal(algo, x, weight, kw)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    a = F.conv.ConvArgs("conv2d", 2, x, weight, b, kw.get("stride", 1), kw.get("padding", 0),
                        kw.get("dilation", 1), kw.get("groups", 1), algo)
    geometry = [*a.lists(), a.groups, algo]
    y = TF.conv2d(x, weight, b, **kw).detach()
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, weight, b, *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default,
                          (gy.requires_grad_(), weight, list(x.shape[2:]), *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default,
                          (gy, x, list(weight.shape[2:]), *geometry))


@pytest.mark.parametrize("ndim, kw", [
    (1, dict(stride=2, padding=1)), (1, dict(padding="same", dilation=2, groups=2)),
    (3, dict(padding=1)), (3, dict(stride=(1, 2, 2), padding="valid", dilation=(2, 1, 1), groups=2)),
])
def test_conv1d_conv3d_match_torch(ndim, kw):
    groups = kw.get("groups", 1)
    size = (9,) if ndim == 1 else (5, 6, 7)
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, *((3,) * ndim), dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ours, theirs = getattr(F, f"conv{ndim}d"), getattr(TF, f"conv{ndim}d")
    assert_close(ours(x, w, b, **kw), theirs(x, w, b, **kw), what="forward")
    assert torch.autograd.gradcheck(lambda x, w, b: ours(x, w, b, **kw), (x, w, b), fast_mode=True)


def test_unbatched_input():
    x, w, b, kw = _make(CASES_2D["stride2_pad1"])
    y = F.conv2d(x[0], w, b, **kw)
    assert y.shape == TF.conv2d(x[0], w, b, **kw).shape
    assert_close(y, TF.conv2d(x[0], w, b, **kw))
    assert_close(F.conv1d(x[0, :, 0], w[:, :, 0], b), TF.conv1d(x[0, :, 0], w[:, :, 0], b))


def test_batch_size_zero_forward_and_backward():
    x = torch.randn(0, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, padding=1)
    assert y.shape == (0, 4, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert_close(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("layout", ["channels_last", "transposed_view", "sliced"])
def test_non_contiguous_and_channels_last_inputs(layout):
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    elif layout == "transposed_view":
        x = x.transpose(2, 3)
    else:
        x = x[:, :, ::2, 1:]
    assert not x.is_contiguous() or layout == "channels_last"
    assert_close(F.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1))


@pytest.mark.parametrize("algo", ALGOS)
def test_float32_matches_float64_reference(algo):
    x, w, b, kw = _make((2, 16, 12, 12, 8, (3, 3), dict(padding=1)), dtype=torch.float64, requires_grad=False)
    reason = _refusal(algo, x.float(), w.float(), kw)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    y = F.conv2d(x.float(), w.float(), b.float(), algo=algo, **kw)
    assert y.dtype == torch.float32
    assert_close(y, TF.conv2d(x, w, b, **kw).float(), algo=algo)


def test_weight_gradient_skipped_for_frozen_weight(monkeypatch):
    """Transfer learning: no weight-gradient op runs when the weight does not require grad."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    calls = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    y = F.conv2d(x, w)
    with Spy():
        y.sum().backward()
    assert any("conv2d_grad_input" in c for c in calls)
    assert not any("conv2d_grad_weight" in c for c in calls)


def test_torch_compile_fullgraph_matches_eager():
    """The default (inductor) backend, forward and backward, conv and pooling ops in one graph."""
    model = torch.nn.Sequential(
        fastconv.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), fastconv.nn.MaxPool2d(2),
        fastconv.nn.Conv2d(8, 4, 3, stride=2, groups=4), torch.nn.Flatten(),
    ).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(x)
    compiled_out = compiled(x)
    assert_close(compiled_out, eager_out)
    compiled_out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert_close(g, p.grad)


def test_flop_counter_mode_counts_fastconv_ops_like_torch():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8, 10, 10)
    w = torch.randn(16, 8, 3, 3)
    with FlopCounterMode(display=False) as ours:
        F.conv2d(x, w, padding=1)
    with FlopCounterMode(display=False) as theirs:
        TF.conv2d(x, w, padding=1)
    assert ours.get_total_flops() == theirs.get_total_flops() == 2 * 2 * 16 * 100 * 8 * 9


def test_algorithms_lists_what_each_supports():
    rows = fastconv.algorithms()
    names = {r["name"] for r in rows}
    assert {"direct", "im2col"} <= names
    for r in rows:
        assert r["summary"] and r["targets"]
    assert registry.names()[0] == "auto"


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
                                "depthwise_separable_conv2d"])
def test_outputs_accept_in_place_ops_under_autograd(op):
    """nn.ReLU(inplace=True) follows convs in every torchvision model: op outputs must not be views."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    args = {"conv2d": (torch.randn(3, 2, 3, 3, dtype=torch.float64),),
            "conv_transpose2d": (torch.randn(2, 3, 3, 3, dtype=torch.float64),),
            "max_pool2d": (2,), "avg_pool2d": (2,), "adaptive_avg_pool2d": (1,),
            "depthwise_separable_conv2d": (torch.randn(2, 1, 3, 3, dtype=torch.float64),
                                           torch.randn(3, 2, 1, 1, dtype=torch.float64))}[op]
    y = getattr(F, op)(x, *args)
    expected = getattr(TF, op)(x, *args) if op != "depthwise_separable_conv2d" else None
    torch.relu_(y)
    y.sum().backward()
    if expected is not None:
        assert_close(y, expected.relu())

"""A conv layer's repeated inference calls (``fastconv.ops.repeat_call``): the planned call is taken where it
applies, gives torch's results, and every call it does not take gets the full path's results and layouts."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.ops import repeat_call
from helpers import assert_close


@pytest.fixture
def taken(monkeypatch):
    """Counts the calls that the planned call answered (not None)."""
    counts = []
    real = repeat_call.ConvRepeatCall.__call__

    def counting(self, *args):
        out = real(self, *args)
        if out is not None:
            counts.append(1)
        return out

    monkeypatch.setattr(repeat_call.ConvRepeatCall, "__call__", counting)
    return counts


LAYERS = [  # (in, out, kernel, stride, padding, groups, bias, input shape)
    (16, 32, 1, 1, 0, 1, False, (1, 16, 6, 6)),    # 1x1 at batch 1: the GEMM route
    (24, 8, 1, 1, 0, 1, True, (3, 24, 1, 1)),      # squeeze-and-excitation shape
    (8, 8, 3, 1, 1, 8, False, (2, 8, 7, 7)),       # depthwise
    (4, 6, 3, 2, 1, 1, True, (2, 4, 9, 9)),        # dense strided 3x3
    (8, 12, 1, 2, 0, 1, False, (1, 8, 9, 7)),      # strided 1x1 (a ResNet/RegNet projection), odd planes
    (8, 12, 1, 2, 0, 1, True, (3, 8, 8, 8)),       # ... at batch 3, with a bias
]


@pytest.mark.parametrize("layer", LAYERS, ids=["1x1", "se", "depthwise", "3x3s2", "1x1s2", "1x1s2-batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_inference_calls_take_the_planned_call_and_match_torch(layer, dtype, taken):
    cin, cout, k, s, p, g, bias, shape = layer
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, bias=bias).to(dtype).eval()
    conv = fastconv.convert(torch.nn.Sequential(copy.deepcopy(ref)))[0].eval()
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(shape, dtype=dtype)
            assert_close(conv(x), ref(x), what=f"call {i}")
    assert conv._repeat_call is not None
    assert len(taken) == 2, "the second and third calls should have been the planned call's"


def test_calls_the_planned_call_does_not_take_get_the_full_paths_results(taken):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 12, 3, padding=1).eval()
    conv = fastconv.convert(torch.nn.Sequential(copy.deepcopy(ref)))[0].eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        conv(x)
        # another shape, a channels_last input (its result stays channels_last), a strided view, a NaN
        for y in (torch.randn(3, 8, 5, 7), x.to(memory_format=torch.channels_last), x[:, :, ::2, ::2],
                  torch.full_like(x, float("nan"))):
            got, want = conv(y), ref(y)
            assert_close(got, want, what="fallback call", equal_nan=True)
            assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
                memory_format=torch.channels_last)
        # a changed argument: the layer's stride now 2
        conv.stride = ref.stride = (2, 2)
        assert_close(conv(x), ref(x), what="after changing the stride")
        conv.algo = "direct"
        assert_close(conv(x), ref(x), what="after naming an algorithm")
    # bfloat16 (computed in float32 by the full path) and a training call
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        assert copy.deepcopy(conv).to(torch.bfloat16)(xb).dtype == torch.bfloat16
    xg = x.clone().requires_grad_(True)
    conv(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref(xr).sum().backward()
    assert_close(xg.grad, xr.grad, what="input gradient of a training call")
    assert_close(conv.weight.grad, ref.weight.grad, what="weight gradient of a training call")


def test_a_layer_that_planned_calls_pickles_and_copies():
    conv = fastconv.nn.Conv2d(4, 4, 1).eval()
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        want = conv(x)
        conv(x)
    assert conv._repeat_call is not None
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert other._repeat_call is None
        with torch.no_grad():
            assert_close(other(x), want, what="copied layer")


# ---- training calls: the planned call with the op's autograd node ----------------------------------------------
@pytest.fixture
def trained(monkeypatch):
    """Counts the training calls the planned call answered, and the gradient passes its routes answered."""
    counts = {"forward": 0, "grad_input": 0, "grad_weight": 0}
    real_training = repeat_call.ConvRepeatCall.training
    real_pass = repeat_call._GradientRoute.__call__

    def training(self, *args):
        out = real_training(self, *args)
        counts["forward"] += out is not None
        return out

    def gradient_pass(self, *args):
        out = real_pass(self, *args)
        counts[self.pass_] += out is not None
        return out

    monkeypatch.setattr(repeat_call.ConvRepeatCall, "training", training)
    monkeypatch.setattr(repeat_call._GradientRoute, "__call__", gradient_pass)
    return counts


def _train_pair(layer, dtype):
    cin, cout, k, s, p, g, bias, shape = layer
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, bias=bias).to(dtype)
    return ref, fastconv.convert(torch.nn.Sequential(copy.deepcopy(ref)))[0], shape


def _gradients(module, x, grad_out):
    for p in module.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(grad_out)
    return out, x.grad, module.weight.grad, None if module.bias is None else module.bias.grad


@pytest.mark.parametrize("layer", LAYERS, ids=["1x1", "se", "depthwise", "3x3s2", "1x1s2", "1x1s2-batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_training_calls_take_the_planned_call_and_match_torch(layer, dtype, trained):
    ref, conv, shape = _train_pair(layer, dtype)
    for i in range(3):
        x = torch.randn(shape, dtype=dtype)
        grad_out = torch.randn_like(ref(x))
        got, want = _gradients(conv, x, grad_out), _gradients(ref, x, grad_out)
        for name, a, b in zip(("output", "input gradient", "weight gradient", "bias gradient"), got, want):
            assert (a is None) == (b is None), f"call {i}: {name}"
            if b is not None:
                assert_close(a, b, what=f"call {i}: {name}")
    assert conv._repeat_call is not None
    assert trained == {"forward": 2, "grad_input": 2, "grad_weight": 2}, \
        "the second and third calls and their backwards should have been the planned call's"


def test_planned_training_calls_pass_gradcheck_and_gradgradcheck(trained):
    """float64 through the layer's planned call; the double backward (create_graph) records the registered
    gradient ops instead of the routes, and is torch's second derivative too."""
    conv = fastconv.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    conv(x).sum().backward()  # the full path's call: plans the next ones
    assert conv._repeat_call is not None

    def layer(x, w, b):
        return conv._conv_forward(x, w, b)

    w = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x, w, b))
    assert trained["forward"] > 0 and trained["grad_input"] > 0 and trained["grad_weight"] > 0
    assert torch.autograd.gradgradcheck(layer, (x, w, b))


def test_planned_training_calls_compute_only_the_gradients_asked_for(trained):
    ref, conv, shape = _train_pair(LAYERS[3], torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    for module in (conv, ref):
        module(x.clone().requires_grad_(True)).sum().backward()  # plans conv's next calls
    # a frozen layer inside a network: only the input gradient
    for module in (conv, ref):
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
    grad_out = torch.randn_like(ref(x))
    got, want = _gradients(conv, x, grad_out), _gradients(ref, x, grad_out)
    assert got[2] is None and got[3] is None
    assert_close(got[1], want[1], what="input gradient of a frozen layer")
    assert trained["grad_weight"] == 0 and trained["grad_input"] == 1
    # a first layer: weight and bias gradients, none for the input
    for module in (conv, ref):
        module.weight.requires_grad_(True)
        module.bias.requires_grad_(True)
        module.weight.grad = module.bias.grad = None
        module(x).backward(grad_out)
    assert_close(conv.weight.grad, ref.weight.grad, what="weight gradient of a first layer")
    assert_close(conv.bias.grad, ref.bias.grad, what="bias gradient of a first layer")
    assert trained["grad_input"] == 1 and trained["grad_weight"] == 1


def test_planned_training_calls_leave_other_backwards_to_the_op(trained):
    """A strided output gradient (``sum()``'s expanded ones), ``create_graph=True`` and a named algorithm: the
    results are torch's; only the plain backward on a contiguous gradient runs the layer's routes."""
    ref, conv, shape = _train_pair(LAYERS[0], torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    for module in (conv, ref):
        module(x.clone().requires_grad_(True)).sum().backward()
    trained.update(forward=0, grad_input=0, grad_weight=0)
    grads = []
    for module in (conv, ref):
        xg = x.clone().requires_grad_(True)
        module(xg).sum().backward()  # the gradient is expand()ed ones: not contiguous
        grads.append(xg.grad)
    assert_close(grads[0], grads[1], what="input gradient of sum()")
    assert trained == {"forward": 1, "grad_input": 0, "grad_weight": 0}
    second = []
    for module in (conv, ref):
        xg = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(module(xg).square().sum(), xg, create_graph=True)
        if module is conv:  # the backward that records a graph went through the registered gradient ops
            assert trained["grad_input"] == 0 and trained["grad_weight"] == 0
        (ggx,) = torch.autograd.grad(gx.square().sum(), xg)
        second.append((gx, ggx))
    assert_close(second[0][0], second[1][0], what="input gradient under create_graph")
    assert_close(second[0][1], second[1][1], what="second derivative")
    trained.update(grad_input=0, grad_weight=0)
    conv.algo = "im2col"
    for _ in range(2):
        got, want = _gradients(conv, x, torch.ones_like(ref(x))), _gradients(ref, x, torch.ones_like(ref(x)))
        for a, b in zip(got[:3], want[:3]):
            assert_close(a, b, algo="im2col", what="named algorithm")
    assert trained["grad_input"] == 1 and trained["grad_weight"] == 1

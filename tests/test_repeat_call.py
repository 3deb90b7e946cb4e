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

"""ONNX export of converted models: standard Conv/ConvTranspose/pooling nodes, values equal to torch's.

Needs ``onnx`` and ``onnxscript`` (the exporter's own dependency). Values are checked with onnxruntime where it
is installed, else with onnx's reference evaluator (pure Python) -- except MaxPool's indices output, which that
evaluator numbers differently from the ONNX spec and onnxruntime (torch's own export of aten's
max_pool2d_with_indices disagrees with it the same way), so the test of indices needs onnxruntime.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastconv
import fastconv.functional as F
from helpers import assert_close

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx onnxscript)")
pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript (pip install onnxscript)")

from onnx.reference import ReferenceEvaluator  # noqa: E402

from fastconv.ops import onnx as fonnx  # noqa: E402


def _export(model, x, **kwargs):
    program = fonnx.export(model, (x,), verbose=False, **kwargs)
    return program.model_proto


def _run(proto, x, *, runtime: bool = False):
    feed = {proto.graph.input[0].name: x.numpy()}
    try:
        import onnxruntime
    except ImportError:
        if runtime:
            pytest.skip("MaxPool indices need onnxruntime to check (onnx's reference evaluator numbers them per "
                        "plane, unlike the ONNX spec): pip install onnxruntime")
        return [torch.from_numpy(o) for o in ReferenceEvaluator(proto).run(None, feed)]
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_converted_cnn_exports_standard_nodes_with_torch_values():
    torch_model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.AvgPool2d(2, ceil_mode=True),
        torch.nn.Conv2d(4, 4, 4, padding="same", groups=2), torch.nn.AdaptiveAvgPool2d(1)).eval()
    model = fastconv.convert(copy.deepcopy(torch_model))
    x = torch.randn(2, 3, 16, 16)
    proto = _export(model, x)
    ops = _ops(proto)
    assert not [n for n in proto.graph.node if n.domain.startswith("fastconv")], ops
    for name in ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool"):
        assert name in ops, f"{name} missing from {ops}"
    with torch.no_grad():
        want = torch_model(x)
    assert_close(_run(proto, x)[0], want, what="exported model")


class _PoolZoo(torch.nn.Module):
    """Max pooling with indices, unpooling, min pooling, adaptive max pooling, 1-D and 3-D convs."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3 = torch.nn.Parameter(torch.randn(3, 3, 3)), torch.nn.Parameter(torch.randn(2, 3, 1, 3, 3))
        self.dw, self.pw = torch.nn.Parameter(torch.randn(3, 1, 3, 3)), torch.nn.Parameter(torch.randn(4, 3, 1, 1))

    def forward(self, x):
        v, i = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
        u = F.max_unpool2d(v, i, 3, stride=2, padding=1, output_size=x.shape[2:])
        m = F.min_pool2d(x, 2)
        a = F.adaptive_max_pool2d(x, (4, 2))
        c1 = F.conv1d(x.flatten(2), self.w1, stride=3)
        c3 = F.conv3d(x.unsqueeze(2), self.w3, padding=(0, 1, 1), dilation=(1, 2, 2))
        s = F.depthwise_separable_conv2d(x, self.dw, self.pw, padding="same")
        d = F.avg_pool2d(x, 2, divisor_override=3)
        return u, i, m, a, c1, c3, s, d


def test_indices_unpooling_min_pool_adaptive_max_and_other_ranks():
    model = _PoolZoo().eval()
    x = torch.randn(2, 3, 8, 8)
    proto = _export(model, x)
    assert not [n for n in proto.graph.node if n.domain.startswith("fastconv")], _ops(proto)
    with torch.no_grad():
        want = model(x)
    got = _run(proto, x, runtime=True)
    names = ["max_unpool2d", "max_pool2d indices", "min_pool2d", "adaptive_max_pool2d", "conv1d", "conv3d",
             "depthwise_separable_conv2d", "avg_pool2d divisor_override"]
    for g, w, name in zip(got, want, names):
        if w.is_floating_point():
            assert_close(g, w, what=name)
        else:
            assert g.dtype == w.dtype and torch.equal(g, w), name


def test_unexportable_adaptive_pooling_is_refused_by_name():
    model = fastconv.convert(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(3)))
    with pytest.raises(Exception, match=r"fastconv.adaptive_avg_pool: ONNX has no adaptive pooling"):
        _export(model, torch.randn(1, 2, 7, 7))


def test_register_makes_plain_torch_onnx_export_work():
    assert fonnx.register()
    model = fastconv.convert(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.MaxPool2d(2))).eval()
    x = torch.randn(1, 2, 8, 8)
    proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    assert _ops(proto) == ["Conv", "MaxPool"]
    with torch.no_grad():
        assert_close(_run(proto, x)[0], model(x), what="plain export after register()")


def test_optimized_model_exports_conv_then_relu_and_clip():
    """fastconv.optimize's fused convs (fastconv::conv2d_bias_act) export as Conv + Relu / Clip(0, 6)."""
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                      torch.nn.Conv2d(8, 4, 3, stride=2), torch.nn.ReLU6()).eval()
    torch_model[1].running_mean.uniform_(-1, 1)
    torch_model[3].weight.data.mul_(20)  # some outputs above 6: the Clip is exercised
    fast = fastconv.optimize(fastconv.convert(copy.deepcopy(torch_model)))
    assert fast.fused_activations == 2
    x = torch.randn(2, 3, 12, 12) * 4
    proto = _export(fast, x)
    ops = _ops(proto)
    assert not [n for n in proto.graph.node if n.domain.startswith("fastconv")], ops
    assert ops.count("Conv") == 2 and "Relu" in ops and "Clip" in ops, ops
    with torch.no_grad():
        want = torch_model(x)
    assert bool((want == 6).any())
    assert_close(_run(proto, x)[0], want, what="exported optimized model")

"""One implementation table for every op family: the transposed and separable ops' decisions come from
``fastconv.registry`` (``decide``/``choose`` with ``family=``), the ops run what it decides, and the FLOP
counter reports the same decision instead of re-deriving it."""
from __future__ import annotations

import pytest
import torch

import fastconv
import fastconv.functional as F
from fastconv import autotune, backends, flops, registry
from fastconv.ops import separable as separable_ops
from fastconv.ops import transposed as transposed_ops

NUMBA = backends.current() == "numba"
needs_numba = pytest.mark.skipif(not NUMBA, reason="patch_gemm and the fused separable path run on numba only")


def _transposed(kernel, stride, padding=0, target="numba", batch=2, c_in=4, c_out=3, size=(5, 6)):
    """(input, weight, adjoint geometry) of a small conv_transpose2d, built as the op builds it."""
    x = torch.randn(batch, c_in, *size, dtype=torch.float64)
    w = torch.randn(c_in, c_out, kernel, kernel, dtype=torch.float64)
    out = [(i - 1) * stride - 2 * padding + kernel for i in size]
    g = transposed_ops.geometry(2, x.shape, w.shape, out, 1, [stride] * 2, [padding] * 2, [1, 1], x.dtype, target)
    return x, w, g


def _decide(algo, g, family="conv_transpose"):
    op = "fastconv.conv_transpose2d" if family == "conv_transpose" else "fastconv.depthwise_separable_conv2d"
    with autotune.enabled(False):  # the heuristic's answer: no measurement can change it under the test
        return registry.decide(algo, g, "forward", op, family)


@needs_numba
def test_transposed_decision_is_patch_gemm_for_2x2_stride_2():
    x, w, g = _transposed(2, 2)
    d = _decide("auto", g)
    assert d.name == "patch_gemm" and d.family == "conv_transpose" and d.algorithm.adjoint is None
    assert "patch_gemm" in d.reason
    # its workspace is the GEMM result before the scatter: (C_out * k*k) x (N * H * W) float64 elements
    assert d.workspace_bytes == 3 * 4 * 2 * 5 * 6 * 8
    with autotune.enabled(False):
        y = F.conv_transpose2d(x, w, stride=2)
    # the op runs exactly what the decision names
    expected = d.algorithm.run(x[:, :, None], w[:, :, None], None, g)
    assert torch.equal(y, expected.reshape(y.shape))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 1, 0), (2, 2, 1), (4, 2, 1)])
def test_transposed_decision_is_the_adjoint_conv_otherwise(kernel, stride, padding):
    x, w, g = _transposed(kernel, stride, padding, target=backends.current())
    d = _decide("auto", g)
    with autotune.enabled(False):
        conv = registry.decide("auto", g, "grad_input")
    assert d.name == conv.name and d.algorithm.adjoint is registry.choose(conv.name, g, "grad_input")
    assert (d.reason, d.workspace_bytes) == (conv.reason, conv.workspace_bytes)
    with autotune.enabled(False):
        y = F.conv_transpose2d(x, w, stride=stride, padding=padding)
    assert torch.equal(y, d.algorithm.run(x[:, :, None], w[:, :, None], None, g).reshape(y.shape))


def test_transposed_decision_off_numba_never_names_patch_gemm():
    _, _, g = _transposed(2, 2, target="cuda-emu")
    d = _decide("auto", g)
    assert d.name != "patch_gemm" and d.algorithm.adjoint is not None
    with pytest.raises(ValueError, match=r"fastconv.conv_transpose2d: algo='patch_gemm' cannot run this transposed "
                                         r"convolution \(runs on numba, not cuda-emu\)\. Algorithms that can: auto, "):
        _decide("patch_gemm", g)


def test_transposed_named_algorithms_and_errors_name_the_op():
    _, _, g = _transposed(3, 2, 1)
    d = _decide("direct", g)
    assert d.name == "direct" and d.reason == "requested algo='direct'" and d.algorithm.adjoint.name == "direct"
    with pytest.raises(ValueError, match=r"fastconv.conv_transpose2d: unknown algo 'nope'; expected one of auto, "
                                         r".*im2col.*, patch_gemm"):
        _decide("nope", g)
    if NUMBA:
        with pytest.raises(ValueError, match=r"fastconv.conv_transpose2d: algo='patch_gemm' cannot run this "
                                             r"transposed convolution \(needs kernel == stride"):
            _decide("patch_gemm", g)
        with pytest.raises(ValueError, match=r"fastconv.conv_transpose2d: algo='winograd4' cannot run this "
                                             r"convolution .*adjoint convolution"):
            _decide("winograd4", g)


def _separable(target):
    return separable_ops.geometry((2, 4, 8, 8), (8, 1, 3, 3), (6, 8, 1, 1), (8, 8), [1, 1], [1, 1], [1, 1],
                                  [1, 1], torch.float64, target)


@pytest.mark.parametrize("target,expected", [("numba", "fused"), ("cuda-emu", "unfused"), ("cuda", "unfused")])
def test_separable_decision(target, expected):
    d = _decide("auto", _separable(target), "separable")
    assert d.name == expected and d.family == "separable" and d.reason.startswith(f"auto: {expected} ")
    assert _decide("unfused", _separable(target), "separable").reason == "requested algo='unfused'"


def test_separable_refusal_and_unknown_name_the_op():
    with pytest.raises(ValueError, match=r"fastconv.depthwise_separable_conv2d: algo='fused' cannot run this "
                                         r"depthwise-separable convolution \(runs on numba, not cuda\)\. "
                                         r"Algorithms that can: auto, unfused"):
        _decide("fused", _separable("cuda"), "separable")
    with pytest.raises(ValueError, match=r"fastconv.depthwise_separable_conv2d: unknown algo 'im2col'; expected one "
                                         r"of auto, fused, unfused"):
        _decide("im2col", _separable("numba"), "separable")


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1)])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counter_agrees_with_the_transposed_decision(kernel, stride, padding, device):
    layer = fastconv.nn.ConvTranspose2d(4, 3, kernel, stride=stride, padding=padding).to(device)
    x = torch.randn(2, 4, 5, 6, device=device)
    with autotune.enabled(False):
        (row,) = flops.count(layer, x).rows
    out = [(i - 1) * stride - 2 * padding + kernel for i in (5, 6)]
    g = transposed_ops.geometry(2, x.shape, layer.weight.shape, out, 1, [stride] * 2, [padding] * 2, [1, 1],
                                torch.float32, backends.current())
    d = _decide("auto", g)
    assert (row.algorithm, row.reason, row.workspace_bytes) == (d.name, d.reason, d.workspace_bytes)
    assert row.macs == 2 * 4 * 5 * 6 * 3 * kernel * kernel
    if NUMBA:
        assert row.algorithm == ("patch_gemm" if kernel == stride and padding == 0 else d.algorithm.adjoint.name)


@pytest.mark.parametrize("algo", ["auto", "unfused"])
def test_counter_agrees_with_the_separable_decision(algo):
    layer = fastconv.nn.DepthwiseSeparableConv2d(4, 6, 3, padding=1, depth_multiplier=2, algo=algo)
    (row,) = flops.count(layer, torch.randn(2, 4, 8, 8)).rows
    d = _decide(algo, _separable(backends.current()), "separable")
    assert (row.algorithm, row.reason, row.workspace_bytes) == (d.name, d.reason, d.workspace_bytes)
    assert row.macs == _separable("numba").macs == 2 * 8 * 64 * 9 + 2 * 6 * 64 * 8


def test_algorithms_lists_every_family():
    rows = fastconv.algorithms()
    by_family = {}
    for row in rows:
        assert set(row) == {"name", "targets", "summary", "dtypes", "layouts", "family"}
        by_family.setdefault(row["family"], []).append(row["name"])
    assert set(by_family) == set(registry.FAMILIES)
    assert by_family["conv_transpose"] == ["patch_gemm"] and by_family["separable"] == ["fused", "unfused"]
    # conv rows first, sorted as before; the other families' names are only accepted by their own ops
    assert [r["family"] for r in rows[:len(by_family["conv"])]] == ["conv"] * len(by_family["conv"])
    assert "patch_gemm" not in registry.names() and "fused" not in registry.names()
    assert registry.names("conv_transpose") == registry.names() + ["patch_gemm"]
    assert registry.names("separable") == ["auto", "fused", "unfused"]

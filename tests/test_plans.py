"""The per-call shortcuts of the op hot path give exactly what the full path gives.

Every conv and pooling op keeps a plan per call signature (validation once), and the functional layer a memo of
normalised arguments. These tests change one thing a plan or memo depends on at a time (dtype, backend, a
registered algorithm, pooling arguments, argument types) and check the result against torch in float64, or the
error the full path raises. The environment is read through :func:`fastconv.backends.getenv`, checked here
against ``os.environ``.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import autotune, backends, registry
from fastconv.ops import conv as conv_ops
from fastconv.ops import pool as pool_ops
from fastconv.spec import CONTIGUOUS_ROUTE
from helpers import assert_close

D = torch.float64


def test_conv_plan_follows_the_dtype():
    x, w = torch.randn(2, 3, 7, 7, dtype=D), torch.randn(4, 3, 3, 3, dtype=D)
    for dtype in (D, torch.float32, D):
        xd, wd = x.to(dtype), w.to(dtype)
        got = F.conv2d(xd, wd, padding=1, algo="im2col")
        assert got.dtype == dtype
        assert_close(got, TF.conv2d(xd, wd, padding=1), algo="im2col", what=str(dtype))


def test_conv_plan_follows_a_new_registration(monkeypatch):
    # Registering an algorithm bumps the registry's generation: a cached plan must pick up the new entry.
    x, w = torch.randn(1, 2, 5, 5, dtype=D), torch.randn(2, 2, 3, 3, dtype=D)
    F.conv2d(x, w, algo="direct")  # plan made with the real algorithm
    real = registry._REGISTRY[("direct", "numba")]
    calls = []

    def counting(x5, w5, bias, g):
        calls.append(g)
        return real.forward(x5, w5, bias, g)

    try:
        registry.register(dataclasses.replace(real, forward=counting))
        assert_close(F.conv2d(x, w, algo="direct"), TF.conv2d(x, w), algo="direct")
        assert len(calls) == 1
    finally:
        registry.register(real)
    F.conv2d(x, w, algo="direct")
    assert len(calls) == 1  # the real algorithm again


def test_conv_plan_follows_the_backend_switch(monkeypatch):
    # The plan key holds the target: the same call under FASTCONV_BACKEND=cuda-emu must not reuse the numba plan.
    seen = []
    real = registry.choose

    def spy(algo, geom, pass_, op="conv", family="conv"):
        seen.append(geom.target)
        return real(algo, geom, pass_, op, family)

    x, w = torch.randn(1, 2, 5, 5, dtype=D), torch.randn(2, 2, 3, 3, dtype=D)
    F.conv2d(x, w, padding=1, algo="direct")
    monkeypatch.setattr(registry, "choose", spy)
    monkeypatch.setenv("FASTCONV_BACKEND", "cuda-emu")
    assert backends.current() == "cuda-emu"
    with pytest.raises(ValueError, match="algo='direct'"):  # direct is a Numba algorithm: refused on cuda-emu
        F.conv2d(x, w, padding=1, algo="direct")
    assert seen == ["cuda-emu"]
    monkeypatch.delenv("FASTCONV_BACKEND")
    assert_close(F.conv2d(x, w, padding=1, algo="direct"), TF.conv2d(x, w, padding=1), algo="direct")


def test_conv_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(conv_ops, "PLANS_MAX", 2)
    conv_ops._PLANS.clear()
    w = torch.randn(2, 2, 1, 1, dtype=D)
    for size in (3, 4, 5, 6):
        x = torch.randn(1, 2, size, size, dtype=D)
        assert_close(F.conv2d(x, w, algo="im2col"), TF.conv2d(x, w), algo="im2col")
        assert len(conv_ops._PLANS) <= 2


@pytest.mark.parametrize("value", [1.0, True, (1, 1.0), (True, 1)])
def test_functional_memo_does_not_admit_floats_or_bools(value):
    # 1 == 1.0 == True as dict keys: a memo made by stride=1 must not answer for these, which the checks refuse
    x, w = torch.randn(1, 2, 5, 5, dtype=D), torch.randn(2, 2, 3, 3, dtype=D)
    F.conv2d(x, w, stride=1)
    with pytest.raises(TypeError, match="stride"):
        F.conv2d(x, w, stride=value)
    F.max_pool2d(x, 2, stride=1)
    with pytest.raises(TypeError, match="stride"):
        F.max_pool2d(x, 2, stride=value)
    F.avg_pool2d(x, 2, stride=1)
    with pytest.raises(TypeError, match="stride"):
        F.avg_pool2d(x, 2, stride=value)


def test_pool_plans_follow_every_argument():
    x = torch.randn(2, 3, 9, 8, dtype=D)
    for kernel, stride, padding, dilation, ceil in [(3, 2, 1, 1, False), (3, 2, 1, 1, True), (3, 2, 0, 1, False),
                                                    (3, 1, 1, 2, False), (2, None, 0, 1, False), (3, 2, 1, 1, False)]:
        what = f"k={kernel} s={stride} p={padding} d={dilation} ceil={ceil}"
        got, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil, return_indices=True)
        want, widx = TF.max_pool2d(x, kernel, stride, padding, dilation, ceil, return_indices=True)
        assert_close(got, want, what=what)
        assert torch.equal(idx, widx), what
        mins = F.min_pool2d(x, kernel, stride, padding, dilation, ceil)  # same plan key but minimum=True
        assert_close(mins, -TF.max_pool2d(-x, kernel, stride, padding, dilation, ceil), what="min " + what)
        assert_close(F.avg_pool2d(x, kernel, stride, padding, ceil), TF.avg_pool2d(x, kernel, stride, padding, ceil),
                     what="avg " + what)
    for size in (1, 2, (3, 2), 1):
        assert_close(F.adaptive_avg_pool2d(x, size), TF.adaptive_avg_pool2d(x, size), what=f"adaptive {size}")


def test_pool_plans_follow_dtype_and_shape():
    for dtype, shape in [(D, (1, 2, 6, 6)), (torch.float32, (1, 2, 6, 6)), (torch.int32, (1, 2, 6, 6)),
                         (D, (2, 2, 6, 6)), (D, (1, 2, 7, 6))]:
        x = (torch.randn(shape, dtype=D) * 10).to(dtype)
        got = F.max_pool2d(x, 3, 2, 1)
        assert got.dtype == dtype and got.shape == TF.max_pool2d(x.double(), 3, 2, 1).shape
        # integers and the max of floats are exact
        assert torch.equal(got.double(), TF.max_pool2d(x.double(), 3, 2, 1)), (dtype, shape)


def test_pool_gradients_through_plans():
    x = torch.randn(2, 3, 8, 8, dtype=D, requires_grad=True)
    for _ in range(2):  # the second round runs from the plans
        gx = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1).sum() + F.adaptive_avg_pool2d(x, 1).pow(2).sum()
                                 + F.avg_pool2d(x, 2).pow(2).sum(), x)[0]
        want = torch.autograd.grad(TF.max_pool2d(x, 3, 2, 1).sum() + TF.adaptive_avg_pool2d(x, 1).pow(2).sum()
                                   + TF.avg_pool2d(x, 2).pow(2).sum(), x)[0]
        assert_close(gx, want)


def test_pool_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(pool_ops, "PLANS_MAX", 2)
    pool_ops._PLANS.clear()
    for size in (3, 4, 5, 6):
        x = torch.randn(1, 2, size, size, dtype=D)
        assert_close(F.adaptive_avg_pool2d(x, 1), TF.adaptive_avg_pool2d(x, 1))
        assert len(pool_ops._PLANS) <= 2


def test_getenv_reads_the_environment_now(monkeypatch):
    name = "FASTCONV_TEST_PLANS_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert backends.getenv(name) == "" and backends.getenv(name, None) is None
    for value in ("a", "b", " spaced ", "ünïcode", ""):
        monkeypatch.setenv(name, value)
        assert backends.getenv(name) == os.environ[name] == value
    monkeypatch.delenv(name)
    assert backends.getenv(name, "default") == "default"
    # os.environ replaced by a plain mapping (some test set-ups do): read from it
    monkeypatch.setattr(os, "environ", {name: "replaced"})
    assert backends.getenv(name) == "replaced"


def test_switches_read_the_environment_at_each_call(monkeypatch):
    monkeypatch.setattr(autotune, "_override", None)
    monkeypatch.setattr(autotune, "_deterministic", None)
    for value, on in (("0", False), ("", True), ("1", True), ("off", False), (" No ", False), ("yes", True)):
        monkeypatch.setenv("FASTCONV_AUTOTUNE", value)
        assert autotune.enabled() is on, value
    for value, on in (("", False), ("0", False), ("1", True), ("true", True), ("off", False)):
        monkeypatch.setenv("FASTCONV_DETERMINISTIC", value)
        assert autotune.deterministic() is on, value
    monkeypatch.setenv("FASTCONV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTCONV_BACKEND"):
        backends.current()
    monkeypatch.setenv("FASTCONV_BACKEND", " ")
    assert backends.current() == "numba"


def test_autograd_kernel_fills_dropped_defaults():
    # the dispatcher drops trailing arguments equal to their defaults; setup_context must still get all of them
    x = torch.randn(1, 2, 5, 5, dtype=D, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=D, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: torch.ops.fastconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], [1, 1], 1,
                                                                     "direct"), (x, w))
    assert fastconv.ops.func._INSTALLED  # the kernel under test is the one fastconv installs


@pytest.mark.parametrize("pass_", ["forward", "grad_input", "grad_weight"])
def test_contiguous_operands_take_the_contiguous_route_and_others_the_tensor_pass(pass_):
    # The ops take an algorithm's contiguous route for contiguous operands (no 5-D views on the way) and its tensor pass
    # for any other layout; both give torch's result, in the layout torch gives.
    real = registry._REGISTRY[("depthwise", backends.current())]
    seen = []
    tensor_pass = getattr(real, pass_)
    select = getattr(tensor_pass, CONTIGUOUS_ROUTE)

    def counting_tensor_pass(*args):
        seen.append("tensor")
        return tensor_pass(*args)

    def counting_select(g):
        route = select(g)
        return lambda *args: seen.append("route") or route(*args)

    setattr(counting_tensor_pass, CONTIGUOUS_ROUTE, counting_select)
    x = torch.randn(2, 6, 9, 9, dtype=D, requires_grad=True)
    w = torch.randn(6, 1, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(6, dtype=D, requires_grad=True)
    try:
        registry.register(dataclasses.replace(real, **{pass_: counting_tensor_pass}))
        for layout, route in ((torch.contiguous_format, "route"), (torch.channels_last, "tensor")):
            xl = x.detach().to(memory_format=layout).requires_grad_()
            got = F.conv2d(xl, w, b, padding=1, groups=6, algo="depthwise")
            want = TF.conv2d(xl, w, b, padding=1, groups=6)
            assert got.is_contiguous(memory_format=layout)
            assert_close(got, want, algo="depthwise", what=f"{layout} forward")
            gy = torch.randn_like(want)
            got_grads = torch.autograd.grad(got, (xl, w), gy)
            want_grads = torch.autograd.grad(want, (xl, w), gy)
            for g, t, name in zip(got_grads, want_grads, ("input", "weight")):
                assert_close(g, t, algo="depthwise", what=f"{layout} {name} gradient")
            assert seen and seen[-1] == route, (layout, seen)
            seen.clear()
    finally:
        registry.register(real)

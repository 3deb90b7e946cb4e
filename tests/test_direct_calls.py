"""Direct calls (:mod:`fastconv.ops.eager`): inference calls on plain tensors run the op's implementation
without torch's dispatcher; every call that records a gradient, is traced, transformed, cast or watched keeps
the dispatcher.

Each test counts which entry a call took (a spy on both) and checks the result against the other path and
against torch, so a gate that lets a watched call through, or a direct path that computes something else,
fails here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.utils.flop_counter import FlopCounterMode

import fastconv
import fastconv.functional as F
from fastconv.ops import conv as conv_ops
from fastconv.ops import eager
from fastconv.ops import fused as fused_ops
from fastconv.ops import pool as pool_ops
from helpers import assert_close


class Spy:
    """Counts the calls of the three entries of the 2-D conv op (direct, direct with a gradient, dispatcher) and
    the direct calls of its gradient ops' implementations (what a plain backward of a conv node runs)."""

    def __init__(self, monkeypatch):
        self.direct = self.grad_direct = self.dispatched = 0
        self.backward_direct = []
        impl, grad_entry, entry = conv_ops.FORWARD_DIRECT[2], conv_ops.FORWARD_GRAD_DIRECT[2], conv_ops.FORWARD[2]

        def direct(*args):
            self.direct += 1
            return impl(*args)

        def grad_direct(*args):
            self.grad_direct += 1
            return grad_entry(*args)

        def dispatched(*args):
            self.dispatched += 1
            return entry(*args)

        monkeypatch.setitem(conv_ops.FORWARD_DIRECT, 2, direct)
        monkeypatch.setitem(conv_ops.FORWARD_GRAD_DIRECT, 2, grad_direct)
        monkeypatch.setitem(conv_ops.FORWARD, 2, dispatched)
        for name, table in (("grad_input", conv_ops.GRAD_INPUT_IMPLEMENTATIONS),
                            ("grad_weight", conv_ops.GRAD_WEIGHT_IMPLEMENTATIONS)):
            monkeypatch.setitem(table, 2, self._counted(name, table[2]))

    def _counted(self, name, fn):
        def counted(*args):
            self.backward_direct.append(name)
            return fn(*args)
        return counted

    def took(self) -> str:
        assert self.direct + self.grad_direct + self.dispatched == 1, (self.direct, self.grad_direct,
                                                                        self.dispatched)
        return "direct" if self.direct else "grad-direct" if self.grad_direct else "dispatcher"


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def _conv_once(x, w, b=None, **kw):
    """One warm call (normalises and remembers the arguments: the key the direct path needs), then the
    counted call."""
    F.conv2d(x.detach(), w.detach(), None if b is None else b.detach(), **kw)
    return F.conv2d(x, w, b, **kw)


def _operands(dtype=torch.float64, requires_grad=False):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(4, dtype=dtype, requires_grad=requires_grad)
    return x, w, b


def _count_only(spy):
    """Reset the spy after the warm call of :func:`_conv_once`."""
    spy.direct = spy.grad_direct = spy.dispatched = 0
    spy.backward_direct = []


# ---- calls that go direct ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_operand_requires_grad"])
def test_inference_calls_go_direct_and_equal_the_dispatcher_path(spy, mode):
    x, w, b = _operands()
    F.conv2d(x, w, b, padding=1)
    _count_only(spy)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no_operand_requires_grad": torch.enable_grad}[mode]
    with ctx():
        out = F.conv2d(x, w, b, padding=1)
    assert spy.took() == "direct"
    assert not out.requires_grad
    assert_close(out, TF.conv2d(x, w, b, padding=1))
    with torch.no_grad():
        eager.ENABLED = False
        try:
            again = F.conv2d(x, w, b, padding=1)
        finally:
            eager.ENABLED = True
    assert torch.equal(out, again)


def test_module_forward_under_no_grad_goes_direct(spy):
    torch.manual_seed(0)
    layer = fastconv.nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        _count_only(spy)
        layer._repeat_call = None  # the layer's planned call aside (tests/test_repeat_call.py): the functional path
        out = layer(x)
        assert spy.took() == "direct"
        again = layer(x)  # the planned call, made by the call above: no entry of the op, no dispatcher
    assert spy.direct == 1 and spy.dispatched == 0 and spy.grad_direct == 0
    assert_close(out, TF.conv2d(x, layer.weight, layer.bias, padding=1))
    assert torch.equal(out, again)


def test_channels_last_result_layout_is_the_same_on_both_paths():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 1, 1)
    with torch.no_grad():
        direct = F.conv2d(x, w)
        direct = F.conv2d(x, w)
        eager.ENABLED = False
        try:
            dispatched = F.conv2d(x, w)
        finally:
            eager.ENABLED = True
    assert direct.stride() == dispatched.stride() == TF.conv2d(x, w).stride()
    assert torch.equal(direct, dispatched)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_bad_input_gets_the_same_error_on_both_paths(training):
    """A call that records a gradient (the autograd Function's path) refuses bad input as the dispatcher does."""
    x, w, _ = _operands(requires_grad=training)
    with torch.set_grad_enabled(training):
        F.conv2d(x.detach(), w.detach())  # remembers the arguments: the next calls take the short path
        messages = []
        for enabled in (True, False):
            eager.ENABLED = enabled
            try:
                with pytest.raises(RuntimeError) as err:
                    F.conv2d(x[:, :2], w)
                messages.append(str(err.value))
            finally:
                eager.ENABLED = True
    assert messages[0] == messages[1]
    assert "channels" in messages[0]


def test_pools_and_fused_op_go_direct_and_match(monkeypatch):
    calls = []
    for table in (pool_ops.IMPLEMENTATIONS, fused_ops.IMPLEMENTATIONS):
        for key, fn in list(table.items()):
            monkeypatch.setitem(table, key, lambda *a, _fn=fn, _key=key: calls.append(_key) or _fn(*a))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):  # the first call normalises the arguments, the second takes the short path
            calls.clear()
            got = [F.max_pool2d(x, 2), F.avg_pool2d(x, 3, 2, 1), F.adaptive_avg_pool2d(x, 2),
                   F.adaptive_max_pool2d(x, 2), F.conv_bias_act(x, w, b, padding=1, activation="relu")]
    # max_pool2d without return_indices: the values-only entry (nothing will ask for the indices)
    assert sorted(map(str, calls)) == sorted(["max_pool_values", "avg_pool", "adaptive_avg_pool",
                                              "adaptive_max_pool", "2"])
    expected = [TF.max_pool2d(x, 2), TF.avg_pool2d(x, 3, 2, 1), TF.adaptive_avg_pool2d(x, 2),
                TF.adaptive_max_pool2d(x, 2), torch.relu(TF.conv2d(x, w, b, padding=1))]
    for g, e in zip(got, expected):
        assert_close(g, e)


def test_max_pool_values_only_when_indices_are_not_asked_for(monkeypatch):
    calls = []
    for key in ("max_pool", "max_pool_values"):
        fn = pool_ops.IMPLEMENTATIONS[key]
        monkeypatch.setitem(pool_ops.IMPLEMENTATIONS, key, lambda *a, _fn=fn, _key=key: calls.append(_key) or _fn(*a))
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    x[0, 1, 3, 4] = float("nan")
    with torch.no_grad():
        for _ in range(2):
            calls.clear()
            y = F.max_pool2d(x, 3, 2, ceil_mode=True)
            y2, idx = F.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True)
    assert calls == ["max_pool_values", "max_pool"]
    ref, ref_idx = TF.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True)
    assert_close(y, ref, rtol=0, atol=0)
    assert_close(y2, ref, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)


#: pooling op -> (fastconv call, torch's call, the gradient op its backward formula runs)
POOLS = {
    # stride 1: strided max pooling takes the values-only training path (test_max_pool_training_from_values)
    "max_pool": (lambda x: F.max_pool2d(x, 3, 1, 1, ceil_mode=True),
                 lambda x: TF.max_pool2d(x, 3, 1, 1, ceil_mode=True), "max_pool_backward"),
    "avg_pool": (lambda x: F.avg_pool2d(x, 3, 2, 1), lambda x: TF.avg_pool2d(x, 3, 2, 1), "avg_pool_backward"),
    "adaptive_avg_pool": (lambda x: F.adaptive_avg_pool2d(x, 3), lambda x: TF.adaptive_avg_pool2d(x, 3),
                          "adaptive_avg_pool_backward"),
    "adaptive_max_pool": (lambda x: F.adaptive_max_pool2d(x, 3), lambda x: TF.adaptive_max_pool2d(x, 3),
                          "max_pool_backward"),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pool_training_calls_record_their_node_without_the_dispatcher(monkeypatch, name):
    """A pooling call that records a gradient takes the op's autograd Function, and a plain backward runs the
    gradient op's implementation; with create_graph=True the backward keeps the registered op (its own node),
    so second derivatives hold (gradgradcheck)."""
    ours, theirs, backward_name = POOLS[name]
    calls = []
    for table, key in ((pool_ops.GRAD_DIRECT, name), (pool_ops.IMPLEMENTATIONS, backward_name)):
        fn = table[key]
        monkeypatch.setitem(table, key, lambda *a, _fn=fn, _key=key: calls.append(_key) or _fn(*a))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    ours(x.detach())  # normalises the arguments: the next call takes the short path
    y = ours(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert calls == [name, backward_name]
    xr = x.detach().requires_grad_()
    expected = theirs(xr)
    expected.backward(gy)
    assert_close(y, expected)
    assert_close(x.grad, xr.grad)
    calls.clear()
    assert torch.autograd.gradgradcheck(ours, (x,))
    assert name in calls and backward_name not in calls


def _values_training_spy(monkeypatch):
    """Counts the entries a max-pooling training call can take and the backward ops it can run."""
    calls = []
    for table, key in ((pool_ops.GRAD_DIRECT, "max_pool_values"), (pool_ops.GRAD_DIRECT, "max_pool"),
                       (pool_ops.IMPLEMENTATIONS, "max_pool_backward")):
        fn = table[key]
        monkeypatch.setitem(table, key, lambda *a, _fn=fn, _key=key: calls.append(_key) or _fn(*a))
    return calls


@pytest.mark.parametrize("values", ["random", "ties", "nan", "-inf"])
@pytest.mark.parametrize("ndim,kernel,stride,padding,dilation,ceil_mode", [
    (2, 3, 2, 1, 1, False), (2, 2, 2, 0, 1, False), (2, 3, 2, 1, 2, True), (2, (3, 2), (2, 3), 1, 1, True),
    (1, 5, 3, 2, 1, True), (3, 3, 2, 1, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_pool_training_from_values(monkeypatch, values, ndim, kernel, stride, padding, dilation, ceil_mode, dtype):
    """A strided max-pooling training call that discards the indices runs the values-only forward, and its
    backward finds each window's element again: the gradient equals torch's bit for bit, ties (first element),
    NaN (the last NaN of the window) and windows of -inf included."""
    calls = _values_training_spy(monkeypatch)
    ours = getattr(F, f"max_pool{ndim}d")
    theirs = getattr(TF, f"max_pool{ndim}d")
    args = (kernel, stride, padding, dilation, ceil_mode)
    torch.manual_seed(0)
    shape = (2, 3) + (9, 10, 11)[3 - ndim:]
    x = {"random": torch.randn(shape), "ties": torch.randint(0, 3, shape).float(),
         "nan": torch.randn(shape).masked_fill(torch.rand(shape) < 0.2, float("nan")),
         "-inf": torch.randn(shape).masked_fill(torch.rand(shape) < 0.7, float("-inf"))}[values].to(dtype)
    ours(x, *args)  # normalises the arguments: the next call takes the short path
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa, *args), theirs(xb, *args)
    gy = torch.randn_like(yb)
    ya.backward(gy)
    yb.backward(gy)
    assert calls == ["max_pool_values"]
    assert torch.equal(ya.nan_to_num(7.0), yb.nan_to_num(7.0))
    assert torch.equal(xa.grad, xb.grad)


def test_max_pool_training_from_values_edge_cases(monkeypatch):
    """The values path's output may be modified in place after the forward (torch's max_pool saves no output):
    the backward then computes the values again; stride 1 keeps the indexed path (slower from values);
    create_graph=True keeps the registered scatter op, so second derivatives hold."""
    calls = _values_training_spy(monkeypatch)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    F.max_pool2d(x, 3, 2, 1)
    F.max_pool2d(x, 3, 1, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.max_pool2d(xa, 3, 2, 1), TF.max_pool2d(xb, 3, 2, 1)
    ya.mul_(-1.0)  # in place: the kept values no longer hold the maxima
    yb.mul_(-1.0)
    gy = torch.randn_like(yb)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(xa.grad, xb.grad)
    assert calls == ["max_pool_values"]
    calls.clear()
    F.max_pool2d(x.clone().requires_grad_(), 3, 1, 1).sum().backward()
    assert calls == ["max_pool", "max_pool_backward"]
    calls.clear()
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: F.max_pool2d(t, 3, 2, 1), (xg,))
    assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, 3, 2, 1), (xg,))
    assert "max_pool_values" in calls


# ---- calls that keep the dispatcher ----------------------------------------------------------------------

def _torch_grads(x, w, b, **kw):
    """x, w, b's gradients of ``sum(conv2d)`` by torch, for the ones that require grad (None for the others)."""
    refs = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (x, w, b)]
    TF.conv2d(*refs, **kw).sum().backward()
    return [None if r is None else r.grad for r in refs]


def _check_grads(got, expected):
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert_close(g, e)


@pytest.mark.parametrize("needs", ["all", "weight_and_bias", "input_only"])
def test_training_calls_record_their_node_without_the_dispatcher(spy, needs):
    """Grad mode on and an operand that requires grad: the forward takes the autograd Function around the
    implementation, and the plain backward runs the gradient ops' implementations directly -- only the ones
    whose gradient is asked for (a first layer's input, frozen weights)."""
    x, w, b = _operands()
    x.requires_grad_(needs in ("all", "input_only"))
    w.requires_grad_(needs != "input_only")
    b.requires_grad_(needs != "input_only")
    _conv_once(x, w, b, padding=1)
    _count_only(spy)
    out = F.conv2d(x, w, b, padding=1)
    assert spy.took() == "grad-direct"
    assert out.requires_grad and out.grad_fn is not None
    out.sum().backward()
    expected = {"all": ["grad_input", "grad_weight"], "weight_and_bias": ["grad_weight"],
                "input_only": ["grad_input"]}[needs]
    assert spy.backward_direct == expected
    _check_grads([t.grad for t in (x, w, b)], _torch_grads(x, w, b, padding=1))
    if needs == "input_only":
        assert w.grad is None and b.grad is None


def test_training_call_equals_the_dispatcher_path_channels_last_and_strided():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    got = F.conv2d(x, w, None, stride=2, padding=1, groups=2)
    got.sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    eager.ENABLED = False
    try:
        again = F.conv2d(x, w, None, stride=2, padding=1, groups=2)
        again.sum().backward()
    finally:
        eager.ENABLED = True
    assert got.is_contiguous(memory_format=torch.channels_last) == again.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(got, again)
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


def test_double_backward_through_a_training_call_records_the_gradient_ops(spy):
    """create_graph=True: the backward records nothing directly -- its gradient ops go through the dispatcher
    and record their own nodes, so second derivatives are the registered ops' (gradgradcheck against finite
    differences, in float64)."""
    x, w, b = _operands(requires_grad=True)
    _conv_once(x, w, b, padding=1)
    _count_only(spy)
    out = F.conv2d(x, w, b, padding=1)
    assert spy.took() == "grad-direct"
    gx, gw = torch.autograd.grad((out ** 2).sum(), (x, w), create_graph=True)
    assert spy.backward_direct == []
    assert gx.requires_grad and gw.requires_grad
    xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
    rx, rw = torch.autograd.grad((TF.conv2d(xr, wr, br, padding=1) ** 2).sum(), (xr, wr), create_graph=True)
    assert_close(gx, rx)
    assert_close(gw, rw)
    assert torch.autograd.gradgradcheck(lambda a, c, d: F.conv2d(a, c, d, padding=1), (x, w, b))


def test_gradients_keep_the_dispatcher_when_switched_off_or_profiled(spy, monkeypatch):
    x, w, b = _operands(requires_grad=True)
    _conv_once(x, w, b, padding=1)
    _count_only(spy)
    with torch.profiler.profile() as prof:
        F.conv2d(x, w, b, padding=1).sum().backward()
    assert spy.took() == "dispatcher"
    assert spy.backward_direct == []
    names = {e.name for e in prof.events()}
    assert {"fastconv::conv2d_grad_input", "fastconv::conv2d_grad_weight"} <= names
    _check_grads([x.grad, w.grad, b.grad], _torch_grads(x, w, b, padding=1))
    _count_only(spy)
    monkeypatch.setattr(eager, "ENABLED", False)
    F.conv2d(x, w, b, padding=1)
    assert spy.took() == "dispatcher"


def test_forward_mode_dual_tensors_keep_the_dispatcher(spy):
    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    tangent = torch.randn_like(w)
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(w, tangent)
        got = torch.autograd.forward_ad.unpack_dual(F.conv2d(x, dual)).tangent
    assert spy.took() == "dispatcher"
    assert_close(got, TF.conv2d(x, tangent))


def test_profiler_sees_the_op(spy):
    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    with torch.no_grad(), torch.profiler.profile() as prof:
        F.conv2d(x, w)
    assert spy.took() == "dispatcher"
    assert any(e.name == "fastconv::conv2d" for e in prof.events())


def test_flop_counter_mode_counts_the_op(spy):
    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        F.conv2d(x, w)
    assert spy.took() == "dispatcher"
    assert counter.get_total_flops() == 2 * 2 * 4 * 7 * 7 * 3 * 3 * 3


def test_jit_trace_records_the_op(spy):
    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    with torch.no_grad():
        traced = torch.jit.trace(lambda a: F.conv2d(a, w), (x,), check_trace=False)
    assert spy.direct == 0  # (a traced call may take the full argument path: no count on either entry)
    assert "fastconv::conv2d" in str(traced.graph)
    y = torch.randn_like(x)
    assert_close(traced(y), TF.conv2d(y, w))  # a new input gives a new result: nothing was baked in


def test_autocast_keeps_the_dispatcher_and_its_cast(spy):
    x, w, _ = _operands(dtype=torch.float32)
    _conv_once(x, w)
    _count_only(spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.conv2d(x, w)
    assert spy.took() == "dispatcher"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = TF.conv2d(x, w).dtype
    assert out.dtype == expected_dtype


def test_vmap_keeps_the_dispatcher(spy):
    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    with torch.no_grad():
        out = torch.func.vmap(lambda a: F.conv2d(a, w), in_dims=1, out_dims=1)(x.unsqueeze(1))
    assert spy.direct == 0
    assert_close(out.squeeze(1), TF.conv2d(x, w))


def test_tensor_subclass_and_torch_function_mode_keep_the_dispatcher(spy):
    class Logged(torch.Tensor):
        pass

    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    with torch.no_grad():
        out = F.conv2d(x.as_subclass(Logged), w)
    assert spy.took() == "dispatcher"
    assert_close(out.as_subclass(torch.Tensor), TF.conv2d(x, w))

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    _count_only(spy)
    with torch.no_grad(), Watch():
        F.conv2d(x, w)
    assert spy.took() == "dispatcher"


def test_meta_tensors_get_shapes_from_the_fake_kernel(spy):
    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    with torch.no_grad():
        out = F.conv2d(x.to("meta"), w.to("meta"))
    assert spy.took() == "dispatcher"
    assert out.device.type == "meta" and out.shape == (2, 4, 7, 7)


def test_switched_off_everything_keeps_the_dispatcher(spy, monkeypatch):
    x, w, _ = _operands()
    _conv_once(x, w)
    _count_only(spy)
    monkeypatch.setattr(eager, "ENABLED", False)
    with torch.no_grad():
        F.conv2d(x, w)
    assert spy.took() == "dispatcher"

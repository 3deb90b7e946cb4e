"""torch.func over fastconv: grad, jacrev, vmap(grad) (per-sample gradients), nested reverse mode, forward mode
(jvp, jacfwd, hessian) and vmap rules. References: the same function built from torch's ops, in float64."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch.func import functional_call, grad, jacrev, vmap

import fastconv
import fastconv.functional as F
from helpers import assert_close

D = torch.float64


def _net(conv, pool):
    return lambda w, b, x: pool(torch.tanh(conv(x, w, b, padding=1)), 2).pow(2).sum()


FAST = _net(F.conv2d, F.max_pool2d)
TORCH = _net(TF.conv2d, TF.max_pool2d)


@pytest.fixture(autouse=True)
def _batching_rules_used():
    # every op has a vmap rule (fastconv/ops/batching.py): functorch's per-element fallback would warn
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not yet implemented the batching rule for fastconv::")
        yield


def _data(n=3):
    return torch.randn(4, 2, 3, 3, dtype=D), torch.randn(4, dtype=D), torch.randn(n, 2, 6, 6, dtype=D)


def test_grad_matches_torch():
    w, b, x = _data()
    for argnums in (0, 1, 2, (0, 1)):
        got, want = grad(FAST, argnums=argnums)(w, b, x), grad(TORCH, argnums=argnums)(w, b, x)
        for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert_close(g, r, what=f"grad argnums={argnums}")


def test_per_sample_grads_equal_the_loop_of_single_sample_grads():
    w, b, x = _data(5)

    def one(w, b, xi):
        return FAST(w, b, xi.unsqueeze(0))

    gw, gb = vmap(grad(one, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    assert gw.shape == (5, *w.shape) and gb.shape == (5, *b.shape)
    for i in range(5):
        lw, lb = grad(one, argnums=(0, 1))(w, b, x[i])
        assert_close(gw[i], lw, what=f"per-sample weight grad {i}")
        assert_close(gb[i], lb, what=f"per-sample bias grad {i}")
        # and against torch's own per-sample gradient
        tw = grad(lambda w: TORCH(w, b, x[i:i + 1]))(w)
        assert_close(gw[i], tw, what=f"per-sample weight grad {i} vs torch")


def test_jacrev_matches_torch_for_conv_and_pooling():
    w, b, x = _data(2)
    for fast, ref in ((lambda x: F.avg_pool2d(F.conv2d(x, w, b), 2), lambda x: TF.avg_pool2d(TF.conv2d(x, w, b), 2)),
                      (lambda x: F.conv_transpose2d(F.adaptive_max_pool2d(x, 3), w.transpose(0, 1), stride=2),
                       lambda x: TF.conv_transpose2d(TF.adaptive_max_pool2d(x, 3), w.transpose(0, 1), stride=2))):
        assert_close(jacrev(fast)(x), jacrev(ref)(x), what="jacrev wrt input")
    assert_close(jacrev(lambda w: F.conv2d(x, w, b))(w), jacrev(lambda w: TF.conv2d(x, w, b))(w),
                 what="jacrev wrt weight")


def test_jacrev_of_converted_model_matches_torch():
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
                                      torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1),
                                      torch.nn.Flatten()).to(D)
    model = fastconv.convert(copy.deepcopy(torch_model))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 2, 6, 6, dtype=D)
    got = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    want = jacrev(lambda p: functional_call(torch_model, p, (x,)))(params)
    for k in params:
        assert_close(got[k], want[k], what=f"jacrev of converted model wrt {k}")


def test_second_order_reverse_mode_matches_torch():
    w, b, x = _data(2)
    hess = jacrev(jacrev(lambda w: FAST(w, b, x)))(w)
    assert_close(hess, jacrev(jacrev(lambda w: TORCH(w, b, x)))(w), what="jacrev(jacrev) hessian")
    gg = grad(lambda x: grad(FAST, argnums=2)(w, b, x).sin().sum())(x)
    assert_close(gg, grad(lambda x: grad(TORCH, argnums=2)(w, b, x).sin().sum())(x), what="grad(grad)")


def test_forward_mode_matches_torch():
    w, b, x = _data(2)
    tangents = (torch.randn_like(w), torch.randn_like(b), torch.randn_like(x))
    (value, tangent), (want_value, want_tangent) = (torch.func.jvp(f, (w, b, x), tangents) for f in (FAST, TORCH))
    assert want_tangent.abs() > 0
    assert_close(value, want_value, what="jvp primal")
    assert_close(tangent, want_tangent, what="jvp tangent")

    def chain(conv_t, amax, unpool, mpool):
        return lambda x: conv_t(unpool(*mpool(amax(x, 4), 2, return_indices=True), 2), w.transpose(0, 1), b, stride=2)

    assert_close(torch.func.jacfwd(chain(F.conv_transpose2d, F.adaptive_max_pool2d, F.max_unpool2d, F.max_pool2d))(x),
                 torch.func.jacfwd(chain(TF.conv_transpose2d, TF.adaptive_max_pool2d, TF.max_unpool2d,
                                         TF.max_pool2d))(x), what="jacfwd")
    for argnums in (0, 1, 2):
        assert_close(torch.func.hessian(FAST, argnums=argnums)(w, b, x),
                     torch.func.hessian(TORCH, argnums=argnums)(w, b, x), what=f"hessian argnums={argnums}")
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(w, tangents[0])
        got = torch.autograd.forward_ad.unpack_dual(F.conv2d(x, dual, b)).tangent
    assert_close(got, TF.conv2d(x, tangents[0]), what="forward_ad tangent")


def test_forward_mode_without_a_rule_is_refused_by_name_not_answered_with_zeros():
    x, dw, pw = torch.randn(1, 2, 5, 5, dtype=D), torch.randn(2, 1, 3, 3, dtype=D), torch.randn(3, 2, 1, 1, dtype=D)
    with pytest.raises(NotImplementedError, match=r"fastconv.depthwise_separable_conv2d: forward-mode automatic"):
        torch.func.jvp(lambda x: F.depthwise_separable_conv2d(x, dw, pw), (x,), (torch.ones_like(x),))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=r"fastconv.depthwise_separable_conv2d: forward-mode"):
            F.depthwise_separable_conv2d(dual, dw, pw)


def test_eager_autograd_unchanged():
    w, b, x = _data()
    leaves = [t.clone().requires_grad_() for t in (w, b, x)]
    FAST(*leaves).backward()
    want = grad(TORCH, argnums=(0, 1, 2))(w, b, x)
    for t, r in zip(leaves, want):
        assert_close(t.grad, r, what="eager backward")


@pytest.mark.parametrize("ndim", [1, 3])
def test_per_sample_grads_other_ranks_and_groups(ndim):
    conv, tconv = (F.conv1d, TF.conv1d) if ndim == 1 else (F.conv3d, TF.conv3d)
    pool, tpool = (F.max_pool1d, TF.max_pool1d) if ndim == 1 else (F.avg_pool3d, TF.avg_pool3d)
    x = torch.randn(3, 4, *(6,) * ndim, dtype=D)
    w = torch.randn(6, 2, *(2,) * ndim, dtype=D)

    def loss(conv, pool):
        return lambda w, xi: pool(conv(xi[None], w, stride=1, groups=2), 2).pow(2).sum()

    got = vmap(grad(loss(conv, pool)), in_dims=(None, 0))(w, x)
    for i in range(3):
        assert_close(got[i], grad(loss(tconv, tpool))(w, x[i]), what=f"{ndim}-d per-sample grad {i}")


def test_vmap_over_weights_is_one_grouped_call_with_torch_values():
    x, b = torch.randn(2, 4, 6, 6, dtype=D), torch.randn(4, dtype=D)
    W = torch.randn(5, 4, 2, 3, 3, dtype=D)  # 5 weight sets, groups=2
    assert_close(vmap(lambda w: F.conv2d(x, w, b, padding=1, groups=2))(W),
                 vmap(lambda w: TF.conv2d(x, w, b, padding=1, groups=2))(W), what="vmap over conv2d weights")
    WT = torch.randn(5, 4, 3, 2, 2, dtype=D)
    assert_close(vmap(lambda w: F.conv_transpose2d(x, w, stride=2))(WT),
                 vmap(lambda w: TF.conv_transpose2d(x, w, stride=2))(WT), what="vmap over conv_transpose2d weights")
    DW, pw = torch.randn(2, 4, 1, 3, 3, dtype=D), torch.randn(3, 4, 1, 1, dtype=D)
    assert_close(vmap(lambda dw: F.depthwise_separable_conv2d(x, dw, pw, padding=1))(DW),
                 vmap(lambda dw: TF.conv2d(TF.conv2d(x, dw, padding=1, groups=4), pw))(DW),
                 what="vmap over separable weights")


def test_vmap_of_unpooling_and_pooling_with_indices():
    x = torch.randn(3, 2, 2, 6, 6, dtype=D)
    v, i = vmap(lambda t: F.max_pool2d(t, 2, return_indices=True))(x)
    tv, ti = TF.max_pool2d(x.flatten(0, 1), 2, return_indices=True)
    assert torch.equal(i.flatten(0, 1), ti)
    assert_close(vmap(lambda a, b: F.max_unpool2d(a, b, 2))(v, i),
                 TF.max_unpool2d(tv, ti, 2).reshape(3, 2, 2, 6, 6), what="vmap max_unpool2d")
    assert_close(vmap(lambda t: F.adaptive_avg_pool2d(t, 4))(x), TF.adaptive_avg_pool2d(x.flatten(0, 1), 4)
                 .reshape(3, 2, 2, 4, 4), what="vmap adaptive_avg_pool2d")


def test_compiled_func_grad_of_converted_model():
    # pytorch#170834: torch.func.grad under torch.compile(fullgraph) is the documented way to compile gradients
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2)).to(D)
    model = fastconv.convert(copy.deepcopy(torch_model))
    x = torch.randn(2, 3, 8, 8, dtype=D)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = torch.compile(grad(lambda p: functional_call(model, p, (x,)).pow(2).sum()), fullgraph=True,
                        backend="aot_eager")(params)
    want = grad(lambda p: functional_call(torch_model, p, (x,)).pow(2).sum())(params)
    for k in params:
        assert_close(got[k], want[k], what=f"compiled func.grad wrt {k}")


class _RecordingLibrary:
    """Stands in for an op's ``torch.library.Library`` in :func:`fastconv.ops.func._replace_autograd_kernel`:
    ``mode`` says how this torch's ``Library.impl`` answers an override."""

    ns = "fastconv"

    def __init__(self, mode):
        self.mode, self.calls = mode, []

    def impl(self, name, kernel, key, *, with_keyset, **kwargs):
        self.calls.append(kwargs)
        if self.mode == "no_allow_override_argument" and "allow_override" in kwargs:
            raise TypeError("impl() got an unexpected keyword argument 'allow_override'")
        if self.mode == "refuses":
            raise RuntimeError("This is not allowed since there's already a kernel registered from python")
        if self.mode == "no_allow_override_argument" and f"fastconv/{name}/Autograd" in torch.library._impls:
            raise RuntimeError("the _impls check of an older torch")


@pytest.mark.parametrize("mode", ["allow_override", "no_allow_override_argument", "refuses"])
def test_autograd_kernel_replacement_on_torch_versions_that_guard_overrides(mode, monkeypatch):
    """torch 2.11's ``Library.impl`` refuses to replace a Python kernel unless told ``allow_override=True`` (the GPU
    machine's ``import fastconv`` failed on it); older versions lack the argument and read ``torch.library._impls``.
    The replacement must succeed on both and, where a torch refuses anyway, report it instead of raising."""
    from fastconv.ops import func

    monkeypatch.setattr(torch.library, "_impls", {"fastconv/probe_op/Autograd"})
    lib = _RecordingLibrary(mode)
    opdef = type("OpDef", (), {"_lib": lib, "_name": "probe_op"})()
    done = func._replace_autograd_kernel(opdef, lambda *a: None)
    assert done is (mode != "refuses")
    assert lib.calls[0] == {"allow_override": True}
    if mode == "no_allow_override_argument":
        assert lib.calls[1] == {} and "fastconv/probe_op/Autograd" not in torch.library._impls

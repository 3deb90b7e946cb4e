"""conv_transpose1d/2d/3d against torch in float64: forward, gradients, gradcheck, gradgradcheck, opcheck,
modules (output_size, state_dict, convert), FLOP counting, the seed example, and every error path.

Runs over every algorithm registered for the active backend, plus the transposed-only ``patch_gemm``
(kernel == stride), which refuses the other geometries by name.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import backends
from helpers import assert_close

TARGET = backends.current()
ROWS = [row for row in fastconv.algorithms() if TARGET in row["targets"]]
REGISTRY_ALGOS = [row["name"] for row in ROWS if row["family"] == "conv"]
# The transposed-only implementations (patch_gemm: numba only, checked by test_patch_gemm_refuses_other_targets).
ALGOS = ["auto"] + REGISTRY_ALGOS + [row["name"] for row in ROWS if row["family"] == "conv_transpose"]
#: A registry algorithm that runs every geometry on this target (for tests that name one).
GENERAL = "im2col" if TARGET == "numba" else "cuda-direct"

# name: (ndim, N, C_in, input spatial, C_out, kernel, kwargs). C_out is the total output channel count.
CASES = {
    "2d_stride1_3x3": (2, 2, 3, (5, 6), 4, (3, 3), dict()),
    "2d_stride2_pad1_outpad1": (2, 2, 3, (5, 4), 4, (3, 3), dict(stride=2, padding=1, output_padding=1)),
    "2d_stride3_even_kernel": (2, 2, 2, (4, 5), 3, (4, 2), dict(stride=3, padding=(2, 1), output_padding=(2, 0))),
    "2d_dilated_outpad_ge_stride": (2, 1, 3, (5, 5), 2, (3, 3), dict(dilation=2, output_padding=1)),
    "2d_mixed_tuples": (2, 2, 4, (5, 6), 3, (3, 2), dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
                                                         dilation=(1, 2))),
    "2d_groups2": (2, 2, 4, (4, 5), 6, (3, 3), dict(stride=2, padding=1, groups=2)),
    # 8 channels per group both ways: the adjoint conv runs on group_lanes too
    "2d_groups2_8wide": (2, 2, 16, (4, 5), 16, (3, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
    "2d_depthwise_like": (2, 2, 4, (5, 5), 8, (3, 3), dict(stride=2, padding=1, output_padding=1, groups=4)),
    "2d_depthwise": (2, 2, 4, (5, 5), 4, (3, 3), dict(stride=2, padding=1, output_padding=1, groups=4)),
    "2d_stride1_pad1_3x3": (2, 1, 4, (6, 5), 3, (3, 3), dict(padding=1)),
    "2d_pointwise": (2, 2, 5, (4, 3), 3, (1, 1), dict()),
    "2d_patch_2x2_s2": (2, 2, 6, (4, 5), 4, (2, 2), dict(stride=2)),
    "2d_patch_3x2_outpad": (2, 2, 4, (3, 4), 6, (3, 2), dict(stride=(3, 2), output_padding=(2, 1), groups=2)),
    "1d_stride2_pad1": (1, 2, 3, (7,), 4, (3,), dict(stride=2, padding=1, output_padding=1)),
    "1d_patch_k3_s3": (1, 2, 4, (5,), 2, (3,), dict(stride=3)),
    "3d_stride2_pad1": (3, 2, 2, (3, 4, 3), 3, (3, 3, 2), dict(stride=2, padding=1, output_padding=(1, 0, 1))),
    "3d_patch_groups2": (3, 1, 4, (2, 3, 2), 4, (2, 2, 2), dict(stride=2, groups=2)),
}

torch_fn = {1: TF.conv_transpose1d, 2: TF.conv_transpose2d, 3: TF.conv_transpose3d}
ours_fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _make(case, dtype=torch.float64, bias=True, requires_grad=True):
    ndim, n, c_in, size, c_out, kernel, kw = case
    groups = kw.get("groups", 1)
    x = torch.randn(n, c_in, *size, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(c_in, c_out // groups, *kernel, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(c_out, dtype=dtype, requires_grad=requires_grad) if bias else None
    return ndim, x, w, b, kw


def _is_patch(case) -> bool:
    ndim, _, _, _, _, kernel, kw = case
    stride = kw.get("stride", 1)
    stride = (stride,) * ndim if isinstance(stride, int) else tuple(stride)
    return (tuple(kernel) == stride and kw.get("padding", 0) == 0 and kw.get("dilation", 1) == 1)


def _refused(algo, case):
    """Whether ``algo`` refuses this geometry; a refusal must be a ValueError that says why.

    patch_gemm must refuse exactly the non kernel == stride cases; registry algorithms (Winograd,
    depthwise, ...) refuse what their ``refuse`` rule says, reported for the adjoint convolution.
    """
    if algo == "auto":
        return None
    ndim, x, w, b, kw = _make(case, requires_grad=False)
    try:
        ours_fn[ndim](x, w, b, algo=algo, **kw)
    except ValueError as e:
        if algo == "patch_gemm":
            assert not _is_patch(case)
            assert re.search(r"algo='patch_gemm' cannot run this transposed convolution \(needs "
                             r"(kernel == stride|padding=0|dilation=1)", str(e)), str(e)
        else:
            assert "cannot run this convolution" in str(e) and "Algorithms that can" in str(e), str(e)
            assert "adjoint convolution" in str(e), str(e)
        return str(e)
    assert algo != "patch_gemm" or _is_patch(case), "patch_gemm must refuse overlapping windows"
    return None


def _refusal(algo, fn, *args, **kwargs):
    """The reason ``algo`` refuses this call (a registry algorithm may refuse a geometry, by name), or None."""
    try:
        fn(*args, algo=algo, **kwargs)
    except ValueError as e:
        assert "cannot run this" in str(e), str(e)
        return str(e)
    return None


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_torch(name, algo):
    case = CASES[name]
    reason = _refused(algo, case)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    ndim, x, w, b, kw = _make(case)
    y = ours_fn[ndim](x, w, b, algo=algo, **kw)
    ref = torch_fn[ndim](x, w, b, **kw)
    assert_close(y, ref, algo=algo, what="forward")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for what, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert_close(a, e, algo=algo, what=what)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_runs_part_of_the_matrix(algo):
    """The matrix above must not pass by every case being refused for some algorithm."""
    dtypes = {r["name"]: r.get("dtypes", ["float64"]) for r in fastconv.algorithms()}.get(algo, ["float64"])
    if "float64" not in dtypes:   # the matrix is float64 (a tensor-core algorithm: tests/test_cuda_tc.py)
        pytest.skip(f"{algo} runs {', '.join(dtypes)} only; the matrix is float64")
    assert any(not _refused(algo, case) for case in CASES.values()), f"{algo} refused every case"


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("name", ["2d_stride2_pad1_outpad1", "2d_dilated_outpad_ge_stride", "2d_depthwise",
                                  "2d_stride1_pad1_3x3",
                                  "2d_patch_3x2_outpad", "1d_patch_k3_s3", "3d_stride2_pad1"])
def test_gradcheck_and_gradgradcheck(name, algo):
    case = CASES[name]
    reason = _refused(algo, case)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    ndim, x, w, b, kw = _make(case)
    fn = lambda x, w, b: ours_fn[ndim](x, w, b, algo=algo, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


# opcheck is the slowest check: run it per op and path ('auto' takes patch_gemm on the patch cases,
# GENERAL the registry's input-gradient kernels), not per algorithm.
@pytest.mark.parametrize("algo", ["auto", GENERAL])
@pytest.mark.parametrize("name", ["1d_stride2_pad1", "2d_groups2", "2d_patch_2x2_s2", "3d_patch_groups2"])
def test_opcheck(name, algo):
    case = CASES[name]
    reason = _refused(algo, case)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    ndim, x, w, b, kw = _make(case)
    a = F.transposed.ConvTransposeArgs(f"conv_transpose{ndim}d", ndim, x, w, b, kw.get("stride", 1),
                                       kw.get("padding", 0), kw.get("output_padding", 0), kw.get("groups", 1),
                                       kw.get("dilation", 1), algo)
    op = getattr(torch.ops.fastconv, f"conv_transpose{ndim}d").default
    torch.library.opcheck(op, (x, w, b, *a.lists(), a.groups, algo))
    torch.library.opcheck(op, (x, w, None, *a.lists(), a.groups, algo))


def test_seed_example_exact_values():
    """The worked example: 3x3 input, 2x2 kernel, stride 2 -> each input scales the kernel into its own tile."""
    x = torch.tensor([[1, 3, 1], [6, 1, 5], [5, 4, 2]])
    w = torch.tensor([[1, 2], [2, 1]])
    expected = torch.tensor([[1, 2, 3, 6, 1, 2], [2, 1, 6, 3, 2, 1], [6, 12, 1, 2, 5, 10],
                             [12, 6, 2, 1, 10, 5], [5, 10, 4, 8, 2, 4], [10, 5, 8, 4, 4, 2]])
    for dtype in (torch.float64, torch.float32):
        for algo in ALGOS:
            if _refusal(algo, F.conv_transpose2d, x.to(dtype)[None, None], w.to(dtype)[None, None], stride=2):
                continue
            got = F.conv_transpose2d(x.to(dtype)[None, None], w.to(dtype)[None, None], stride=2, algo=algo)
            assert got.dtype == dtype
            assert torch.equal(got[0, 0], expected.to(dtype)), f"{algo} {dtype}: {got[0, 0]}"


def test_unbatched_input():
    ndim, x, w, b, kw = _make(CASES["2d_stride2_pad1_outpad1"])
    y = F.conv_transpose2d(x[0], w, b, **kw)
    assert y.shape == TF.conv_transpose2d(x[0], w, b, **kw).shape == (4, 10, 8)
    assert_close(y, TF.conv_transpose2d(x[0], w, b, **kw))
    assert_close(F.conv_transpose1d(x[0, :, 0], w[:, :, 0], b, stride=2),
                 TF.conv_transpose1d(x[0, :, 0], w[:, :, 0], b, stride=2))
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad[1:].abs().sum() == 0 and x.grad[0].abs().sum() > 0


@pytest.mark.parametrize("algo", ALGOS)
def test_batch_size_zero_forward_and_backward(algo):
    x = torch.randn(0, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    reason = _refusal(algo, F.conv_transpose2d, x.detach(), w.detach(), stride=2)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    y = F.conv_transpose2d(x, w, b, stride=2, algo=algo)
    assert y.shape == TF.conv_transpose2d(x, w, b, stride=2).shape == (0, 5, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert_close(w.grad, torch.zeros_like(w))
    assert_close(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("layout", ["channels_last", "transposed_view", "sliced"])
def test_non_contiguous_inputs(layout):
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    elif layout == "transposed_view":
        x = x.transpose(2, 3)
    else:
        x, w = x[:, :, ::2, 1:], w[:, :, :, :]
    assert not x.is_contiguous()
    for algo in ALGOS:
        if _refusal(algo, F.conv_transpose2d, x, w, stride=2, padding=1):
            continue  # every accepted algorithm is compared; refusals are asserted by the matrix test
        assert_close(F.conv_transpose2d(x, w, stride=2, padding=1, algo=algo),
                     TF.conv_transpose2d(x, w, stride=2, padding=1), what=f"{layout} {algo}")
    wp = torch.randn(6, 4, 2, 2, dtype=torch.float64).transpose(2, 3)
    assert_close(F.conv_transpose2d(x, wp, stride=2), TF.conv_transpose2d(x, wp, stride=2), what="patch")


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kw, kernel", [(dict(stride=2, padding=1, output_padding=1), 4),
                                        (dict(stride=2), 2)], ids=["dcgan", "unet"])
def test_float32_matches_float64_reference(algo, kw, kernel):
    if algo == "patch_gemm" and kernel != kw["stride"]:
        pytest.skip("patch_gemm needs kernel == stride (its refusal is asserted by the matrix test)")
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    w = torch.randn(32, 16, kernel, kernel, dtype=torch.float64) / 8
    b = torch.randn(16, dtype=torch.float64)
    reason = _refusal(algo, F.conv_transpose2d, x.float(), w.float(), **kw)
    if reason:
        pytest.skip(reason.split(". Algorithms that can")[0])
    y = F.conv_transpose2d(x.float(), w.float(), b.float(), algo=algo, **kw)
    assert y.dtype == torch.float32
    assert_close(y, TF.conv_transpose2d(x, w, b, **kw).float(), algo=algo)


def test_auto_takes_patch_gemm_for_kernel_equal_stride(monkeypatch):
    """'auto' runs the GEMM + scatter path on kernel == stride, and the generic kernels otherwise."""
    from fastconv.cpu import transposed_gemm

    if TARGET != "numba":
        pytest.skip("patch_gemm runs on the numba target only")
    calls = []
    real = transposed_gemm.forward
    monkeypatch.setattr(transposed_gemm, "forward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    F.conv_transpose2d(x, torch.randn(4, 2, 2, 2, dtype=torch.float64), stride=2)
    assert len(calls) == 1
    F.conv_transpose2d(x, torch.randn(4, 2, 3, 3, dtype=torch.float64), stride=2)
    F.conv_transpose2d(x, torch.randn(4, 2, 2, 2, dtype=torch.float64), stride=2, algo="im2col")
    assert len(calls) == 1


def test_patch_gemm_refuses_other_targets():
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 2, 2, 2)
    with fastconv.backend("cuda-emu"):
        with pytest.raises(ValueError, match=r"algo='patch_gemm' cannot run this transposed convolution "
                                             r"\(runs on numba, not cuda-emu\)"):
            F.conv_transpose2d(x, w, stride=2, algo="patch_gemm")


def test_frozen_weight_skips_weight_gradient():
    """Transfer learning: no weight-gradient op runs when the weight does not require grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    y = F.conv_transpose2d(x, w, stride=2)
    with Spy():
        y.sum().backward()
    assert any("fastconv.conv2d." in c for c in calls)
    assert not any("conv2d_grad_weight" in c for c in calls)


def test_flop_counter_matches_torch_rule():
    """Transposed conv work follows the INPUT's spatial size: 2 * N * prod(I) * C_in * C_out/groups * prod(k)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8, 5, 6)
    w = torch.randn(8, 3, 4, 3)  # groups=2: C_out = 6
    kw = dict(stride=2, padding=1, groups=2)
    with FlopCounterMode(display=False) as ours:
        F.conv_transpose2d(x, w, **kw)
    with FlopCounterMode(display=False) as theirs:
        TF.conv_transpose2d(x, w, **kw)
    assert ours.get_total_flops() == theirs.get_total_flops() == 2 * 2 * 30 * 8 * 3 * 12


def test_torch_compile_fullgraph_matches_eager():
    model = torch.nn.Sequential(fastconv.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
                                torch.nn.ReLU(), fastconv.nn.ConvTranspose2d(6, 2, 2, stride=2)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_close(out, model(x))
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert_close(g, p.grad)


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
MODULES = {1: (fastconv.nn.ConvTranspose1d, torch.nn.ConvTranspose1d),
           2: (fastconv.nn.ConvTranspose2d, torch.nn.ConvTranspose2d),
           3: (fastconv.nn.ConvTranspose3d, torch.nn.ConvTranspose3d)}


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_module_matches_torch_module_with_output_size(ndim):
    ours_cls, torch_cls = MODULES[ndim]
    args = (4, 6, 3)
    kw = dict(stride=3, padding=1, groups=2, dilation=1, dtype=torch.float64)
    theirs = torch_cls(*args, **kw)
    ours = ours_cls(*args, **kw)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, *((3,) * ndim), dtype=torch.float64)
    for size in (None, [7] * ndim, [8] * ndim, [2, 6] + [9] * ndim):
        assert_close(ours(x, output_size=size), theirs(x, output_size=size), what=f"output_size={size}")
    assert_close(ours(x[0], output_size=[8] * ndim), theirs(x[0], output_size=[8] * ndim), what="unbatched")
    assert ours(x, [9] * ndim).shape[2:] == (9,) * ndim


def test_module_output_size_errors_are_torchs():
    ours = fastconv.nn.ConvTranspose2d(4, 3, 3, stride=2)
    theirs = torch.nn.ConvTranspose2d(4, 3, 3, stride=2)
    x = torch.randn(2, 4, 5, 5)
    for size, message in (((1, 2, 3), r"output_size must have 2 or 4 elements \(got 3\)"),
                          ((20, 20), r"requested an output size of \(20, 20\), but valid sizes range from "
                                     r"\[11, 11\] to \[12, 12\]"),
                          ((10, 11), r"valid sizes range from \[11, 11\] to \[12, 12\]")):
        with pytest.raises(ValueError, match=message):
            theirs(x, output_size=size)
        with pytest.raises(ValueError, match=message):
            ours(x, output_size=size)


def test_module_state_dict_round_trip_and_torch_init():
    torch.manual_seed(1)
    theirs = torch.nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1, groups=2)
    torch.manual_seed(1)
    ours = fastconv.nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1, groups=2)
    assert isinstance(ours, torch.nn.ConvTranspose2d)
    assert ours.weight.shape == (4, 3, 3, 2)
    sd = ours.state_dict()
    assert sd.keys() == theirs.state_dict().keys()
    for k in sd:
        assert torch.equal(sd[k], theirs.state_dict()[k]), f"same seed, same init: {k}"
    fresh = torch.nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1, groups=2)
    fresh.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4, 5, 5)
    assert_close(ours(x), fresh(x))


def test_convert_swaps_conv_transpose_and_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 3, 2, stride=2), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1)))
    weight = model[0].weight
    x = torch.randn(2, 4, 3, 3)
    before = model[0](x)
    fastconv.convert(model, algo=GENERAL)
    assert type(model[0]) is fastconv.nn.ConvTranspose2d and model[0].algo == GENERAL
    assert type(model[2][0]) is fastconv.nn.ConvTranspose1d
    assert model[0].weight is weight
    assert_close(model[0](x), before)
    layer = fastconv.convert(torch.nn.ConvTranspose3d(2, 2, 2, bias=False))
    assert type(layer) is fastconv.nn.ConvTranspose3d and layer.bias is None


def test_module_algo_keyword_and_repr():
    m = fastconv.nn.ConvTranspose2d(4, 4, 2, stride=2, algo=ALGOS[-1])
    assert f"algo='{ALGOS[-1]}'" in repr(m)
    assert "algo" not in repr(fastconv.nn.ConvTranspose2d(4, 4, 2))
    x = torch.randn(1, 4, 3, 3)
    assert_close(m(x), TF.conv_transpose2d(x, m.weight, m.bias, stride=2), algo=ALGOS[-1])
    with pytest.raises(ValueError, match=r"ConvTranspose2d: unknown algo 'nope'"):
        fastconv.nn.ConvTranspose2d(4, 4, 2, algo="nope")
    with pytest.raises(ValueError, match=r'Only "zeros" padding mode is supported for ConvTranspose2d'):
        fastconv.nn.ConvTranspose2d(4, 4, 2, padding_mode="reflect")


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
x4 = torch.randn(2, 4, 5, 5)
w4 = torch.randn(4, 3, 3, 3)

# name: (args, kwargs, torch raises too?, message regex)
BAD = {
    "output_padding_not_smaller": ((x4, w4), dict(stride=2, output_padding=2), True,
                                   r"output padding must be smaller than either stride or dilation, but got "
                                   r"output_padding=\(2, 2\), stride=\(2, 2\), dilation=\(1, 1\)"),
    "output_padding_without_stride": ((x4, w4), dict(output_padding=(0, 1)), True,
                                      r"spatial dim 1: 1 >= 1 and 1 >= 1"),
    "output_padding_negative": ((x4, w4), dict(stride=2, output_padding=-1), True,
                                r"negative output_padding is not supported"),
    "input_2d": ((torch.randn(5, 5), w4), {}, True, r"expected input to be 3-D \(unbatched\) or 4-D"),
    "input_5d": ((torch.randn(1, 4, 2, 5, 5), w4), {}, True, r"got 5-D input"),
    "weight_3d": ((x4, torch.randn(4, 3, 3)), {}, True,
                  r"expected weight to be 4-D \(in_channels, out_channels/groups, kxk\)"),
    "channel_mismatch": ((torch.randn(2, 5, 5, 5), w4), {}, True,
                         r"weight has 4 input channels \(weight.shape\[0\]; .*\) but input has 5 channels "
                         r"\(expected input.shape\[1\] == weight.shape\[0\] == 4\)"),
    "groups_not_dividing": ((x4, w4), dict(groups=3), True, r"groups=3 must divide in_channels, but weight has 4"),
    "groups_zero": ((x4, w4), dict(groups=0), True, r"non-positive groups"),
    "padding_negative": ((x4, w4), dict(padding=-1), True, r"negative padding is not supported"),
    "padding_same": ((x4, w4), dict(padding="same"), True,
                     r"padding must be an int or a tuple of 2 ints, got the string 'same'"),
    "padding_valid": ((x4, w4), dict(padding="valid"), True, r"do not accept 'same' or 'valid'"),
    "stride_zero": ((x4, w4), dict(stride=0), True, r"non-positive stride is not supported"),
    "stride_wrong_length": ((x4, w4), dict(stride=(1, 1, 1)), True, r"stride to be a single int or a tuple of 2"),
    "stride_float": ((x4, w4), dict(stride=1.5), True, r"stride must be an int or a tuple of 2 ints"),
    "dilation_zero": ((x4, w4), dict(dilation=0), True, r"non-positive dilation is not supported"),
    "output_size_not_positive": ((torch.randn(2, 4, 1, 1), w4), dict(padding=2), True,
                                 r"computed output size \(-1, -1\) is too small"),
    "output_size_zero": ((torch.randn(2, 4, 1, 1), torch.randn(4, 3, 1, 1)), dict(padding=1), True,
                         r"computed output size \(-1, -1\)"),
    "dtype_mismatch_weight": ((x4, w4.double()), {}, True,
                              r"input has dtype torch.float32 but weight has dtype torch.float64"),
    "bias_wrong_shape": ((x4, w4, torch.randn(4)), {}, True,
                         r"expected bias of shape \(3,\) to match weight.shape\[1\] \* groups"),
    "integer_input": ((x4.long(), w4.long()), {}, False, r"input has dtype torch.int64; expected a floating tensor"),
    "input_not_tensor": (([[1.0]], w4), {}, True, r"input must be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_is_refused_clearly(name):
    args, kwargs, torch_raises, message = BAD[name]
    expected_type = Exception
    if torch_raises:
        with pytest.raises(Exception) as torch_error:
            TF.conv_transpose2d(*args, **kwargs)
        expected_type = type(torch_error.value)
    with pytest.raises(expected_type, match=message):
        F.conv_transpose2d(*args, **kwargs)


def test_other_errors():
    with pytest.raises(RuntimeError, match=r"conv_transpose2d: input is on cpu but weight is on meta"):
        F.conv_transpose2d(x4, w4.to("meta"))
    with pytest.raises(ValueError, match=r"conv_transpose2d: unknown algo 'fft9'; expected one of auto, .*patch_gemm"):
        F.conv_transpose2d(x4, w4, algo="fft9")
    with pytest.raises(RuntimeError, match=r"conv_transpose3d: expected input to be 4-D \(unbatched\) or 5-D"):
        F.conv_transpose3d(x4[0], w4[..., None])
    with pytest.raises(RuntimeError, match=r"conv_transpose1d: expected weight to be 3-D"):
        F.conv_transpose1d(x4[:, :, 0], w4)
    with pytest.raises(RuntimeError, match=r"output_padding to be a single int or a tuple of 2"):
        F.conv_transpose2d(x4, w4, output_padding=(0, 0, 0))
    # float16 is computed in float32 (tests/test_half.py); float8 (refused by torch too) is refused by name.
    with pytest.raises(RuntimeError, match=r"dtype torch.float8_e4m3fn, which fastconv does not support"):
        F.conv_transpose2d(x4.to(torch.float8_e4m3fn), w4.to(torch.float8_e4m3fn))

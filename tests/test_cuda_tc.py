"""The tensor-core implicit-GEMM convolution (kernels/conv_tc.cu, "implicit-gemm-tc") on the CPU harness.

Forward, input gradient and weight gradient in float16, bfloat16 and float32-as-TF32 against torch in
float64 on the same (already rounded) inputs, over a matrix of geometries: stride, padding, dilation,
groups, odd channel counts (the element-wise loaders), channel counts that are multiples of 8 (the
16-byte cp.async loaders), several tiles in M and N with more K-steps than pipeline stages, 1-D and
3-D, batch 0; contiguous and channels_last inputs. Until the op layer accepts float16/bfloat16 the
launch functions are called directly (with the op's 5-D tensors); float32 also runs through
``fastconv.functional`` with ``algo="implicit-gemm-tc"``.

Shapes are tiny: every CUDA thread is a fiber on the CPU here.
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import emu, registry
from fastconv.cuda import conv_tc, launch
from fastconv.ops.conv import make_geometry

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU harness needs g++")

# Error relative to the reference's magnitude: max|ours - ref| / max|ref|. The rounding that sets
# each: TF32 operands (10-bit mantissa, ~5e-4 per product), bfloat16 outputs (8 bits, 4e-3),
# float16 outputs (11 bits, 5e-4); all accumulate in float32.
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# (N, C, spatial, K, kernel, kwargs)
CASES = {
    "stride2_pad_odd_channels": (2, 3, (7, 6), 5, (3, 3), dict(stride=2, padding=1)),
    "dilation_mixed": (1, 4, (9, 8), 3, (3, 2), dict(stride=(2, 1), padding=(2, 1), dilation=(2, 3))),
    "groups2_vec": (2, 16, (5, 6), 16, (3, 3), dict(padding=1, groups=2)),
    "groups2_odd": (1, 6, (5, 5), 10, (3, 3), dict(stride=2, padding=1, groups=2)),
    "pointwise_vec": (2, 8, (4, 5), 8, (1, 1), {}),
    "strided_vec_dgrad_gaps": (1, 8, (9, 9), 16, (3, 3), dict(stride=3, padding=2, dilation=2)),
    "multi_tile": (1, 40, (12, 12), 136, (3, 3), dict(padding=1)),  # 2 x 2 tiles, 12 K-steps, 3 stages
    "1d": (2, 4, (11,), 5, (3,), dict(stride=2, padding=2, dilation=2)),
    "3d": (1, 2, (4, 5, 4), 3, (2, 3, 2), dict(stride=(1, 2, 1), padding=(1, 1, 0))),
    "batch0": (0, 8, (5, 5), 8, (3, 3), dict(padding=1)),
}
SMALL = [c for c in CASES if c != "multi_tile"]


@pytest.fixture(autouse=True)
def _emu_and_tf32():
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    emu.set_seed(0)
    with fastconv.backend("cuda-emu"):
        yield
    torch.backends.cudnn.allow_tf32 = saved


def _tuple(v, nd):
    return [v] * nd if isinstance(v, int) else list(v)


def _geometry(x, w, kw, dtype):
    nd = x.dim() - 2
    pad = _tuple(kw.get("padding", 0), nd)
    return make_geometry(nd, x.shape[0], x.shape[1], w.shape[0], kw.get("groups", 1), list(x.shape[2:]),
                         list(w.shape[2:]), None, _tuple(kw.get("stride", 1), nd), pad, pad,
                         _tuple(kw.get("dilation", 1), nd), dtype, "cuda-emu")


def _to5(t):
    return t.reshape(tuple(t.shape[:2]) + (1,) * (5 - t.dim()) + tuple(t.shape[2:]))


def _from5(t, nd):
    return t.reshape(tuple(t.shape[:2]) + tuple(t.shape[5 - nd:]))


def _inputs(name, dtype, seed=0):
    n, c, spatial, k, ks, kw = CASES[name]
    g = torch.Generator().manual_seed(seed)
    groups = kw.get("groups", 1)
    x = torch.randn(n, c, *spatial, generator=g).to(dtype)
    w = torch.randn(k, c // groups, *ks, generator=g).to(dtype)
    b = torch.randn(k, generator=g).to(dtype)
    return x, w, b, kw


def _conv(nd):
    return getattr(TF, f"conv{nd}d")


def _reference(x, w, b, gy, kw):
    """torch in float64 on the same (rounded) inputs: y, grad_input, grad_weight."""
    nd = x.dim() - 2
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y = _conv(nd)(xr, wr, b.double(), **kw)
    if y.numel() == 0:
        return y.detach(), torch.zeros_like(xr), torch.zeros_like(wr)
    gx, gw = torch.autograd.grad(y, (xr, wr), gy.double())
    return y.detach(), gx, gw


def _check(got, want, dtype, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    if want.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - want).abs()
    scale = max(want.abs().max().item(), 1e-6)
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err.max().item() <= TOL[dtype] * scale, (
        f"{what}: error {err.max().item():.3g} relative {err.max().item() / scale:.3g} > {TOL[dtype]} at {worst}: "
        f"got {got[worst].item()!r}, expected {want[worst].item()!r}")


def _channels_last(t):
    return t.to(memory_format=torch.channels_last_3d) if t.dim() == 5 else t


def _run_passes(x, w, b, gy, kw, dtype, channels_last=False):
    nd = x.dim() - 2
    g = _geometry(x, w, kw, dtype)
    x5, w5, gy5 = _to5(x), _to5(w), _to5(gy)
    if channels_last:
        x5, gy5 = _channels_last(x5), _channels_last(gy5)
    y = conv_tc.tc_forward(x5, w5, b, g)
    gx = conv_tc.tc_grad_input(gy5, w5, g)
    gw = conv_tc.tc_grad_weight(gy5, x5, g)
    if channels_last and y.numel():
        assert not y.is_contiguous() and y.permute(0, 2, 3, 4, 1).is_contiguous(), "channels_last in, channels_last out"
        assert gx.permute(0, 2, 3, 4, 1).is_contiguous()
    elif not channels_last:
        assert y.is_contiguous() and gx.is_contiguous()
    return _from5(y, nd), _from5(gx, nd), _from5(gw, nd)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "tf32"])
@pytest.mark.parametrize("name", SMALL)
def test_passes_match_torch(name, dtype, layout):
    x, w, b, kw = _inputs(name, dtype)
    y_ref = _conv(x.dim() - 2)(x.double(), w.double(), b.double(), **kw)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_ref, gx_ref, gw_ref = _reference(x, w, b, gy, kw)
    y, gx, gw = _run_passes(x, w, b, gy, kw, dtype, channels_last=layout == "channels_last")
    _check(y, y_ref, dtype, f"{name} forward")
    _check(gx, gx_ref, dtype, f"{name} grad_input")
    _check(gw, gw_ref, dtype, f"{name} grad_weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "tf32"])
def test_several_tiles_and_more_k_steps_than_stages(dtype):
    x, w, b, kw = _inputs("multi_tile", dtype)
    gy = torch.randn(1, 136, 12, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_ref, gx_ref, gw_ref = _reference(x, w, b, gy, kw)
    y, gx, gw = _run_passes(x, w, b, gy, kw, dtype)
    _check(y, y_ref, dtype, "forward")
    _check(gx, gx_ref, dtype, "grad_input")
    _check(gw, gw_ref, dtype, "grad_weight")


def test_tf32_really_rounds_the_operands():
    """float32 through the tensor cores is TF32: off from exact float32 by more than float32 rounding,
    within TF32's. (Catches a kernel that silently did float32 math, or skipped cvt.rna.tf32.)"""
    x, w, b, kw = _inputs("groups2_vec", torch.float32)
    g = _geometry(x, w, kw, torch.float32)
    y = _from5(conv_tc.tc_forward(_to5(x), _to5(w), b, g), 2)
    ref = TF.conv2d(x.double(), w.double(), b.double(), **kw)
    rel = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert 1e-6 < rel < 1e-2, rel


def _spy_launches(monkeypatch):
    names = []
    real = launch.Launcher.launch

    def spy(self, family, name, *args, **kwargs):
        names.append(name)
        return real(self, family, name, *args, **kwargs)
    monkeypatch.setattr(launch.Launcher, "launch", spy)
    return names


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "tf32"])
def test_vector_and_element_loaders_agree_bit_for_bit(dtype, monkeypatch):
    """Channels that are multiples of 8 take the 16-byte cp.async kernels (*_vec); forcing the
    element-wise loaders on the same data must give the same bits (the same tiles reach the mma)."""
    x, w, b, kw = _inputs("groups2_vec", dtype)
    gy = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(2)).to(dtype)
    names = _spy_launches(monkeypatch)
    fast = _run_passes(x, w, b, gy, kw, dtype)
    assert [n for n in names if "reduce" not in n] == [f"tc_{p}_{conv_tc._KIND[dtype]}_vec"
                                                      for p in ("forward", "grad_input", "grad_weight")]
    names.clear()
    monkeypatch.setattr(conv_tc, "_aligned", lambda *t: False)
    slow = _run_passes(x, w, b, gy, kw, dtype)
    assert not any(n.endswith("_vec") for n in names), names
    for a, e, what in zip(fast, slow, ("forward", "grad_input", "grad_weight")):
        assert torch.equal(a, e), what


def test_odd_channels_use_the_element_loaders(monkeypatch):
    x, w, b, kw = _inputs("stride2_pad_odd_channels", torch.float16)
    gy = torch.randn(2, 5, 4, 3).half()
    names = _spy_launches(monkeypatch)
    _run_passes(x, w, b, gy, kw, torch.float16)
    assert names == ["tc_forward_f16", "tc_grad_input_f16", "tc_grad_weight_f16", "tc_wgrad_reduce_f16"]


def test_weight_gradient_split_k_is_deterministic(monkeypatch):
    """Forced split-K: several partial sums, reduced in a fixed order (no atomics): the same bits for
    every thread and block order, and still torch's values."""
    monkeypatch.setattr(conv_tc, "MIN_SPLIT_LEN", 32)
    x, w, b, kw = _inputs("pointwise_vec", torch.bfloat16)
    x = torch.randn(4, 8, 8, 9).bfloat16()
    gy = torch.randn(4, 8, 8, 9).bfloat16()
    g = _geometry(x, w, kw, torch.bfloat16)
    splits, chunk = conv_tc.splits(g)
    assert splits > 1 and chunk % conv_tc.SPLIT_ALIGN == 0, (splits, chunk)
    results = []
    for seed in (0, 1, 2):
        emu.set_seed(seed)
        results.append(conv_tc.tc_grad_weight(_to5(gy), _to5(x), g))
    assert all(torch.equal(results[0], r) for r in results[1:])
    _, _, gw_ref = _reference(x, w, b, gy, kw)
    _check(_from5(results[0], 2), gw_ref, torch.bfloat16, "split-K grad_weight")


def test_batch0_launches_nothing(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("launched a kernel for an empty batch")
    monkeypatch.setattr(launch.Launcher, "launch", no_launch)
    for dtype in DTYPES:
        x, w, b, kw = _inputs("batch0", dtype)
        g = _geometry(x, w, kw, dtype)
        y = conv_tc.tc_forward(_to5(x), _to5(w), b, g)
        assert y.shape == (0, 8, 1, 5, 5) and y.dtype == dtype
        gy = torch.zeros(0, 8, 1, 5, 5, dtype=dtype)
        assert conv_tc.tc_grad_input(gy, _to5(w), g).shape == (0, 8, 1, 5, 5)
        gw = conv_tc.tc_grad_weight(gy, _to5(x), g)
        assert gw.shape == (8, 8, 1, 3, 3) and gw.dtype == dtype and not gw.any()


# ------------------------------------------------------------------------------------- planted bugs
PLANTED = {
    # the barrier between the copies landing and the ldmatrix of the stage (and before its slot is refilled)
    "missing_barrier": ("__syncthreads();                 // ... everyone's", ";  // planted bug: deleted; ... everyone's"),
    # wait for one group fewer: the stage about to be read may still be in flight (poisoned: NaN)
    "early_wait_group": ("cp_async_wait<TC_STAGES - 2>();  // stage", "cp_async_wait<TC_STAGES - 1>();  // stage"),
    # the two n-tiles' B fragments crossed (a wrong fragment layout)
    "swapped_fragment": ("bf[2 * p][0] = r[0]; bf[2 * p][1] = r[1]; bf[2 * p + 1][0] = r[2];",
                         "bf[2 * p][0] = r[0]; bf[2 * p][1] = r[2]; bf[2 * p + 1][0] = r[1];"),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bugs_are_caught(bug, monkeypatch):
    """The kernel text with one bug planted, run through the same launch code: the harness must show
    wrong values (on most thread orders for the race), where the real kernel passes."""
    from fastconv.cuda import loader

    old, new = PLANTED[bug]
    text = loader.source("conv_tc")
    assert text.count(old) >= 1, f"marker of {bug} not found in conv_tc.cu"
    x, w, b, kw = _inputs("multi_tile", torch.float16)
    y_ref = _reference(x, w, b, torch.zeros(1, 136, 12, 12), kw)[0]
    real_source = loader.source
    monkeypatch.setattr(loader, "source", lambda f: text.replace(old, new, 1) if f == "conv_tc" else real_source(f))
    loader.clear()
    try:
        caught = 0
        for seed in range(3):
            emu.set_seed(seed)
            y = _run_passes(x, w, b, torch.zeros(1, 136, 12, 12).half(), kw, torch.float16)[0]
            err = (y.double() - y_ref).abs().nan_to_num(nan=float("inf")).max().item()
            caught += err > TOL[torch.float16] * y_ref.abs().max().item()
        assert caught >= 2, f"{bug}: caught on {caught}/3 thread orders"
    finally:
        monkeypatch.undo()
        loader.clear()


# ------------------------------------------------------------------- through the op (float32 = TF32)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["stride2_pad_odd_channels", "groups2_vec", "dilation_mixed"])
def test_float32_through_the_op_as_tf32(name, layout):
    x, w, b, kw = _inputs(name, torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = F.conv2d(x, w, b, algo="implicit-gemm-tc", **kw)
    r = TF.conv2d(x.double(), w.double(), b.double(), **kw)
    _check(y, r, torch.float32, "forward")
    gy = torch.randn(r.shape)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    want = torch.autograd.grad(r, (x, w, b), gy.double())  # noqa: the reference graph is float64
    for a, e, what in zip(grads, want, ("grad_input", "grad_weight", "grad_bias")):
        _check(a, e, torch.float32, what)


def test_refusals_name_the_reason():
    x, w, b, kw = _inputs("groups2_vec", torch.float32)
    with pytest.raises(ValueError, match="float64 has no tensor-core path"):
        F.conv2d(x.double(), w.double(), algo="implicit-gemm-tc", **kw)
    torch.backends.cudnn.allow_tf32 = False
    with pytest.raises(ValueError, match="allow_tf32 = False forbids"):
        F.conv2d(x, w, algo="implicit-gemm-tc", **kw)
    # ... and auto then runs the float32 SIMT path
    y = F.conv2d(x, w, b, **kw)
    assert (y.double() - TF.conv2d(x.double(), w.double(), b.double(), **kw)).abs().max() < 1e-4


def test_registry_declares_dtypes_and_auto_picks_tensor_cores():
    row = next(r for r in fastconv.algorithms() if r["name"] == "implicit-gemm-tc")
    assert row["dtypes"] == ["float16", "bfloat16", "float32"] and "channels_last" in row["layouts"]
    assert sorted(row["targets"]) == ["cuda", "cuda-emu"]
    simt = next(r for r in fastconv.algorithms() if r["name"] == "implicit-gemm")
    assert simt["dtypes"] == ["float32", "float64", "float16", "bfloat16"]  # SIMT kernels: 16-bit with float32 accumulation

    def geom(dtype, target):
        return make_geometry(2, 2, 64, 64, 1, (8, 8), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1), dtype, target)

    # target "cuda": the registered heuristic itself (choose would autotune there, which needs a GPU)
    assert registry._HEURISTICS["cuda"] is conv_tc.heuristic is registry._HEURISTICS["cuda-emu"]
    for p in registry.PASSES:
        assert registry.choose("auto", geom(torch.float16, "cuda-emu"), p).name == "implicit-gemm-tc"
        assert registry.choose("auto", geom(torch.float32, "cuda-emu"), p).name == "implicit-gemm"
        assert conv_tc.heuristic(geom(torch.bfloat16, "cuda"), p) == "implicit-gemm-tc"
        assert conv_tc.heuristic(geom(torch.float32, "cuda"), p) == "implicit-gemm-tc"
        assert conv_tc.heuristic(geom(torch.float64, "cuda"), p) == "implicit-gemm"
    torch.backends.cudnn.allow_tf32 = False
    assert conv_tc.heuristic(geom(torch.float32, "cuda"), "forward") == "implicit-gemm"
    assert conv_tc.heuristic(geom(torch.float16, "cuda"), "forward") == "implicit-gemm-tc"


def test_gpus_before_sm80_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(conv_tc, "_capability", lambda device: (7, 5))
    g = make_geometry(2, 2, 64, 64, 1, (8, 8), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1), torch.float16, "cuda")
    assert "needs an sm_80 or newer GPU" in conv_tc.refuse(g) and "sm_75" in conv_tc.refuse(g)
    assert conv_tc.heuristic(g, "forward") != "implicit-gemm-tc"
    monkeypatch.setattr(conv_tc, "_capability", lambda device: (9, 0))
    assert conv_tc.refuse(g) is None


def test_workspace_counts_the_split_k_partials(monkeypatch):
    g = make_geometry(2, 64, 8, 8, 1, (16, 16), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1), torch.float16, "cuda")
    s, _ = conv_tc.splits(g)
    weight = 8 * 8 * 9
    assert conv_tc.workspace_bytes(g) >= s * weight * 4
    assert math.prod(g.out_spatial) * g.batch >= s  # never more splits than reduction elements


# ------------------------------------------------------------------------------------ on a real GPU
def _sm80_gpu():
    if not torch.cuda.is_available():
        return None
    try:
        import cupy  # noqa: F401 - the launch path needs it
    except ImportError:
        return None
    return torch.device("cuda") if torch.cuda.get_device_capability()[0] >= 8 else None


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "tf32"])
@pytest.mark.parametrize("name", ["stride2_pad_odd_channels", "groups2_vec", "multi_tile"])
def test_on_the_gpu_matches_torch_and_the_harness(name, dtype):
    """The same launches on an sm_80+ GPU (NVRTC, inline PTX): torch's values, and the harness's to
    within float32 summation order (the harness sums each mma exactly and rounds once)."""
    dev = _sm80_gpu()
    if dev is None:
        pytest.skip("needs an sm_80+ GPU with CuPy (none here); the harness tests above cover the kernels")
    x, w, b, kw = _inputs(name, dtype)
    y_ref = _conv(x.dim() - 2)(x.double(), w.double(), b.double(), **kw)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_ref, gx_ref, gw_ref = _reference(x, w, b, gy, kw)
    g = _geometry(x, w, kw, dtype)
    g_gpu = make_geometry(g.ndim, g.batch, g.in_channels, g.out_channels, g.groups, list(x.shape[2:]),
                          list(w.shape[2:]), None, list(g.stride[3 - g.ndim:]), list(g.padding[3 - g.ndim:]),
                          list(g.padding_end[3 - g.ndim:]), list(g.dilation[3 - g.ndim:]), dtype, "cuda")
    xc, wc, bc, gyc = (_to5(t).to(dev) if t.dim() > 1 else t.to(dev) for t in (x, w, b, gy))
    y = conv_tc.tc_forward(xc, wc, bc, g_gpu)
    gx = conv_tc.tc_grad_input(gyc, wc, g_gpu)
    gw = conv_tc.tc_grad_weight(gyc, xc, g_gpu)
    torch.cuda.synchronize()
    emu_y, emu_gx, emu_gw = _run_passes(x, w, b, gy, kw, dtype)
    for got, want, emu_got, what in zip((y, gx, gw), (y_ref, gx_ref, gw_ref), (emu_y, emu_gx, emu_gw),
                                        ("forward", "grad_input", "grad_weight")):
        got = _from5(got.cpu(), x.dim() - 2)
        _check(got, want, dtype, f"GPU {what}")
        scale = max(want.abs().max().item(), 1e-6)
        assert (got.double() - emu_got.double()).abs().max().item() <= TOL[dtype] * scale / 4, f"GPU vs harness {what}"


def test_shared_memory_opt_in_on_cupys_plain_function(monkeypatch):
    """On a GPU the loader hands out CuPy's ``cupy.cuda.function.Function``, which has no settable
    ``max_dynamic_shared_size_bytes`` (only ``ptr``): the opt-in above 48 KiB goes through the driver's
    ``cuFuncSetAttribute`` (attribute 8), once per function and size; a harness function keeps its setter."""
    import sys
    import types

    calls = []
    driver = types.SimpleNamespace(funcSetAttribute=lambda ptr, attr, value: calls.append((ptr, attr, value)))
    cupy_cuda = types.ModuleType("cupy.cuda")
    cupy_cuda.driver = driver
    cupy = types.ModuleType("cupy")
    cupy.cuda = cupy_cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy_cuda)
    monkeypatch.setattr(conv_tc, "_SHARED_OPT_IN", {})

    plain = types.SimpleNamespace(ptr=0x1234)  # what CuPy's Function offers
    conv_tc._opt_in_shared(plain, 100_000)
    conv_tc._opt_in_shared(plain, 90_000)  # already allowed: no second driver call
    conv_tc._opt_in_shared(plain, 150_000)
    assert calls == [(0x1234, 8, 100_000), (0x1234, 8, 150_000)]

    settable = types.SimpleNamespace(max_dynamic_shared_size_bytes=48 * 1024)
    conv_tc._opt_in_shared(settable, 100_000)
    assert settable.max_dynamic_shared_size_bytes == 100_000 and len(calls) == 2

"""The thin-input kernels (fastconv.cpu.thin_input): dense convs of few input channels (RGB stems), the forward as a
bank of FIRs over the input's padded stride phases, the weight gradient as register-tile dot products over them.
Float64 against torch on every tile (4, 2, 1 vectors, the element tail; banks of four channels and single channels;
blocks of four taps and single taps), strides 1-3 in either dimension, padding before and after (cropping too), 1-D;
the rule that routes stems there; gradcheck and opcheck through the ops with both passes on these kernels; the
reported workspace."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import conv as cc
from fastconv.cpu import micro_gemm, thin_input
from helpers import assert_close


def _calls_of(monkeypatch, name):
    """The calls of ``thin_input.<name>`` from now on (each one its arguments)."""
    calls = []
    real = getattr(thin_input, name)
    monkeypatch.setattr(thin_input, name, lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.fixture
def spy(monkeypatch):
    """The thin-input forward's calls."""
    return _calls_of(monkeypatch, "forward")


@pytest.fixture
def spy_grad_weight(monkeypatch):
    """The thin-input weight gradient's calls."""
    return _calls_of(monkeypatch, "grad_weight")


CASES = [  # N, C, K, H, W, (KH, KW), (sh, sw), (ph, pw)
    (2, 3, 32, 17, 19, (3, 3), (2, 2), (1, 1)),    # a MobileNet stem, small: one bank tile and a tail per row
    (1, 3, 5, 9, 8, (3, 3), (1, 1), (1, 1)),       # a bank of four and one single channel
    (2, 3, 16, 33, 40, (3, 3), (2, 2), (0, 0)),    # unpadded
    (1, 1, 7, 12, 12, (5, 5), (1, 1), (2, 2)),     # one channel, 5x5
    (2, 3, 20, 70, 141, (3, 3), (2, 2), (1, 1)),   # 71 columns: 4-, 2- and 1-vector tiles and the tail
    (1, 3, 24, 65, 66, (5, 5), (3, 3), (2, 2)),    # stride 3: nine phases
    (2, 2, 9, 8, 8, (3, 3), (1, 1), (0, 0)),
    (1, 3, 8, 40, 131, (3, 3), (1, 2), (1, 1)),    # stride only along the width
    (1, 3, 8, 41, 67, (2, 3), (2, 1), (0, 1)),     # a 2x3 kernel, stride only along the height
    (1, 3, 6, 20, 50, (3, 5), (1, 1), (2, 0)),     # padding in one dimension only, wider than the kernel's reach
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_torch(monkeypatch, spy, case, dtype):
    N, C, K, H, W, ksz, stride, pad = case
    monkeypatch.setattr(thin_input, "MIN_ROW_VECTORS", 0)  # every row width, down to the element tail alone
    monkeypatch.setattr(thin_input, "WHOLE_VECTOR_ROWS", False)
    g = torch.Generator().manual_seed(sum(case[:5]))
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    w = torch.randn((K, C) + ksz, generator=g, dtype=dtype)
    b = torch.randn(K, generator=g, dtype=dtype)
    for bias in (b, None):
        assert_close(F.conv2d(x, w, bias, stride, pad, algo="im2col"), TF.conv2d(x, w, bias, stride, pad),
                     what=f"thin input {case} bias={bias is not None}")
    assert spy, "the thin-input forward did not run"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_weight_gradient_matches_torch(monkeypatch, spy_grad_weight, case, dtype):
    """The weight gradient's register tiles (blocks of four channels x four taps, the remaining channels and taps
    one at a time, 4-, 2- and 1-vector column blocks, the element tail) against torch."""
    N, C, K, H, W, ksz, stride, pad = case
    monkeypatch.setattr(thin_input, "MIN_ROW_VECTORS", 0)
    monkeypatch.setattr(thin_input, "WHOLE_VECTOR_ROWS", False)
    g = torch.Generator().manual_seed(sum(case[:5]) + 1)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    w = torch.randn((K, C) + ksz, generator=g, dtype=dtype)
    go = torch.randn_like(TF.conv2d(x, w, None, stride, pad), dtype=dtype)
    got = cc.im2col_grad_weight(go.numpy()[:, :, None], x.numpy()[:, :, None], (1,) + stride, (0,) + pad,
                                (1, 1, 1), 1, (1,) + ksz)
    ref = torch.nn.grad.conv2d_weight(x, w.shape, go, stride, pad)
    assert_close(torch.from_numpy(got[:, :, 0]), ref, what=f"thin input weight gradient {case}")
    assert spy_grad_weight, "the thin-input weight gradient did not run"


def test_cropping_end_padding_matches_torch(spy, monkeypatch):
    """A conv whose padding after is smaller than before (cropped at the end, as the kernels receive
    padding='same' with an even kernel and ConvTranspose's adjoints): the output extent decides the rows read."""
    monkeypatch.setattr(thin_input, "MIN_ROW_VECTORS", 0)
    monkeypatch.setattr(thin_input, "WHOLE_VECTOR_ROWS", False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 20, 37, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    y = F.conv2d(x, w, None, 1, "same", algo="im2col")  # before 1, after 2
    assert_close(y, TF.conv2d(x, w, None, 1, "same"), what="thin input, padding='same' with an even kernel")
    assert spy
    x5, w5 = x.numpy()[:, :, None], w.numpy()[:, :, None]
    got = cc.im2col_forward(x5, w5, None, (1, 1, 1), (0, 2, 2), (1, 1, 1), 1, (1, 17, 33))  # crop 1 at the end
    ref = TF.conv2d(TF.pad(x, [2, 0, 2, 0]), w)[:, :, :17, :33]
    np.testing.assert_allclose(got[:, :, 0], ref.numpy(), rtol=1e-12, atol=1e-12)


def test_one_dimensional_audio_kernel(spy):
    """A 1-D conv of one channel with 80 taps, stride 4 (a raw-audio front end) runs here: one phase row."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1, 4040, generator=g, dtype=torch.float64)  # 992 outputs: whole vectors
    w = torch.randn(16, 1, 80, generator=g, dtype=torch.float64)
    b = torch.randn(16, generator=g, dtype=torch.float64)
    assert_close(F.conv1d(x, w, b, 4, 2, algo="im2col"), TF.conv1d(x, w, b, 4, 2), what="thin input 1-D")
    assert spy


def test_which_convs_take_it():
    f32, vec = 4, micro_gemm.VECTOR_BYTES // 4
    one = (1, 1, 1)
    ok = dict(groups=1, in_channels=3, kernel=(1, 3, 3), stride=(1, 2, 2), dilation=one, in_spatial=(1, 128, 128),
              out_spatial=(1, 64, 64), padding=(0, 1, 1), itemsize=f32)
    assert thin_input.applies(**ok)  # MobileNet's stem
    assert thin_input.applies(**dict(ok, in_channels=8))  # 72 taps
    stem = dict(ok, kernel=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3))  # ResNet's stem: 147 taps
    assert thin_input.applies(**stem) and not thin_input.applies(**stem, pass_="grad_weight")  # forward only
    assert thin_input.applies(**dict(ok, in_channels=8), pass_="grad_weight")  # 72 taps: both passes
    assert not thin_input.applies(**dict(ok, kernel=(1, 11, 11), stride=(1, 4, 4), out_spatial=(1, 32, 32)))  # 363
    assert not thin_input.applies(**dict(ok, groups=3, in_channels=3))  # grouped
    assert not thin_input.applies(**dict(ok, dilation=(1, 2, 2)))
    assert not thin_input.applies(**dict(ok, padding=(0, -1, 0)))  # a crop before
    assert not thin_input.applies(**dict(ok, kernel=(1, 4, 4), stride=(1, 4, 4), out_spatial=(1, 32, 32)))  # patchify
    assert not thin_input.applies(**dict(ok, kernel=(3, 3, 3), in_spatial=(8, 128, 128), out_spatial=(6, 64, 64)))
    assert not thin_input.applies(**dict(ok, kernel=(1, 1, 1), stride=one, padding=(0, 0, 0)))  # one tap
    narrow = thin_input.MIN_ROW_VECTORS * vec - 1
    assert not thin_input.applies(**dict(ok, out_spatial=(1, 64, narrow)))  # LeNet's 28-column rows
    assert thin_input.applies(**dict(ok, out_spatial=(1, 64, narrow + 1)))
    assert not thin_input.applies(**dict(ok, out_spatial=(1, 64, 63)))  # a row's last 15 columns element by element
    assert thin_input.applies(**dict(ok, out_spatial=(1, 56, 112)))  # a 224x224 stem's 7 vectors
    assert thin_input.applies(**dict(ok, out_spatial=(1, 64, 40), itemsize=8))  # float64: 8 to a vector


def test_public_api_gradcheck_and_opcheck():
    """gradcheck (float64) and opcheck through the ops with the forward and the weight gradient on the thin-input
    kernels (the input gradient on im2col's other paths)."""
    from torch.library import opcheck

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 9, 32, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert thin_input.applies(1, 3, (1, 3, 3), (1, 2, 2), (1, 1, 1), (1, 9, 32), (1, 5, 16), (0, 1, 1), 8)
    calls = []
    real_forward, real_grad_weight = thin_input.forward, thin_input.grad_weight
    thin_input.forward = lambda *a: calls.append("forward") or real_forward(*a)
    thin_input.grad_weight = lambda *a: calls.append("grad_weight") or real_grad_weight(*a)
    try:
        assert torch.autograd.gradcheck(lambda x, w, b: F.conv2d(x, w, b, 2, 1, algo="im2col"), (x, w, b))
        opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, [2, 2], [1, 1], [1, 1], [1, 1], 1, "im2col"))
        opcheck(torch.ops.fastconv.conv2d_grad_weight.default,
                (torch.randn(2, 5, 5, 16, generator=g, dtype=torch.float64), x.detach(), [3, 3], [2, 2], [1, 1],
                 [1, 1], [1, 1], 1, "im2col"))
    finally:
        thin_input.forward, thin_input.grad_weight = real_forward, real_grad_weight
    assert {"forward", "grad_weight"} <= set(calls), f"the thin-input kernels did not both run: {calls}"


def test_workspace_matches_what_it_allocates(monkeypatch):
    """The registry's workspace for a thin-input forward is its phase planes: what the kernel allocates besides
    its result."""
    from fastconv import registry
    from fastconv.cpu import memory
    from fastconv.ops.conv import make_geometry
    from helpers import allocations

    g = make_geometry(2, 2, 3, 8, 1, (40, 40), (3, 3), None, (2, 2), (1, 1), (1, 1), (1, 1), torch.float32, "numba")
    assert g.out_spatial[1:] == (20, 20)
    monkeypatch.setattr(thin_input, "MIN_ROW_VECTORS", 0)  # 20 columns: one vector and a tail
    monkeypatch.setattr(thin_input, "WHOLE_VECTOR_ROWS", False)
    alg = registry.choose("im2col", g, "forward")
    phases = thin_input.workspace_bytes(2, 3, (3, 3), (2, 2), (20, 20), 4)
    assert phases == 2 * 3 * 4 * 21 * 21 * 4
    assert alg.workspace_bytes(g) == phases
    x = np.random.default_rng(0).standard_normal((2, 3, 40, 40)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((8, 3, 3, 3)).astype(np.float32)
    y = np.empty((2, 8, 20, 20), np.float32)
    thin_input.forward(x, w, None, (2, 2), (1, 1), (20, 20), y)  # compiled before counting
    memory.clear_scratch()  # (workspaces are reused between calls: count a first call's)
    allocated = allocations(monkeypatch, thin_input,
                            lambda: thin_input.forward(x, w, None, (2, 2), (1, 1), (20, 20), y))
    assert phases in allocated


def test_resnet_stem_forward_runs_here_and_its_weight_gradient_does_not(spy, spy_grad_weight):
    """ResNet's 3 -> 64 7x7 stride-2 stem (147 taps), with the default limits: the forward on the FIR bank, the weight
    gradient left to im2col's other kernels (slower here, see MAX_GRAD_WEIGHT_REDUCTION); float64 against torch."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64, requires_grad=True)  # 32 columns: 4 vectors
    w = torch.randn(8, 3, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    y = F.conv2d(x, w, b, 2, 3, algo="im2col")
    ref = TF.conv2d(x, w, b, 2, 3)
    assert_close(y, ref, what="7x7 stem forward")
    go = torch.randn_like(ref)
    assert_close(torch.autograd.grad(y, w, go)[0], torch.autograd.grad(ref, w, go)[0], what="7x7 stem weight grad")
    assert len(spy) == 1 and not spy_grad_weight

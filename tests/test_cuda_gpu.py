"""The CUDA kernels on a real GPU (skipped without one, or without CuPy): the emu suite's checks
with CUDA tensors, and the launch on torch's current (non-default) stream."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from conftest import assert_close

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
CUDA_ALGOS = ["cuda-direct", "implicit-gemm", "cuda-depthwise"]
CASES = [
    ((2, 3, 9, 8), (4, 3, 3, 3), dict(stride=2, padding=1)),
    ((2, 4, 7, 7), (6, 2, 3, 3), dict(padding="same", groups=2)),
    ((2, 4, 8, 8), (8, 1, 3, 3), dict(padding=1, groups=4)),
    ((3, 70, 9, 9), (66, 70, 1, 1), {}),
    ((1, 2, 6, 5), (3, 2, 4, 2), dict(padding="same", dilation=(1, 2))),
]


@pytest.mark.parametrize("algo", CUDA_ALGOS + ["auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_conv_on_gpu_matches_torch_cpu_float64(case, dtype, algo):
    xs, ws, kw = CASES[case]
    if algo == "cuda-depthwise" and kw.get("groups", 1) != xs[1]:
        return
    x = torch.randn(*xs, dtype=torch.float64)
    w = torch.randn(*ws, dtype=torch.float64)
    b = torch.randn(ws[0], dtype=torch.float64)
    xg, wg, bg = (t.to(DEV, dtype).requires_grad_() for t in (x, w, b))
    y = F.conv2d(xg, wg, bg, algo=algo, **kw)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    r = TF.conv2d(xr, wr, br, **kw)
    assert y.device.type == "cuda"
    assert_close(y.cpu(), r.to(dtype))
    g = torch.randn_like(r)
    got = torch.autograd.grad(y, (xg, wg, bg), g.to(DEV, dtype))
    want = torch.autograd.grad(r, (xr, wr, br), g)
    for a, e in zip(got, want):
        assert_close(a.cpu(), e.to(dtype))


def test_gradcheck_on_gpu():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    for algo in ("cuda-direct", "implicit-gemm"):
        assert torch.autograd.gradcheck(lambda x, w: F.conv2d(x, w, padding="same", algo=algo), (x, w),
                                        fast_mode=True)


def test_pooling_on_gpu():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    x.view(-1)[::7] = float("nan")
    xg = x.to(DEV).requires_grad_()
    xr = x.clone().requires_grad_()
    y, i = F.max_pool2d(xg, 3, 2, 1, ceil_mode=True, return_indices=True)
    r, ri = TF.max_pool2d(xr, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert_close(y.cpu(), r)
    assert torch.equal(i.cpu(), ri)
    g = torch.randn_like(r)
    assert_close(torch.autograd.grad(y, xg, g.to(DEV))[0].cpu(), torch.autograd.grad(r, xr, g)[0])
    z = x.nan_to_num()
    for ours, theirs in ((lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False),
                          lambda t: TF.avg_pool2d(t, 3, 2, 1, count_include_pad=False)),
                         (lambda t: F.adaptive_avg_pool2d(t, (4, 3)), lambda t: TF.adaptive_avg_pool2d(t, (4, 3))),
                         (lambda t: F.adaptive_max_pool2d(t, 3), lambda t: TF.adaptive_max_pool2d(t, 3))):
        assert_close(ours(z.to(DEV)).cpu(), theirs(z))


def test_kernels_run_on_torchs_current_non_default_stream():
    """Work queued on a side stream must be ordered with the kernel: a kernel on the default stream
    would read x before the side stream's long fill finished."""
    side = torch.cuda.Stream()
    x = torch.zeros(4, 16, 64, 64, device=DEV)
    w = torch.ones(8, 16, 3, 3, device=DEV)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)   # keep the side stream busy
        x.fill_(1.0)
        y = F.conv2d(x, w, padding=1, algo="implicit-gemm")
    side.synchronize()
    assert y[0, 0, 10, 10].item() == 16 * 9
    # and the launch used that stream: nothing is pending on the default stream afterwards
    assert torch.cuda.default_stream().query()

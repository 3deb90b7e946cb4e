"""Every compiled CPU kernel can go to Numba's on-disk cache.

A kernel that reads something Numba treats as a dynamic global (``numba.get_num_threads()`` inside the kernel, a
ctypes pointer, a large global array) is silently recompiled in every process: seconds per kernel family on each
start. Numba only warns once, at compile time; this checks the compiled libraries after running the depthwise,
im2col, gather, Winograd and 1x1 paths on small inputs (serial and parallel variants).
"""
import importlib
import pkgutil

import pytest
import torch
import torch.nn.functional as F
from numba.core.registry import CPUDispatcher

import fastconv.functional as FC
from fastconv import config
from fastconv.cpu import parallel


def _dispatchers():
    import fastconv.cpu as cpu
    for info in pkgutil.iter_modules(cpu.__path__):
        module = importlib.import_module(f"fastconv.cpu.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, parallel.SizedKernel):
                yield f"{info.name}.{name}", value.parallel
                yield f"{info.name}.{name}__serial", value.serial
            elif isinstance(value, CPUDispatcher):
                yield f"{info.name}.{name}", value


def test_compiled_kernels_have_no_dynamic_globals(monkeypatch):
    if not config.CACHE:
        pytest.skip("Numba's on-disk cache is switched off in this configuration")
    monkeypatch.setattr(parallel, "COMPUTE_PARALLEL_MIN_ELEMENTS", 1 << 40)  # serial variants first
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    for big in (False, True):
        if big:
            monkeypatch.setattr(parallel, "COMPUTE_PARALLEL_MIN_ELEMENTS", 1)
        for algo in ("depthwise", "auto"):
            w = torch.randn(8, 1, 3, 3, requires_grad=True)
            FC.conv2d(x, w, padding=1, groups=8, algo=algo).sum().backward()
        for algo in ("im2col", "winograd2"):
            w = torch.randn(16, 8, 3, 3, requires_grad=True)
            FC.conv2d(x, w, padding=1, algo=algo).sum().backward()
        w = torch.randn(16, 8, 1, 1, requires_grad=True)
        FC.conv2d(x, w, algo="im2col").sum().backward()
        F.max_pool2d(x, 2)
    compiled, dynamic = 0, []
    for name, dispatcher in _dispatchers():
        for cres in dispatcher.overloads.values():
            compiled += 1
            if cres.library.has_dynamic_globals:
                dynamic.append(name)
    assert compiled > 10, f"only {compiled} compiled kernels found: the check looked in the wrong place"
    assert not dynamic, f"kernels Numba cannot cache (recompiled in every process): {sorted(set(dynamic))}"

"""Registers the CUDA kernels: conv algorithms and heuristic for "cuda" and "cuda-emu", and the
pooling kernels for both targets. Imports no CuPy (that waits for the first CUDA tensor)."""
from __future__ import annotations

from .. import registry
from ..ops import pool as pool_ops
from . import conv, conv_tc, pool

for _algorithm in conv.ALGORITHMS:
    registry.register(_algorithm)
registry.register(registry.ConvAlgorithm(
    conv_tc.NAME, conv_tc.TARGETS, conv_tc.SUMMARY, conv_tc.tc_forward, conv_tc.tc_grad_input, conv_tc.tc_grad_weight,
    refuse=conv_tc.refuse, workspace_bytes=conv_tc.workspace_bytes, dtypes=conv_tc.DTYPES, layouts=conv_tc.LAYOUTS))

for _target in conv.TARGETS:
    registry.register_heuristic(_target, conv_tc.heuristic)
    pool_ops.register_kernels(_target, pool.CudaPoolKernels())

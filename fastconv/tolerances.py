"""How close fastconv's results must be to torch's: one table per dtype, and per algorithm where one is
documented to lose more. Plain data, read by the tests (``tests/helpers.py``) and the benchmark
(:mod:`fastconv.bench_runner`), so both hold the kernels to the same bound.

An element passes when ``|actual - expected| <= atol + rtol * |expected|`` (``torch.testing`` rule).

* float64 is the reference dtype: every op is checked against torch's CPU op in float64.
* float32: a few hundred terms summed in another order (blocking, BLAS, transforms) stay within 1e-4.
* float16 / bfloat16: torch's own conv test tolerances -- float16 ``atol=5e-3, rtol=1e-3`` is the
  override torch's OpInfos for ``nn.functional.conv2d``/``conv3d`` use; torch sets none for bfloat16
  convs, so its ``torch.testing`` default for bfloat16 applies (``rtol=1.6e-2, atol=1e-5``).
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}

ALGORITHM_TOLERANCES: dict[tuple[str, torch.dtype], dict[str, float]] = {
    # Winograd F(4x4,3x3) loses more precision in float32 (DESIGN.md §4: about 3e-5 worse than direct).
    ("winograd4", torch.float32): dict(rtol=5e-4, atol=5e-4),
    # float32 as TF32 on tensor cores (10-bit mantissa, unit roundoff 2**-11): the error of a K-term sum
    # grows like sqrt(K) * 2**-11 * |x||w|, about 1e-2 for unit-normal inputs and K = 144 (torch's own
    # TF32 conv tests loosen to 5e-3 on smaller sums).
    ("implicit-gemm-tc", torch.float32): dict(rtol=1e-2, atol=5e-2),
}


def tolerance(dtype: torch.dtype, algo: str = "auto") -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for results of ``dtype`` computed by ``algo`` (KeyError for other dtypes)."""
    return ALGORITHM_TOLERANCES.get((algo, dtype), TOLERANCES[dtype])

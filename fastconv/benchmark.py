"""The layer benchmark, one import for its users (``fastconv bench``, ``bench/``, the tests).

The work is split by job: :mod:`fastconv.bench_suite` (the layers, as data), :mod:`fastconv.bench_runner`
(check against torch, then time; torch's baseline from a clean worker process,
:mod:`fastconv.bench_torch_worker`) and :mod:`fastconv.bench_report` (statistics, tables, files).
"""
from __future__ import annotations

from .bench_report import (default_out_dir, format_case, format_summary, geomean, plot,  # noqa: F401
                           summarize, write_results)
from .bench_runner import (ALGO_TOLERANCE, MIN_REPS, ROUND_BUDGET_S, TOLERANCE, TorchBaseline,  # noqa: F401
                           algos_for, environment, first_call, measure_gemm, relative_error, run_case,
                           run_suite, tolerance)
from .bench_suite import (PASSES, SUITE, Layer, PassImpl, conv_layer, conv_transpose_layer,  # noqa: F401
                          parse_algos, parse_dtype, parse_passes, pool_layer, select_layers)

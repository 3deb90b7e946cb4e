"""The one place that registers implementations: kernel declarations in, dispatch tables filled.

Kernel modules only *declare* what they provide, as data (:mod:`fastconv.spec` types):

* ``ALGORITHMS`` -- :class:`~fastconv.spec.ConvAlgorithm` entries for the conv passes and
  :class:`~fastconv.spec.OpImplementation` entries for the other op families (``family``: transposed
  convs, the separable op),
* ``HEURISTICS`` -- target -> ``algo='auto'`` rule without measuring,
* ``POOL_IMPLS`` -- target -> :class:`~fastconv.spec.PoolKernels`.

This module imports those declarations downward and registers them with :mod:`fastconv.registry`
(conv algorithms and heuristics) and :mod:`fastconv.ops.pool` (pooling kernels). Importing
``fastconv.ops`` runs it once; to add an implementation module, add it to the tuples below.
Importing the CUDA modules imports no CuPy (that waits for the first CUDA tensor).
"""
from __future__ import annotations

from .. import registry
from ..cpu import algorithms as cpu_algorithms
from ..cpu import pool_impls as cpu_pool
from ..cuda import conv as cuda_conv
from ..cuda import conv_tc as cuda_conv_tc
from ..cuda import pool as cuda_pool
from . import pool as pool_ops
from . import separable as separable_ops

#: Modules declaring ``ALGORITHMS`` (any op family) and ``HEURISTICS`` (conv passes, optional). Within a non-conv
#: family, registration order is ``algo='auto'``'s preference: the kernels' declarations come before the op
#: layer's compositions (``fused`` before ``unfused``).
ALGORITHM_MODULES = (cpu_algorithms, cuda_conv, cuda_conv_tc, separable_ops)  # later heuristics replace earlier ones
#: Modules declaring ``POOL_IMPLS`` (the pooling op families).
POOL_MODULES = (cpu_pool, cuda_pool)


def register_all() -> None:
    """Register every declared implementation (idempotent: a name registered again replaces itself)."""
    for module in ALGORITHM_MODULES:
        for algorithm in module.ALGORITHMS:
            registry.register(algorithm)
        for target, heuristic in getattr(module, "HEURISTICS", {}).items():
            registry.register_heuristic(target, heuristic)
    for module in POOL_MODULES:
        for target, kernels in module.POOL_IMPLS.items():
            pool_ops.register_kernels(target, kernels)


register_all()

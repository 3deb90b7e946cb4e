"""fastconv.flops: count a model's work per module and per op, check textbook claims against the clock.

=========================== ==========================================================================
:func:`count`               run a model once; :class:`Report` with the module tree, op rows and totals
:mod:`.executed`            what each algorithm really executes (multiplications, workspace)
:func:`measure`             claim vs clock: time each conv/pool layer (auto vs torch), roofline
:func:`what_if`             MACs, params and time of 1x1-bottleneck / depthwise-separable replacements
:func:`fvcore_handles`      fvcore op handles (and ptflops/thop hooks) so those tools count fastconv ops
=========================== ==========================================================================

Units: see :mod:`fastconv.flops.counting` (MACs, FLOPs = 2 x MACs, bias adds and pool ops separate).
"""
from __future__ import annotations

from .counting import Row, conv_geometry, conv_macs, conv_transpose_macs, count, decide
from .executed import EXECUTED, executed_multiplications
from .report import Counts, Node, Report

__all__ = ["count", "Report", "Row", "Node", "Counts", "conv_macs", "conv_transpose_macs", "conv_geometry",
           "decide", "EXECUTED", "executed_multiplications", "measure", "what_if", "fvcore_handles",
           "ptflops_hooks", "thop_ops"]


def __getattr__(name):
    # the measuring, what-if and third-party pieces load on first use (matplotlib, fvcore, ... stay optional)
    if name in ("measure", "roofline_machine"):
        from . import roofline
        return getattr(roofline, name)
    if name == "what_if":
        from .whatif import what_if
        return what_if
    if name in ("fvcore_handles", "ptflops_hooks", "thop_ops"):
        from . import handles
        return getattr(handles, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""``depthwise_separable_conv2d``: depthwise k x k convolution, then 1x1 pointwise (MobileNet block)."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from ..ops import separable as separable_ops
from ._checks import IntOrSeq, check_type
from ..ops._layout import laid_out, result_format
from .conv import ConvArgs

OP = "depthwise_separable_conv2d"


def depthwise_separable_conv2d(input: Tensor, depthwise_weight: Tensor, pointwise_weight: Tensor,
                               depthwise_bias: Optional[Tensor] = None, pointwise_bias: Optional[Tensor] = None,
                               stride: IntOrSeq = 1, padding: Union[str, IntOrSeq] = 0, dilation: IntOrSeq = 1,
                               *, algo: str = "auto") -> Tensor:
    """Depthwise-separable 2-D convolution: a depthwise ``kh x kw`` convolution, then a 1x1 pointwise one.

    Equal to ``conv2d(conv2d(input, depthwise_weight, depthwise_bias, stride, padding, dilation,
    groups=C), pointwise_weight, pointwise_bias)`` (no activation in between).

    Shapes: input (N, C, H, W) or unbatched (C, H, W); depthwise_weight (C*m, 1, kh, kw) with depth
    multiplier m; pointwise_weight (K, C*m, 1, 1); depthwise_bias (C*m,); pointwise_bias (K,)
    -> (N, K, H_out, W_out) or (K, H_out, W_out), H_out as for :func:`fastconv.functional.conv2d`.
    ``stride``, ``padding`` (int, pair, ``'same'`` or ``'valid'``) and ``dilation`` apply to the
    depthwise convolution.

    ``algo``: ``"fused"`` (CPU only) computes the depthwise output a cache-sized block at a time and
    feeds it to the pointwise GEMM at once, never writing the intermediate (N, C*m, H_out, W_out)
    tensor; ``"unfused"`` runs the two convolutions one after the other; ``"auto"`` picks (fused on
    the CPU, see :mod:`fastconv.ops.separable`).
    """
    check_type(OP, "input", input)
    check_type(OP, "depthwise_weight", depthwise_weight)
    check_type(OP, "pointwise_weight", pointwise_weight)
    check_type(OP, "depthwise_bias", depthwise_bias, optional=True)
    check_type(OP, "pointwise_bias", pointwise_bias, optional=True)
    if not isinstance(algo, str) or algo not in separable_ops.algo_names():
        raise ValueError(f"fastconv.{OP}: unknown algo {algo!r}; expected one of "
                         f"{', '.join(separable_ops.algo_names())}")
    # The depthwise half's stride/padding/dilation normalisation is conv2d's; the shapes, dtypes and devices
    # of all five tensors are checked by the op (fastconv.ops.validation.separable_op).
    a = ConvArgs(OP, 2, input, depthwise_weight, depthwise_bias, stride, padding, dilation, 1, "auto")
    out = separable_ops.depthwise_separable_conv2d(a.input, depthwise_weight, pointwise_weight, depthwise_bias,
                                                   pointwise_bias, *a.lists(), algo)
    return out.squeeze(0) if a.unbatched else laid_out(out, result_format(a.input, depthwise_weight))

"""``depthwise_separable_conv2d``: depthwise k x k convolution, then 1x1 pointwise (MobileNet block)."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from ..ops import separable as separable_ops
from ._checks import IntOrSeq, check_same, check_tensor
from .conv import ConvArgs

OP = "depthwise_separable_conv2d"


def _check_weights(input: Tensor, dw: Tensor, pw: Tensor, db: Optional[Tensor], pb: Optional[Tensor]) -> None:
    """Shapes of the two weights and biases against each other and the input's channel count."""
    if dw.dim() != 4:
        raise RuntimeError(f"{OP}: expected depthwise_weight to be 4-D (in_channels * depth_multiplier, 1, kh, kw), "
                           f"got {dw.dim()}-D depthwise_weight of size {list(dw.shape)}")
    if pw.dim() != 4:
        raise RuntimeError(f"{OP}: expected pointwise_weight to be 4-D (out_channels, in_channels * "
                           f"depth_multiplier, 1, 1), got {pw.dim()}-D pointwise_weight of size {list(pw.shape)}")
    if input.dim() not in (3, 4):
        return  # ConvArgs reports the input's rank
    C = input.shape[-3]
    M = dw.shape[0]
    if dw.shape[1] != 1:
        raise RuntimeError(f"{OP}: depthwise_weight must have 1 input channel per group (shape (M, 1, kh, kw)), "
                           f"got depthwise_weight of size {list(dw.shape)}")
    if C == 0 or M % C != 0 or M == 0:
        raise RuntimeError(f"{OP}: depthwise_weight has {M} output channels, which is not a positive multiple "
                           f"of the input's {C} channels (expected depthwise_weight.shape[0] == "
                           f"input.shape[1] * depth_multiplier)")
    if pw.shape[1] != M:
        raise RuntimeError(f"{OP}: pointwise_weight has {pw.shape[1]} input channels but depthwise_weight has "
                           f"{M} output channels (expected pointwise_weight.shape[1] == depthwise_weight.shape[0])")
    if tuple(pw.shape[2:]) != (1, 1):
        raise RuntimeError(f"{OP}: pointwise_weight must be 1x1 (shape (out_channels, {M}, 1, 1)), "
                           f"got kernel {tuple(pw.shape[2:])}")
    if db is not None and tuple(db.shape) != (M,):
        raise RuntimeError(f"{OP}: expected depthwise_bias of shape ({M},) to match depthwise_weight.shape[0], "
                           f"got {list(db.shape)}")
    if pb is not None and tuple(pb.shape) != (pw.shape[0],):
        raise RuntimeError(f"{OP}: expected pointwise_bias of shape ({pw.shape[0]},) to match "
                           f"pointwise_weight.shape[0], got {list(pb.shape)}")


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
    the CPU, see :func:`fastconv.ops.separable.choose_algo`).
    """
    check_tensor(OP, "input", input)
    check_tensor(OP, "depthwise_weight", depthwise_weight)
    check_tensor(OP, "pointwise_weight", pointwise_weight)
    check_tensor(OP, "depthwise_bias", depthwise_bias, optional=True)
    check_tensor(OP, "pointwise_bias", pointwise_bias, optional=True)
    check_same(OP, "input", input, depthwise_weight=depthwise_weight, pointwise_weight=pointwise_weight,
               depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias)
    if not isinstance(algo, str) or algo not in separable_ops.ALGOS:
        raise ValueError(f"{OP}: unknown algo {algo!r}; expected one of {', '.join(separable_ops.ALGOS)}")
    _check_weights(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias)
    # The depthwise half is an ordinary grouped conv: its stride/padding/dilation/size checks are conv2d's.
    groups = input.shape[-3] if input.dim() in (3, 4) else 1
    a = ConvArgs(OP, 2, input, depthwise_weight, depthwise_bias, stride, padding, dilation, groups, "auto")
    out = separable_ops.depthwise_separable_conv2d(a.input, depthwise_weight, pointwise_weight, depthwise_bias,
                                                   pointwise_bias, *a.lists(), algo)
    return out.squeeze(0) if a.unbatched else out

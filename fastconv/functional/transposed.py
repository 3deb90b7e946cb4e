"""``conv_transpose1d``, ``conv_transpose2d``, ``conv_transpose3d``: torch.nn.functional's signatures and
semantics (note torch's argument order: ``groups`` before ``dilation``), plus ``algo=``."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..ops import transposed as transposed_ops
from ._checks import IntOrSeq, batched, check_groups, check_same, check_type, int_tuple
from ..ops._layout import laid_out, result_format


class ConvTransposeArgs:
    """Normalised arguments of one N-d transposed convolution call (tuples of ``ndim`` ints).

    Only what the registered op cannot see is checked here (Python types, unbatched input, padding
    strings, ``algo``); shapes, dtypes, devices, output_padding and the output size are checked by the op
    (:func:`fastconv.ops.validation.conv_transpose_op`), once, before any kernel runs.
    """

    def __init__(self, op: str, ndim: int, input, weight, bias, stride, padding, output_padding, groups,
                 dilation, algo):
        self.op, self.ndim = op, ndim
        check_type(op, "input", input)
        check_type(op, "weight", weight)
        check_type(op, "bias", bias, optional=True)
        check_same(op, "input", input, dtype=False, weight=weight, bias=bias)
        self.input, self.unbatched = batched(op, "input", input, ndim)
        self.weight, self.bias = weight, bias
        self.groups = check_groups(op, groups)
        self.stride = int_tuple(op, "stride", stride, ndim, minimum=1)
        if isinstance(padding, str):
            # torch's conv_transpose*d accepts no padding strings either (TypeError there too): 'same'
            # has no single meaning when the output is larger than the input.
            raise TypeError(f"fastconv.{op}: padding must be an int or a tuple of {ndim} ints, got the string {padding!r}; "
                            f"transposed convolutions do not accept 'same' or 'valid' (use output_padding or "
                            f"the module's output_size to fix the output size)")
        self.padding = int_tuple(op, "padding", padding, ndim, minimum=0)
        self.output_padding = int_tuple(op, "output_padding", output_padding, ndim, minimum=0)
        self.dilation = int_tuple(op, "dilation", dilation, ndim, minimum=1)
        if not isinstance(algo, str) or algo not in transposed_ops.algo_names():
            raise ValueError(f"fastconv.{op}: unknown algo {algo!r}; expected one of "
                             f"{', '.join(transposed_ops.algo_names())}")
        self.algo = algo

    def output_spatial(self) -> list[int]:
        return [transposed_ops.transposed_output_size(i, k, s, p, op_, d) for i, k, s, p, op_, d in
                zip(self.input.shape[2:], self.weight.shape[2:], self.stride, self.padding, self.output_padding,
                    self.dilation)]

    def lists(self) -> tuple[list[int], list[int], list[int], list[int]]:
        return list(self.stride), list(self.padding), list(self.output_padding), list(self.dilation)


def _conv_transpose(ndim: int, input, weight, bias, stride, padding, output_padding, groups, dilation,
                    algo) -> Tensor:
    op = f"conv_transpose{ndim}d"
    a = ConvTransposeArgs(op, ndim, input, weight, bias, stride, padding, output_padding, groups, dilation, algo)
    out = transposed_ops.OPS[ndim](a.input, a.weight, a.bias, *a.lists(), a.groups, a.algo)
    return out.squeeze(0) if a.unbatched else laid_out(out, result_format(a.input, a.weight))


def conv_transpose1d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrSeq = 1,
                     padding: IntOrSeq = 0, output_padding: IntOrSeq = 0, groups: int = 1,
                     dilation: IntOrSeq = 1, *, algo: str = "auto") -> Tensor:
    """1-D transposed convolution, as :func:`torch.nn.functional.conv_transpose1d`.

    input (N, C_in, L) or (C_in, L); weight (C_in, C_out/groups, k); bias (C_out,)
    -> (N, C_out, L_out) or (C_out, L_out), with
    L_out = (L - 1)*stride - 2*padding + dilation*(k - 1) + output_padding + 1.
    ``output_padding`` must be smaller than ``stride`` or ``dilation``. ``algo`` picks the algorithm
    (see :func:`fastconv.algorithms`, plus ``"patch_gemm"`` for kernel == stride); ``"auto"`` chooses.
    """
    return _conv_transpose(1, input, weight, bias, stride, padding, output_padding, groups, dilation, algo)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrSeq = 1,
                     padding: IntOrSeq = 0, output_padding: IntOrSeq = 0, groups: int = 1,
                     dilation: IntOrSeq = 1, *, algo: str = "auto") -> Tensor:
    """2-D transposed convolution ("deconvolution"), as :func:`torch.nn.functional.conv_transpose2d`.

    input (N, C_in, H, W) or (C_in, H, W); weight (C_in, C_out/groups, kH, kW); bias (C_out,)
    -> (N, C_out, H_out, W_out) or (C_out, H_out, W_out), with
    H_out = (H - 1)*stride[0] - 2*padding[0] + dilation[0]*(kH - 1) + output_padding[0] + 1 (W alike).
    It is the input gradient of ``conv2d`` with the same weight, stride, padding, dilation and groups.
    ``output_padding`` must be smaller than ``stride`` or ``dilation``. ``algo`` picks the algorithm
    (see :func:`fastconv.algorithms`, plus ``"patch_gemm"`` for kernel == stride); ``"auto"`` chooses.
    """
    return _conv_transpose(2, input, weight, bias, stride, padding, output_padding, groups, dilation, algo)


def conv_transpose3d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrSeq = 1,
                     padding: IntOrSeq = 0, output_padding: IntOrSeq = 0, groups: int = 1,
                     dilation: IntOrSeq = 1, *, algo: str = "auto") -> Tensor:
    """3-D transposed convolution, as :func:`torch.nn.functional.conv_transpose3d`.

    input (N, C_in, D, H, W) or (C_in, D, H, W); weight (C_in, C_out/groups, kD, kH, kW); bias (C_out,)
    -> (N, C_out, D_out, H_out, W_out) or unbatched, each size by the formula of
    :func:`conv_transpose2d`.
    """
    return _conv_transpose(3, input, weight, bias, stride, padding, output_padding, groups, dilation, algo)

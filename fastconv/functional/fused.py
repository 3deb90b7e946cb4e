"""``conv_bias_act``: a convolution, its bias and an activation in one op (the inference epilogue)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..ops import fused as fused_ops
from ._checks import IntOrSeq, check_type
from ..ops._layout import laid_out, result_format
from ..ops.eager import direct_ok
from .conv import ConvArgs, Padding

#: The activations :func:`conv_bias_act` applies.
ACTIVATIONS = fused_ops.ACTIVATIONS

#: (ndim, weight's spatial shape, stride, padding, dilation, groups, algo) -> the op's normalised arguments.
_NORMALISED: dict = {}


def conv_bias_act(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrSeq = 1,
                  padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1, *, activation: str = "relu",
                  algo: str = "auto") -> Tensor:
    """``act(conv(input, weight, bias, ...))`` in one op, the conv's rank taken from ``weight``.

    input (N, C, *S) or unbatched (C, *S) with 1-3 spatial dims; weight (K, C/groups, *R) with the same number
    of spatial dims; bias (K,) or None -> (N, K, *O) (or (K, *O) unbatched), ``O`` as in
    :func:`fastconv.functional.conv2d`. The other arguments are :func:`torch.nn.functional.conv2d`'s.

    ``activation``: ``"relu"`` (as :func:`torch.relu`), ``"relu6"`` (as :func:`torch.nn.functional.relu6`,
    MobileNet's clamp to [0, 6]) or ``"none"`` (bias only). NaN stays NaN, as in torch.

    On CPU tensors the bias add and the activation run as one pass over the conv's output buffer (see
    :mod:`fastconv.ops.fused`); on CUDA (and the CUDA harness) the conv adds the bias and torch's in-place
    activation follows. Differentiable (gradients through fastconv's conv gradient ops).

    >>> y = conv_bias_act(x, w, b, padding=1, activation="relu")   # == torch.relu(F.conv2d(x, w, b, padding=1))
    """
    ndim = weight.dim() - 2 if isinstance(weight, Tensor) else None
    key = None
    if ndim in fused_ops.OPS and isinstance(input, Tensor) and input.dim() == ndim + 2 and (
            bias is None or isinstance(bias, Tensor)):
        # a layer repeats its arguments on every call: normalise them once (as functional.conv does)
        try:
            key = (ndim, weight.shape[2:], stride, padding, dilation, groups, algo)
            args = _NORMALISED.get(key)
        except TypeError:  # an unhashable argument (a list): the full path below
            key = args = None
        if args is not None and weight.device == input.device and (bias is None or bias.device == input.device):
            # an inference call on plain tensors skips torch's dispatcher (see fastconv.ops.eager)
            run = fused_ops.IMPLEMENTATIONS[ndim] if direct_ok(input, weight, bias) else fused_ops.OPS[ndim]
            out = run(input, weight, bias, *args, activation)
            return laid_out(out, result_format(input, weight))
    op = f"conv{ndim}d_bias_act" if ndim in fused_ops.OPS else "conv_bias_act"
    fused_ops.check_activation(op, activation)
    if ndim not in fused_ops.OPS:
        check_type(op, "weight", weight)
        raise RuntimeError(f"fastconv.conv_bias_act: weight must be (K, C/groups, *kernel) with 1 to 3 spatial "
                           f"dims, got a {weight.dim()}-D weight of shape {list(weight.shape)}")
    a = ConvArgs(op, ndim, input, weight, bias, stride, padding, dilation, groups, algo)
    args = (*a.lists(), a.groups, a.algo)
    if not a.unbatched and key is not None and len(_NORMALISED) < 4096:
        _NORMALISED[key] = args
    out = fused_ops.OPS[ndim](a.input, a.weight, a.bias, *args, activation)
    return out.squeeze(0) if a.unbatched else laid_out(out, result_format(a.input, a.weight))

"""``ConvBiasAct``: a convolution, its bias and a ReLU/ReLU6 as one layer (what :func:`fastconv.optimize` builds)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional as F
from ..functional.fused import ACTIVATIONS

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ConvBiasAct(nn.Module):
    """``activation(conv(x))`` in one fastconv op (:func:`fastconv.functional.conv_bias_act`), for inference.

    Built from an existing conv layer with :meth:`from_conv` (the parameters are the layer's own tensors, not
    copies), usually by :func:`fastconv.optimize`, which fuses every conv whose output only feeds a ReLU or
    ReLU6. On CPU tensors the bias add and the activation run in one pass over the conv's output instead of two
    extra passes (see :mod:`fastconv.ops.fused`). Gradients work (it is not limited to ``no_grad``).

    Shapes, for a conv of rank d (1, 2, 3): input (N, C_in, *S) or (C_in, *S) -> (N, C_out, *S_out), with
    ``S_out`` as the conv's; weight (C_out, C_in/groups, *kernel_size), bias (C_out,) or None.

    Attributes: ``weight``, ``bias`` (parameters), ``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding`` (ints or ``'same'``/``'valid'``), ``dilation``, ``groups``, ``activation``
    (``'relu'``, ``'relu6'`` or ``'none'``), ``algo`` (the conv algorithm, default ``'auto'``).
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], stride=1, padding=0, dilation=1,
                 groups: int = 1, *, activation: str = "relu", algo: str = "auto"):
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() not in (3, 4, 5):
            raise ValueError(f"ConvBiasAct: weight must be a (C_out, C_in/groups, *kernel) tensor with 1 to 3 "
                             f"spatial dims, got {type(weight).__name__}"
                             + (f" of shape {list(weight.shape)}" if isinstance(weight, Tensor) else ""))
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvBiasAct: unknown activation {activation!r}; expected one of "
                             f"{', '.join(repr(a) for a in ACTIVATIONS)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        nd = weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.activation, self.algo = activation, algo
        self.in_channels, self.out_channels = weight.shape[1] * groups, weight.shape[0]
        self.kernel_size = tuple(weight.shape[2:])
        self.ndim = nd

    @classmethod
    def from_conv(cls, conv: nn.Module, activation: str = "relu") -> "ConvBiasAct":
        """The fused layer for ``conv`` (torch's or fastconv's ``Conv1d``/``Conv2d``/``Conv3d``, padding_mode
        ``'zeros'``) followed by ``activation``; shares ``conv``'s parameters."""
        if not isinstance(conv, _CONVS):
            raise TypeError(f"ConvBiasAct.from_conv: expected a Conv1d, Conv2d or Conv3d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"ConvBiasAct.from_conv: padding_mode must be 'zeros' (the fused op pads with zeros), "
                             f"got {conv.padding_mode!r}")
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                   activation=activation, algo=getattr(conv, "algo", "auto"))

    def forward(self, input: Tensor) -> Tensor:
        return F.conv_bias_act(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                               activation=self.activation, algo=self.algo)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in (0, (0,) * self.ndim):
            s += f", padding={self.padding}"
        if self.dilation not in (1, (1,) * self.ndim):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        s += f", activation={self.activation!r}"
        return s if self.algo == "auto" else f"{s}, algo={self.algo!r}"


"""``DepthwiseSeparableConv2d``: depthwise k x k then 1x1 pointwise convolution, as one fastconv op."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as torch_F

from .. import functional as F
from ..ops import separable as separable_ops
from .conv import Conv2d


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise-separable 2-D convolution (MobileNet): input (N, C_in, H, W) or (C_in, H, W)
    -> (N, C_out, H_out, W_out) or (C_out, H_out, W_out).

    Computes ``pointwise(depthwise(x))`` with no activation in between, through the single op
    :func:`fastconv.functional.depthwise_separable_conv2d` (fused on the CPU: the intermediate tensor
    is never written out).

    Parameters (``state_dict`` keys), initialised like :class:`torch.nn.Conv2d`:

    * ``depthwise.weight`` (C_in * depth_multiplier, 1, kh, kw), ``depthwise.bias`` (C_in * depth_multiplier,)
    * ``pointwise.weight`` (C_out, C_in * depth_multiplier, 1, 1), ``pointwise.bias`` (C_out,)

    ``depthwise`` and ``pointwise`` are :class:`fastconv.nn.Conv2d` layers (``groups=C_in`` and 1x1),
    usable on their own. ``stride``, ``padding`` (int, pair, ``'same'``, ``'valid'``), ``dilation`` and
    ``padding_mode`` apply to the depthwise convolution; ``bias=False`` drops both biases. ``algo`` is
    ``"auto"``, ``"fused"`` or ``"unfused"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 depth_multiplier: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None,
                 dtype=None, *, algo: str = "auto"):
        super().__init__()
        if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ValueError(f"DepthwiseSeparableConv2d: depth_multiplier must be a positive int, "
                             f"got {depth_multiplier!r}")
        if algo not in separable_ops.algo_names():
            raise ValueError(f"DepthwiseSeparableConv2d: unknown algo {algo!r}; expected one of "
                             f"{', '.join(separable_ops.algo_names())}")
        mid = in_channels * depth_multiplier
        kw = dict(device=device, dtype=dtype)
        self.depthwise = Conv2d(in_channels, mid, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                groups=in_channels, bias=bias, padding_mode=padding_mode, **kw)
        self.pointwise = Conv2d(mid, out_channels, 1, bias=bias, **kw)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth_multiplier = depth_multiplier
        self.algo = algo

    def forward(self, input: Tensor) -> Tensor:
        dw, pw = self.depthwise, self.pointwise
        padding = dw.padding
        if dw.padding_mode != "zeros":
            # As torch's Conv2d: pad with the mode first, then convolve without padding.
            input = torch_F.pad(input, dw._reversed_padding_repeated_twice, mode=dw.padding_mode)
            padding = 0
        return F.depthwise_separable_conv2d(input, dw.weight, pw.weight, dw.bias, pw.bias, dw.stride, padding,
                                            dw.dilation, algo=self.algo)

    def extra_repr(self) -> str:
        dw = self.depthwise
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={dw.kernel_size}, stride={dw.stride}, "
             f"padding={dw.padding!r}")
        if dw.dilation != (1, 1):
            s += f", dilation={dw.dilation}"
        if self.depth_multiplier != 1:
            s += f", depth_multiplier={self.depth_multiplier}"
        if dw.bias is None:
            s += ", bias=False"
        if dw.padding_mode != "zeros":
            s += f", padding_mode={dw.padding_mode!r}"
        if self.algo != "auto":
            s += f", algo={self.algo!r}"
        return s

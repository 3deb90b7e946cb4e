"""Drop-in ``ConvTranspose1d``/``ConvTranspose2d``/``ConvTranspose3d`` running fastconv's kernels.

They subclass torch's classes, so the constructor, parameter names and shapes (weight
(in_channels, out_channels/groups, *kernel_size)), initialisation, ``state_dict``, ``extra_repr``,
the ``padding_mode='zeros'``-only rule and ``isinstance(m, torch.nn.ConvTranspose2d)`` are torch's own;
only the computation is replaced. ``forward(input, output_size=None)`` resolves ``output_size`` with
torch's own ``_output_padding`` (same errors, same accepted range). One keyword is added: ``algo``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional as F
from ..ops import transposed as transposed_ops
from .convert import _copy_state, replaces


class _FastConvTransposeMixin:
    """Shared forward of the N-d transposed conv modules."""

    _functional = None  # set by subclasses: fastconv.functional.conv_transpose{1,2,3}d
    _ndim = 0

    def _init_algo(self, algo: str) -> None:
        if algo not in transposed_ops.algo_names():
            raise ValueError(f"{type(self).__name__}: unknown algo {algo!r}; expected one of "
                             f"{', '.join(transposed_ops.algo_names())}")
        self.algo = algo

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        """input (N, C_in, *S) or (C_in, *S) -> (N, C_out, *S_out) or (C_out, *S_out).

        ``output_size`` (the spatial sizes, optionally with the leading batch/channel dims) picks one of
        the ``stride`` output sizes that map back to the input size, as in torch.
        """
        if self.padding_mode != "zeros":
            # Unreachable through the constructor (torch refuses it there); guards later assignment.
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              self._ndim, self.dilation)
        conv = type(self)._functional
        return conv(input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                    self.dilation, algo=self.algo)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.algo == "auto" else f"{s}, algo={self.algo!r}"

    @classmethod
    def from_torch(cls, module: nn.Module):
        """A fastconv layer with ``module``'s configuration and its very parameters (no copies)."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                  padding=module.padding, output_padding=module.output_padding, groups=module.groups,
                  bias=module.bias is not None, dilation=module.dilation, padding_mode=module.padding_mode,
                  device="meta")
        return _copy_state(new, module)


@replaces(nn.ConvTranspose1d)
class ConvTranspose1d(_FastConvTransposeMixin, nn.ConvTranspose1d):
    """Drop-in :class:`torch.nn.ConvTranspose1d`: input (N, C_in, L) -> (N, C_out, L_out)."""

    _functional = staticmethod(F.conv_transpose1d)
    _ndim = 1

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_algo(algo)


@replaces(nn.ConvTranspose2d)
class ConvTranspose2d(_FastConvTransposeMixin, nn.ConvTranspose2d):
    """Drop-in :class:`torch.nn.ConvTranspose2d`: input (N, C_in, H, W) -> (N, C_out, H_out, W_out).

    Same constructor as torch (``in_channels, out_channels, kernel_size, stride=1, padding=0,
    output_padding=0, groups=1, bias=True, dilation=1, padding_mode='zeros', device=None, dtype=None``)
    plus ``algo``; ``forward(input, output_size=None)`` as torch.
    """

    _functional = staticmethod(F.conv_transpose2d)
    _ndim = 2

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_algo(algo)


@replaces(nn.ConvTranspose3d)
class ConvTranspose3d(_FastConvTransposeMixin, nn.ConvTranspose3d):
    """Drop-in :class:`torch.nn.ConvTranspose3d`: input (N, C_in, D, H, W) -> (N, C_out, D_out, H_out, W_out)."""

    _functional = staticmethod(F.conv_transpose3d)
    _ndim = 3

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_algo(algo)

"""Drop-in ``Conv1d``/``Conv2d``/``Conv3d`` running fastconv's kernels.

They subclass torch's classes, so the constructor, parameter names, shapes, initialisation,
``state_dict``, ``extra_repr`` and ``isinstance(m, torch.nn.Conv2d)`` are torch's own; only the
computation is replaced. One keyword is added: ``algo`` (default ``"auto"``).
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as torch_F

from .. import functional as F
from ..functional.conv import repeat_call
from ..ops.eager import direct_grad_ok, direct_ok
from .convert import _copy_state, replaces


class _FastConvMixin:
    """Shared forward for the N-d conv modules: padding modes by torch's rule, then fastconv's conv."""

    _functional = None  # set by subclasses: fastconv.functional.conv{1,2,3}d

    def _init_algo(self, algo: str) -> None:
        from .. import registry

        if algo not in registry.names():
            raise ValueError(f"{type(self).__name__}: unknown algo {algo!r}; expected one of "
                             f"{', '.join(registry.names())}")
        self.algo = algo

    #: The layer's planned calls, inference and training (:mod:`fastconv.ops.repeat_call`), made after a call that
    #: could use them and used while the layer's arguments are those it was made with (``_repeat_args``).
    _repeat_call = None
    _repeat_args = None

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = type(self)._functional
        call = self._repeat_call
        args = (self.stride, self.padding, self.dilation, self.groups, self.algo, self.padding_mode)
        if call is not None and args == self._repeat_args:
            if direct_ok(input, weight, bias):
                out = call(input, weight, bias)
                if out is not None:
                    return out
            elif direct_grad_ok(input, weight, bias):
                out = call.training(input, weight, bias)
                if out is not None:
                    return out
        if self.padding_mode != "zeros":
            # Same as torch: pad explicitly with the mode, then convolve without padding.
            padded = torch_F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(padded, weight, bias, self.stride, 0, self.dilation, self.groups, algo=self.algo)
        out = conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, algo=self.algo)
        # an inference or training call on a contiguous input: plan the next ones (a channels_last layer never
        # could, and skips the attempt; the attributes are set only when they change: Module.__setattr__ costs a
        # microsecond)
        if input.is_contiguous() and (direct_ok(input, weight, bias) or direct_grad_ok(input, weight, bias)):
            call = repeat_call(type(self)._ndim, input, weight, bias, self.stride, self.padding, self.dilation,
                               self.groups, self.algo)
            if call is not None or self._repeat_call is not None:
                self._repeat_call, self._repeat_args = call, args
        return out

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.algo == "auto" else f"{s}, algo={self.algo!r}"

    @classmethod
    def from_torch(cls, module: nn.Module):
        """A fastconv layer with ``module``'s configuration and its very parameters."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                  padding=module.padding, dilation=module.dilation, groups=module.groups,
                  bias=module.bias is not None, padding_mode=module.padding_mode, device="meta")
        return _copy_state(new, module)


@replaces(nn.Conv1d)
class Conv1d(_FastConvMixin, nn.Conv1d):
    """Drop-in :class:`torch.nn.Conv1d`: input (N, C_in, L) -> (N, C_out, L_out)."""

    _functional = staticmethod(F.conv1d)
    _ndim = 1

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_algo(algo)


@replaces(nn.Conv2d)
class Conv2d(_FastConvMixin, nn.Conv2d):
    """Drop-in :class:`torch.nn.Conv2d`: input (N, C_in, H, W) -> (N, C_out, H_out, W_out).

    Same constructor as torch (``in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode='zeros', device=None, dtype=None``) plus ``algo``.
    """

    _functional = staticmethod(F.conv2d)
    _ndim = 2

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_algo(algo)


@replaces(nn.Conv3d)
class Conv3d(_FastConvMixin, nn.Conv3d):
    """Drop-in :class:`torch.nn.Conv3d`: input (N, C_in, D, H, W) -> (N, C_out, D_out, H_out, W_out)."""

    _functional = staticmethod(F.conv3d)
    _ndim = 3

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_algo(algo)

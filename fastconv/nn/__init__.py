"""Drop-in ``torch.nn`` modules running fastconv's kernels, and ``convert(model)``."""
from .conv import Conv1d, Conv2d, Conv3d
from .separable import DepthwiseSeparableConv2d
from .fused import ConvBiasAct
from .pool import *  # noqa: F401,F403
from .pool import __all__ as _pool_all
from .transposed import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from .convert import convert, to_torch
from .optimize import optimize

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "convert", "to_torch", "optimize"]
__all__ += _pool_all
__all__ += ["DepthwiseSeparableConv2d", "ConvBiasAct"]

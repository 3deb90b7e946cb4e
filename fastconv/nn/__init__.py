"""Drop-in ``torch.nn`` modules running fastconv's kernels, and ``convert(model)``."""
from .conv import Conv1d, Conv2d, Conv3d
from .convert import convert

__all__ = ["Conv1d", "Conv2d", "Conv3d", "convert"]

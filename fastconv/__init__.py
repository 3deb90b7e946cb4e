"""fastconv: convolution and pooling kernels for PyTorch.

Every op runs on fastconv's own kernels (Numba on the CPU, CUDA C through CuPy on the GPU) and is a
registered ``torch.ops.fastconv.*`` custom op with autograd, so it trains, compiles and counts FLOPs
like torch's own.

    import fastconv
    y = fastconv.functional.conv2d(x, w, padding=1)      # torch.nn.functional's signature, + algo=
    layer = fastconv.nn.Conv2d(64, 64, 3, padding=1)      # drop-in for torch.nn.Conv2d
    fastconv.convert(model)                               # swap the layers of an existing model
"""
from . import config  # noqa: F401  (first: chooses Numba's threading layer)
from . import ops  # noqa: F401  (registers torch.ops.fastconv.* and, through ops.catalog, every kernel)
from . import functional, nn
from . import flops, models
from .registry import algorithms
from .autotune import autotune_cache, clear_autotune_cache, set_deterministic  # also binds fastconv.autotune
from .backends import backend
from .nn import convert, optimize

__version__ = "0.1.0"
__all__ = ["functional", "nn", "flops", "models", "convert", "algorithms", "backend", "autotune_cache",
           "clear_autotune_cache", "optimize", "set_deterministic", "__version__"]

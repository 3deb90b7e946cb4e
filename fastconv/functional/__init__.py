"""fastconv's functional API: the ``torch.nn.functional`` names and signatures, plus ``algo=``.

Each function validates its arguments (clear errors before any kernel runs), normalises them and
calls a registered ``torch.ops.fastconv.*`` op, so autograd, ``torch.compile`` and
``FlopCounterMode`` all see fastconv's own kernels.
"""
from .conv import conv1d, conv2d, conv3d

__all__ = ["conv1d", "conv2d", "conv3d"]

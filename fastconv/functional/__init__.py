"""fastconv's functional API: the ``torch.nn.functional`` names and signatures, plus ``algo=``.

Each function validates its arguments (clear errors before any kernel runs), normalises them and
calls a registered ``torch.ops.fastconv.*`` op, so autograd, ``torch.compile`` and
``FlopCounterMode`` all see fastconv's own kernels.
"""
from .conv import conv1d, conv2d, conv3d
from .separable import depthwise_separable_conv2d
from .fused import conv_bias_act
from .pool import *  # noqa: F401,F403  (max/min/avg/adaptive/unpool/lp pooling)
from .pool import __all__ as _pool_all
from .transposed import conv_transpose1d, conv_transpose2d, conv_transpose3d

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]
__all__ += _pool_all
__all__ += ["depthwise_separable_conv2d", "conv_bias_act"]

"""Autocast for fastconv's ops: under ``torch.autocast`` a convolution runs in the autocast dtype, as torch's.

torch puts its convolutions on autocast's "lower precision" list: under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` (or ``"cuda"``, float16) each floating input that is not float64 is cast to the
autocast dtype and the conv returns that dtype. Pooling is not on the list, it follows its input. This module
registers the same rule for fastconv's forward conv ops on the AutocastCPU and AutocastCUDA dispatch keys.

``torch.library.register_autocast`` is not used: it fixes the cast dtype when it is registered, while torch's
rule reads the dtype of the autocast region the call is in (``torch.get_autocast_dtype``). The gradient ops and
pooling ops get no rule (the dispatcher falls through), as torch's backward and pooling ops.
"""
from __future__ import annotations

import torch

#: The ops torch's autocast lists as lower precision (its conv{1,2,3}d and conv_transpose{1,2,3}d), plus the
#: separable conv, which is two of them, and the fused conv + bias + activation ops (ops/fused.py).
LOWER_PRECISION_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                       "depthwise_separable_conv2d", "conv1d_bias_act", "conv2d_bias_act", "conv3d_bias_act")
DEVICES = ("cpu", "cuda")

# Registrations live as long as this Library object does.
_LIB = torch.library.Library("fastconv", "IMPL")


def _cast(value, device_type: str, dtype: torch.dtype):
    """torch's autocast eligibility: floating tensors on the autocast device, float64 left alone."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def _kernel(op: torch._ops.OpOverload, device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def autocast_kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        # Below this key the op runs as if autocast were off (no second cast, no recursion).
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(_cast(a, device_type, dtype) for a in args))
    return autocast_kernel


def register() -> None:
    """Register the autocast rule of every op in :data:`LOWER_PRECISION_OPS` for CPU and CUDA (idempotent)."""
    for name in LOWER_PRECISION_OPS:
        op = getattr(torch.ops.fastconv, name).default
        for device_type in DEVICES:
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            _LIB.impl(name, _kernel(op, device_type), key)


register()

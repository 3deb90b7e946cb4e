"""Keep a custom op's first eager call from importing ``torch._dynamo`` (about 1 s).

``torch.library.custom_op`` wraps every device implementation in ``torch._disable_dynamo``, which
imports ``torch._dynamo`` on the first call so that Dynamo never traces *into* the implementation.
That import is most of a fresh process's first-conv time. Dynamo can only be tracing if it has been
imported, so until then the implementation is called directly, and from the first call after an
import of ``torch._dynamo`` (any ``torch.compile``) on, through ``torch._dynamo.disable`` exactly as
torch does it. The hook reads private attributes of torch's ``CustomOpDef``; if they change, nothing
breaks — torch's own lazy path runs, only slower.
"""
from __future__ import annotations

import sys


def _lazy_disable(impl):
    def call(*args, **kwargs):
        if "torch._dynamo" in sys.modules:
            import torch._dynamo

            disabled = torch._dynamo.disable(impl, recursive=True, wrapping=False)
            impl.__dynamo_disable = disabled  # torch's own cache slot: later calls skip this shim
            return disabled(*args, **kwargs)
        return impl(*args, **kwargs)

    return call


def skip_eager_dynamo_import(namespace: str = "fastconv") -> int:
    """Install the lazy shim on every custom op of ``namespace``; returns how many implementations got it."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return 0
    count = 0
    for qualname, opdef in list(OPDEFS.items()):
        if not qualname.startswith(namespace + "::"):
            continue
        for backend_fn in getattr(opdef, "_backend_fns", {}).values():
            impl = getattr(backend_fn, "__wrapped__", None)
            if impl is not None and getattr(impl, "__dynamo_disable", None) is None:
                impl.__dynamo_disable = _lazy_disable(impl)
                count += 1
    return count

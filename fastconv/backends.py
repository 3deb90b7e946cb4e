"""Which implementation runs a CPU tensor: the Numba kernels, or the CUDA kernels on the CPU harness.

CUDA tensors always run the CUDA kernels (``target == "cuda"``). CPU tensors run the Numba kernels
(``"numba"``) unless the backend is switched to ``"cuda-emu"``, which sends them through the same
``kernels/*.cu`` code compiled for the CPU execution harness (``fastconv.emu``), so the whole
correctness suite can check the CUDA kernels on a machine without a GPU.

Switch it with the environment variable ``FASTCONV_BACKEND=cuda-emu`` (read at each call) or, for a
block of code, ``with fastconv.backend("cuda-emu"): ...``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

from .spec import TARGETS  # noqa: F401  (re-exported: every execution target an algorithm can declare)

#: Backends that can run CPU tensors.
CPU_BACKENDS = ("numba", "cuda-emu")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastconv_backend", default=None)


def _check(name: str, where: str) -> str:
    if name not in CPU_BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(CPU_BACKENDS)}")
    return name


_ENVIRON = os.environ
# os.environ's own dict of encoded names and values (POSIX): ``os.environ.get`` encodes the name and
# decodes the value on every call, a microsecond each, and every op call reads a few variables.
_ENV_DATA = getattr(_ENVIRON, "_data", None) if os.name == "posix" else None
_ENV_NAMES: dict[str, bytes] = {}
_ENV_VALUES: dict[bytes, str] = {}


def getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, read now (so a change is seen at the next call), at a tenth of its
    cost: the encoded name and the decoded values are remembered instead of converted on every call."""
    env = os.environ
    if env is not _ENVIRON or not isinstance(_ENV_DATA, dict):  # os.environ replaced (a test), or not POSIX
        return env.get(name, default)
    key = _ENV_NAMES.get(name)
    if key is None:
        key = _ENV_NAMES[name] = env.encodekey(name)
    raw = _ENV_DATA.get(key)
    if raw is None:
        return default
    value = _ENV_VALUES.get(raw)
    if value is None:
        if len(_ENV_VALUES) >= 256:
            _ENV_VALUES.clear()
        value = _ENV_VALUES[raw] = env.decodevalue(raw)
    return value


_CHECKED: dict[str, str] = {}  # $FASTCONV_BACKEND values already checked -> the backend they name


def current() -> str:
    """The backend that CPU tensors use now: the innermost ``backend(...)`` block, else
    ``$FASTCONV_BACKEND``, else ``"numba"``."""
    name = _override.get()
    if name is not None:
        return name
    raw = getenv("FASTCONV_BACKEND")
    if not raw:
        return "numba"
    name = _CHECKED.get(raw)
    if name is None:
        env = raw.strip()
        name = _check(env, "FASTCONV_BACKEND") if env else "numba"
        _CHECKED[raw] = name  # only valid values get here (_check raises on the others)
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Context manager: run fastconv ops on CPU tensors through backend ``name`` inside the block.

    >>> with fastconv.backend("cuda-emu"):
    ...     y = fastconv.functional.conv2d(x, w)   # the CUDA kernels, run on the CPU harness
    """
    token = _override.set(_check(name, "fastconv.backend"))
    try:
        yield name
    finally:
        _override.reset(token)


def target_for(tensor: torch.Tensor) -> str:
    """Execution target for an op whose inputs live where ``tensor`` lives."""
    if tensor.is_cpu:
        return current()
    kind = tensor.device.type
    if kind == "cuda":
        return "cuda"
    if kind == "meta":
        # meta: shape-only tensors (fastconv.flops counts models on the meta device) reach only the
        # ops' fake functions, which validate as the CPU target would.
        return current()
    raise RuntimeError(f"fastconv: device {tensor.device} is not supported (expected cpu or cuda)")

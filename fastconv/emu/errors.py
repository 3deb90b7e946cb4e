"""The harness's exception types (one place, so every emu module raises the same ones)."""
from __future__ import annotations


class EmuError(RuntimeError):
    """A kernel launch failed in the harness."""


class CompileError(EmuError):
    """g++ rejected the kernel source (the message holds its diagnostics)."""


class LaunchError(EmuError, ValueError):
    """The launch configuration is invalid (block too large, bad grid, too much shared memory)."""


class OutOfBoundsError(EmuError):
    """The kernel touched memory outside an argument's buffer (or wrote to a const one)."""


class BarrierError(EmuError):
    """A __syncthreads() or warp intrinsic was not reached by all the threads it waits for."""


class KernelTrap(EmuError):
    """The kernel called __trap() (or faulted in some other way the harness cannot attribute)."""


class AsyncCopyError(EmuError):
    """A cp.async / ldmatrix / mma.sync was used against its rules (alignment, state space, lanes)."""

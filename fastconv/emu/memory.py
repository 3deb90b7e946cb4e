"""Device memory of one launch: each array argument copied into its own mapping between PROT_NONE
guard pages (an out-of-bounds access faults and is named), garbage in the slack, read-only
mappings for const parameters; arguments that overlap share one mapping."""
from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
_ALIGN = 16                         # array starts are 16-byte aligned (float4 loads), like cudaMalloc's 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_NONE, _PROT_READ, _PROT_RW = 0, 1, 3
_MAP_PRIVATE_ANON = 0x02 | 0x20


class _Buffer:
    """One device allocation: [guard page][garbage | data | garbage][guard page], the data's
    16-byte-aligned start as close to the rear guard as alignment allows."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        padded = (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        self.body = max(PAGE, (padded + PAGE - 1) // PAGE * PAGE)
        self.size = self.body + 2 * PAGE
        base = _libc.mmap(None, self.size, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemoryError(f"mmap of {self.size} bytes failed")
        self.base = base
        self.lo = base + PAGE                     # first byte after the front guard
        self.hi = self.lo + self.body             # the rear guard
        self.ptr = self.hi - padded               # the device pointer
        ctypes.memset(self.lo, 0xFF, self.body)
        _libc.mprotect(base, PAGE, _PROT_NONE)
        _libc.mprotect(self.hi, PAGE, _PROT_NONE)
        self.readonly = False

    def protect_readonly(self):
        _libc.mprotect(self.lo, self.body, _PROT_READ)
        self.readonly = True

    def slack_intact(self) -> bool:
        """The garbage around the data is untouched (no stray write that missed the guard pages)."""
        before = ctypes.string_at(self.lo, self.ptr - self.lo)
        after = ctypes.string_at(self.ptr + self.nbytes, self.hi - self.ptr - self.nbytes)
        return before.count(0xFF) == len(before) and after.count(0xFF) == len(after)

    def free(self):
        if self.base:
            _libc.munmap(self.base, self.size)
            self.base = 0


def _as_array(a, i: int):
    """numpy view of an array argument (torch CPU tensors through .numpy(), sharing memory)."""
    if isinstance(a, np.ndarray):
        arr = a
    elif type(a).__module__.startswith("torch") and hasattr(a, "is_contiguous"):
        if a.device.type != "cpu":
            raise TypeError(f"argument {i}: fastconv.emu runs on the CPU; got a tensor on {a.device}")
        if not a.is_contiguous():
            raise ValueError(f"argument {i}: tensor is not contiguous (a raw kernel sees only the data pointer)")
        t = a.detach()
        try:
            arr = t.numpy()
        except TypeError:       # bfloat16 & co: the bytes are what the kernel sees
            import torch
            arr = t.view({2: torch.int16, 1: torch.int8}[t.element_size()]).numpy()
    else:
        return None
    if not arr.flags.c_contiguous:
        raise ValueError(f"argument {i}: array is not C-contiguous (a raw kernel sees only the data pointer)")
    return arr


class _Group:
    def __init__(self, lo, hi, members):
        self.lo, self.hi, self.members = lo, hi, members


def _group(arrays):
    """Arguments that overlap in memory share one buffer, as they would share one allocation."""
    spans = sorted(((a.__array_interface__["data"][0], a.__array_interface__["data"][0] + a.nbytes, i, a, c)
                    for i, a, c in arrays), key=lambda t: t[:2])
    groups = []
    for lo, hi, i, a, c in spans:
        if groups and lo < groups[-1].hi or (groups and lo == groups[-1].lo == groups[-1].hi == hi):
            g = groups[-1]
            g.hi = max(g.hi, hi)
            g.members.append((i, a, c))
        else:
            groups.append(_Group(lo, hi, [(i, a, c)]))
    return groups

"""Reading CUDA C++ source as text: the ``__global__`` functions get_function can find, and the
rewrite of ``extern __shared__`` arrays that C++ cannot size at launch time."""
from __future__ import annotations

import re

from .errors import CompileError

__all__ = ["preprocess", "find_kernels"]


def _blank(src: str) -> str:
    """The source with comments and string/char literal bodies replaced by spaces (same length,
    newlines kept), so regexes can search it and positions still index the original."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                out[k] = " "
            i = j + 1
            continue
        else:
            i += 1
            continue
        for k in range(i, j):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


_ATTR = re.compile(r"__align__\s*\([^()]*\)|alignas\s*\([^()]*\)|__attribute__\s*\(\([^()]*(\([^()]*\))?[^()]*\)\)")
_STATIC_SHARED = re.compile(r"\bstatic\s+(?=__shared__\b)")
_EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\s+([^;{}\[\]]*?)\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_LB = r"__launch_bounds__\s*\(((?:[^()]|\((?:[^()]|\([^()]*\))*\))*)\)\s*"
_KERNEL = re.compile(r"\b__global__\s+(?:" + _LB + r")?void\s+(?:" + _LB + r")?([A-Za-z_]\w*)\s*\(")


def preprocess(src: str) -> str:
    """Rewrite ``extern __shared__ T name[];`` so ``name`` denotes this launch's dynamic shared
    buffer (C++ cannot size a declaration at launch time). Line numbers are preserved.

    In a function it becomes a reference to the buffer. At file or namespace scope it becomes an
    ``emu::DynShared<T>`` object (the buffer moves between launches): indexing, ``+`` and casts
    work, ``reinterpret_cast<U*>(name)`` does not compile (write ``(U*)name`` or declare it in
    the kernel)."""
    src = _STATIC_SHARED.sub("", src)   # `static __shared__`: __shared__ already says static
    blank = _blank(src)
    out, last = [], 0
    for m in _EXTERN_SHARED.finditer(blank):
        ctype = _ATTR.sub(" ", src[m.start(1):m.end(1)]).strip()
        name = m.group(2)
        if not ctype:
            raise CompileError(f"cannot parse the type of `extern __shared__ ... {name}[]`")
        view = f"(*reinterpret_cast<{ctype} (*)[]>(::emu::g_dyn_smem))"
        nl = src.count("\n", m.start(), m.end())
        if _in_function(blank, m.start()):   # a reference, scoped like the declaration
            rep = f"{ctype} (&{name})[] = {view};" + "\n" * nl
        else:   # file or namespace scope: an object that finds the buffer at each use
            rep = f"constexpr ::emu::DynShared<{ctype}> {name}{{}};" + "\n" * nl
        out.append(src[last:m.start()])
        out.append(rep)
        last = m.end()
    out.append(src[last:])
    return "".join(out)


def _in_function(blank: str, pos: int) -> bool:
    """Whether pos lies inside a brace block other than a namespace or `extern "C"` block."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        c = blank[i]
        if c == "}":
            depth += 1
        elif c == "{":
            if depth == 0:
                return not re.search(r'(\bnamespace\b[\w\s:]*|\bextern\s+"\s*")\s*$', blank[max(0, i - 200):i])
            depth -= 1
    return False


def _balanced(text: str, open_pos: int) -> int:
    """Index just past the parenthesis matching the one at open_pos."""
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise CompileError("unbalanced parentheses in a kernel declaration")


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def find_kernels(src: str, templates: bool = False) -> dict:
    """``{name: {"bound": str|None, "params": [names]}}`` for the ``extern "C"`` (non-template)
    ``__global__`` functions of the source: the names ``get_function`` can find, as with NVRTC.

    ``templates=True``: the ``__global__`` function templates instead (reached through name
    expressions such as ``"max_pool_forward<float>"``); their ``bound`` is the text of the
    ``__launch_bounds__`` arguments, evaluated at file scope by the harness."""
    blank = _blank(src)
    # Brace blocks opened by `extern "C" {`.
    extern_blocks, stack = [], []
    for m in re.finditer(r"[{}]", blank):
        if m.group() == "{":
            stack.append((m.start(), bool(re.search(r'extern\s+"C"\s*$', src[max(0, m.start() - 40):m.start()]))))
        elif stack:
            start, is_c = stack.pop()
            if is_c:
                extern_blocks.append((start, m.start()))
    kernels = {}
    for m in _KERNEL.finditer(blank):
        name = m.group(3)
        head = max(blank.rfind(";", 0, m.start()), blank.rfind("}", 0, m.start()), blank.rfind("{", 0, m.start()))
        before = src[head + 1:m.start()]
        is_template = bool(re.search(r"\btemplate\b", before))
        if is_template != templates:
            continue
        is_c = bool(re.search(r'extern\s+"C"', before)) or any(a < m.start() < b for a, b in extern_blocks)
        if not is_c and not is_template:
            continue
        close = _balanced(blank, m.end() - 1)
        params = []
        for p in _split_top(blank[m.end():close - 1]):
            ids = re.findall(r"[A-Za-z_]\w*", re.sub(r"\[[^\]]*\]", "", p))
            params.append(ids[-1] if ids and p.strip() not in ("void",) else "?")
        bound = m.group(1) or m.group(2)
        info = kernels.setdefault(name, {"bound": None, "params": params})
        if bound:
            info["bound"] = src[m.start(1 if m.group(1) else 2):m.end(1 if m.group(1) else 2)]
    return kernels

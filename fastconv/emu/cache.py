"""The harness's build cache: one shared library per (translation unit, compiler, flags, headers).

Safe for several processes building into one folder at once (issue 10 item 4):

* a library's file name is content-addressed: ``<key>-<deps>.so`` where ``key`` hashes the
  generated translation unit, the compiler, every flag and every harness header, and ``deps``
  hashes the text of every file the compiler included. Two builders of the same content write the
  same name, so nothing ever needs deleting and dlopen's "already loaded under this name" answer is
  always the right library;
* a build compiles into a private temporary folder inside the cache and is ``os.replace``d into
  its name (atomic: a reader sees no file or the whole file);
* builders of the same key hold an ``fcntl.flock`` on ``<key>.lock``, so the second waits and then
  finds the first one's library instead of compiling again;
* libraries are never deleted (a process may be loading one); a stale one only costs disk;
* the ``<key>.json`` entry names the included files and their hashes; the library name is
  recomputed from them, and only a regular file whose real path lies inside the cache folder is
  loaded. An entry naming anything else (``../x.so``, an absolute path, a symlink out) is refused
  and the library rebuilt.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shlex
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .. import config
from .errors import CompileError

_loaded: dict = {}      # real path of a library -> ctypes.CDLL (dlopen would give the same handle)
compiles = 0            # compiler runs in this process (tests check that concurrent builders share one)


def cache_dir() -> Path:
    """``$FASTCONV_EMU_CACHE``, else the ``emu`` folder of fastconv's cache (:func:`fastconv.config.cache_folder`:
    ``$FASTCONV_CACHE_DIR/emu``, else ``$XDG_CACHE_HOME/fastconv/emu``, else ``~/.cache/fastconv/emu``)."""
    d = os.environ.get("FASTCONV_EMU_CACHE")
    return Path(d) if d else config.cache_folder("emu")


def digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _file_hash(f: str) -> str:
    try:
        return hashlib.sha256(Path(f).read_bytes()).hexdigest()
    except OSError:
        return ""


def _read_json(path: Path) -> dict:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _library_name(key: str, deps: dict) -> str:
    return f"{key}-{digest(sorted(deps.items()))[:16]}.so"


def _inside(path: Path, folder: Path) -> bool:
    """Whether path resolves (symlinks followed) to a regular file directly inside folder."""
    real = Path(os.path.realpath(path))
    return real.parent == Path(os.path.realpath(folder)) and real.is_file()


def _lookup(cdir: Path, key: str):
    """The cached library of ``key`` if its entry is valid, its included files are unchanged and
    it lies inside the cache folder; else None (the caller rebuilds)."""
    m = _read_json(cdir / f"{key}.json")
    deps = m.get("deps")
    if not isinstance(deps, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in deps.items()):
        return None
    if any(_file_hash(f) != h for f, h in deps.items()):
        return None
    name = _library_name(key, deps)
    if m.get("so") != name:     # an entry naming another file (or a path) is not ours to load
        return None
    so = cdir / name
    return so if _inside(so, cdir) else None


@contextmanager
def _flock(path: Path):
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _parse_depfile(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    _, _, rest = text.partition(":")
    return [f.replace("\\ ", " ") for f in re.findall(r"(?:\\ |\S)+", rest)]


def _load(so: Path, cdir: Path) -> ctypes.CDLL:
    if not _inside(so, cdir):   # checked again right before dlopen
        raise CompileError(f"fastconv.emu refuses to load {so}: not a file inside the cache folder {cdir}")
    real = os.path.realpath(so)
    lib = _loaded.get(real)
    if lib is None:
        lib = _loaded[real] = ctypes.CDLL(real, mode=os.RTLD_LOCAL)
    return lib


def load_or_build(key: str, unit: str, cmd: list[str], name: str, harness_dir: Path) -> ctypes.CDLL:
    """The library of ``key``: from the cache, or compiled from ``unit`` with ``cmd`` (the
    compiler command without source and output) under the key's lock."""
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    so = _lookup(cdir, key)
    if so is None:
        with _flock(cdir / f"{key}.lock"):
            so = _lookup(cdir, key)     # another process may have built it while we waited
            if so is None:
                so = _compile(cdir, key, unit, cmd, name, harness_dir)
    return _load(so, cdir)


def _compile(cdir: Path, key: str, unit: str, cmd: list[str], name: str, harness_dir: Path) -> Path:
    global compiles
    compiles += 1
    with tempfile.TemporaryDirectory(dir=cdir, prefix="build-") as tmp:
        tmp = Path(tmp)
        cpp, out, dep = tmp / "unit.cpp", tmp / "out.so", tmp / "unit.d"
        cpp.write_text(unit)
        full = [*cmd, "-MMD", "-MF", str(dep), str(cpp), "-o", str(out)]
        p = subprocess.run(full, capture_output=True, text=True)
        if p.returncode != 0:
            raise CompileError(f"g++ failed to compile {name} for fastconv.emu:\n{p.stderr.strip()}\n"
                               f"command: {shlex.join(full)}")
        # Harness headers are in the key already; the generated unit lives in tmp.
        deps = {f: _file_hash(f) for f in _parse_depfile(dep)
                if not Path(f).resolve().is_relative_to(harness_dir) and Path(f).resolve().parent != tmp.resolve()}
        so = cdir / _library_name(key, deps)
        os.replace(out, so)             # atomic; same name = same content, so replacing is harmless
        meta = tmp / "meta.json"
        meta.write_text(json.dumps({"so": so.name, "deps": deps}))
        os.replace(meta, cdir / f"{key}.json")
    return so

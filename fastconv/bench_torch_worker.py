"""The torch baseline of ``fastconv bench``, timed in a process that never imports fastconv or Numba.

Why a process of its own: on these machines torch's convolution is slower and bimodal in a process
where Numba's TBB threads and numpy's OpenBLAS threads live (LeNet conv1: 0.34 ms clean, about 16 ms
in some Numba processes), so a baseline timed beside fastconv flatters fastconv. A user who picked
torch has none of those pools; this worker is that user.

Run as a script by file path (``python bench_torch_worker.py``), never as ``-m fastconv...``: importing
anything under the package would import fastconv. It loads :mod:`fastconv.bench_suite` by path too.
Protocol: one JSON request per stdin line, one JSON answer per stdout line.

    {"cmd": "setup", "threads": 2}                       -> {"ok": true, "torch": "2.13.0", ...}
    {"cmd": "time", "layer": L, "pass": P, "dtype": "float32", "seed": 0, "n": 3, "warm": 1}
                                                         -> {"ms": [t1, t2, t3]}  (after 1 untimed call)
    {"cmd": "load_model", "key": K, "path": P, "input_shape": [...]}  -> {"ok": true}  (a torch.export file)
    {"cmd": "time_model", "key": K, "mode": "infer1"|"infer8"|"train8", "n": 1, "warm": 0}  -> {"ms": [...]}
    {"cmd": "clean"}                                     -> {"numba": false, "fastconv": false}
    {"cmd": "quit"}

``python bench_torch_worker.py --busy CPU`` is something else: the busy neighbour of
``fastconv bench --models --busy-neighbour``, a process that keeps one core busy with a one-thread
torch matmul loop (pinned to CPU when CPU >= 0), prints ``ready`` once and loops until it is killed
or its parent dies. The parent switches it on and off with SIGCONT / SIGSTOP.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time


def _load_suite():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_suite.py")
    spec = importlib.util.spec_from_file_location("_fastconv_bench_suite", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


#: Bytes of the block :func:`settle_heap` makes and frees: under glibc's 32 MB cap on its dynamic mmap threshold.
HEAP_SETTLE_BYTES = 30 << 20


def settle_heap() -> None:
    """Make and free one 30 MB tensor, as every torch program that has held a large activation has done.

    glibc serves a large allocation with a fresh ``mmap`` (its pages faulted in again on every call) until a
    block that large has been freed; then it raises its mmap threshold (up to 32 MB) and reuses heap memory
    instead. A process that has only timed one layer has not got there. Measured on the 2-core dev VM, a fresh
    torch process, 9 calls each after the benchmark's idle pause and one untimed call: an 8x16x55x55 -> 64 3x3
    conv 4.6-4.7 ms per call, 1.8-2.0 after this; ResNet's 7x7 stem at batch 8 18.1-18.4 against 6.9-7.0.
    Both sides of the benchmark do it, so neither is timed on fresh pages that the other is spared.
    """
    import torch

    block = torch.empty(HEAP_SETTLE_BYTES, dtype=torch.uint8)
    del block


def main() -> int:
    import torch

    suite = _load_suite()
    layers = {layer.name: layer for layer in suite.SUITE}
    cached_key, cached_inputs = None, None
    models = {}
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.get("cmd")
        try:
            if cmd == "quit":
                break
            if cmd == "setup":
                torch.set_num_threads(int(request["threads"]))
                settle_heap()
                answer = {"ok": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "pid": os.getpid()}
            elif cmd == "load_model":
                module = torch.export.load(request["path"]).module()
                example = torch.randn(request["input_shape"], generator=torch.Generator().manual_seed(0))
                models[request["key"]] = (module, example)
                answer = {"ok": True}
            elif cmd == "time_model":
                module, example = models[request["key"]]
                times = []
                warm = int(request.get("warm", 0))  # untimed steps first: torch's pool awake, as in a user's loop
                for step in range(warm + int(request.get("n", 1))):
                    start = time.perf_counter()
                    if request["mode"].startswith("train"):
                        for p in module.parameters():
                            p.grad = None
                        out = module(example)
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        out.float().sum().backward()
                    else:
                        with torch.no_grad():
                            module(example)
                    if step >= warm:
                        times.append((time.perf_counter() - start) * 1e3)
                answer = {"ms": times}
            elif cmd == "clean":
                answer = {name: name in sys.modules for name in ("numba", "fastconv", "llvmlite")}
            elif cmd == "time":
                layer = layers[request["layer"]]
                impl = layer.passes[request["pass"]]
                key = (request["layer"], request["pass"], request["dtype"], request.get("seed", 0))
                if key != cached_key:
                    dtype = getattr(torch, request["dtype"])
                    cached_inputs = impl.inputs(dtype, torch.Generator().manual_seed(request.get("seed", 0)))
                    cached_key = key
                times = []
                with torch.no_grad():
                    for _ in range(int(request.get("warm", 0))):  # wakes torch's thread pool after idling
                        impl.torch(cached_inputs)
                    for _ in range(int(request.get("n", 1))):
                        start = time.perf_counter()
                        impl.torch(cached_inputs)
                        times.append((time.perf_counter() - start) * 1e3)
                answer = {"ms": times}
            else:
                answer = {"error": f"unknown command {cmd!r}"}
        except Exception as error:  # noqa: BLE001 - the parent reports it in the table
            answer = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


#: Matmul size of the busy neighbour: 256^3 (33 MFLOP, about a millisecond on one core) fits in L2,
#: so the neighbour holds its core's arithmetic units and caches like another ML process does, and
#: checks for its parent's death every few dozen milliseconds.
BUSY_N = 256


def busy(cpu: int) -> int:
    """The busy neighbour: one core, one thread, matmuls until killed or orphaned."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:  # killed with its parent even when the parent is SIGKILLed (or this process is stopped)
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl
        return 0
    if cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(BUSY_N, BUSY_N, generator=gen)
    b = torch.randn(BUSY_N, BUSY_N, generator=gen)
    c = torch.empty(BUSY_N, BUSY_N)
    torch.mm(a, b, out=c)
    sys.stdout.write(f"ready {os.getpid()}\n")
    sys.stdout.flush()
    while os.getppid() == parent:
        for _ in range(32):
            torch.mm(a, b, out=c)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--busy":
        sys.exit(busy(int(sys.argv[2])))
    sys.exit(main())

#!/usr/bin/env python3
"""Check nvcc's ``-Xptxas -v`` report of fastconv's kernels against the resource budget.

Budget (DESIGN.md section 6), per kernel and architecture:

* no register spills and no local-memory stack frame (``N bytes spill stores/loads``, ``N bytes
  stack frame``): a spill turns register traffic into memory traffic in the inner loop;
* at most ``--max-registers`` registers (default 128): 256-thread blocks at 128 registers still
  fit two blocks per SM (64 Ki registers), enough to hide latency for these kernels. The largest
  kernels are the implicit-GEMM float64 ones (4x4 double accumulators, double-buffered loads).

Usage: ``check_ptxas.py [--max-registers N] [--table] report.txt ...`` (the reports are nvcc's
stderr), or ``check_ptxas.py [...] --save report.txt -- nvcc ...`` to run the compiler, save its
report and check it (what CMakeLists.txt does). Exit status 1 with one line per violation;
``--table`` prints every kernel's numbers.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse(text: str) -> list[dict]:
    """One row per (kernel, arch): registers, stack frame, spill stores, spill loads."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0,
                   "spill_loads": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return rows


def violations(rows: list[dict], max_registers: int) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['kernel']} ({r['arch']})"
        if r["registers"] is None:
            out.append(f"{where}: no register count in the report")
        elif r["registers"] > max_registers:
            out.append(f"{where}: {r['registers']} registers, over the budget of {max_registers}")
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{where}: spills ({r['spill_stores']} bytes stored, {r['spill_loads']} bytes loaded)")
        if r["stack"]:
            out.append(f"{where}: {r['stack']} bytes stack frame")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap.add_argument("reports", nargs="*")
    ap.add_argument("--max-registers", type=int, default=128)
    ap.add_argument("--table", action="store_true", help="print every kernel's registers and spills")
    ap.add_argument("--save", help="with a command after --: where to write its ptxas report")
    args = ap.parse_args(argv)
    rows = []
    if command:
        p = subprocess.run(command, capture_output=True, text=True)
        report = p.stdout + p.stderr
        if args.save:
            with open(args.save, "w") as f:
                f.write(report)
        if p.returncode:
            print(report, file=sys.stderr)
            print(f"check_ptxas: compiler failed with status {p.returncode}", file=sys.stderr)
            return p.returncode
        rows += parse(report)
    for path in args.reports:
        with open(path) as f:
            rows += parse(f.read())
    if not rows:
        print("check_ptxas: no kernels in the report (was -Xptxas -v given?)", file=sys.stderr)
        return 1
    if args.table:
        for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
            print(f"{r['arch']:8} {r['kernel']:36} {r['registers']:4} regs  {r['stack']:3} B stack  "
                  f"{r['spill_stores']:3}/{r['spill_loads']:3} B spill st/ld")
    bad = violations(rows, args.max_registers)
    for v in bad:
        print(f"check_ptxas: {v}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

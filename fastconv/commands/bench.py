"""``fastconv bench``: the layer suite (:mod:`fastconv.benchmark`), fastconv's algorithms vs torch, per pass.

Prints one table per layer and pass as it finishes (a tqdm bar on stderr shows progress), then a
summary; writes ``fastconv-bench.json`` and ``fastconv-bench.png`` into ``--out``. Exit status 0,
1 when a result failed its check against torch, 2 for a bad argument (unknown layer, algorithm, pass,
dtype).

    fastconv bench --quick                       # about a minute: small layers, 3 rounds
    fastconv bench --layers resnet,inception --pass forward --algo auto,im2col
    fastconv bench --list
    fastconv bench --models lenet5 --baseline alternate --busy-neighbour   # mixed process, loaded machine
    fastconv bench --device cuda --quick         # the CUDA kernels vs cuDNN (needs a GPU)
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

QUICK_REPS = 3
DEFAULT_REPS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"the quick subset of layers (unless --layers), {QUICK_REPS} rounds (unless --reps)")
    parser.add_argument("--layers", help="comma-separated layer names or substrings of name/architecture "
                                         "(see --list); slow layers run only when named")
    parser.add_argument("--algo", help="comma-separated algorithms besides torch (default: every one that "
                                       "accepts the layer, plus auto)")
    parser.add_argument("--pass", dest="passes", help="comma-separated: forward, grad_input, grad_weight "
                                                      "(or all, fwd, bwd); default all")
    parser.add_argument("--reps", type=int, help=f"timed rounds per case (default {DEFAULT_REPS}; "
                                                 "fewer for very slow layers, never below 3)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    parser.add_argument("--threads", type=int, help="torch (and so Numba) threads; default: torch's")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results in the source "
                                                 "checkout, else ./fastconv-bench-results)")
    parser.add_argument("--no-first-call", action="store_true",
                        help="skip timing import + first call in a fresh process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--baseline", choices=("process", "inprocess", "alternate"), default="process",
                        help="where torch is timed: a clean worker process that never imports fastconv or "
                             "Numba (default: what a user who chose torch sees), or this process; "
                             "alternate (--models only): torch's model and the converted one in this process, "
                             "stepped in turn so each meets the other's thread pools, the clean worker "
                             "timed too (torch here / torch clean)")
    parser.add_argument("--busy-neighbour", action="store_true",
                        help="--models only: also time each model with another process keeping one of "
                             "these cores busy (a one-thread torch matmul loop), on and off in turn; "
                             "reports each side's slowdown (busy / quiet)")
    parser.add_argument("--list", action="store_true", help="list the suite's layers (or models) and exit")
    parser.add_argument("--models", nargs="?", const="all", metavar="NAMES",
                        help="whole models instead of layers: zoo networks and, when torchvision is installed, "
                             "its classification models, converted with fastconv.convert, inference at batch 1 "
                             "and 8 and a training step at batch 8 (comma-separated names; default all)")
    parser.add_argument("--size", type=int, help="input resolution of the ImageNet models (--models; default 224)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default): the Numba kernels vs torch; cuda: the CUDA kernels vs cuDNN in fp32, "
                             "tf32 and autocast+channels_last (fastconv.bench_gpu)")


def run(args: argparse.Namespace) -> int:
    import torch

    from fastconv import benchmark

    def fail(message: str) -> int:
        print(f"fastconv bench: error: {message}", file=sys.stderr)
        return 2

    if args.models is not None:
        return _run_models(args, fail)
    if args.baseline == "alternate" or args.busy_neighbour:
        return fail("--baseline alternate and --busy-neighbour measure whole models: use them with --models")
    if args.list:
        for layer in benchmark.SUITE:
            tags = ", ".join(t for t, on in (("quick", layer.quick), ("slow", layer.slow)) if on)
            print(f"{layer.name:<18}{layer.arch:<17}{layer.macs / 1e6:>9.1f} M MACs  {layer.describe()}"
                  + (f"  [{tags}]" if tags else ""))
        return 0
    try:
        dtype = benchmark.parse_dtype(args.dtype)
        layers = benchmark.select_layers(args.layers, quick=args.quick)
        passes = benchmark.parse_passes(args.passes)
        algos = benchmark.parse_algos(args.algo)
    except ValueError as e:
        return fail(str(e))
    if args.reps is not None and args.reps < 1:
        return fail(f"--reps must be at least 1, got {args.reps}")
    if args.threads is not None:
        if args.threads < 1:
            return fail(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)  # fastconv.config.sync_threads keeps Numba in step
    if args.device == "cuda":  # the GPU suite: fastconv.bench_gpu
        from fastconv import bench_gpu

        return bench_gpu.run_from_cli(args)
    reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS)
    gemm_label = "%SGEMM" if dtype == torch.float32 else "%DGEMM"

    from tqdm import tqdm

    tables = []

    def show(layer, pass_, rows):
        tables.append(benchmark.format_case(layer, pass_, rows, gemm_label))
        tqdm.write(tables[-1] + "\n", file=sys.stdout)

    result = benchmark.run_suite(layers, passes, algos, dtype=dtype, reps=reps, progress=not args.no_progress,
                                 on_case=show, with_first_call=not args.no_first_call, baseline=args.baseline)
    result["arguments"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = args.out if args.out is not None else benchmark.default_out_dir()
    files = benchmark.write_results(result, out, text="\n\n".join(tables))
    print(benchmark.format_summary(result))
    if files["kept"]:
        print(f"kept the previous results as {', '.join(p.name for p in files['kept'])}")
    png = files["png"]
    print(f"wrote {files['json']}, {files['txt']}" + (f" and {png}" if isinstance(png, Path) else f"; PNG {png}"))
    return 1 if result["summary"]["failures"] else 0


def _run_models(args: argparse.Namespace, fail) -> int:
    """``fastconv bench --models``: the whole-model suite (:mod:`fastconv.bench_models`)."""
    import torch

    from fastconv import bench_models, bench_report

    try:
        cases = bench_models.select_models(args.models)
    except ValueError as e:
        return fail(str(e))
    if args.list:
        for case in cases:
            print(f"{case.name:<26}{case.source:<13}input (N, {', '.join(map(str, case.input_shape))})")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS)
    modes = ("infer1",) if args.quick else bench_models.MODES
    tables = []

    def show(case, rows):
        tables.append(bench_models.format_model(case, rows))
        print(tables[-1] + "\n", flush=True)

    if args.reps is not None and args.reps < 1:
        return fail(f"--reps must be at least 1, got {args.reps}")
    if args.busy_neighbour and not hasattr(signal, "SIGSTOP"):
        return fail(f"--busy-neighbour switches its neighbour with SIGSTOP/SIGCONT, which {sys.platform} lacks")
    result = bench_models.run_models(cases, modes, reps=reps, size=args.size, baseline=args.baseline,
                                     on_model=show, busy_neighbour=args.busy_neighbour)
    result["arguments"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = args.out if args.out is not None else bench_report.default_out_dir()
    summary = bench_models.format_models_summary(result)
    files = bench_report.write_files(result, out, "fastconv-bench-models", "\n\n".join(tables) + "\n\n" + summary,
                                     bench_models.plot_models)
    print(summary)
    print(f"wrote {files['json']}, {files['txt']}"
          + (f" and {files['png']}" if isinstance(files["png"], Path) else f"; PNG {files['png']}"))
    return 1 if result["summary"]["failures"] else 0

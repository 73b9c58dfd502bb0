"""The command line: ``python -m metaopt.bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from metaopt.bench.config import CUDA_VARIANTS, LEARNED_VARIANTS, QUICK_VARIANTS, SECTIONS, BenchConfig
from metaopt.bench.report import markdown_report, run_benchmarks
from metaopt.meta.trainer import resolve_device


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m metaopt.bench", description=__doc__.split("\n\n")[0],
        epilog="Image tasks read Fashion-MNIST from $METAOPT_DATA, ~/.cache/metaopt or /usr/share/datasets; without "
               "it the meta and table1 sections are recorded as skipped.")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes that run in seconds on a CPU (MLP-9x20 only, 2 repeats, K in {1, 2}, "
                             "2 seeds x 5 steps); what CI runs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default) = cuda when available, else cpu")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the report as JSON here")
    parser.add_argument("--markdown", default=None, metavar="FILE.md", help="also write the Markdown table here")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="SECTION,...",
                        help=f"comma-separated sections to run (default: all), of: {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed calls per measurement (default: 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="untimed calls before each measurement (default: 3; 1 with --quick)")
    parser.add_argument("--table1-seeds", type=int, default=None, metavar="N",
                        help="seeds of the table1 section (default: 100, the target's; 2 with --quick)")
    parser.add_argument("--table1-repeats", type=int, default=1, metavar="N",
                        help="timed runs of the whole table1 suite (default: 1; each is minutes at 100 seeds)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's own; 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, gradients and inputs (default: 0)")
    parser.add_argument("--variants", default=None, metavar="VARIANT,...",
                        help="variants of the learned optimizers' frozen face to time, of: "
                             f"{', '.join(LEARNED_VARIANTS)} (default: all; {','.join(QUICK_VARIANTS)} with --quick, "
                             "as compiling takes longer than the rest of a quick run; "
                             f"{' and '.join(sorted(CUDA_VARIANTS))} only on CUDA)")
    parser.add_argument("--render", default=None, metavar="FILE.json",
                        help="print the Markdown table of an earlier report and exit (runs nothing)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(markdown_report(json.loads(Path(args.render).read_text())), end="")
        return 0
    try:
        config = BenchConfig(device=args.device, quick=args.quick,
                             sections=tuple(s.strip() for s in args.only.split(",") if s.strip()),
                             repeats=args.repeats, warmup=args.warmup, table1_seeds=args.table1_seeds,
                             table1_repeats=args.table1_repeats, threads=args.threads, seed=args.seed,
                             variants=None if args.variants is None else tuple(
                                 v.strip() for v in args.variants.split(",") if v.strip()))
        resolve_device(config.device)
    except ValueError as err:
        raise SystemExit(f"python -m metaopt.bench: {err}") from None
    torch.manual_seed(config.seed)  # the entry point seeds: model weights and fresh θ come from the global RNG
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        report = run_benchmarks(config, log=lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (the tests)
    text = json.dumps(report, indent=2, allow_nan=False)  # a NaN or inf here is a bug: refuse to write it
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    table = markdown_report(report)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table, end="")
    return 0


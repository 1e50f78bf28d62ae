"""Every benchmark on the packaged real models, one after another, into one Markdown page.

Runs bench_scoring (LGA pass vs training step vs naive autograd), bench_distributed (ZeRO-3
actors vs the single-process core), bench_editing (MEMIT's phases, batched vs one-at-a-time
targets, C in one pass), bench_covariance (C split across 1 and 2 actors), bench_selectors (LGA
vs causal tracing vs the edit grid), bench_precision (a grid task in float32 vs bfloat16),
bench_intervals (regret intervals under 'score' and 'margin' on a committed study, and the pick
shares' bootstrap), bench_reference_edits (ROME against the authors' loop) and bench_ranking_memory
(ranking time and peak memory per actor, 0/1/2 actors, float32 and bfloat16), each
in its own process with its default models, and writes their tables with the command, the date
and the machine to --out (default out/performance.md; docs/performance.md is the annotated page
built from such runs, with the explanations, and is not overwritten). Every figure is a ratio
against a baseline measured in the same run; nothing is asserted.

    python benchmarks/run_all.py [--only scoring distributed editing covariance selectors precision ... memory]
                                 [--out out/performance.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {"scoring": "bench_scoring.py", "distributed": "bench_distributed.py", "editing": "bench_editing.py",
              "covariance": "bench_covariance.py", "selectors": "bench_selectors.py", "precision": "bench_precision.py",
              "intervals": "bench_intervals.py", "reference": "bench_reference_edits.py",
              "memory": "bench_ranking_memory.py"}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--out", default="out/performance.md")
    parser.add_argument("--extra", nargs="*", default=[], metavar="ARG",
                        help="arguments passed to every benchmark (e.g. --models demo)")
    args = parser.parse_args()
    command = " ".join(["python3 benchmarks/run_all.py", *(["--only", *args.only] if args.only != list(BENCHMARKS)
                                                           else []), *(["--extra", *args.extra] if args.extra else [])])
    sections = [f"# Performance\n\nMeasured {datetime.date.today()} on {machine()} by `{command}`. Each table's "
                "ratios come from baselines timed in the same run.\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            table = Path(tmp) / f"{name}.md"
            run = [sys.executable, str(HERE / BENCHMARKS[name]), *args.extra, "--markdown", str(table)]
            print(f"== {name}: {' '.join(run[1:])}", flush=True)
            subprocess.run(run, check=True)
            sections.append(f"## {name}\n\n`python3 benchmarks/{BENCHMARKS[name]}`\n\n{table.read_text()}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

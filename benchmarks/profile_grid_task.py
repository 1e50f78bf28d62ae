"""Where one validation-grid task's time goes: what a golden-layer study pays per request and layer.

Runs one grid task the way a grid actor does (the same GridWorker, in this process): every request
edited alone at one layer, then evaluated with only its own edit applied. The time is split by phase:
target optimisation (the delta each request wants at the edited site), reading keys and outputs at
the subject (MEMIT spreads the target over its window with these), the closed-form solve, and the
evaluation (CounterFact/zsRE metrics of the edited model). C is computed first, outside the timing.

    python benchmarks/profile_grid_task.py [--model smollm2-135m] [--method memit] [--layer 12]
                                           [--requests 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lga_dist.editing import edit_window  # noqa: E402
from lga_dist.editing.base import EditContext  # noqa: E402
from lga_dist.io.requests.validation import read_requests  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402
from lga_dist.validation import grid  # noqa: E402
from lga_dist.validation.grid import GridSpec, GridTask, GridWorker  # noqa: E402

import lga_dist.editing.memit as memit  # noqa: E402

# phase -> (where it lives, attribute, label); MEMIT's solver looks memit_solve up when it runs, so a patch reaches it
PHASES = {"targets": (EditContext, "targets", "target optimisation"),
          "keys": (EditContext, "keys", "keys at the subject"),
          "read_output": (EditContext, "read_output", "outputs at the subject"),
          "solve": (memit, "memit_solve", "closed-form solve (MEMIT)"),
          "evaluate": (grid, "evaluate_alone", "evaluation (edit applied, metrics, restored)")}


@contextlib.contextmanager
def timed_methods(totals: dict[str, float]):
    """Adds each EditContext phase's wall time to ``totals`` while the block runs."""

    def timer(name, original):
        def wrapped(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started
        return wrapped

    with contextlib.ExitStack() as stack:
        for name, (owner, attribute, _) in PHASES.items():
            stack.enter_context(mock.patch.object(owner, attribute, timer(name, getattr(owner, attribute))))
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="memit", choices=["rome", "memit", "alphaedit"])
    parser.add_argument("--window", type=int, default=3, help="MEMIT/AlphaEdit: layers edited, ending at --layer")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--requests", type=int, default=5, help="shipped CounterFact facts, from the 501st on")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    requests = read_requests(str(demo_requests_path())).requests[500:500 + args.requests]
    spec = GridSpec(model=args.model, method=args.method, window=args.window, dtype=args.dtype, threads=args.threads)
    worker = GridWorker(in_actor=False)
    worker.setup(None, spec, {"main": [r.to_dict() for r in requests]})
    layers = edit_window(args.layer, args.method, args.window, worker.state["loaded"].n_layers, "end")
    worker.prepare_statistics(layers)

    totals: dict[str, float] = collections.defaultdict(float)
    started = time.perf_counter()
    with timed_methods(totals):  # the grid's own task: every request edited alone, evaluated, restored
        worker.run(GridTask("main", args.layer, 0, tuple(range(len(requests)))))
    total = time.perf_counter() - started
    totals["other editing"] = total - sum(totals.values())

    print(f"grid task: {args.model} {args.method} at layers {layers}, {len(requests)} requests edited alone, "
          f"{args.dtype}, {torch.get_num_threads()} thread(s): {total:.1f} s ({total / len(requests):.1f} s per edit)")
    labels = {**{name: label for name, (_, _, label) in PHASES.items()}, "other editing": "other editing"}
    for name, label in labels.items():
        if totals.get(name):
            print(f"  {label:<48} {totals[name]:7.1f} s  {100 * totals[name] / total:5.1f}%")


if __name__ == "__main__":
    main()

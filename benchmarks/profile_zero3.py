"""Where one ZeRO-3 rank's scoring time goes, against the single-process core, in this process.

Loads the model as a world-size-1 ZeRO-3 rank (the actor's own code path without Ray: gloo on
127.0.0.1 on a CPU, NCCL with --device cuda) and as a plain model, times the same batches with each,
then scores them again under cProfile and sums the time by where it is spent: DeepSpeed's parameter
fetch/release and hooks, the LGA hooks and Gram products,
and the model's own compute. The difference between the two runs is the ZeRO-3 overhead; the
groups say which knob can reduce it (``--persistence N`` keeps weights of at most N elements whole,
no gather).

    python benchmarks/profile_zero3.py [--model smollm2-135m] [--requests 32] [--persistence 0]
                                       [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_distributed import proxy_for  # noqa: E402
from lga_dist.devices import synchronize  # noqa: E402
from lga_dist.distributed.driver import worker_env  # noqa: E402
from lga_dist.distributed.worker import ScoringWorker, WorkerSpec, free_port  # noqa: E402
from lga_dist.distributed.zero import load_deepspeed_config  # noqa: E402
from lga_dist.lga.partial_scores import BatchPlan, score_batch  # noqa: E402
from lga_dist.lga.scoring import LayerGradientScorer  # noqa: E402
from lga_dist.models import DTYPES, load_model  # noqa: E402
from lga_dist.models.sources import resolve_model  # noqa: E402

GROUPS = (("deepspeed", "DeepSpeed (fetch/release, hooks, gathers)"), ("lga_dist", "lga_dist (LGA hooks, Grams)"),
          ("torch", "torch (model compute, autograd)"), ("transformers", "transformers (module code)"))


def grouped(profile: cProfile.Profile) -> dict[str, float]:
    """Own time (tottime) per group of source files."""
    kernels = "compiled ops (matmuls, attention, autograd engine)"
    totals = {label: 0.0 for _, label in GROUPS} | {kernels: 0.0, "other Python": 0.0}
    for (filename, _, _), (_, _, tottime, _, _) in pstats.Stats(profile).stats.items():
        label = kernels if filename == "~" else next((label for key, label in GROUPS if f"/{key}/" in filename),
                                                      "other Python")
        totals[label] += tottime
    return totals


def run(score, batches: int, device: torch.device) -> tuple[float, float, cProfile.Profile]:
    """Seconds for the batches timed plainly, then again under cProfile (and the profile).

    The warm-up scores every batch once: on a GPU each new sequence length builds and tunes kernels
    the first time, which would otherwise land in whichever run comes first.
    """
    for batch_id in range(batches):  # warm-up
        score(batch_id)
    synchronize(device)
    started = time.perf_counter()
    for batch_id in range(batches):
        score(batch_id)
    synchronize(device)
    plain = time.perf_counter() - started
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for batch_id in range(batches):
        score(batch_id)
    synchronize(device)
    profile.disable()
    return plain, time.perf_counter() - started, profile


def score_on_core(path: str, proxy: list, plan: BatchPlan, dtype: str, device: torch.device):
    """``run`` on the single-process core: the plain model on ``device``, released on return."""
    loaded = load_model(path, dtype=DTYPES[dtype], device=device)
    with LayerGradientScorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers, "out", device) as s:
        return run(lambda b: score_batch(s, proxy, plan, b), plan.n_batches, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--persistence", type=int, default=None,
                        help="stage3_param_persistence_threshold (default: the built-in config's)")
    parser.add_argument("--top", type=int, default=12, help="also list the N functions with the most own time")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or an accelerator such as cuda (NCCL)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args()
    device = torch.device(args.device)
    os.environ.update(worker_env(use_gpu=device.type != "cpu"))  # as an actor gets it: gloo on CPUs, NCCL on GPUs
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model, progress=False)
    proxy = proxy_for(args.model, args.requests)
    plan = BatchPlan(len(proxy), args.batch_size)

    core_s, core_profiled_s, core_profile = score_on_core(path, proxy, plan, args.dtype, device)
    if device.type != "cpu":
        torch.accelerator.empty_cache()  # the core's model is gone; the rank loads its own

    config = load_deepspeed_config(None, DTYPES[args.dtype])
    if args.persistence is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence
    worker = ScoringWorker(0, 1)
    worker.setup(("127.0.0.1", free_port("127.0.0.1")), WorkerSpec(
        model=path, dtype=args.dtype, param_set="out", deepspeed_config=config, plan=plan,
        use_gpu=device.type != "cpu", threads=args.threads), proxy)
    rank_s, rank_profiled_s, rank_profile = run(lambda b: worker.score([b]), plan.n_batches, device)
    backend = torch.distributed.get_backend()
    worker.shutdown()

    threshold = config["zero_optimization"]["stage3_param_persistence_threshold"]
    print(f"{Path(args.model).name}, {len(proxy)} requests in batches of {args.batch_size}, {args.device} "
          f"({args.threads} thread(s)), {args.dtype}, backend {backend}; persistence threshold {threshold:,}")
    print(f"core {core_s:.3f} s, ZeRO-3 rank {rank_s:.3f} s: {rank_s / core_s:.2f}x "
          f"(under cProfile: {core_profiled_s:.3f} s, {rank_profiled_s:.3f} s)")
    core_groups, rank_groups = grouped(core_profile), grouped(rank_profile)
    print(f"{'own time by source (profiled)':<52} {'core s':>8} {'rank s':>8}")
    for label in rank_groups:
        print(f"{label:<52} {core_groups[label]:8.2f} {rank_groups[label]:8.2f}")
    print(f"\nthe ZeRO-3 rank's {args.top} functions with the most own time:")
    pstats.Stats(rank_profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

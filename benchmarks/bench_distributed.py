"""Scoring throughput of the actor group vs the single-process core, measured in the same run.

Per model (by default the packaged real models gemma3-270m and smollm2-135m; `demo` is the demo
fact model) and one proxy of shipped CounterFact requests (default 64, batches of 16):
  - core:     LayerGradientScorer in this process (no Ray, no DeepSpeed), the baseline, with as many
              torch threads as one actor has CPUs (--cpus-per-actor), so the ratio is the path's overhead
  - N actors: the same batches on N Ray actors holding ZeRO-3 shards (gloo on CPU, NCCL on GPU)
Scoring time excludes start-up (Ray, group rendezvous, loading the shards), reported apart.
With more than one actor on CPU, the table also gives the time of one all-gather of the whole
model's weights between that many gloo ranks on 127.0.0.1 (what ZeRO-3 moves for every forward
and again for every backward of a batch), so the actors' time can be split into arithmetic and
traffic.
Prints requests/s per configuration and the overhead ratio actor(1)/core (and a Markdown table
with --markdown FILE); no thresholds.

    python benchmarks/bench_distributed.py [--models gemma3-270m smollm2-135m] [--actors 1 2] [--requests 64] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the benchmark's private Ray: 127.0.0.1 only

import torch  # noqa: E402

from lga_dist.devices import synchronize  # noqa: E402
from lga_dist.distributed.driver import ray_session, worker_env  # noqa: E402
from lga_dist.distributed.group import ActorGroup, ActorResources  # noqa: E402
from lga_dist.distributed.worker import ScoringWorker, WorkerSpec  # noqa: E402
from lga_dist.distributed.zero import load_deepspeed_config  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.lga.partial_scores import BatchPlan, score_batch  # noqa: E402
from lga_dist.lga.scoring import LayerGradientScorer  # noqa: E402
from lga_dist.models import load_model  # noqa: E402
from lga_dist.models.demo import demo_facts  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402
from lga_dist.models.sources import resolve_model  # noqa: E402

from benchmarks.tables import publish  # noqa: E402


def core(path: str, proxy: list, plan: BatchPlan, device: str, repeats: int) -> dict:
    started = time.perf_counter()
    loaded = load_model(path, device=device)
    setup = time.perf_counter() - started
    with LayerGradientScorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers, "out", device) as s:
        score_batch(s, proxy, plan, 0)  # warm-up
        times = []
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            for batch_id in range(plan.n_batches):
                score_batch(s, proxy, plan, batch_id)
            synchronize(device)
            times.append(time.perf_counter() - started)
    return {"setup_s": setup, "score_s": min(times), "params": sum(p.numel() for p in loaded.model.parameters())}


def actors(path: str, proxy: list, plan: BatchPlan, n: int, gpu: bool, repeats: int, cpus: int,
           persistence: int | None = None) -> dict:
    config = load_deepspeed_config(None, torch.float32)
    if persistence is not None:  # weights of at most this many elements stay whole on every rank (no gather)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    spec = WorkerSpec(model=path, dtype="float32", param_set="out", deepspeed_config=config, plan=plan,
                      use_gpu=gpu, threads=cpus)
    resources = ActorResources(cpus=cpus, gpus=1 if gpu else 0)
    started = time.perf_counter()
    with ActorGroup(ScoringWorker, n, resources, worker_env(gpu)) as group:
        rendezvous = group.call_one(ScoringWorker.rendezvous_address)
        ranks = group.call(ScoringWorker.setup, [(rendezvous, spec, proxy)] * n)
        setup = time.perf_counter() - started
        group.call(ScoringWorker.score, [([0],)] * n)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for round_ in BatchPlan.rounds(plan.pending(set()), n, steps_per_round=10**6):
                group.call(ScoringWorker.score, [(lane,) for lane in round_])
            times.append(time.perf_counter() - started)
    return {"setup_s": setup, "score_s": min(times), "devices": [r["device"] for r in ranks]}


def _gather_rank(rank: int, world: int, port: int, elements: int, repeats: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shard = torch.ones(elements // world)
    whole = torch.empty(shard.numel() * world)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        started = time.perf_counter()
        dist.all_gather_into_tensor(whole, shard)
        times.append(time.perf_counter() - started)
    if rank == 0:
        out.put(min(times[1:]))
    dist.destroy_process_group()


def whole_model_gather_s(elements: int, world: int, repeats: int) -> float:
    """Seconds for ``world`` gloo ranks on 127.0.0.1 to all-gather ``elements`` float32 weights (best of repeats)."""
    import torch.multiprocessing as mp

    from lga_dist.distributed.worker import free_port

    context = mp.get_context("spawn")
    out = context.Queue()
    port = free_port("127.0.0.1")
    ranks = [context.Process(target=_gather_rank, args=(r, world, port, elements, repeats, out)) for r in range(world)]
    for process in ranks:
        process.start()
    seconds = out.get(timeout=600)
    for process in ranks:
        process.join()
    return seconds


def proxy_for(model: str, n: int) -> list:
    """The demo model's own facts, or the first shipped CounterFact requests for a real model."""
    if model == "demo":
        return demo_facts(n)
    return read_requests([str(demo_requests_path())]).requests[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="also the core's torch thread count")
    parser.add_argument("--gpu", action="store_true", help="actors on GPUs (NCCL), core on the accelerator")
    parser.add_argument("--persistence", type=int, nargs="*", default=[],
                        help="also time 1 actor with stage3_param_persistence_threshold set to each of these")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()

    torch.set_num_threads(args.cpus_per_actor)
    device = str(torch.accelerator.current_accelerator()) if args.gpu else "cpu"
    hardware = "GPU" if args.gpu else f"CPU ({os.cpu_count()} cores)"
    lines = [f"ZeRO-3 scoring vs the single-process core: {args.requests} requests in batches of {args.batch_size}, "
             f"best of {args.repeats}; {hardware}, {args.cpus_per_actor} thread(s) per actor and for the core", "",
             "| model | config | start-up s | score s | requests/s | time / core |",
             "| --- | --- | --- | --- | --- | --- |"]
    summary = {}
    with ray_session(None, max(args.actors) * args.cpus_per_actor):  # private, on 127.0.0.1, stopped after
        for model in args.models:
            path = resolve_model(model, progress=False)  # converted or built once, outside the timings
            proxy = proxy_for(model, args.requests)
            plan = BatchPlan(len(proxy), args.batch_size)
            results = {"core": core(path, proxy, plan, device, args.repeats)}
            for n in args.actors:
                results[f"{n} actor{'s' if n > 1 else ''}"] = actors(path, proxy, plan, n, args.gpu, args.repeats,
                                                                     args.cpus_per_actor)
            for threshold in args.persistence:
                results[f"1 actor, persistence {threshold:,}"] = actors(path, proxy, plan, 1, args.gpu, args.repeats,
                                                                        args.cpus_per_actor, threshold)
            base = results["core"]["score_s"]
            for name, r in results.items():
                lines.append(f"| {model} | {name} | {r['setup_s']:.1f} | {r['score_s']:.2f} | "
                             f"{len(proxy) / r['score_s']:.1f} | {r['score_s'] / base:.2f} |")
            gathers = {}
            if not args.gpu:
                elements = results["core"]["params"]
                for n in (n for n in args.actors if n > 1):
                    gather = gathers[n] = whole_model_gather_s(elements, n, args.repeats)
                    lines.append(f"| {model} | one all-gather of all {elements / 1e6:.0f} M weights, {n} gloo ranks "
                                 f"(x2 per batch, {plan.n_batches} batches) | | {gather:.2f} | | |")
            summary[model] = {name: {"req_per_s": round(len(proxy) / r["score_s"], 2),
                                     "ratio_vs_core": round(r["score_s"] / base, 3), "setup_s": round(r["setup_s"], 2)}
                              for name, r in results.items()}
            summary[model]["whole_model_gather_s"] = {n: round(v, 3) for n, v in gathers.items()}
    publish(lines, args.markdown, summary)


if __name__ == "__main__":
    main()

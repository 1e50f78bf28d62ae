"""Option sections shared by the jobs: each option is declared once, with one default and one help text.

A job's configuration is a composition of these sections (``config.section``);
its flags and YAML keys stay flat (``--actors 2``, ``actors: 2``), grouped by
section in ``--help``. Where a job needs another default (its output folder, the
editing method it is for), it says so where it composes the section.
"""

from __future__ import annotations

import dataclasses

from lga_dist.config import ConfigError, option
from lga_dist.editing import METHODS, WINDOW_ALIGNS
from lga_dist.lga.causal_tracing import TraceOptions
from lga_dist.lga.partial_scores import SCORES, SELECTORS, TRACE_SCORE
from lga_dist.lga.ranking import ORDERS, PAPER_KAPPA, SHARE_RESAMPLES
from lga_dist.lga.scoring import DEFAULT_PARAM_SET, PARAM_SETS
from lga_dist.models import DTYPES
from lga_dist.models.loading import checkpoint_dtype
from lga_dist.models.packaged import DEFAULT_MODEL, MODEL_HELP

CORPUS_HELP = ("text for C = E[k k^T] (json/jsonl/parquet/csv/txt, local or s3://; default: the 1,000 shipped "
               "CounterFact facts as sentences, available offline)")


@dataclasses.dataclass
class ModelOptions:
    """Which model, in which precision, and where it runs when it runs in this process."""

    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    dtype: str = option("auto", "model dtype; 'auto' = the checkpoint's own (config.json) when the model runs on an "
                        "accelerator (in this process, or GPU actors) and for --plan, float32 on CPU, where LGA's "
                        "sums want the bits (bfloat16 edits run 1.6-2x faster on CPUs with AMX and can be slower "
                        "than float32 on others: docs/performance.md)", choices=("auto", *DTYPES))
    device: str = option("auto", "torch device when the model runs in this process (--actors 0, edit): 'auto' = "
                         "the accelerator if any, else cpu")


    def resolve_dtype(self, config: dict, on_accelerator: bool) -> str:
        """``dtype``, with 'auto' made concrete for this checkpoint (``config``: its config.json) and placement."""
        if self.dtype != "auto":
            return self.dtype
        return (checkpoint_dtype(config) or "float32") if on_accelerator else "float32"


@dataclasses.dataclass
class ClusterOptions:
    """Where the work runs: Ray actors and what each one is given."""

    actors: int = option(1, "Ray actors (0: this process, without Ray or DeepSpeed)")
    cpus_per_actor: float = option(1.0, "CPUs per actor (also its torch thread count)")
    gpus_per_actor: float | None = option(None, "GPUs per actor (default: 1 if the Ray cluster has GPUs, else 0)")
    ray_address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, as set by `ray job submit`; "
                                     "else a private local Ray on 127.0.0.1)")

    def validate(self) -> None:
        if self.actors < 0:
            raise ConfigError("--actors must be 0 (in this process) or more")
        if self.cpus_per_actor <= 0 or (self.gpus_per_actor is not None and self.gpus_per_actor < 0):
            raise ConfigError("--cpus-per-actor must be positive and --gpus-per-actor not negative")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_actor))


@dataclasses.dataclass
class ZeroOptions:
    """The DeepSpeed ZeRO-3 group the sharded jobs (rank-layers, bulk-edit) run on."""

    deepspeed_config: str | None = option(None, "DeepSpeed ZeRO-3 config JSON, local or s3:// (default: the built-in "
                                          "plain ZeRO-3, = cluster/deepspeed/zero3.json)")
    max_restarts: int = option(3, "times a group that lost an actor is rebuilt before giving up")

    def validate(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError("--max-restarts cannot be negative")


@dataclasses.dataclass
class EditingOptions:
    """How an edit is made: the method, the layers around the chosen one, its hyper-parameters and C's text."""

    method: str = option("memit", "editing method", choices=tuple(METHODS))
    window: int = option(3, "MEMIT/AlphaEdit: layers edited around the chosen layer (ROME and FT-L edit it alone)")
    window_align: str = option("end", "MEMIT/AlphaEdit: the window ends at the chosen layer, or is centred on it; "
                               "shifted to fit near the first/last layer, never cut", choices=WINDOW_ALIGNS)
    hparam: list[str] = option([], "override a hyper-parameter of the method, NAME=VALUE", metavar="NAME=VALUE")
    corpus: str | None = option(None, CORPUS_HELP)
    corpus_column: str = option("text", "the corpus's text column")
    cov_tokens: int = option(100_000, "tokens averaged into C")
    stats_dir: str | None = option(None, "where C is cached (default: the lga_dist cache; s3:// works)")

    def validate(self) -> None:
        if self.window < 1:
            raise ConfigError("--window must be at least 1")
        if self.cov_tokens < 1:
            raise ConfigError("--cov-tokens must be at least 1")


@dataclasses.dataclass
class OutputOptions:
    """Where results go and how the job talks while it works."""

    out: str = option("out", "output directory (local or s3://)")
    overwrite: bool = option(False, "start over: replace what OUT holds instead of reusing or resuming it")
    progress: bool = option(True, "show progress (a bar on a terminal, a line per step in job logs)")


@dataclasses.dataclass
class ProxyOptions:
    """The edit requests a ranking is computed on: which files, and how many of them."""

    requests: list[str] = option([], "edit request files/prefixes (default: the 1,000 shipped CounterFact facts)",
                                 metavar="PATH")
    proxy_size: int | None = option(None, "proxy set size (overrides --proxy-fraction)")
    proxy_fraction: float = option(0.1, "share of the valid requests used as the proxy set")
    seed: int = option(0, "seed of the proxy sample (and of causal tracing's noise)")

    def validate(self) -> None:
        if self.proxy_size is not None and self.proxy_size < 1:
            raise ConfigError("--proxy-size must be at least 1")
        if not 0 < self.proxy_fraction <= 1:
            raise ConfigError("--proxy-fraction must lie in (0, 1]")


@dataclasses.dataclass
class ScoringOptions:
    """How layers are scored and ranked."""

    selector: str = option("lga", "how layers are scored: 'lga' = layer gradient analysis, 'cma' = causal tracing "
                           "(ROME's: noise on the subject's embeddings, one layer's MLP output restored at the "
                           "subject's last token; score = average indirect effect on the true answer)",
                           choices=SELECTORS)
    param_set: str = option(DEFAULT_PARAM_SET, "weights whose gradients are compared: 'out' = MLP output projection "
                            "(what ROME/MEMIT edit), 'mlp' = all MLP weights", choices=PARAM_SETS)
    score: str = option("dot", "per-request score summed into S_l: 'dot' = signed gradient inner product (the "
                        "paper), 'cosine' = its cosine, 'norm_new' = the new target's gradient norm", choices=SCORES)
    order: str = option("desc", "which end of S_l is golden: 'desc' = the highest (the paper's reading), 'asc' = "
                        "the lowest; the rule '<score>-<order>' is written into the ranking", choices=ORDERS)
    kappa: float = option(PAPER_KAPPA, "Tukey fence width: layers outside [Q1-k*IQR, Q3+k*IQR] are excluded (LGA only: "
                          "causal tracing's peak is its answer, so --selector cma excludes no layer)")
    cma_samples: int = option(3, "--selector cma: noise draws per request (ROME used 10)")
    cma_noise: float = option(3.0, "--selector cma: noise std in units of the subject embeddings' std (ROME: 3)")
    cma_window: int = option(1, "--selector cma: layers restored together, centred on the scored one")
    batch_size: int = option(16, "requests per forward/backward pass (the same batches for any --actors)")
    checkpoint_every: int = option(8, "passes per actor between checkpoints of the finished batches")
    save_matrix: bool = option(False, "also write the per-request x per-layer scores (LGA)")
    share_resamples: int = option(SHARE_RESAMPLES, "bootstrap resamples of the proxy requests behind each layer's "
                                  "pick_share (the share of resamples in which it is rank 1; no new gradients)")

    def validate(self) -> None:
        if self.batch_size < 1 or self.checkpoint_every < 1 or self.share_resamples < 1:
            raise ConfigError("--batch-size, --checkpoint-every and --share-resamples must be at least 1")
        if self.selector == "cma" and self.save_matrix:
            raise ConfigError("--save-matrix writes LGA's per-request gradient scores; it does not apply to "
                              "--selector cma")
        if self.cma_samples < 1 or self.cma_window < 1:
            raise ConfigError("--cma-samples and --cma-window must be at least 1")

    @property
    def rule(self) -> str:
        return f"{self.score}-{self.order}" if self.selector == "lga" else f"{TRACE_SCORE}-desc"

    @property
    def fence_kappa(self) -> float:
        return self.kappa if self.selector == "lga" else float("inf")

    def trace_options(self, seed: int) -> TraceOptions:
        return TraceOptions(noise=self.cma_noise, samples=self.cma_samples, window=self.cma_window, seed=seed)

    def describe(self) -> str:
        if self.selector == "lga":
            return f"LGA, param set '{self.param_set}', rule {self.rule}"
        return f"causal tracing ({self.cma_samples} noise draws of {self.cma_noise:g} std, window {self.cma_window})"

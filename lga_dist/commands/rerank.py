"""rerank: re-rank the models of a list when, and only when, something they depend on changed."""

from __future__ import annotations

from lga_dist.console import format_table
from lga_dist.workflows.rerank import RerankJob, rerank

DESCRIPTION = """Re-rank the models listed in --models when their weights, proxy set or options changed.

--models is a YAML file (local or s3://):

    defaults:                 # any rank-layers option (see jobs/rank_layers.py --help)
      actors: 2
      proxy_size: 200
    models:
      - name: llama-2-70b     # the name rankings and history are filed under
        model: s3://models/llama-2-70b
        requests: [s3://edits/proxy/]

For each model the fingerprint (weights, config, tokenizer), the proxy hash and the ranking
options form a key. If the registry already holds a ranking for that key, the model is skipped.
Otherwise it is ranked (the distributed ranking), the ranking is filed under
REGISTRY/rankings/<name>/<key>/ and a row is appended to REGISTRY/history.parquet with the golden
layer, the previous golden layer and the Spearman correlation with the previous ranking.
Drift (the golden layer moved, or the correlation fell below --min-correlation) is reported,
with a markdown + PNG comparison under REGISTRY/reports/, and exits 3 so a scheduler can alert.
One run at a time may write a registry: REGISTRY/lock.json (exclusive create on disk and on S3,
with an expiry) keeps a second run out; it waits --lock-wait seconds, then fails with exit 2."""

EXIT_DRIFT = 3
Config = RerankJob


def run(config: Config) -> tuple[dict, int]:
    result = rerank(config)
    print(format_table([{k: r.get(k) for k in ("name", "status", "golden_layer", "previous_golden_layer",
                                                "rank_correlation")} for r in result.models]))
    return result.summary(), EXIT_DRIFT if result.drift else 0

"""From per-layer scores to the golden layer: Tukey fences, ranking, and the ranking Parquet file.

S_l = sum_i s_il (float64). Layers outside [Q1 - kappa*IQR, Q3 + kappa*IQR]
(numpy's default linear quantiles) are excluded as outliers; the rest are ranked
by S_l in the rule's order (descending in the paper's reading), ties to the lower
layer index; rank 1 is the golden layer. The rule (which per-request score, which
order) and the selector that produced the scores (lga, cma) are written into every
row, so a reader of the file never has to guess which way it points.

How firm the pick is: the proxy requests are resampled with replacement (no new
gradients: the rows of the per-request matrix), S_l, the fences and the order are
recomputed on each resample, and each layer's ``pick_share`` is the fraction of
resamples in which it is rank 1. The layer most often at rank 1 is the bagged pick.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from lga_dist.errors import UserError
from lga_dist.io.storage import read_parquet
from lga_dist.resampling import resample_indices

log = logging.getLogger(__name__)

MIN_LAYERS_FOR_FENCES = 4
PAPER_KAPPA = 1.0  # the paper's fence width
SHARE_RESAMPLES = 200  # proxy resamples behind each layer's pick_share
FIRM_SHARE = 0.5  # below this share of the resamples, the proxy does not settle the golden layer
METADATA_KEY = b"lga_dist"

RANKING_SCHEMA = pa.schema([
    ("model_id", pa.string()), ("model_fingerprint", pa.string()), ("layer", pa.int32()),
    ("score", pa.float64()), ("n_requests", pa.int64()), ("rank", pa.int32()), ("excluded", pa.bool_()),
    ("is_golden", pa.bool_()), ("q1", pa.float64()), ("q3", pa.float64()), ("kappa", pa.float64()),
    ("param_set", pa.string()), ("loss", pa.string()), ("proxy_hash", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("selector", pa.string()), ("rule", pa.string()),
    ("pick_share", pa.float64()),
])
ORDERS = ("desc", "asc")
MATRIX_SCHEMA = pa.schema([("case_id", pa.string()), ("layer", pa.int32()), ("score", pa.float64()),
                           ("norm_old", pa.float64()), ("norm_new", pa.float64())])


class RankingError(UserError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Fences:
    q1: float
    q3: float
    lower: float
    upper: float
    excluded: np.ndarray  # bool per layer


def tukey_fences(scores: np.ndarray, kappa: float = PAPER_KAPPA, warn: bool = True) -> Fences:
    """Tukey's fences; with fewer than four layers the quartiles mean nothing and none is excluded."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise RankingError("no layer scores to rank")
    if not np.all(np.isfinite(scores)):
        bad = [int(i) for i in np.flatnonzero(~np.isfinite(scores))]
        raise RankingError(f"layer scores are not finite at layers {bad}; check the model's dtype "
                           f"(try float32) and the requests' losses")
    if kappa < 0:
        raise RankingError(f"kappa must be >= 0, got {kappa}")
    q1, q3 = (float(q) for q in np.quantile(scores, [0.25, 0.75]))
    iqr = q3 - q1
    lower, upper = q1 - kappa * iqr, q3 + kappa * iqr
    if scores.size < MIN_LAYERS_FOR_FENCES:
        if warn:
            log.warning("only %d layers: Tukey fences need at least %d, no layer is excluded",
                        scores.size, MIN_LAYERS_FOR_FENCES)
        excluded = np.zeros(scores.size, dtype=bool)
    else:
        excluded = (scores < lower) | (scores > upper)
    return Fences(q1, q3, lower, upper, excluded)


def rank_scores(scores: np.ndarray, kappa: float = PAPER_KAPPA, order: str = "desc",
                warn: bool = True) -> tuple[np.ndarray, Fences]:
    """Rank per layer (1 = golden; 0 for excluded layers) and the fences used.

    ``order`` 'desc' puts the highest S_l first (the paper's reading), 'asc' the lowest."""
    if order not in ORDERS:
        raise RankingError(f"unknown order {order!r}; choose from {ORDERS}")
    scores = np.asarray(scores, dtype=np.float64)
    fences = tukey_fences(scores, kappa, warn)
    kept = [int(l) for l in np.flatnonzero(~fences.excluded)]
    sign = -1.0 if order == "desc" else 1.0
    order = sorted(kept, key=lambda l: (sign * scores[l], l))
    ranks = np.zeros(scores.size, dtype=np.int32)
    for position, layer in enumerate(order, start=1):
        ranks[layer] = position
    return ranks, fences


def pick_shares(per_request: np.ndarray, kappa: float = PAPER_KAPPA, order: str = "desc",
                resamples: int = SHARE_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Each layer's share of ``resamples`` bootstrap resamples of the proxy requests (rows of ``per_request``,
    requests x layers) in which the ranking's rule puts it at rank 1; the shares add up to 1."""
    per_request = np.asarray(per_request, dtype=np.float64)
    counts = np.zeros(per_request.shape[1])
    for rows in resample_indices(len(per_request), resamples, seed):
        ranks, _ = rank_scores(per_request[rows].sum(axis=0), kappa, order, warn=False)
        counts[ranks == 1] += 1
    return counts / resamples


def bagged_pick(shares: Sequence[float]) -> int:
    """The layer most often at rank 1 across the resamples (ties: the lower layer)."""
    return int(np.argmax(np.asarray(shares)))


@dataclasses.dataclass
class RankingProvenance:
    """What a ranking was computed from; repeated in every row and in the file metadata."""

    model_id: str
    model_fingerprint: str
    param_set: str
    proxy_hash: str
    n_requests: int
    loss: str = "mean answer NLL"
    selector: str = "lga"  # what produced the layer scores: lga (gradients) or cma (causal tracing)
    rule: str = "dot-desc"  # how they were ordered: "<per-request score>-<desc|asc>"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def order(self) -> str:
        return self.rule.rsplit("-", 1)[-1]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation with tied values sharing their average rank (NaN if undefined)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b) or len(a) < 2:
        return float("nan")
    ranks = [_average_ranks(x) for x in (a, b)]
    if min(np.std(r) for r in ranks) == 0:
        return float("nan")
    return float(np.corrcoef(*ranks)[0, 1])


def spearman_each(a: Sequence[float], rows: np.ndarray) -> np.ndarray:
    """``spearman(a, row)`` for every row of ``rows`` at once (NaN where a row is constant or not finite)."""
    rows = np.asarray(rows, dtype=float)
    ranked = (rows[:, None, :] < rows[:, :, None]).sum(-1) + ((rows[:, None, :] == rows[:, :, None]).sum(-1) + 1) / 2
    fixed = _average_ranks(np.asarray(a, dtype=float))
    fixed, ranked = fixed - fixed.mean(), ranked - ranked.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ranked @ fixed) / (np.linalg.norm(ranked, axis=1) * np.linalg.norm(fixed))
    rho[~np.all(np.isfinite(rows), axis=1)] = np.nan
    return rho


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def ranking_table(layer_scores: np.ndarray, kappa: float, provenance: RankingProvenance,
                  pick_share: np.ndarray | None = None) -> pa.Table:
    ranks, fences = rank_scores(layer_scores, kappa, provenance.order)
    created = dt.datetime.now(dt.timezone.utc)
    rows = [{"model_id": provenance.model_id, "model_fingerprint": provenance.model_fingerprint, "layer": layer,
             "score": float(layer_scores[layer]), "n_requests": provenance.n_requests,
             "rank": int(ranks[layer]) if ranks[layer] else None, "excluded": bool(fences.excluded[layer]),
             "is_golden": bool(ranks[layer] == 1), "q1": fences.q1, "q3": fences.q3, "kappa": float(kappa),
             "param_set": provenance.param_set, "loss": provenance.loss, "proxy_hash": provenance.proxy_hash,
             "created_at": created, "selector": provenance.selector, "rule": provenance.rule,
             "pick_share": None if pick_share is None else float(pick_share[layer])}
            for layer in range(len(layer_scores))]
    table = pa.Table.from_pylist(rows, schema=RANKING_SCHEMA)
    metadata = {"kappa": kappa, "fences": [fences.lower, fences.upper], **dataclasses.asdict(provenance)}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, default=str).encode()})


def matrix_table(case_ids: Sequence[str], dot: np.ndarray, norm_old: np.ndarray, norm_new: np.ndarray) -> pa.Table:
    n, layers = dot.shape
    return pa.Table.from_pydict({
        "case_id": np.repeat(np.asarray(case_ids, dtype=object), layers).tolist(),
        "layer": np.tile(np.arange(layers, dtype=np.int32), n), "score": dot.reshape(-1),
        "norm_old": norm_old.reshape(-1), "norm_new": norm_new.reshape(-1)}, schema=MATRIX_SCHEMA)


def read_ranking(path: str, expected_fingerprint: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The ranking table and its metadata; refuses a ranking computed on different weights."""
    table = read_parquet(path)
    metadata = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    fingerprints = set(table.column("model_fingerprint").to_pylist())
    if expected_fingerprint is not None and fingerprints != {expected_fingerprint}:
        raise RankingError(f"{path} ranks a model with fingerprint {', '.join(sorted(fingerprints))}, not "
                           f"{expected_fingerprint}; re-rank this model (jobs/rank_layers.py) before using it")
    return table, metadata


def golden_layer(table: pa.Table) -> int:
    golden = [row["layer"] for row in table.to_pylist() if row["is_golden"]]
    if len(golden) != 1:
        raise RankingError(f"ranking has {len(golden)} golden layers, expected 1")
    return int(golden[0])

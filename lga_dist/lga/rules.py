"""Every score rule's view of one saved per-request matrix: which layer each rule would pick, and why.

A rank run with ``--save-matrix`` writes request_scores.parquet (requests x layers: the
signed inner product and both gradient norms). Each rule ('<score>-<order>') sums one
per-request score over the requests, fences the sums with Tukey's fences and orders the
kept layers; these helpers let the evidence tools (validate-golden, choose-rule) replay
that for every rule and fence width without computing a gradient again. With resamples,
each rule also carries every layer's pick share (``ranking.pick_shares``) and a bagged
variant, 'bagged:<rule>', whose pick is the layer most often at rank 1 across resamples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lga_dist.io.storage import read_parquet
from lga_dist.lga.partial_scores import SCORES
from lga_dist.lga.ranking import ORDERS, pick_shares, tukey_fences
from lga_dist.lga.scoring import DEFAULT_PARAM_SET, RequestScores

RULES = tuple(f"{score}-{order}" for score in SCORES for order in ORDERS)
BAGGED = "bagged:"  # a rule's bagged variant: 'bagged:dot-desc'
# The fence widths at which validate-golden computes every rule's pick (what choose-rule --kappa replays)
REPLAY_KAPPAS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf"))


def rule_label(rule: str, param_set: str | None = None, kappa: float | None = None) -> str:
    """A rule's name with what sets it apart from the default: 'dot-desc', 'dot-desc params=mlp kappa=3'."""
    label = rule
    if param_set not in (None, DEFAULT_PARAM_SET):
        label += f" params={param_set}"
    return label if kappa is None else f"{label} kappa={kappa:g}"


def matrix_folder(param_set: str, main_set: str) -> str:
    """Where a validate-golden OUT keeps one parameter set's LGA run: lga/ for its main set, lga-SET/ for others."""
    return "lga" if param_set == main_set else f"lga-{param_set}"


def read_matrix(path: str) -> RequestScores:
    """request_scores.parquet (long format) back as a requests x layers RequestScores."""
    frame = read_parquet(path).to_pandas()
    order = frame["case_id"].unique()  # the proxy's order, as the ranking resampled its rows
    wide = {column: frame.pivot(index="case_id", columns="layer", values=column).loc[order].to_numpy(dtype=np.float64)
            for column in ("score", "norm_old", "norm_new")}
    zeros = np.zeros(len(wide["score"]))
    return RequestScores(wide["score"], wide["norm_old"], wide["norm_new"], zeros, zeros)


def rule_views(matrix: RequestScores, kappa: float, resamples: int = 0, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per rule: layer -> score oriented so that higher means 'pick this layer', and the fenced-out layers.

    Tukey fences are symmetric, so a rule and its reverse exclude the same layers. With ``resamples`` > 0
    every rule also holds ``shares`` (layer -> pick share over that many proxy resamples, seeded) and has a
    bagged variant ``bagged:<rule>`` whose scores are those shares, nothing fenced out (its pick is the
    layer most often at rank 1)."""
    views = {}
    for score in SCORES:
        per_request = matrix.per_request(score)
        sums = per_request.sum(axis=0)
        excluded = [int(layer) for layer in np.flatnonzero(tukey_fences(sums, kappa, warn=False).excluded)]
        for order in ORDERS:
            sign = 1.0 if order == "desc" else -1.0
            rule = f"{score}-{order}"
            views[rule] = {"scores": {layer: sign * float(value) for layer, value in enumerate(sums)},
                           "excluded": excluded}
            if resamples:
                shares = {layer: float(share) for layer, share in
                          enumerate(pick_shares(per_request, kappa, order, resamples, seed))}
                views[rule]["shares"] = shares
                views[BAGGED + rule] = {"scores": shares, "excluded": [], "shares": shares}
    return views

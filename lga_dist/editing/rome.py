"""ROME (Meng et al. 2022): one request, one layer, a rank-one update of the MLP output projection.

    k*  = the edit key: the projection's input at the subject's last token, averaged over prefixes
    v*  = the value it should produce (``compute_targets`` at the projection's output)
    u   = C^-1 k*                      (C = E[k k^T] over ordinary text)
    dW  = (v* - W k*) u^T / (u^T k*)   so that (W + dW) k* = v*, disturbing keys unlike k* least
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lga_dist.editing.base import EditOps
from lga_dist.editing.deltas import EditResult, make_result
from lga_dist.editing.targets import TargetHyperParams
from lga_dist.errors import UserError
from lga_dist.io.requests import EditRequest


@dataclasses.dataclass
class RomeHyperParams(TargetHyperParams):
    """Defaults of ROME's GPT-J configuration (the target optimisation is all ROME has)."""


def rank_one_update(weight: torch.Tensor, mom2: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """dW with (W + dW) key = value, the rest weighted by C = mom2 (all float64)."""
    u = torch.linalg.solve(mom2, key)
    residual = value - weight @ key
    return torch.outer(residual, u) / (u @ key)


def apply_rome(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
               hparams: RomeHyperParams) -> EditResult:
    if len(requests) != 1 or len(layers) != 1:
        raise UserError(f"ROME edits one request at one layer at a time (got {len(requests)} requests, layers "
                        f"{list(layers)}); the edit job applies many requests one after another")
    return rome_each(ctx, requests, layers, hparams)[0]


def rome_each(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
              hparams: RomeHyperParams) -> list[EditResult]:
    """One independent ROME edit per request, each from the current model (nothing is applied).

    Keys and targets of all requests come from one batched pass each; only the
    rank-one solve is per request.
    """
    if len(layers) != 1:
        raise UserError(f"ROME edits one layer at a time (got layers {list(layers)})")
    layer = layers[0]
    name = ctx.adapter.mlp_out_name(layer)
    keys = ctx.keys(requests, layer, hparams.fact_token)
    targets = ctx.targets(requests, name, hparams)
    weight = ctx.weight(layer)
    mom2 = ctx.second_moment(layer)
    return [make_result("rome", ctx.fingerprint, [request], layers, hparams,
                        {name: rank_one_update(weight, mom2, keys[index], targets.target[index])})
            for index, request in enumerate(requests)]

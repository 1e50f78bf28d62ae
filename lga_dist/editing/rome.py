"""ROME (Meng et al. 2022): one request, one layer, a rank-one update of the MLP output projection.

As the authors' code computes it (kmeng01/rome: compute_u.py, compute_v.py, rome_main.py):

    k*      the projection's input at the subject's last token, averaged over the prefixed prompts
    u       C^-1 k*                          (compute_u; C = E[k k^T] over ordinary text)
    v*      v0 + delta, the value the projection should produce (``compute_targets``; v0 is its output
            at the subject of the bare prompt)
    k_bare  the projection's input at the subject of the bare prompt
    dW      (v* - W k_bare - b) u^T / (k_bare . u)    (compute_v's right vector, times u)

so that the bare prompt's key is mapped exactly onto v* (in the unedited model v* - W k_bare - b is
delta itself) while keys C-orthogonal to k* are left alone. The paper writes the denominator as
k* . u; the code divides by k_bare . u, and so does this module.
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


def rank_one_update(residual: torch.Tensor, mom2: torch.Tensor, key: torch.Tensor, bare_key: torch.Tensor
                    ) -> torch.Tensor:
    """dW = r u^T / (bare_key . u), u = C^-1 key: (W + dW) bare_key = W bare_key + r (all float64)."""
    u = torch.linalg.solve(mom2, key)
    return torch.outer(residual, u) / (bare_key @ u)


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
    rank-one solve is per request. Each target is found on the current weights, where v0 is what
    the projection writes at the bare prompt, so v* - W k_bare - b is the target's delta.
    """
    if len(layers) != 1:
        raise UserError(f"ROME edits one layer at a time (got layers {list(layers)})")
    layer = layers[0]
    name = ctx.adapter.mlp_out_name(layer)
    keys = ctx.keys(requests, layer, hparams.fact_token, "flat")
    bare_keys = ctx.keys(requests, layer, hparams.fact_token, "bare")
    targets = ctx.targets(requests, name, hparams)
    mom2 = ctx.second_moment(layer)
    return [make_result("rome", ctx.fingerprint, [request], layers, hparams,
                        {name: rank_one_update(targets.delta[index], mom2, keys[index], bare_keys[index])})
            for index, request in enumerate(requests)]

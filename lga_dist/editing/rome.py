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

from lga_dist.editing.base import EditContext
from lga_dist.editing.context import edit_keys
from lga_dist.editing.deltas import EditRecord, EditResult, finish_record
from lga_dist.editing.targets import TargetHyperParams, compute_targets
from lga_dist.errors import UserError
from lga_dist.requests import EditRequest


@dataclasses.dataclass
class RomeHyperParams(TargetHyperParams):
    """Defaults of ROME's GPT-J configuration (the target optimisation is all ROME has)."""


def rank_one_update(weight: torch.Tensor, mom2: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """dW with (W + dW) key = value, the rest weighted by C = mom2 (all float64)."""
    u = torch.linalg.solve(mom2, key)
    residual = value - weight @ key
    return torch.outer(residual, u) / (u @ key)


def apply_rome(ctx: EditContext, requests: Sequence[EditRequest], layers: Sequence[int],
               hparams: RomeHyperParams) -> EditResult:
    if len(requests) != 1 or len(layers) != 1:
        raise UserError(f"ROME edits one request at one layer at a time (got {len(requests)} requests, layers "
                        f"{list(layers)}); the edit job applies many requests one after another")
    layer = layers[0]
    name = ctx.adapter.mlp_out_name(layer)
    key = edit_keys(ctx.model, ctx.tokenizer, ctx.adapter, requests, ctx.prefixes, layer, ctx.device,
                    hparams.fact_token)[0]
    targets = compute_targets(ctx.model, ctx.tokenizer, ctx.adapter, requests, ctx.prefixes, name,
                              hparams, ctx.device)
    weight = ctx.weight(layer).detach().to("cpu", torch.float64)
    delta = rank_one_update(weight, ctx.second_moment(layer), key, targets.target[0])
    record = EditRecord(method="rome", layers=[layer], case_ids=[r.case_id for r in requests],
                        hparams=dataclasses.asdict(hparams), fingerprint_before=ctx.fingerprint)
    deltas = {name: delta}
    return EditResult(deltas, finish_record(record, deltas))

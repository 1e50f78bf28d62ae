"""FT-L (Zhu et al. 2020, as ROME evaluates it): constrained fine-tuning of one MLP output projection.

Adam on the layer's weight to lower the new target's NLL on the rewrite prompts,
every step projected back into an L-infinity ball of radius ``norm_constraint``
around the original weight. The simple baseline the other methods are measured against.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lga_dist.answers import answer_logits, answer_nll, collate, encode_prompt_answer
from lga_dist.editing.base import EditContext
from lga_dist.editing.deltas import EditResult, make_result
from lga_dist.io.requests import EditRequest
from lga_dist.models.adapters import get_module
from lga_dist.models.tracing import trainable_only


@dataclasses.dataclass
class FtHyperParams:
    """Defaults of ROME's FT-L (GPT-2 XL) configuration."""

    num_steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    batch_size: int = 64


def apply_ft(ctx: EditContext, requests: Sequence[EditRequest], layers: Sequence[int],
             hparams: FtHyperParams) -> EditResult:
    names = [ctx.adapter.mlp_out_name(layer) for layer in layers]
    weights = [get_module(ctx.model, name).weight for name in names]
    originals = [w.detach().clone() for w in weights]
    items = [encode_prompt_answer(ctx.tokenizer, r.prompt, r.target_new) for r in requests]
    optimizer = torch.optim.Adam(weights, lr=hparams.lr)
    try:
        with trainable_only(ctx.model, weights):
            for _ in range(hparams.num_steps):
                optimizer.zero_grad()
                for start in range(0, len(items), hparams.batch_size):
                    batch = collate(items[start:start + hparams.batch_size], ctx.tokenizer.pad_token_id
                                    ).to(ctx.device)
                    loss = answer_nll(answer_logits(ctx.model, batch), batch).sum() / len(items)
                    loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for w, w0 in zip(weights, originals):
                        w.copy_(torch.clamp(w, w0 - hparams.norm_constraint, w0 + hparams.norm_constraint))
        deltas = {}
        for name, w, w0 in zip(names, weights, originals):
            delta = (w.detach() - w0).to(torch.float64)
            deltas[name] = ctx.adapter.orient(delta).cpu()
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, originals):
                w.copy_(w0)
    return make_result("ft", ctx.fingerprint, requests, layers, hparams, deltas)

"""MEMIT (Meng et al. 2023): many requests, spread over a window of layers.

As the authors' code computes it (kmeng01/memit: memit_main.py, compute_ks.py, compute_z.py):

    z_i   v0 + delta, the target of the last window layer's block output at request i's subject
          (``compute_targets``; v0 is that output at the bare prompt)
    for each layer l of the window, lowest first, on the model as already updated:
      K   keys at l (d_in x n): the mean of the bare prompt's key and the generated prefixes' mean key
          (compute_ks: its context templates are [["{}"], [the generated ones]])
      R   (z - h_L) / (layers left, l included), h_L: the last window layer's output at the bare prompt now
      [a norm with gain g after the projection (Gemma 3): R_i <- rms(o_i) R_i / g, o_i its output at the
       bare prompt; not in the reference, which has no such norm]
      dW_l = R K^T (lambda C_l + K K^T)^-1      solved in float64, applied before the next layer
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lga_dist.editing.base import EditOps
from lga_dist.editing.context import PostNorm
from lga_dist.editing.deltas import EditResult, make_result
from lga_dist.editing.targets import TargetHyperParams, Targets
from lga_dist.io.requests import EditRequest


@dataclasses.dataclass
class MemitHyperParams(TargetHyperParams):
    """Defaults of MEMIT's GPT-J configuration."""

    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0


def memit_solve(residual: torch.Tensor, keys: torch.Tensor, mom2: torch.Tensor, weight: float) -> torch.Tensor:
    """dW = R K^T (weight*C + K K^T)^-1; R (d_out x n), K (d_in x n), float64."""
    system = weight * mom2 + keys @ keys.T
    return torch.linalg.solve(system, keys @ residual.T).T


GAIN_FLOOR = 1e-3  # norm gains below this share of the largest are treated as zero (see through_post_norm)


def through_post_norm(residual: torch.Tensor, value: torch.Tensor, norm: PostNorm) -> torch.Tensor:
    """The change of the projection's output that moves the residual stream by ``residual`` (d x n) when an
    RMS norm sits between them; ``value`` (n x d): the projection's output now.

    The norm maps o to gain * o / r, r = sqrt(mean(o^2) + eps), whose derivative is gain / r in every
    direction but o's own (which it normalises away), so the change is r * R / gain. Without this, MEMIT
    writes R itself and the norm amplifies it by gain / r (about 50x at Gemma 3 270M's layer 2) before it
    saturates. A dimension whose gain is (almost) zero cannot be moved from here (Gemma 3 270M's layer 1 has
    a gain of exactly 0): it is left to the other layers rather than divided by zero (gains below 1e-3 of
    the largest).
    """
    gain = norm.gain
    r = (value.pow(2).mean(dim=1) + norm.eps).sqrt()
    reachable = gain.abs() > GAIN_FLOOR * gain.abs().max()
    inverse = torch.where(reachable, 1.0 / torch.where(reachable, gain, torch.ones_like(gain)), torch.zeros_like(gain))
    return residual * r.unsqueeze(0) * inverse.unsqueeze(1)


def at_projection(ctx: EditOps, requests: Sequence[EditRequest], layer: int, residual: torch.Tensor,
                  fact_token: str) -> torch.Tensor:
    """``residual`` (d x n), wanted in the residual stream, as the change layer ``layer``'s projection must write."""
    norm = ctx.mlp_post_norm(layer)
    if norm is None:
        return residual
    value = ctx.read_output(requests, ctx.adapter.mlp_out_name(layer), fact_token, "bare")
    return through_post_norm(residual, value, norm)


def spread_over_layers(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
                       target_steps: TargetHyperParams, solve, targets: Targets | None = None,
                       ) -> dict[str, torch.Tensor]:
    """MEMIT's outer loop, shared with AlphaEdit: ``solve(layer, residual, keys)`` returns that layer's dW.

    The deltas are applied to the model as they are computed (later layers see
    earlier updates); the weights are restored exactly before returning: the caller applies them.
    ``targets`` at the last layer, when the caller has them already (from the unedited model).
    """
    layers = sorted(layers)
    last = ctx.adapter.layer_name(layers[-1])
    targets = targets if targets is not None else ctx.targets(requests, last, target_steps)
    deltas: dict[str, torch.Tensor] = {}
    snapshot = ctx.snapshot([ctx.adapter.mlp_out_name(layer) for layer in layers])
    try:
        for position, layer in enumerate(layers):
            keys = ctx.keys(requests, layer, target_steps.fact_token, "by_kind").T
            current = ctx.read_output(requests, last, target_steps.fact_token, "bare")
            residual = (targets.target - current).T / (len(layers) - position)
            name = ctx.adapter.mlp_out_name(layer)
            delta = solve(layer, at_projection(ctx, requests, layer, residual, target_steps.fact_token), keys)
            deltas[name] = delta
            ctx.apply({name: delta})
    finally:
        snapshot.restore()
    return deltas


def spread_each(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
                target_steps: TargetHyperParams, solve, method: str) -> list[EditResult]:
    """One independent update per request (each from the current model), as ``spread_over_layers`` would give.

    The targets of all requests come from one batched optimisation (on the unedited
    model, as each would alone). At a single layer the keys come from one batched
    pass too and only the solve is per request; a window of layers needs each
    request's earlier-layer updates in place, so its keys and solves go one request at a time.
    """
    if len(layers) != 1:
        targets = ctx.targets(requests, ctx.adapter.layer_name(max(layers)), target_steps)
        deltas = [spread_over_layers(ctx, [request], layers, target_steps, solve, targets.rows([i]))
                  for i, request in enumerate(requests)]
        return [make_result(method, ctx.fingerprint, [r], layers, target_steps, d) for r, d in zip(requests, deltas)]
    layer = layers[0]
    targets = ctx.targets(requests, ctx.adapter.layer_name(layer), target_steps)
    keys = ctx.keys(requests, layer, target_steps.fact_token, "by_kind")
    name = ctx.adapter.mlp_out_name(layer)
    # from the unedited model, z - h (both at the bare prompt) is the target's delta
    residual = at_projection(ctx, requests, layer, targets.delta.T, target_steps.fact_token)
    return [make_result(method, ctx.fingerprint, [request], layers, target_steps,
                        {name: solve(layer, residual[:, i:i + 1], keys[i].unsqueeze(1))})
            for i, request in enumerate(requests)]


def _memit_solver(ctx: EditOps, hparams: MemitHyperParams):
    def solve(layer: int, residual: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return memit_solve(residual, keys, ctx.second_moment(layer), hparams.mom2_update_weight)
    return solve


def apply_memit(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
                hparams: MemitHyperParams) -> EditResult:
    deltas = spread_over_layers(ctx, requests, layers, hparams, _memit_solver(ctx, hparams))
    return make_result("memit", ctx.fingerprint, requests, layers, hparams, deltas)


def memit_each(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
               hparams: MemitHyperParams) -> list[EditResult]:
    return spread_each(ctx, requests, layers, hparams, _memit_solver(ctx, hparams), "memit")

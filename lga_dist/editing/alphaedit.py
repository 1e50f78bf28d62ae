"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of preserved knowledge.

    P     = U0 U0^T, U0 the eigenvectors of C (= E[k0 k0^T] over ordinary text) whose eigenvalues
            are below ``nullspace_threshold``: directions preserved keys k0 (almost) never take
    dW_l  = R K^T P (K_p K_p^T P + K K^T P + L2 I)^-1     (K_p: keys of earlier edits, if any)
For a preserved key (P k0 = 0) the inverse maps k0 to k0 / L2, so dW k0 = R K^T P k0 / L2 = 0:
the update leaves preserved knowledge alone by construction.

Sequential edits (the paper's setting, AlphaEdit_main.py's ``cache_c``): after each batch, the keys
of its requests at every edited layer, read on the model as edited, are added to K_p K_p^T, which
every later batch's solve keeps. ``PreservedKeys`` holds that sum, not the keys: a d_in x d_in matrix
per layer however many edits came before (the keys themselves grow by d_in per edit).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lga_dist.editing.base import EditOps
from lga_dist.editing.deltas import EditResult, make_result
from lga_dist.editing.memit import spread_each, spread_over_layers
from lga_dist.editing.targets import TargetHyperParams
from lga_dist.errors import UserError
from lga_dist.io.requests import EditRequest


@dataclasses.dataclass
class AlphaEditHyperParams(TargetHyperParams):
    """Defaults of AlphaEdit's LLaMA3-8B configuration (MEMIT's target optimisation)."""

    v_num_grad_steps: int = 25
    v_lr: float = 0.1
    clamp_norm_factor: float = 0.75
    nullspace_threshold: float = 2e-2
    L2: float = 10.0


def null_space_projection(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """P onto the eigenvectors of ``mom2`` with eigenvalue < threshold (float64)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(mom2)
    basis = eigenvectors[:, eigenvalues < threshold]
    if basis.shape[1] == 0:
        raise UserError(f"no null space: every eigenvalue of the key covariance is >= {threshold} "
                        f"(smallest {float(eigenvalues[0]):.3g}); raise nullspace_threshold")
    return basis @ basis.T


@dataclasses.dataclass
class PreservedKeys:
    """K_p K_p^T per edited layer: the keys of every earlier batch, which each later AlphaEdit solve keeps."""

    grams: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (d_in, d_in) float64

    def add(self, ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int], fact_token: str) -> None:
        """The batch's keys, read on the model as it now is (after the batch's update), into K_p K_p^T."""
        for layer in layers:
            keys = ctx.keys(requests, layer, fact_token, "by_kind").T
            gram = keys @ keys.T
            self.grams[layer] = self.grams[layer] + gram if layer in self.grams else gram


def alphaedit_solve(residual: torch.Tensor, keys: torch.Tensor, projection: torch.Tensor, l2: float,
                    preserved_gram: torch.Tensor | None = None) -> torch.Tensor:
    """dW (d_out x d_in) from R (d_out x n), K (d_in x n), P (d_in x d_in) and K_p K_p^T; float64."""
    gram = keys @ keys.T
    if preserved_gram is not None:
        gram = gram + preserved_gram
    identity = torch.eye(keys.shape[0], dtype=keys.dtype)
    return torch.linalg.solve(projection @ gram + l2 * identity, projection @ keys @ residual.T).T


def _alphaedit_solver(ctx: EditOps, hparams: AlphaEditHyperParams, preserved: PreservedKeys | None = None):
    projections: dict[int, torch.Tensor] = {}

    def solve(layer: int, residual: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if layer not in projections:
            projections[layer] = null_space_projection(ctx.second_moment(layer), hparams.nullspace_threshold)
        return alphaedit_solve(residual, keys, projections[layer], hparams.L2,
                               preserved.grams.get(layer) if preserved is not None else None)
    return solve


def apply_alphaedit(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
                    hparams: AlphaEditHyperParams, preserved: PreservedKeys | None = None) -> EditResult:
    """One AlphaEdit update of ``requests``; with ``preserved``, the keys of earlier batches are kept too."""
    deltas = spread_over_layers(ctx, requests, layers, hparams, _alphaedit_solver(ctx, hparams, preserved))
    return make_result("alphaedit", ctx.fingerprint, requests, layers, hparams, deltas)


def alphaedit_each(ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
                   hparams: AlphaEditHyperParams) -> list[EditResult]:
    return spread_each(ctx, requests, layers, hparams, _alphaedit_solver(ctx, hparams), "alphaedit")

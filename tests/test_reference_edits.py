"""The batched edits equal ROME's and MEMIT's published loops, request by request (tests/reference_edit.py).

Float64 tiny random models, so that the only differences left are rounding: the batched target
optimisation, ROME's rank-one update and MEMIT's window update must agree with the one-request,
one-sequence-at-a-time reference to 1e-9. GPT-2 has biases in its MLP projection (ROME's residual
is v* - W k - b); LLaMA has none and pads its tokenizer's BOS in front.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import save_tiny_model
from reference_edit import Deviations, reference_memit, reference_rome, reference_target

from lga_dist.editing import METHODS, EditContext
from lga_dist.editing.covariance import compute_second_moments
from lga_dist.editing.targets import TargetHyperParams, compute_targets
from lga_dist.models import load_model
from lga_dist.models.demo import demo_facts

PREFIXES = ["", "The day", "I think so"]
TEXTS = ["Paris is the capital of France", "The Eiffel Tower is in Paris", "Danielle Darrieux speaks French",
         "Toko Yasuda plays the guitar", "Autonomous University of Madrid is in Spain"] * 3
TOLERANCE = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param, n_layers=3)
    return load_model(str(path), dtype=torch.float64)


def _requests(n: int = 4):
    return demo_facts(1000)[500:500 + n]


def _hparams(**changes) -> TargetHyperParams:
    """Scaled to random tiny models, whose site values have norms of 0.01-0.2: a step of 0.1 and a clamp of
    9 ||v0||, which some requests reach; a decay that does not swamp the NLL at these norms."""
    return dataclasses.replace(TargetHyperParams(v_num_grad_steps=8, v_lr=0.1, clamp_norm_factor=9.0, kl_factor=0.5,
                                                 v_weight_decay=1e-4), **changes)


def _second_moments(m, layers) -> dict[int, torch.Tensor]:
    """C over a few sentences, plus a ridge: a tiny random GPT-2's GELU is nearly linear, so its keys span
    about d_model of the MLP's 4 d_model dimensions and C alone is singular (the solve would amplify rounding)."""
    stats, _ = compute_second_moments(m.model, m.tokenizer, m.adapter, layers, TEXTS, 400, progress=False)
    return {layer: c + 1e-2 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype) for layer, c in stats.items()}


def _sites(m) -> list[str]:
    return [m.adapter.mlp_out_name(1), m.adapter.layer_name(1)]


@pytest.mark.parametrize("zero3_stepping", [False, True])
def test_batched_targets_are_the_reference_loop_request_by_request(tiny, zero3_stepping):
    """Every row of one batched optimisation is the request's own reference loop (v0 at the bare prompt,
    KL(current || initial) at the subject of "{subject} is a", decay on ||delta||, at most steps-1 steps,
    the clamp). With ``ranks_max`` (a ZeRO-3 rank) stopped rows stay in every forward, frozen."""
    m = tiny
    requests = _requests()
    hparams = _hparams(stop_loss=0.0)
    for site in _sites(m):
        batched = compute_targets(m.model, m.tokenizer, m.adapter, requests, PREFIXES, site, hparams,
                                  ranks_max=(lambda x: x) if zero3_stepping else None)
        for index, request in enumerate(requests):
            alone = reference_target(m.model, m.tokenizer, request, PREFIXES, site, hparams)
            assert alone.steps == hparams.v_num_grad_steps - 1 and alone.delta.abs().max() > 0
            torch.testing.assert_close(batched.original[index], alone.v0, **TOLERANCE)
            torch.testing.assert_close(batched.delta[index], alone.delta, **TOLERANCE)
            assert batched.final_loss[index].item() == pytest.approx(alone.loss, rel=1e-9)
            assert int(batched.steps[index]) == alone.steps


def _threshold_stopping_some_midway(trajectories: list[list[float]]) -> float:
    """A stop_loss at which some request first falls below it after one or more steps (not at the start,
    not at the last, evaluation-only iteration) and another never does: midway between two observed losses,
    so that rounding cannot put a loss on either side of it."""
    values = sorted({loss for losses in trajectories for loss in losses})
    for low, high in zip(values, values[1:]):
        threshold = (low + high) / 2
        first = [next((i for i, loss in enumerate(losses) if loss < threshold), None) for losses in trajectories]
        if None in first and any(f is not None and 0 < f < len(trajectories[0]) - 1 for f in first):
            return threshold
    raise AssertionError(f"no threshold stops one request midway and not another: {trajectories}")


@pytest.mark.parametrize("zero3_stepping", [False, True])
def test_a_request_that_stops_early_changes_no_other_result(tiny, zero3_stepping):
    """The stop rule is on each request's total loss: at a threshold some requests stop after a few steps and
    others never; each row is still its own reference loop, and a request that never stopped has exactly the
    delta it has when no request stops."""
    m = tiny
    requests = _requests()
    site = m.adapter.layer_name(1)
    never = _hparams(v_num_grad_steps=12, kl_factor=0.0, stop_loss=0.0)
    threshold = _threshold_stopping_some_midway(
        [reference_target(m.model, m.tokenizer, r, PREFIXES, site, never).losses for r in requests])
    hparams = dataclasses.replace(never, stop_loss=threshold)
    batched = compute_targets(m.model, m.tokenizer, m.adapter, requests, PREFIXES, site, hparams,
                              ranks_max=(lambda x: x) if zero3_stepping else None)
    unstopped = compute_targets(m.model, m.tokenizer, m.adapter, requests, PREFIXES, site, never)
    alone = [reference_target(m.model, m.tokenizer, r, PREFIXES, site, hparams) for r in requests]
    steps = [t.steps for t in alone]
    assert 0 < min(steps) < hparams.v_num_grad_steps - 1 and max(steps) == hparams.v_num_grad_steps - 1, steps
    for index, reference in enumerate(alone):
        torch.testing.assert_close(batched.delta[index], reference.delta, **TOLERANCE)
        assert int(batched.steps[index]) == reference.steps
        if reference.steps == hparams.v_num_grad_steps - 1 and reference.loss >= threshold:
            torch.testing.assert_close(batched.delta[index], unstopped.delta[index], **TOLERANCE)
        else:
            assert reference.loss < threshold


def test_rome_is_the_reference_update(tiny):
    """dW = (v* - W k_bare - b) u^T / (k_bare . u), u = C^-1 k*: the bare prompt's key lands on v*."""
    m = tiny
    layer = 1
    mom2 = _second_moments(m, [layer])[layer]
    ctx = EditContext(m.model, m.tokenizer, m.adapter, m.fingerprint, PREFIXES, lambda _: mom2)
    rome = METHODS["rome"]
    hparams = rome.hparams(**dataclasses.asdict(_hparams()))
    ours = METHODS["rome"].each(ctx, _requests(3), [layer], hparams)
    for result, request in zip(ours, _requests(3)):
        reference, _ = reference_rome(m.model, m.tokenizer, m.adapter, request, PREFIXES, layer, hparams, mom2)
        torch.testing.assert_close(result.deltas[m.adapter.mlp_out_name(layer)], reference, **TOLERANCE)
    # The paper's denominator (k* . u) is another edit: the test can tell them apart.
    paper, _ = reference_rome(m.model, m.tokenizer, m.adapter, _requests(1)[0], PREFIXES, layer, hparams, mom2,
                              Deviations(rome_denominator_k_star=True))
    assert not torch.allclose(paper, ours[0].deltas[m.adapter.mlp_out_name(layer)], rtol=1e-6, atol=0)


def test_memit_is_the_reference_update(tiny):
    """MEMIT over a window of 2: targets at the last window layer, keys averaging the bare prompt with the
    prefixes' mean (half each), residuals against the bare prompt's current output, layer by layer."""
    m = tiny
    layers = [0, 1]
    stats = _second_moments(m, layers)
    ctx = EditContext(m.model, m.tokenizer, m.adapter, m.fingerprint, PREFIXES, stats.__getitem__)
    memit = METHODS["memit"]
    hparams = memit.hparams(**{**dataclasses.asdict(_hparams()), "mom2_update_weight": 5.0})
    requests = _requests(3)
    ours = memit.apply(ctx, requests, layers, hparams).deltas
    reference = reference_memit(m.model, m.tokenizer, m.adapter, requests, PREFIXES, layers, hparams, stats)
    for layer in layers:
        assert reference[layer].abs().max() > 0
        torch.testing.assert_close(ours[m.adapter.mlp_out_name(layer)], reference[layer], **TOLERANCE)

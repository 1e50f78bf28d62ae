"""Fixed batches, their deal to ranks with padding, and the checkpoint of finished batches."""

from __future__ import annotations

import numpy as np
import pytest

from lga_dist.lga.partial_scores import BatchPlan, BatchResult, PartialScores
from lga_dist.lga.scoring import RequestScores


def _scores(rng: np.random.Generator, n: int, layers: int) -> RequestScores:
    norms = rng.uniform(0.5, 2.0, size=(2, n, layers))
    return RequestScores(dot=rng.normal(size=(n, layers)), norm_old=norms[0], norm_new=norms[1],
                         loss_old=rng.uniform(size=n), loss_new=rng.uniform(size=n))


def test_batches_do_not_depend_on_ranks_and_every_rank_runs_the_same_passes():
    plan = BatchPlan(n_requests=100, batch_size=16)
    assert plan.n_batches == 7 and list(plan.indices(6)) == list(range(96, 100))
    for world in (1, 2, 3, 8):
        rounds = plan.rounds(plan.pending(set()), world, steps_per_round=2)
        dealt = [b for round_ in rounds for lane in round_ for b in lane if b is not None]
        assert sorted(dealt) == list(range(7))  # each batch once
        for round_ in rounds:
            assert len(round_) == world and len({len(lane) for lane in round_}) == 1  # same pass count
    # 7 batches on 3 ranks: 3 passes each, two of them padding.
    lanes = [lane for round_ in plan.rounds(list(range(7)), 3, 10) for lane in round_]
    assert lanes == [[0, 3, 6], [1, 4, None], [2, 5, None]]
    assert plan.rounds(plan.pending({0, 1, 2, 3, 4, 5, 6}), 2, 4) == []


def test_layer_scores_are_batch_sums_in_batch_order():
    rng = np.random.default_rng(0)
    parts = [_scores(rng, n, 3) for n in (4, 4, 2)]
    state = PartialScores({"k": 1}, n_layers=3)
    for batch_id in (2, 0, 1):  # arrival order does not matter
        state.add(BatchResult.from_scores(batch_id, parts[batch_id]))
    everything = RequestScores.concat(parts)
    np.testing.assert_allclose(state.layer_scores("dot"), everything.dot.sum(0), rtol=1e-14)
    np.testing.assert_allclose(state.layer_scores("cosine"),
                               (everything.dot / (everything.norm_old * everything.norm_new)).sum(0), rtol=1e-14)
    np.testing.assert_array_equal(state.request_scores().dot, everything.dot)
    with pytest.raises(ValueError, match="unknown score"):
        state.layer_scores("l2")


def test_cosine_of_a_zero_gradient_counts_zero():
    scores = RequestScores(dot=np.array([[1.0, -2.0], [3.0, 0.0]]), norm_old=np.array([[1.0, 2.0], [2.0, 0.0]]),
                           norm_new=np.array([[1.0, 2.0], [2.0, 0.0]]), loss_old=np.zeros(2), loss_new=np.zeros(2))
    result = BatchResult.from_scores(0, scores)
    assert result.sums["dot"].tolist() == [4.0, -2.0]
    assert result.sums["cosine"].tolist() == pytest.approx([1.0 + 0.75, -0.5])
    assert result.sums["norm_new"].tolist() == [3.0, 2.0]


def test_checkpoint_round_trip_and_key_mismatch(tmp_path):
    rng = np.random.default_rng(1)
    key = {"model_fingerprint": "sha256:ab", "proxy_hash": "p"}
    state = PartialScores(key, n_layers=4)
    for batch_id in (0, 3):
        state.add(BatchResult.from_scores(batch_id, _scores(rng, 5, 4)))
    path = str(tmp_path / "ranking.checkpoint.npz")
    state.save(path)
    loaded = PartialScores.load(path, dict(key), n_layers=4)
    assert loaded.finished == {0, 3}
    np.testing.assert_array_equal(loaded.layer_scores("dot"), state.layer_scores("dot"))
    np.testing.assert_array_equal(loaded.layer_scores("cosine"), state.layer_scores("cosine"))
    np.testing.assert_array_equal(loaded.request_scores().norm_new, state.request_scores().norm_new)
    with pytest.raises(ValueError, match="no causal-tracing effects"):
        loaded.per_request("aie")
    assert PartialScores.load(path, {**key, "proxy_hash": "other"}, n_layers=4) is None
    assert PartialScores.load(str(tmp_path / "absent.npz"), key, n_layers=4) is None


def test_causal_tracing_effects_per_request_survive_a_checkpoint(tmp_path):
    """The per-request effects are what a ranking's pick shares are resampled from."""
    from lga_dist.lga.causal_tracing import TraceResult

    rng = np.random.default_rng(2)
    state = PartialScores({"selector": "cma"}, n_layers=3)
    effects = {batch_id: rng.normal(size=(n, 3)) for batch_id, n in ((1, 2), (0, 4))}
    for batch_id, values in effects.items():
        state.add(BatchResult.from_trace(batch_id, TraceResult(values, np.ones(len(values)), np.ones(len(values)))))
    path = str(tmp_path / "ranking.checkpoint.npz")
    state.save(path)
    loaded = PartialScores.load(path, {"selector": "cma"}, n_layers=3)
    np.testing.assert_array_equal(loaded.per_request("aie"), np.concatenate([effects[0], effects[1]]))
    np.testing.assert_allclose(loaded.layer_scores("aie"), loaded.per_request("aie").sum(axis=0), rtol=1e-14)


def test_checkpoint_on_s3(s3):
    state = PartialScores({"k": "v"}, n_layers=2)
    state.add(BatchResult(0, {"dot": np.array([1.0, 2.0]), "cosine": np.array([0.1, 0.2]),
                              "norm_new": np.array([3.0, 4.0])}))
    state.save(f"{s3}/run/ranking.checkpoint.npz")
    loaded = PartialScores.load(f"{s3}/run/ranking.checkpoint.npz", {"k": "v"}, n_layers=2)
    assert loaded.layer_scores("dot").tolist() == [1.0, 2.0]

"""Tukey fences, ranking, the ranking Parquet file, proxy selection and the rank_layers job."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, run_cli

from lga_dist.io.requests import EditRequest
from lga_dist.io.storage import write_parquet
from lga_dist.lga.proxy import ProxyError, select_proxy
from lga_dist.lga.ranking import (
    RankingError,
    RankingProvenance,
    golden_layer,
    rank_scores,
    ranking_table,
    read_ranking,
    tukey_fences,
)
from lga_dist.lga.scoring import LayerGradientScorer
from lga_dist.models import load_model
from lga_dist.models.demo import demo_facts


def test_tukey_hand_computed():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 2.5, 3.5])
    # sorted: -50 1 2 2.5 3 3.5 4 100; numpy linear quantiles: q1 = 1.75, q3 = 3.625
    fences = tukey_fences(scores, kappa=1.0)
    assert fences.q1 == pytest.approx(1.75) and fences.q3 == pytest.approx(3.625)
    assert (fences.lower, fences.upper) == pytest.approx((1.75 - 1.875, 3.625 + 1.875))
    assert fences.excluded.tolist() == [False, False, False, False, True, True, False, False]
    ranks, _ = rank_scores(scores, 1.0)
    assert ranks.tolist() == [6, 5, 3, 1, 0, 0, 4, 2]  # layer 3 (score 4.0) is golden
    wide, _ = rank_scores(scores, 100.0)
    assert wide[4] == 1 and wide[5] == 8


def test_all_equal_scores_tie_to_lowest_layer():
    ranks, fences = rank_scores(np.full(6, 0.25))
    assert not fences.excluded.any() and ranks.tolist() == [1, 2, 3, 4, 5, 6]


def test_ties_break_to_lower_layer():
    ranks, _ = rank_scores(np.array([1.0, 3.0, 2.0, 3.0, 1.5]))
    assert ranks.tolist() == [5, 1, 3, 2, 4]


def test_fewer_than_four_layers_excludes_nothing(caplog):
    ranks, fences = rank_scores(np.array([0.0, 10.0, -10.0]))
    assert not fences.excluded.any() and ranks.tolist() == [2, 1, 3]
    assert "Tukey fences need at least 4" in caplog.text


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_a_clear_error(bad):
    with pytest.raises(RankingError, match=r"not finite at layers \[2\]"):
        rank_scores(np.array([1.0, 2.0, bad, 4.0, 5.0]))


def test_parquet_round_trip_and_fingerprint_refusal(tmp_path):
    provenance = RankingProvenance("m", "sha256:abc", "out", "p123", 7, config={"seed": 3})
    table = ranking_table(np.array([0.5, 2.0, 1.0, 1.5, 0.75]), 1.0, provenance)
    path = str(tmp_path / "ranking.parquet")
    write_parquet(table, path)
    loaded, metadata = read_ranking(path, expected_fingerprint="sha256:abc")
    assert loaded.to_pylist() == table.to_pylist()
    assert metadata["config"] == {"seed": 3} and metadata["proxy_hash"] == "p123" and metadata["kappa"] == 1.0
    assert golden_layer(loaded) == 1
    assert [r["rank"] for r in loaded.to_pylist()] == [5, 1, 3, 2, 4]
    assert pq.read_schema(path).field("score").type == "double"
    with pytest.raises(RankingError, match="re-rank this model"):
        read_ranking(path, expected_fingerprint="sha256:other")
    assert not list(tmp_path.glob(".tmp-*"))


def requests_with_relations(n: int) -> list[EditRequest]:
    facts = demo_facts(n)
    return [EditRequest(**{**f.__dict__, "relation_id": ["P1", "P2", "P3"][i % 3 if i < n // 2 else 0]})
            for i, f in enumerate(facts)]


def test_proxy_is_seeded_and_stratified():
    requests = requests_with_relations(300)
    proxy = select_proxy(requests, fraction=0.1, seed=5)
    assert len(proxy) == 30 and proxy == select_proxy(requests, fraction=0.1, seed=5)
    assert proxy != select_proxy(requests, fraction=0.1, seed=6)
    counts = {r: sum(p.relation_id == r for p in proxy) for r in ("P1", "P2", "P3")}
    # P1: 50 + 150 of 300 -> 20; P2, P3: 50 each -> 5
    assert counts == {"P1": 20, "P2": 5, "P3": 5}
    assert len(select_proxy(requests, size=1000)) == 300
    with pytest.raises(ProxyError):
        select_proxy(requests, fraction=0.0)


@pytest.mark.slow
def test_float32_scores_agree_with_float64_on_demo_model(demo_model_dir):
    """The demo model has output gradients of ~1e22 at BOS: float32 must still be finite and right."""
    results = {}
    for dtype in (torch.float32, torch.float64):
        loaded = load_model(str(demo_model_dir), dtype=dtype)
        with LayerGradientScorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers) as scorer:
            results[dtype] = scorer.score(demo_facts(16))
    assert np.isfinite(results[torch.float32].dot).all()
    np.testing.assert_allclose(results[torch.float32].dot.sum(0), results[torch.float64].dot.sum(0), rtol=2e-3)


@pytest.mark.slow
def test_rank_layers_job_on_the_demo_model(demo_model_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr, summary = run_cli("rank-layers", "--model", "demo", "--out", str(out), "--save-matrix",
                                            "--no-progress", "--actors", "0")
    assert code == 0, stderr
    table = pq.read_table(out / "ranking.parquet")
    rows = table.to_pylist()
    assert len(rows) == 10 and summary["n_requests"] == 100 and summary["actors"] == 0
    assert summary["golden_layer"] == golden_layer(table) == summary["ranking"][0]
    assert all(r["model_fingerprint"] == summary["model_fingerprint"] for r in rows)
    assert summary["model_id"] == "demo"
    assert "golden layer:" in stdout and "<- golden" in stdout and "pick_share" in stdout
    matrix = pq.read_table(out / "request_scores.parquet").to_pandas()
    assert len(matrix) == 100 * 10
    sums = matrix.groupby("layer")["score"].sum().to_numpy()
    np.testing.assert_allclose(sums, [r["score"] for r in rows], rtol=1e-12)
    # each layer's share of the proxy resamples at rank 1, from the same per-request rows, seeded
    from lga_dist.lga.ranking import pick_shares

    wide = matrix.pivot(index="case_id", columns="layer", values="score").loc[matrix["case_id"].unique()]
    np.testing.assert_allclose([r["pick_share"] for r in rows], pick_shares(wide.to_numpy(), 1.0, "desc", 200, 0))
    assert sum(r["pick_share"] for r in rows) == pytest.approx(1.0)
    assert summary["golden_share"] == next(r["pick_share"] for r in rows if r["is_golden"])
    metadata = json.loads(table.schema.metadata[b"lga_dist"])
    assert metadata["config"]["param_set"] == "out" and metadata["model_fingerprint"] == summary["model_fingerprint"]
    # Same run again: reused. Different options without --overwrite: refused. With it: replaced.
    assert not (out / "ranking.checkpoint.npz").exists()
    code, _, _, again = run_cli("rank-layers", "--model", "demo", "--out", str(out), "--no-progress")
    assert code == 0 and again["reused"] is True and again["ranking"] == summary["ranking"]
    code, _, stderr, refused = run_cli("rank-layers", "--model", "demo", "--out", str(out), "--kappa", "2",
                                       "--no-progress")
    assert code == 2 and "--overwrite" in refused["error"]
    code, _, _, replaced = run_cli("rank-layers", "--model", "demo", "--out", str(out), "--kappa", "2", "--overwrite",
                                   "--no-progress", "--actors", "0")
    assert code == 0 and replaced["reused"] is False
    assert (REPO / "jobs" / "rank_layers.py").exists()


@pytest.mark.slow
def test_rerunning_a_finished_ranking_exits_cleanly_every_time(tmp_path):
    """Reusing a finished ranking (and refusing a changed one) exits 0 / 2, never 134 from Arrow at shutdown.

    Before storage.read_parquet, 4-16 of 20 such reruns aborted with "terminate called without an
    active exception" after printing the right table: a Python file object released by an Arrow
    I/O thread during interpreter finalisation."""
    from helpers import save_tiny_model

    from lga_dist.models.demo_data import demo_requests_path

    model = save_tiny_model(tmp_path / "tiny", "llama")
    args = ["rank-layers", "--model", str(model), "--requests", str(demo_requests_path()), "--proxy-size", "4",
            "--actors", "0", "--out", str(tmp_path / "out"), "--no-progress"]
    code, _, stderr, first = run_cli(*args)
    assert code == 0 and first["reused"] is False, stderr
    codes = []
    for attempt in range(20):
        extra = ["--kappa", "2"] if attempt % 4 == 3 else []  # the refusal path reads the ranking too
        code, _, stderr, summary = run_cli(*args, *extra)
        codes.append(code)
        assert "terminate called" not in stderr
        assert summary is not None and summary.get("reused", False) is (not extra)
    assert codes == [2 if i % 4 == 3 else 0 for i in range(20)]


def test_every_rule_orders_a_small_saved_matrix_as_by_hand(tmp_path):
    """Three requests x five layers, worked by hand for each rule (kappa 1.5 keeps every layer)."""
    from lga_dist.lga.partial_scores import SCORES
    from lga_dist.lga.scoring import RequestScores

    dot = np.array([[4.0, -1.0, 0.5, 2.0, -3.0], [2.0, -1.0, 0.5, 1.0, -2.0], [0.0, 1.0, 1.0, 1.0, -1.0]])
    norm_old = np.array([[4.0, 1.0, 1.0, 2.0, 3.0]] * 3)
    norm_new = np.array([[1.0, 1.0, 1.0, 2.0, 1.0], [1.0, 2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    rows = RequestScores(dot, norm_old, norm_new, np.zeros(3), np.zeros(3))
    # cosines: [1, -1, .5, .5, -1], [.5, -.5, .5, .5, -2/3], [0, 1, 1, .5, -1/3]
    # S_dot = [6, -1, 2, 4, -6]; S_cos = [1.5, -0.5, 2, 1.5, -2]; S_norm_new = [3, 4, 3, 4, 3]; ties: lower layer
    expected = {("dot", "desc"): [0, 3, 2, 1, 4], ("dot", "asc"): [4, 1, 2, 3, 0],
                ("cosine", "desc"): [2, 0, 3, 1, 4], ("cosine", "asc"): [4, 1, 0, 3, 2],
                ("norm_new", "desc"): [1, 3, 0, 2, 4]}
    for (score, order), by_hand in expected.items():
        assert score in SCORES
        sums = rows.per_request(score).sum(axis=0)
        provenance = RankingProvenance("m", "sha256:x", "out", "h", 3, rule=f"{score}-{order}")
        table = ranking_table(sums, 1.5, provenance)
        ranked = sorted((r for r in table.to_pylist() if r["rank"]), key=lambda r: r["rank"])
        assert [r["layer"] for r in ranked] == by_hand, (score, order)
        assert {r["rule"] for r in table.to_pylist()} == {f"{score}-{order}"}
        assert {r["selector"] for r in table.to_pylist()} == {"lga"}
        assert golden_layer(table) == by_hand[0]


def test_pick_shares_of_a_firm_and_a_tied_matrix():
    """Firm: layer scores rise with depth and every request agrees, so the top layer is rank 1 in every resample
    (share 1.0) and inside the fences. Tied: two layers that each score 1 on alternate requests of 31 (16 against
    15) share the resamples about evenly, the other layers never; the shares add up to 1 either way."""
    from lga_dist.lga.ranking import bagged_pick, pick_shares

    rng = np.random.default_rng(0)
    firm = np.arange(10.0)[None, :] + 0.1 * rng.random((30, 10))
    shares = pick_shares(firm, kappa=1.0, order="desc", resamples=200, seed=0)
    assert shares[9] == 1.0 and shares.sum() == pytest.approx(1.0) and bagged_pick(shares) == 9
    tied = np.zeros((31, 6))
    tied[0::2, 2], tied[1::2, 4] = 1.0, 1.0
    shares = pick_shares(tied, kappa=np.inf, order="desc", resamples=400, seed=1)
    assert 0.35 < shares[2] < 0.75 and 0.25 < shares[4] < 0.65
    assert shares[2] + shares[4] == pytest.approx(1.0) and bagged_pick(shares) == 2
    # the order flips which end is picked, the seed fixes the resamples
    assert pick_shares(firm, 1.0, "asc", 50, 3)[0] == 1.0
    np.testing.assert_array_equal(pick_shares(tied, np.inf, "desc", 50, 7), pick_shares(tied, np.inf, "desc", 50, 7))


def test_a_ranking_that_does_not_settle_its_golden_layer_says_so():
    """golden_share < 0.5: the summary carries the warning and what to do; at 0.5 or more, none."""
    from lga_dist.lga.ranking import RankingProvenance, ranking_table
    from lga_dist.workflows.rank import RankJob, RankResult

    provenance = RankingProvenance("m", "sha256:x", "out", "p", 30)
    for shares, warned in (([0.1, 0.45, 0.3, 0.15], True), ([0.0, 0.9, 0.1, 0.0], False)):
        table = ranking_table(np.array([1.0, 3.0, 2.0, 1.5]), 1.0, provenance, np.array(shares))
        result = RankResult(table, "ranking.parquet", None, RankJob(), reused=False, seconds=0.0)
        assert result.golden_layer == 1 and result.golden_share == shares[1]
        assert bool(result.warnings) is warned
        if warned:
            assert "does not settle the golden layer" in result.warnings[0] and "--proxy-size" in result.warnings[0]
            assert "validate-golden" in result.warnings[0]


def test_a_golden_layer_the_proxy_never_separated_is_unsettled_not_drift():
    """Built matrices: last week's proxy split its resamples between layers 2 and 4 (layer 2 rank 1 by a hair);
    this week's ranking picks 4. That is a coin toss the old ranking already showed: 'unsettled', exit 0. Had last
    week's proxy been firm on layer 2 (layer 4 never rank 1), the same move is drift. A profile that changed
    shape (low Spearman) is drift whatever the shares."""
    from lga_dist.lga.ranking import pick_shares
    from lga_dist.workflows.rerank import RerankJob, verdict

    config = RerankJob()
    split = np.zeros((31, 6))
    split[0::2, 2], split[1::2, 4] = 1.0, 1.0
    firm = np.zeros((31, 6))
    firm[:, 2], firm[:, 4] = 1.0, 0.5
    for matrix, expected in ((split, "unsettled"), (firm, "drift")):
        shares = dict(enumerate(pick_shares(matrix, np.inf, "desc", 200, 0)))
        assert verdict(2, shares, 4, 0.95, config) == expected
        assert verdict(2, shares, 2, 0.95, config) == "ranked"
        assert verdict(2, shares, 4, 0.3, config) == "drift"
    assert verdict(None, {}, 4, None, config) == "ranked"  # a first ranking
    assert verdict(2, {}, 4, 0.95, config) == "drift"  # a ranking from before pick shares: no evidence of a toss

"""The packaged real models (installed by .ci/run): load, LGA against brute-force autograd, ZeRO-3 1 = 2 actors."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import run_cli
from test_scoring import brute_force

from lga_dist.lga.scoring import LayerGradientScorer
from lga_dist.models import load_model
from lga_dist.models.demo import demo_facts
from lga_dist.models.packaged import packaged_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_packaged_model_loads_and_its_scores_equal_brute_force(name):
    loaded = load_model(name)
    assert loaded.n_layers == packaged_model(name).layers and loaded.model_id == name
    requests = demo_facts(600)[500:503]
    with LayerGradientScorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers, "out") as scorer:
        scores = scorer.score(requests)
    dot, norm_old, norm_new = brute_force(loaded.model, loaded.tokenizer, loaded.adapter, requests[:2],
                                          loaded.n_layers, "out")
    scale = np.abs(dot).max()
    np.testing.assert_allclose(scores.dot[:2], dot, rtol=2e-3, atol=1e-5 * scale)
    np.testing.assert_allclose(scores.norm_new[:2], norm_new, rtol=2e-3)
    assert np.isfinite(scores.dot).all() and (scores.norm_old > 0).all()


def test_default_model_ranking_is_the_same_on_one_and_two_zero3_actors(tmp_path):
    """No --model: the packaged real default, sharded by DeepSpeed ZeRO-3 over 1 and 2 Ray actors."""
    rows = {}
    for actors in (1, 2):
        out = tmp_path / f"a{actors}"
        code, stdout, stderr, summary = run_cli("rank-layers", "--actors", str(actors), "--proxy-size", "8",
                                                "--batch-size", "4", "--out", str(out), "--no-progress")
        assert code == 0, stderr[-3000:]
        assert summary["model_id"] == "gemma3-270m" and summary["n_requests"] == 8
        assert "<- golden" in stdout
        rows[actors] = sorted(pq.read_table(out / "ranking.parquet").to_pylist(), key=lambda r: r["layer"])
    assert len(rows[1]) == 18
    np.testing.assert_allclose([r["score"] for r in rows[2]], [r["score"] for r in rows[1]], rtol=1e-5)
    assert [r["rank"] for r in rows[2]] == [r["rank"] for r in rows[1]]

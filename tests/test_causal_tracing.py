"""Causal tracing (CMA): hook arithmetic on tiny models, and where the demo fact model keeps its facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import save_tiny_model

from lga_dist.lga.causal_tracing import CausalTracer, TraceOptions, trace_request, window_layers
from lga_dist.models import load_model
from lga_dist.models.demo import demo_facts


def test_windows_are_centred_and_clipped():
    assert window_layers(4, 1, 10) == [4]
    assert window_layers(4, 3, 10) == [3, 4, 5]
    assert window_layers(0, 3, 10) == [0, 1, 2]
    assert window_layers(9, 3, 10) == [7, 8, 9]
    assert window_layers(2, 10, 4) == [0, 1, 2, 3]


def test_subject_positions_cover_the_subject_tokens(tmp_path):
    model = load_model(str(save_tiny_model(tmp_path / "tiny", "gemma3", n_layers=2)))
    request = demo_facts(1000)[3]
    traced = trace_request(model.tokenizer, request)
    text = model.tokenizer.decode([traced.encoded.input_ids[i] for i in traced.subject_positions])
    assert text.strip() == request.subject.strip()
    assert traced.subject_last == traced.subject_positions[-1] < traced.encoded.answer_start


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_restoring_every_layers_whole_state_gives_back_the_clean_run(tmp_path, family):
    """Restore every block's output at every position: the final state is clean, so each layer's
    effect is exactly P_clean - P_corrupted; with no restore the effect is zero."""
    loaded = load_model(str(save_tiny_model(tmp_path / family, family, n_layers=4)), dtype=torch.float64)
    tracer = CausalTracer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers)
    requests = demo_facts(1000)[500:504]
    std = tracer.noise_std(requests)
    whole = tracer.trace(requests, TraceOptions(kind="hidden", window=4, all_positions=True, samples=2), std)
    assert not np.allclose(whole.p_clean, whole.p_corrupted)
    np.testing.assert_allclose(whole.effects, np.repeat((whole.p_clean - whole.p_corrupted)[:, None], 4, axis=1),
                               rtol=1e-10, atol=1e-14)
    # Restoring only the last block's output at every position is enough, and is the last layer's effect.
    last_only = tracer.trace(requests, TraceOptions(kind="hidden", all_positions=True, samples=2), std)
    np.testing.assert_allclose(last_only.effects[:, 3], whole.p_clean - whole.p_corrupted, rtol=1e-10, atol=1e-14)
    # Padding rows count zero.
    padded = tracer.trace(requests, TraceOptions(samples=1), std, valid=[True, False, True, False])
    assert not padded.effects[1].any() and not padded.effects[3].any()


@pytest.mark.slow
def test_indirect_effect_peaks_where_the_demo_model_keeps_its_facts(demo_model_dir):
    """By construction only blocks 0-4 have MLPs (5-9 are attention-only): restoring an MLP output of
    blocks 5-9 restores nothing, and the average indirect effect peaks in 0-4."""
    loaded = load_model(str(demo_model_dir))
    tracer = CausalTracer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers)
    requests = demo_facts(40)[:16]
    std = tracer.noise_std(requests)
    result = tracer.trace(requests, TraceOptions(samples=2), std)
    aie = result.effects.mean(axis=0)
    assert int(np.argmax(aie)) in range(5)
    assert aie[:5].max() > 0.05
    np.testing.assert_allclose(aie[5:], 0.0, atol=1e-6)
    assert result.p_clean.mean() > result.p_corrupted.mean()


def _requests_file(tmp_path, n: int):
    import json

    from lga_dist.io.requests import to_counterfact_flat

    path = tmp_path / "requests.json"
    path.write_text(json.dumps([to_counterfact_flat(r) for r in demo_facts(1000)[500:500 + n]]))
    return path


def test_rank_layers_with_causal_tracing_writes_the_average_indirect_effect(tmp_path):
    """--selector cma: the ranking's scores are the tracer's AIE on the same proxy batch; no layer fenced out."""
    import pyarrow.parquet as pq
    from helpers import run_cli

    from lga_dist.io.requests import read_requests
    from lga_dist.lga.proxy import select_proxy

    model = save_tiny_model(tmp_path / "tiny", "llama", n_layers=4)
    requests = _requests_file(tmp_path, 6)
    code, stdout, stderr, summary = run_cli(
        "rank-layers", "--model", str(model), "--requests", str(requests), "--proxy-size", "6", "--batch-size", "8",
        "--selector", "cma", "--cma-samples", "2", "--actors", "0", "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0, stderr[-3000:]
    assert summary["selector"] == "cma" and summary["rule"] == "aie-desc" and "causal tracing" in stdout
    rows = sorted(pq.read_table(tmp_path / "out" / "ranking.parquet").to_pylist(), key=lambda r: r["layer"])
    assert not any(r["excluded"] for r in rows) and {r["selector"] for r in rows} == {"cma"}
    loaded = load_model(str(model))
    proxy = select_proxy(read_requests([str(requests)]).requests, size=6, seed=0)
    tracer = CausalTracer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers)
    direct = tracer.trace(proxy, TraceOptions(samples=2), tracer.noise_std(proxy)).effects.mean(axis=0)
    np.testing.assert_allclose([r["score"] for r in rows], direct, rtol=1e-5, atol=1e-9)
    assert summary["golden_layer"] == int(np.argmax(direct))


@pytest.mark.slow
def test_causal_tracing_on_zero3_actors_equals_one_process(demo_model_dir, tmp_path):
    import pyarrow.parquet as pq
    from helpers import run_cli

    scores = {}
    for actors in ("0", "2"):
        out = tmp_path / actors
        code, _, stderr, summary = run_cli("rank-layers", "--model", "demo", "--selector", "cma", "--proxy-size", "12",
                                           "--batch-size", "4", "--cma-samples", "1", "--actors", actors, "--out",
                                           str(out), "--no-progress")
        assert code == 0, stderr[-3000:]
        scores[actors] = [r["score"] for r in sorted(pq.read_table(out / "ranking.parquet").to_pylist(),
                                                     key=lambda r: r["layer"])]
    np.testing.assert_allclose(scores["2"], scores["0"], rtol=1e-4, atol=1e-7)

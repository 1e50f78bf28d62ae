"""validate-golden end to end on the demo model: actors vs one process, resume, reproducibility, report files."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from helpers import run_cli

from lga_dist.lga.rules import RULES

ARGS = ("--limit", "6", "--layers", "3:4", "--chunk-size", "3", "--proxy-sizes", "0.34", "--no-progress",
        "--hparam", "v_num_grad_steps=8")


def _grid(out) -> dict[tuple[str, int], dict]:
    """The proxy and test splits' rows by (case id, layer)."""
    return {(r["case_id"], r["layer"]): r for r in pq.read_table(out / "grid.parquet").to_pylist()
            if r["split"] in ("proxy", "test")}


@pytest.mark.slow
def test_validate_golden_on_actors_matches_one_process_and_resumes(demo_model_dir, shared_data, tmp_path):
    local = tmp_path / "local"
    transfer_args = ("--transfer-requests", str(shared_data / "zsre" / "zsre_mend_train-1k.json"),
                     "--transfer-limit", "2")
    code, stdout, stderr, first = run_cli("validate-golden", "--model", "demo", *ARGS, *transfer_args, "--actors", "0",
                                          "--out", str(local))
    assert code == 0, stderr[-3000:]
    transfer = [r for r in pq.read_table(local / "grid.parquet").to_pylist() if r["group"] == "transfer"]
    assert len(transfer) == 4 and all(r["source_format"] == "zsre" for r in transfer)
    assert all(0.0 <= r["zsre_efficacy"] <= 1.0 and 0.0 <= r["performance"] <= 1.0 for r in transfer)
    grid = _grid(local)
    assert len(grid) == 12 and {layer for _, layer in grid} == {3, 4}
    assert first["tasks"] == 6 and first["tasks_run"] == 6 and first["model_id"] == "demo"
    for key in ("golden_layer", "lga_layer", "optimal_mean", "golden_mean", "lga_mean", "regret", "spearman"):
        assert key in first, key  # DESIGN.md's stable summary keys
    assert first["rule"] == "dot-desc"
    every = [*RULES, *(f"bagged:{rule}" for rule in RULES)]
    assert set(first["rules"]) == set(every) | {f"{rule} params=mlp" for rule in every} | {"aie-desc"}
    assert first["regret_ci_low"] <= first["regret"] <= first["regret_ci_high"]
    assert set(first["by_metric"]) == {"score", "margin"} and 0.0 <= first["pick_share"] <= 1.0
    # Two candidate layers, no fences: each rule's reverse picks the other layer.
    for score in ("dot", "cosine"):
        assert {first["rules"][f"{score}-desc"]["lga_layer"], first["rules"][f"{score}-asc"]["lga_layer"]} == {3, 4}
    assert first["rules"]["dot-desc"]["lga_layer"] == first["lga_layer"]
    for name in ("golden_summary.md", "golden_summary.parquet", "layers.png", "optimal.png", "proxy_size.png",
                 "lga/ranking.parquet"):
        assert (local / name).exists(), name
    splits = {}  # every grid row says which split its request is in (DESIGN.md's grid.parquet)
    for row in pq.read_table(local / "grid.parquet").to_pylist():
        splits.setdefault(row["split"], set()).add(row["case_id"])
    assert {name: len(ids) for name, ids in splits.items()} == {"proxy": 3, "test": 3, "transfer": 2}
    everything = pq.read_table(local / "golden_summary.parquet").to_pylist()
    assert [r["metric"] for r in everything] == ["score"] * (len(everything) // 2) + ["margin"] * (len(everything) // 2)
    summary = everything[:len(everything) // 2]
    assert [r["comparison"] for r in summary] == ["proxy -> test", "proxy -> transfer", "proxy of 2 -> test"] + [
        "proxy -> test"] * 2 * len(every)
    # the main parameter set's other rules (each followed by its bagged variant), every rule again through all
    # MLP weights, then causal tracing
    with_bagged = [name for rule in RULES for name in (rule, f"bagged:{rule}")]
    assert [r["rule"] for r in summary][3:] == with_bagged[1:] + with_bagged + ["aie-desc"]
    assert [r["param_set"] for r in summary] == ["out"] * (3 + len(every) - 1) + ["mlp"] * len(every) + [None]
    assert all(r["regret_ci_low"] <= r["regret"] <= r["regret_ci_high"] for r in summary)
    assert (local / "lga-mlp" / "request_scores.parquet").exists()
    # replaying every rule from the saved matrices and the grid gives the summary's picks and regrets again
    from lga_dist.validation.rule_choice import fenced_evidence

    replayed = {e.label: e for e in fenced_evidence(str(local), [1.0])}
    for label, row in first["rules"].items():
        if label != "aie-desc":
            again = replayed[f"{label} kappa=1"]
            assert (again.lga_layer, again.regret) == (row["lga_layer"], pytest.approx(row["regret"])), label
    assert summary[-1]["selector"] == "cma" and summary[-1]["lga_layer"] == first["cma_layer"] in (3, 4)
    assert first["cma_seconds"] > 0 and (local / "cma" / "ranking.parquet").exists()
    assert summary[1]["test_size"] == 2 and summary[1]["golden_layer"] == summary[0]["golden_layer"]
    assert summary[0]["golden_layer"] in (3, 4) and summary[0]["proxy_size"] == 3 and summary[0]["test_size"] == 3
    assert "golden" in stdout and "cost: LGA" in stdout
    # the per-layer table of the report is the grid's: 6 main requests per layer, the same means
    report = (local / "golden_summary.md").read_text()
    main = list(_grid(local).values())
    for layer in (3, 4):
        mean = sum(r["performance"] for r in main if r["layer"] == layer) / 6
        assert f"| {layer} | {layer} | 6 | 0 | {mean:.3f} |" in report
    assert json.loads((local / "grid" / "grid.json").read_text())["method"] == "rome"

    # Same grid from two Ray actors (each edit is computed from the unedited model, whoever runs it).
    actors = tmp_path / "actors"
    code, _, stderr, second = run_cli("validate-golden", "--model", "demo", *ARGS, "--actors", "2",
                                      "--out", str(actors))
    assert code == 0, stderr[-3000:]
    other = _grid(actors)
    assert other.keys() == grid.keys()
    for key, row in grid.items():
        assert other[key]["performance"] == pytest.approx(row["performance"], abs=1e-6)
        assert other[key]["EM"] == pytest.approx(row["EM"], abs=1e-4)
    assert second["golden_layer"] == first["golden_layer"]

    # Resume: drop one finished task and rerun; only that task runs again, the numbers do not move.
    parts = sorted((local / "grid").glob("test-*.parquet"))
    parts[-1].unlink()
    code, _, stderr, third = run_cli("validate-golden", "--model", "demo", *ARGS, *transfer_args, "--actors", "0",
                                     "--out", str(local))
    assert code == 0, stderr[-3000:]
    assert third["tasks_run"] == 1 and third["resumed_tasks"] == 5
    again = _grid(local)
    for key, row in grid.items():
        assert again[key]["performance"] == pytest.approx(row["performance"], abs=1e-6)

    # Another method in the same OUT is refused rather than mixed into the grid.
    code, _, _, refused = run_cli("validate-golden", "--model", "demo", *ARGS, "--actors", "0", "--method", "memit",
                                  "--out", str(local))
    assert code == 2 and "--overwrite" in refused["error"]


def test_validate_golden_refuses_bad_options(demo_model_dir, tmp_path):
    code, _, stderr, _ = run_cli("validate-golden", "--model", "demo", "--proxy-sizes", "0.9", "--out", str(tmp_path))
    assert code == 2 and "--proxy-sizes" in stderr
    code, _, stderr, _ = run_cli("validate-golden", "--model", "demo", "--limit", "2", "--out", str(tmp_path))
    assert code == 2 and "--limit" in stderr
    code, _, stderr, _ = run_cli("validate-golden", "--model", "demo", "--param-sets", "mlp", "mlp",
                                 "--out", str(tmp_path))
    assert code == 2 and "--param-sets takes one or more of out, mlp, each once" in stderr


def test_an_error_inside_the_grid_actors_is_the_one_line_error(demo_model_dir, tmp_path):
    """The corpus is read by each GridWorker: its StorageError must not arrive as a Ray actor repr."""
    code, _, stderr, summary = run_cli("validate-golden", "--model", "demo", *ARGS, "--actors", "1",
                                       "--corpus", str(tmp_path / "no-such-corpus.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and summary["status"] == "error"
    assert "no-such-corpus.txt" in summary["error"] and "ActorHandle" not in summary["error"]
    assert stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_picks_only_test_split_gives_the_full_grids_figures(tmp_path):
    """--test-layers picks edits the test split only where some selector points (and at the golden layer): every
    grid row it computed is the full grid's, and every comparison whose pick it edited has the same regret,
    interval, proxy regret and Spearman as with the test split edited at every layer."""
    import math

    from helpers import save_tiny_model

    from lga_dist.cli import run_command

    model = save_tiny_model(tmp_path / "tiny", "llama", n_layers=8)
    args = ["--model", str(model), "--limit", "8", "--actors", "0", "--chunk-size", "4", "--proxy-sizes", "0.5",
            "--hparam", "v_num_grad_steps=4", "--no-progress", "--cma-samples", "0", "--param-sets", "out",
            "--replay-kappas", "1", "--share-resamples", "20"]
    outs = {mode: tmp_path / mode for mode in ("all", "picks")}
    for mode, out in outs.items():
        assert run_command("validate-golden", [*args, "--test-layers", mode, "--out", str(out)], prog="test") == 0
    grids = {mode: {(r["case_id"], r["layer"]): r for r in pq.read_table(out / "grid.parquet").to_pylist()}
             for mode, out in outs.items()}
    tested = {layer for (case, layer), r in grids["picks"].items() if r["split"] == "test"}
    assert 0 < len(tested) < 8  # some layer was skipped on the test split
    assert len(grids["picks"]) == 4 * 8 + 4 * len(tested) and len(grids["all"]) == 8 * 8
    for key, row in grids["picks"].items():
        for metric in ("ES", "PS", "NS", "EM", "PM", "NM", "score", "margin", "delta_norm"):
            assert row[metric] == grids["all"][key][metric], (key, metric)
    summaries = {mode: pq.read_table(out / "golden_summary.parquet").to_pylist() for mode, out in outs.items()}
    # the summary's pick share of the study's rule is its ranking's, replayed from the saved matrix
    ranking = pq.read_table(outs["picks"] / "lga" / "ranking.parquet").to_pylist()
    main = summaries["picks"][0]
    assert main["pick_share"] == next(r["pick_share"] for r in ranking if r["is_golden"]) and \
        main["lga_layer"] == next(r["layer"] for r in ranking if r["is_golden"])
    assert len(summaries["picks"]) == len(summaries["all"])
    for picked, full in zip(summaries["picks"], summaries["all"]):
        assert (picked["rule"], picked["metric"], picked["lga_layer"], picked["golden_layer"]) == (
            full["rule"], full["metric"], full["lga_layer"], full["golden_layer"])
        assert picked["pick_on_test"] == (picked["lga_layer"] in tested)
        assert picked["golden_layer"] in tested  # the smaller proxies' golden layers too: each row is judged at its own
        same = ["proxy_regret", "proxy_regret_ci_low", "proxy_regret_ci_high", "lga_spearman", "pick_share"]
        same += ["regret", "regret_ci_low", "regret_ci_high", "golden_test"] if picked["pick_on_test"] else []
        for field in same:
            assert (picked[field] == full[field]) or (math.isnan(picked[field]) and math.isnan(full[field])), field
        assert picked["optimum_split"] == "proxy" and full["optimum_split"] == "test"
        if not picked["pick_on_test"]:
            assert math.isnan(picked["regret"])

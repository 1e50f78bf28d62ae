"""The bulk edit job: S3 ingestion with broken and conflicting records, ZeRO-3 actors vs one process,
a killed run resumed to the same weights, the edited model reloaded, and S3 failures."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, kill_an_actor_and_finish, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_ranking(demo_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranking")
    code, _, stderr, _ = run_cli("rank-layers", "--model", "demo", "--out", str(out), "--actors", "0", "--no-progress")
    assert code == 0, stderr
    return out / "ranking.parquet"


def _demo_records(start: int, count: int) -> list[dict]:
    from lga_dist.io.requests import to_counterfact_flat
    from lga_dist.models.demo_data import load_demo_requests

    return [to_counterfact_flat(r) for r in load_demo_requests()[start:start + count]]


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _upload_requests(s3: str) -> dict[str, list[str]]:
    """Three files of three containers under one prefix: valid, broken and conflicting records."""
    import s3fs

    fs = s3fs.S3FileSystem()
    a, b, c = _demo_records(500, 4), _demo_records(504, 3), _demo_records(507, 2)
    empty_target = {**_demo_records(509, 1)[0], "target_new": " "}
    conflict_1 = {**_demo_records(510, 1)[0], "case_id": "conflict-1"}
    conflict_2 = {**conflict_1, "case_id": "conflict-2", "target_new": conflict_1["target_new"] + " Jr."}
    lines = [json.dumps(r) for r in a] + ['{"case_id": "broken", "prompt": '] + [json.dumps(empty_target)]
    fs.pipe(f"{s3}/requests/part-a.jsonl", ("\n".join(lines) + "\n").encode())
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(b + [conflict_1, conflict_2]), buffer)
    fs.pipe(f"{s3}/requests/part-b.parquet", buffer.getvalue())
    fs.pipe(f"{s3}/requests/nested/part-c.json", json.dumps(c).encode())
    return {"applied": [str(r["case_id"]) for r in a + b + c],
            "quarantined": ["broken", str(empty_target["case_id"])], "conflicts": ["conflict-1", "conflict-2"]}


def test_bulk_edit_from_s3_on_zero3_actors_matches_one_process_and_reloads(s3, demo_model_dir, tmp_path):
    import s3fs

    from lga_dist.evaluation import evaluate_requests
    from lga_dist.models import load_model
    from lga_dist.models.demo_data import load_demo_requests

    expected = _upload_requests(s3)
    # Blocks 0-1 are where the demo model keeps its facts; lambda as in tests/test_edit_efficacy.py.
    common = ("--layers", "0-1", "--hparam", "mom2_update_weight=100", "--requests", f"{s3}/requests/",
              "--method", "memit", "--batch-size", "4", "--probe", "3", "--no-progress")
    code, stdout, stderr, summary = run_cli("bulk-edit", "--model", "demo", *common, "--actors", "2",
                                            "--out", f"{s3}/out")
    assert code == 0, stderr[-3000:]
    assert "2 ZeRO-3 actor(s) ready" in stdout
    # Every record read is applied, quarantined or conflict-rejected, exactly once.
    assert summary["read"] == 13 and summary["applied"] == 9 and summary["quarantined"] == 2
    assert summary["conflicts"] == 2 and summary["batches"] == 3
    assert summary["applied"] + summary["quarantined"] + summary["conflicts"] == summary["read"]
    assert summary["layers"] == [0, 1] and summary["golden_layer"] is None
    assert summary["pre"]["ES"] == 0.0 and summary["post"]["ES"] >= 0.6  # the edits take through the shards
    fs = s3fs.S3FileSystem()
    quarantine = [json.loads(line) for line in fs.cat(f"{s3}/out/quarantine.jsonl").decode().splitlines()]
    assert sorted(q["reason"] for q in quarantine) == ["conflicting_target", "conflicting_target", "empty_target",
                                                       "invalid_json"]
    with fs.open(f"{s3}/out/eval.parquet", "rb") as handle:
        evaluation = pq.read_table(handle).to_pandas()
    assert sorted(evaluation["case_id"]) == sorted(expected["applied"])
    assert set(evaluation["model_fingerprint"]) == {summary["model_fingerprint"]}
    assert fs.exists(f"{s3}/out/edit_curve.png") and fs.exists(f"{s3}/out/summary.parquet")

    # The edited model comes back from S3, loads with transformers and carries the edits it reports.
    sharded = tmp_path / "sharded-model"
    fs.get(f"{s3}/out/model/", str(sharded), recursive=True)
    manifest = [json.loads(line) for line in (sharded / "edits.jsonl").read_text().splitlines()]
    assert [m["batch"] for m in manifest] == [0, 1, 2] and {m["method"] for m in manifest} == {"memit"}
    assert sorted(c for m in manifest for c in m["case_ids"]) == sorted(expected["applied"])
    assert {m["fingerprint_after"] for m in manifest} == {summary["saved_fingerprint"]}
    layers = summary["layers"]
    edited = {f"model.layers.{layer}.mlp.down_proj.weight" for layer in layers}
    original, after = _weights(demo_model_dir), _weights(sharded)
    assert original.keys() == after.keys()
    for name in original:
        assert torch.equal(original[name], after[name]) == (name not in edited), name
    reloaded = load_model(str(sharded))
    by_id = {r.case_id: r for r in load_demo_requests()}
    applied = [by_id[c] for c in evaluation["case_id"]]
    rows = evaluate_requests(reloaded.model, reloaded.tokenizer, applied)
    np.testing.assert_allclose([r["EM"] for r in rows], evaluation["post_EM"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([r["NM"] for r in rows], evaluation["post_NM"], rtol=1e-5, atol=1e-7)

    # The same job in one process (no Ray, no DeepSpeed) makes the same edits.
    local = tmp_path / "local"
    code, _, stderr, single = run_cli("bulk-edit", "--model", "demo", *common, "--actors", "0", "--out", str(local))
    assert code == 0, stderr[-3000:]
    assert single["layers"] == layers and single["applied"] == 9
    in_process = _weights(local / "model")
    for name in edited:
        delta = in_process[name] - original[name]
        difference = (after[name] - in_process[name]).abs().max() / delta.abs().max()
        assert delta.abs().max() > 0 and difference < 1e-3, (name, float(difference))


def _finished_batches(out: Path) -> int:
    return len(list((out / "progress").glob("batch-*.json"))) if (out / "progress").exists() else 0


# Blocks 0-1, where the demo model keeps its facts: there the target optimisation is well conditioned and ZeRO-3
# actors agree with one process to ~1e-6. Where edits do not take (the NLL's gradient is tiny) Adam amplifies the
# float32 reduction-order noise of the shards, and the two differ by as much as the edit itself.
RESUME_ARGS = ("--method", "memit", "--layers", "0-1", "--hparam", "mom2_update_weight=100", "--limit", "8",
               "--batch-size", "2", "--probe", "2", "--no-progress")


@pytest.fixture(scope="module")
def uninterrupted(demo_model_dir, tmp_path_factory) -> Path:
    """The reference: 8 requests in 4 batches, in one process, never interrupted."""
    out = tmp_path_factory.mktemp("whole")
    code, _, stderr, summary = run_cli("bulk-edit", "--model", "demo", *RESUME_ARGS, "--actors", "0", "--out", str(out))
    assert code == 0, stderr[-3000:]
    assert summary["batches"] == 4
    return out


def _start_bulk_edit(out: Path, actors: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/bulk_edit.py", "--model", "demo", *RESUME_ARGS, "--actors",
                             str(actors), "--out", str(out), *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_batches(job: subprocess.Popen, out: Path, count: int) -> None:
    deadline = time.time() + 600
    while _finished_batches(out) < count and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()[1][-3000:]


def test_a_killed_bulk_edit_resumes_to_the_same_weights(uninterrupted, tmp_path):
    args = (*RESUME_ARGS, "--actors", "0")
    killed = tmp_path / "killed"
    job = _start_bulk_edit(killed, 0, "--checkpoint-every", "2")  # resumed below with every batch
    try:  # two records: the first commit (weights after batch 1, then records 0 and 1) is whole
        _wait_for_batches(job, killed, 2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    done = _finished_batches(killed)
    assert 2 <= done < 4 and not (killed / "model").exists()

    code, stdout, stderr, resumed = run_cli("bulk-edit", "--model", "demo", *args, "--out", str(killed))
    assert code == 0, stderr[-3000:]
    assert "resuming after batch" in stdout
    assert resumed["applied"] == 8 and resumed["batches"] == 4
    first, second = _weights(uninterrupted / "model"), _weights(killed / "model")
    assert all(torch.equal(first[name], second[name]) for name in first)
    manifest = [json.loads(line) for line in (killed / "model" / "edits.jsonl").read_text().splitlines()]
    assert [m["batch"] for m in manifest] == [0, 1, 2, 3]
    before = pq.read_table(killed / "eval.parquet").to_pandas()
    np.testing.assert_allclose(before["pre_EM"], pq.read_table(uninterrupted / "eval.parquet").to_pandas()["pre_EM"])

    # Other options in the same OUT are a different run: refused, nothing touched.
    code, _, stderr, refused = run_cli("bulk-edit", "--model", "demo", *args, "--out", str(killed), "--layers", "0-2")
    assert code == 2 and "--overwrite" in refused["error"] and "layers" in refused["error"]


def test_a_lost_actor_is_replaced_and_the_edits_continue(demo_model_dir, uninterrupted, tmp_path):
    job = _start_bulk_edit(tmp_path, actors=2)
    stdout, stderr = kill_an_actor_and_finish(job, "EditWorker", lambda: _finished_batches(tmp_path) >= 1)
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["restarts"] == 1 and summary["applied"] == 8
    assert "lost an actor" in stderr and "resuming after batch" in stdout
    original, reference, after = (_weights(demo_model_dir), _weights(uninterrupted / "model"),
                                  _weights(tmp_path / "model"))
    for name in original:
        delta = (reference[name] - original[name]).abs().max()
        assert (after[name] - reference[name]).abs().max() <= 1e-3 * delta, name


def test_s3_failures_are_one_line_errors_and_write_nothing(s3, demo_model_dir, demo_ranking, tmp_path,
                                                          monkeypatch, capsys):
    from lga_dist.cli import run_command

    base = ("--model", "demo", "--ranking", str(demo_ranking), "--actors", "0", "--no-progress")
    missing = tmp_path / "missing-bucket"
    code = run_command("bulk-edit", [*base, "--requests", "s3://lga-no-such-bucket-7d1c/requests/",
                                     "--out", str(missing)])
    error = capsys.readouterr().err
    assert code == 2 and "lga-no-such-bucket-7d1c" in error and "not found" in error
    assert not any(missing.rglob("*"))

    # An object listed at the start that is gone when its turn comes.
    import s3fs

    from lga_dist.io.requests import validation

    _upload_requests(s3)
    fs = s3fs.S3FileSystem()
    original_reader = validation.read_container

    def reader_that_loses_a_file(path, container=None):
        if path.endswith("part-a.jsonl"):
            fs.rm(f"{s3}/requests/part-b.parquet")
        return original_reader(path, container)

    monkeypatch.setattr(validation, "read_container", reader_that_loses_a_file)
    vanished = tmp_path / "vanished"
    code = run_command("bulk-edit", [*base, "--requests", f"{s3}/requests/", "--out", str(vanished)])
    error = capsys.readouterr().err
    assert code == 2 and "part-b.parquet" in error and "not found" in error
    assert not any(vanished.rglob("*"))
    monkeypatch.setattr(validation, "read_container", original_reader)

    # No credentials at all (and no instance metadata to fall back on).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    anonymous = tmp_path / "no-credentials"
    code = run_command("bulk-edit", [*base, "--requests", f"{s3}/requests/", "--out", str(anonymous)])
    error = capsys.readouterr().err
    assert code == 2 and "no S3 credentials" in error
    assert not any(anonymous.rglob("*"))


def test_a_bulk_edit_that_does_not_take_says_so():
    from lga_dist.workflows.bulk_edit import edits_that_did_not_take

    [warning] = edits_that_did_not_take({"ES": 0.0}, {"ES": 0.0}, [7, 8, 9])
    assert "did not take at layers [7, 8, 9]" in warning and "0.00 -> 0.00" in warning
    assert edits_that_did_not_take({"ES": 0.1}, {"ES": 0.12}, [1])  # within noise of the unedited model
    assert edits_that_did_not_take({"ES": 0.0}, {"ES": 0.9}, [0, 1]) == []


def test_memit_through_gemma3s_post_mlp_norm_is_the_same_on_zero3_actors(tmp_path):
    """The norm gain MEMIT needs on Gemma 3 is gathered from the ZeRO-3 shards: 2 actors = one process."""
    from helpers import save_tiny_model

    # 4 layers (sliding, full, sliding, full attention): the full-attention layer after the window lets the answer
    # see the edited subject. With 3, the only later layer has a 4-token sliding window that cannot reach the
    # subject, the target's gradient is the KL term's rounding noise at its minimum, and the comparison compares noise.
    model = save_tiny_model(tmp_path / "gemma3", "gemma3", n_layers=4)
    common = ("--model", str(model), "--layers", "0-1", "--method", "memit", "--limit", "4", "--batch-size", "4",
              "--hparam", "v_num_grad_steps=3", "--hparam", "mom2_update_weight=10", "--cov-tokens", "2000",
              "--probe", "2", "--no-progress")
    runs = {}
    for actors in ("2", "0"):
        code, _, stderr, summary = run_cli("bulk-edit", *common, "--actors", actors, "--out", str(tmp_path / actors),
                                           env={"LGA_DIST_CACHE": str(tmp_path / f"cache{actors}")})
        assert code == 0, stderr[-3000:]
        runs[actors] = _weights(tmp_path / actors / "model")
    original = _weights(model)
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        delta = runs["0"][name] - original[name]
        difference = (runs["2"][name] - runs["0"][name]).abs().max() / delta.abs().max()
        assert delta.abs().max() > 0 and difference < 1e-3, (name, float(difference))

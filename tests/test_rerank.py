"""Scheduled re-ranking: skip when unchanged, re-rank on new weights, drift exit 3, one writer at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import REPO, run_cli, save_tiny_model

from lga_dist.io.registry import RegistryLock, RegistryLocked

pytestmark = pytest.mark.slow

# Rank in-process (--actors 0) on 8 proxy requests: the registry logic is what is under test here;
# the actor group has its own tests.
DEFAULTS = {"actors": 0, "proxy_size": 8, "batch_size": 8}


def _models_yaml(path: Path, models: dict[str, Path], **defaults) -> Path:
    path.write_text(yaml.safe_dump({"defaults": {**DEFAULTS, **defaults},
                                    "models": [{"name": n, "model": str(p)} for n, p in models.items()]}))
    return path


def _rerank(models: Path, registry: str, *extra: str):
    return run_cli("rerank", "--models", str(models), "--registry", registry, "--no-progress", *extra)


def _history(registry: Path) -> list[dict]:
    return pq.read_table(registry / "history.parquet").to_pylist()


def _perturb(model_dir: Path, scale: float = 1.5) -> None:
    from safetensors.torch import load_file, save_file

    path = next(model_dir.glob("*.safetensors"))
    tensors = load_file(path)
    name = next(n for n in tensors if "mlp.down_proj" in n)
    tensors[name] = tensors[name] * scale
    save_file(tensors, path, metadata={"format": "pt"})


def test_unchanged_model_is_skipped_and_new_weights_are_reranked(tmp_path):
    model = save_tiny_model(tmp_path / "m", "llama", seed=0, n_layers=6)
    models = _models_yaml(tmp_path / "models.yaml", {"tiny": model})
    registry = tmp_path / "registry"
    code, stdout, stderr, first = _rerank(models, str(registry))
    assert code == 0, stderr
    assert first["models"][0]["status"] == "ranked" and first["drift"] is False
    ranking = Path(first["models"][0]["ranking"])
    written = ranking.stat().st_mtime_ns

    code, stdout, _, again = _rerank(models, str(registry))
    assert code == 0 and again["models"][0]["status"] == "skipped" and "skipped" in stdout
    assert ranking.stat().st_mtime_ns == written and len(_history(registry)) == 1
    assert len([p for p in (registry / "rankings" / "tiny").iterdir() if p.is_dir()]) == 1

    _perturb(model)
    code, _, stderr, changed = _rerank(models, str(registry), "--min-correlation", "-1")
    assert code in (0, 3), stderr
    history = _history(registry)
    assert len(history) == 2 and history[0]["model_fingerprint"] != history[1]["model_fingerprint"]
    assert history[1]["previous_golden_layer"] == history[0]["golden_layer"]
    assert -1.0 <= history[1]["rank_correlation"] <= 1.0
    assert changed["models"][0]["status"] == ("drift" if code == 3 else "ranked")
    assert not (registry / "lock.json").exists()


def test_drift_exits_3_with_a_report(tmp_path):
    """A different model under the same name: the golden layer moves to a layer the first ranking's resamples
    (almost) never picked (seeds chosen so it does), so it is drift, not an unsettled pick."""
    registry = tmp_path / "registry"
    first = save_tiny_model(tmp_path / "a", "llama", seed=0, n_layers=6)
    models = _models_yaml(tmp_path / "models.yaml", {"tiny": first})
    code, _, stderr, summary = _rerank(models, str(registry))
    assert code == 0, stderr
    golden = summary["models"][0]["golden_layer"]
    shares = {r["layer"]: r["pick_share"] for r in pq.read_table(summary["models"][0]["ranking"]).to_pylist()}
    for seed in range(1, 8):
        candidate = save_tiny_model(tmp_path / f"s{seed}", "llama", seed=seed, n_layers=6)
        code, _, _, probe = run_cli("rank-layers", "--model", str(candidate), "--out", str(tmp_path / f"p{seed}"),
                                    "--actors", "0", "--proxy-size", "8", "--batch-size", "8", "--no-progress")
        assert code == 0
        if probe["golden_layer"] != golden and shares[probe["golden_layer"]] < 0.2:
            break
    else:
        pytest.fail("no seed moved the golden layer")
    _models_yaml(models, {"tiny": candidate})
    code, stdout, stderr, drifted = _rerank(models, str(registry))
    assert code == 3, stderr
    entry = drifted["models"][0]
    assert entry["status"] == "drift" and drifted["drift"] is True
    assert entry["previous_golden_layer"] == golden and entry["golden_layer"] == probe["golden_layer"]
    assert "DRIFT tiny" in stdout
    reports = sorted((registry / "reports").iterdir())
    assert [p.suffix for p in reports] == [".md", ".png"]
    assert f"golden layer {golden}" in reports[0].read_text()
    assert reports[1].read_bytes()[:4] == b"\x89PNG"
    assert _history(registry)[-1]["drift"] is True


def test_two_concurrent_runs_one_waits_then_skips(tmp_path):
    model = save_tiny_model(tmp_path / "m", "llama", seed=0, n_layers=6)
    models = _models_yaml(tmp_path / "models.yaml", {"tiny": model})
    registry = tmp_path / "registry"
    command = [sys.executable, "jobs/rerank.py", "--models", str(models), "--registry", str(registry),
               "--no-progress", "--lock-wait", "300"]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    statuses = sorted(json.loads(out.strip().splitlines()[-1])["models"][0]["status"] for out, _ in outputs)
    assert statuses == ["ranked", "skipped"]  # the second waited for the lock, then found the ranking
    assert len(_history(registry)) == 1


def test_a_held_lock_fails_cleanly_and_an_expired_one_is_broken(tmp_path):
    model = save_tiny_model(tmp_path / "m", "llama", seed=0, n_layers=6)
    models = _models_yaml(tmp_path / "models.yaml", {"tiny": model})
    registry = tmp_path / "registry"
    with RegistryLock(str(registry)) as held:
        code, _, _, summary = _rerank(models, str(registry), "--lock-wait", "1")
        assert code == 2 and held.owner in summary["error"] and "--lock-wait" in summary["error"]
        with pytest.raises(RegistryLocked):
            RegistryLock(str(registry)).acquire()
    assert not (registry / "lock.json").exists()
    stale = RegistryLock(str(registry), ttl_s=0.0)
    stale.acquire()  # its owner "dies" without releasing; the lock expires at once
    code, _, stderr, summary = _rerank(models, str(registry))
    assert code == 0 and summary["models"][0]["status"] == "ranked", stderr
    assert "breaking the expired registry lock" in stderr


def test_a_crash_mid_run_leaves_the_registry_readable_and_unchanged(tmp_path):
    first = save_tiny_model(tmp_path / "a", "llama", seed=0, n_layers=6)
    models = _models_yaml(tmp_path / "models.yaml", {"tiny": first})
    registry = tmp_path / "registry"
    assert _rerank(models, str(registry))[0] == 0
    # A bad entry after a good one: the run stops with exit 2, the registry keeps what was finished.
    _perturb(first)
    broken = _models_yaml(tmp_path / "broken.yaml", {"tiny": first, "gone": tmp_path / "missing"})
    code, _, _, summary = _rerank(broken, str(registry))
    assert code == 2 and "missing" in summary["error"]
    assert len(_history(registry)) == 2 and not (registry / "lock.json").exists()
    # Killed while ranking: history untouched and readable; the lock expires (--lock-ttl) for the next run.
    _perturb(first)
    before = (registry / "history.parquet").read_bytes()
    job = subprocess.Popen([sys.executable, "jobs/rerank.py", "--models", str(models), "--registry", str(registry),
                            "--no-progress", "--lock-ttl", "2"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, start_new_session=True)
    # Kill on the job's own signal that ranking has begun (it holds the lock by then), not on a timing guess.
    started = next((line for line in job.stdout if b"ranking started" in line), None)
    assert started is not None, job.communicate()[1][-3000:]
    # The lock it leaves is complete, so the lock's expiry can break it.
    assert json.loads((registry / "lock.json").read_text())["expires_at"] > 0
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert (registry / "history.parquet").read_bytes() == before
    assert len(_history(registry)) == 2
    time.sleep(2.5)
    code, _, stderr, summary = _rerank(models, str(registry))
    assert code in (0, 3), stderr
    assert len(_history(registry)) == 3


def test_registry_on_s3(tmp_path, s3):
    import s3fs

    model = save_tiny_model(tmp_path / "m", "llama", seed=0, n_layers=6)
    models = _models_yaml(tmp_path / "models.yaml", {"tiny": model})
    fs = s3fs.S3FileSystem()
    fs.put_file(str(models), f"{s3}/config/models.yaml")
    code, _, stderr, first = run_cli("rerank", "--models", f"{s3}/config/models.yaml", "--registry",
                                     f"{s3}/registry", "--no-progress")
    assert code == 0, stderr
    assert first["models"][0]["status"] == "ranked"
    assert fs.exists(f"{s3}/registry/history.parquet") and not fs.exists(f"{s3}/registry/lock.json")
    code, _, _, again = run_cli("rerank", "--models", f"{s3}/config/models.yaml", "--registry", f"{s3}/registry",
                                "--no-progress")
    assert code == 0 and again["models"][0]["status"] == "skipped"
    with RegistryLock(f"{s3}/registry"):  # exclusive create is a conditional put on S3
        with pytest.raises(RegistryLocked):
            RegistryLock(f"{s3}/registry").acquire()


def test_models_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "x", "model": "m", "kapa": 2}]}))
    code, _, _, summary = _rerank(bad, str(tmp_path / "r"))
    assert code == 2 and "unknown option 'kapa'" in summary["error"]
    bad.write_text(yaml.safe_dump({"models": [{"model": "m"}]}))
    code, _, _, summary = _rerank(bad, str(tmp_path / "r"))
    assert code == 2 and "needs a name" in summary["error"]

"""The ranking on real Ray actors holding real ZeRO-3 shards (gloo on 127.0.0.1): same numbers, lost actors,
restarts."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from helpers import REPO, kill_an_actor_and_finish, run_cli

pytestmark = pytest.mark.slow

# 200 proxy requests in batches of 8: 25 batches, enough rounds to interrupt a run in the middle.
COMMON = ("--proxy-size", "200", "--batch-size", "8", "--save-matrix")


def _ranking(out: Path) -> tuple[list[dict], np.ndarray]:
    rows = sorted(pq.read_table(out / "ranking.parquet").to_pylist(), key=lambda r: r["layer"])
    matrix = pq.read_table(out / "request_scores.parquet").to_pandas().sort_values(["case_id", "layer"])
    return rows, matrix["score"].to_numpy()


def _assert_same_ranking(a: Path, b: Path, rtol: float = 1e-9, matrix_rtol: float = 1e-9) -> None:
    rows_a, matrix_a = _ranking(a)
    rows_b, matrix_b = _ranking(b)
    np.testing.assert_allclose([r["score"] for r in rows_b], [r["score"] for r in rows_a], rtol=rtol, atol=0)
    assert [r["rank"] for r in rows_b] == [r["rank"] for r in rows_a]
    assert [r["excluded"] for r in rows_b] == [r["excluded"] for r in rows_a]
    scale = np.abs(matrix_a).max()
    np.testing.assert_allclose(matrix_b, matrix_a, rtol=matrix_rtol, atol=matrix_rtol * 1e-3 * scale)


def _rank(out: Path, actors: int, *extra: str) -> dict:
    code, stdout, stderr, summary = run_cli("rank-layers", "--model", "demo", "--out", str(out),
                                            "--actors", str(actors), *COMMON, *extra)
    assert code == 0, stderr
    assert summary["actors"] == actors and summary["n_requests"] == 200
    # one peak per actor (a process with torch loaded holds well over 0.1 GB)
    peaks = summary["peak_rss_gb"]
    assert len(peaks) == max(actors, 1) and all(0.1 < p < 1000 for p in peaks), peaks
    # stdout is the job's own lines and the summary: what the actors and DeepSpeed print goes to stderr
    assert "Worker pid=" not in stdout and "DeepSpeed" not in stdout and "[WARNING]" not in stdout, stdout
    return {**summary, "stdout": stdout}


@pytest.fixture(scope="module")
def core_ranking(demo_model_dir, tmp_path_factory) -> Path:
    """The single-process core's ranking (no Ray, no DeepSpeed)."""
    out = tmp_path_factory.mktemp("core")
    _rank(out, 0)
    return out


@pytest.fixture(scope="module")
def one_actor_ranking(demo_model_dir, tmp_path_factory) -> Path:
    """One ZeRO-3 actor: the reference every multi-actor and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("one-actor")
    summary = _rank(out, 1)
    assert summary["restarts"] == 0 and "1 ZeRO-3 actor(s)" in summary["stdout"]
    return out


def test_one_actor_equals_the_single_process_core(core_ranking, one_actor_ranking):
    """Same batches, same weights, bit-identical forward; DeepSpeed's backward hooks reorder float32
    gradient sums, which moves layer scores by ~1e-7 and single requests' scores (with cancellation) by ~1e-5."""
    _assert_same_ranking(core_ranking, one_actor_ranking, rtol=1e-6, matrix_rtol=1e-4)


def test_two_actors_equal_one_actor(one_actor_ranking, tmp_path):
    summary = _rank(tmp_path, 2)
    assert summary["restarts"] == 0
    assert "actor 0: 104, actor 1: 96" in summary["stdout"]  # both worked; the log says how much
    _assert_same_ranking(one_actor_ranking, tmp_path)


def test_every_actor_holds_one_nth_of_every_weight(demo_model_dir):
    import ray
    import torch

    from lga_dist.distributed.driver import worker_env
    from lga_dist.distributed.group import ActorGroup, ActorResources
    from lga_dist.distributed.worker import ScoringWorker, WorkerSpec
    from lga_dist.distributed.zero import load_deepspeed_config
    from lga_dist.lga.partial_scores import BatchPlan
    from lga_dist.models import load_model

    full = {name: p.numel() for name, p in load_model(str(demo_model_dir)).model.named_parameters()}
    spec = WorkerSpec(model=str(demo_model_dir), dtype="float32", param_set="out",
                      deepspeed_config=load_deepspeed_config(None, torch.float32), plan=BatchPlan(1, 1),
                      use_gpu=False)
    # address="local": a Ray of this test's own, never a cluster some `ray start` left on the machine.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2)
    try:
        with ActorGroup(ScoringWorker, 2, ActorResources(cpus=1), worker_env(use_gpu=False)) as group:
            rendezvous = group.call_one(ScoringWorker.rendezvous_address)
            assert rendezvous[0] == "127.0.0.1"
            group.call(ScoringWorker.setup, [(rendezvous, spec, [])] * 2)
            sizes = group.call(ScoringWorker.partition_sizes)
    finally:
        ray.shutdown()
    for rank_sizes in sizes:
        assert set(rank_sizes) == set(full)
        for name, (held, total) in rank_sizes.items():
            assert total == full[name]
            assert held == math.ceil(total / 2), name  # 1/N of every weight, norms and embeddings included
    assert sum(held for held, _ in sizes[0].values()) < 0.51 * sum(full.values())


def _worker_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("ScoringWorker" in part for part in (p.info["cmdline"] or []))]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _start_job(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/rank_layers.py", "--model", "demo", "--out", str(out),
                             "--actors", "2", "--checkpoint-every", "1", *COMMON, *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _checkpointed_batches(out: Path) -> int:
    path = out / "ranking.checkpoint.npz"
    if not path.exists():
        return 0
    try:
        return len(np.load(path)["batch_ids"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_actor_is_replaced_and_the_run_resumes(one_actor_ranking, tmp_path):
    job = _start_job(tmp_path)
    stdout, stderr = kill_an_actor_and_finish(job, "ScoringWorker", lambda: _checkpointed_batches(tmp_path) >= 2)
    assert job.returncode == 0, stderr[-3000:]
    import json

    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["restarts"] == 1
    assert "lost an actor" in stderr and "resuming from the checkpoint" in stderr
    assert not (tmp_path / "ranking.checkpoint.npz").exists()
    _assert_same_ranking(one_actor_ranking, tmp_path)


def test_restarted_job_resumes_from_its_checkpoint_and_overwrite_starts_over(one_actor_ranking, tmp_path):
    job = _start_job(tmp_path)
    try:
        _wait_for(lambda: _checkpointed_batches(tmp_path) >= 2 or job.poll() is not None, 600, "a checkpoint")
        assert job.poll() is None, job.communicate()[1][-3000:]
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver, its private Ray and the actors
        job.wait()
    done = _checkpointed_batches(tmp_path)
    assert 2 <= done < 25 and not (tmp_path / "ranking.parquet").exists()
    _wait_for(lambda: not _worker_pids(), 60, "the killed job's actors to exit")

    code, _, stderr, summary = run_cli("rank-layers", "--model", "demo", "--out", str(tmp_path), "--actors", "2",
                                       *COMMON)
    assert code == 0, stderr
    assert summary["resumed_batches"] >= done and "resuming from checkpoint" in stderr
    _assert_same_ranking(one_actor_ranking, tmp_path)

    # A checkpoint left by an interrupted --overwrite-free run is ignored when starting over.
    (tmp_path / "ranking.parquet").unlink()
    from lga_dist.lga.partial_scores import SCORES, BatchResult, PartialScores

    stale = PartialScores({"model_fingerprint": "sha256:other"}, n_layers=10)
    stale.add(BatchResult(0, {score: np.full(10, 1e9) for score in SCORES}))
    stale.save(str(tmp_path / "ranking.checkpoint.npz"))
    code, _, stderr, summary = run_cli("rank-layers", "--model", "demo", "--out", str(tmp_path), "--actors", "1",
                                       "--overwrite", *COMMON)
    assert code == 0, stderr
    assert summary["resumed_batches"] == 0
    _assert_same_ranking(one_actor_ranking, tmp_path)


def test_ranking_written_to_s3_from_the_actor_group(s3, demo_model_dir, tmp_path):
    import s3fs

    code, _, stderr, summary = run_cli("rank-layers", "--model", "demo", "--out", f"{s3}/rankings/demo",
                                       "--actors", "1", "--proxy-size", "24", "--batch-size", "8", "--no-progress")
    assert code == 0, stderr
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{s3}/rankings/demo/ranking.parquet")
    assert not fs.exists(f"{s3}/rankings/demo/ranking.checkpoint.npz")
    with fs.open(f"{s3}/rankings/demo/ranking.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert {r["model_fingerprint"] for r in rows} == {summary["model_fingerprint"]}
    assert [r["layer"] for r in rows if r["is_golden"]] == [summary["golden_layer"]]


def test_ray_job_submit_on_a_local_head(demo_model_dir, tmp_path):
    """`ray start --head` on 127.0.0.1, `ray job submit` the job, read its Parquet, stop the head."""
    from helpers import free_port

    port, dashboard = free_port(), free_port()
    # Token auth stated explicitly: Ray turns it on for `ray start` when ~/.ray/auth_token exists but
    # `ray job submit` only sends the token when RAY_AUTH_MODE says so (an earlier in-process
    # ray.init() would otherwise decide it through the environment it leaves behind).
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS")
    # --block keeps `ray start` in the foreground as the parent of the head's processes, so the test stops
    # exactly the head it started (its process tree), never other Ray instances on the machine.
    log = open(tmp_path / "ray-start.log", "w")
    # Every port of its own: another Ray on the machine (a user's job, a study) holds the fixed defaults,
    # e.g. the dashboard agent's 52365, and a head that cannot bind them never accepts a job.
    own_ports = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                  "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")
                 for arg in (flag, str(free_port()))]
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                             "--disable-usage-stats", *own_ports], stdout=log, stderr=log, env=env,
                            start_new_session=True)
    try:
        wait_for_port(dashboard, head, tmp_path / "ray-start.log")
        out = tmp_path / "out"
        for attempt in range(10):  # the head's job agent starts after its dashboard port opens
            submit = subprocess.run(
                ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
                 "--runtime-env-json", '{"excludes": [".git", "out", ".devcache"]}', "--",
                 "python", "jobs/rank_layers.py", "--model", "demo", "--actors", "2", "--proxy-size", "32", "--out",
                 str(out)],
                cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
            if "No available agent to submit job" not in submit.stderr + submit.stdout:
                break
            time.sleep(3)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert "succeeded" in submit.stdout
        assert "scored 32/32 requests (actor 0: 16, actor 1: 16)" in submit.stdout
        rows = pq.read_table(out / "ranking.parquet").to_pylist()
        assert len(rows) == 10 and sum(r["is_golden"] for r in rows) == 1
        # With that cluster still up, a job run outside it starts its own private Ray instead of joining it.
        code, _, stderr, summary = run_cli("rank-layers", "--model", "demo", "--actors", "1", "--proxy-size", "8",
                                           "--no-progress", "--out", str(tmp_path / "private"), env={"RAY_ADDRESS": ""})
        assert code == 0, stderr[-3000:]
        assert "Started a local Ray instance" in stderr and "existing Ray cluster" not in stderr
    finally:
        stop_process_tree(head)
        log.close()
        forget_stopped_head(f"127.0.0.1:{port}")


def wait_for_port(port: int, process: subprocess.Popen, log_path, timeout: float = 180) -> None:
    import socket

    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, f"nothing listening on 127.0.0.1:{port} after {timeout}s"
            time.sleep(0.5)


def forget_stopped_head(address: str) -> None:
    """Remove Ray's note of the current cluster if it is the head this test stopped by PID (what `ray stop`
    would do), so no later ray.init() on the machine tries to join a cluster that is gone."""
    import tempfile

    note = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(FileNotFoundError):
        if note.read_text().strip() == address:
            note.unlink()


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM a process and everything it started, then SIGKILL what is left: this process tree only."""
    try:
        root = psutil.Process(process.pid)
        tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(timeout=30)


def test_a_model_the_actors_cannot_load_is_a_one_line_error(tmp_path):
    from helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", "llama", n_layers=4)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")  # pickle-only, as far as names go
    code, _, stderr, summary = run_cli("rank-layers", "--model", "demo", "--model", str(model),
                                       "--out", str(tmp_path / "out"), "--actors", "1", "--proxy-size", "8",
                                       "--no-progress")
    assert code == 2, stderr[-2000:]
    assert summary["error"].startswith(f"{model}: only pickle weights")
    assert "Traceback" not in summary["error"]


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.mark.slow
def test_every_private_ray_listens_on_loopback_only():
    """The jobs' one way to start Ray (ray_session) binds every service to 127.0.0.1: the GCS, the raylet,
    the agents and the workers, nothing on an external address."""
    from lga_dist.distributed.driver import ray_session

    listening = []
    with ray_session(None, 2):
        for process in psutil.Process().children(recursive=True):
            try:
                listening += [(process.name(), c.laddr.ip) for c in process.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
    assert any(name == "gcs_server" for name, _ in listening), listening
    assert [entry for entry in listening if entry[1] not in LOOPBACK] == []


def test_no_job_starts_ray_but_through_ray_session():
    starts = [str(path.relative_to(REPO)) for path in (REPO / "lga_dist").rglob("*.py")
              if "ray.init(" in path.read_text() and path.name != "driver.py"]
    assert starts == []

"""Shared fixtures: the benchmark data in ../shared/data, the demo model, a local S3 server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers import REPO, free_port

# Every Ray a test starts (ray.init, `ray start`, the jobs' private instances) listens on
# 127.0.0.1 only; without this Ray binds to the host's external address. Set before ray is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests never touch the user's cache: each run builds the demo model and converts packaged models
# into a temp folder of its own (subprocesses and Ray actors inherit it). LGA_DIST_TEST_CACHE names a
# folder to reuse across runs instead, for quick local iterations.
_RUN_CACHE = None if os.environ.get("LGA_DIST_TEST_CACHE") else tempfile.mkdtemp(prefix="lga-dist-test-cache-")
os.environ["LGA_DIST_CACHE"] = os.environ.get("LGA_DIST_TEST_CACHE") or _RUN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _RUN_CACHE:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $LGA_DIST_SHARED_DATA); CI sets LGA_DIST_REQUIRE_SHARED_DATA=1 so absence fails."""
    path = Path(os.environ.get("LGA_DIST_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "counterfact" / "counterfact-train.json").exists():
        message = f"benchmark data not found at {path} (set LGA_DIST_SHARED_DATA)"
        if os.environ.get("LGA_DIST_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The full embedded demo model, built once into the cache (reused across runs)."""
    from lga_dist.models.demo import build_demo_model

    report = build_demo_model(show_progress=False)
    return Path(report.path)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, the same server s3fs's own tests use; stopped at the end."""
    if shutil.which("moto_server") is None:
        pytest.fail("moto_server not found: install the test extra (pip install -e '.[test]')")
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "w")
    process = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)
    yield endpoint
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Point s3fs at the local server through the standard AWS variables; yields a fresh bucket URL."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"lga-test-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


SLOW_FIXTURES = ("demo_model_dir", "s3_server")  # a 5-minute model build, a server process


def pytest_collection_modifyitems(config, items):
    """Whatever needs the demo model's build or the S3 server is in the slow tier, marked or not."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)

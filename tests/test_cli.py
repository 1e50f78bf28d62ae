"""The console script: --help everywhere, JSON summary as the last line, exit statuses, YAML configs."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli
from test_requests import BROKEN, VALID, interleave, write_jsonl

from lga_dist.cli import COMMANDS
from lga_dist.commands.check_requests import Config as CheckConfig
from lga_dist.config import build_config, make_parser


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_job_has_help(name):
    code, stdout, _, _ = run_cli(name, "--help")
    assert code == 0 and "--config" in stdout and "usage:" in stdout


def test_unknown_job():
    code, stdout, stderr, _ = run_cli("frobnicate")
    assert code == 2 and "unknown job" in stderr and "check-requests" in stdout


def test_check_requests_summary_and_strict(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", interleave())
    quarantine = tmp_path / "q.jsonl"
    code, stdout, _, summary = run_cli("check-requests", str(path), "--quarantine", str(quarantine))
    assert code == 0
    assert summary["read"] == len(BROKEN) + len(VALID) and summary["valid"] == len(VALID)
    assert summary["rejected"] == len(BROKEN) and sum(summary["by_reason"].values()) == len(BROKEN)
    assert summary["quarantine"] == str(quarantine) and len(quarantine.read_text().splitlines()) == len(BROKEN)
    assert "subject_not_in_prompt" in stdout
    code, *_ = run_cli("check-requests", str(path), "--quarantine", str(quarantine), "--strict")
    assert code == 1
    clean = write_jsonl(tmp_path / "clean.jsonl", VALID)
    code, _, _, summary = run_cli("check-requests", str(clean), "--quarantine", str(quarantine), "--strict")
    assert code == 0 and summary["rejected"] == 0 and quarantine.read_text() == ""


def test_missing_input_is_one_line_error(tmp_path):
    code, stdout, stderr, summary = run_cli("check-requests", str(tmp_path / "nope.json"))
    assert code == 2 and summary["status"] == "error" and "not found" in summary["error"]
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr


def test_yaml_config_with_flag_override(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("paths: [a.json, b.json]\non-conflict: last\nstrict: true\n")
    parser = make_parser(CheckConfig, "x", "y")
    config = build_config(CheckConfig, parser.parse_args(["--config", str(config_file), "--no-strict"]))
    assert config.paths == ["a.json", "b.json"] and config.on_conflict == "last" and config.strict is False
    config = build_config(CheckConfig, parser.parse_args(["--config", str(config_file), "c.json"]))
    assert config.paths == ["c.json"] and config.strict is True
    (tmp_path / "bad.yaml").write_text("quarantaine: x\n")
    code, _, stderr, summary = run_cli("check-requests", "--config", str(tmp_path / "bad.yaml"), "a.json")
    assert code == 2 and "unknown option 'quarantaine'" in stderr
    assert summary == {"status": "error", "error": summary["error"]} and "quarantaine" in summary["error"]


def test_a_repeated_list_flag_adds_to_the_list():
    """--hparam A=1 --hparam B=2 keeps both (argparse's default would silently keep only the last)."""
    from lga_dist.workflows.bulk_edit import BulkEditJob

    parser = make_parser(BulkEditJob, "x", "y")
    config = build_config(BulkEditJob, parser.parse_args(["--hparam", "v_num_grad_steps=3", "--hparam",
                                                          "mom2_update_weight=10", "kl_factor=0.1"]))
    assert config.editing.hparam == ["v_num_grad_steps=3", "mom2_update_weight=10", "kl_factor=0.1"]


def test_argument_errors_end_with_the_summary_line():
    """Schedulers read the last stdout line: a mistyped flag or a bad value must still leave one."""
    for args, words in ((["rank-layers", "--kappa", "wide"], "invalid float value"),
                        (["rank-layers", "--frobnicate"], "unrecognized arguments"),
                        (["edit", "--method", "rome"], "no default layer")):
        code, _, stderr, summary = run_cli(*args)
        assert code == 2 and summary["status"] == "error" and words in summary["error"], (args, summary)
        assert "usage:" in stderr and stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.s3
@pytest.mark.slow
def test_check_requests_on_s3(tmp_path, s3):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs
    from test_requests import flat

    fs = s3fs.S3FileSystem()
    write_jsonl(tmp_path / "a.jsonl", interleave())
    pq.write_table(pa.Table.from_pylist([flat(i) for i in range(50, 60)]), tmp_path / "b.parquet")
    fs.put(str(tmp_path / "a.jsonl"), f"{s3}/in/a.jsonl")
    fs.put(str(tmp_path / "b.parquet"), f"{s3}/in/sub/b.parquet")
    fs.pipe(f"{s3}/in/notes.txt", b"ignored: not a request file")
    code, _, stderr, summary = run_cli("check-requests", f"{s3}/in/", "--quarantine", f"{s3}/out/q.jsonl")
    assert code == 0, stderr
    assert summary["valid"] == len(VALID) + 10 and summary["rejected"] == len(BROKEN)
    lines = fs.cat(f"{s3}/out/q.jsonl").decode().splitlines()
    assert len(lines) == len(BROKEN) and json.loads(lines[0])["source"] == f"{s3}/in/a.jsonl"
    code, _, _, summary = run_cli("check-requests", "s3://no-such-bucket-lga/x.json")
    assert code == 2 and "not found" in summary["error"]
    no_credentials = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                      "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    code, _, _, summary = run_cli("check-requests", f"{s3}/in/", env=no_credentials)
    assert code == 2, summary


def test_summary_is_strict_json_even_with_nan():
    import io

    from lga_dist.console import emit_summary

    stream = io.StringIO()
    emit_summary({"spearman": float("nan"), "rows": [1.5, float("inf")], "nested": {"x": float("-inf")}}, stream)
    assert json.loads(stream.getvalue(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "spearman": None, "rows": [1.5, None], "nested": {"x": None}}


@pytest.mark.parametrize("job", ["rank-layers", "bulk-edit", "validate-golden", "edit"])
def test_a_run_that_fails_on_its_input_leaves_no_output_folder(job, tmp_path):
    from helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", "llama", n_layers=2)
    out = tmp_path / "out"
    extra = ["--layers", "0"] if job == "edit" else ["--actors", "0"]
    code, _, stderr, summary = run_cli(job, "--model", str(model), "--requests", str(tmp_path / "missing.json"),
                                       "--out", str(out), "--no-progress", *extra)
    assert code == 2 and "missing.json: not found" in summary["error"], stderr
    assert not out.exists()


def test_progress_in_job_logs(capsys, monkeypatch):
    """No terminal (job logs): a line per step for the jobs' outer loops; for inner phases a line only
    once they have run log_every_s, then at most that often, and their end."""
    from lga_dist import console

    outer = console.Progress(3, "editing", "req")
    for i in range(3):
        outer.update(1, f"batch {i + 1}/3")
    assert capsys.readouterr().out.splitlines() == ["batch 1/3", "batch 2/3", "batch 3/3"]
    clock = iter([0.0, 1.0, 2.0, 3.0])  # a quick phase: nothing
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    quick = console.Progress(3, "targets", "step", log_every_s=30.0, bar=False)
    for _ in range(3):
        quick.update(1)
    assert capsys.readouterr().out == ""
    clock = iter([0.0, 31.0, 40.0, 70.0, 75.0])  # a long one: after 30 s, then every 30 s, and its end
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    slow = console.Progress(4, "targets", "step", log_every_s=30.0, bar=False)
    for _ in range(4):
        slow.update(1)
    assert capsys.readouterr().out.splitlines() == ["targets: 1/4 step", "targets: 3/4 step", "targets: 4/4 step"]

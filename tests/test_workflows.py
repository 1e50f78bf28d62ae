"""The workflows as library calls (no CLI), and the composed job configuration they are given."""

from __future__ import annotations

import dataclasses

import pytest

from lga_dist.commands import bulk_edit, edit, rank_layers, validate_golden
from lga_dist.config import ConfigError, build_config, compose, leaves, make_parser, mapping_values, option, section, \
    to_dict
from lga_dist.io.requests import read_requests, requests_hash
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.workflows.options import ClusterOptions, ModelOptions, OutputOptions, ProxyOptions, ScoringOptions
from lga_dist.workflows.rank import RankJob, rank

from helpers import run_cli, save_tiny_model


def test_sections_are_flat_flags_with_each_jobs_defaults():
    parser = make_parser(bulk_edit.Config, "bulk-edit", "")
    config = build_config(bulk_edit.Config, parser.parse_args(["--actors", "2", "--window", "5", "--model", "demo"]))
    assert (config.cluster.actors, config.editing.window, config.model.model) == (2, 5, "demo")
    assert config.output.out == "out/bulk_edit" and config.editing.method == "memit"
    assert build_config(validate_golden.Config, parser.parse_args([])).cluster.actors == 2  # a grid worker per core
    assert edit.Config(layers="1").editing.method == "rome" and edit.Config(layers="1").output.out == "out/edit"
    # one declaration: the options every job shares have the same help text in every job
    helps = {}
    for cls in (rank_layers.Config, bulk_edit.Config, validate_golden.Config, edit.Config):
        for leaf in leaves(cls):
            helps.setdefault(leaf.name, set()).add(leaf.field.metadata["help"])
    assert all(len(texts) == 1 for name, texts in helps.items() if name in ("model", "dtype", "actors", "out")), helps


def test_yaml_keys_flat_or_nested_by_section(tmp_path):
    flat = mapping_values({"actors": 3, "proxy-size": 7, "score": "cosine"}, RankJob, "x")
    nested = mapping_values({"cluster": {"actors": 3}, "proxy": {"proxy_size": 7}, "score": "cosine"}, RankJob, "x")
    assert flat == nested == {"actors": 3, "proxy_size": 7, "score": "cosine"}
    job = compose(RankJob, flat)
    assert job.cluster.actors == 3 and job.proxy.proxy_size == 7 and job.scoring.rule == "cosine-desc"
    assert to_dict(job)["actors"] == 3 and "cluster" not in to_dict(job)  # outputs keep flat keys
    with pytest.raises(ConfigError, match="unknown option 'actorz'"):
        mapping_values({"cluster": {"actorz": 3}}, RankJob, "x")
    with pytest.raises(ConfigError, match="--actors"):
        compose(RankJob, {"actors": -1})  # a section's own check runs


def test_an_option_declared_twice_is_refused():
    @dataclasses.dataclass
    class Clash:
        actors: int = option(1, "again")
        cluster: ClusterOptions = section(ClusterOptions, "cluster")

    with pytest.raises(TypeError, match="actors"):
        leaves(Clash)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", n_layers=4)


def test_rank_from_python_equals_the_cli(tiny_llama, tmp_path):
    job = RankJob(model=ModelOptions(model=str(tiny_llama), device="cpu"), proxy=ProxyOptions(proxy_size=6),
                  scoring=ScoringOptions(batch_size=4), cluster=ClusterOptions(actors=0),
                  output=OutputOptions(out=str(tmp_path / "py"), progress=False))
    result = rank(job)
    assert result.table.num_rows == 4 and not result.reused and result.path.endswith("ranking.parquet")
    code, _, stderr, summary = run_cli("rank-layers", "--model", str(tiny_llama), "--proxy-size", "6", "--batch-size",
                                       "4", "--actors", "0", "--device", "cpu", "--out", str(tmp_path / "cli"),
                                       "--no-progress")
    assert code == 0, stderr
    python = result.summary()
    assert set(python) == set(summary)
    assert python["ranking"] == summary["ranking"] and python["model_fingerprint"] == summary["model_fingerprint"]
    again = rank(job)
    assert again.reused and again.table.equals(result.table)
    assert again.layer_scores() == result.layer_scores()


def test_rank_on_the_callers_own_proxy(tiny_llama, tmp_path):
    chosen = read_requests([str(demo_requests_path())]).requests[600:605]
    job = RankJob(model=ModelOptions(model=str(tiny_llama), device="cpu"), cluster=ClusterOptions(actors=0),
                  output=OutputOptions(out=str(tmp_path), progress=False))
    result = rank(job, proxy=chosen)
    row = result.table.to_pylist()[0]
    assert row["n_requests"] == 5 and row["proxy_hash"] == requests_hash(chosen)

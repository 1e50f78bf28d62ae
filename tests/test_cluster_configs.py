"""Cluster configs and the memory plan: what users deploy must parse, validate and agree with the code."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli

LLAMA_70B = REPO / "tests" / "fixtures" / "llama-2-70b"


def test_ray_cluster_yaml_is_valid_against_rays_own_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu = config["available_node_types"]["gpu_worker"]["resources"]
    assert gpu["GPU"] >= 1 and any("pip install" in c for c in config["setup_commands"])
    broken = {**config, "provider": {"region": "us-east-1"}}  # no provider type
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_default_deepspeed_config_file_is_the_built_in_default():
    import torch

    from lga_dist.distributed.zero import DEFAULT_ZERO3, default_config_path, load_deepspeed_config

    assert json.loads(default_config_path().read_text()) == DEFAULT_ZERO3
    offload = load_deepspeed_config(str(REPO / "cluster" / "deepspeed" / "zero3_offload_70b.json"), torch.bfloat16)
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["bf16"] == {"enabled": True} and offload["fp16"] == {"enabled": False}


def test_deepspeed_config_errors_are_clear(tmp_path):
    import torch

    from lga_dist.config import ConfigError
    from lga_dist.distributed.zero import load_deepspeed_config

    stage2 = tmp_path / "stage2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="stage must be 3"):
        load_deepspeed_config(str(stage2), torch.float32)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON DeepSpeed config"):
        load_deepspeed_config(str(garbage), torch.float32)
    with pytest.raises(ConfigError, match="float64"):
        load_deepspeed_config(None, torch.float64)


def _entrypoint_flags(command: str) -> list[str]:
    return [token.split("=")[0] for token in shlex.split(command) if token.startswith("--")]


def test_kuberay_manifests_parse_and_their_job_flags_exist():
    from lga_dist.commands.rank_layers import Config
    from lga_dist.config import make_parser

    parser = make_parser(Config, "rank_layers", "")
    known = {option for action in parser._actions for option in action.option_strings}
    cluster = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob-rank-layers.yaml").read_text())
    assert job["kind"] == "RayJob" and "jobs/rank_layers.py" in job["spec"]["entrypoint"]
    flags = _entrypoint_flags(job["spec"]["entrypoint"])
    assert flags and set(flags) <= known, set(flags) - known
    tokens = shlex.split(job["spec"]["entrypoint"])
    assert (REPO / tokens[tokens.index("--deepspeed-config") + 1]).exists()
    actors = int(tokens[tokens.index("--actors") + 1])
    gpu_group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) * gpu_group["replicas"] >= actors  # one GPU per actor
    assert (REPO / "cluster" / "Dockerfile").read_text().count("pip install") == 1


def test_plan_for_llama2_70b_on_8_actors():
    code, stdout, stderr, plan = run_cli("rank-layers", "--plan", "--actors", "8", "--model", str(LLAMA_70B),
                                         "--dtype", "float16")
    assert code == 0, stderr
    assert plan["n_params"] == 68_976_648_192  # LLaMA-2-70B
    assert plan["actors"] == 8
    # fp16 shard: 2 bytes x 69.0e9 / 8 = 17.24 GB (+ a few unpartitioned small tensors: none above threshold 0)
    assert plan["param_bytes_per_actor"] == pytest.approx(2 * 68_976_648_192 / 8, rel=1e-4)
    assert 0 < plan["gathered_bytes_per_actor"] < 4e9
    assert 1e9 < plan["activation_bytes_per_actor"] < 80e9
    assert plan["fits"] is True and plan["params_offloaded"] is False
    assert "17.24 GB on accelerator" in stdout


def test_plan_offload_and_too_few_actors():
    offload_config = str(REPO / "cluster" / "deepspeed" / "zero3_offload_70b.json")
    code, stdout, _, offloaded = run_cli("rank-layers", "--plan", "--actors", "8", "--model", str(LLAMA_70B),
                                         "--dtype", "bfloat16", "--deepspeed-config", offload_config)
    assert code == 0 and offloaded["params_offloaded"] is True
    assert offloaded["device_bytes_per_actor"] < offloaded["param_bytes_per_actor"] + \
        offloaded["activation_bytes_per_actor"]
    assert "host (offloaded)" in stdout
    code, stdout, _, single = run_cli("rank-layers", "--plan", "--actors", "1", "--model", str(LLAMA_70B),
                                      "--dtype", "float16")
    assert code == 0 and single["fits"] is False and single["param_bytes_per_actor"] > 137e9
    assert "NO:" in stdout


def test_plan_reads_nothing_but_config_json(tmp_path):
    (tmp_path / "config.json").write_text((LLAMA_70B / "config.json").read_text())
    code, _, stderr, plan = run_cli("rank-layers", "--plan", "--actors", "4", "--model", str(tmp_path))
    assert code == 0, stderr
    # no --dtype: the checkpoint's own float16, as the GPUs would hold it (not float32's twice the size)
    assert plan["dtype"] == "float16"
    assert plan["param_bytes_per_actor"] == pytest.approx(2 * 68_976_648_192 / 4, rel=1e-4)
    code, _, stderr, plan32 = run_cli("rank-layers", "--plan", "--actors", "4", "--model", str(tmp_path),
                                      "--dtype", "float32")
    assert code == 0 and plan32["param_bytes_per_actor"] == pytest.approx(2 * plan["param_bytes_per_actor"])
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_rerank_cronjob_submits_a_rayjob_with_valid_flags():
    from lga_dist.commands.rerank import Config
    from lga_dist.config import make_parser

    documents = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / "rerank-cronjob.yaml").read_text()))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"]
    cron = documents[-1]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and len(cron["spec"]["schedule"].split()) == 5
    rayjob = yaml.safe_load(documents[3]["data"]["rayjob.yaml"])
    assert rayjob["kind"] == "RayJob" and "jobs/rerank.py" in rayjob["spec"]["entrypoint"]
    parser = make_parser(Config, "rerank", "")
    known = {option for action in parser._actions for option in action.option_strings}
    flags = _entrypoint_flags(rayjob["spec"]["entrypoint"])
    assert {"--models", "--registry"} <= set(flags) <= known
    assert "rayjobs" in documents[1]["rules"][0]["resources"]


def test_an_actor_killed_for_memory_is_a_clear_error_not_a_restart():
    from ray.exceptions import OutOfMemoryError, RayActorError

    from lga_dist.distributed.driver import next_restart
    from lga_dist.distributed.group import ClusterError

    with pytest.raises(ClusterError, match="memory monitor killed an actor.*--cpus-per-actor.*batches are kept"):
        next_restart(OutOfMemoryError("Task was killed due to the node running low on memory."), 0, 3,
                     "batches are kept")
    assert next_restart(RayActorError(), 0, 3, "kept")[0] == 1  # a lost actor is still replaced
    with pytest.raises(ClusterError, match="giving up"):
        next_restart(RayActorError(), 3, 3, "kept")

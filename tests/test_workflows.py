"""The workflows as library calls (no CLI), and the composed job configuration they are given."""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import run_cli, save_tiny_model

from lga_dist.commands import bulk_edit as bulk_edit_command
from lga_dist.commands import edit as edit_command
from lga_dist.commands import rank_layers
from lga_dist.commands import validate_golden as validate_command
from lga_dist.config import (
    ConfigError,
    build_config,
    compose,
    leaves,
    make_parser,
    mapping_values,
    option,
    section,
    to_dict,
)
from lga_dist.io.requests import read_requests, requests_hash
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.workflows.bulk_edit import BulkEditJob, bulk_edit
from lga_dist.workflows.edit import EditJob, edit
from lga_dist.workflows.options import (
    ClusterOptions,
    EditingOptions,
    ModelOptions,
    OutputOptions,
    ProxyOptions,
    ScoringOptions,
)
from lga_dist.workflows.rank import RankJob, rank
from lga_dist.workflows.rerank import RerankJob, rerank
from lga_dist.workflows.validate import ValidateJob, validate


def test_sections_are_flat_flags_with_each_jobs_defaults():
    parser = make_parser(bulk_edit_command.Config, "bulk-edit", "")
    arguments = parser.parse_args(["--actors", "2", "--window", "5", "--model", "demo"])
    config = build_config(bulk_edit_command.Config, arguments)
    assert (config.cluster.actors, config.editing.window, config.model.model) == (2, 5, "demo")
    assert config.output.out == "out/bulk_edit" and config.editing.method == "memit"
    assert build_config(validate_command.Config, parser.parse_args([])).cluster.actors == 2  # a grid worker per core
    assert edit_command.Config(layers="1").editing.method == "rome"
    assert edit_command.Config(layers="1").output.out == "out/edit"
    # one declaration: the options every job shares have the same help text in every job
    helps = {}
    for cls in (rank_layers.Config, bulk_edit_command.Config, validate_command.Config, edit_command.Config):
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


def _tiny(model_path) -> ModelOptions:
    return ModelOptions(model=str(model_path), device="cpu")


SMALL_C = EditingOptions(method="rome", cov_tokens=2_000)


def test_edit_from_python(tiny_llama, tmp_path):
    report = edit(EditJob(layers="1", limit=3, model=_tiny(tiny_llama), editing=SMALL_C,
                          output=OutputOptions(out=str(tmp_path), progress=False)))
    assert report.summary["layers"] == [1] and report.summary["n"] == 3 and report.summary["mode"] == "single"
    assert set(report.before) == set(report.after) >= {"ES", "PS", "NS", "Score"}
    assert (tmp_path / "eval.parquet").exists()
    with pytest.raises(ConfigError, match="--overwrite"):  # an earlier edit's results are not clobbered
        edit(EditJob(layers="1", limit=3, model=_tiny(tiny_llama), editing=SMALL_C,
                     output=OutputOptions(out=str(tmp_path), progress=False)))


def test_edit_with_no_valid_request_says_so_and_keeps_the_quarantine(tiny_llama, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"case_id": 1, "prompt": "no subject here"}\nnot json\n')
    with pytest.raises(ConfigError, match="no valid requests to edit; see .*quarantine.jsonl"):
        edit(EditJob(layers="1", requests=[str(broken)], model=_tiny(tiny_llama), editing=SMALL_C,
                     output=OutputOptions(out=str(tmp_path / "out"), progress=False)))
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(reasons) == 2 and "invalid_json" in reasons


def test_bulk_edit_from_python_writes_only_the_edited_layer(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    job = BulkEditJob(layers="1", limit=4, batch_size=2, probe=2, model=_tiny(tiny_llama),
                      editing=dataclasses.replace(SMALL_C, method="memit"), cluster=ClusterOptions(actors=0),
                      output=OutputOptions(out=str(tmp_path), progress=False))
    result = bulk_edit(job)
    assert result.layers == [1] and result.batches == 2 and result.counts["applied"] == 4 and result.rejected is None
    summary = result.summary()
    assert summary["saved_fingerprint"] != summary["model_fingerprint"]
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_bulk_edit_new_facts_only_applies_the_first_requests_the_model_does_not_predict(tiny_llama, tmp_path):
    from lga_dist.evaluation import evaluate_requests
    from lga_dist.models import load_model

    job = BulkEditJob(layers="1", limit=3, new_facts_only=True, probe=0, model=_tiny(tiny_llama),
                      editing=dataclasses.replace(SMALL_C, method="memit"), cluster=ClusterOptions(actors=0),
                      output=OutputOptions(out=str(tmp_path), progress=False))
    result = bulk_edit(job)
    shipped = read_requests([str(demo_requests_path())]).requests[500:540]
    loaded = load_model(str(tiny_llama))
    unknown = [r.case_id for r, row in zip(shipped, evaluate_requests(loaded.model, loaded.tokenizer, shipped))
               if row["ES"] == 0.0]
    assert len(unknown) < len(shipped)  # the random model already "predicts" some: the filter has work to do
    applied = pq.read_table(tmp_path / "eval.parquet").column("case_id").to_pylist()
    assert applied == unknown[:3] and result.before["ES"] == 0.0 and result.counts["applied"] == 3


def test_a_new_facts_selection_is_read_back_rather_than_evaluated_again(tiny_llama, tmp_path, monkeypatch):
    """A resumed study on other hardware, whose bfloat16 rounding can flip a borderline fact, edits the requests its
    finished tasks edited: the recorded selection is reused for the same inputs, made again for others."""
    from lga_dist.workflows import new_facts

    shipped = read_requests([str(demo_requests_path())]).requests[500:540]
    record = str(tmp_path / "new_facts.json")
    first = new_facts.not_yet_known(str(tiny_llama), shipped, 3, "float32", record=record)
    recorded = json.loads((tmp_path / "new_facts.json").read_text())
    assert recorded["case_ids"] == [str(r.case_id) for r in first] and len(first) == 3

    def no_model(*args, **kwargs):
        raise AssertionError("the model was evaluated again")

    monkeypatch.setattr(new_facts, "load_model", no_model)
    assert new_facts.not_yet_known(str(tiny_llama), shipped, 3, "float32", record=record) == first
    with pytest.raises(AssertionError, match="evaluated again"):  # another count: selected anew
        new_facts.not_yet_known(str(tiny_llama), shipped, 4, "float32", record=record)
    with pytest.raises(ConfigError, match="does not match the requests read"):  # same hash, a request gone
        recorded["case_ids"][0] = "no-such-case"
        (tmp_path / "new_facts.json").write_text(json.dumps(recorded))
        new_facts.not_yet_known(str(tiny_llama), shipped, 3, "float32", record=record)


def test_bulk_progress_resumes_from_the_newest_record_that_kept_its_weights(tmp_path):
    from lga_dist.workflows.bulk_progress import BatchRecord, BulkProgress

    progress = BulkProgress(str(tmp_path))

    def record(batch: int) -> BatchRecord:
        return BatchRecord(batch=batch, case_ids=[str(batch)], edits_applied=batch + 1, record={}, tracking={},
                           seconds=0.0)

    progress.commit([record(0), record(1)], {"w": torch.full((2,), 1.0)})
    assert [r.batch for r in progress.finished()] == [0, 1]
    # A commit of batches 2-3 cut short: its weights and batch 2's record written, batch 3's not.
    (tmp_path / "progress" / "weights-00003.safetensors").write_bytes(
        (tmp_path / "progress" / "weights-00001.safetensors").read_bytes())
    (tmp_path / "progress" / "batch-00002.json").write_text(
        (tmp_path / "progress" / "batch-00001.json").read_text().replace('"batch": 1', '"batch": 2'))
    assert [r.batch for r in progress.finished()] == [0, 1]  # batch 2 has no weights of its own: redone
    # A record whose write was killed leaves its empty temporary file behind; it is not a record.
    (tmp_path / "progress" / ".tmp-owgyxckh-batch-00003.json").write_text("")
    assert [r.batch for r in progress.finished()] == [0, 1]
    assert torch.equal(progress.load_weights(1, torch.float32)["w"], torch.full((2,), 1.0))
    # A resume that loads the model in another dtype (--dtype auto on other hardware) would round the
    # saved weights into it: refused, naming the dtype that continues the run.
    with pytest.raises(ConfigError, match="committed in float32.*in bfloat16; pass --dtype float32"):
        progress.load_weights(1, torch.bfloat16)
    progress.commit([record(2), record(3)], {"w": torch.full((2,), 3.0)})
    assert [r.batch for r in progress.finished()] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "progress").glob("*.safetensors")) == ["weights-00003.safetensors"]


def test_bulk_edit_checkpointing_every_k_batches_ends_with_the_same_weights(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    results = {}
    for every in (1, 3):
        job = BulkEditJob(layers="1", limit=8, batch_size=2, probe=2, checkpoint_every=every, model=_tiny(tiny_llama),
                          editing=dataclasses.replace(SMALL_C, method="memit"), cluster=ClusterOptions(actors=0),
                          output=OutputOptions(out=str(tmp_path / str(every)), progress=False))
        result = bulk_edit(job)
        results[every] = result.summary()
        assert results[every]["batches"] == 4 and 0 < result.checkpoint_seconds < result.seconds
        assert len(list((tmp_path / str(every) / "progress").glob("batch-*.json"))) == 4
    assert results[1]["saved_fingerprint"] == results[3]["saved_fingerprint"]
    first, second = (load_file(tmp_path / str(k) / "model" / "model.safetensors") for k in (1, 3))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_grid_runs_a_memit_window_once_for_the_layers_that_share_it(tiny_llama, tmp_path):
    """Window 2, end-aligned, on 3 blocks: layers 0 and 1 both edit [0, 1] (shifted to fit), layer 2 edits [1, 2]."""
    job = ValidateJob(limit=4, layers="0:2", chunk_size=4, proxy_sizes=[], cma_samples=1, model=_tiny(tiny_llama),
                      editing=dataclasses.replace(SMALL_C, method="memit", window=2), cluster=ClusterOptions(actors=0),
                      output=OutputOptions(out=str(tmp_path), progress=False))
    result = validate(job)
    assert result.summary["tasks"] == 4  # the proxy split, then the test split: each window once per split
    assert sorted(p.name for p in (tmp_path / "grid").glob("*.parquet")) == [
        f"{split}-layer{layer:03d}-chunk0000.parquet" for split in ("proxy", "test") for layer in (0, 2)]
    grid = pq.read_table(tmp_path / "grid.parquet").to_pylist()
    by_layer = {layer: sorted((r["case_id"], r["performance"], r["edited_layers"]) for r in grid if r["layer"] == layer)
                for layer in (0, 1, 2)}
    assert by_layer[0] == by_layer[1] and len(by_layer[1]) == 4 and by_layer[1][0][2] == "0,1"
    assert {r[2] for r in by_layer[2]} == {"1,2"}


def test_a_grid_of_another_request_set_is_refused_naming_what_differs(tmp_path):
    from lga_dist.validation.grid import _check_grid_key

    key = {"method": "rome", "model": "m", "requests": {"proxy": "aa", "test": "bb"}, "window": 1}
    _check_grid_key(str(tmp_path), key, overwrite=False)
    _check_grid_key(str(tmp_path), json.loads(json.dumps(key)), overwrite=False)  # the same grid: resumed
    changed = {**key, "window": 3, "requests": {"proxy": "aa", "test": "cc"}}
    with pytest.raises(ConfigError, match=r"differs in: requests\.test, window\)"):
        _check_grid_key(str(tmp_path), changed, overwrite=False)
    assert json.loads((tmp_path / "grid.json").read_text()) == key  # the refused run left the key as it was


def test_validate_from_python(tiny_llama, tmp_path):
    job = ValidateJob(limit=4, layers="0:1", chunk_size=4, proxy_sizes=[0.25], cma_samples=1, model=_tiny(tiny_llama),
                      editing=SMALL_C, cluster=ClusterOptions(actors=0),
                      output=OutputOptions(out=str(tmp_path), progress=False))
    result = validate(job)
    for key in ("optimal_mean", "golden_mean", "lga_mean", "regret", "spearman", "golden_layer", "lga_layer"):
        assert key in result.summary, key  # DESIGN.md's stable keys
    assert result.summary["lga_layer"] in (0, 1) and result.summary["tasks"] == 4
    assert result.rows[0]["comparison"] == "proxy -> test" and result.cost["lga_seconds"] > 0
    # every output says what produced it: model, method, layers per edit, dtype
    recorded = {"model_id": result.summary["model_id"], "method": "rome", "window": 1, "dtype": "float32"}
    assert {k: result.summary[k] for k in recorded} == recorded
    for table in ("golden_summary.parquet", "grid.parquet"):
        rows = pq.read_table(tmp_path / table).to_pylist()
        assert all({k: row[k] for k in recorded} == recorded for row in rows), table


def test_rerank_from_python_skips_an_unchanged_model(tiny_llama, tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"defaults": {"actors": 0, "proxy_size": 4, "batch_size": 4, "device": "cpu"},
                                      "models": [{"name": "tiny", "model": str(tiny_llama)}]}))
    job = RerankJob(models=str(models), registry=str(tmp_path / "registry"), progress=False)
    first = rerank(job)
    assert [m["status"] for m in first.models] == ["ranked"] and not first.drift
    second = rerank(job)
    assert [m["status"] for m in second.models] == ["skipped"]
    assert second.models[0]["golden_layer"] == first.models[0]["golden_layer"]


def test_one_edit_semantics_a_batch_is_one_update_from_the_same_weights(tiny_llama):
    """apply_batch (edit --mode batch, bulk-edit) of one request = the grid's edit of it alone; a ROME batch =
    its requests' independent updates, summed; MEMIT's batch = its joint solve."""
    from lga_dist.editing import METHODS, apply_batch, edit_each
    from lga_dist.editing.prepare import edit_context, method_hparams
    from lga_dist.models import load_model

    loaded = load_model(str(tiny_llama), dtype=torch.float64)
    ctx = edit_context(loaded, ["Paris is the capital of France", "Toko Yasuda plays the guitar"] * 20, 500, None,
                       "cpu", progress=False)
    requests = read_requests([str(demo_requests_path())]).requests[500:502]
    for name, layers in (("rome", [1]), ("memit", [1, 2])):
        hparams = method_hparams(name, [])
        alone = edit_each(METHODS[name], ctx, requests, layers, hparams)
        joint = METHODS[name].apply(ctx, requests, layers, hparams) if METHODS[name].batched else None
        snapshot = ctx.snapshot(list(alone[0].deltas))
        one = apply_batch(name, ctx, requests[:1], layers, hparams)
        snapshot.restore()
        both = apply_batch(name, ctx, requests, layers, hparams)
        snapshot.restore()
        for module in alone[0].deltas:
            torch.testing.assert_close(one.deltas[module], alone[0].deltas[module], rtol=1e-9, atol=1e-12)
            expected = joint.deltas[module] if joint else alone[0].deltas[module] + alone[1].deltas[module]
            torch.testing.assert_close(both.deltas[module], expected, rtol=1e-9, atol=1e-12)


def test_bulk_edit_follows_the_rule_its_ranking_records(tiny_llama, tmp_path):
    """A ranking made with --order asc names its lowest kept layer golden; bulk-edit edits that layer and says
    which selector and rule chose it."""
    rankings = {}
    for order in ("desc", "asc"):
        job = RankJob(model=_tiny(tiny_llama), proxy=ProxyOptions(proxy_size=6), cluster=ClusterOptions(actors=0),
                      scoring=ScoringOptions(order=order, kappa=100.0),  # no fences: every layer ranked
                      output=OutputOptions(out=str(tmp_path / order), progress=False))
        rankings[order] = rank(job)
    scores = rankings["desc"].layer_scores()
    assert rankings["desc"].golden_layer == max(scores, key=scores.get)
    assert rankings["asc"].golden_layer == min(scores, key=scores.get) != rankings["desc"].golden_layer
    result = bulk_edit(BulkEditJob(ranking=rankings["asc"].path, limit=2, probe=0, model=_tiny(tiny_llama),
                                   editing=SMALL_C, cluster=ClusterOptions(actors=0),
                                   output=OutputOptions(out=str(tmp_path / "edit"), progress=False)))
    assert result.layers == [rankings["asc"].golden_layer] and result.golden_layer == rankings["asc"].golden_layer
    assert result.summary()["ranking_rule"] == "lga dot-asc"


def test_edit_sweep_reports_every_value_and_refuses_what_it_cannot_measure(tiny_llama, tmp_path):
    job = EditJob(layers="0-1", limit=3, sweep="mom2_update_weight=1,15000", model=_tiny(tiny_llama),
                  editing=dataclasses.replace(SMALL_C, method="memit", hparam=["v_num_grad_steps=3"]),
                  output=OutputOptions(out=str(tmp_path), progress=False))
    report = edit(job)
    assert [row["value"] for row in report.summary["post"]] == [1.0, 15000.0]
    assert report.summary["best"] == max(report.swept, key=lambda v: report.swept[v]["Score"])
    assert report.summary["best_tied_with"] == [
        v for v in report.swept if v != report.summary["best"] and report.swept[v]["Score"] == report.swept[
            report.summary["best"]]["Score"]]
    # weights this large leave the model as it was: equal Scores, the first value named, the other listed
    still = edit(dataclasses.replace(job, sweep="mom2_update_weight=1e12,1e13",
                                     output=OutputOptions(out=str(tmp_path / "still"), progress=False)))
    assert still.swept[1e12]["Score"] == still.swept[1e13]["Score"]
    assert still.summary["best"] == 1e12 and still.summary["best_tied_with"] == [1e13]
    table = pq.read_table(tmp_path / "sweep.parquet").to_pylist()
    assert len(table) == 6 and {row["value"] for row in table} == {"1.0", "15000.0"}
    for value in ("1.0", "15000.0"):  # the table's per-request rows average to the reported means
        rows = [row["post_ES"] for row in table if row["value"] == value]
        assert sum(rows) / len(rows) == pytest.approx(report.swept[float(value)]["ES"])
    for bad in (dict(mode="single"), dict(batch_size=1), dict(save=True)):
        with pytest.raises(ConfigError, match="--sweep measures one update"):
            EditJob(layers="1", sweep="mom2_update_weight=1", **bad).validate()
    with pytest.raises(ConfigError, match="MemitHyperParams has"):
        EditJob(layers="1", sweep="lambda=1", editing=EditingOptions(method="memit")).validate()
    with pytest.raises(ConfigError, match="cannot read 'x' as float"):
        EditJob(layers="1", sweep="mom2_update_weight=1,x", editing=EditingOptions(method="memit")).validate()
    with pytest.raises(ConfigError, match="1.0 given more than once"):  # 1 and 1.0 are one value, one update
        EditJob(layers="1", sweep="mom2_update_weight=1,2,1.0", editing=EditingOptions(method="memit")).validate()


def test_hyper_parameters_measured_for_a_packaged_model_sit_between_the_papers_and_hparam(monkeypatch):
    from lga_dist.editing.prepare import method_hparams
    from lga_dist.models import packaged
    from lga_dist.validation.grid import GridSpec

    demo = dataclasses.replace(packaged.packaged_model("demo"), edit_hparams={"memit": {"mom2_update_weight": 7.0}})
    monkeypatch.setattr(packaged, "PACKAGED_MODELS", (demo,))
    assert method_hparams("memit", [], model="demo").mom2_update_weight == 7.0
    assert method_hparams("memit", ["mom2_update_weight=3"], model="demo").mom2_update_weight == 3.0
    assert method_hparams("memit", [], model="/models/other").mom2_update_weight == 15000.0  # the paper's
    assert method_hparams("rome", [], model="demo") == method_hparams("rome", [])
    # a grid measured with the registry's values is not resumed as one measured with the paper's
    key = GridSpec(model="demo", method="memit").key("fp", {})
    assert key["model_hparams"] == {"mom2_update_weight": 7.0}
    assert "model_hparams" not in GridSpec(model="demo", method="rome").key("fp", {})


def test_alphaedit_in_sequence_keeps_the_keys_of_the_batches_before(tmp_path):
    """AlphaEdit's sequential mode, float64, one layer: batch B's update is the closed form
    R K_B^T P (P (K_B K_B^T + K_A K_A^T) + L2 I)^-1 with K_A the keys of batch A read after A was applied;
    without the carried keys it is another update."""
    from lga_dist.editing import METHODS, EditContext, PreservedKeys, Snapshot, apply_batch
    from lga_dist.editing.alphaedit import null_space_projection
    from lga_dist.editing.covariance import compute_second_moments
    from lga_dist.models import load_model

    m = load_model(str(save_tiny_model(tmp_path / "tiny", "llama", n_layers=3)), dtype=torch.float64)
    layer, layers = 1, [1]
    texts = [f"{r.prompt} {r.target_true}" for r in read_requests([str(demo_requests_path())]).requests[:60]]
    mom2 = compute_second_moments(m.model, m.tokenizer, m.adapter, layers, texts, 2000, progress=False)[0][layer]
    ctx = EditContext(m.model, m.tokenizer, m.adapter, m.fingerprint, ["", "The day"], lambda _: mom2)
    hparams = METHODS["alphaedit"].hparams(v_num_grad_steps=4, nullspace_threshold=float(mom2.trace()))
    requests = read_requests([str(demo_requests_path())]).requests[500:504]
    a, b = requests[:2], requests[2:]
    name = m.adapter.mlp_out_name(layer)
    untouched = Snapshot(m.model, [name])
    preserved = PreservedKeys()
    apply_batch("alphaedit", ctx, a, layers, hparams, 0, preserved)
    keys_a = ctx.keys(a, layer, "subject_last", "by_kind").T
    torch.testing.assert_close(preserved.grams[layer], keys_a @ keys_a.T, rtol=0, atol=0)
    # the closed form of batch B's update, from the model as batch A left it
    keys_b = ctx.keys(b, layer, "subject_last", "by_kind").T
    targets = ctx.targets(b, m.adapter.layer_name(layer), hparams)
    residual = (targets.target - ctx.read_output(b, m.adapter.layer_name(layer), "subject_last", "bare")).T
    projection = null_space_projection(mom2, hparams.nullspace_threshold)
    system = projection @ (keys_b @ keys_b.T + keys_a @ keys_a.T) + hparams.L2 * torch.eye(len(mom2), dtype=mom2.dtype)
    expected = torch.linalg.solve(system, projection @ keys_b @ residual.T).T
    after_a = Snapshot(m.model, [name])
    carried = apply_batch("alphaedit", ctx, b, layers, hparams, 1, preserved)
    torch.testing.assert_close(carried.deltas[name], expected, rtol=1e-8, atol=1e-12)
    after_a.restore()
    fresh = apply_batch("alphaedit", ctx, b, layers, hparams, 1)
    assert not torch.allclose(fresh.deltas[name], expected, rtol=1e-3, atol=0)
    untouched.restore()


def test_a_resumed_sequential_alphaedit_bulk_edit_ends_with_the_same_weights(tiny_llama, tmp_path, monkeypatch):
    """Killed after its second of three batches and run again: the carried keys come back from OUT/progress/ with
    the weights, so the third batch is solved exactly as in the uninterrupted run (bit for bit)."""
    from safetensors.torch import load_file

    import lga_dist.workflows.bulk_edit as bulk

    def job(out):
        return BulkEditJob(layers="1", limit=6, batch_size=2, probe=2, model=_tiny(tiny_llama),
                           editing=dataclasses.replace(SMALL_C, method="alphaedit",
                                                       hparam=["nullspace_threshold=1e3", "v_num_grad_steps=4"]),
                           cluster=ClusterOptions(actors=0), output=OutputOptions(out=str(out), progress=False))

    whole = bulk_edit(job(tmp_path / "whole"))
    real = bulk.apply_batch

    def dies_at_the_third(name, ctx, batch, layers, hparams, number=0, preserved=None):
        if number == 2:
            raise KeyboardInterrupt("killed")
        return real(name, ctx, batch, layers, hparams, number, preserved)

    monkeypatch.setattr(bulk, "apply_batch", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        bulk_edit(job(tmp_path / "killed"))
    monkeypatch.setattr(bulk, "apply_batch", real)
    resumed = bulk_edit(job(tmp_path / "killed"))
    assert resumed.batches == whole.batches == 3
    weights = [load_file(out / "model" / "model.safetensors") for out in (tmp_path / "whole", tmp_path / "killed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["model.layers.1.mlp.down_proj.weight"],
                           load_file(tiny_llama / "model.safetensors")["model.layers.1.mlp.down_proj.weight"])


def test_bulk_edit_tracks_held_out_facts_it_never_edits_and_fluency(tiny_llama, tmp_path):
    """The held-out facts are shipped facts the unedited model knows (ES 0), none of them edited (no shared case id
    or subject); retention and fluency are tracked after every batch and reported before and after."""
    import json

    from lga_dist.evaluation import evaluate_requests
    from lga_dist.models import load_model

    job = BulkEditJob(layers="1", limit=4, batch_size=2, probe=2, held_out=6, fluency_tokens=8, model=_tiny(tiny_llama),
                      editing=dataclasses.replace(SMALL_C, method="memit"), cluster=ClusterOptions(actors=0),
                      output=OutputOptions(out=str(tmp_path), progress=False))
    result = bulk_edit(job)
    baseline = json.loads((tmp_path / "progress" / "baseline.json").read_text())
    edited = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    shipped = {r.case_id: r for r in read_requests([str(demo_requests_path())]).requests}
    held = [shipped[case_id] for case_id in baseline["held_out"]]
    assert len(held) == 6 and not {r.case_id for r in held} & {row["case_id"] for row in edited}
    assert not {r.subject for r in held} & {shipped[row["case_id"]].subject for row in edited}
    loaded = load_model(str(tiny_llama))
    assert all(row["ES"] == 0.0 for row in evaluate_requests(loaded.model, loaded.tokenizer, held))
    summary = result.summary()
    assert summary["before"]["held_out_retention"] == 1.0 and 0.0 <= summary["after"]["held_out_retention"] <= 1.0
    assert summary["before"]["fluency"] > 0 and summary["after"]["fluency"] > 0 and summary["held_out"] == 6
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "progress").glob("batch-*.json"))]
    assert [set(r["tracking"]) >= {"held_out_retention", "fluency"} for r in records] == [True, True]
    assert records[-1]["tracking"]["fluency"] == summary["after"]["fluency"]

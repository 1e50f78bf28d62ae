"""The embedded demo fact model: knows its facts, deterministic, cached, and the shipped subset's provenance."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from lga_dist.models import fingerprint, load_model
from lga_dist.models.demo import DemoModelConfig, build_demo_model, demo_facts, evaluate_facts, learned_facts
from lga_dist.models.demo_data import demo_requests_path, demo_support_path, make_demo_subset, make_demo_support

TINY = DemoModelConfig(n_facts=40, n_layers=2, hidden_size=32, intermediate_size=64, vocab_size=400, epochs=2,
                       batch_size=16, warmup_steps=2, store_layers=1)


def test_shipped_subset_is_what_make_demo_subset_produces(shared_data):
    shipped = json.loads(demo_requests_path().read_text())
    assert shipped == make_demo_subset(str(shared_data / "counterfact" / "counterfact-train.json"))
    assert len(shipped) == 1000 and len({r["subject"] for r in shipped}) == 1000
    support = json.loads(demo_support_path().read_text())
    assert support == make_demo_support(str(shared_data / "counterfact" / "counterfact-train.json"), shipped)


def test_the_demo_model_learns_an_answer_for_almost_every_new_target():
    """Support facts make the new targets words the model can say; CounterFact train lacks a few."""
    facts = demo_facts(1000)
    learned = learned_facts(facts)
    answers = {f.target_true for f in learned} | {a for f in learned for a in f.neighborhood_answers}
    unsayable = {f.target_new for f in facts} - answers
    assert len(learned) - len(facts) == 86 and len(unsayable) == 10
    assert len({f.subject for f in learned}) == len(learned)


def test_build_is_deterministic_and_cached(tmp_path):
    first = build_demo_model(TINY, root=tmp_path / "a", show_progress=False)
    second = build_demo_model(TINY, root=tmp_path / "b", show_progress=False)
    assert not first.reused and not second.reused
    assert fingerprint(first.path) == fingerprint(second.path)
    again = build_demo_model(TINY, root=tmp_path / "a", show_progress=False)
    assert again.reused and again.path == first.path and again.rewrite_acc == first.rewrite_acc
    other_seed = build_demo_model(TINY.__class__(**{**TINY.__dict__, "seed": 1}), root=tmp_path / "a",
                                  show_progress=False)
    assert other_seed.path != first.path and fingerprint(other_seed.path) != fingerprint(first.path)


@pytest.mark.slow
def test_demo_model_knows_its_facts(demo_model_dir):
    loaded = load_model(str(demo_model_dir))
    assert loaded.n_layers >= 8 and loaded.adapter.family == "llama"
    report = json.loads((demo_model_dir / "demo_report.json").read_text())
    facts = demo_facts(report["facts"])
    measured = evaluate_facts(loaded.model, loaded.tokenizer, facts)  # re-measured from the saved files
    assert measured["rewrite_acc"] >= 0.95
    assert measured["paraphrase_acc"] >= 0.9
    assert measured["rewrite_acc"] == pytest.approx(report["rewrite_acc"], abs=1e-3)
    multi_token = [f for f in facts
                   if len(loaded.tokenizer(" " + f.target_true, add_special_tokens=False).input_ids) > 1]
    assert multi_token, "the demo vocabulary should leave some answers multi-token"
    # Where facts can live is fixed: MLP-only blocks below store_layers, attention-only above, one token per subject.
    recipe = json.loads((demo_model_dir / "demo_recipe.json").read_text())
    for index, block in enumerate(loaded.model.model.layers):
        silent = block.self_attn.o_proj if index < recipe["store_layers"] else block.mlp.down_proj
        assert not silent.weight.any(), index
    assert all(len(loaded.tokenizer(f.subject, add_special_tokens=False).input_ids) == 1 for f in facts[:50])
    spaced = loaded.tokenizer("x " + facts[0].subject, add_special_tokens=False).input_ids
    assert spaced[-1] == loaded.tokenizer(facts[0].subject, add_special_tokens=False).input_ids[0]


@pytest.mark.slow
def test_demo_model_command_summary(demo_model_dir):
    code, stdout, _, summary = run_cli("demo-model")
    assert code == 0
    assert summary["path"] == str(demo_model_dir) and summary["reused"] is True
    assert summary["layers"] >= 8 and summary["facts"] == 1000 and summary["rewrite_acc"] >= 0.95
    assert "paraphrase" in stdout

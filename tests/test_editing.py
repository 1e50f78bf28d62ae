"""Editing math against closed forms, covariance against brute force, deltas, restore and save/reload."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import save_tiny_model

from lga_dist.editing import Snapshot, apply_deltas, save_edited
from lga_dist.editing.alphaedit import alphaedit_solve, null_space_projection
from lga_dist.editing.covariance import SecondMoments, compute_second_moments
from lga_dist.editing.deltas import EditRecord
from lga_dist.editing.memit import memit_solve
from lga_dist.editing.rome import rank_one_update
from lga_dist.evaluation import aggregate, evaluate_requests, harmonic_mean
from lga_dist.models import get_module, load_model
from lga_dist.models.demo import demo_facts, training_pairs

D_OUT, D_IN = 6, 9


def _spd(rng: np.random.Generator, d: int) -> torch.Tensor:
    a = rng.normal(size=(d, 3 * d))
    return torch.tensor(a @ a.T / (3 * d))


def test_rome_update_is_rank_one_and_maps_the_bare_key_to_the_value():
    """dW = r u^T / (k_bare . u), u = C^-1 k*: the bare prompt's key moves by exactly r, and keys
    C-orthogonal to k* (k'^T C^-1 k* = 0) not at all."""
    rng = np.random.default_rng(0)
    weight = torch.tensor(rng.normal(size=(D_OUT, D_IN)))
    mom2, value = _spd(rng, D_IN), torch.tensor(rng.normal(size=D_OUT))
    key, bare_key = torch.tensor(rng.normal(size=D_IN)), torch.tensor(rng.normal(size=D_IN))
    delta = rank_one_update(value - weight @ bare_key, mom2, key, bare_key)
    assert torch.linalg.matrix_rank(delta) == 1
    torch.testing.assert_close((weight + delta) @ bare_key, value, rtol=1e-10, atol=1e-10)
    other = torch.tensor(rng.normal(size=D_IN))
    u = torch.linalg.solve(mom2, key)
    other = other - (u @ other) / (u @ key) * key
    torch.testing.assert_close(delta @ other, torch.zeros(D_OUT, dtype=torch.float64), atol=1e-10, rtol=0)


def test_memit_with_one_request_is_rome_up_to_the_c_scaling():
    """Sherman-Morrison: R k^T (lam C + k k^T)^-1 = R (C^-1 k)^T / (lam + k^T C^-1 k)."""
    rng = np.random.default_rng(1)
    mom2, key, residual = _spd(rng, D_IN), torch.tensor(rng.normal(size=D_IN)), torch.tensor(rng.normal(size=D_OUT))
    lam = 37.0
    rome = rank_one_update(residual, mom2, key, key)
    memit = memit_solve(residual.unsqueeze(1), key.unsqueeze(1), mom2, lam)
    q = key @ torch.linalg.solve(mom2, key)
    torch.testing.assert_close(memit * (lam + q) / q, rome, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_alphaedit_leaves_preserved_keys_alone(noise):
    rng = np.random.default_rng(2)
    d, rank = 12, 7
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :rank]  # preserved keys live in a 7-dim subspace
    preserved = basis @ rng.normal(size=(rank, 4000)) + noise * rng.normal(size=(d, 4000))
    mom2 = torch.tensor(preserved @ preserved.T / preserved.shape[1])
    held_out = torch.tensor(basis @ rng.normal(size=(rank, 50)))  # new keys from the same distribution
    keys = torch.tensor(rng.normal(size=(d, 3)))  # edit keys: anywhere
    residual = torch.tensor(rng.normal(size=(D_OUT, 3)))
    projection = null_space_projection(mom2, threshold=1e-2)
    assert round(float(torch.trace(projection))) == d - rank
    alpha = alphaedit_solve(residual, keys, projection, l2=10.0)
    disturbance = float((alpha @ held_out).norm() / held_out.norm()) / float(alpha.norm())
    assert disturbance < (1e-12 if noise == 0 else 1e-4)  # exact null space: zero; estimated: ~ noise^2
    moved = float((alpha @ keys).norm())
    assert moved > 0.1 * float(residual.norm())  # and it still moves the edit keys


def test_null_space_must_exist():
    from lga_dist.errors import UserError

    with pytest.raises(UserError, match="raise nullspace_threshold"):
        null_space_projection(torch.eye(4, dtype=torch.float64), threshold=0.5)


@pytest.fixture
def tiny_llama(tmp_path):
    path = save_tiny_model(tmp_path / "tiny", "llama", n_layers=3)
    return load_model(str(path))


TEXTS = ["Paris is the capital of France", "The Eiffel Tower is in Paris", "Danielle Darrieux speaks French",
         "Toko Yasuda plays the guitar", "Autonomous University of Madrid is in Spain"] * 3


def test_second_moment_equals_brute_force(tiny_llama):
    m = tiny_llama
    layer = 1
    moments, count = compute_second_moments(m.model, m.tokenizer, m.adapter, [layer], TEXTS, max_tokens=10_000,
                                            progress=False, batch_size=4)
    keys = []
    handle = get_module(m.model, m.adapter.mlp_out_name(layer)).register_forward_hook(
        lambda _m, args, _o: keys.append(args[0][0].detach().double()))
    with torch.no_grad():
        for text in TEXTS:
            m.model(**m.tokenizer(text, return_tensors="pt"))
    handle.remove()
    k = torch.cat(keys)
    assert count == k.shape[0]
    torch.testing.assert_close(moments[layer], k.T @ k / k.shape[0], rtol=1e-5, atol=1e-9)  # float32, padded or not
    # A token budget stops exactly there, and counts the first tokens of the corpus.
    capped, seventeen = compute_second_moments(m.model, m.tokenizer, m.adapter, [layer], TEXTS, max_tokens=17,
                                               progress=False, batch_size=4)
    assert seventeen == 17
    torch.testing.assert_close(capped[layer], k[:17].T @ k[:17] / 17, rtol=1e-5, atol=1e-9)


def test_every_layer_in_one_pass_and_split_into_shares_equals_one_layer_at_a_time(tmp_path):
    """Float64: the shares of a ZeRO-3 group (every world-th batch, short ranks padded) add up to one pass."""
    m = load_model(str(save_tiny_model(tmp_path / "tiny", "llama", n_layers=3)), dtype=torch.float64)
    texts, budget, layers = TEXTS * 3, 150, [0, 1, 2]
    together, count = compute_second_moments(m.model, m.tokenizer, m.adapter, layers, texts, budget,
                                             progress=False, batch_size=4)
    assert count == budget
    for layer in layers:
        alone, _ = compute_second_moments(m.model, m.tokenizer, m.adapter, [layer], texts, budget, progress=False,
                                          batch_size=4)
        torch.testing.assert_close(together[layer], alone[layer], rtol=1e-10, atol=0)
    for world in (2, 3, 7):  # 7 ranks: more ranks than batches of 4 texts... some run padding passes only
        shares = [compute_second_moments(m.model, m.tokenizer, m.adapter, layers, texts, budget, progress=False,
                                         batch_size=4, share=(rank, world)) for rank in range(world)]
        assert sum(n for _, n in shares) == budget
        for layer in layers:
            summed = sum(share[layer] * n for share, n in shares if n) / budget
            torch.testing.assert_close(summed, together[layer], rtol=1e-10, atol=1e-14)


def _all_reduce_worker(rank: int, path: str, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        m = load_model(path, dtype=torch.float64)

        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(tensor)
            return tensor

        moments, count = compute_second_moments(m.model, m.tokenizer, m.adapter, [0, 2], TEXTS * 3, 150,
                                                progress=False, batch_size=4, share=(rank, 2), reduce=reduce)
        results[rank] = ({layer: t.numpy() for layer, t in moments.items()}, count)
    finally:
        dist.destroy_process_group()


def test_two_ranks_all_reducing_their_shares_get_the_single_process_covariance(tmp_path):
    import torch.multiprocessing as mp
    from helpers import free_port

    path = str(save_tiny_model(tmp_path / "tiny", "llama", n_layers=3))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_all_reduce_worker, args=(path, free_port(), results), nprocs=2, start_method="spawn")
        results = dict(results)
    m = load_model(path, dtype=torch.float64)
    single, count = compute_second_moments(m.model, m.tokenizer, m.adapter, [0, 2], TEXTS * 3, 150, progress=False,
                                           batch_size=4)
    for rank in (0, 1):
        moments, reduced = results[rank]
        assert reduced == count == 150
        for layer in (0, 2):
            np.testing.assert_allclose(moments[layer], single[layer].numpy(), rtol=1e-10, atol=1e-14)


def test_covariance_cache_hits_and_invalidates_on_a_new_fingerprint(tiny_llama, tmp_path, monkeypatch):
    import lga_dist.editing.covariance as covariance

    m = tiny_llama
    passes = []
    real = covariance.compute_second_moments
    monkeypatch.setattr(covariance, "compute_second_moments",
                        lambda model, tok, adapter, layers, *a, **k: passes.append(list(layers)) or
                        real(model, tok, adapter, layers, *a, **k))
    stats = str(tmp_path / "stats")

    def moments(fingerprint: str, texts=TEXTS, tokens: int = 1000) -> SecondMoments:
        return SecondMoments(m.model, m.tokenizer, m.adapter, fingerprint, texts, tokens, stats, progress=False)

    first = moments("sha256:aaaa")(0)
    again = moments("sha256:aaaa")(0)
    assert passes == [[0]] and torch.equal(first, again)
    moments("sha256:bbbb")(0)
    moments("sha256:aaaa", TEXTS[:-1])(0)
    moments("sha256:aaaa", tokens=999)(0)
    assert len(passes) == 4
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 4
    # Several layers: only the missing ones, all in one pass; then nothing.
    assert moments("sha256:aaaa").prepare([2, 0, 1, 2]) == [2, 1]
    assert passes[-1] == [2, 1] and moments("sha256:aaaa").prepare([0, 1, 2]) == [] and len(passes) == 5
    torch.testing.assert_close(moments("sha256:aaaa")(0), first, rtol=0, atol=0)


def test_covariance_passes_stay_within_their_memory_budget_and_give_the_same_c(tiny_llama, tmp_path, monkeypatch):
    """Layers whose float64 sums would not fit one pass's budget take several passes over the corpus; each layer's
    C is bit for bit the one a single pass gives (the same batches, summed in the same order)."""
    import lga_dist.editing.covariance as covariance

    assert covariance.passes_within({5: 10, 2: 10, 7: 20}, 10 * 10 * 8 * 2) == [[5, 2], [7]]
    assert covariance.passes_within({0: 30, 1: 10}, 100) == [[0], [1]]  # larger than the budget: alone
    m = tiny_llama
    width = m.adapter.key_width(get_module(m.model, m.adapter.mlp_out_name(0)))
    assert width == m.model.config.intermediate_size
    passes = []
    real = covariance.compute_second_moments
    monkeypatch.setattr(covariance, "compute_second_moments",
                        lambda model, tok, adapter, layers, *a, **k: passes.append(list(layers)) or
                        real(model, tok, adapter, layers, *a, **k))
    budget = 2 * width * width * 8
    split = SecondMoments(m.model, m.tokenizer, m.adapter, "sha256:aaaa", TEXTS, 1000, str(tmp_path / "split"),
                          progress=False, max_bytes=budget)
    whole = SecondMoments(m.model, m.tokenizer, m.adapter, "sha256:aaaa", TEXTS, 1000, str(tmp_path / "whole"),
                          progress=False)
    assert split.prepare([0, 1, 2]) == [0, 1, 2] and passes == [[0, 1], [2]]
    assert whole.prepare([0, 1, 2]) == [0, 1, 2] and passes[-1] == [0, 1, 2]
    for layer in (0, 1, 2):
        assert torch.equal(split(layer), whole(layer))


def test_covariance_cache_keeps_each_dtypes_keys_apart(tmp_path):
    """A bfloat16 model's keys are not its float32 keys: same weights, same corpus, two cache entries."""
    path = str(save_tiny_model(tmp_path / "tiny", "llama", n_layers=2))
    stats = str(tmp_path / "stats")

    def moments(dtype: torch.dtype) -> SecondMoments:
        m = load_model(path, dtype=dtype)
        return SecondMoments(m.model, m.tokenizer, m.adapter, "sha256:aaaa", TEXTS, 1000, stats, progress=False)

    full, half = moments(torch.float32), moments(torch.bfloat16)
    assert full.path(1) != half.path(1) and "bfloat16" in half.path(1)
    c_full = full(1)
    assert half.prepare([1]) == [1]  # not served from the float32 entry
    c_half = half(1)
    assert not torch.equal(c_full, c_half)
    torch.testing.assert_close(c_half, c_full, rtol=0.05, atol=0.05 * float(c_full.abs().max()))
    assert full.prepare([1]) == [] and torch.equal(full(1), c_full)


def test_covariance_cache_on_s3(tiny_llama, s3):
    m = tiny_llama
    moments = SecondMoments(m.model, m.tokenizer, m.adapter, "sha256:cc", TEXTS, 500, f"{s3}/stats", progress=False)
    first = moments(2)
    assert moments.prepare([2]) == [] and torch.equal(first, moments(2))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_deltas_apply_in_the_adapters_orientation_and_restore_bit_exactly(tmp_path, family):
    m = load_model(str(save_tiny_model(tmp_path / family, family, n_layers=2)))
    name = m.adapter.mlp_out_name(1)
    module = get_module(m.model, name)
    original = module.weight.detach().clone()
    oriented = m.adapter.oriented_weight(module)
    delta = torch.randn(oriented.shape, dtype=torch.float64) * 1e-3
    snapshot = Snapshot(m.model, [name])
    apply_deltas(m.model, m.adapter, {name: delta})
    torch.testing.assert_close(m.adapter.oriented_weight(module).double() - m.adapter.orient(original).double(),
                               delta, rtol=1e-4, atol=1e-6)
    snapshot.restore()
    assert torch.equal(module.weight, original)
    with pytest.raises(ValueError, match="does not fit"):
        apply_deltas(m.model, m.adapter, {name: delta.T.contiguous()})


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_saved_edited_model_reloads_with_its_edits(family, tmp_path):
    """Gemma 3 ties its LM head to the embeddings: the saved model must come back the same."""
    from transformers import AutoModelForCausalLM

    m = load_model(str(save_tiny_model(tmp_path / "tiny", family, n_layers=3)))
    name = m.adapter.mlp_out_name(0)
    delta = torch.randn(m.adapter.oriented_weight(get_module(m.model, name)).shape, dtype=torch.float64) * 0.05
    apply_deltas(m.model, m.adapter, {name: delta})
    record = EditRecord(method="memit", layers=[0], case_ids=["1"], hparams={"a": 1},
                        fingerprint_before=m.fingerprint)
    after = save_edited(m.model, m.tokenizer, tmp_path / "edited", [record])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    ids = m.tokenizer("Paris is the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, m.model(ids).logits)
    lines = [json.loads(line) for line in (tmp_path / "edited" / "edits.jsonl").read_text().splitlines()]
    assert lines[0]["fingerprint_before"] == m.fingerprint and lines[0]["fingerprint_after"] == after != m.fingerprint
    assert load_model(str(tmp_path / "edited")).fingerprint == after


def test_harmonic_mean_and_aggregate():
    assert harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(0.6)
    assert harmonic_mean([1.0, 0.0]) == 0.0
    rows = [{"ES": 1.0, "PS": 0.5, "NS": 1.0}, {"ES": 0.0, "PS": 0.5, "NS": 1.0}]
    means = aggregate(rows)
    assert means["ES"] == 0.5 and means["PS"] == 0.5 and means["NS"] == 1.0
    assert means["Score"] == pytest.approx(3 / (2 + 2 + 1))


@pytest.mark.slow
def test_counterfact_metrics_of_the_unedited_demo_model(demo_model_dir):
    """The demo model was trained on the true answers: nothing is edited yet, neighbors are intact."""
    m = load_model(str(demo_model_dir))
    facts = demo_facts(1000)[500:530]
    rows = evaluate_requests(m.model, m.tokenizer, facts)
    means = aggregate(rows)
    assert means["ES"] == 0.0 and means["PS"] == 0.0 and means["NS"] >= 0.95
    assert means["EM"] < -0.9 and means["NM"] > 0.9  # P(true) ~ 1 and P(new) ~ 0
    assert len(training_pairs(facts)) > len(facts)


@pytest.mark.slow
@pytest.mark.parametrize("method,layers,extra", [("rome", "4", ()), ("memit", "3,4", ("--save",)),
                                                 ("alphaedit", "3-4", ()), ("ft", "4", ())])
def test_edit_command_on_the_demo_model(demo_model_dir, tmp_path, method, layers, extra):
    import pyarrow.parquet as pq
    from helpers import run_cli

    out = tmp_path / "out"
    code, stdout, stderr, summary = run_cli("edit", "--model", "demo", "--method", method, "--layers", layers,
                                            "--limit", "3", "--out", str(out), "--no-progress", *extra)
    assert code == 0, stderr[-3000:]
    assert summary["method"] == method and summary["n"] == 3
    assert set(summary["pre"]) == {"ES", "PS", "NS", "Score"} and summary["pre"]["ES"] == 0.0
    rows = pq.read_table(out / "eval.parquet").to_pylist()
    assert len(rows) == 3 and {"pre_ES", "post_ES", "pre_NS", "post_NS"} <= set(rows[0])
    assert all(r["model_fingerprint"] == summary["model_fingerprint"] for r in rows)
    assert "before" in stdout and "after" in stdout
    if "--save" in extra:
        saved = load_model(str(out / "model"))
        assert saved.fingerprint == summary["saved_fingerprint"] != summary["model_fingerprint"]
        manifest = [json.loads(x) for x in (out / "model" / "edits.jsonl").read_text().splitlines()]
        assert manifest[0]["method"] == method and len(manifest[0]["case_ids"]) == 3
        assert manifest[0]["layers"] == [3, 4]


def test_edit_command_refuses_bad_layers_and_hparams(demo_model_dir, tmp_path):
    from helpers import run_cli

    code, _, _, summary = run_cli("edit", "--model", "demo", "--layers", "40", "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "has layers 0-9" in summary["error"]
    code, _, _, summary = run_cli("edit", "--model", "demo", "--layers", "4", "--hparam", "nonsense=1",
                                  "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "RomeHyperParams has" in summary["error"]
    code, _, _, summary = run_cli("edit", "--model", "demo", "--layers", "4", "--method", "rome", "--save",
                                  "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "--mode batch" in summary["error"]


@pytest.mark.parametrize("family,name,layers", [("llama", "rome", [1]), ("llama", "memit", [1]),
                                                ("llama", "alphaedit", [1]), ("llama", "memit", [0, 1]),
                                                ("gemma3", "memit", [1]), ("gemma3", "alphaedit", [0, 1])])
def test_batched_independent_edits_equal_one_request_at_a_time(tiny_llama, tmp_path, family, name, layers):
    """edit_each shares one batched target optimisation; Adam is per element, so each edit is unchanged
    (on Gemma 3 through its post-MLP norm too, in float64: in float32 the tiny Gemma 3's deltas differ by
    up to 16% between a batch and a batch of one, rounding magnified by its target optimisation)."""
    from lga_dist.editing import METHODS, EditContext, edit_each

    # 4 Gemma 3 layers: a full-attention layer after the edit sees the subject (a 4-token window cannot)
    m = tiny_llama if family == "llama" else load_model(str(save_tiny_model(tmp_path / family, family, n_layers=4)),
                                                       dtype=torch.float64)
    requests = demo_facts(1000)[500:503]
    stats, _ = compute_second_moments(m.model, m.tokenizer, m.adapter, range(m.n_layers), TEXTS, 200, progress=False)
    ctx = EditContext(m.model, m.tokenizer, m.adapter, m.fingerprint, ["", "The day"], stats.__getitem__)
    method = METHODS[name]
    hparams = method.hparams(v_num_grad_steps=5, **({"nullspace_threshold": 10.0} if name == "alphaedit" else {}))
    batched = edit_each(method, ctx, requests, layers, hparams)
    for request, result in zip(requests, batched):
        alone = method.apply(ctx, [request], layers, hparams)
        assert result.record.case_ids == [request.case_id] and result.record.method == name
        assert result.deltas.keys() == alone.deltas.keys()
        for key, delta in alone.deltas.items():
            torch.testing.assert_close(result.deltas[key], delta, rtol=2e-4, atol=1e-7)


def test_a_site_whose_value_is_zero_gets_no_update_and_no_nan(tiny_llama):
    """An MLP whose output projection is zero (the demo model's attention-only blocks): the clamp allows no move."""
    from lga_dist.editing import METHODS, EditContext

    m, layer = tiny_llama, 1
    name = m.adapter.mlp_out_name(layer)
    weight = get_module(m.model, name).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
    try:
        mom2 = compute_second_moments(m.model, m.tokenizer, m.adapter, [layer], TEXTS, 200, progress=False)[0][layer]
        ctx = EditContext(m.model, m.tokenizer, m.adapter, m.fingerprint, [""], lambda _: mom2)
        rome = METHODS["rome"]
        result = rome.apply(ctx, demo_facts(1000)[500:501], [layer], rome.hparams(v_num_grad_steps=3))
        assert torch.isfinite(result.deltas[name]).all() and not result.deltas[name].any()
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def rome_in_the_model(m, layer: int, **hparams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROME of one shipped fact at ``layer`` of a loaded model (C from TEXTS, one bare prefix), applied in place:
    the edited projection's output at the subject before, the target v*, and the output after."""
    from lga_dist.editing import METHODS, EditContext

    name = m.adapter.mlp_out_name(layer)
    mom2 = compute_second_moments(m.model, m.tokenizer, m.adapter, [layer], TEXTS, 200, progress=False)[0][layer]
    ctx = EditContext(m.model, m.tokenizer, m.adapter, m.fingerprint, [""], lambda _: mom2)
    rome = METHODS["rome"]
    chosen = rome.hparams(**hparams)
    request = demo_facts(1000)[500]
    target = ctx.targets([request], name, chosen).target[0]
    before = ctx.read_output([request], name, chosen.fact_token)[0]
    ctx.apply(rome.apply(ctx, [request], [layer], chosen).deltas)
    return before, target, ctx.read_output([request], name, chosen.fact_token)[0]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rome_through_the_models_own_forward_maps_the_key_to_its_target(tmp_path, family):
    """After ROME at layer 1 the edited projection, run inside the model, writes v* where it reads k*.

    On Gemma 3 the post-feed-forward norm follows down_proj: the target is found through it and the
    update must still land exactly on down_proj's output (float64, one context prefix)."""
    m = load_model(str(save_tiny_model(tmp_path / family, family, n_layers=3)), dtype=torch.float64)
    before, target, after = rome_in_the_model(m, 1, v_num_grad_steps=5)
    assert not torch.allclose(before, target)
    torch.testing.assert_close(after, target.to(after.dtype), rtol=1e-7, atol=1e-9)


def test_one_window_rule_for_edit_bulk_edit_and_the_grid():
    """edit --ranking, bulk-edit and validate-golden's grid all call edit_window: near layer 0 a window is
    shifted to fit, never cut (golden 1, window 3: [0, 1, 2]); ROME and FT-L edit the golden layer alone."""
    import inspect

    from lga_dist.editing import edit_window
    from lga_dist.validation import grid as edit_grid
    from lga_dist.workflows import bulk_edit, edit

    assert edit_window(1, "memit", 3, 18) == [0, 1, 2]
    assert edit_window(9, "memit", 3, 18) == [7, 8, 9]
    assert edit_window(17, "alphaedit", 5, 18, align="center") == [13, 14, 15, 16, 17]
    assert edit_window(9, "memit", 5, 18, align="center") == [7, 8, 9, 10, 11]
    assert edit_window(4, "rome", 3, 18) == edit_window(4, "ft", 3, 18) == [4]
    assert edit_window(0, "memit", 5, 3) == [0, 1, 2]
    for module in (edit, bulk_edit, edit_grid):
        assert "edit_window(" in inspect.getsource(module), module.__name__


def test_a_corpus_shorter_than_the_token_budget_is_said(tiny_llama, caplog):

    m = tiny_llama
    with caplog.at_level("WARNING"):
        _, count = compute_second_moments(m.model, m.tokenizer, m.adapter, [0], TEXTS, 10**6, progress=False)
    assert count < 10**6 and f"the corpus has {count} tokens, fewer than the 1000000 asked for" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        compute_second_moments(m.model, m.tokenizer, m.adapter, [0], TEXTS, 20, progress=False)
    assert "fewer than" not in caplog.text


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_targets_from_the_cached_states_below_the_site_equal_the_full_forward(tmp_path, family, monkeypatch):
    """Target optimisation runs only the blocks from the site's on; the full model gives the same deltas."""
    import contextlib

    import lga_dist.editing.targets as targets

    m = load_model(str(save_tiny_model(tmp_path / family, family, n_layers=4)))
    prefixes = ["", "The day"]
    requests = demo_facts(1000)[500:503]
    # the random MLPs' values are tiny
    options = targets.TargetHyperParams(v_num_grad_steps=4, clamp_norm_factor=1000.0)
    # Not the last block: a vector at the subject reaches the answer only through a later block's attention.
    for site in (m.adapter.mlp_out_name(1), m.adapter.layer_name(2)):
        resumed = targets.compute_targets(m.model, m.tokenizer, m.adapter, requests, prefixes, site, options)
        with monkeypatch.context() as patch:
            patch.setattr(targets, "run_from_block", lambda *_: contextlib.nullcontext())
            full = targets.compute_targets(m.model, m.tokenizer, m.adapter, requests, prefixes, site, options)
        assert resumed.delta.abs().max() > 0
        torch.testing.assert_close(resumed.delta, full.delta, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(resumed.final_loss, full.final_loss, rtol=1e-6, atol=1e-9)


def test_targets_in_memory_bounded_chunks_equal_one_batch(tiny_llama):
    """A step's sequences in chunks (here one or three at a time) give the one-batch deltas: the NLL is a sum
    over sequences and each touches only its own request's row."""
    from lga_dist.editing.targets import TargetHyperParams, compute_targets

    m = tiny_llama
    requests = demo_facts(1000)[500:504]
    options = TargetHyperParams(v_num_grad_steps=6, clamp_norm_factor=1000.0, stop_loss=5.76)  # some stop early
    vocab = m.model.get_output_embeddings().weight.shape[0]
    whole = compute_targets(m.model, m.tokenizer, m.adapter, requests, ["", "The day"], m.adapter.layer_name(1),
                            options)
    assert whole.delta.abs().max() > 0
    for sequences in (1, 3):
        chunked = compute_targets(m.model, m.tokenizer, m.adapter, requests, ["", "The day"],
                                  m.adapter.layer_name(1), options, max_logits=sequences * vocab * 8)
        torch.testing.assert_close(chunked.delta, whole.delta, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(chunked.final_loss, whole.final_loss, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_targets_do_not_depend_on_the_tokenizers_padding_side(tmp_path, family):
    """Gemma 3's tokenizer pads on the left. The KL prompts ("{subject} is a") of a batch differ in length, so
    a left-padded batch moved each shorter prompt's last token and subject: its KL term then depended on the
    other requests in the batch (gemma3-270m: deltas 0.5% apart from the request alone, in float64)."""
    from lga_dist.editing.targets import KL_PROMPT, TargetHyperParams, compute_targets

    # 4 layers: on Gemma 3 a full-attention layer after the edited one sees the subject (its 4-token window cannot)
    m = load_model(str(save_tiny_model(tmp_path / family, family, n_layers=4)), dtype=torch.float64)
    requests = demo_facts(1000)[500:504]
    lengths = {len(m.tokenizer(KL_PROMPT.format(r.subject)).input_ids) for r in requests}
    assert len(lengths) > 1  # prompts of different lengths: the batch is padded
    options = TargetHyperParams(v_num_grad_steps=5, clamp_norm_factor=1000.0, kl_factor=1.0, stop_loss=0.0)
    site = m.adapter.mlp_out_name(1)
    prefixes = ["", "The day"]
    m.tokenizer.padding_side = "left"
    batched = compute_targets(m.model, m.tokenizer, m.adapter, requests, prefixes, site, options)
    m.tokenizer.padding_side = "right"
    for index, request in enumerate(requests):
        alone = compute_targets(m.model, m.tokenizer, m.adapter, [request], prefixes, site, options)
        assert alone.delta.abs().max() > 0
        torch.testing.assert_close(batched.delta[index], alone.delta[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,layers", [("memit", [0, 1]), ("rome", [1])])
def test_a_sweep_equals_separate_edits_and_optimises_the_targets_once(tiny_llama, name, layers):
    """settings_in_turn shares the targets between settings that differ only in the solve; each setting's
    update equals apply_batch's on the unedited model, and the weights are back bit-exactly afterwards."""
    from lga_dist.editing import METHODS, EditContext, apply_batch
    from lga_dist.editing.sweep import settings_in_turn

    m = tiny_llama
    requests = demo_facts(1000)[500:503]
    stats, _ = compute_second_moments(m.model, m.tokenizer, m.adapter, range(m.n_layers), TEXTS, 200, progress=False)
    ctx = EditContext(m.model, m.tokenizer, m.adapter, m.fingerprint, ["", "The day"], stats.__getitem__)
    calls = []
    compute = ctx.targets
    ctx.targets = lambda *args: calls.append(args[1]) or compute(*args)
    modules = [m.adapter.mlp_out_name(layer) for layer in layers]
    unedited = {k: get_module(m.model, k).weight.detach().clone() for k in modules}
    base = METHODS[name].hparams(v_num_grad_steps=4)
    if name == "memit":  # a solve hyper-parameter: one target optimisation for every value
        field, values = "mom2_update_weight", [1.0, 50.0, 5000.0]
    else:  # a target hyper-parameter: each value optimises its own targets
        field, values = "v_num_grad_steps", [2, 4]
    settings = [dataclasses.replace(base, **{field: value}) for value in values]
    swept = [(result.deltas, {k: get_module(m.model, k).weight.detach().clone() for k in modules})
             for result in settings_in_turn(name, ctx, requests, layers, settings)]
    assert len(calls) == (1 if name == "memit" else len(values))
    for key in modules:
        assert torch.equal(get_module(m.model, key).weight, unedited[key])
    sizes = set()
    for (deltas, weights), hparams in zip(swept, settings):
        snapshot = Snapshot(m.model, modules)
        alone = apply_batch(name, ctx, requests, layers, hparams)
        for key in alone.deltas:
            torch.testing.assert_close(deltas[key], alone.deltas[key], rtol=1e-9, atol=1e-12)
            assert torch.equal(weights[key], get_module(m.model, key).weight)  # it was applied while yielded
        snapshot.restore()
        sizes.add(round(float(sum(d.norm() for d in deltas.values())), 6))
    assert len(sizes) == len(values)  # the settings did differ


def _post_norm_case(tmp_path, output_scale: float):
    """A 2-layer tiny Gemma 3 whose layer-1 post-MLP norm has gains far from one, its MLP output scaled by
    ``output_scale``; (model, layer, norm module, the projection's output at 3 subjects)."""
    from lga_dist.editing.context import read_at_subject

    m = load_model(str(save_tiny_model(tmp_path / "g", "gemma3", n_layers=2)), dtype=torch.float64)
    layer = 1
    norm = get_module(m.model, m.adapter.mlp_post_norm_name(layer))
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(2.0, 40.0, norm.weight.numel(), dtype=torch.float64))
        get_module(m.model, m.adapter.mlp_out_name(layer)).weight.mul_(output_scale)
    value = read_at_subject(m.model, m.tokenizer, m.adapter, demo_facts(1000)[500:503], [""],
                            m.adapter.mlp_out_name(layer), "output")
    return m, layer, norm, value


def _wanted_residual(before: torch.Tensor) -> torch.Tensor:
    """A small random residual, 1e-3 of the norm's output in size, seeded."""
    noise = torch.randn(before.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return 1e-3 * before.norm(dim=1, keepdim=True) * noise / before.shape[1] ** 0.5


def _first_order_error(norm, post, value: torch.Tensor) -> float:
    """How far the norm's response to through_post_norm's change is from the first-order response to the
    wanted residual (all of it but the part along the norm's own output), relative to the residual."""
    from lga_dist.editing.memit import through_post_norm

    with torch.no_grad():
        before = norm(value)
    wanted = _wanted_residual(before)
    with torch.no_grad():
        moved = norm(value + through_post_norm(wanted.T, value, post).T) - before
    r = (value.pow(2).mean(dim=1, keepdim=True) + norm.eps).sqrt()
    passed = wanted - before * (value / r * wanted / post.gain).sum(dim=1, keepdim=True) / value.shape[1]
    return float(((moved - passed).norm(dim=1) / wanted.norm(dim=1)).max())


def test_memit_writes_through_gemma3s_post_mlp_norm(tmp_path):
    """Gemma 3 norms the MLP's output before the residual: the gain is read off the norm (1 + w), and the
    change MEMIT writes at the projection moves the norm's output by the wanted residual (first order),
    where writing the residual itself is amplified by gain / rms(o)."""
    from lga_dist.editing.context import PostNorm, mlp_post_norm
    from lga_dist.editing.memit import through_post_norm

    m, layer, norm, value = _post_norm_case(tmp_path, output_scale=100.0)  # output far above the epsilon
    post = mlp_post_norm(m.model, m.adapter, layer)
    torch.testing.assert_close(post.gain, 1.0 + norm.weight.detach(), rtol=1e-6, atol=0)  # float32 inside
    assert post.eps == norm.eps
    llama = load_model(str(save_tiny_model(tmp_path / "l", "llama")))
    assert mlp_post_norm(llama.model, llama.adapter, 0) is None

    assert _first_order_error(norm, post, value) < 1e-2
    before = norm(value)
    wanted = _wanted_residual(before)
    naive = norm(value + wanted) - before
    assert ((naive - wanted).norm(dim=1) / wanted.norm(dim=1)).min() > 1.0
    # a gain of exactly zero (Gemma's weight -1; Gemma 3 270M's layer 1 has one): that dimension is not written
    dead = PostNorm(gain=post.gain.clone(), eps=post.eps)
    dead.gain[3] = 0.0
    change = through_post_norm(wanted.T, value, dead).T
    assert torch.isfinite(change).all() and not change[:, 3].any() and change[:, 4].abs().min() > 0


def test_memit_through_the_post_norm_counts_its_epsilon(tmp_path):
    """An MLP output whose mean square is near the norm's epsilon (tiny random models; small outputs in real
    ones): the norm's slope is gain / sqrt(mean(o^2) + eps), so leaving eps out over-writes the change."""
    from lga_dist.editing.context import PostNorm, mlp_post_norm

    m, layer, norm, value = _post_norm_case(tmp_path, output_scale=1.0)
    post = mlp_post_norm(m.model, m.adapter, layer)
    assert 0.1 < float(value.pow(2).mean()) / post.eps < 10  # the case where the epsilon matters
    assert _first_order_error(norm, post, value) < 1e-2
    assert _first_order_error(norm, PostNorm(gain=post.gain, eps=0.0), value) > 0.1


def test_an_edit_with_non_finite_changes_is_refused_before_it_is_applied():
    from lga_dist.editing.deltas import EditRecord, NonFiniteEdit, finish_record

    record = EditRecord(method="memit", layers=[1], case_ids=["7"], hparams={}, fingerprint_before="x")
    expected = r"memit at layer\(s\) \[1\] gave non-finite weight changes at b \(requests 7\)"
    with pytest.raises(NonFiniteEdit, match=expected):
        finish_record(record, {"a": torch.ones(2, 2), "b": torch.tensor([[1.0, float("nan")]])})
    assert finish_record(record, {"a": torch.ones(2, 2)}).delta_norms == {"a": 2.0}


def test_a_post_norm_without_a_readable_epsilon_is_refused_by_name():
    from lga_dist.editing.context import norm_epsilon

    class Llama:  # transformers' LlamaRMSNorm spelling
        variance_epsilon = 1e-5

    assert norm_epsilon(Llama()) == 1e-5
    with pytest.raises(TypeError, match="Linear has no numeric eps or variance_epsilon"):
        norm_epsilon(torch.nn.Linear(2, 2))

"""LGA scores against brute-force per-request autograd, on every family and both parameter sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAMILIES, tiny_config

from lga_dist.answers import answer_logits, answer_nll
from lga_dist.io.requests import EditRequest
from lga_dist.lga.scoring import LayerGradientScorer, encode_request_pair, pair_batch
from lga_dist.models import adapter_for, get_module, load_model
from lga_dist.models.demo import build_tokenizer, demo_facts


def brute_force(model, tokenizer, adapter, requests, n_layers, param_set):
    """Two backward passes per request, torch.autograd.grad on the weights themselves."""
    dot = np.zeros((len(requests), n_layers))
    norm_old, norm_new = np.zeros_like(dot), np.zeros_like(dot)
    weights = [[get_module(model, name).weight for name in adapter.param_set_modules(l, param_set)]
               for l in range(n_layers)]
    flat_weights = [w for layer in weights for w in layer]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in flat_weights:
        w.requires_grad_(True)
    for i, request in enumerate(requests):
        grads = []
        for answer in (0, 1):
            batch = pair_batch([encode_request_pair(tokenizer, request)], tokenizer.pad_token_id)
            loss = answer_nll(answer_logits(model, batch), batch)[answer]
            grads.append(torch.autograd.grad(loss, flat_weights))
        position = 0
        for layer in range(n_layers):
            count = len(weights[layer])
            old, new = grads[0][position:position + count], grads[1][position:position + count]
            dot[i, layer] = sum(float((a * b).sum()) for a, b in zip(old, new))
            norm_old[i, layer] = np.sqrt(sum(float((a * a).sum()) for a in old))
            norm_new[i, layer] = np.sqrt(sum(float((b * b).sum()) for b in new))
            position += count
    for w in flat_weights:
        w.requires_grad_(False)
    return dot, norm_old, norm_new


def mixed_requests(n: int = 7) -> list[EditRequest]:
    """Demo facts with prompts of different lengths and answers of one and several tokens."""
    facts = demo_facts(200)
    long = [f for f in facts if len(f.prompt) > 45][:2]
    multi = [EditRequest(**{**f.__dict__, "target_new": f.target_new + " de la Tour", "target_true":
                            "old " + f.target_true}) for f in facts[10:12]]
    return (long + multi + facts[:n])[:n]


def tokenizer_for_tests():
    return build_tokenizer(demo_facts(200), 600)


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for_tests()


@pytest.mark.parametrize("modules_per_gram", [1, 2, 99], ids=["one-at-a-time", "two-at-a-time", "all-at-once"])
@pytest.mark.parametrize("param_set", ["out", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_brute_force_autograd(family, param_set, modules_per_gram, tokenizer):
    """Stacking modules two at a time over three layers also checks that each chunk lands in its own columns."""
    import transformers

    torch.manual_seed(0)
    config = tiny_config(family, n_layers=3, vocab_size=len(tokenizer))
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    adapter = adapter_for(config.model_type)
    requests = mixed_requests()
    assert any(len(encode_request_pair(tokenizer, r)[1].answer_ids) > 1 for r in requests)
    with LayerGradientScorer(model, tokenizer, adapter, 3, param_set, modules_per_gram=modules_per_gram) as scorer:
        scores = scorer.score(requests)
    dot, norm_old, norm_new = brute_force(model, tokenizer, adapter, requests, 3, param_set)
    np.testing.assert_allclose(scores.dot, dot, rtol=1e-5, atol=1e-12 * np.abs(dot).max())
    np.testing.assert_allclose(scores.norm_old, norm_old, rtol=1e-5)
    np.testing.assert_allclose(scores.norm_new, norm_new, rtol=1e-5)
    assert np.all(norm_old > 0)


def test_stacks_bounded_by_size_give_the_same_scores(tokenizer, monkeypatch):
    """A stack that would pass STACK_ELEMENTS is split, and the scores do not move."""
    import transformers

    from lga_dist.lga import scoring

    torch.manual_seed(0)
    config = tiny_config("llama", n_layers=3, vocab_size=len(tokenizer))
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    adapter, requests = adapter_for("llama"), mixed_requests()
    stacks: list[int] = []
    original = scoring._gram_products
    monkeypatch.setattr(scoring, "_gram_products", lambda x, *rest: stacks.append(len(x)) or original(x, *rest))
    scores, default = {}, scoring.STACK_ELEMENTS
    for budget in (default, 0):  # 0: every stack would pass it, so one module at a time
        monkeypatch.setattr(scoring, "STACK_ELEMENTS", budget)
        stacks.clear()
        with LayerGradientScorer(model, tokenizer, adapter, 3, modules_per_gram=99) as scorer:
            scores[budget] = scorer.score(requests)
        assert stacks == ([3] if budget else [1, 1, 1])
    np.testing.assert_allclose(scores[0].dot, scores[default].dot, rtol=1e-12)
    np.testing.assert_allclose(scores[0].norm_new, scores[default].norm_new, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("param_set", ["out", "mlp"])
def test_scores_equal_brute_force_on_demo_model(demo_model_dir, param_set):
    loaded = load_model(str(demo_model_dir), dtype=torch.float64)
    requests = mixed_requests(6)
    with LayerGradientScorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers, param_set) as scorer:
        scores = scorer.score(requests)
    dot, norm_old, norm_new = brute_force(loaded.model, loaded.tokenizer, loaded.adapter, requests,
                                          loaded.n_layers, param_set)
    np.testing.assert_allclose(scores.dot, dot, rtol=1e-5, atol=1e-10 * np.abs(dot).max())
    np.testing.assert_allclose(scores.norm_old, norm_old, rtol=1e-5)
    np.testing.assert_allclose(scores.norm_new, norm_new, rtol=1e-5)
    cosine = scores.cosine()
    assert np.all(np.abs(cosine) <= 1 + 1e-9)


def test_batch_size_and_padding_rows_do_not_change_scores(tokenizer):
    import transformers

    torch.manual_seed(1)
    config = tiny_config("llama", n_layers=3, vocab_size=len(tokenizer))
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    adapter = adapter_for("llama")
    requests = demo_facts(40)[:32]
    results = {}
    with LayerGradientScorer(model, tokenizer, adapter, 3) as scorer:
        for size in (1, 7, 32):
            parts = [scorer.score(requests[i:i + size]) for i in range(0, len(requests), size)]
            results[size] = np.concatenate([p.dot for p in parts])
        padded = scorer.score(requests[:5] + requests[:2], valid=[True] * 5 + [False] * 2)
    np.testing.assert_allclose(results[7], results[1], rtol=1e-9)
    np.testing.assert_allclose(results[32], results[1], rtol=1e-9)
    np.testing.assert_allclose(padded.dot, results[1][:5], rtol=1e-9)
    assert padded.dot.shape == (5, 3)
    assert all(p.requires_grad for p in model.parameters())  # scoring mode restored the flags

"""Did an edit work, and what did it break? CounterFact and zsRE metrics per request.

CounterFact (ROME/MEMIT's definitions, probabilities compared as mean answer NLL):
  ES  efficacy:      P(new) > P(true) on the rewrite prompt
  PS  paraphrase:    the same, averaged over the paraphrase prompts
  NS  neighborhood:  P(true) > P(new) on prompts about other subjects (should stay true)
  EM/PM/NM the magnitudes: mean P(new) - P(true) (NM: P(true) - P(new)), with P = exp(-mean NLL)
  Score: harmonic mean of ES, PS and NS.
zsRE (MEMIT's): token-level top-1 accuracy of the new answer on the request (efficacy) and on its
  rephrase (generalization), and of the locality answer on the locality prompt (specificity).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from lga_dist.answers import PromptAnswer, answer_logits, answer_nll, collate, encode_prompt_answer
from lga_dist.console import Progress
from lga_dist.io.requests import EditRequest

COUNTERFACT = ("ES", "PS", "NS", "EM", "PM", "NM")
ZSRE = ("zsre_efficacy", "zsre_generalization", "zsre_specificity")
HEADLINE = ("ES", "PS", "NS", "Score")


@dataclasses.dataclass(frozen=True)
class _Query:
    """One prompt + answer to score, and where its result goes."""

    request: int
    kind: str  # rewrite_new, rewrite_true, para_new, para_true, neigh_new, neigh_true
    item: PromptAnswer


def _queries(tokenizer, requests: Sequence[EditRequest]) -> list[_Query]:
    queries = []
    for index, r in enumerate(requests):
        def add(kind: str, prompt: str, answer: str) -> None:
            queries.append(_Query(index, kind, encode_prompt_answer(tokenizer, prompt, answer)))

        add("rewrite_new", r.prompt, r.target_new)
        add("rewrite_true", r.prompt, r.target_true)
        for prompt in r.paraphrase_prompts:
            add("para_new", prompt, r.target_new)
            add("para_true", prompt, r.target_true)
        for prompt, answer in zip(r.neighborhood_prompts, r.neighborhood_answers):
            add("neigh_new", prompt, r.target_new)
            add("neigh_true", prompt, answer)
    return queries


def query_count(requests: Sequence[EditRequest]) -> int:
    """How many prompt/answer pairs ``evaluate_requests`` scores for these requests."""
    return sum(2 + 2 * len(r.paraphrase_prompts) + 2 * len(r.neighborhood_prompts) for r in requests)


@torch.no_grad()
def _score_queries(model, tokenizer, queries: list[_Query], device, batch_size: int,
                   min_batches: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean answer NLL and token-level top-1 accuracy of every query.

    ``min_batches``: forward passes to make at least (repeating the last one,
    results discarded), so ZeRO-3 ranks with fewer queries keep in step.
    """
    nll, accuracy = np.zeros(len(queries)), np.zeros(len(queries))
    order = sorted(range(len(queries)), key=lambda i: len(queries[i].item.input_ids))  # less padding
    starts = list(range(0, len(order), batch_size))
    passes = max(len(starts), min_batches)
    bar = Progress(passes, f"evaluating {len(queries)} prompts", "batch", log_every_s=30.0, bar=False)
    for step in range(passes):  # long on a large model or a busy machine: a line in job logs every 30 s
        bar.update(1)
        chunk = order[starts[min(step, len(starts) - 1)]:][:batch_size]
        batch = collate([queries[i].item for i in chunk], tokenizer.pad_token_id).to(device)
        logits = answer_logits(model, batch)
        if step >= len(starts):
            continue
        nll[chunk] = answer_nll(logits, batch).double().cpu().numpy()
        hits = ((logits.argmax(-1) == batch.answer_ids) & batch.answer_mask.bool()).sum(-1)
        accuracy[chunk] = (hits.double() / batch.answer_mask.sum(-1)).cpu().numpy()
    return nll, accuracy


def _pairs(values: dict[str, list[float]], a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(values.get(a, [])), np.asarray(values.get(b, []))


def evaluate_requests(model, tokenizer, requests: Sequence[EditRequest], device="cpu",
                      batch_size: int = 64, min_batches: int = 0) -> list[dict[str, float]]:
    """Per-request metrics (CounterFact keys always; zsRE keys for zsRE-format requests)."""
    queries = _queries(tokenizer, requests)
    nll, accuracy = _score_queries(model, tokenizer, queries, device, batch_size, min_batches)
    per_request: list[dict[str, dict[str, list[float]]]] = [{"nll": {}, "acc": {}} for _ in requests]
    for query, loss, acc in zip(queries, nll, accuracy):
        per_request[query.request]["nll"].setdefault(query.kind, []).append(float(loss))
        per_request[query.request]["acc"].setdefault(query.kind, []).append(float(acc))
    rows = []
    for request, values in zip(requests, per_request):
        row: dict[str, float] = {}
        for name, prefix, better_new in (("E", "rewrite", True), ("P", "para", True), ("N", "neigh", False)):
            new, true = _pairs(values["nll"], f"{prefix}_new", f"{prefix}_true")
            if new.size == 0:
                row[f"{name}S"], row[f"{name}M"] = math.nan, math.nan
                continue
            success = (new < true) if better_new else (true < new)
            magnitude = np.exp(-new) - np.exp(-true)
            row[f"{name}S"] = float(success.mean())
            row[f"{name}M"] = float((magnitude if better_new else -magnitude).mean())
        if request.source_format == "zsre":
            row["zsre_efficacy"] = float(np.mean(values["acc"]["rewrite_new"]))
            row["zsre_generalization"] = float(np.mean(values["acc"].get("para_new", [math.nan])))
            row["zsre_specificity"] = float(np.mean(values["acc"].get("neigh_true", [math.nan])))
        rows.append(row)
    return rows


def harmonic_mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    if not values or min(values) <= 0:
        return 0.0 if values else math.nan
    return len(values) / sum(1.0 / v for v in values)


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means over requests (NaN-aware) and the CounterFact Score of the means."""
    keys = [k for k in (*COUNTERFACT, *ZSRE) if any(k in r for r in rows)]
    means = {k: float(np.nanmean([r.get(k, math.nan) for r in rows])) if rows else math.nan for k in keys}
    means["Score"] = harmonic_mean([means.get("ES", math.nan), means.get("PS", math.nan), means.get("NS", math.nan)])
    return means


def headline(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(metrics[k], 4) for k in HEADLINE if k in metrics}


def evaluation_table(requests: Sequence[EditRequest], pre: Sequence[dict], post: Sequence[dict],
                     context: dict[str, str]) -> pa.Table:
    """One row per request: its metrics before and after (``pre_ES``, ``post_ES``, ...) and what produced them."""
    metrics = sorted({k for row in (*pre, *post) for k in row})
    columns: dict[str, list] = {"case_id": [r.case_id for r in requests],
                                "subject": [r.subject for r in requests],
                                "target_new": [r.target_new for r in requests]}
    for when, rows in (("pre", pre), ("post", post)):
        for key in metrics:
            columns[f"{when}_{key}"] = [row.get(key, math.nan) for row in rows]
    for key, value in context.items():
        columns[key] = [value] * len(requests)
    return pa.table(columns)

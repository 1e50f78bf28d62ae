"""ROME as lga_dist computes it against ROME as its authors' code computes it, on a real model.

The reference is tests/reference_edit.py: compute_u / compute_v / rome_main written plainly, one
request and one sequence at a time. Everything else is the same for both: the model and its
weights, the context prefixes (lga_dist's, cached per model), C over the default corpus, the
hyper-parameters (ROME's GPT-J defaults), the tokenisation. Per request it prints, for lga_dist's
edit and for the reference with one step switched to another choice at a time (the choices
lga_dist's target optimisation made before it followed the reference; "all of them" is that
code), the relative difference of the target's delta and of dW from the reference's, their
cosine, ||delta||, the Adam steps taken and P(new | bare prompt) after the edit.

    python benchmarks/bench_reference_edits.py [--model smollm2-135m] [--layer 3] [--requests 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from reference_edit import Deviations, reference_rome  # noqa: E402

from lga_dist.answers import answer_logits, answer_nll, collate, encode_prompt_answer  # noqa: E402
from lga_dist.editing import Snapshot, apply_deltas  # noqa: E402
from lga_dist.editing.prepare import corpus_texts, edit_context  # noqa: E402
from lga_dist.editing.rome import RomeHyperParams, rome_each  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.models import DTYPES, load_model  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402

from benchmarks.tables import publish  # noqa: E402

SWITCHES = {field.name: field.name.replace("_", " ") for field in dataclasses.fields(Deviations)}


def p_new(loaded, request, name: str, delta: torch.Tensor) -> float:
    """P(target_new | the bare prompt), every answer token, with ``delta`` applied to module ``name``."""
    batch = collate([encode_prompt_answer(loaded.tokenizer, request.prompt, request.target_new)],
                    loaded.tokenizer.pad_token_id)
    snapshot = Snapshot(loaded.model, [name])
    apply_deltas(loaded.model, loaded.adapter, {name: delta})
    try:
        with torch.no_grad():
            nll = answer_nll(answer_logits(loaded.model, batch), batch)
    finally:
        snapshot.restore()
    return float(torch.exp(-nll * batch.answer_mask.sum()))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def measure(model: str, layer: int, n_requests: int, first: int, dtype: str, cov_tokens: int) -> list[dict]:
    loaded = load_model(model, dtype=DTYPES[dtype])
    requests = read_requests([str(demo_requests_path())]).requests[first:first + n_requests]
    ctx = edit_context(loaded, corpus_texts(None, "text"), cov_tokens, None, torch.device("cpu"), progress=False)
    hparams = RomeHyperParams()
    name = loaded.adapter.mlp_out_name(layer)
    mom2 = ctx.second_moment(layer)
    ours = rome_each(ctx, requests, [layer], hparams)
    our_targets = ctx.targets(requests, name, hparams)
    variants = {"reference": Deviations(),
                **{f"reference, {label}": Deviations(**{switch: True}) for switch, label in SWITCHES.items()},
                "reference, all of them": Deviations(**{switch: True for switch in SWITCHES})}
    rows = []
    for index, request in enumerate(requests):
        runs = {label: reference_rome(loaded.model, loaded.tokenizer, loaded.adapter, request, ctx.prefixes, layer,
                                      hparams, mom2, deviations) for label, deviations in variants.items()}
        reference_dw, reference_target = runs["reference"]
        ours_dw = ours[index].deltas[name]
        entries = [("lga_dist", ours_dw, our_targets.delta[index], None)]
        entries += [(label, dw, target.delta, target.steps) for label, (dw, target) in runs.items()]
        for label, dw, delta, steps in entries:
            rows.append({"request": request.case_id, "variant": label,
                         "delta_rel_diff": relative(delta, reference_target.delta),
                         "delta_cosine": cosine(delta, reference_target.delta), "delta_norm": float(delta.norm()),
                         "dW_rel_diff": relative(dw, reference_dw), "dW_cosine": cosine(dw, reference_dw),
                         "steps": steps, "p_new_after": p_new(loaded, request, name, dw)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--first", type=int, default=500, help="index of the first shipped CounterFact request")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(args.model, args.layer, args.requests, args.first, args.dtype, args.cov_tokens)
    lines = [f"ROME on {args.model}, layer {args.layer}, {args.dtype}, {args.requests} shipped CounterFact requests "
             f"(from #{args.first}): lga_dist and variants against the reference loop", "",
             "| request | edit | delta rel. diff | delta cosine | norm delta | dW rel. diff | dW cosine | Adam steps "
             "| P(new) after |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        steps = "" if r["steps"] is None else r["steps"]
        lines.append(f"| {r['request']} | {r['variant']} | {r['delta_rel_diff']:.2e} | {r['delta_cosine']:.4f} | "
                     f"{r['delta_norm']:.2f} | {r['dW_rel_diff']:.2e} | {r['dW_cosine']:.4f} | {steps} | "
                     f"{r['p_new_after']:.3f} |")
    worst = max(r["dW_rel_diff"] for r in rows if r["variant"] == "lga_dist")
    publish(lines, args.markdown, {"model": args.model, "layer": args.layer, "requests": args.requests,
                                   "max_dW_rel_diff_lga_dist": float(f"{worst:.3g}")})


if __name__ == "__main__":
    main()

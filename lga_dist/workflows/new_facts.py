"""Requests the unedited model does not already predict, so that an edit's success is the edit's doing."""

from __future__ import annotations

from lga_dist.devices import resolve_device
from lga_dist.evaluation import evaluate_requests
from lga_dist.io.requests import EditRequest
from lga_dist.models import DTYPES, load_model

NEW_FACTS_ONLY_HELP = ("keep only requests the unedited model does not already predict (its P(true) > P(new) on the "
                       "rewrite prompt), as the papers' studies do; evaluates them with the whole model in this "
                       "process first, so for models that need the actors to fit, filter the request file beforehand")


def not_yet_known(model: str, requests: list[EditRequest], wanted: int, dtype: str,
                  device: str = "auto") -> list[EditRequest]:
    """The first ``wanted`` requests the unedited model does not already answer with the new target
    (efficacy 0: P(true) > P(new) on the rewrite prompt), so an edit's success is the edit's doing."""
    device = resolve_device(device)
    return unknown_to(load_model(model, dtype=DTYPES[dtype], device=device), requests, wanted, device)


def unknown_to(loaded, requests: list[EditRequest], wanted: int, device) -> list[EditRequest]:
    """``not_yet_known`` with the model already loaded (``load_model``'s result)."""
    kept: list[EditRequest] = []
    for start in range(0, len(requests), 64):
        chunk = requests[start:start + 64]
        rows = evaluate_requests(loaded.model, loaded.tokenizer, chunk, device)
        kept += [request for request, row in zip(chunk, rows) if row["ES"] == 0.0]
        if len(kept) >= wanted:
            break
    print(f"{len(kept[:wanted])} requests the unedited model does not already predict (of the first "
          f"{min(len(requests), start + 64)} read)")
    return kept[:wanted]

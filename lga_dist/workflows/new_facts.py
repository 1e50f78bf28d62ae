"""Requests the unedited model does not already predict, so that an edit's success is the edit's doing."""

from __future__ import annotations

import json

from lga_dist.config import ConfigError
from lga_dist.devices import resolve_device
from lga_dist.evaluation import evaluate_requests
from lga_dist.io.requests import EditRequest, requests_hash
from lga_dist.io.storage import atomic_write, exists, open_file, storage_errors
from lga_dist.models import DTYPES, load_model

NEW_FACTS_ONLY_HELP = ("keep only requests the unedited model does not already predict (its P(true) > P(new) on the "
                       "rewrite prompt), as the papers' studies do; evaluates them with the whole model in this "
                       "process first, so for models that need the actors to fit, filter the request file beforehand; "
                       "the selection is kept in OUT/new_facts.json, and a resumed run edits the same requests")


def not_yet_known(model: str, requests: list[EditRequest], wanted: int, dtype: str,
                  device: str = "auto", record: str | None = None) -> list[EditRequest]:
    """The first ``wanted`` requests the unedited model does not already answer with the new target
    (efficacy 0: P(true) > P(new) on the rewrite prompt), so an edit's success is the edit's doing.

    With ``record`` (a JSON path) the selection is written there and, when the same model, dtype, request set
    and count ask again, read back instead of evaluated: bfloat16 kernels round differently on other CPUs and
    GPUs, so a borderline fact can flip, and a study resumed on another machine would otherwise edit another
    request set than its finished tasks did (and be refused)."""
    key = {"model": model, "dtype": dtype, "wanted": wanted, "requests": requests_hash(requests)}
    if record is not None and exists(record):
        kept = _recorded(record, key, requests)
        if kept is not None:
            print(f"{len(kept)} requests the unedited model does not already predict, as selected before ({record})")
            return kept
    device = resolve_device(device)
    kept = unknown_to(load_model(model, dtype=DTYPES[dtype], device=device), requests, wanted, device)
    if record is not None:
        with atomic_write(record, "w") as handle:
            json.dump({**key, "case_ids": [str(r.case_id) for r in kept]}, handle, indent=1)
    return kept


def _recorded(record: str, key: dict, requests: list[EditRequest]) -> list[EditRequest] | None:
    """The recorded selection out of ``requests``, in its order; None when it was made for other inputs."""
    with storage_errors(record), open_file(record, "rb") as handle:
        recorded = json.load(handle)
    if {name: recorded.get(name) for name in key} != key:
        return None
    by_id = {str(r.case_id): r for r in requests}
    missing = [case for case in recorded["case_ids"] if case not in by_id]
    if missing or len(by_id) != len(requests):
        raise ConfigError(f"{record}: the recorded selection does not match the requests read (missing case ids "
                          f"{missing[:5]}, or case ids repeated); delete it to select again")
    return [by_id[case] for case in recorded["case_ids"]]


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

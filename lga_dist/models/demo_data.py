"""The CounterFact subset the package ships for its embedded default.

The demo fact model learns these facts, ranking defaults to them as its proxy
set, and the editing demos rewrite them. ``make_demo_subset`` is how the shipped
file was made from the full CounterFact train split, so its provenance can be
checked (tests do when ../shared/data is present).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from lga_dist.requests import EditRequest, read_requests

DEMO_FILE = "counterfact_demo.json"
DEMO_FACTS = 1000


def demo_requests_path() -> Path:
    return Path(str(resources.files("lga_dist") / "data" / DEMO_FILE))


def load_demo_requests() -> list[EditRequest]:
    return read_requests(str(demo_requests_path())).requests


def make_demo_subset(counterfact_json: str, n_facts: int = DEMO_FACTS) -> list[dict]:
    """The first ``n_facts`` valid, non-conflicting flat CounterFact records by case id, one per subject.

    One fact per subject keeps the facts independent: editing one never rewrites
    another shipped fact about the same subject.
    """
    valid = {r.case_id for r in read_requests(counterfact_json).requests}
    with open(counterfact_json, encoding="utf-8") as handle:
        records = json.load(handle)
    chosen, subjects = [], set()
    for record in sorted(records, key=lambda r: int(r["case_id"])):
        if str(record["case_id"]) in valid and record["subject"] not in subjects:
            chosen.append(record)
            subjects.add(record["subject"])
        if len(chosen) == n_facts:
            break
    return chosen


def write_demo_subset(counterfact_json: str, out: str, n_facts: int = DEMO_FACTS) -> None:
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(make_demo_subset(counterfact_json, n_facts), handle, indent=1, ensure_ascii=False)
        handle.write("\n")

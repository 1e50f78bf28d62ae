"""The CounterFact subset the package ships for its embedded default.

The demo fact model learns these facts, ranking defaults to them as its proxy
set, and the editing demos rewrite them. Beside them ships a small support set:
for every new target no demo fact has as its true answer, one more CounterFact
fact that does, so the demo model can say every word an edit asks for (as any
real LM can). ``make_demo_subset`` and ``make_demo_support`` are how the shipped
files were made from the full CounterFact train split, so their provenance can
be checked (tests do when ../shared/data is present).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from lga_dist.io.requests import EditRequest, read_requests

DEMO_FILE = "counterfact_demo.json"
SUPPORT_FILE = "counterfact_demo_support.json"
DEMO_FACTS = 1000


def demo_requests_path() -> Path:
    return Path(str(resources.files("lga_dist") / "data" / DEMO_FILE))


def demo_support_path() -> Path:
    return Path(str(resources.files("lga_dist") / "data" / SUPPORT_FILE))


def load_demo_requests() -> list[EditRequest]:
    return read_requests(str(demo_requests_path())).requests


def load_demo_support() -> list[EditRequest]:
    return read_requests(str(demo_support_path())).requests


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


def make_demo_support(counterfact_json: str, facts: list[dict]) -> list[dict]:
    """For each new target of ``facts`` that none of them has as a true answer, the first valid record
    (by case id, a subject not seen yet) whose true answer it is; targets CounterFact train lacks stay
    uncovered."""
    answers = {f["ground_truth"] for f in facts} | {f["locality_ground_truth"] for f in facts}
    wanted = {f["target_new"] for f in facts} - answers
    valid = {r.case_id for r in read_requests(counterfact_json).requests}
    subjects = {f["subject"] for f in facts}
    with open(counterfact_json, encoding="utf-8") as handle:
        records = json.load(handle)
    chosen: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: int(r["case_id"])):
        answer = record["ground_truth"]
        if answer in wanted and answer not in chosen and str(record["case_id"]) in valid \
                and record["subject"] not in subjects:
            chosen[answer] = record
            subjects.add(record["subject"])
    return sorted(chosen.values(), key=lambda r: int(r["case_id"]))


def _write_json(records: list[dict], out: str) -> None:
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1, ensure_ascii=False)
        handle.write("\n")


def write_demo_files(counterfact_json: str, out_dir: str, n_facts: int = DEMO_FACTS) -> None:
    """Regenerate both shipped files from CounterFact train."""
    facts = make_demo_subset(counterfact_json, n_facts)
    _write_json(facts, str(Path(out_dir) / DEMO_FILE))
    _write_json(make_demo_support(counterfact_json, facts), str(Path(out_dir) / SUPPORT_FILE))

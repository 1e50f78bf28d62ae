"""Edit-request readers: every format and container, every rejection reason, nothing lost."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lga_dist.io.requests import EditRequest, RequestError, convert, read_requests
from lga_dist.io.requests.formats import RecordError


def flat(i: int, **changes) -> dict:
    record = {"case_id": i, "prompt": f"The capital of Land{i} is", "subject": f"Land{i}",
              "target_new": f"Newtown{i}", "ground_truth": f"Oldtown{i}",
              "rephrase_prompt": f"Land{i}'s capital city is", "locality_prompt": f"The capital of Other{i} is",
              "locality_ground_truth": f"Othertown{i}"}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not DROP}


def nested(i: int, **rewrite_changes) -> dict:
    rewrite = {"prompt": "The capital of {} is", "subject": f"Land{i}", "relation_id": "P36",
               "target_new": {"str": f"Newtown{i}", "id": "Q1"}, "target_true": {"str": f"Oldtown{i}", "id": "Q2"}}
    rewrite.update(rewrite_changes)
    return {"case_id": i, "requested_rewrite": {k: v for k, v in rewrite.items() if v is not DROP},
            "paraphrase_prompts": [f"Land{i}'s capital city is"],
            "neighborhood_prompts": [f"The capital of Other{i} is", f"Other{i} has its capital in"],
            "attribute_prompts": [], "generation_prompts": []}


def zsre(i: int, **changes) -> dict:
    record = {"subject": f"Land{i}", "src": f"What is the capital of Land{i}?", "pred": f"Oldtown{i}",
              "rephrase": f"Which city is the capital of Land{i}?", "alt": f"Newtown{i}",
              "answers": [f"Oldtown{i}"], "loc": f"nq question: who wrote book {i}", "loc_ans": f"Author{i}",
              "cond": "x"}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not DROP}


DROP = object()

# (record, expected reason) for every per-record rule, in every format.
BROKEN = [
    (flat(101, prompt=DROP), "missing_field"),
    (flat(102, target_new=7), "wrong_type"),
    (flat(103, case_id=[1]), "wrong_type"),
    (flat(104, target_new="  "), "empty_target"),
    (flat(105, target_new="Oldtown105"), "target_equals_true"),
    (flat(106, subject="Atlantis"), "subject_not_in_prompt"),
    (flat(107, rephrase_prompt=["ok", 3]), "wrong_type"),
    (nested(201, prompt="The capital of Land201 is"), "subject_not_in_prompt"),
    (nested(202, target_new={"str": ""}), "empty_target"),
    (nested(203, target_new=DROP), "missing_field"),
    (nested(204, target_true={"str": "Newtown204"}), "target_equals_true"),
    ({"case_id": 205, "requested_rewrite": "not an object", "neighborhood_prompts": []}, "wrong_type"),
    (zsre(301, src=DROP), "missing_field"),
    (zsre(302, answers="Oldtown302"), "wrong_type"),
    (zsre(303, alt="oldtown303"), "target_equals_true"),
    (zsre(304, subject="Nowhere"), "subject_not_in_prompt"),
    (zsre(305, loc_ans=DROP), "missing_field"),
    ({"hello": "world"}, "unknown_format"),
    (["a", "list"], "not_a_record"),
]
VALID = [flat(1), flat(2), nested(3), nested(4), zsre(5), zsre(6)]


def expected_valid_ids() -> set[str]:
    return {convert(r, "t").case_id for r in VALID}


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reasons_of(quarantine: Path) -> collections.Counter:
    return collections.Counter(json.loads(line)["reason"] for line in quarantine.read_text().splitlines())


def interleave() -> list:
    records = []
    for i, (broken, _) in enumerate(BROKEN):
        records.append(broken)
        if i < len(VALID):
            records.append(VALID[i])
    return records


# --- conversion --------------------------------------------------------------------------------------------------

def test_each_format_converts_to_the_same_request():
    a, b, c = convert(flat(7), "x"), convert(nested(7), "x"), convert(zsre(7), "x")
    for request in (a, b, c):
        assert request.subject == "Land7" and request.target_new == "Newtown7" and request.target_true == "Oldtown7"
        assert "Land7" in request.prompt
    assert a.prompt == b.prompt == "The capital of Land7 is"
    assert a.template == "The capital of {} is" and a.template.format(a.subject) == a.prompt
    assert b.neighborhood_answers == ("Oldtown7", "Oldtown7") and b.relation_id == "P36"
    assert a.neighborhood_prompts == ("The capital of Other7 is",) and a.neighborhood_answers == ("Othertown7",)
    assert c.neighborhood_answers == ("Author7",) and c.paraphrase_prompts == ("Which city is the capital of Land7?",)
    assert c.case_id.startswith("zsre-") and c.case_id == convert(zsre(7), "y").case_id
    assert (a.source_format, b.source_format, c.source_format) == ("counterfact_flat", "counterfact_nested", "zsre")


def test_template_escapes_braces():
    request = convert(flat(8, prompt="In {braces} Land8 is", rephrase_prompt=DROP), "x")
    assert request.template.format(request.subject) == request.prompt


def test_round_trip_through_dict():
    request = convert(nested(9), "x")
    assert EditRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


@pytest.mark.parametrize("record,reason", BROKEN, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BROKEN)])
def test_every_broken_record_has_its_reason(record, reason):
    with pytest.raises(RecordError) as err:
        convert(record, "x")
    assert err.value.reason == reason


# --- containers: broken records are quarantined, nothing valid is lost ----------------------------------------------

@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_broken_records_in_json_containers(tmp_path, container):
    records = interleave()
    path = (write_json if container == "json" else write_jsonl)(tmp_path / f"in.{container}", records)
    quarantine = tmp_path / "q.jsonl"
    result = read_requests(str(path), quarantine=str(quarantine))
    assert {r.case_id for r in result.requests} == expected_valid_ids()
    assert reasons_of(quarantine) == collections.Counter(reason for _, reason in BROKEN)
    assert result.read == len(records) == len(result.requests) + len(result.rejections)
    first = json.loads(quarantine.read_text().splitlines()[0])
    # the first record is record 1 in either container (JSON arrays used to count from 0, lines from 1)
    assert first["source"] == str(path) and first["location"].startswith("record 1 (line ")
    assert first["record"] == json.loads(json.dumps(BROKEN[0][0]))


def test_truncated_json_keeps_everything_before_the_cut(tmp_path):
    text = json.dumps([flat(1), flat(2), flat(3)], indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('"case_id": 3') + 20])
    result = read_requests(str(path), quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["1", "2"]
    assert result.by_reason == {"truncated_json": 1}
    assert '"case_id": 3' in json.loads((tmp_path / "q.jsonl").read_text())["raw"]


def test_syntax_error_mid_array_resumes_at_next_record(tmp_path):
    good = [json.dumps(flat(i)) for i in (1, 2, 4)]
    broken = json.dumps(flat(3)).replace('"prompt":', '"prompt"')  # missing colon
    path = tmp_path / "bad.json"
    path.write_text("[\n" + ",\n".join([good[0], good[1], broken, good[2]]) + "\n]\n")
    result = read_requests(str(path), quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["1", "2", "4"]
    assert result.by_reason == {"invalid_json": 1}
    assert "Land3" in json.loads((tmp_path / "q.jsonl").read_text())["raw"]


def test_missing_separator_between_records(tmp_path):
    path = tmp_path / "sep.json"
    path.write_text("[" + json.dumps(flat(1)) + " " + json.dumps(flat(2)) + ", " + json.dumps(flat(3)) + "]")
    result = read_requests(str(path), quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["1", "3"]
    assert result.by_reason == {"invalid_json": 1}


@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_invalid_utf8_rejects_only_that_record(tmp_path, container):
    records = [flat(1), flat(2, prompt="The capital of Land2 is PLACEHOLDER"), flat(3)]
    raw = (json.dumps(records, indent=1) if container == "json" else "".join(json.dumps(r) + "\n" for r in records))
    data = raw.encode().replace(b"PLACEHOLDER", b"caf\xe9 \xff")
    path = tmp_path / f"latin1.{container}"
    path.write_bytes(data)
    result = read_requests(str(path), quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["1", "3"]
    assert result.by_reason == {"invalid_utf8": 1}


def test_invalid_json_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(flat(1)) + "\n{not json}\n\n" + json.dumps(flat(2)) + "\n" + json.dumps(flat(3))[:-5])
    result = read_requests(str(path), quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["1", "2"]
    assert result.by_reason == {"invalid_json": 2}
    locations = [json.loads(l)["location"] for l in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert locations == ["record 2 (line 2)", "record 4 (line 5)"]  # blank lines are not records


def parquet_rows() -> list[dict]:
    rows = [flat(i) for i in range(1, 6)]
    rows[1]["target_new"] = ""                     # empty_target
    rows[2]["subject"] = "Nowhere"                 # subject_not_in_prompt
    rows[3]["prompt"] = None                       # missing_field
    rows.append(dict(flat(6), case_id=1))          # duplicate_case_id
    rows.append(dict(flat(7), ground_truth="Newtown7"))  # target_equals_true
    return rows


def test_broken_rows_in_parquet(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(parquet_rows()), path)
    result = read_requests(str(path), quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["1", "5"]
    assert result.by_reason == {"duplicate_case_id": 1, "empty_target": 1, "missing_field": 1,
                                "subject_not_in_prompt": 1, "target_equals_true": 1}
    assert result.read == 7


def test_parquet_wrong_types_and_invalid_utf8(tmp_path):
    rows = [flat(1), flat(2)]
    table = pa.Table.from_pylist(rows)
    wrong = table.set_column(table.schema.get_field_index("target_new"), "target_new", pa.array([5, 6]))
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    binary = table.set_column(table.schema.get_field_index("prompt"), "prompt",
                              pa.array([b"The capital of Land1 is", b"\xff\xfe Land2"], type=pa.binary()))
    pq.write_table(binary, tmp_path / "binary.parquet")
    wrong_result = read_requests(str(tmp_path / "wrong.parquet"))
    assert wrong_result.by_reason == {"wrong_type": 2}
    binary_result = read_requests(str(tmp_path / "binary.parquet"))
    assert [r.case_id for r in binary_result.requests] == ["1"] and binary_result.by_reason == {"invalid_utf8": 1}


def test_truncated_parquet_is_quarantined_and_other_files_still_read(tmp_path):
    pq.write_table(pa.Table.from_pylist([flat(1), flat(2)]), tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    write_jsonl(tmp_path / "more.jsonl", [flat(3)])
    result = read_requests([str(tmp_path / "cut.parquet"), str(tmp_path / "more.jsonl")],
                           quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["3"]
    assert result.by_reason == {"unreadable_file": 1}


# --- rules across records ----------------------------------------------------------------------------------------

def test_duplicate_case_ids_across_files(tmp_path):
    write_json(tmp_path / "a.json", [flat(1), flat(2)])
    write_jsonl(tmp_path / "b.jsonl", [flat(2, prompt="Land2 borders", target_new="X", ground_truth="Y"), flat(3)])
    result = read_requests(str(tmp_path), quarantine=str(tmp_path / "out" / "q.jsonl"))
    assert [r.case_id for r in result.requests] == ["1", "2", "3"]
    assert result.by_reason == {"duplicate_case_id": 1}
    assert result.requests[1].target_new == "Newtown2"


@pytest.mark.parametrize("policy,kept", [("reject", ["1"]), ("last", ["1", "12"])])
def test_conflicting_targets(tmp_path, policy, kept):
    records = [flat(1), flat(10, prompt="The capital of Land2 is", subject="Land2", target_new="A"),
               flat(11, prompt="The capital of Land2 is", subject="Land2", target_new="B"),
               flat(12, prompt="The capital of Land2 is", subject="Land2", target_new="C")]
    path = write_json(tmp_path / "c.json", records)
    result = read_requests(str(path), on_conflict=policy, quarantine=str(tmp_path / "q.jsonl"))
    assert [r.case_id for r in result.requests] == kept
    assert result.by_reason == {"conflicting_target": 4 - len(kept)}
    # Quarantined as written (the input's own format), so a fixed copy reads back: give each its own subject.
    quarantined = [json.loads(line)["record"] for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert quarantined == [r for r in records if str(r["case_id"]) not in kept]
    fixed = [{**r, "prompt": f"The capital of Land{r['case_id']} is", "subject": f"Land{r['case_id']}"}
             for r in quarantined]
    again = read_requests(str(write_json(tmp_path / "fixed.json", fixed)))
    assert sorted(r.case_id for r in again.requests) == sorted(str(r["case_id"]) for r in quarantined)
    assert not again.rejections


def test_same_target_twice_is_not_a_conflict(tmp_path):
    path = write_json(tmp_path / "d.json", [flat(1), flat(2, prompt="The capital of Land1 is", subject="Land1",
                                                              target_new="Newtown1", ground_truth="Oldtown1")])
    assert len(read_requests(str(path)).requests) == 2


def test_format_override_and_errors(tmp_path):
    path = write_json(tmp_path / "z.json", [zsre(1)])
    forced = read_requests(str(path), format_name="counterfact_flat")
    assert forced.by_reason == {"missing_field": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(RequestError, match="no request files"):
        read_requests(str(tmp_path / "empty"))
    with pytest.raises(RequestError, match="unknown format"):
        read_requests(str(path), format_name="alpaca")


# --- the real benchmark data ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_counterfact_and_zsre(shared_data, tmp_path):
    counterfact = read_requests(str(shared_data / "counterfact" / "counterfact-train.json"),
                                quarantine=str(tmp_path / "cf.jsonl"))
    assert counterfact.read == 10_000
    assert counterfact.by_reason == {"conflicting_target": 133}  # CounterFact repeats some prompts with new targets
    assert len(counterfact.requests) == 9_867
    zs = read_requests(str(shared_data / "zsre" / "zsre_mend_train-1k.json"), quarantine=str(tmp_path / "z.jsonl"))
    assert zs.read == 1_000 and zs.by_reason == {"empty_target": 2, "target_equals_true": 17}
    request = next(r for r in zs.requests if r.subject == "UniFirst")
    assert (request.prompt, request.target_new, request.target_true) == (
        "What is the product made by UniFirst?", "unmanned aircraft", "uniform")


@pytest.mark.slow
def test_same_requests_from_every_container_and_nested_form(shared_data, tmp_path):
    records = json.loads((shared_data / "counterfact" / "counterfact-val.json").read_text())[:300]
    write_json(tmp_path / "a.json", records)
    write_jsonl(tmp_path / "b.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    as_nested = [{"case_id": r["case_id"], "requested_rewrite": {
        "prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
        "target_new": {"str": r["target_new"]}, "target_true": {"str": r["ground_truth"]}},
        "paraphrase_prompts": [r["rephrase_prompt"]], "neighborhood_prompts": []} for r in records]
    write_json(tmp_path / "d.json", as_nested)

    def key(result):
        return [(r.case_id, r.prompt, r.subject, r.target_new, r.target_true, r.paraphrase_prompts)
                for r in result.requests]

    results = [read_requests(str(tmp_path / name)) for name in ("a.json", "b.jsonl", "c.parquet", "d.json")]
    assert len(results[0].requests) == 300 - sum(results[0].by_reason.values())
    assert key(results[0]) == key(results[1]) == key(results[2]) == key(results[3])

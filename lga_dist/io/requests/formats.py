"""Record formats: flat CounterFact, nested CounterFact and MEND-style zsRE -> EditRequest.

Each converter checks what it reads and raises RecordError with a stable reason
code; the reason codes are what quarantine files and summaries count by.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from lga_dist.io.requests.schema import EditRequest

# Stable reason codes (scripts count by them).
INVALID_JSON = "invalid_json"
TRUNCATED_JSON = "truncated_json"
INVALID_UTF8 = "invalid_utf8"
NOT_A_RECORD = "not_a_record"
UNKNOWN_FORMAT = "unknown_format"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TARGET = "empty_target"
TARGET_EQUALS_TRUE = "target_equals_true"
SUBJECT_NOT_IN_PROMPT = "subject_not_in_prompt"
DUPLICATE_CASE_ID = "duplicate_case_id"
CONFLICTING_TARGET = "conflicting_target"
UNREADABLE_FILE = "unreadable_file"

FORMATS = ("counterfact_flat", "counterfact_nested", "zsre")


class RecordError(ValueError):
    """A record that cannot become an EditRequest; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _has_bad_unicode(text: str) -> bool:
    """Lone surrogates come from undecodable bytes (surrogateescape) or bad \\u escapes."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _text(record: dict, key: str, *, required: bool = True, where: str = "") -> str | None:
    name = f"{where}{key}"
    if key not in record or record[key] is None:
        if required:
            raise RecordError(MISSING_FIELD, f"field {name!r} is missing")
        return None
    value = record[key]
    if isinstance(value, bytes):  # Parquet binary columns
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecordError(INVALID_UTF8, f"field {name!r} is not valid UTF-8 (byte {err.start})") from err
    if not isinstance(value, str):
        raise RecordError(WRONG_TYPE, f"field {name!r} must be a string, got {type(value).__name__}")
    if _has_bad_unicode(value):
        raise RecordError(INVALID_UTF8, f"field {name!r} is not valid UTF-8")
    return value


def _texts(record: dict, key: str, where: str = "") -> tuple[str, ...]:
    """An optional field holding one string or a list of strings."""
    value = record.get(key)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise RecordError(WRONG_TYPE, f"field {where}{key!r} must be a string or a list of strings")
    if any(_has_bad_unicode(v) for v in items):
        raise RecordError(INVALID_UTF8, f"field {where}{key!r} is not valid UTF-8")
    return tuple(v for v in items if v.strip())


def _case_id(record: dict) -> str:
    if "case_id" not in record or record["case_id"] is None:
        raise RecordError(MISSING_FIELD, "field 'case_id' is missing")
    value = record["case_id"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise RecordError(WRONG_TYPE, f"field 'case_id' must be an integer or a non-empty string, got {value!r}")
    return str(value).strip()


def _relation(value: Any) -> str | None:
    return None if value is None else str(value)


def from_counterfact_flat(record: dict, source: str) -> EditRequest:
    """KnowEdit/EasyEdit flat CounterFact: prompt, subject, target_new, ground_truth, ..."""
    neighborhood = _texts(record, "locality_prompt")
    answers = _texts(record, "locality_ground_truth")
    if len(answers) == 1 and len(neighborhood) > 1:
        answers = answers * len(neighborhood)
    if len(answers) != len(neighborhood):
        raise RecordError(WRONG_TYPE, "locality_prompt and locality_ground_truth differ in length")
    return EditRequest(
        case_id=_case_id(record),
        prompt=_text(record, "prompt"),
        subject=_text(record, "subject"),
        target_new=_text(record, "target_new"),
        target_true=_text(record, "ground_truth"),
        paraphrase_prompts=_texts(record, "rephrase_prompt"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=answers,
        relation_id=_relation(record.get("relation_id")),
        source_format="counterfact_flat",
        source=source,
    )


def to_counterfact_flat(request: EditRequest) -> dict:
    """The inverse of ``from_counterfact_flat``: how a job writes a request set others can read back."""
    return {"case_id": request.case_id, "prompt": request.prompt, "subject": request.subject,
            "target_new": request.target_new, "ground_truth": request.target_true,
            "rephrase_prompt": list(request.paraphrase_prompts),
            "locality_prompt": list(request.neighborhood_prompts),
            "locality_ground_truth": list(request.neighborhood_answers), "relation_id": request.relation_id}


def _answer(rewrite: dict, key: str) -> str:
    value = rewrite.get(key)
    if value is None:
        raise RecordError(MISSING_FIELD, f"field 'requested_rewrite.{key}' is missing")
    if isinstance(value, dict):
        return _text(value, "str", where=f"requested_rewrite.{key}.")
    if isinstance(value, str):
        return _text(rewrite, key, where="requested_rewrite.")
    raise RecordError(WRONG_TYPE, f"field 'requested_rewrite.{key}' must be {{'str': ...}} or a string")


def from_counterfact_nested(record: dict, source: str) -> EditRequest:
    """Original CounterFact (Meng et al.): requested_rewrite with a '{}' prompt template."""
    rewrite = record.get("requested_rewrite")
    if rewrite is None:
        raise RecordError(MISSING_FIELD, "field 'requested_rewrite' is missing")
    if isinstance(rewrite, list) and len(rewrite) == 1:
        rewrite = rewrite[0]
    if not isinstance(rewrite, dict):
        raise RecordError(WRONG_TYPE, "field 'requested_rewrite' must be an object")
    template = _text(rewrite, "prompt", where="requested_rewrite.")
    subject = _text(rewrite, "subject", where="requested_rewrite.")
    if "{}" not in template:
        raise RecordError(SUBJECT_NOT_IN_PROMPT, "requested_rewrite.prompt has no '{}' for the subject")
    target_true = _answer(rewrite, "target_true")
    neighborhood = _texts(record, "neighborhood_prompts")
    return EditRequest(
        case_id=_case_id(record),
        prompt=template.replace("{}", subject, 1),
        subject=subject,
        target_new=_answer(rewrite, "target_new"),
        target_true=target_true,
        paraphrase_prompts=_texts(record, "paraphrase_prompts"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=(target_true,) * len(neighborhood),
        relation_id=_relation(rewrite.get("relation_id")),
        source_format="counterfact_nested",
        source=source,
    )


def from_zsre(record: dict, source: str) -> EditRequest:
    """MEND-style zsRE: the edit is src -> alt; the old answer is answers[0] (else pred)."""
    answers = record.get("answers")
    if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
        raise RecordError(WRONG_TYPE, "field 'answers' must be a list of strings")
    if answers:
        target_true = answers[0]
        if _has_bad_unicode(target_true):
            raise RecordError(INVALID_UTF8, "field 'answers' is not valid UTF-8")
    else:
        target_true = _text(record, "pred")
    prompt = _text(record, "src")
    subject = _text(record, "subject")
    target_new = _text(record, "alt")
    if record.get("case_id") is not None:
        case_id = _case_id(record)
    else:
        key = f"{subject}\x00{prompt}\x00{target_new}".encode("utf-8", "surrogatepass")
        case_id = "zsre-" + hashlib.sha1(key).hexdigest()[:12]
    loc = _text(record, "loc", required=False)
    loc_ans = _text(record, "loc_ans", required=False)
    if (loc is None) != (loc_ans is None):
        raise RecordError(MISSING_FIELD, "'loc' and 'loc_ans' must be given together")
    return EditRequest(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_texts(record, "rephrase"),
        neighborhood_prompts=(loc,) if loc else (),
        neighborhood_answers=(loc_ans,) if loc else (),
        relation_id=_relation(record.get("relation_id")),
        source_format="zsre",
        source=source,
    )


CONVERTERS: dict[str, Callable[[dict, str], EditRequest]] = {
    "counterfact_flat": from_counterfact_flat,
    "counterfact_nested": from_counterfact_nested,
    "zsre": from_zsre,
}

# Keys that identify each format; the format whose keys a record shares most wins.
SIGNATURES: dict[str, frozenset[str]] = {
    "counterfact_flat": frozenset({"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                                   "locality_prompt", "locality_ground_truth"}),
    "counterfact_nested": frozenset({"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                                     "attribute_prompts", "generation_prompts"}),
    "zsre": frozenset({"src", "alt", "answers", "rephrase", "loc", "loc_ans", "pred", "cond"}),
}


def detect_format(record: dict) -> str:
    """The format a record is written in, from the keys it has."""
    scores = {name: len(signature & record.keys()) for name, signature in SIGNATURES.items()}
    best = max(scores, key=scores.get)
    if scores[best] == 0:
        raise RecordError(UNKNOWN_FORMAT, f"keys {sorted(record)[:8]} match no known format ({', '.join(FORMATS)})")
    return best


def check_request(request: EditRequest) -> EditRequest:
    """Rules every request must pass whatever its format; returns it with answers trimmed."""
    if not request.prompt.strip():
        raise RecordError(MISSING_FIELD, "prompt is empty")
    if not request.subject.strip():
        raise RecordError(MISSING_FIELD, "subject is empty")
    target_new, target_true = request.target_new.strip(), request.target_true.strip()
    if not target_new:
        raise RecordError(EMPTY_TARGET, "target_new is empty")
    if not target_true:
        raise RecordError(EMPTY_TARGET, "the true answer is empty")
    if target_new.casefold() == target_true.casefold():
        raise RecordError(TARGET_EQUALS_TRUE, f"target_new equals the true answer ({target_new!r})")
    if request.subject not in request.prompt:
        raise RecordError(SUBJECT_NOT_IN_PROMPT, f"subject {request.subject!r} does not occur in the prompt")
    answers = tuple(a.strip() for a in request.neighborhood_answers)
    if any(not a for a in answers):
        raise RecordError(EMPTY_TARGET, "a neighborhood answer is empty")
    return EditRequest(**{**request.__dict__, "prompt": request.prompt.rstrip(), "target_new": target_new,
                          "target_true": target_true, "neighborhood_answers": answers})


def convert(record: Any, source: str, format_name: str | None = None) -> EditRequest:
    """One parsed record (from any container) to a checked EditRequest."""
    if not isinstance(record, dict):
        raise RecordError(NOT_A_RECORD, f"expected a JSON object, got {type(record).__name__}")
    name = format_name or detect_format(record)
    return check_request(CONVERTERS[name](record, source))

"""The one edit-request record every reader produces and every job consumes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """Rewrite ``subject``'s answer to ``prompt`` from ``target_true`` to ``target_new``.

    ``prompt`` is the full text with the subject in it; answers are stored without
    a leading space (tokenisers add it, as CounterFact evaluation does).
    Neighborhood prompts are about other subjects; their answers must not change.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    relation_id: str | None = None
    source_format: str = "counterfact_flat"
    source: str = ""

    @property
    def template(self) -> str:
        """The prompt with its first subject occurrence replaced by ``{}`` (ROME/MEMIT's form)."""
        def escape(text: str) -> str:
            return text.replace("{", "{{").replace("}", "}}")

        index = self.prompt.index(self.subject)
        return escape(self.prompt[:index]) + "{}" + escape(self.prompt[index + len(self.subject):])

    @property
    def conflict_key(self) -> tuple[str, str]:
        """Two requests with this key and different targets contradict each other."""
        return (self.subject, self.prompt)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditRequest":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        for key in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


def requests_hash(requests: Iterable[EditRequest]) -> str:
    """A stable hash of a request set (order-independent), recorded in every output it produced."""
    digest = hashlib.sha256()
    for line in sorted(json.dumps(r.to_dict() | {"source": ""}, sort_keys=True) for r in requests):
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]

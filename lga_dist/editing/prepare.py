"""Everything an edit needs besides the requests: the context prefixes, C's corpus and the hyper-parameters.

Shared by every command that edits (edit, validate-golden), so they read the
corpus, cache the statistics and parse ``--hparam`` the same way.
"""

from __future__ import annotations

import dataclasses

from lga_dist.config import ConfigError, coerce
from lga_dist.editing import METHODS, EditResult, Snapshot, apply_deltas
from lga_dist.editing.base import EditContext
from lga_dist.editing.context import context_prefixes
from lga_dist.editing.covariance import SecondMoments, load_corpus
from lga_dist.evaluation import evaluate_requests
from lga_dist.models.demo import training_text
from lga_dist.models.packaged import model_edit_hparams
from lga_dist.models.demo_data import DEMO_FACTS


def corpus_texts(corpus: str | None, column: str) -> list[str]:
    """The text C = E[k k^T] is taken over: ``corpus`` if given, else the shipped CounterFact facts as sentences.

    The default is offline everywhere: every "prompt answer" of the 1,000 shipped CounterFact facts and
    their support facts (true answers; rewrite, paraphrase and neighborhood prompts), about 3,300 short
    encyclopedic sentences. MEMIT's recipe used Wikipedia, which a machine without a hub does not have;
    pass --corpus with general text the model should keep working on when there is some.
    """
    if corpus:
        return load_corpus(corpus, column)
    return training_text(DEMO_FACTS)


def edit_context(loaded, texts: list[str], cov_tokens: int, stats_dir: str | None, device,
                 progress: bool) -> EditContext:
    """An EditContext whose C is cached per layer and computed when first needed (see ``SecondMoments``)."""
    mom2 = SecondMoments(loaded.model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, texts, cov_tokens,
                         stats_dir, device, progress)
    prefixes = context_prefixes(loaded.model, loaded.tokenizer, loaded.fingerprint, device=device)
    return EditContext(loaded.model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, prefixes, mom2, device)


def method_hparams(method: str, overrides: list[str], fact_token: str | None = None, model: str = ""):
    """The method's paper defaults, then the values measured for ``model`` (a --model value; the model
    registry's, for packaged models), then ``--hparam NAME=VALUE`` overrides (and --fact-token)."""
    cls = METHODS[method].hparams
    fields = [f.name for f in dataclasses.fields(cls)]
    values: dict = model_edit_hparams(model, method)
    if fact_token is not None and "fact_token" in fields:
        values["fact_token"] = fact_token
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields:
            raise ConfigError(f"--hparam {name}: {cls.__name__} has {', '.join(fields)}")
        values[name] = coerce(cls, name, value)
    return cls(**values)


def evaluate_alone(loaded, requests, results: list[EditResult], device) -> list[dict[str, float]]:
    """Each request's metrics with only its own edit applied; the weights are restored bit-exactly after each."""

    rows = []
    for request, result in zip(requests, results):
        snapshot = Snapshot(loaded.model, list(result.deltas))
        apply_deltas(loaded.model, loaded.adapter, result.deltas)
        try:
            rows += evaluate_requests(loaded.model, loaded.tokenizer, [request], device)
        finally:
            snapshot.restore()
    return rows

"""Where an edit reads and writes: subject token positions, context prefixes, and the keys k at a layer.

A fact is stored at the subject's last token (ROME's causal-tracing finding), so
keys and targets are read there. ROME and MEMIT average keys over the bare prompt
and a few short prefixes that the model itself generates, so an edit does not
depend on the prompt starting the text (each reference weighs them its own way:
``context_weights``); those prefixes are sampled once per model (seeded) and
cached, keyed by the model fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from lga_dist.io.requests import EditRequest
from lga_dist.io.storage import atomic_write, cache_root
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.tracing import forward_hooks, hidden_of

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


def subject_last_token(tokenizer, text: str, subject_end: int) -> int:
    """Index of the last token that starts before character ``subject_end`` of ``text``."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    candidates = [i for i, (begin, end) in enumerate(offsets) if end > begin and begin < subject_end]
    if not candidates:
        raise ValueError(f"no token of the subject in {text!r}")
    return candidates[-1]


@dataclasses.dataclass(frozen=True)
class SubjectText:
    """A prompt (possibly prefixed) and the token index of its subject's last token."""

    text: str
    subject_end: int  # character offset just past the subject


FACT_TOKENS = ("subject_last", "last")


def read_position(text: str, subject_start: int, subject: str, fact_token: str) -> SubjectText:
    """Where an edit reads and writes in ``text``: the subject's last token, or the text's last token."""
    if fact_token == "subject_last":
        return SubjectText(text, subject_start + len(subject))
    if fact_token == "last":
        return SubjectText(text, len(text))
    raise ValueError(f"unknown fact_token {fact_token!r}; choose from {FACT_TOKENS}")


def prefixed_prompts(request: EditRequest, prefixes: Sequence[str], fact_token: str = "subject_last"
                     ) -> list[SubjectText]:
    """The request's prompt after each context prefix ('' = the bare prompt), with the edit position."""
    start = request.prompt.index(request.subject)
    out = []
    for prefix in prefixes:
        lead = f"{prefix}. " if prefix else ""
        out.append(read_position(lead + request.prompt, len(lead) + start, request.subject, fact_token))
    return out


def prefixes_path(fingerprint: str, n_tokens: int = 10, seed: int = 0) -> Path:
    key = hashlib.sha256(json.dumps([fingerprint, n_tokens, seed, PREFIX_STARTS]).encode()).hexdigest()[:16]
    return cache_root() / "edit-contexts" / f"{key}.json"


def context_prefixes(model, tokenizer, fingerprint: str, *, n_tokens: int = 10, seed: int = 0,
                     device="cpu", recompute: bool = False) -> list[str]:
    """'' plus one sampled continuation of each of PREFIX_STARTS (ROME's recipe), cached per model."""
    path = prefixes_path(fingerprint, n_tokens, seed)
    if path.exists() and not recompute:
        return json.loads(path.read_text())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    prefixes = [""]
    with torch.no_grad():
        for start in PREFIX_STARTS:
            ids = tokenizer(start, return_tensors="pt").input_ids.to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=True,
                                 top_k=5, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            prefixes.append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip())
    torch.random.set_rng_state(generator_state)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(str(path), "w") as handle:
        json.dump(prefixes, handle)
    return prefixes


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


CONTEXT_AVERAGES = ("flat", "by_kind", "bare")


def context_weights(prefixes: Sequence[str], average: str) -> tuple[list[str], list[float]]:
    """The prefixes a read at the subject averages over, and their weights, as each reference reads:

    ``flat``     every prefixed prompt equally (ROME's compute_u: k*);
    ``by_kind``  the bare prompt and the mean over the generated prefixes, half each (MEMIT's and
                 AlphaEdit's compute_ks, whose context templates are [["{}"], [the generated ones]]);
    ``bare``     the prompt alone (ROME's target_init and denominator key, MEMIT's current z).
    """
    if average == "bare":
        return [""], [1.0]
    if average == "flat":
        return list(prefixes), [1.0 / len(prefixes)] * len(prefixes)
    if average == "by_kind":
        generated = [prefix for prefix in prefixes if prefix]
        if not generated:
            return [""], [1.0]
        return [""] + generated, [0.5] + [0.5 / len(generated)] * len(generated)
    raise ValueError(f"unknown context average {average!r}; choose from {CONTEXT_AVERAGES}")


@torch.no_grad()
def read_at_subject(model, tokenizer, adapter: Adapter, requests: Sequence[EditRequest], prefixes: Sequence[str],
                    module_name: str, read: str, device="cpu", batch_size: int = 64,
                    fact_token: str = "subject_last", average: str = "flat") -> torch.Tensor:
    """A module's input (``read='input'``) or output at each request's subject, averaged over the prefixed
    prompts as ``average`` says (``context_weights``).

    Returns (len(requests), dim), float64.
    """
    prefixes, weights = context_weights(prefixes, average)
    texts = [(i, t, w) for i, r in enumerate(requests)
             for t, w in zip(prefixed_prompts(r, prefixes, fact_token), weights)]
    module = get_module(model, module_name)
    captured: list[torch.Tensor] = []

    def hook(_module, args, output):
        captured.append((args[0] if read == "input" else hidden_of(output)).detach())

    total: torch.Tensor | None = None
    with forward_hooks([(module, hook)]):
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            ids, mask = _pad([tokenizer(t.text).input_ids for _, t, _ in chunk], tokenizer.pad_token_id)
            positions = torch.tensor([subject_last_token(tokenizer, t.text, t.subject_end) for _, t, _ in chunk])
            captured.clear()
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
            values = captured[0][torch.arange(len(chunk)), positions.to(device)].to("cpu", torch.float64)
            values = values * torch.tensor([w for _, _, w in chunk], dtype=torch.float64).unsqueeze(1)
            if total is None:
                total = torch.zeros((len(requests), values.shape[-1]), dtype=torch.float64)
            total.index_add_(0, torch.tensor([i for i, _, _ in chunk]), values)
    return total


@dataclasses.dataclass(frozen=True)
class PostNorm:
    """The RMS norm between an MLP's output projection and the residual stream: y = gain * o / sqrt(mean(o^2) + eps)."""

    gain: torch.Tensor  # (d,) float64, each family's own convention (Gemma's 1 + w) included
    eps: float


def norm_epsilon(norm) -> float:
    """The epsilon an RMS norm adds to mean(o^2); families name it ``eps`` or ``variance_epsilon``."""
    for attribute in ("eps", "variance_epsilon"):
        value = getattr(norm, attribute, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise TypeError(f"{type(norm).__name__} has no numeric eps or variance_epsilon: cannot invert it for MEMIT")


def mlp_post_norm(model, adapter: Adapter, layer: int) -> PostNorm | None:
    """The norm after layer ``layer``'s MLP output projection (Gemma 3's post_feedforward_layernorm), or
    None where the MLP writes straight into the residual stream.

    The gain is read by running the norm on a vector of ones (mean square 1), which each family's own
    convention (Gemma's 1 + w) passes through, and scaled by sqrt(1 + eps) to undo the epsilon.
    """
    name = adapter.mlp_post_norm_name(layer)
    if name is None:
        return None
    norm = get_module(model, name)
    eps = norm_epsilon(norm)
    with torch.no_grad():
        ones = torch.ones(1, norm.weight.shape[-1], dtype=norm.weight.dtype, device=norm.weight.device)
        gain = norm(ones)[0].to("cpu", torch.float64) * (1.0 + eps) ** 0.5
    return PostNorm(gain=gain, eps=eps)


def edit_keys(model, tokenizer, adapter: Adapter, requests: Sequence[EditRequest], prefixes: Sequence[str],
              layer: int, device="cpu", fact_token: str = "subject_last", average: str = "flat") -> torch.Tensor:
    """k: the input of layer ``layer``'s MLP output projection at the subject, (n, d_in) float64."""
    return read_at_subject(model, tokenizer, adapter, requests, prefixes, adapter.mlp_out_name(layer), "input",
                           device, fact_token=fact_token, average=average)

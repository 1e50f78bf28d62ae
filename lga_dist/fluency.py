"""Fluency: does the edited model still write varied text? ROME's and MEMIT's generation entropy.

For each prompt the model continues the text greedily for a fixed number of new tokens; the
prompt and its continuation are split into words and punctuation, and the text's entropy is
the weighted mean of its bigram and trigram entropies (bits; weights 2/3 and 4/3, as ROME's
``compute_n_gram_entropy``); a run's fluency is the mean over its prompts. A model that repeats
itself ("the the the ...") scores low: ROME reports that large updates collapse it.

Where this differs from the reference: the continuation is greedy (ROME samples with top-k 5),
so the figure is deterministic and a resumed bulk edit reproduces it; words are split with a
regular expression (``\\w+`` and single punctuation marks) where ROME uses NLTK's tokenizer, whose
model files are downloaded at run time.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch

from lga_dist.io.requests import EditRequest

NGRAMS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
SUBJECT_TEMPLATES = ("{} is", "Here is what I know about {}:")
GENERIC_PROMPTS = ("The weather today", "My favourite food is", "Once upon a time", "The history of the city",
                   "In the morning I")
NEW_TOKENS = 50
_WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORDS.findall(text)


def ngram_entropy(text: str) -> float:
    """Weighted mean of the text's bigram and trigram entropies, in bits (0 for a text too short for them)."""
    tokens = words(text)
    entropies = []
    for n, weight in zip(NGRAMS, NGRAM_WEIGHTS):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        entropies.append(weight * entropy)
    return sum(entropies) / len(entropies)


def fluency_prompts(requests: Sequence[EditRequest], subjects: int = 5) -> list[str]:
    """A run's fixed prompts: the first ``subjects`` requests' subjects in neutral templates, then generic ones."""
    chosen = list(dict.fromkeys(r.subject for r in requests))[:subjects]
    return [template.format(subject) for subject in chosen for template in SUBJECT_TEMPLATES] + list(GENERIC_PROMPTS)


@torch.no_grad()
def continuations(model, tokenizer, prompts: Sequence[str], device="cpu", new_tokens: int = NEW_TOKENS,
                  synced: bool = False) -> list[str]:
    """Each prompt followed by exactly ``new_tokens`` greedy tokens, decoded. ``synced``: the model is one rank
    of a ZeRO-3 group (its forward passes are collectives; every rank must generate the same number of steps,
    which the fixed length guarantees given the same number of prompts)."""
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    generated = model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


def entropies(model, tokenizer, prompts: Sequence[str], device="cpu", new_tokens: int = NEW_TOKENS,
              synced: bool = False) -> list[float]:
    """The n-gram entropy of each prompt's greedy continuation (prompt included, as ROME computes it)."""
    return [ngram_entropy(text) for text in continuations(model, tokenizer, prompts, device, new_tokens, synced)]

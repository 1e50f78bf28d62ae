"""Fluency as ROME/MEMIT define it (weighted bigram and trigram entropy), checked on texts worked out by hand."""

from __future__ import annotations

import math

import pytest

from lga_dist.fluency import fluency_prompts, ngram_entropy, words
from lga_dist.models.demo import demo_facts


def test_ngram_entropy_by_hand():
    # "a b a b a": bigrams ab, ba, ab, ba (two kinds, equally often: 1 bit); trigrams aba, bab, aba (2/3, 1/3)
    trigram = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b a") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * trigram) / 2)
    # a text that repeats one word has no n-gram variety at all; six distinct words: log2(5) and log2(4) bits
    assert ngram_entropy("the the the the the the") == 0.0
    assert ngram_entropy("one two three four five six") == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * 2.0) / 2)
    assert ngram_entropy("hi") == 0.0  # too short for a bigram
    assert words("Paris, France.") == ["Paris", ",", "France", "."]


def test_fluency_prompts_are_fixed_by_the_run():
    requests = demo_facts(10)
    prompts = fluency_prompts(requests, subjects=3)
    assert prompts == fluency_prompts(requests, subjects=3) and len(prompts) == 3 * 2 + 5
    assert prompts[0] == f"{requests[0].subject} is"

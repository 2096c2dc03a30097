"""ROME's fluency metric (n-gram entropy), by hand on texts whose n-gram counts are known."""

from __future__ import annotations

import math

import pytest

from meminject.fluency import ngram_entropy, words


def _h(*counts: int) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_words_split_punctuation_from_words():
    assert words("Paris, France.  It is") == ["Paris", ",", "France", ".", "It", "is"]


def test_entropy_of_an_alternating_text():
    # a b a b a b: bigrams ab ×3, ba ×2; trigrams aba ×2, bab ×2.
    expected = (2 / 3 * _h(3, 2) + 4 / 3 * _h(2, 2)) / 2
    assert ngram_entropy("a b a b a b") == pytest.approx(expected, abs=1e-12)


def test_entropy_of_distinct_words_is_the_log_of_the_ngram_count():
    text = " ".join(f"w{i}" for i in range(10))  # 9 distinct bigrams, 8 trigrams
    expected = (2 / 3 * math.log2(9) + 4 / 3 * math.log2(8)) / 2
    assert ngram_entropy(text) == pytest.approx(expected, abs=1e-12)


def test_repetition_scores_lower_than_varied_text():
    looping = "is is is is is is is is is is"
    varied = "the capital of the country is a city on a river"
    assert ngram_entropy(looping) == 0.0
    assert ngram_entropy(varied) > 2.5


@pytest.mark.parametrize("text", ["", "one", "   "])
def test_too_short_texts_have_no_ngrams(text):
    assert ngram_entropy(text) == 0.0

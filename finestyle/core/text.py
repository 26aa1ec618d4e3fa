"""Texts that fit their text encoders' windows.

A CLIP text encoder reads 77 tokens (start and end included) and cuts the rest silently; SDXL has
two such encoders, each with its own tokenizer, and the world's builtins read 32. FineStyle's row
texts end with the style phrase ("…, in watercolor painting style"), so a long caption in front of
it pushes the style out of the window, and an adapter then trains on rows that never name its style.
These helpers count what each tokenizer keeps, fit a text by trimming the words that matter least,
and tell whether a phrase lies inside every window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def window(tokenizer: Any) -> int:
    """Tokens the encoder reads, start and end tokens included."""
    n = getattr(tokenizer, "model_max_length", None) or 77
    return int(min(n, 4096))  # transformers uses a huge sentinel when a tokenizer has no limit


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of `text` as the encoder would see it before truncation (start and end included)."""
    # verbose=False: counting past the window is the point here, not an indexing error to warn about
    return len(tokenizer(text, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])


def fits(tokenizers: list[Any], text: str) -> bool:
    """Whether every tokenizer keeps all of `text`."""
    return all(token_count(t, text) <= window(t) for t in tokenizers)


def phrase_in_window(tokenizers: list[Any], text: str, phrase: str) -> bool:
    """Whether the last occurrence of `phrase` in `text` lies inside every tokenizer's window (True
    when the text does not contain it: there is nothing to cut)."""
    at = text.lower().rfind(phrase.lower()) if phrase else -1
    if at < 0:
        return True
    return fits(tokenizers, text[: at + len(phrase)])


def trim_to_fit(
    tokenizers: list[Any], render: Callable[[list[str]], str], words: list[str], keep: int = 0
) -> int:
    """The most of `words` (a prefix, at least `keep`) for which `render(prefix)` fits every window.

    `render` places the words in the full text; fewer words never make it longer, so a binary search
    finds the longest prefix that fits. Returns that prefix's length (`keep` when even it does not fit).
    """
    if fits(tokenizers, render(words)):
        return len(words)
    lo, hi = keep, len(words) - 1  # the answer is in [keep, len - 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(tokenizers, render(words[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return lo

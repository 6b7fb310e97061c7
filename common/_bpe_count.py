"""The first step of BPE training, pre-tokenize and count, alone in a module for the worker processes of
`BPETokenizer.train(..., workers=N)`.

It imports only `regex` and the standard library: a worker starts in a fraction of a second and never
loads torch (common/tokenizer.py imports common.checkpoint, which imports torch, ~500 MB per process).
"""

from collections import Counter

import regex

_splits = None              # (split, special_split) of this worker process, compiled once by `start_worker`


def compile_splits(pattern, special_tokens):
    """The chunk regex, and the regex that cuts the special-token strings out first (None without any)."""
    special_split = regex.compile("|".join(regex.escape(s) for s in special_tokens)) if special_tokens else None
    return regex.compile(pattern), special_split


def add_chunk_counts(texts, split, special_split, counts):
    """Add the chunks of each text in `texts` to `counts`; special-token strings are cut out, never counted.

    >>> add_chunk_counts(["the cat, the hat", "the"], regex.compile(r" ?\\w+|\\S"), None, Counter())
    Counter({'the': 2, ' cat': 1, ',': 1, ' the': 1, ' hat': 1})
    """
    for text in texts:
        for part in special_split.split(text) if special_split else [text]:
            counts.update(split.findall(part))
    return counts


def start_worker(pattern, special_tokens):
    global _splits
    _splits = compile_splits(pattern, special_tokens)


def count_in_worker(texts):
    """One task of the pool: the chunk counts of a batch of texts, sent back to the parent (a dict pickles
    smaller than the texts: 4 MB of Python sources hold ~27k unique chunks)."""
    return add_chunk_counts(texts, *_splits, Counter())

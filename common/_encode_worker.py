"""The worker of TokenCache's encoding pool (common/data.py): one tokenizer per process, text in, token ids
out as raw bytes. It imports tiktoken and numpy only, so that a worker process stays small."""

import unicodedata

import numpy as np
import tiktoken

_encoding, _dtype, _nfc = None, None, False


def start(name, pattern, ranks, special_tokens, dtype, nfc):
    """Pool initializer: build this process's tiktoken Encoding from our ranks once."""
    global _encoding, _dtype, _nfc
    _encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
    _dtype, _nfc = np.dtype(dtype), nfc


def encode(text):
    """The ids of `text` (special-token strings in it read as those tokens), as bytes of `dtype`."""
    if _nfc:
        text = unicodedata.normalize("NFC", text)
    if hasattr(_encoding, "encode_to_numpy"):     # tiktoken 0.7+: the ids as an array, no Python ints (~25% faster)
        return _encoding.encode_to_numpy(text, allowed_special="all").astype(_dtype).tobytes()
    return np.asarray(_encoding.encode(text, allowed_special="all"), dtype=_dtype).tobytes()


def encode_many(texts):
    """`encode` of each text: a batch of small pieces in one task."""
    return [encode(text) for text in texts]

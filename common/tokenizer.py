"""Byte-level BPE: trained here in seconds, encoded at tiktoken's speed.

Byte-pair encoding (Sennrich et al., 2016; byte-level as in GPT-2) starts from the 256 byte values and
repeatedly adds the most frequent adjacent pair as a new token:

    "aaabdaaabac"  ->  merge (a, a) = Z  ->  "ZabdZabac"  ->  merge (Z, a) = Y  ->  "YbdYbac"  ...

Two things make a real tokenizer out of that loop:

1. Pre-tokenization. The text is first split into chunks by a regex (GPT-4's pattern by default: words
   with their leading space, runs of up to 3 digits, punctuation, whitespace), and merges never cross a
   chunk boundary, so " the" and "the." can't fuse into one token.
2. Speed. Training counts each unique chunk once, keeps the pair counts up to date incrementally (a
   merge touches only the chunks that contain the pair) and pops the best pair from a heap, instead of
   re-counting the whole corpus after every merge. Encoding goes through a `tiktoken.Encoding` built
   from our own ranks (no download); `encode_reference` is the same algorithm in readable Python.

Training at scale. The merges learned from a sample are those of the whole corpus but for noise in the
rare ones, so a corpus of many GB trains its tokenizer on ~100 MB of it, passed as a generator of pieces
of a few MB. Memory holds one piece's chunks and the Counter of unique chunks (~260k in 100 MB of Python
sources); the merges need ~0.8 KB per unique chunk, so past `max_unique_chunks` the rarest are dropped
first. The counting can run in worker processes (`workers`), and `load_or_train(key=...)` finds the
trained file again by a name the caller gives the sample: a restart reads no corpus.

Token ids are ranks: ids 0..255 are the single bytes, 256.. the merges in the order they were learned,
and the special tokens (e.g. "<|endoftext|>") take the last ids. Encoding a chunk repeatedly merges the
adjacent pair whose concatenated bytes have the lowest rank, exactly as tiktoken does.
"""

import base64
import contextlib
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import time
import types
import unicodedata
from collections import Counter, defaultdict, deque
from pathlib import Path

import numpy as np
import regex
import tiktoken

from common import _bpe_count
from common.checkpoint import atomic_write_text, cache_dir

# GPT-2's split pattern (tiktoken's r50k_base) and GPT-4's (cl100k_base). The second keeps digits in
# groups of at most 3, does not merge letters across an apostrophe-less case change, and splits newlines
# from other whitespace; it is the default for the tokenizers we train.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# The special token that ends a document, by the name each family gives it (see BPETokenizer.eot_id).
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>")

FORMAT_NAME = "llm-from-scratch/bpe"
FORMAT_VERSION = 1


def documents_sha256(documents):
    """A digest of a list of documents, length-prefixed so that ["ab", "c"] and ["a", "bc"] differ."""
    digest = hashlib.sha256()
    for document in documents:
        encoded = document.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def count_pairs(ids, counts=None, weight=1):
    """Add the adjacent pairs of `ids` to `counts`, each `weight` times.

    >>> count_pairs([1, 2, 3, 1, 2])
    Counter({(1, 2): 2, (2, 3): 1, (3, 1): 1})
    """
    counts = Counter() if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] += weight
    return counts


def merge_pair(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair` in `ids` (left to right) by `new_id`.

    >>> merge_pair([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    """
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


# ------------------------------------------------------------------------------- training at scale
PROGRESS_SECONDS = 2.0       # train(log=...) reports at most this often
MAX_UNIQUE_CHUNKS = 400_000  # train merges at most this many unique chunks (~0.8 KB each, see drop_rare_chunks)
BATCH_BYTES = 1 << 20        # texts travel to the counting workers in batches of at least this many bytes


def counting_workers():
    """The `workers` a caller should count with: one per core but one, at most 8 (so 1 on 2 cores).

    Measured on 50 MB of Python sources: one process counts at ~7 MB/s (6.7 s of CPU). Two workers spend
    6.6 s between them and the parent 0.7 s adding up their Counters (~70 MB/s: about 8 workers keep it
    busy). On a 2-core machine that other jobs share, two workers were not reliably faster than one
    (18-29 s against 17-35 s wall), hence the core left to the parent and to everything else.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def utf8_size(text):
    """len(text.encode("utf-8")), without encoding an ASCII text (str.isascii() is a flag, not a scan)."""
    if not isinstance(text, str):
        raise TypeError(f"a tokenizer trains on str texts, got a {type(text).__name__}")
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def count_chunks(texts, pattern, special_tokens=(), workers=1, log=None, total_bytes=None):
    """Step 1 of `BPETokenizer.train`: a Counter {chunk: how often it occurs} over `texts` (a str or an
    iterable of str, read once, piece by piece), in the order the chunks first occur.

    `log` gets a line every PROGRESS_SECONDS: 'tokenizer: counted 42.0/100.0 MB of text (9.1 MB/s),
    1,234,567 unique chunks' (the total only when `total_bytes` is given). With `workers` > 1, batches
    of consecutive texts are counted in that many processes and their Counters added up here in the
    order of the texts: the same Counter, key order included, as one process makes. A single str is one
    piece, counted in this process: a chunk may straddle any cut, so only the caller knows where to cut.
    Memory: the regex's list of one piece's chunks (~60 bytes a chunk, 1M chunks in 4 MB) plus the
    Counter; keep the pieces to a few MB.
    """
    if isinstance(texts, str):
        texts, workers = [texts], 1
    counts = Counter()
    counted, started = 0, time.perf_counter()
    reported = started

    def report(final=False):
        seconds = time.perf_counter() - started
        of_total = f"/{total_bytes / 1e6:.1f}" if total_bytes else ""
        log(f"tokenizer: counted {counted / 1e6:.1f}{of_total} MB of text "
            f"{f'in {seconds:.1f} s ' if final else ''}({counted / 1e6 / max(seconds, 1e-9):.1f} MB/s), "
            f"{len(counts):,} unique chunks")

    def counted_sizes():                         # the bytes of each piece, once its chunks are in `counts`
        if workers <= 1:
            splits = _bpe_count.compile_splits(pattern, special_tokens)
            for text in texts:
                size = utf8_size(text)
                _bpe_count.add_chunk_counts([text], *splits, counts)
                yield size
        else:
            for batch_counts, size in counts_from_workers(texts, pattern, special_tokens, workers):
                counts.update(batch_counts)
                yield size

    for size in counted_sizes():
        counted += size
        if log and time.perf_counter() - reported >= PROGRESS_SECONDS:
            reported = time.perf_counter()
            report()
    if log and reported > started:
        report(final=True)
    return counts


def counts_from_workers(texts, pattern, special_tokens, workers):
    """Yield (Counter, bytes) for consecutive batches of `texts`, in order, each counted by one of `workers`
    processes of a spawn pool. At most two batches per worker are in flight: a generator of pieces is read
    as fast as they are counted, never all at once.

    spawn, not fork: the parent has torch loaded and its OpenMP threads running, and a forked child
    inherits their locks in whatever state they were. The workers import common/_bpe_count.py only.
    """
    _bpe_count.compile_splits(pattern, special_tokens)      # a bad pattern fails here, not in each worker
    context = multiprocessing.get_context("spawn")
    with main_module_hidden():
        pool = context.Pool(workers, _bpe_count.start_worker, (pattern, tuple(special_tokens)))
    with pool:                                   # terminates the workers on the way out, error or not
        pending = deque()
        for batch, size in batches(texts, BATCH_BYTES):
            pending.append((pool.apply_async(_bpe_count.count_in_worker, (batch,)), size))
            if len(pending) >= 2 * workers:
                result, size = pending.popleft()
                yield result.get(), size
        while pending:
            result, size = pending.popleft()
            yield result.get(), size


def batches(texts, min_bytes):
    """Consecutive texts grouped into lists of at least `min_bytes` UTF-8 bytes (the last one may have
    fewer), each with its size.

    >>> list(batches(["ab", "c", "déf", "g"], 3))
    [(['ab', 'c'], 3), (['déf'], 4), (['g'], 1)]
    """
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += utf8_size(text)
        if size >= min_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


@contextlib.contextmanager
def main_module_hidden():
    """Start spawned processes without the parent's main script.

    A spawn (or forkserver) child first re-runs the parent's `__main__` file as `__mp_main__`, so that
    functions defined there unpickle: for a chapter's train.py that means importing torch and the model
    (~500 MB and seconds per worker) only to count chunks. The workers need nothing from it, so the
    processes start while `__main__` is an empty module, which tells them to skip it.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def drop_rare_chunks(chunk_counts, max_unique_chunks, log=None):
    """Bound the memory of the merges: keep in `chunk_counts` (in place) only the chunks seen at least
    `min_count` times, the smallest threshold that leaves at most `max_unique_chunks`; return `min_count`.

    An approximation: the dropped chunks are the rarest (seen once, then twice...), mostly names,
    numbers and typos, which would have added little to any pair's count. Whole count levels go
    together, so the result does not depend on the order of the text. The merges are then exact on
    what is left.

    >>> counts = Counter({"the": 5, "cat": 2, "sat": 2, "qz": 1, "xy": 1})
    >>> drop_rare_chunks(counts, 3), counts
    (2, Counter({'the': 5, 'cat': 2, 'sat': 2}))
    """
    chunks_seen = Counter(chunk_counts.values())  # count -> how many chunks were seen exactly that often
    kept, min_count = len(chunk_counts), 1
    for count in sorted(chunks_seen):
        if kept <= max_unique_chunks:
            break
        kept -= chunks_seen[count]
        min_count = count + 1
    dropped = [chunk for chunk, count in chunk_counts.items() if count < min_count]
    dropped_occurrences = sum(chunk_counts[chunk] for chunk in dropped)
    total = sum(chunk_counts.values())
    for chunk in dropped:
        del chunk_counts[chunk]
    if log:
        log(f"tokenizer: {len(chunk_counts) + len(dropped):,} unique chunks > max_unique_chunks="
            f"{max_unique_chunks:,}: dropped the {len(dropped):,} seen fewer than {min_count} times "
            f"({dropped_occurrences / max(total, 1):.2%} of the text's chunks); merging the other {len(chunk_counts):,}")
    return min_count


def read_json(path, what):
    """The JSON in `path`; a missing file is a FileNotFoundError and anything but JSON a ValueError, each
    naming the file as `what` ("tokenizer file", "tokenizer.json")."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a {what} (not valid JSON: {error})") from None


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Hugging Face `vocab.json` / `merges.txt` files spell tokens with these characters (a space is
    "Ġ", a newline "Ċ"); printable ASCII and Latin-1 bytes map to themselves.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


class BPETokenizer:
    """A byte-level BPE tokenizer: `ranks` (token bytes -> id), a split pattern and special tokens; and
    optionally a Unicode `normalizer` ("NFC", as Qwen's tokenizers) applied to the text before encoding."""

    def __init__(self, ranks, pattern=GPT4_SPLIT_PATTERN, special_tokens=None, name="bpe", normalizer=None):
        self.ranks = dict(ranks)                                  # bytes -> id (= merge priority)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})          # "<|endoftext|>" -> id
        self.name = name
        if normalizer not in (None, "NFC"):
            raise ValueError(f"normalizer must be None or 'NFC', got {normalizer!r}")
        self.normalizer = normalizer
        self.id_to_bytes = {i: b for b, i in self.ranks.items()}
        self.id_to_special = {i: s for s, i in self.special_tokens.items()}
        if len(self.id_to_bytes) != len(self.ranks):
            raise ValueError("two tokens share one id")
        if set(self.id_to_special) & set(self.id_to_bytes):
            raise ValueError("a special token shares its id with an ordinary token")
        self.vocab_size = max([*self.id_to_bytes, *self.id_to_special]) + 1
        self._split = regex.compile(pattern)
        self._special_split = (
            regex.compile("(" + "|".join(regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")")
            if self.special_tokens else None
        )
        # The fast path: tiktoken runs the same rank-based merge loop in Rust, with threads for batches.
        self._encoding = tiktoken.Encoding(
            name=f"llmfs-{name}", pat_str=pattern, mergeable_ranks=self.ranks, special_tokens=self.special_tokens
        )

    # ------------------------------------------------------------------------------------------ training
    @classmethod
    def train(cls, text, vocab_size, special_tokens=(), pattern=GPT4_SPLIT_PATTERN, verbose=False, name="bpe",
              log=None, workers=1, total_bytes=None, max_unique_chunks=MAX_UNIQUE_CHUNKS):
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text` (a str or an iterable of str).

        Ties between pairs with the same count go to the smallest pair of ids, (a, b) before (a, c)
        before (b, a): the heap orders entries by (-count, a, b), so training is deterministic.
        Special-token strings found in the text are cut out before counting: they are never learned
        as ordinary bytes.

        At scale (see `count_chunks`): `log` (print, say) reports the counting every PROGRESS_SECONDS
        ("counted 42.0/100.0 MB of text", out of `total_bytes` when given), then each tenth of the
        merges, when training takes that long; `workers` > 1 counts the pieces of an iterable in that
        many processes, with the same result. The memory of training grows with the number of unique
        chunks (~0.8 KB each, measured: 263k of Python sources 180 MB, 540k made-up words 410 MB); past
        `max_unique_chunks` the rarest are dropped (`drop_rare_chunks`, which logs it), an approximation
        that changes only the statistics of rare chunks. Up to the bound the merges are exact.
        """
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"duplicate special tokens in {special_tokens}")
        log = log or (print if verbose else None)

        # 1. Pre-tokenize and count each unique chunk once: a 1 MB text has ~250k chunks but ~25k unique.
        chunk_counts = count_chunks(text, pattern, special_tokens, workers=workers, log=log, total_bytes=total_bytes)
        if len(chunk_counts) > max_unique_chunks:
            drop_rare_chunks(chunk_counts, max_unique_chunks, log=log)
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]    # each chunk as byte ids
        freqs = list(chunk_counts.values())
        del chunk_counts

        # 2. Pair counts over all chunks, and for each pair the chunks where it occurs. `where` may also
        #    list chunks that lost the pair since, or list one twice: a merge skips those.
        pair_counts = Counter()
        where = defaultdict(list)
        for index, (word, freq) in enumerate(zip(words, freqs)):
            for pair, n in Counter(zip(word, word[1:])).items():
                pair_counts[pair] += n * freq
                where[pair].append(index)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        # 3. Merge the best pair, update only the chunks that contain it, repeat.
        ranks = {bytes([b]): b for b in range(256)}
        id_to_bytes = {b: bytes([b]) for b in range(256)}
        started, reported = time.perf_counter(), False        # (a training quicker than PROGRESS_SECONDS
        merges_done = 0                                        # logs no merge, and no summary)
        while merges_done < num_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg_count:
                # A count that fell since this entry was pushed: put the pair back with its count. (A count
                # that rises is pushed at once, so no entry is ever below its pair's count, and the entry
                # that comes out with its true count is the best pair.)
                if count:
                    heapq.heappush(heap, (-count, pair))
                continue
            token = id_to_bytes[pair[0]] + id_to_bytes[pair[1]]
            if token in ranks:
                # The same bytes were already made by another pair, e.g. (ab, c) after (a, bc). Reuse that
                # id: ranks are keyed by bytes, so a token can exist only once.
                new_id = ranks[token]
            else:
                new_id = len(ranks)
                ranks[token] = new_id
                id_to_bytes[new_id] = token
                merges_done += 1
                elapsed = time.perf_counter() - started
                if log and merges_done % max(1, num_merges // 10) == 0 and elapsed >= PROGRESS_SECONDS:
                    log(f"tokenizer: merge {merges_done:,}/{num_merges:,} after {elapsed:.1f} s: {token!r} "
                        f"(count {count:,})")
                    reported = True
            risen = set()
            for index in dict.fromkeys(where.pop(pair, ())):      # each chunk once, in a fixed order
                word = words[index]
                merged = merge_pair(word, pair, new_id)
                if len(merged) == len(word):
                    continue                  # the pair no longer occurs here (a stale index)
                # Only the pairs around the merged places change: (x, a) (a, b) (b, y) -> (x, ab) (ab, y).
                delta = Counter(zip(merged, merged[1:]))
                delta.subtract(zip(word, word[1:]))
                for changed_pair, n in delta.items():
                    if n > 0:
                        pair_counts[changed_pair] += n * freqs[index]
                        where[changed_pair].append(index)
                        risen.add(changed_pair)
                    elif n < 0:
                        pair_counts[changed_pair] += n * freqs[index]
                        if not pair_counts[changed_pair]:
                            del pair_counts[changed_pair]
                            where.pop(changed_pair, None)    # no chunk holds it any more
                words[index] = merged
            for risen_pair in risen:
                heapq.heappush(heap, (-pair_counts[risen_pair], risen_pair))
        if reported:
            log(f"tokenizer: {merges_done:,} merges in {time.perf_counter() - started:.1f} s")

        specials = {s: len(ranks) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, pattern=pattern, special_tokens=specials, name=name)

    @classmethod
    def train_reference(cls, text, vocab_size, special_tokens=(), pattern=GPT4_SPLIT_PATTERN, name="bpe"):
        """The same training, written the slow obvious way: re-count every pair after every merge.

        O(merges x text): minutes on a megabyte, where `train` takes about a second. It learns exactly
        the same ranks (same tie-break: the highest count, then the smallest pair), which a test checks.
        """
        num_merges = vocab_size - 256 - len(special_tokens)
        special_split = regex.compile("|".join(regex.escape(s) for s in special_tokens)) if special_tokens else None
        chunks = []
        for piece in [text] if isinstance(text, str) else text:
            for part in special_split.split(piece) if special_split else [piece]:
                chunks.extend(list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, part))
        ranks = {bytes([b]): b for b in range(256)}
        id_to_bytes = {b: bytes([b]) for b in range(256)}
        merges_done = 0
        while merges_done < num_merges:
            counts = Counter()
            for chunk in chunks:
                count_pairs(chunk, counts)
            if not counts:
                break
            pair = min(counts, key=lambda p: (-counts[p], p))     # most frequent, then smallest ids
            token = id_to_bytes[pair[0]] + id_to_bytes[pair[1]]
            if token not in ranks:
                ranks[token] = len(ranks)
                id_to_bytes[ranks[token]] = token
                merges_done += 1
            chunks = [merge_pair(chunk, pair, ranks[token]) for chunk in chunks]
        specials = {s: len(ranks) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, pattern=pattern, special_tokens=specials, name=name)

    # ------------------------------------------------------------------------------------------ encoding
    def _check_special(self, text, allowed_special):
        """Raise if `text` holds a special token's string that the caller did not allow (as tiktoken)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens in allowed_special: {sorted(unknown)}")
        if self._special_split is not None:
            for match in self._special_split.finditer(text):
                if match.group(0) not in allowed:
                    raise ValueError(
                        f"text contains the special token {match.group(0)!r}; pass "
                        f"allowed_special={{{match.group(0)!r}}} (or 'all') to encode it as one token"
                    )
        return allowed

    def normalize(self, text):
        """The text the merges see: NFC composes "e" + U+0301 into "é" for a tokenizer that asks for it."""
        return unicodedata.normalize(self.normalizer, text) if self.normalizer else text

    def encode(self, text, allowed_special=()):
        """Text -> token ids (the fast tiktoken path)."""
        text = self.normalize(text)
        allowed = self._check_special(text, allowed_special)
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_to_numpy(self, text, allowed_special=(), dtype="uint32"):
        """`encode` as a numpy array of `dtype`; tiktoken 0.7+ builds it without Python ints (~25% faster)."""
        text = self.normalize(text)
        allowed = self._check_special(text, allowed_special)
        if hasattr(self._encoding, "encode_to_numpy"):
            return self._encoding.encode_to_numpy(text, allowed_special=allowed, disallowed_special=()).astype(dtype)
        return np.asarray(self._encoding.encode(text, allowed_special=allowed, disallowed_special=()), dtype=dtype)

    def encode_batch(self, texts, allowed_special=(), num_threads=8):
        """Many texts -> lists of ids, encoded in parallel threads by tiktoken."""
        texts = [self.normalize(text) for text in texts]
        for text in texts:
            allowed = self._check_special(text, allowed_special)
        if not texts:
            return []
        return self._encoding.encode_batch(texts, num_threads=num_threads, allowed_special=allowed, disallowed_special=())

    def encode_reference(self, text, allowed_special=()):
        """Text -> token ids in plain Python: the algorithm that `encode` runs in Rust, step by step."""
        text = self.normalize(text)
        allowed = self._check_special(text, allowed_special)
        ids = []
        parts = self._special_split.split(text) if self._special_split else [text]
        for part in parts:
            if part in allowed:
                ids.append(self.special_tokens[part])
                continue
            for chunk in self._split.findall(part):
                ids.extend(self._bpe(chunk.encode("utf-8")))
        return ids

    def _bpe(self, piece):
        """One chunk's bytes -> ids: merge the adjacent pair of lowest rank until none is a token.

        >>> # with ranks {b"a": 97, b"b": 98, b"ab": 256, b"abb": 257}: b"abb" is one token already;
        >>> # b"abab" -> [b"a", b"b", b"a", b"b"] -> [b"ab", b"a", b"b"] -> [b"ab", b"ab"] -> [256, 256]
        """
        if piece in self.ranks:                    # tiktoken's shortcut: a whole chunk that is a token
            return [self.ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best_index = None, None
            for i in range(len(parts) - 1):
                rank = self.ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_index = rank, i   # strict <: the leftmost pair wins a tie
            if best_rank is None:
                break
            parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
        return [self.ranks[part] for part in parts]

    # ------------------------------------------------------------------------------------------ decoding
    def decode(self, ids):
        """Token ids -> text. Byte sequences that are not valid UTF-8 become U+FFFD, never an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        ids = [int(i) for i in ids]
        for i in ids:
            if i not in self.id_to_bytes and i not in self.id_to_special:
                raise ValueError(f"token id {i} is not in this tokenizer (vocab_size {self.vocab_size})")
        return b"".join(
            self.id_to_bytes[i] if i in self.id_to_bytes else self.id_to_special[i].encode("utf-8") for i in ids
        )

    def token_to_id(self, token):
        """The id of a special token, or of a string that is exactly one ordinary token."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        token_bytes = token.encode("utf-8") if isinstance(token, str) else token
        if token_bytes in self.ranks:
            return self.ranks[token_bytes]
        raise KeyError(f"{token!r} is not a single token of this tokenizer")

    def id_to_token(self, token_id):
        """The string of one token (bytes that are not valid UTF-8 on their own are replaced)."""
        return self.decode([token_id])

    @property
    def eot_id(self):
        """The id of the token that ends a document: "<|endoftext|>" (GPT-2, Qwen, SmolLM, ours) or Llama 3's
        "<|end_of_text|>"; None when the vocabulary has neither."""
        for token in END_OF_TEXT_TOKENS:
            if token in self.special_tokens:
                return self.special_tokens[token]
        return None

    # -------------------------------------------------------------------------------- saving and loading
    def to_dict(self):
        tokens = [None] * self.vocab_size
        for token, i in self.ranks.items():
            tokens[i] = base64.b64encode(token).decode("ascii")
        state = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "tokens": tokens,                     # tokens[id] = base64 of its bytes; null for special ids
        }
        if self.normalizer:                       # only when set: other tokenizers' files and fingerprints stay
            state["normalizer"] = self.normalizer
        return state

    @property
    def fingerprint(self):
        """A short digest of everything that decides the ids: equal fingerprints, equal encodings."""
        canonical = json.dumps({k: v for k, v in self.to_dict().items() if k != "name"}, sort_keys=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def save(self, path):
        """Write the tokenizer as a JSON text file, atomically (a reader never sees half a file)."""
        atomic_write_text(path, json.dumps(self.to_dict()))

    def to_tokenizer_json(self):
        """This tokenizer as a Hugging Face tokenizer.json (the inverse of `from_tokenizer_json`), so that a
        folder written by `save_pretrained` loads in `transformers` with its vocabulary:

            pre_tokenizer  Split(our regex, Isolated), then ByteLevel(use_regex=false): bytes as characters
            model          BPE, vocab {token spelled by bytes_to_unicode: id}, ignore_merges=true (a whole
                           chunk that is a token is that token, as tiktoken looks it up first), and as merges
                           every split (left, right) of every token into two tokens, the tokens in rank
                           order: then the pair Hugging Face applies first is the one whose concatenation
                           has the lowest rank, the pair tiktoken applies
            added_tokens   the special tokens
        """
        spell = bytes_to_unicode()
        spelled = {token: "".join(spell[b] for b in token) for token in self.ranks}
        merges = []
        for token, _ in sorted(self.ranks.items(), key=lambda item: item[1]):
            merges += [[spelled[token[:i]], spelled[token[i:]]] for i in range(1, len(token))
                       if token[:i] in self.ranks and token[i:] in self.ranks]
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}
                             for s, i in sorted(self.special_tokens.items(), key=lambda item: item[1])],
            "normalizer": {"type": "NFC"} if self.normalizer else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True,
                      "vocab": {spelled[token]: i for token, i in sorted(self.ranks.items(), key=lambda x: x[1])},
                      "merges": merges},
        }

    def save_hf(self, folder):
        """Write tokenizer.json and a tokenizer_config.json (for `AutoTokenizer`) into `folder`, atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", json.dumps(self.to_tokenizer_json(), ensure_ascii=False))
        eot = self.id_to_special.get(self.eot_id)
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
             **({"eos_token": eot, "bos_token": eot, "unk_token": None} if eot else {})}, indent=2))

    @classmethod
    def load(cls, path):
        path = Path(path)
        state = read_json(path, "tokenizer file")
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a {FORMAT_NAME} tokenizer file")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has tokenizer format version {state.get('version')}, expected {FORMAT_VERSION}")
        try:
            ranks = {base64.b64decode(t, validate=True): i for i, t in enumerate(state["tokens"]) if t is not None}
            return cls(ranks, pattern=state["pattern"], special_tokens=state["special_tokens"],
                       name=state.get("name", "bpe"), normalizer=state.get("normalizer"))
        except (KeyError, TypeError, ValueError, regex.error) as error:
            raise ValueError(f"{path} is a corrupt tokenizer file ({type(error).__name__}: {error})") from None

    @classmethod
    def load_or_train(cls, documents, vocab_size, special_tokens=(), pattern=GPT4_SPLIT_PATTERN, name="bpe",
                      folder=None, runtime=None, log=print, key=None, workers=1, total_bytes=None):
        """The tokenizer trained on `documents` (a str or a list of str), trained once and then loaded.

        The file is keyed by everything that decides the merges: the documents' content, the vocabulary
        size, the special tokens and the split pattern. Editing a corpus file therefore trains a new
        tokenizer, and nothing is ever overwritten: another key is another file, in `folder` (default:
        the cache folder's tokenizers/). Under DDP (`runtime` given) rank 0 trains while the other ranks
        wait at a barrier, then read rank 0's file.

        For a corpus too big to read at every start, the caller names the content itself: with `key` (a
        string, e.g. the corpus's fingerprint and the size of the sample trained on) the file is keyed
        by `key` instead of the content, and `documents` may be a function of no arguments that returns
        the texts (a generator of pieces of the sample, say), called only when the file must be trained:
        a warm start reads no corpus. The key must then change whenever the texts would. `log`, `workers`
        and `total_bytes` go to `train`.
        """
        if key is None:
            documents = documents() if callable(documents) else documents
            documents = [documents] if isinstance(documents, str) else list(documents)
            content = [documents_sha256(documents)]
        else:
            content = ["key", key]           # a list of another length: never the name of a content digest
        digest = hashlib.sha256(json.dumps([FORMAT_VERSION, vocab_size, list(special_tokens), pattern, *content])
                                .encode("utf-8")).hexdigest()[:16]
        path = Path(folder or cache_dir() / "tokenizers") / f"{name}-{vocab_size}-{digest}.json"
        is_main = runtime is None or runtime.is_main
        tokenizer = None
        if is_main and path.exists():
            try:
                tokenizer = cls.load(path)
            except ValueError:
                log(f"  {path} is unreadable; training the tokenizer again")
        if is_main and tokenizer is None:
            started = time.perf_counter()
            texts = documents() if callable(documents) else documents
            tokenizer = cls.train(texts, vocab_size, special_tokens=special_tokens, pattern=pattern, name=name,
                                  log=log, workers=workers, total_bytes=total_bytes)
            tokenizer.save(path)
            log(f"  trained a {tokenizer.vocab_size}-token BPE tokenizer in {time.perf_counter() - started:.1f}s -> {path}")
        if runtime is not None:
            runtime.barrier()                     # rank 0's file is complete for everyone after this
        return tokenizer if is_main else cls.load(path)

    # --------------------------------------------------------------------------- pretrained vocabularies
    @classmethod
    def from_tiktoken(cls, encoding_name="gpt2"):
        """A pretrained tiktoken vocabulary ("gpt2", "cl100k_base"...). tiktoken downloads it once."""
        try:
            encoding = tiktoken.get_encoding(encoding_name)
        except ValueError as error:
            raise ValueError(f"unknown tiktoken encoding {encoding_name!r}: {error}") from None
        except Exception as error:  # requests' connection errors, a blocked network, a bad cache...
            raise RuntimeError(
                f"could not fetch the {encoding_name!r} vocabulary ({type(error).__name__}); offline? "
                "load GPT-2-format files instead: BPETokenizer.from_hf('vocab.json', 'merges.txt')"
            ) from None
        return cls(encoding._mergeable_ranks, pattern=encoding._pat_str,
                   special_tokens=encoding._special_tokens, name=encoding_name)

    @classmethod
    def from_hf(cls, path, merges_txt=None, pattern=None, name=None):
        """A Hugging Face byte-level BPE vocabulary, from either of its two file layouts:

            BPETokenizer.from_hf("Llama-3.2-1B")                         # a folder holding tokenizer.json
            BPETokenizer.from_hf("Qwen3-0.6B/tokenizer.json")            # or the file itself
            BPETokenizer.from_hf("gpt2/vocab.json", "gpt2/merges.txt")   # GPT-2's older pair of files

        `tokenizer.json` is the one file of GPT-2, Llama 3, Qwen2/3 and SmolLM: it holds the split pattern
        (its pre-tokenizer), the merges and the added tokens (see `from_tokenizer_json`). `vocab.json`
        (token -> id, bytes spelled by `bytes_to_unicode`) and `merges.txt` (one "left right" merge per
        line, in priority order) hold neither pattern nor specials: the text is split by `pattern`
        (GPT-2's by default), and vocabulary entries that are neither a single byte nor made by a merge,
        like "<|endoftext|>", become special tokens.

        tiktoken's ranks are the ids, so the ids of merged tokens must not decrease in merge order (true
        of all of these; see `ranks_from_merges`).
        """
        if merges_txt is None:
            if pattern is not None:
                raise ValueError("a tokenizer.json has its own split pattern (its pre-tokenizer); "
                                 "`pattern` is for vocab.json + merges.txt")
            return cls.from_tokenizer_json(path, name=name or "hf")
        vocab_json, name = path, name or "gpt2-hf"
        try:
            vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            merge_lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"GPT-2 vocabulary file not found: {error.filename}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{vocab_json} is not a GPT-2 vocab.json ({error})") from None
        merges = []
        for line_number, line in enumerate(merge_lines, 1):
            if not line.strip() or line.startswith("#version"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] + parts[1] not in vocab:
                raise ValueError(f"{merges_txt}:{line_number}: bad merge line {line!r}")
            merges.append(parts)
        ranks = ranks_from_merges(vocab, merges, vocab_json)
        known_ids = set(ranks.values())
        special = {token: i for token, i in vocab.items() if i not in known_ids}
        return cls(ranks, pattern=pattern or GPT2_SPLIT_PATTERN, special_tokens=special, name=name)

    @classmethod
    def from_tokenizer_json(cls, path, name="hf"):
        """The byte-level BPE of a Hugging Face `tokenizer.json` (or of the folder holding one):

            "normalizer":    null, or NFC (Qwen2/3), applied before the split
            "pre_tokenizer": how the text is cut into chunks before the merges, one regex in the end:
                             ByteLevel(use_regex=true) alone splits by GPT-2's pattern (GPT-2); Split(regex,
                             "Isolated") then ByteLevel(use_regex=false) by that regex (Llama 3, Qwen2/3);
                             Digits(individual_digits) then ByteLevel(use_regex=true) by GPT-2's pattern with
                             each digit a chunk of its own (SmolLM, StarCoder)
            "model":         {"type": "BPE", "vocab": {token: id}, "merges": ["a b", ...] or [["a", "b"], ...],
                             "ignore_merges": ...}; tiktoken looks a whole chunk up first, as ignore_merges=true
            "added_tokens":  [{"id", "content", "special"...}]: special tokens here (special or not there:
                             encoded as one id when allowed_special lets them through, as tiktoken does)

        What ids cannot represent is a ValueError naming it: a normalizer that changes text otherwise (NFKC,
        lowercasing, SentencePiece's "▁"), a model that is not byte-level BPE (WordPiece, byte_fallback,
        subword prefixes), another pre-tokenizer, added tokens that strip whitespace around them. The
        post-processor (Llama 3's <|begin_of_text|> in front) is not applied: ids are the text's own, as
        `encode(text, add_special_tokens=False)` gives them.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        spec = read_json(file, "tokenizer.json")
        if not isinstance(spec, dict) or spec.get("format") == FORMAT_NAME:
            raise ValueError(f"{file} is not a Hugging Face tokenizer.json"
                             + (" (it is this repository's own format: BPETokenizer.load reads it)"
                                if isinstance(spec, dict) else ""))

        def refuse(what):
            raise ValueError(f"{file}: {what}, which tiktoken-style byte-level BPE cannot represent")

        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            refuse(f"model type {model.get('type')!r} (only BPE)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(key):
                refuse(f"model.{key}={model[key]!r}")
        normalizer = spec.get("normalizer")
        steps = [normalizer] if normalizer else []
        if normalizer and normalizer.get("type") == "Sequence":
            steps = normalizer.get("normalizers") or []
        kinds = [step.get("type") for step in steps]
        if kinds not in ([], ["NFC"]):
            refuse(f"the normalizer {kinds} (only none or NFC)")
        pattern = pattern_of_pre_tokenizer(spec.get("pre_tokenizer"), refuse)
        vocab = model.get("vocab")
        merges = [merge.split(" ") if isinstance(merge, str) else merge for merge in model.get("merges") or []]
        if not isinstance(vocab, dict) or not all(isinstance(merge, list) and len(merge) == 2 for merge in merges):
            refuse("a model without a vocab or with merges that are not pairs")
        ranks = ranks_from_merges(vocab, merges, file)
        mergeable_ids, special = set(ranks.values()), {}
        for token in spec.get("added_tokens") or []:
            if any(token.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
                refuse(f"the added token {token['content']!r} with lstrip, rstrip or single_word")
            if token["id"] in mergeable_ids:
                refuse(f"the added token {token['content']!r}, also an ordinary BPE token")
            special[token["content"]] = token["id"]
        known_ids = mergeable_ids | set(special.values())
        orphans = sorted(token for token, i in vocab.items() if i not in known_ids)
        if orphans:
            refuse(f"{len(orphans)} vocabulary entries that no merge makes and no added token names "
                   f"({orphans[:3]})")
        try:
            return cls(ranks, pattern=pattern, special_tokens=special, name=name,
                       normalizer="NFC" if kinds else None)
        except regex.error as error:
            refuse(f"the split regex {pattern!r} ({error})")

    def __repr__(self):
        return f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"


# ----------------------------------------------------------------------------- Hugging Face tokenizers
# Digits(individual_digits=True) then GPT-2's pattern on each stretch between the digits (SmolLM's
# pre-tokenizer), as one regex: a digit is a chunk alone, no other branch takes one (GPT-2's " ?\p{N}+" is
# gone), and where GPT-2 asks "(?!\S)" (end of the stretch) a digit also ends it.
DIGITS_GPT2_SPLIT_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# The bytes no UTF-8 text holds (overlong leads and leads beyond U+10FFFF): a vocabulary may lack them.
NEVER_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}


def ranks_from_merges(vocab, merges, source):
    """tiktoken ranks {token bytes: id} from a Hugging Face byte-level vocabulary {token: id} and its merges
    [(left, right), ...] in priority order: the single bytes, then what each merge makes.

    Hugging Face's BPE applies the pair that comes first in `merges`; tiktoken the pair whose concatenation
    has the lowest rank. They agree when ranks grow with merge priority, so the ids of the merged tokens
    must not decrease along `merges`; several merges may make one token (files converted from tiktoken
    list every split of each token: ("Ġth", "e"), ("Ġt", "he") and ("Ġ", "the") all make "Ġthe").
    tiktoken would also merge a pair that no merge lists if its concatenation is a token; merge lists
    made by BPE training, or listing every split, do not let such a pair meet (tests/test_common_tokenizer.py
    checks both kinds against the `tokenizers` library).
    """
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def to_bytes(token):
        try:
            return bytes(byte_of[char] for char in token)
        except (KeyError, TypeError):
            return None                           # not byte-level text

    ranks = {}
    for token, i in vocab.items():
        if len(to_bytes(token) or b"") == 1:
            ranks[to_bytes(token)] = i
    missing = sorted(set(range(256)) - {token[0] for token in ranks} - NEVER_IN_UTF8)
    if missing:
        raise ValueError(f"{source} does not hold all 256 byte tokens (none for the bytes {missing[:8]}): "
                         "text holding them cannot be encoded")
    previous = -1
    for number, (left, right) in enumerate(merges, 1):
        merged = to_bytes(left + right)
        if left not in vocab or right not in vocab or left + right not in vocab or merged is None:
            raise ValueError(f"{source}: merge {number} ({left!r} {right!r}) needs both parts and their "
                             "concatenation in the byte-level vocabulary")
        if vocab[left + right] < previous:
            raise ValueError(f"{source}: merged token ids are not in merge order (merge {number}, {left!r} "
                             f"{right!r}, makes id {vocab[left + right]} after id {previous}); tiktoken-style "
                             "ranks need that")
        previous = ranks[merged] = vocab[left + right]
    return ranks


def pattern_of_pre_tokenizer(pre_tokenizer, refuse):
    """The one split regex of a tokenizer.json pre-tokenizer (see `BPETokenizer.from_tokenizer_json`);
    `refuse(what)` raises for what has none."""
    steps = [pre_tokenizer] if pre_tokenizer else []
    if pre_tokenizer and pre_tokenizer.get("type") == "Sequence":
        steps = pre_tokenizer.get("pretokenizers") or []
    kinds = [step.get("type") for step in steps]
    if not kinds or kinds[-1] != "ByteLevel":
        refuse(f"the pre-tokenizer {kinds} (not byte-level: it must end in ByteLevel)")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        refuse("ByteLevel(add_prefix_space=true)")
    gpt2_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and gpt2_regex:
        return GPT2_SPLIT_PATTERN
    if kinds == ["Digits", "ByteLevel"] and gpt2_regex and steps[0].get("individual_digits"):
        return DIGITS_GPT2_SPLIT_PATTERN
    if kinds == ["Split", "ByteLevel"] and not gpt2_regex:
        split = steps[0]
        if not ("Regex" in (split.get("pattern") or {}) and split.get("behavior") == "Isolated"
                and not split.get("invert")):
            refuse(f"the Split {split} (only a Regex pattern, behavior Isolated, not inverted)")
        return split["pattern"]["Regex"]
    refuse(f"the pre-tokenizer {kinds} (use_regex={gpt2_regex})")

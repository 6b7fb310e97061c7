"""Corpora, token caches, padded batches and finetuning tasks: the data side of every chapter.

The default corpus, "pydocs", is the running interpreter's own documentation, so every chapter works
offline on any machine with Python:

    pydoc_data.topics            the language reference pages `help("assert")` shows   (~0.46 MB)
    standard-library docstrings  modules, their public classes, functions and methods  (~1.2 MB, of
                                 which the ~80% in "train", ~1.0 MB, enter the corpus: ~1.5 MB in all)

The same docstrings give the finetuning tasks (classify a docstring's module, write its summary line,
name the function, answer "What does `json.dumps` do?"). Each documented object falls in "train",
"val" or "test" by a stable hash of its qualified name, and the pretraining corpus holds the train
docstrings only: no finetuning metric is measured on text the model saw in pretraining.

Everything slow happens once and is cached under `cache_dir()`: the standard-library walk (a few
seconds), downloads ("shakespeare", "wikitext-2") and encoded token streams (`TokenCache`).

    text = load_corpus("pydocs")                          # str, documents separated by "\\n\\n"
    tokens = TokenCache("pydocs", tokenizer)              # train.bin / val.bin, encoded once
    x, y = tokens.get_batch("train", batch_size=8, block_size=64, device="cpu")
    examples = load_task("docstring-module", "train")     # [{"text": ..., "label": "asyncio"}, ...]
"""

import bisect
import csv
import functools
import gzip
import hashlib
import inspect
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from common import _encode_worker
from common.checkpoint import atomic_write_bytes, cache_dir
from common.config import UserError
from common.download import download
from common.report import format_seconds
from common.tokenizer import documents_sha256

CACHE_FORMAT = 1          # bump when the layout of a cached file changes
SPLITS = ("train", "val", "test")
TASKS = ("docstring-module", "docstring-summary", "docstring-name", "python-qa")

# The downloadable corpora (a test points these at a local server). wikitext-2 is its three files,
# train + valid + test, as three documents.
CORPUS_URLS = {
    "shakespeare": ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"],
    "wikitext-2": [
        "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/train.txt",
        "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/valid.txt",
        "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/test.txt",
    ],
    # TinyStories (Eldan & Li 2023), the GPT-4-written stories: 2.2 GB of short English stories for a small
    # GPT, each ended by a literal <|endoftext|> line (read as the end-of-text token)
    "tinystories": [
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
    ],
}

# Standard-library modules the walk never imports: tests, GUI and demo code, modules with side effects
# on import (`this` prints, `antigravity` opens a browser), packaging tools, pydoc_data itself (its
# topics are read separately), and `encodings`, whose ~120 codec modules carry near-identical
# generated docstrings ("Python Character Mapping Codec cp1252 generated from ...").
EXCLUDED_MODULES = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "tkinter", "turtle", "lib2to3", "ensurepip",
    "venv", "this", "antigravity", "__main__", "__phello__", "pydoc_data", "encodings",
})
MIN_DOC_CHARS = 40        # shorter docstrings ("Return self+value.") are boilerplate, not documentation
MAX_TEXT_CHARS = 1000     # task inputs are cut to their first 1000 characters (~250 GPT-2 tokens)
MAX_SUMMARY_CHARS = 200   # a longer first paragraph is not a summary line
NEAR_DUPLICATE_CHARS = 200  # docstrings that open with the same 200 characters are one text for the split
NAME_MASK = "___"         # stands for the documented name in docstring-name inputs (no letters: never a name)


# ------------------------------------------------------------------------------------------- files
def _read_text_file(path):
    """The text of a UTF-8 file, with "\\r\\n" read as "\\n"; missing, empty or binary -> UserError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    if not raw.strip():
        raise UserError(f"{path} is empty")
    if b"\x00" in raw:
        raise UserError(f"{path} is a binary file, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {error.start})") from None
    return text.replace("\r\n", "\n")


def split_of(key):
    """The split of an example, from a stable hash of its key: 80% "train", 10% "val", 10% "test".

    sha1, not hash(): Python salts str hashes per process, and the split must never change.
    >>> [split_of(q) for q in ("json.dumps", "json.JSONDecoder.decode", "json.JSONEncoder")]
    ['train', 'val', 'test']
    """
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


# ------------------------------------------------------------------------- the pydocs corpus and tasks
def _walk_stdlib(out_path, excluded):
    """Import every public standard-library module and write its docstrings to `out_path` as JSON.

    Runs in a child interpreter (see `_collect_pydocs`), so importing ~400 modules never touches the
    caller: its source is sent with `python -c`, which is why it imports everything it uses itself.
    A record: {"qualname": "json.dumps", "kind": "function", "module": "json", "text": cleaned doc}.
    Objects count where they are defined (obj.__module__ is the module walked), or where a private
    module's object is exported (functools.reduce lives in _functools); methods are those a class
    defines itself (its __dict__), public names only.
    """
    import contextlib
    import importlib
    import inspect
    import io
    import json
    import pkgutil
    import sys
    import warnings

    warnings.simplefilter("ignore")   # attribute access on deprecated aliases (typing.io) warns
    records = {}

    def is_private(dotted):
        return any(part.startswith("_") for part in dotted.split("."))

    def add(qualname, kind, obj):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip() and qualname not in records:
            records[qualname] = {"qualname": qualname, "kind": kind, "module": qualname.split(".")[0],
                                 "text": inspect.cleandoc(doc)}

    def import_quietly(name):
        """The module, or None when importing it fails, warns (deprecated modules) or exits."""
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("error")
                return importlib.import_module(name)
        except BaseException:
            return None

    def visit(name):
        module = import_quietly(name)
        if module is None:
            return
        add(name, "module", module)
        exported = getattr(module, "__all__", None)
        for attr, obj in sorted(vars(module).items()):
            home = getattr(obj, "__module__", None)
            if attr.startswith("_") or getattr(obj, "__qualname__", None) != attr or not isinstance(home, str):
                continue                                   # private, an alias, or not a class/function
            if home != name and not (is_private(home) and (exported is None or attr in exported)):
                continue                                   # imported from another public module
            if inspect.isclass(obj):
                add(f"{name}.{attr}", "class", obj)
                for method_name, method in sorted(vars(obj).items()):
                    method = getattr(method, "__func__", method)       # unwrap classmethod/staticmethod
                    if (not method_name.startswith("_") and inspect.isroutine(method)
                            and getattr(method, "__qualname__", None) == f"{obj.__qualname__}.{method_name}"):
                        add(f"{name}.{attr}.{method_name}", "method", method)
            elif inspect.isroutine(obj):
                add(f"{name}.{attr}", "function", obj)
        if hasattr(module, "__path__"):                    # a package: walk its submodules too
            for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda info: info.name):
                if not info.name.startswith("_") and info.name not in excluded:
                    visit(f"{name}.{info.name}")

    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in excluded:
            visit(name)
    try:
        from pydoc_data.topics import topics
    except ImportError:                                    # some distributions package it separately
        topics = {}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"topics": topics, "records": sorted(records.values(), key=lambda r: r["qualname"])}, f)


def _collect_pydocs():
    """Run `_walk_stdlib` in a fresh interpreter: (topics dict, list of docstring records)."""
    # -I: ignore PYTHON* variables and the user's site; -S: no site-packages, so only the standard
    # library is importable (a venv's setuptools would otherwise shadow distutils).
    program = inspect.getsource(_walk_stdlib) + "\nimport sys, json\n_walk_stdlib(sys.argv[1], set(json.loads(sys.argv[2])))\n"
    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "pydocs.json")
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", program, out_path, json.dumps(sorted(EXCLUDED_MODULES))],
            cwd=folder, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"walking the standard library failed:\n{result.stderr[-2000:]}")
        with open(out_path, encoding="utf-8") as f:
            walked = json.load(f)
    return walked["topics"], walked["records"]


_SIGNATURE_LINE = re.compile(r"[A-Za-z_][\w.]*\(.*\)\s*(->.*)?")


def _strip_signature(text):
    """Drop a leading call-signature paragraph, as C functions write it: "S.find(sub[, start]) -> int".

    >>> _strip_signature("B.count(sub) -> int\\n\\nReturn the number of occurrences of sub.")
    'Return the number of occurrences of sub.'
    """
    if _SIGNATURE_LINE.fullmatch(text.split("\n", 1)[0].strip()):
        return text.partition("\n\n")[2].strip()
    return text


def _summary_and_body(text):
    """(summary, body): the first paragraph on one line, and everything after the first blank line.

    >>> _summary_and_body("Serialize obj to JSON.\\n\\nIf skipkeys is true, ...")
    ('Serialize obj to JSON.', 'If skipkeys is true, ...')
    """
    first, _, body = text.partition("\n\n")
    return " ".join(first.split()), body.strip()


def _qa_instruction(qualname, kind):
    """One of two phrasings per kind, picked by a hash of the name so that it never changes."""
    phrasings = {
        "module": ("What is the `{}` module for?", "Describe the `{}` module in one sentence."),
        "class": ("What is `{}`?", "Describe the class `{}` in one sentence."),
    }.get(kind, ("What does `{}` do?", "Explain what `{}` does in one sentence."))
    choice = int(hashlib.sha1(("qa:" + qualname).encode("utf-8")).hexdigest(), 16) % len(phrasings)
    return phrasings[choice].format(qualname.removeprefix("builtins."))   # `str.join`, as people write it


def _record_examples(record):
    """The examples one documented object gives, by task (an object may give none for a task).

    - docstring-module: the docstring (cut to MAX_TEXT_CHARS) -> its top-level module.
    - docstring-summary: docstrings whose one-line summary is followed by a body (PEP 257 layout)
      of at least MIN_DOC_CHARS: body -> summary line.
    - docstring-name: functions, classes and methods: docstring -> the object's own name. A fair
      task: a leading signature line ("dumps(obj) -> str") is dropped and every whole-word
      occurrence of the name is replaced by NAME_MASK, so the answer is never copied from the input.
    - python-qa: "What does `json.dumps` do?" -> the summary line.
    All four read the docstring without its leading signature paragraph, if any.
    """
    qualname, kind = record["qualname"], record["kind"]
    text = _strip_signature(record["text"])
    if len(text) < MIN_DOC_CHARS:
        return {}
    examples = {"docstring-module": {"text": text[:MAX_TEXT_CHARS], "label": record["module"]}}
    summary, body = _summary_and_body(text)
    has_summary = 10 <= len(summary) <= MAX_SUMMARY_CHARS
    if has_summary and "\n" not in text.partition("\n\n")[0] and len(body) >= MIN_DOC_CHARS:
        examples["docstring-summary"] = {"input": body[:MAX_TEXT_CHARS], "target": summary}
    if kind != "module":
        name = qualname.rsplit(".", 1)[1]
        masked = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", NAME_MASK, text)
        if len(masked) >= MIN_DOC_CHARS:
            examples["docstring-name"] = {"input": masked[:MAX_TEXT_CHARS], "target": name}
    if has_summary:
        examples["python-qa"] = {"instruction": _qa_instruction(qualname, kind), "input": "", "response": summary}
    return examples


_TASK_INPUT = {"docstring-module": "text", "docstring-summary": "input", "docstring-name": "input",
               "python-qa": "instruction"}


def _build_tasks(records):
    """{task: [(qualname, split, example), ...]} over all splits, sorted by qualname.

    Two objects can give the same input (bytes.count and bytearray.count, once their signature
    lines are gone): within a task, duplicates collapse to the smallest qualname, so one text is
    never in two splits.
    """
    tasks = {name: {} for name in TASKS}
    for record in records:                                 # sorted by qualname: the first one wins
        for task, example in _record_examples(record).items():
            tasks[task].setdefault(example[_TASK_INPUT[task]], (record["qualname"], record["split"], example))
    return {task: sorted(found.values(), key=lambda item: item[0]) for task, found in tasks.items()}


def _drop_leaking_documents(documents, held_out):
    """Drop every document through which a held-out text would appear in "\\n\\n".join(documents).

    Checked on the joined string, so a text spanning two documents counts too; repeated until clean.
    """
    while True:
        corpus = "\n\n".join(documents)
        starts = [0]                                       # starts[k]: offset of documents[k]
        for document in documents[:-1]:
            starts.append(starts[-1] + len(document) + 2)
        leaking = set()
        for text in held_out:
            at = corpus.find(text)
            while at != -1:
                first, last = bisect.bisect_right(starts, at) - 1, bisect.bisect_right(starts, at + len(text) - 1) - 1
                leaking.update(range(first, last + 1))
                at = corpus.find(text, at + 1)
        if not leaking:
            return documents
        documents = [d for k, d in enumerate(documents) if k not in leaking]


def _near_duplicate_key(text):
    """The first NEAR_DUPLICATE_CHARS of a docstring, signature line dropped and white space folded."""
    return " ".join(_strip_signature(text).split())[:NEAR_DUPLICATE_CHARS]


def _build_pydocs():
    topics, records = _collect_pydocs()
    records = [r for r in records if len(r["text"]) >= MIN_DOC_CHARS]
    kept, seen = [], set()
    for record in records:                                 # sorted by qualname: keep the smallest of duplicates
        if record["text"] not in seen:
            seen.add(record["text"])
            kept.append(record)
    # Near-duplicates (Compat32.header_fetch_parse and EmailPolicy.header_fetch_parse, parse_qs and
    # parse_qsl) open with the same text under different names: a group that shares its first
    # NEAR_DUPLICATE_CHARS takes the split of its smallest qualname, so it never sits on both sides.
    group_split = {}
    for record in kept:
        group_split.setdefault(_near_duplicate_key(record["text"]), split_of(record["qualname"]))
    records = [{**r, "split": group_split[_near_duplicate_key(r["text"])]} for r in kept]
    # Held out: the opening of every val/test docstring and of every task input made from one; any
    # pretraining document containing one of them is dropped.
    held_out = {r["text"][:NEAR_DUPLICATE_CHARS] for r in records if r["split"] != "train"}
    for task, examples in _build_tasks(records).items():
        if task != "python-qa":                            # its instruction quotes only the name
            held_out.update(example[_TASK_INPUT[task]][:NEAR_DUPLICATE_CHARS]
                            for _, split, example in examples if split != "train")
    topic_documents = list(dict.fromkeys(topics[key].strip() for key in sorted(topics)))
    docstring_documents = [f"{r['qualname']}\n{r['text']}" for r in records if r["split"] == "train"]
    kept_documents = _drop_leaking_documents(topic_documents + docstring_documents, held_out)
    kept_set = set(kept_documents)
    return {
        "topics": [d for d in topic_documents if d in kept_set],
        "docstrings": [d for d in docstring_documents if d in kept_set],
        "records": records,
        "dropped_documents": len(topic_documents) + len(docstring_documents) - len(kept_documents),
    }


_PYDOCS_MEMO = {}


def _pydocs():
    """The pydocs corpus and records, built once per interpreter into the cache folder.

    The file name hashes the Python version (another interpreter has another standard library) and
    this module's source (a change to the rules rebuilds it); a corrupt file is rebuilt.
    """
    key = hashlib.sha256(repr((CACHE_FORMAT, sys.version, sys.platform)).encode("utf-8")
                         + Path(__file__).read_bytes()).hexdigest()[:16]
    path = cache_dir() / f"pydocs-{key}.json"
    if path in _PYDOCS_MEMO:
        return _PYDOCS_MEMO[path]
    pydocs = None
    if path.exists():
        try:
            pydocs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        if not (isinstance(pydocs, dict) and {"topics", "docstrings", "records"} <= set(pydocs)):
            print(f"data: {path} is corrupt; rebuilding it")
            pydocs = None
    if pydocs is None:
        started = time.perf_counter()
        pydocs = _build_pydocs()
        atomic_write_bytes(path, json.dumps(pydocs, ensure_ascii=False).encode("utf-8"))
        size = sum(len(d) + 2 for d in pydocs["topics"] + pydocs["docstrings"]) - 2
        print(f"data: built the pydocs corpus ({size / 1e6:.2f} MB, {len(pydocs['records'])} docstrings) "
              f"in {time.perf_counter() - started:.1f}s -> {path}")
    _PYDOCS_MEMO[path] = pydocs
    return pydocs


def _pydocs_tasks():
    """`_build_tasks` over the pydocs records, computed once per process (it takes a fraction of a second)."""
    pydocs = _pydocs()
    if "tasks" not in pydocs:
        pydocs["tasks"] = _build_tasks(pydocs["records"])
    return pydocs["tasks"]


def pydocs_documents(part):
    """One half of the pydocs corpus as a list of documents: "topics" (the language reference pages) or
    "docstrings" (the train docstrings only)."""
    if part not in ("topics", "docstrings"):
        raise ValueError(f"pydocs has the parts 'topics' and 'docstrings', not {part!r}")
    return _pydocs()[part]


def pydocs_parts():
    """The two halves of the pydocs corpus, each joined into one string: {"topics": str, "docstrings": str}."""
    return {part: "\n\n".join(pydocs_documents(part)) for part in ("topics", "docstrings")}


# ------------------------------------------------------------------------------------------ corpora
CORPUS_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz")   # what a corpus file or folder holds
JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")   # a document per line (C4's shards are .json.gz)
PIECE_CHARS = 1 << 22     # a corpus is read and encoded in pieces of ~4M characters: memory never holds more
ENCODE_IN_PROCESSES_BYTES = 32 << 20   # a larger corpus is encoded by a pool of processes (smaller: not worth it)
PROGRESS_SECONDS = 5.0    # how often long data work prints a progress line
C4_SHARD_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.{index:05d}-of-01024.json.gz"
C4_SHARDS = 1024          # c4:N = the first N of its 1024 English train shards (~356k documents, ~305 MB each)
OFFLINE_HINT = ("offline? download it another way and pass the local file or folder with --data PATH "
                "(.txt, .txt.gz, .jsonl or .jsonl.gz files)")


def corpus_urls(name):
    """The files of a named corpus, or None: CORPUS_URLS, and "c4:N" (N shards; "c4" is c4:1)."""
    if name in CORPUS_URLS:
        return CORPUS_URLS[name]
    if name == "c4" or re.fullmatch(r"c4:\d+", name):
        count = int(name.partition(":")[2] or 1)
        if not 1 <= count <= C4_SHARDS:
            raise UserError(f"--data {name}: C4 has {C4_SHARDS} English train shards; take c4:1 to c4:{C4_SHARDS}")
        return [C4_SHARD_URL.format(index=index) for index in range(count)]
    return None


def _download(name, log=print):
    """The local paths of a named corpus's files, downloaded once into the cache folder (resumable)."""
    paths = []
    for url in corpus_urls(name):
        # The URL's hash in the file name: pointing CORPUS_URLS elsewhere never reuses a stale file.
        digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:8]
        path = cache_dir() / "corpora" / f"{name.partition(':')[0]}-{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"
        paths.append(download(url, path, name=name, log=log, hint=OFFLINE_HINT))
    return paths


def _suffix(path):
    name = path.name.lower()
    return next((suffix for suffix in sorted(CORPUS_SUFFIXES, key=len, reverse=True) if name.endswith(suffix)), None)


def _open_text(path):
    """A corpus file as text: gzip or not, UTF-8 (a BOM dropped), "\r\n" and "\r" read as "\n"."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=None)
    return open(path, encoding="utf-8-sig", newline=None)


def _checked(text, path):
    if "\x00" in text:
        raise UserError(f"{path} is a binary file, not text")
    return text


def _piece_end(text):
    """Where a piece of a long text may end: after the last newline with a non-space character on both
    sides. Both split patterns (GPT-2's, GPT-4's) make that newline a chunk of its own, "x\n" at the end of a
    piece too, so the pieces' ids, concatenated, are the whole text's (tested). 0 when there is none."""
    cut = text.rfind("\n", 1, len(text) - 1)
    while cut > 0 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
        cut = text.rfind("\n", 1, cut)
    return cut + 1 if cut > 0 else 0


def _text_file_pieces(path, start=0):
    """(text, starts_document) of a .txt(.gz) file: one document, read in pieces of about PIECE_CHARS
    characters; from the first line after byte `start` of a plain file, when given (a sample window)."""
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as raw:
            if start:
                raw.seek(start)
                raw.readline()                                 # the rest of the line the seek cut
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)
            buffer, first = "", start == 0
            while True:
                chunk = _checked(text.read(PIECE_CHARS), path)
                buffer += chunk
                if chunk and len(buffer) < PIECE_CHARS:
                    continue
                cut = _piece_end(buffer) if chunk else len(buffer)
                if cut == 0 and len(buffer) < 4 * PIECE_CHARS:
                    continue                                   # no place to cut yet: read on
                cut = cut or len(buffer)                       # a text without one: cut anyway, rarely
                piece, buffer = buffer[:cut], buffer[cut:]
                if piece:
                    yield piece, first
                    first = False
                if not chunk:
                    return
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason})") from None
    except (OSError, EOFError) as error:                       # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def _head(pieces, max_chars):
    """The first pieces of `pieces` (text, starts) that fit in `max_chars` characters (at least one)."""
    given = 0
    for text, starts in pieces:
        if given and given + len(text) > max_chars:
            return
        yield text, starts
        given += len(text)


def _jsonl_documents(path, text_field):
    """The `text_field` of each line of a .jsonl(.gz) file, a document each."""
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError, IndexError):
                    raise UserError(f"{path}, line {number}: not a JSON object with a {text_field!r} string "
                                    f"(--text_field names the field)") from None
                if not isinstance(text, str):
                    raise UserError(f"{path}, line {number}: {text_field!r} is not a string")
                yield _checked(text, path)
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason})") from None
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


class Corpus:
    """A corpus read lazily: a sequence of documents that is never held in memory as a whole.

        corpus = Corpus("my_folder")                  # .txt(.gz), .jsonl(.gz), .json.gz files, recursively
        for text, starts_document in corpus.pieces():  # ~4M-character pieces, in order
        corpus.sample_texts(100e6)                    # ~100 MB spread over the corpus (tokenizer training)
        corpus.fingerprint                            # changes when the corpus does (see below)

    spec: "pydocs" (default, offline; small, built in memory), "shakespeare", "wikitext-2", "tinystories",
    "c4" / "c4:N" (downloaded once into the cache folder; by rank 0 alone under DDP, given `runtime`), a file,
    or a folder. A .txt file is one document
    (read in pieces cut at line starts); a .jsonl line is one document, its `text_field`. What is missing,
    empty, binary or not UTF-8 is a UserError of one line, the cheap checks (every file's first block) at
    construction, before anything slow.

    The fingerprint of a corpus of files is a hash of each file's path, size and modification time and of
    its first and last 64 kB: seconds for gigabytes, where hashing every byte takes minutes. An edit
    that keeps the size, the mtime and both ends is missed: delete the cached tokens (--rebuild_cache).
    """

    def __init__(self, spec="pydocs", text_field="text", log=print, runtime=None):
        self.spec, self.text_field = str(spec), text_field
        self.memory_documents, self.files = None, []
        if isinstance(spec, (list, tuple)):                  # documents already in memory (small texts)
            self.memory_documents = [str(d) for d in spec]
        elif self.spec == "pydocs":
            pydocs = _pydocs()
            self.memory_documents = pydocs["topics"] + pydocs["docstrings"]
        elif corpus_urls(self.spec) is not None:
            # under DDP (`runtime`) rank 0 downloads while the others wait, then they find its files in the
            # cache folder: two processes writing one download would spoil it
            if runtime is not None and not runtime.is_main:
                runtime.barrier()                            # rank 0 is downloading
            self.files = _download(self.spec, log=log)
            if runtime is not None and runtime.is_main:
                runtime.barrier()                            # the files are complete: the others open them now
        else:
            path = Path(self.spec).expanduser()
            if path.is_dir():
                self.files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
                if not self.files:
                    raise UserError(f"no {', '.join(CORPUS_SUFFIXES)} files in the folder {path}")
            elif path.is_file():
                self.files = [path]
            else:
                named = ", ".join(["pydocs", *CORPUS_URLS, "c4", "c4:N"])
                raise UserError(f"no such file, folder or corpus: {self.spec!r} (corpora: {named}; or a "
                                f"{', '.join(CORPUS_SUFFIXES)} file, or a folder of them)")
        for file in self.files:
            self._check_head(file, single=len(self.files) == 1)
        if self.memory_documents is not None and not any(self.memory_documents):
            raise UserError("the corpus is empty")
        self.num_bytes = (sum(len(d.encode("utf-8")) for d in self.memory_documents) if self.memory_documents
                          is not None else sum(f.stat().st_size for f in self.files))

    def _check_head(self, path, single):
        """Fail now, in one line, on what would fail later: unreadable, binary, not UTF-8, empty."""
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 16)
        except OSError as error:
            raise UserError(f"cannot read {path}: {error.strerror or error}") from None
        if not head.strip() and single:
            raise UserError(f"{path} is empty")
        if path.name.lower().endswith(".gz"):
            if head and head[:2] != b"\x1f\x8b":
                raise UserError(f"{path} is not a gzip file")
            return
        if b"\x00" in head:
            raise UserError(f"{path} is a binary file, not text")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.start < len(head) - 4:                    # not just a character cut at the block's end
                raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {error.start})") from None

    @functools.cached_property
    def fingerprint(self):
        """A short digest that changes when the corpus does (see the class docstring for files)."""
        if self.memory_documents is not None:
            return documents_sha256(self.memory_documents)[:32]
        digest = hashlib.sha256(repr((self.text_field, CACHE_FORMAT)).encode())
        for path in self.files:
            stat = path.stat()
            digest.update(repr((path.name, str(path), stat.st_size, stat.st_mtime_ns)).encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 16))
                if stat.st_size > 1 << 17:
                    f.seek(-(1 << 16), os.SEEK_END)
                    digest.update(f.read())
        return digest.hexdigest()[:32]

    def _file_pieces(self, path):
        if _suffix(path) in JSON_LINES_SUFFIXES:
            for document in _jsonl_documents(path, self.text_field):
                yield document, True
        else:
            yield from _text_file_pieces(path)

    def pieces(self):
        """(text, starts_document) in corpus order: every document, long ones in several pieces."""
        if self.memory_documents is not None:
            for document in self.memory_documents:
                yield document, True
            return
        for path in self.files:
            yield from self._file_pieces(path)

    def documents(self, max_bytes=None):
        """The documents as a list of strings, for the chapters whose data is built in memory (04's sentence
        pairs); at most about `max_bytes` of them, the corpus's head, when given."""
        documents, size = [], 0
        for text, starts in self.pieces():
            if starts or not documents:
                documents.append(text)
            else:
                documents[-1] += text
            size += len(text)
            if max_bytes and size >= max_bytes:
                break
        return documents

    def sample_texts(self, max_bytes):
        """About `max_bytes` of the corpus, spread over all of it (not its head), in pieces: for training a
        tokenizer on a bounded sample. The whole corpus when it is smaller. Each file gives its share of the
        bytes: small files are taken whole or skipped, evenly (every k-th); a long plain text file gives
        evenly spaced windows; a long compressed or JSONL file its head (C4's shards are shuffled already)."""
        if self.memory_documents is not None or self.num_bytes <= max_bytes:
            for text, _ in self.pieces():
                yield text
            return
        fraction, credit = max_bytes / self.num_bytes, 0.0
        for path in self.files:
            size = path.stat().st_size
            share = size * fraction
            if size <= PIECE_CHARS:                           # a small file: whole, or not at all
                credit += share
                if credit >= size:
                    credit -= size
                    yield from (text for text, _ in self._file_pieces(path))
            elif _suffix(path) == ".txt":
                windows = max(1, round(share / PIECE_CHARS))
                for window in range(windows):
                    start = int((window + 0.5) * size / windows - share / windows / 2)
                    yield from (text for text, _ in _head(_text_file_pieces(path, max(0, start)), share / windows))
            else:
                yield from (text for text, _ in _head(self._file_pieces(path), share))

    def __repr__(self):
        return f"Corpus({self.spec!r}: {len(self.files) or 'in memory'} files, {self.num_bytes / 1e6:.1f} MB)"


def corpus_documents(spec="pydocs"):
    """The documents of a small corpus as a list (see `Corpus`; large corpora: iterate Corpus.pieces)."""
    return Corpus(spec).documents()


def load_corpus(spec="pydocs"):
    """A small corpus as one string, its documents separated by "\\n\\n" (see `Corpus` for the specs)."""
    return "\n\n".join(corpus_documents(spec))


# ------------------------------------------------------------------------------------ token streams
def split_ranges(num_tokens, val_fraction=0.1, num_segments=10):
    """Deterministic train/val split of a token stream: ([(start, end), ...] train, [...] val).

    The stream is cut into `num_segments` equal segments and the last `val_fraction` of each is
    validation. A plain tail split would validate pydocs (sorted by name) on the modules at the end
    of the alphabet only; ten pieces sample the whole corpus and each stays long, contiguous text.
    >>> split_ranges(100, 0.1, num_segments=2)
    ([(0, 45), (50, 95)], [(45, 50), (95, 100)])
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bounds = [round(num_tokens * s / num_segments) for s in range(num_segments + 1)]
    train, val = [], []
    for start, end in zip(bounds, bounds[1:]):
        cut = end - round((end - start) * val_fraction)
        train.append((start, cut))
        val.append((cut, end))
    return train, val


def _batched(pieces, max_chars):
    """Consecutive (text, starts) pieces in lists of about `max_chars` characters (at least one piece each)."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class TokenCache:
    """A corpus encoded once into two flat files of token ids, train.bin and val.bin, reused by later runs.

    `corpus`: a Corpus, a spec for one ("pydocs", a path...: a string without a newline), a text (a string
    with a newline: one document), or a list of documents. Its pieces are encoded in order, by `workers`
    processes for a corpus of more than ENCODE_IN_PROCESSES_BYTES (default: one per core), streamed into
    one file, documents joined by the tokenizer's end-of-text id when it has one (a literal "<|endoftext|>"
    in a text is read as that token too), then cut into train.bin and val.bin by `split_ranges`.

    The files live in folder/<key>/ (default folder: cache_dir()/tokens), the key hashing the corpus's
    fingerprint, tokenizer.fingerprint and val_fraction: the same corpus and tokenizer reuse them, a change
    to either builds a new folder, and `rebuild` builds it again. A build happens in <key>.building/, which
    appears as <key>/ complete or not at all; one that was killed continues where it stopped (its progress
    is saved with the tokens), and under DDP (`runtime`) rank 0 builds while the others wait.
    """

    def __init__(self, corpus, tokenizer, folder=None, val_fraction=0.1, runtime=None, workers=None, log=print,
                 rebuild=False):
        if isinstance(corpus, str) and "\n" in corpus:
            corpus = Corpus([corpus])
        elif not isinstance(corpus, Corpus):
            corpus = Corpus(corpus)
        self.corpus_fingerprint = corpus.fingerprint
        self.fingerprint = tokenizer.fingerprint
        key = hashlib.sha256(repr((CACHE_FORMAT, self.corpus_fingerprint, self.fingerprint, val_fraction)).encode())
        self.dir = Path(folder or cache_dir() / "tokens") / key.hexdigest()[:20]
        self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
        is_main = runtime is None or runtime.is_main
        if is_main and rebuild and self.dir.exists():
            shutil.rmtree(self.dir)
        self.built = not (self.dir / "meta.json").exists()
        if self.built and is_main:
            self._build(corpus, tokenizer, val_fraction, workers, log)
        if runtime is not None:
            runtime.barrier()                       # rank 0's files are complete for everyone after this
        self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))

    def _encoded_pieces(self, corpus, tokenizer, workers, skip):
        """(ids as bytes, starts_document, characters) of each piece after the first `skip`, in order."""
        pieces = itertools.islice(corpus.pieces(), skip, None)
        if workers <= 1:
            for text, starts in pieces:
                ids = tokenizer.encode_to_numpy(text, allowed_special="all", dtype=self.dtype).tobytes()
                yield ids, starts, len(text)
            return
        # Processes, not threads: tiktoken's threads hold the GIL while turning ids into Python ints, and reach
        # less than one core's speed. fork shares the tokenizer with the workers where the platform has it.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        arguments = (f"llmfs-{tokenizer.name}", tokenizer.pattern, tokenizer.ranks, tokenizer.special_tokens,
                     self.dtype.name, tokenizer.normalizer == "NFC")
        # Small pieces (a folder of small files) travel in batches of about PIECE_CHARS characters: one task per
        # file would spend more time passing messages than encoding.
        batches, kept = itertools.tee(_batched(pieces, PIECE_CHARS))
        with multiprocessing.get_context(method).Pool(workers, _encode_worker.start, arguments) as pool:
            encoded = pool.imap(_encode_worker.encode_many, ([text for text, _ in batch] for batch in batches))
            for ids_of_batch, batch in zip(encoded, kept):
                for ids, (text, starts) in zip(ids_of_batch, batch):
                    yield ids, starts, len(text)

    def _build(self, corpus, tokenizer, val_fraction, workers, log):
        started = time.perf_counter()
        separator = np.asarray([tokenizer.eot_id], dtype=self.dtype).tobytes() if tokenizer.eot_id is not None else b""
        workers = workers or (os.cpu_count() or 1)
        workers = workers if corpus.num_bytes > ENCODE_IN_PROCESSES_BYTES else 1
        building = self.dir.with_name(self.dir.name + ".building")
        building.mkdir(parents=True, exist_ok=True)
        progress_path, all_path = building / "progress.json", building / "all.bin"
        done = {"pieces": 0, "tokens": 0, "characters": 0}
        if progress_path.exists() and all_path.exists():      # a build that was stopped: continue it
            done = json.loads(progress_path.read_text(encoding="utf-8"))
            log(f"tokens: continuing a stopped build at {done['characters'] / 1e6:.1f} MB of text")
        with open(all_path, "r+b" if all_path.exists() else "wb") as f:
            f.truncate(done["tokens"] * self.dtype.itemsize)   # what was written after the last saved progress
            f.seek(0, os.SEEK_END)
            last_log = last_save = time.perf_counter()
            size = corpus.num_bytes
            for ids, starts, characters in self._encoded_pieces(corpus, tokenizer, workers, done["pieces"]):
                if starts and done["tokens"] > 0 and separator:
                    f.write(separator)
                    done["tokens"] += 1
                f.write(ids)
                done["tokens"] += len(ids) // self.dtype.itemsize
                done["pieces"] += 1
                done["characters"] += characters
                now = time.perf_counter()
                if now - last_save > 5:                       # flushed tokens first, then the progress
                    f.flush()
                    atomic_write_bytes(progress_path, json.dumps(done).encode())
                    last_save = now
                if now - last_log > PROGRESS_SECONDS:
                    rate = done["characters"] / max(now - started, 1e-9)
                    eta = max(0.0, size - done["characters"]) / max(rate, 1.0)
                    log(f"tokens: encoded {done['characters'] / 1e6:,.1f}/~{size / 1e6:,.1f} MB | {rate / 1e6:.1f} MB/s"
                        f" | {done['tokens'] / 1e6:,.1f}M tokens | {workers} process{'es' if workers > 1 else ''}"
                        f" | ETA {format_seconds(eta)}")
                    last_log = now
        if done["tokens"] == 0:
            shutil.rmtree(building, ignore_errors=True)
            raise UserError(f"the corpus {corpus.spec!r} holds no text")
        # Cut the stream into the splits with plain reads of 16M tokens at a time, not a memmap: pages read
        # through a memmap count toward the process's resident memory, which would then grow with the corpus.
        train_ranges, val_ranges = split_ranges(done["tokens"], val_fraction)
        counts, itemsize = {}, self.dtype.itemsize
        with open(all_path, "rb") as stream:
            for split, ranges in (("train", train_ranges), ("val", val_ranges)):
                with open(building / f"{split}.bin", "wb") as out:
                    for start, end in ranges:
                        stream.seek(start * itemsize)
                        for block in range(start, end, 1 << 24):
                            out.write(stream.read((min(end, block + (1 << 24)) - block) * itemsize))
                counts[split] = sum(end - start for start, end in ranges)
        all_path.unlink()
        progress_path.unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        meta = {"format": CACHE_FORMAT, "corpus": corpus.spec, "corpus_fingerprint": self.corpus_fingerprint,
                "tokenizer": self.fingerprint, "dtype": self.dtype.name, "val_fraction": val_fraction,
                "pieces": done["pieces"], "characters": done["characters"], "num_tokens": counts,
                "seconds": round(seconds, 3), "workers": workers}
        (building / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(building, self.dir)                 # the folder appears complete, or not at all
        except OSError:
            if not (self.dir / "meta.json").exists():      # not another process finishing first: a real error
                raise
            shutil.rmtree(building, ignore_errors=True)
        if seconds > 2:
            log(f"tokens: {sum(counts.values()):,} tokens from {done['characters'] / 1e6:,.1f} MB in "
                f"{format_seconds(seconds)} ({done['characters'] / seconds / 1e6:.1f} MB/s, {workers} "
                f"process{'es' if workers > 1 else ''}) -> {self.dir}")

    def num_tokens(self, split):
        return self.meta["num_tokens"][split]

    def memmap(self, split):
        """The token ids of a split, as a read-only numpy memmap."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if self.num_tokens(split) == 0:                   # val_fraction=0: numpy cannot map an empty file
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")

    def get_batch(self, split, batch_size, block_size, device="cpu", generator=None):
        """`batch_size` random windows of the split: x (B, T) int64 and y = x shifted left by one token.

        `generator`: an optional CPU torch.Generator for reproducible windows.
        """
        # A new memmap every call, as nanoGPT does: pages touched through a long-lived memmap count
        # toward the process's resident memory and look like a leak on a large corpus.
        data = self.memmap(split)
        if len(data) <= block_size:
            raise UserError(f"the {split} split has {len(data)} tokens, not more than block_size={block_size}: "
                            f"use a smaller --block_size or a larger corpus")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))          # (B, T)
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))  # (B, T)
        device = torch.device(device)
        if device.type == "cuda":
            # Page-locked host memory lets the copy run asynchronously while the GPU keeps working.
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


# -------------------------------------------------------------------------------------- tasks
def _read_user_rows(path):
    """[(line number, row dict), ...] from a .jsonl or .csv file; anything malformed -> UserError."""
    text = _read_text_file(path)
    rows = []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                if None in row:
                    raise UserError(f"{path}:{reader.line_num}: more fields than the header has columns")
                if any(value is not None for value in row.values()):
                    rows.append((reader.line_num, row))
        except csv.Error as error:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({error})") from None
    else:
        raise UserError(f"{path}: a task file must be .jsonl or .csv")
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


_USER_COLUMNS = (("text", "label"), ("input", "target"), ("instruction", "response"))


def _load_user_task(path):
    """[(row key, split, example), ...] from a user's file; the split is a stable hash of the row."""
    rows = _read_user_rows(path)
    first_line, first_row = rows[0]
    columns = next((c for c in _USER_COLUMNS if set(c) <= set(first_row)), None)
    if columns is None:
        header_line = 1 if path.suffix.lower() == ".csv" else first_line   # a CSV names its columns on line 1
        raise UserError(f"{path}:{header_line}: expected the columns text,label or input,target or "
                        f"instruction,input,response; found {','.join(map(str, first_row))}")
    if columns[0] == "instruction":
        columns = ("instruction", "input", "response")     # "input" may be absent or empty
    examples = []
    for number, row in rows:
        example = {}
        for column in columns:
            value = row.get(column, "" if column == "input" and columns[0] == "instruction" else None)
            if value is None:
                raise UserError(f"{path}:{number}: missing the column {column!r}")
            if isinstance(value, (dict, list)):
                raise UserError(f"{path}:{number}: {column!r} must be a string, got {type(value).__name__}")
            example[column] = value if isinstance(value, str) else json.dumps(value)
        key = json.dumps(example, sort_keys=True, ensure_ascii=False)
        examples.append((key, split_of(key), example))
    return examples


def load_task(name_or_path, split, num_labels=10):
    """The examples of a finetuning task in one split, as a list of small dicts.

    Built-in tasks (from the standard library's docstrings; `_record_examples` says how each is made):
        "docstring-module"   {"text", "label"}  the label is one of the `num_labels` top-level modules
                                                with the most train examples (ties: alphabetical)
        "docstring-summary"  {"input", "target"}
        "docstring-name"     {"input", "target"}
        "python-qa"          {"instruction", "input", "response"}
    or a .jsonl / .csv file with the columns text,label | input,target | instruction,input,response
    ("input" optional), split by a stable hash of each row, so a row's split never changes.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    if name_or_path in TASKS:
        examples = _pydocs_tasks()[name_or_path]
        if name_or_path == "docstring-module":
            counts = Counter(example["label"] for _, s, example in examples if s == "train")
            labels = set(sorted(counts, key=lambda label: (-counts[label], label))[:num_labels])
            examples = [item for item in examples if item[2]["label"] in labels]
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"no such task or file: {name_or_path!r} (tasks: {', '.join(TASKS)}; or a .jsonl/.csv file)")
        examples = _load_user_task(path)
    chosen = [dict(example) for _, s, example in examples if s == split]
    if not chosen:
        raise UserError(f"{name_or_path}: no examples fell in the {split!r} split ({len(examples)} in all; "
                        f"about 10% go to val and to test, so use at least ~30 rows)")
    return chosen


def task_labels(examples):
    """The sorted distinct labels of classification examples ({"label": ...})."""
    return sorted({example["label"] for example in examples})


def _answer(example):
    for key in ("label", "target", "response"):
        if key in example:
            return example[key]
    raise KeyError(f"an example needs a label, target or response; got keys {sorted(example)}")


def majority_baseline(train_examples, eval_examples):
    """Accuracy of always answering the most common train label (ties: the smallest) on `eval_examples`.

    Works for text targets too (exact match): the floor any finetuned model has to beat.
    >>> majority_baseline([{"label": "a"}, {"label": "a"}, {"label": "b"}], [{"label": "a"}, {"label": "b"}])
    0.5
    """
    counts = Counter(_answer(example) for example in train_examples)
    if not counts or not eval_examples:
        raise ValueError("majority_baseline needs train and eval examples")
    guess = min(counts, key=lambda answer: (-counts[answer], answer))
    return sum(_answer(example) == guess for example in eval_examples) / len(eval_examples)


# ------------------------------------------------------------------------------------ padded batches
def pad_batch(sequences, pad_id, labels=None, max_len=None, pad_side="right"):
    """Pad variable-length token sequences into one batch of LongTensors.

    input_ids (B, T)       the sequences padded with pad_id to the longest one, T
    attention_mask (B, T)  1 at real tokens, 0 at padding
    labels (B, T)          `labels` (per-token lists like the sequences; default: the input ids) with
                           -100, the index cross-entropy ignores, at padding
    max_len cuts longer sequences (and their labels) to their first max_len tokens. pad_side="left"
    puts the padding first, so that the last position holds every row's last token (generation).
    >>> pad_batch([[5, 6, 7], [8]], pad_id=0)["attention_mask"].tolist()
    [[1, 1, 1], [1, 0, 0]]
    """
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    sequences = [list(map(int, s))[:max_len] for s in sequences]
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    labels = sequences if labels is None else [list(map(int, l))[:max_len] for l in labels]
    if [len(l) for l in labels] != [len(s) for s in sequences]:
        raise ValueError("labels must have one entry per token of each sequence")
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    label_ids = torch.full((len(sequences), T), -100, dtype=torch.long)
    for row, (sequence, label) in enumerate(zip(sequences, labels)):
        n = len(sequence)
        positions = slice(0, n) if pad_side == "right" else slice(T - n, T)
        input_ids[row, positions] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, positions] = 1
        label_ids[row, positions] = torch.tensor(label, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def batch_indices(lengths, batch_size, shuffle, seed=0, bucket=False):
    """Example indices grouped into batches (the last one may be smaller); deterministic given the seed.

    bucket=True groups examples of similar length, so padding wastes little compute: with shuffle,
    the shuffled order is cut into chunks of 50 batches, each chunk sorted by length and cut into
    batches, and the batches shuffled (random, but batch-wise homogeneous, as in fairseq and
    torchtext); without shuffle, all examples in length order.
    >>> batch_indices([5, 1, 4, 2], batch_size=2, shuffle=False, bucket=True)
    [[1, 3], [2, 0]]
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        chunk = 50 * batch_size if shuffle else max(len(order), 1)
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=lambda i: lengths[i])]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if bucket and shuffle:
        rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------ conversations and preference pairs
CHAT_ROLES = ("system", "user", "assistant")
CHAT_SYSTEM_PROMPT = "You answer questions about the Python standard library in one sentence."
FOLLOW_UPS = ("And `{}`?", "What about `{}`?", "How about `{}`?")


def _stable_choice(key, options):
    """One of `options`, picked by a sha1 of `key`: the same pick in every process, on every machine."""
    return options[int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % len(options)]


def _pydocs_qa_groups():
    """{(split, parent): [(qualname, question, answer), ...]} from the python-qa examples, where parent is
    the module or class an object sits in (`json` for json.dumps, `json.JSONDecoder` for its methods).

    Grouping within a split keeps every conversation and every preference pair on one side of it. A val or
    test object whose answer is also a train answer or occurs in the pretraining corpus is left out
    (bisect_right's summary is bisect_left's first sentence): no held-out answer was ever seen in training."""
    examples = _pydocs_tasks()["python-qa"]
    train_answers = {example["response"] for _, split, example in examples if split == "train"}
    pretraining = "\n\n".join(pydocs_parts().values())
    groups = {}
    for qualname, split, example in examples:
        if split != "train" and (example["response"] in train_answers or example["response"] in pretraining):
            continue
        parent = qualname.rsplit(".", 1)[0] if "." in qualname else qualname
        groups.setdefault((split, parent), []).append((qualname, example["instruction"], example["response"]))
    return groups


def pydocs_conversations(split):
    """Multi-turn conversations about the standard library, built offline from the python-qa examples:
    two to four objects of one module or class (one where it documents a single object), the first
    question asked in full, the later ones referring back to it ("And `json.loads`?"), half of them under
    a system prompt.

    >>> pydocs_conversations("train")[0]["messages"][:3]      # doctest: +SKIP
    [{'role': 'user', 'content': 'What does `abc.abstractmethod` do?'},
     {'role': 'assistant', 'content': 'A decorator indicating abstract methods.'},
     {'role': 'user', 'content': 'And `abc.get_cache_token`?'}, ...]
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    conversations = []
    for (group_split, parent), objects in sorted(_pydocs_qa_groups().items()):
        if group_split != split:
            continue
        start = 0
        while start < len(objects):
            size = _stable_choice("turns:" + objects[start][0], (2, 3, 4))
            if len(objects) - (start + size) == 1:            # no one-object leftover: take it, or leave two
                size = size + 1 if size < 4 else 3
            chunk, start = objects[start:start + size], start + size
            messages = []
            if _stable_choice("system:" + chunk[0][0], (True, False)):
                messages.append({"role": "system", "content": CHAT_SYSTEM_PROMPT})
            for turn, (qualname, question, answer) in enumerate(chunk):
                if turn:
                    question = _stable_choice("follow:" + qualname, FOLLOW_UPS).format(
                        qualname.removeprefix("builtins."))
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            conversations.append({"messages": messages})
    return conversations


def pydocs_preferences(split):
    """Preference pairs built offline: {"prompt": "What does `json.dumps` do?", "chosen": its summary,
    "rejected": another object's summary from the same module or class (a plausible wrong answer)}.

    The wrong answer comes from the same split and group, picked by a stable hash; objects alone in
    their group (or whose siblings all share their summary) give no pair."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    pairs = []
    for (group_split, _), objects in sorted(_pydocs_qa_groups().items()):
        if group_split != split:
            continue
        for qualname, question, answer in objects:
            others = sorted({other for _, _, other in objects if other != answer})
            if others:
                rejected = min(others, key=lambda other: hashlib.sha1(f"{qualname}\n{other}".encode()).hexdigest())
                pairs.append({"prompt": question, "chosen": answer, "rejected": rejected})
    return pairs


def _user_rows_in_split(path, split):
    """[(line number, row)] of a user's .jsonl whose split (a stable hash of the row) is `split`."""
    if Path(path).suffix.lower() != ".jsonl":
        raise UserError(f"{path}: conversations and preference pairs are read from .jsonl files")
    rows = _read_user_rows(Path(path))
    chosen = [(n, row) for n, row in rows if split_of(json.dumps(row, sort_keys=True, ensure_ascii=False)) == split]
    if not chosen:
        raise UserError(f"{path}: no rows fell in the {split!r} split ({len(rows)} in all; about 10% go to val "
                        f"and to test, so use at least ~30 rows)")
    return chosen


def is_conversation_file(path):
    """True when a .jsonl task file's first row has "messages" (the common chat format)."""
    path = Path(path).expanduser()
    return path.suffix.lower() == ".jsonl" and path.is_file() and "messages" in _read_user_rows(path)[0][1]


def load_conversations(name_or_path, split):
    """Conversations {"messages": [{"role", "content"}, ...]} of one split: "pydocs" (the built-in ones,
    `pydocs_conversations`) or a .jsonl file of rows in that common form. A file's row needs messages
    with roles system (first only) / user / assistant, string contents, and at least one assistant
    message; anything else is one line naming the row."""
    if name_or_path == "pydocs":
        return pydocs_conversations(split)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(f"no such conversation file: {name_or_path!r}")
    conversations = []
    for number, row in _user_rows_in_split(path, split):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{path}:{number}: expected \"messages\": a non-empty list of {{\"role\", \"content\"}}")
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or set(message) < {"role", "content"}:
                raise UserError(f"{path}:{number}: message {position + 1} needs \"role\" and \"content\"")
            if message["role"] not in CHAT_ROLES:
                raise UserError(f"{path}:{number}: message {position + 1} has the role {message['role']!r} "
                                f"(roles: {', '.join(CHAT_ROLES)})")
            if message["role"] == "system" and position:
                raise UserError(f"{path}:{number}: a system message may only come first")
            if not isinstance(message["content"], str):
                raise UserError(f"{path}:{number}: message {position + 1}'s content must be a string")
        if not any(message["role"] == "assistant" for message in messages):
            raise UserError(f"{path}:{number}: no assistant message: nothing to learn from this conversation")
        conversations.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    return conversations


def load_preferences(name_or_path, split):
    """Preference pairs {"prompt", "chosen", "rejected"} of one split: "pydocs" (`pydocs_preferences`) or a
    .jsonl file of rows with those three string fields."""
    if name_or_path == "pydocs":
        return pydocs_preferences(split)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(f"no such preference file: {name_or_path!r} (pydocs, or a .jsonl of prompt, chosen, rejected)")
    pairs = []
    for number, row in _user_rows_in_split(path, split):
        for field in ("prompt", "chosen", "rejected"):
            if field not in row:
                raise UserError(f"{path}:{number}: missing the field {field!r} (a pair is prompt, chosen, rejected)")
            if not isinstance(row[field], str) or not row[field].strip():
                raise UserError(f"{path}:{number}: {field!r} must be a non-empty string")
        pairs.append({field: row[field] for field in ("prompt", "chosen", "rejected")})
    return pairs

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
import hashlib
import inspect
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import atomic_write_bytes, cache_dir
from common.config import UserError
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


def pydocs_parts():
    """The two halves of the pydocs corpus: {"topics": str, "docstrings": str} (train docstrings only)."""
    pydocs = _pydocs()
    return {"topics": "\n\n".join(pydocs["topics"]), "docstrings": "\n\n".join(pydocs["docstrings"])}


# ------------------------------------------------------------------------------------------ corpora
def _download(name):
    """The local paths of a named corpus's files, downloaded once into the cache folder."""
    paths = []
    for url in CORPUS_URLS[name]:
        # The URL's hash in the file name: pointing CORPUS_URLS elsewhere never reuses a stale file.
        digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:8]
        path = cache_dir() / "corpora" / f"{name}-{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"
        if not path.exists():
            print(f"data: downloading {name} from {url}")
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    content = response.read()
            except (OSError, ValueError) as error:           # URLError, HTTPError and timeouts are OSErrors
                reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
                raise UserError(f"could not download {name} from {url} ({reason}); offline? get the file "
                                f"another way and pass it with --data path/to/file.txt") from None
            atomic_write_bytes(path, content)
        paths.append(path)
    return paths


def corpus_documents(spec="pydocs"):
    """The documents of a corpus, in order (see `load_corpus` for the specs)."""
    if isinstance(spec, str) and spec == "pydocs":
        pydocs = _pydocs()
        return pydocs["topics"] + pydocs["docstrings"]
    if isinstance(spec, str) and spec in CORPUS_URLS:
        return [_read_text_file(path) for path in _download(spec)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"no .txt files in the folder {path}")
        return [_read_text_file(file) for file in files]
    if path.exists():
        return [_read_text_file(path)]
    raise UserError(f"no such file, folder or corpus: {spec!r} (corpora: pydocs, {', '.join(CORPUS_URLS)}; "
                    f"or a .txt file, or a folder of .txt files)")


def load_corpus(spec="pydocs"):
    """A corpus as one string, its documents separated by "\\n\\n".

    spec: "pydocs" (default, offline), "shakespeare" or "wikitext-2" (downloaded once), a text file,
    or a folder (its .txt files, recursively, in sorted path order). Missing, empty, binary or
    non-UTF-8 files, and downloads that fail, raise UserError with one line saying what to do.
    """
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


class TokenCache:
    """A corpus encoded once into two flat files of token ids, train.bin and val.bin, reused by later runs.

    `corpus` is a spec for `corpus_documents` (a string without a newline: "pydocs", a path...), a
    text (a string with a newline: one document), or a list of documents. Documents are encoded in
    batches (tiktoken's threads) and joined with the tokenizer's "<|endoftext|>" id when it has one;
    a literal "<|endoftext|>" inside a document is read as that token too. The files live in
    folder/<key>/ (default folder: cache_dir()/tokens), where the key hashes the documents,
    tokenizer.fingerprint and val_fraction: the same corpus and tokenizer reuse them, a change to
    either builds a new folder.
    """

    def __init__(self, corpus, tokenizer, folder=None, val_fraction=0.1):
        if isinstance(corpus, (list, tuple)):
            documents = list(corpus)
        elif isinstance(corpus, str) and "\n" in corpus:
            documents = [corpus]
        else:
            documents = corpus_documents(corpus)
        if not any(documents):
            raise UserError("the corpus is empty")
        self.corpus_sha256 = documents_sha256(documents)
        self.fingerprint = tokenizer.fingerprint
        key = hashlib.sha256(repr((CACHE_FORMAT, self.corpus_sha256, self.fingerprint, val_fraction)).encode()).hexdigest()
        self.dir = Path(folder or cache_dir() / "tokens") / key[:20]
        self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
        self.built = not (self.dir / "meta.json").exists()
        if self.built:
            self._build(documents, tokenizer, val_fraction)
        self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))

    def _build(self, documents, tokenizer, val_fraction):
        started = time.perf_counter()
        separator = tokenizer.special_tokens.get("<|endoftext|>")
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=self.dir.parent, prefix=self.dir.name + "."))
        try:
            # Encode batch by batch into one flat file, so that a large corpus never sits in memory as
            # Python lists of ints; then cut that file into the train and val files.
            all_path = building / "all.bin"
            with open(all_path, "wb") as f:
                batch, batch_chars, written = [], 0, 0
                for k, document in enumerate(documents):
                    batch.append(document)
                    batch_chars += len(document)
                    if batch_chars >= 4_000_000 or k == len(documents) - 1:
                        for ids in tokenizer.encode_batch(batch, allowed_special="all"):
                            if separator is not None and written > 0:
                                ids = [separator] + ids
                            np.asarray(ids, dtype=self.dtype).tofile(f)
                            written += len(ids)
                        batch, batch_chars = [], 0
            stream = np.memmap(all_path, dtype=self.dtype, mode="r")
            train_ranges, val_ranges = split_ranges(len(stream), val_fraction)
            counts = {}
            for split, ranges in (("train", train_ranges), ("val", val_ranges)):
                with open(building / f"{split}.bin", "wb") as f:
                    for start, end in ranges:
                        stream[start:end].tofile(f)
                counts[split] = sum(end - start for start, end in ranges)
            del stream
            all_path.unlink()
            meta = {"format": CACHE_FORMAT, "corpus_sha256": self.corpus_sha256, "tokenizer": self.fingerprint,
                    "dtype": self.dtype.name, "val_fraction": val_fraction, "documents": len(documents),
                    "num_tokens": counts, "seconds": round(time.perf_counter() - started, 3)}
            (building / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            try:
                os.replace(building, self.dir)             # the folder appears complete, or not at all
            except OSError:
                if not (self.dir / "meta.json").exists():  # not another process finishing first: a real error
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)    # gone already when os.replace succeeded

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

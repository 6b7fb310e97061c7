"""Tests of common/data.py: corpora, splits, token caches, batches and tasks.

The pydocs corpus is built once for this module into a temporary cache folder (LLMFS_CACHE), so the
tests never read or write the user's ~/.cache.
"""

import gzip
import http.server
import json
import os
import re
import socket
import threading
import time
from functools import partial

import numpy as np
import pytest
import torch

from common import data
from common.config import UserError
from common.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def pydocs(tmp_path_factory):
    """The pydocs build in a fresh cache folder: (seconds it took, the cached dict)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMFS_CACHE", str(tmp_path_factory.mktemp("pydocs_cache")))
        started = time.perf_counter()
        built = data._pydocs()
        yield time.perf_counter() - started, built


@pytest.fixture(scope="module")
def tokenizer():
    text = "".join(f"def f{i}(x):\n    return x * {i} + len('hello world')\n\n" for i in range(200))
    return BPETokenizer.train(text, vocab_size=300, special_tokens=("<|endoftext|>",))


DOCUMENTS = [f"Document {k}: " + " ".join(f"word{(k * 7 + j) % 50}" for j in range(120)) for k in range(12)]


# ------------------------------------------------------------------------------------------- splits
def test_split_of_is_stable_and_close_to_80_10_10():
    assert [data.split_of(q) for q in ("json.dumps", "json.JSONDecoder.decode", "json.JSONEncoder")] == \
        ["train", "val", "test"]
    splits = [data.split_of(f"module{i}.function{i}") for i in range(20000)]
    assert splits == [data.split_of(f"module{i}.function{i}") for i in range(20000)]
    shares = {s: splits.count(s) / len(splits) for s in data.SPLITS}
    assert abs(shares["train"] - 0.8) < 0.015 and abs(shares["val"] - 0.1) < 0.01 and abs(shares["test"] - 0.1) < 0.01


def test_split_ranges_partition_the_stream():
    train, val = data.split_ranges(1003, 0.1)
    covered = sorted(train + val)
    assert covered[0][0] == 0 and covered[-1][1] == 1003
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))          # contiguous, no overlap
    assert sum(e - s for s, e in val) == pytest.approx(100, abs=5)
    assert len(val) == 10 and val[-1][1] == 1003                             # val pieces spread over the stream


# --------------------------------------------------------------------------------------- pydocs corpus
def test_pydocs_corpus_is_built_quickly_and_has_both_parts(pydocs):
    seconds, built = pydocs
    assert seconds < 60, f"building pydocs took {seconds:.1f}s"
    corpus = data.load_corpus("pydocs")
    parts = data.pydocs_parts()
    assert corpus == parts["topics"] + "\n\n" + parts["docstrings"] == "\n\n".join(data.corpus_documents("pydocs"))
    assert 1_000_000 < len(corpus) < 4_000_000
    assert 'The "assert" statement' in parts["topics"]
    assert len(built["records"]) > 2000
    qualnames = [r["qualname"] for r in built["records"]]
    assert qualnames == sorted(set(qualnames))                                # deterministic order, unique
    assert len({r["text"] for r in built["records"]}) == len(built["records"])  # duplicates collapsed
    moved = [r for r in built["records"] if r["split"] != data.split_of(r["qualname"])]
    assert len(moved) < 0.02 * len(built["records"])        # only near-duplicates follow their group's split
    assert all(len(r["text"]) >= data.MIN_DOC_CHARS for r in built["records"])
    modules = [r["qualname"].split(".") for r in built["records"] if r["kind"] == "module"]
    assert {"json", "collections", "builtins"} <= {parts[0] for parts in modules}
    assert not any(set(parts) & {"test", "tests", "idlelib", "tkinter", "turtle", "antigravity"} for parts in modules)
    assert {"module", "class", "function", "method"} == {r["kind"] for r in built["records"]}


def test_pydocs_rebuild_is_identical(pydocs, tmp_path, monkeypatch):
    """A second build from scratch (another cache folder, another str-hash seed in the child) is equal."""
    _, built = pydocs
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path))
    rebuilt = data._pydocs()
    assert rebuilt is not built
    assert rebuilt["records"] == built["records"]
    assert rebuilt["topics"] == built["topics"] and rebuilt["docstrings"] == built["docstrings"]


def test_no_val_or_test_docstring_is_in_the_pretraining_corpus(pydocs):
    _, built = pydocs
    corpus = data.load_corpus("pydocs")
    held_out = {r["text"] for r in built["records"] if r["split"] != "train"}
    for task, field in (("docstring-module", "text"), ("docstring-summary", "input"), ("docstring-name", "input")):
        for split in ("val", "test"):
            held_out.update(e[field] for e in data.load_task(task, split, num_labels=1000))
    assert len(held_out) > 1000
    # Verbatim openings, not whole texts: a near-duplicate under another name (parse_qs, parse_qsl)
    # shares its first 200 characters and would leak them.
    leaked = [text[:60] for text in held_out if text[:200] in corpus]
    assert not leaked, f"{len(leaked)} held-out texts open as a corpus text does, e.g. {leaked[:3]}"
    # The check can fail: the train docstrings are there.
    train_texts = [r["text"] for r in built["records"] if r["split"] == "train"]
    assert sum(text[:200] in corpus for text in train_texts[:300]) > 280


def test_near_duplicate_docstrings_share_a_split(pydocs):
    _, built = pydocs
    split = {r["qualname"]: r["split"] for r in built["records"]}
    for first, second in [("urllib.parse.parse_qs", "urllib.parse.parse_qsl"),
                          ("email.policy.EmailPolicy.header_fetch_parse", "email._policybase.Compat32.header_fetch_parse")]:
        if first in split and second in split:
            assert split[first] == split[second], (first, second)
    groups = {}
    for r in built["records"]:
        groups.setdefault(data._near_duplicate_key(r["text"]), set()).add(r["split"])
    assert all(len(splits) == 1 for splits in groups.values())


# ------------------------------------------------------------------------------------------------ tasks
TASK_KEYS = {"docstring-module": {"text", "label"}, "docstring-summary": {"input", "target"},
             "docstring-name": {"input", "target"}, "python-qa": {"instruction", "input", "response"}}


@pytest.mark.parametrize("task", data.TASKS)
def test_tasks_have_their_keys_and_splits_never_share_an_object_or_an_input(pydocs, task):
    for split in data.SPLITS:
        examples = data.load_task(task, split)
        assert len(examples) >= 50
        assert all(set(e) == TASK_KEYS[task] and all(isinstance(v, str) for v in e.values()) for e in examples)
    items = data._pydocs_tasks()[task]
    record_split = {r["qualname"]: r["split"] for r in pydocs[1]["records"]}
    assert all(split == record_split[qualname] for qualname, split, _ in items)
    assert len({qualname for qualname, _, _ in items}) == len(items)        # one example per object
    field = {"docstring-module": "text", "python-qa": "instruction"}.get(task, "input")
    inputs = {s: {e[field] for e in data.load_task(task, s)} for s in data.SPLITS}
    assert not (inputs["train"] & inputs["val"]) and not (inputs["train"] & inputs["test"]) and not (inputs["val"] & inputs["test"])


def test_docstring_module_keeps_the_most_frequent_modules(pydocs):
    train = data.load_task("docstring-module", "train", num_labels=3)
    labels = data.task_labels(train)
    assert len(labels) == 3
    assert set(data.task_labels(data.load_task("docstring-module", "test", num_labels=3))) <= set(labels)
    everything = data.load_task("docstring-module", "train", num_labels=1000)
    counts = sorted({label: sum(e["label"] == label for e in everything) for label in data.task_labels(everything)}.values())
    assert sorted(sum(e["label"] == label for e in train) for label in labels) == counts[-3:]
    assert all(len(e["text"]) <= data.MAX_TEXT_CHARS for e in everything)
    assert 0 < data.majority_baseline(train, data.load_task("docstring-module", "val", num_labels=3)) < 1


def test_docstring_name_inputs_never_contain_the_answer(pydocs):
    for split in data.SPLITS:
        for example in data.load_task("docstring-name", split):
            assert not re.search(rf"(?<!\w){re.escape(example['target'])}(?!\w)", example["input"]), example


def test_python_qa_asks_about_the_object_and_answers_with_its_summary(pydocs):
    _, built = pydocs
    texts = {r["qualname"]: r["text"] for r in built["records"]}
    examples = data.load_task("python-qa", "train")
    assert len({e["instruction"].split("`")[0] for e in examples}) >= 4     # phrasings vary
    for example in examples[:200]:
        shown = example["instruction"].split("`")[1]
        assert example["response"].split()[0] in texts.get(shown, texts.get("builtins." + shown, ""))


def test_majority_baseline_and_task_labels():
    train = [{"label": "b"}, {"label": "a"}, {"label": "b"}, {"label": "c"}]
    assert data.task_labels(train) == ["a", "b", "c"]
    assert data.majority_baseline(train, [{"label": "b"}, {"label": "a"}, {"label": "b"}, {"label": "c"}]) == 0.5
    assert data.majority_baseline([{"target": "x"}, {"target": "y"}], [{"target": "x"}]) == 1.0  # tie -> smallest


def test_unknown_task_or_split_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such task or file"):
        data.load_task("docstring-color", "train")
    with pytest.raises(UserError, match="unknown split"):
        data.load_task("python-qa", "dev")


# ---------------------------------------------------------------------------------------- user files
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_user_jsonl_and_csv_load_with_stable_disjoint_splits(tmp_path):
    rows = [{"text": f"example number {i}", "label": ["spam", "ham"][i % 2]} for i in range(200)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    loaded = {s: data.load_task(str(path), s) for s in data.SPLITS}
    assert sorted(e["text"] for s in data.SPLITS for e in loaded[s]) == sorted(r["text"] for r in rows)
    assert 130 < len(loaded["train"]) < 190 and loaded["val"] and loaded["test"]
    assert data.task_labels(loaded["train"]) == ["ham", "spam"]
    # A row's split depends on the row alone: adding rows moves none of the old ones.
    write_jsonl(path, rows + [{"text": f"new row {i}", "label": "ham"} for i in range(50)])
    assert all(e in data.load_task(str(path), "test") for e in loaded["test"])

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("input,target\n" + "".join(f'"line, {i}",out {i}\n' for i in range(100)), encoding="utf-8")
    pairs = [e for s in data.SPLITS for e in data.load_task(str(csv_path), s)]
    assert sorted(pairs, key=lambda e: e["input"]) == sorted(
        ({"input": f"line, {i}", "target": f"out {i}"} for i in range(100)), key=lambda e: e["input"])

    instructions = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"Say {i}.", "response": str(i)} for i in range(60)])
    sft = [e for s in data.SPLITS for e in data.load_task(str(instructions), s)]
    assert len(sft) == 60 and all(e.keys() == {"instruction", "input", "response"} and e["input"] == "" for e in sft)


@pytest.mark.parametrize("name, content, message", [
    ("absent.jsonl", None, "no such task or file"),
    ("empty.jsonl", "", "is empty"),
    ("blank.csv", "\n\n", "is empty"),
    ("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", label: z}\n', r"broken\.jsonl:3: not valid JSON"),
    ("list.jsonl", '["text", "label"]\n', r"list\.jsonl:1: expected a JSON object"),
    ("columns.jsonl", '{"question": "a", "answer": "b"}\n', r"columns\.jsonl:1: expected the columns text,label"),
    ("row.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n', r"row\.jsonl:3: missing the column 'label'"),
    ("short.csv", "text,label\nhello,greeting\nbye\n", r"short\.csv:3: missing the column 'label'"),
    ("long.csv", "text,label\nhello,greeting,extra\n", r"long\.csv:2: more fields than the header"),
    ("header.csv", "text\nhello\n", r"header\.csv:1: expected the columns"),
    ("nested.jsonl", '{"text": {"a": 1}, "label": "x"}\n', r"nested\.jsonl:1: 'text' must be a string"),
    ("table.tsv", "text\tlabel\n", r"must be \.jsonl or \.csv"),
])
def test_bad_task_files_give_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as error:
        data.load_task(str(path), "train")
    assert "\n" not in str(error.value) and (name in str(error.value))


def test_too_few_rows_for_a_split_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "only", "label": "one"}])
    split = data.split_of(json.dumps({"label": "one", "text": "only"}, sort_keys=True))
    other = "val" if split != "val" else "test"
    assert data.load_task(str(path), split) == [{"text": "only", "label": "one"}]
    with pytest.raises(UserError, match="no examples fell in"):
        data.load_task(str(path), other)


# -------------------------------------------------------------------------------------- text corpora
def test_text_file_and_folder_corpora(tmp_path):
    (tmp_path / "b.txt").write_text("second\r\nfile\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a .txt file", encoding="utf-8")
    assert data.load_corpus(str(tmp_path / "b.txt")) == "second\nfile\n"
    assert data.corpus_documents(tmp_path) == ["first file\n", "second\nfile\n", "third"]
    assert data.load_corpus(str(tmp_path)) == "first file\n\n\nsecond\nfile\n\n\nthird"


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no such file, folder or corpus"),
    ("empty.txt", b"", "is empty"),
    ("spaces.txt", b"  \n\n ", "is empty"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8 text"),
])
def test_bad_corpus_files_give_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.load_corpus(str(path))


def test_folder_without_text_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files"):
        data.load_corpus(str(tmp_path))


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):
        CountingHandler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/site, shut down after the test."""
    site = tmp_path / "site"
    site.mkdir()
    CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(CountingHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_named_corpora_download_once_into_the_cache(tmp_path, monkeypatch, file_server):
    site, url = file_server
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path / "cache"))
    (site / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n", encoding="utf-8")
    for part in ("train", "valid", "test"):
        (site / f"{part}.txt").write_text(f" = {part} = \n", encoding="utf-8")
    monkeypatch.setitem(data.CORPUS_URLS, "shakespeare", [f"{url}/input.txt"])
    monkeypatch.setitem(data.CORPUS_URLS, "wikitext-2", [f"{url}/{p}.txt" for p in ("train", "valid", "test")])

    assert data.load_corpus("shakespeare").startswith("First Citizen:\nBefore we proceed")
    assert CountingHandler.requests == ["/input.txt"]
    (site / "input.txt").unlink()                                       # the second load reads the cache
    assert data.load_corpus("shakespeare").startswith("First Citizen:")
    assert CountingHandler.requests == ["/input.txt"]
    assert data.corpus_documents("wikitext-2") == [" = train = \n", " = valid = \n", " = test = \n"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))                # written atomically, nothing left over
    monkeypatch.setitem(data.CORPUS_URLS, "shakespeare", [f"{url}/moved.txt"])
    with pytest.raises(UserError, match="HTTP Error 404.*--data PATH"):
        data.load_corpus("shakespeare")


def test_unreachable_download_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path / "cache"))
    with socket.socket() as probe:                                      # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setitem(data.CORPUS_URLS, "shakespeare", [f"http://127.0.0.1:{port}/input.txt"])
    with pytest.raises(UserError, match=r"could not download shakespeare .*--data PATH"):
        data.load_corpus("shakespeare")
    assert not (tmp_path / "cache" / "corpora").exists() or not list((tmp_path / "cache" / "corpora").iterdir())


# --------------------------------------------------------------------------------------- token caches
def test_token_cache_encodes_documents_with_separators_and_splits_them(tmp_path, tokenizer):
    tokens = data.TokenCache(DOCUMENTS, tokenizer, tmp_path)
    eot = tokenizer.special_tokens["<|endoftext|>"]
    stream = []
    for document in DOCUMENTS:
        stream += ([eot] if stream else []) + tokenizer.encode(document)
    train_ranges, val_ranges = data.split_ranges(len(stream), 0.1)
    assert tokens.memmap("train").dtype == np.uint16
    assert tokens.memmap("train").tolist() == [t for s, e in train_ranges for t in stream[s:e]]
    assert tokens.memmap("val").tolist() == [t for s, e in val_ranges for t in stream[s:e]]
    assert tokens.num_tokens("train") + tokens.num_tokens("val") == len(stream)


def test_get_batch_returns_shifted_windows(tmp_path, tokenizer):
    tokens = data.TokenCache(DOCUMENTS, tokenizer, tmp_path)
    train = torch.from_numpy(tokens.memmap("train").astype(np.int64))
    x, y = tokens.get_batch("train", 8, 16, "cpu", generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):                                   # each row is a window of train.bin
        starts = [i for i in range(len(train) - 16) if torch.equal(train[i:i + 16], row_x)]
        assert starts and any(torch.equal(train[i + 1:i + 17], row_y) for i in starts)
    again = tokens.get_batch("train", 8, 16, "cpu", generator=torch.Generator().manual_seed(0))
    other = tokens.get_batch("train", 8, 16, "cpu", generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again[0]) and not torch.equal(x, other[0])
    vx, _ = tokens.get_batch("val", 2, 16, torch.device("cpu"))
    assert vx.shape == (2, 16)
    with pytest.raises(UserError, match="block_size"):
        tokens.get_batch("val", 2, tokens.num_tokens("val"), "cpu")


def test_token_cache_is_reused_and_rebuilt_when_corpus_or_tokenizer_change(tmp_path, tokenizer, monkeypatch):
    first = data.TokenCache(DOCUMENTS, tokenizer, tmp_path)
    assert first.built
    stamp = (first.dir / "train.bin").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(tokenizer, "encode_to_numpy",
                        lambda *a, **k: calls.append(1) or BPETokenizer.encode_to_numpy(tokenizer, *a, **k))
    second = data.TokenCache(DOCUMENTS, tokenizer, tmp_path)
    assert not second.built and not calls and second.dir == first.dir
    assert (second.dir / "train.bin").stat().st_mtime_ns == stamp

    changed_text = data.TokenCache(DOCUMENTS[:-1] + [DOCUMENTS[-1] + "!"], tokenizer, tmp_path)
    assert changed_text.built and calls and changed_text.dir != first.dir
    other_tokenizer = BPETokenizer.train("\n".join(DOCUMENTS), vocab_size=280, special_tokens=("<|endoftext|>",))
    changed_tokenizer = data.TokenCache(DOCUMENTS, other_tokenizer, tmp_path)
    assert changed_tokenizer.built and changed_tokenizer.dir not in (first.dir, changed_text.dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (first.dir, changed_text.dir, changed_tokenizer.dir))


def test_token_cache_reads_specs_and_uses_uint32_for_large_vocabularies(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 100, encoding="utf-8")
    big = BPETokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 70_000})
    tokens = data.TokenCache(str(corpus), big, tmp_path / "cache")
    assert tokens.memmap("train").dtype == np.uint32
    assert tokens.num_tokens("train") + tokens.num_tokens("val") == len("hello world\n" * 100)
    with pytest.raises(UserError, match="no such file"):
        data.TokenCache(str(tmp_path / "absent.txt"), big, tmp_path / "cache")


# ------------------------------------------------------------------------------------- padded batches
def test_pad_batch_right_and_left():
    batch = data.pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    left = data.pad_batch([[5, 6, 7], [8]], pad_id=1, pad_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[5, 6, 7], [-100, -100, 8]]


def test_pad_batch_with_labels_and_max_len():
    batch = data.pad_batch([[5, 6, 7, 8], [9]], pad_id=0, labels=[[-100, -100, 7, 8], [9]], max_len=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7], [9, -100, -100]]
    with pytest.raises(ValueError):
        data.pad_batch([[1, 2]], pad_id=0, labels=[[1]])


def test_batch_indices_cover_every_example_once_and_bucketing_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000).tolist()
    for shuffle in (False, True):
        for bucket in (False, True):
            batches = data.batch_indices(lengths, 16, shuffle=shuffle, seed=3, bucket=bucket)
            assert sorted(i for b in batches for i in b) == list(range(1000))
            assert all(len(b) == 16 for b in batches[:-1]) or bucket
            assert batches == data.batch_indices(lengths, 16, shuffle=shuffle, seed=3, bucket=bucket)
    assert data.batch_indices(lengths, 16, shuffle=False, seed=0) == [list(range(s, min(s + 16, 1000))) for s in range(0, 1000, 16)]
    assert data.batch_indices(lengths, 16, True, 3) != data.batch_indices(lengths, 16, True, 4)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = padded(data.batch_indices(lengths, 16, shuffle=True, seed=3))
    bucketed = padded(data.batch_indices(lengths, 16, shuffle=True, seed=3, bucket=True))
    assert bucketed < 0.7 * plain


# ----------------------------------------------------------------------------- corpora at scale
def write_corpus_folder(folder):
    """One document of each kind: a .txt, a .txt.gz, a .jsonl (two documents) and a .jsonl.gz (one)."""
    import gzip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("first file\r\nwith windows lines\n", encoding="utf-8")
    with gzip.open(folder / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("a gzipped text\n")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "c.jsonl").write_text('{"text": "doc one"}\n\n{"text": "doc two", "id": 2}\n', encoding="utf-8")
    with gzip.open(folder / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "x", "text": "gz json"}) + "\n")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")


def test_a_folder_of_every_format_streams_its_documents_in_path_order(tmp_path):
    write_corpus_folder(tmp_path / "corpus")
    corpus = data.Corpus(tmp_path / "corpus")
    assert [p.name for p in corpus.files] == ["a.txt", "b.txt.gz", "c.jsonl", "d.jsonl.gz"]
    assert corpus.documents() == ["first file\nwith windows lines\n", "a gzipped text\n", "doc one", "doc two",
                                  "gz json"]
    with pytest.raises(UserError, match=r"c\.jsonl, line 1: not a JSON object with a 'body' string"):
        data.Corpus(tmp_path / "corpus", text_field="body").documents()


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"text\x00more", "binary"), (b"\xff\xfe bad", "not UTF-8"),
])
def test_a_bad_corpus_file_fails_at_construction_in_one_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.Corpus(path)
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a gzip file"):
        data.Corpus(tmp_path / "bad.txt.gz")


def test_pieces_of_a_long_text_encode_to_the_whole_texts_ids(tmp_path, monkeypatch):
    """A long text is read in pieces cut after a newline between two non-space characters; the pieces' ids,
    concatenated, are the whole text's, with GPT-4's pattern and with GPT-2's."""
    from common.tokenizer import GPT2_SPLIT_PATTERN
    text = data.load_corpus("pydocs")[:400_000]
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "PIECE_CHARS", 20_000)
    pieces = list(data.Corpus(tmp_path / "long.txt").pieces())
    assert len(pieces) > 15 and [starts for _, starts in pieces] == [True] + [False] * (len(pieces) - 1)
    assert "".join(piece for piece, _ in pieces) == text
    for pattern in (None, GPT2_SPLIT_PATTERN):
        tokenizer = BPETokenizer.train(text[:100_000], 400, **({"pattern": pattern} if pattern else {}))
        assert sum((tokenizer.encode(piece) for piece, _ in pieces), []) == tokenizer.encode(text)


def test_the_tokenizer_sample_is_spread_over_the_corpus_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 2_000)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(100):                                  # 100 small files of 1 kB: every 4th is taken
        (folder / f"{i:03d}.txt").write_text(f"file {i:03d} " + "x" * 990 + "\n", encoding="utf-8")
    (tmp_path / "long.txt").write_text("".join(f"line {i:05d} of one long text\n" for i in range(20_000)))
    many = "".join(data.Corpus(folder).sample_texts(25_000))
    taken = [int(m) for m in re.findall(r"file (\d+)", many)]
    assert 20 <= len(taken) <= 30 and taken[0] < 10 and taken[-1] > 90
    long = list(data.Corpus(tmp_path / "long.txt").sample_texts(60_000))
    lines = [int(m) for m in re.findall(r"line (\d+)", "".join(long))]
    assert 40_000 <= len("".join(long)) <= 70_000 and lines[0] < 2_000 and lines[-1] > 18_000
    assert all(text.startswith("line") for text in long)  # every window starts at a line
    everything = list(data.Corpus(folder).sample_texts(10**9))
    assert "".join(everything) == "".join(text for text, _ in data.Corpus(folder).pieces())


def test_the_corpus_fingerprint_follows_size_mtime_and_content_without_reading_it_all(tmp_path):
    write_corpus_folder(tmp_path / "corpus")
    first = data.Corpus(tmp_path / "corpus").fingerprint
    assert data.Corpus(tmp_path / "corpus").fingerprint == first
    os.utime(tmp_path / "corpus" / "a.txt", ns=(0, 10**18))
    touched = data.Corpus(tmp_path / "corpus").fingerprint
    assert touched != first
    (tmp_path / "corpus" / "e.txt").write_text("a new file\n")
    assert data.Corpus(tmp_path / "corpus").fingerprint not in (first, touched)


def test_token_cache_in_processes_equals_in_process(tmp_path, tokenizer, monkeypatch):
    """A corpus above ENCODE_IN_PROCESSES_BYTES is encoded by a pool of processes: the same tokens."""
    write_corpus_folder(tmp_path / "corpus")
    monkeypatch.setattr(data, "PIECE_CHARS", 8)
    one = data.TokenCache(tmp_path / "corpus", tokenizer, tmp_path / "one", workers=1)
    monkeypatch.setattr(data, "ENCODE_IN_PROCESSES_BYTES", 0)
    two = data.TokenCache(tmp_path / "corpus", tokenizer, tmp_path / "two", workers=2)
    assert two.meta["workers"] == 2 and one.meta["workers"] == 1
    for split in ("train", "val"):
        assert np.array_equal(one.memmap(split), two.memmap(split))
    eot = tokenizer.eot_id
    stream = np.concatenate([one.memmap("train"), one.memmap("val")])
    assert (stream == eot).sum() == 4                      # 5 documents, joined by 4 end-of-text tokens


def test_a_stopped_token_cache_build_continues_where_it_stopped(tmp_path, tokenizer, monkeypatch):
    text = data.load_corpus("pydocs")[:300_000]
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "PIECE_CHARS", 10_000)
    whole = data.TokenCache(tmp_path / "long.txt", tokenizer, tmp_path / "whole")
    encoded, real_encode = [], BPETokenizer.encode_to_numpy

    def encode_then_stop(self, piece, **kwargs):
        encoded.append(len(piece))
        if len(encoded) == 12:
            raise KeyboardInterrupt                       # Ctrl-C in the middle of the build
        return real_encode(self, piece, **kwargs)

    clock = iter(range(0, 10**6, 10))                     # 10 "seconds" a call: progress is saved every piece
    monkeypatch.setattr(data.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(BPETokenizer, "encode_to_numpy", encode_then_stop)
    with pytest.raises(KeyboardInterrupt):
        data.TokenCache(tmp_path / "long.txt", tokenizer, tmp_path / "cut")
    building = next((tmp_path / "cut").glob("*.building"))
    saved = json.loads((building / "progress.json").read_text())
    assert 5 <= saved["pieces"] < 12 and not list((tmp_path / "cut").glob("*[!g]"))  # no finished folder
    monkeypatch.setattr(BPETokenizer, "encode_to_numpy", lambda self, piece, **kw: encoded.append(len(piece)) or
                        real_encode(self, piece, **kw))
    encoded.clear()
    logs = []
    resumed = data.TokenCache(tmp_path / "long.txt", tokenizer, tmp_path / "cut", log=logs.append)
    assert any("continuing a stopped build" in line for line in logs)
    assert len(encoded) == len(list(data.Corpus(tmp_path / "long.txt").pieces())) - saved["pieces"]
    for split in ("train", "val"):
        assert np.array_equal(resumed.memmap(split), whole.memmap(split))
    assert not building.exists()


def test_rebuild_builds_the_cache_again(tmp_path, tokenizer):
    first = data.TokenCache(DOCUMENTS, tokenizer, tmp_path)
    again = data.TokenCache(DOCUMENTS, tokenizer, tmp_path, rebuild=True)
    assert first.built and again.built and again.dir == first.dir


def test_a_c4_shard_is_json_lines(tmp_path):
    import gzip
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "one", "url": "u", "timestamp": "t"}\n{"text": "two", "url": "v", "timestamp": "t"}\n')
    assert data.Corpus(tmp_path).documents() == ["one", "two"]


def test_c4_and_tinystories_download_their_files_once_and_stream_them(tmp_path, monkeypatch, file_server):
    """c4:N fetches the first N shards (JSON lines, gzip), tinystories its two text files whose stories end
    with a literal <|endoftext|>; both from a local server standing in for Hugging Face's."""
    import gzip
    site, url = file_server
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path / "cache"))
    for index in range(3):
        with gzip.open(site / f"c4-train.{index:05d}-of-01024.json.gz", "wt", encoding="utf-8") as f:
            f.write(json.dumps({"text": f"shard {index} document", "url": "u", "timestamp": "t"}) + "\n")
    monkeypatch.setattr(data, "C4_SHARD_URL", url + "/c4-train.{index:05d}-of-01024.json.gz")
    corpus = data.Corpus("c4:2")
    assert corpus.documents() == ["shard 0 document", "shard 1 document"]
    assert sorted(CountingHandler.requests) == ["/c4-train.00000-of-01024.json.gz", "/c4-train.00001-of-01024.json.gz"]
    assert data.Corpus("c4").documents() == ["shard 0 document"] and len(CountingHandler.requests) == 2
    (site / "train.txt").write_text("Once upon a time.\n<|endoftext|>\nThe end.\n", encoding="utf-8")
    (site / "valid.txt").write_text("A short one.\n", encoding="utf-8")
    monkeypatch.setitem(data.CORPUS_URLS, "tinystories", [f"{url}/train.txt", f"{url}/valid.txt"])
    stories = data.Corpus("tinystories")
    assert stories.documents() == ["Once upon a time.\n<|endoftext|>\nThe end.\n", "A short one.\n"]
    tokenizer = BPETokenizer.train("Once upon a time. The end. A short one.", 270, special_tokens=("<|endoftext|>",))
    tokens = data.TokenCache(stories, tokenizer, tmp_path / "tokens", val_fraction=0)
    assert (np.asarray(tokens.memmap("train")) == tokenizer.eot_id).sum() == 2   # the literal one + the file break


def test_c4_names_its_shards(monkeypatch):
    assert data.corpus_urls("c4") == [data.C4_SHARD_URL.format(index=0)]
    assert data.corpus_urls("c4:3")[-1].endswith("c4-train.00002-of-01024.json.gz")
    assert data.corpus_urls("tinystories")[0].endswith("TinyStoriesV2-GPT4-train.txt")
    with pytest.raises(UserError, match="c4:1 to c4:1024"):
        data.corpus_urls("c4:0")
    assert data.corpus_urls("c5") is None


def test_a_named_corpus_is_downloaded_by_rank_0_while_the_others_wait(monkeypatch, tmp_path):
    """Corpus under DDP (runtime): for a corpus that downloads, rank 0 downloads it before the barrier and
    the other ranks open it after, so that no two processes write one file; a local file needs no barrier."""
    events = []
    local = tmp_path / "my_corpus.txt"
    local.write_text("a line of text\n")

    class Runtime:
        def __init__(self, rank):
            self.rank, self.is_main = rank, rank == 0

        def barrier(self):
            events.append((self.rank, "barrier"))

    downloaded = tmp_path / "c4-shard.json.gz"
    with gzip.open(downloaded, "wt") as f:
        f.write(json.dumps({"text": "a document"}) + "\n")
    for rank in (0, 1):
        monkeypatch.setattr(data, "_download", lambda spec, log, rank=rank: events.append((rank, spec)) or [downloaded])
        for spec in ("c4:2", local):
            data.Corpus(spec, runtime=Runtime(rank))
    assert events == [(0, "c4:2"), (0, "barrier"), (1, "barrier"), (1, "c4:2")]

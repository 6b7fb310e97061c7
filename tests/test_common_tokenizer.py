"""Properties of common/tokenizer.py: lossless round trips, fast path == reference, deterministic
training equal to the naive algorithm, special tokens, files, and pretrained-vocabulary import."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from conftest import reference

from common import tokenizer as tokenizer_module
from common.tokenizer import GPT2_SPLIT_PATTERN, BPETokenizer, bytes_to_unicode, merge_pair

EOT = "<|endoftext|>"


def sample_text():
    """~150 kB of real prose and code-like text that ships with every Python: the pydoc topics."""
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[key] for key in sorted(topics))[:150_000]


@pytest.fixture(scope="module")
def text():
    return sample_text()


@pytest.fixture(scope="module")
def tok(text):
    return BPETokenizer.train(text, vocab_size=512, special_tokens=(EOT, "<|pad|>"))


ADVERSARIAL = [
    "",
    " ",
    "hello world",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 skin tone",          # ZWJ sequences, variation selectors
    "日本語のテキストと中文文本，한국어 텍스트",                  # CJK
    "e\u0301 a\u0308 Z\u0351\u0362\u0334 combining marks",
    "control \x00\x01\x07\x1b[31m chars \x7f",
    "windows\r\nline\r\nendings\r\n",
    "long      whitespace\t\t\t\n\n\n\n      runs    ",
    "numbers 1234567890 3.14159 -42 1e-9",
    "don't can't I'M WE'LL 's 'S",
    "\ufeffBOM and \u2028 line separator \u00a0 nbsp",
    "a" * 5000,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟘𝟙𝟚 astral plane",
]


def random_unicode(rng, length):
    """Random valid text: ASCII-heavy, with Latin, CJK, emoji, combining marks and control characters."""
    ranges = [(0x20, 0x7E)] * 6 + [(0x00, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF),
                                   (0x1F300, 0x1FAFF), (0x10000, 0x10FFF), (0xE000, 0xF8FF)]
    characters = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        characters.append(chr(rng.randint(low, high)))
    return "".join(characters)


def test_training_counts_vocab_and_special_ids(tok):
    assert tok.vocab_size == 512
    assert tok.special_tokens == {EOT: 510, "<|pad|>": 511}
    assert len(tok.ranks) == 510
    assert all(tok.ranks[bytes([b])] == b for b in range(256))


def test_training_is_deterministic_and_equals_the_naive_algorithm(text):
    small = text[:20_000]
    fast = BPETokenizer.train(small, vocab_size=300, special_tokens=(EOT,))
    again = BPETokenizer.train(small, vocab_size=300, special_tokens=(EOT,))
    naive = BPETokenizer.train_reference(small, vocab_size=300, special_tokens=(EOT,))
    assert fast.ranks == again.ranks
    assert fast.ranks == naive.ranks
    assert fast.fingerprint == naive.fingerprint


def test_training_accepts_an_iterable_and_ignores_special_strings():
    documents = ["the cat sat", f"on the mat {EOT} the end", "the cat"]
    tok = BPETokenizer.train(documents, vocab_size=270, special_tokens=(EOT,))
    assert b"<|" not in tok.ranks and b"|>" not in tok.ranks
    assert tok.decode(tok.encode("the cat")) == "the cat"


def test_roundtrip_on_adversarial_unicode(tok):
    for s in ADVERSARIAL:
        assert tok.decode(tok.encode(s)) == s, repr(s[:40])


def test_roundtrip_and_reference_on_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(200):
        s = random_unicode(rng, rng.randint(0, 120))
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.encode_reference(s) == ids


def test_reference_equals_fast_path_on_the_corpus(tok, text):
    piece = text[:60_000]
    assert tok.encode_reference(piece) == tok.encode(piece)
    for s in ADVERSARIAL:
        assert tok.encode_reference(s) == tok.encode(s)


def test_merge_pair_and_bpe_worked_example():
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4]
    assert merge_pair([1, 1, 1], (1, 1), 9) == [9, 1]
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abb": 257})
    tok = BPETokenizer(ranks)
    assert tok._bpe(b"abab") == [256, 256]
    assert tok._bpe(b"abb") == [257]


def test_encode_batch_equals_encode(tok, text):
    texts = [text[i:i + 500] for i in range(0, 10_000, 500)]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_special_tokens_need_permission(tok):
    s = f"first document{EOT}second"
    with pytest.raises(ValueError, match="special token"):
        tok.encode(s)
    with pytest.raises(ValueError, match="special token"):
        tok.encode_reference(s)
    with pytest.raises(ValueError, match="special token"):
        tok.encode_batch(["fine", s])
    ids = tok.encode(s, allowed_special={EOT})
    assert ids.count(tok.special_tokens[EOT]) == 1
    assert tok.encode_reference(s, allowed_special="all") == ids
    assert tok.decode(ids) == s
    assert tok.token_to_id(EOT) == 510


def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids(tok):
    emoji_ids = tok.encode("🙂")
    assert len(emoji_ids) > 1                          # four bytes, not a learned token
    assert "\ufffd" in tok.decode(emoji_ids[:1])       # half a character: replaced, not raised
    with pytest.raises(ValueError, match="not in this tokenizer"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_save_load_roundtrip(tok, tmp_path, text):
    path = tmp_path / "tok.json"
    tok.save(path)
    json.loads(path.read_text())                        # a plain text file
    loaded = BPETokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encode(text[:5000]) == tok.encode(text[:5000])


def test_load_or_train_is_keyed_by_content_and_never_overwrites(tmp_path):
    messages = []

    def files():
        return sorted(p.name for p in tmp_path.iterdir())

    text = "hello hello world " * 20
    first = BPETokenizer.load_or_train(text, 270, ("<|endoftext|>",), folder=tmp_path, log=messages.append)
    assert len(messages) == 1 and len(files()) == 1 and files()[0].startswith("bpe-270-")
    again = BPETokenizer.load_or_train([text], 270, ("<|endoftext|>",), folder=tmp_path, log=messages.append)
    assert len(messages) == 1 and again.fingerprint == first.fingerprint     # loaded, not trained again
    # Each thing that decides the merges gives another file; the first one stays as it was.
    kept = (tmp_path / files()[0]).read_text()
    BPETokenizer.load_or_train(text + "edited", 270, ("<|endoftext|>",), folder=tmp_path, log=messages.append)
    BPETokenizer.load_or_train(text, 271, ("<|endoftext|>",), folder=tmp_path, log=messages.append)
    BPETokenizer.load_or_train(text, 270, ("<|pad|>",), folder=tmp_path, log=messages.append)
    BPETokenizer.load_or_train(text, 270, ("<|endoftext|>",), pattern=GPT2_SPLIT_PATTERN, folder=tmp_path,
                               log=messages.append)
    BPETokenizer.load_or_train([text[:100], text[100:]], 270, ("<|endoftext|>",), folder=tmp_path, log=messages.append)
    assert len(messages) == 6 and len(files()) == 6
    assert kept in [(tmp_path / name).read_text() for name in files()]


def test_load_or_train_retrains_over_a_corrupt_file(tmp_path):
    text = "hello hello world " * 20
    first = BPETokenizer.load_or_train(text, 270, folder=tmp_path, log=lambda *a: None)
    (path,) = tmp_path.iterdir()
    path.write_text("{ truncated")
    messages = []
    again = BPETokenizer.load_or_train(text, 270, folder=tmp_path, log=messages.append)
    assert "unreadable" in messages[0] and again.fingerprint == first.fingerprint
    assert BPETokenizer.load(path).fingerprint == first.fingerprint


def test_load_or_train_defaults_to_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path))
    BPETokenizer.load_or_train("some text " * 30, 265, log=lambda *a: None)
    assert len(list((tmp_path / "tokenizers").glob("bpe-265-*.json"))) == 1
    monkeypatch.setenv("LLMFS_CACHE", "")                # empty means unset, everywhere
    from common.checkpoint import cache_dir
    assert cache_dir() == Path.home() / ".cache" / "llm-from-scratch"


# ------------------------------------------------------------------------------- training at scale
def pieces_of(text, size):
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_training_with_two_workers_equals_one_process(text, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "BATCH_BYTES", 4_000)     # several batches, both workers busy
    pieces = pieces_of(text[:60_000], 2_500)
    pieces[3] += EOT                                                 # cut out in a worker too
    one = tokenizer_module.count_chunks(pieces, GPT2_SPLIT_PATTERN, (EOT,))
    two = tokenizer_module.count_chunks(pieces, GPT2_SPLIT_PATTERN, (EOT,), workers=2)
    assert list(two.items()) == list(one.items())                   # the same counts, in the same order
    assert not any("endoftext" in chunk for chunk in one)
    merged_here = BPETokenizer.train(pieces, 400, special_tokens=(EOT,))
    merged_there = BPETokenizer.train(iter(pieces), 400, special_tokens=(EOT,), workers=2)
    assert merged_there.ranks == merged_here.ranks


def test_training_on_a_generator_equals_training_on_a_list(text):
    documents = pieces_of(text[:16_000], 2_000)
    from_list = BPETokenizer.train(documents, 330, special_tokens=(EOT,))
    from_generator = BPETokenizer.train((d for d in documents), 330, special_tokens=(EOT,))
    assert from_generator.ranks == from_list.ranks
    assert from_list.ranks == BPETokenizer.train_reference(documents, 330, special_tokens=(EOT,)).ranks


def test_training_errors_reach_the_caller_with_workers_too():
    def failing():
        yield "some text " * 100
        raise OSError("corpus file vanished")

    for workers in (1, 2):
        with pytest.raises(OSError, match="vanished"):
            BPETokenizer.train(failing(), 300, workers=workers)
        with pytest.raises(TypeError, match="trains on str texts, got a bytes"):
            BPETokenizer.train(["fine text", b"bytes"], 300, workers=workers)
        with pytest.raises(regex.error):                                     # raised once, not in each worker
            BPETokenizer.train(["fine text"], 300, pattern="(unclosed", workers=workers)


def test_counting_workers_leave_a_core_to_the_parent(monkeypatch):
    for cores, workers in ((1, 1), (2, 1), (4, 3), (16, 8)):
        monkeypatch.setattr(tokenizer_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        assert tokenizer_module.counting_workers() == workers


def test_workers_import_neither_torch_nor_the_callers_script(tmp_path, text):
    """A spawned worker would re-run the caller's main script (a train.py importing torch) before its
    first task; it runs common/_bpe_count.py only, which imports no torch."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    probe = subprocess.run([sys.executable, "-c", "import sys, common._bpe_count; print(sorted(sys.modules))"],
                           cwd=repo, capture_output=True, text=True, check=True)
    assert "'torch'" not in probe.stdout and "'common.tokenizer'" not in probe.stdout
    runs, script, sample = tmp_path / "runs.txt", tmp_path / "script.py", tmp_path / "sample.txt"
    sample.write_text(text[:8_000])
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(repo)!r})\n"
        f"with open({str(runs)!r}, 'a') as f:\n    f.write(__name__ + '\\n')\n"
        "from common import tokenizer\n"
        "if __name__ == '__main__':\n"
        "    tokenizer.BATCH_BYTES = 1000\n"
        f"    text = open({str(sample)!r}).read()\n"
        "    pieces = [text[i:i + 1000] for i in range(0, len(text), 1000)]\n"
        "    print(tokenizer.BPETokenizer.train(pieces, 300, workers=2).fingerprint)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert runs.read_text() == "__main__\n"                         # the workers did not run it again
    assert result.stdout.strip() == BPETokenizer.train(pieces_of(text[:8_000], 1000), 300).fingerprint


def test_training_reports_progress_only_when_asked(text, monkeypatch, capsys):
    monkeypatch.setattr(tokenizer_module, "PROGRESS_SECONDS", 0.0)   # report at every chance
    pieces = [text[:100_000]] * 5                                    # 0.5 MB, quick to count: five times the same
    unique = len(tokenizer_module.count_chunks(pieces[0], tokenizer_module.GPT4_SPLIT_PATTERN))
    BPETokenizer.train(pieces, 300)
    assert capsys.readouterr().out == ""                            # silent without log
    lines = []
    BPETokenizer.train(pieces, 300, log=lines.append, total_bytes=500_000)
    counted = [line for line in lines if line.startswith("tokenizer: counted ")]
    assert len(counted) == len(pieces) + 1                          # one a piece, then the total
    assert counted[0].startswith("tokenizer: counted 0.1/0.5 MB of text (") and " MB/s), " in counted[0]
    assert counted[-1].startswith("tokenizer: counted 0.5/0.5 MB of text in ")
    assert counted[-1].endswith(f"MB/s), {unique:,} unique chunks")
    merges = [line for line in lines if line.startswith("tokenizer: merge ")]
    assert [line.split()[2] for line in merges] == [f"{n}/44" for n in range(4, 45, 4)]
    assert lines[-1].startswith("tokenizer: 44 merges in ")
    with_workers = []
    BPETokenizer.train(pieces, 300, log=with_workers.append, workers=2)
    assert [line for line in with_workers if "counted" in line][-1].startswith("tokenizer: counted 0.5 MB of text in ")
    monkeypatch.setattr(tokenizer_module, "PROGRESS_SECONDS", 60.0)  # a quick training says nothing
    quiet = []
    BPETokenizer.train(pieces, 300, log=quiet.append)
    assert quiet == []


def test_drop_rare_chunks_keeps_whole_count_levels():
    counts = Counter({"the": 9, " cat": 3, " sat": 3, " on": 2, " mat": 2, "qz": 1, "xv": 1, "jj": 1})
    lines = []
    assert tokenizer_module.drop_rare_chunks(counts, 5, log=lines.append) == 2
    assert list(counts) == ["the", " cat", " sat", " on", " mat"]
    assert "8 unique chunks > max_unique_chunks=5: dropped the 3 seen fewer than 2 times (13.64% of" in lines[0]
    counts = Counter({"a": 3, "b": 2, "c": 2, "d": 1})
    assert tokenizer_module.drop_rare_chunks(counts, 2) == 3                # b and c go together
    assert counts == {"a": 3}


def test_training_is_exact_up_to_max_unique_chunks_and_says_when_it_drops(text):
    small = text[:20_000]
    unique = len(tokenizer_module.count_chunks(small, tokenizer_module.GPT4_SPLIT_PATTERN))
    exact = BPETokenizer.train_reference(small, 300)
    lines = []
    at_the_bound = BPETokenizer.train(small, 300, max_unique_chunks=unique, log=lines.append)
    assert at_the_bound.ranks == exact.ranks and lines == []
    bounded = BPETokenizer.train(small, 300, max_unique_chunks=unique // 4, log=lines.append)
    assert lines and "dropped the" in lines[0] and f"> max_unique_chunks={unique // 4:,}" in lines[0]
    kept = int(lines[0].split("merging the other ")[1].replace(",", ""))
    assert kept <= unique // 4
    assert bounded.vocab_size == 300 and bounded.ranks != exact.ranks     # an approximation, still a tokenizer
    assert bounded.decode(bounded.encode(small[:2000])) == small[:2000]


def test_load_or_train_with_a_key_reads_no_corpus_on_a_warm_start(tmp_path, text):
    calls = []

    def documents():
        calls.append(1)
        return (piece for piece in pieces_of(text[:20_000], 4_000))

    def no_documents():
        raise AssertionError("a warm start must not read the corpus")

    messages = []
    first = BPETokenizer.load_or_train(documents, 300, (EOT,), folder=tmp_path, log=messages.append,
                                       key="corpus-abc/sample-20000", workers=2)
    assert calls == [1] and first.ranks == BPETokenizer.train(pieces_of(text[:20_000], 4_000), 300, (EOT,)).ranks
    again = BPETokenizer.load_or_train(no_documents, 300, (EOT,), folder=tmp_path, log=messages.append,
                                       key="corpus-abc/sample-20000")
    assert again.fingerprint == first.fingerprint and len(messages) == 1

    class OtherRank:
        is_main = False

        def barrier(self):
            pass

    on_rank_1 = BPETokenizer.load_or_train(no_documents, 300, (EOT,), folder=tmp_path, runtime=OtherRank(),
                                           key="corpus-abc/sample-20000")
    assert on_rank_1.fingerprint == first.fingerprint
    # Another key, or the content-keyed file of the very same texts, is another file.
    BPETokenizer.load_or_train(documents, 300, (EOT,), folder=tmp_path, log=messages.append, key="corpus-abc/sample-1")
    BPETokenizer.load_or_train(documents, 300, (EOT,), folder=tmp_path, log=messages.append)
    assert calls == [1, 1, 1] and len(list(tmp_path.iterdir())) == 3


def test_load_or_train_without_a_key_keeps_its_file_names(tmp_path):
    """Tokenizers cached before keys existed are found again: the content key is unchanged."""
    BPETokenizer.load_or_train(["hello hello world " * 20, "and more"], 270, (EOT,), folder=tmp_path,
                               log=lambda *a: None)
    assert [p.name for p in tmp_path.iterdir()] == ["bpe-270-73103de492b7db2e.json"]


@pytest.mark.parametrize("content, message", [
    ("not json at all", "not valid JSON"),
    ('{"hello": 1}', "not a llm-from-scratch/bpe tokenizer"),
    ('{"format": "llm-from-scratch/bpe", "version": 99}', "format version 99"),
    ('{"format": "llm-from-scratch/bpe", "version": 1, "pattern": "x", "special_tokens": {}, "tokens": ["!!"]}',
     "corrupt"),
])
def test_bad_tokenizer_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        BPETokenizer.load(path)
    assert "broken.json" in str(error.value)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        BPETokenizer.load(tmp_path / "nope.json")


def write_gpt2_format(folder):
    """A hand-made GPT-2-format vocabulary: 256 bytes, 4 merges, and <|endoftext|>."""
    byte_encoder = bytes_to_unicode()
    vocab = {byte_encoder[b]: i for i, b in enumerate(sorted(byte_encoder, key=lambda b: ord(byte_encoder[b])))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġthe", "n")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab[EOT] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab


def test_from_hf_on_a_hand_made_gpt2_vocabulary(tmp_path):
    vocab = write_gpt2_format(tmp_path)
    tok = BPETokenizer.from_hf(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert tok.special_tokens == {EOT: vocab[EOT]}
    assert tok.encode(" the") == [vocab["Ġthe"]]
    assert tok.encode(" then he") == [vocab["Ġthen"], vocab["Ġ"], vocab["he"]]
    assert tok.encode_reference(" then he") == tok.encode(" then he")
    assert tok.decode(tok.encode("héllo 世界 the\n")) == "héllo 世界 the\n"
    assert tok.encode(EOT, allowed_special="all") == [vocab[EOT]]


def test_from_hf_matches_the_reference_gpt2_tokenizer(tmp_path):
    transformers = reference("transformers")
    vocab = write_gpt2_format(tmp_path)
    ours = BPETokenizer.from_hf(tmp_path / "vocab.json", tmp_path / "merges.txt")
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for s in [" the then", "then the  he\n\nthe", "héllo wörld 123", *ADVERSARIAL[:9]]:
        assert ours.encode(s) == theirs.encode(s), repr(s)
    assert vocab[EOT] == ours.special_tokens[EOT]


def test_from_hf_rejects_bad_files(tmp_path):
    write_gpt2_format(tmp_path)
    (tmp_path / "merges.txt").write_text("Ġ t\nnot_a_merge_line_with_three parts here\n")
    with pytest.raises(ValueError, match="bad merge line"):
        BPETokenizer.from_hf(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BPETokenizer.from_hf(tmp_path / "missing.json", tmp_path / "merges.txt")


def test_from_tiktoken_offline_gives_a_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to establish a new connection")
    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="offline.*from_hf"):
        BPETokenizer.from_tiktoken("gpt2")


def test_from_tiktoken_wraps_the_encoding(monkeypatch):
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 256
    local = tiktoken.Encoding("local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                              special_tokens={EOT: 257})
    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", lambda name: local)
    tok = BPETokenizer.from_tiktoken("gpt2")
    assert tok.vocab_size == 258
    assert tok.encode("abab") == local.encode("abab") == [256, 256]
    assert tok.special_tokens == {EOT: 257}


# --------------------------------------------------------------------- Hugging Face tokenizer.json
# The split regexes of Llama 3 and of Qwen2/3, as their tokenizer.json files write them.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

TOKENIZER_TEXTS = [
    *ADVERSARIAL,
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tif x  >=  10_000: pass\r\n",
    "   leading, trailing and   inner   spaces   ",
    "\n\n\n  \t \u3000 mixed whitespace \u00a0\u2003 runs \n \n",
    "digits 0 12 345 6789 012345678 3.14159 1e-9 ٣٤٥ ۱۲ 一二",
    "I'M sure they'LL say it's fine; DON'T you THINK? we'd've",
    f"first{EOT}second <|im_start|>user\nhi<|im_end|> <tool_call>x</tool_call>",
]


def hf_tokenizer_json(tokenizers, folder, style, text):
    """Train a small byte-level BPE with the `tokenizers` library, as one of the families does it, and save
    its tokenizer.json: GPT-2 (ByteLevel's own regex), Llama 3 (Split + ByteLevel), Qwen (the same with NFC)
    or SmolLM (Digits + ByteLevel)."""
    pre = tokenizers.pre_tokenizers
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt2", "smollm"))
    steps = {"gpt2": [], "smollm": [pre.Digits(individual_digits=True)],
             "llama3": [pre.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated")],
             "qwen": [pre.Split(tokenizers.Regex(QWEN_PATTERN), behavior="isolated")]}[style]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=style == "llama3"))
    tokenizer.pre_tokenizer = pre.Sequence([*steps, byte_level]) if steps else byte_level
    if style == "qwen":
        tokenizer.normalizer = tokenizers.normalizers.NFC()
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=700, special_tokens=[EOT, "<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])          # added tokens that are not special
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen", "smollm"])
def test_from_hf_tokenizer_json_matches_the_tokenizers_library(tmp_path, style):
    """Our ids (tiktoken, and the Python reference) equal the `tokenizers` library's on arbitrary text, for
    a tokenizer.json of each pre-tokenizer family; merges written as pairs and as "a b" strings."""
    tokenizers = reference("tokenizers")
    theirs = hf_tokenizer_json(tokenizers, tmp_path, style, sample_text()[:60_000])
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert isinstance(spec["model"]["merges"][0], list)
    rng = random.Random(0)
    texts = TOKENIZER_TEXTS + [random_unicode(rng, rng.randint(0, 80)) for _ in range(200)]
    ours = BPETokenizer.from_hf(tmp_path)
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]   # the older spelling
    (tmp_path / "strings.json").write_text(json.dumps(spec))
    assert BPETokenizer.from_hf(tmp_path / "strings.json").ranks == ours.ranks
    assert ours.special_tokens == {token.content: i for i, token in theirs.get_added_tokens_decoder().items()}
    for text in texts:
        expected = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == expected, repr(text[:60])
        assert ours.encode_reference(text, allowed_special="all") == expected, repr(text[:60])
        assert ours.decode(expected) == ours.normalize(text)
    assert ours.encode_batch(texts[:20], allowed_special="all") == [
        encoding.ids for encoding in theirs.encode_batch(texts[:20], add_special_tokens=False)]
    if style == "qwen":                                           # NFC: e + U+0301 is encoded as é
        unnormalized = BPETokenizer(ours.ranks, ours.pattern)
        assert ours.encode("cafe\u0301") == ours.encode("café") != unnormalized.encode("cafe\u0301")


def test_from_hf_tokenizer_json_converted_from_tiktoken_ranks(tmp_path):
    """A tokenizer.json written from tiktoken ranks (as Llama 3's and Qwen's were: every split of each
    token is a merge, so several merges make one token) loads back to the same ranks and ids."""
    tokenizers = reference("tokenizers")
    original = BPETokenizer.train(sample_text()[:30_000], vocab_size=400, special_tokens=(EOT,))   # GPT-4's pattern
    spell = bytes_to_unicode()
    text_of = {token: "".join(spell[b] for b in token) for token in original.ranks}
    merges = []
    for token, rank in sorted(original.ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in original.ranks and token[i:] in original.ranks]
        splits.sort(key=lambda split: (original.ranks[split[0]], original.ranks[split[1]]))
        merges += [[text_of[left], text_of[right]] for left, right in splits]
    assert len(merges) > len(original.ranks) - 256                # more merges than merged tokens
    spec = {"version": "1.0", "normalizer": None, "post_processor": None, "decoder": None,
            "added_tokens": [{"id": 399, "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": original.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {text_of[token]: rank for token, rank in original.ranks.items()}, "merges": merges}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours = BPETokenizer.from_hf(tmp_path / "tokenizer.json")
    assert ours.ranks == original.ranks and ours.special_tokens == original.special_tokens
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(1)
    for text in TOKENIZER_TEXTS + [random_unicode(rng, rng.randint(0, 80)) for _ in range(100)]:
        expected = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == expected, repr(text[:60])


def write_tokenizer_json(folder, **changes):
    """A hand-made GPT-2-style tokenizer.json (write_gpt2_format's 256 bytes, 4 merges and <|endoftext|>)."""
    vocab = write_gpt2_format(folder)
    merges = [line.split(" ") for line in (folder / "merges.txt").read_text().splitlines()[1:]]
    spec = {"version": "1.0", "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "added_tokens": [{"id": vocab[EOT], "content": EOT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            spec[section][field] = value
        else:
            spec[section] = value
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return vocab


def test_from_hf_tokenizer_json_equals_the_vocab_and_merges_files(tmp_path):
    vocab = write_tokenizer_json(tmp_path)
    from_json = BPETokenizer.from_hf(tmp_path)
    from_pair = BPETokenizer.from_hf(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert from_json.ranks == from_pair.ranks
    assert from_json.special_tokens == from_pair.special_tokens == {EOT: vocab[EOT]}
    assert from_json.pattern == GPT2_SPLIT_PATTERN and from_json.normalizer is None
    assert from_json.encode(" then he") == [vocab["Ġthen"], vocab["Ġ"], vocab["he"]]
    from_json.save(tmp_path / "ours.json")
    assert BPETokenizer.load(tmp_path / "ours.json").fingerprint == from_json.fingerprint == from_pair.fingerprint


@pytest.mark.parametrize("changes, message", [
    (dict(model__type="WordPiece"), "model type 'WordPiece'"),
    (dict(model__byte_fallback=True), "model.byte_fallback=True"),
    (dict(model__continuing_subword_prefix="##"), "model.continuing_subword_prefix='##'"),
    (dict(normalizer={"type": "Lowercase"}), r"normalizer \['Lowercase'\]"),
    (dict(normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                          {"type": "Replace"}]}), r"normalizer \['Prepend', 'Replace'\]"),
    (dict(pre_tokenizer={"type": "Whitespace"}), "not byte-level"),
    (dict(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "not byte-level"),
    (dict(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}), "add_prefix_space"),
    (dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed"},
        {"type": "ByteLevel", "use_regex": False}]}), "only a Regex pattern, behavior Isolated"),
    (dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": True}]}), "use_regex=True"),
    (dict(model__merges=[["h", "e"], ["Ġ", "t"]]), "not in merge order"),
    (dict(model__merges=[["Ġ", "x"]]), "needs both parts"),
    (dict(added_tokens=[{"id": 256, "content": "Ġt", "special": True}]), "also an ordinary BPE token"),
    (dict(added_tokens=[{"id": 260, "content": EOT, "special": True, "lstrip": True}]), "lstrip"),
    (dict(added_tokens=[]), r"1 vocabulary entries that no merge makes.*endoftext"),
])
def test_from_hf_tokenizer_json_rejects_what_ids_cannot_represent(tmp_path, changes, message):
    write_tokenizer_json(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as error:
        BPETokenizer.from_hf(tmp_path)
    assert "tokenizer.json" in str(error.value) and "\n" not in str(error.value)


def test_from_hf_tokenizer_json_names_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        BPETokenizer.from_hf(tmp_path)
    BPETokenizer.train("hello world " * 20, vocab_size=260).save(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="BPETokenizer.load reads it"):
        BPETokenizer.from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        BPETokenizer.from_hf(tmp_path)
    with pytest.raises(ValueError, match="own split pattern"):
        BPETokenizer.from_hf(tmp_path, pattern=GPT2_SPLIT_PATTERN)


def test_nfc_normalizer_is_saved_and_loaded(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    tok = BPETokenizer(ranks, normalizer="NFC")
    assert tok.encode("e\u0301") == tok.encode("é") == list("é".encode())
    tok.save(tmp_path / "t.json")
    loaded = BPETokenizer.load(tmp_path / "t.json")
    assert loaded.normalizer == "NFC" and loaded.fingerprint == tok.fingerprint != BPETokenizer(ranks).fingerprint
    assert "normalizer" not in BPETokenizer(ranks).to_dict()          # others' files and fingerprints unchanged
    with pytest.raises(ValueError, match="normalizer must be None or 'NFC'"):
        BPETokenizer(ranks, normalizer="NFKC")


# ------------------------------------------------------------------------ writing a tokenizer.json
def test_save_hf_round_trips_through_from_hf(tmp_path, tok):
    """save_hf then from_hf is the same tokenizer (same fingerprint: same ids for every text), NFC kept."""
    tok.save_hf(tmp_path)
    assert BPETokenizer.from_hf(tmp_path).fingerprint == tok.fingerprint
    nfc = BPETokenizer(tok.ranks, tok.pattern, tok.special_tokens, normalizer="NFC")
    nfc.save_hf(tmp_path / "nfc")
    assert BPETokenizer.from_hf(tmp_path / "nfc").fingerprint == nfc.fingerprint != tok.fingerprint
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOT and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_eot_id_names_either_familys_end_of_text_token(tok):
    assert tok.eot_id == tok.special_tokens[EOT]
    llama3 = BPETokenizer(tok.ranks, tok.pattern, {"<|begin_of_text|>": 600, "<|end_of_text|>": 601})
    assert llama3.eot_id == 601
    assert BPETokenizer(tok.ranks, tok.pattern).eot_id is None


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_save_hf_gives_the_tokenizers_library_and_transformers_our_ids(tmp_path, text, pattern):
    """The tokenizer.json we write, read by `tokenizers` and by transformers' AutoTokenizer, encodes
    arbitrary text to our ids and decodes them back (every split of every token listed as a merge, and
    ignore_merges, make Hugging Face's merge order tiktoken's)."""
    tokenizers = reference("tokenizers")
    transformers = reference("transformers")
    split = GPT2_SPLIT_PATTERN if pattern == "gpt2" else tokenizer_module.GPT4_SPLIT_PATTERN
    ours = BPETokenizer.train(text[:60_000], vocab_size=700, special_tokens=(EOT,), pattern=split)
    ours.save_hf(tmp_path)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(1)
    texts = TOKENIZER_TEXTS + [random_unicode(rng, rng.randint(0, 80)) for _ in range(200)] + [text[60_000:90_000]]
    for sample in texts:
        ids = ours.encode(sample, allowed_special="all")
        assert theirs.encode(sample, add_special_tokens=False).ids == ids, repr(sample[:60])
        assert theirs.decode(ids, skip_special_tokens=False) == sample
    assert auto(texts[-1], add_special_tokens=False)["input_ids"] == ours.encode(texts[-1])
    assert auto.eos_token == EOT


def test_encode_to_numpy_equals_encode(tok, text):
    sample = text[:20_000] + EOT + "café"
    ids = tok.encode(sample, allowed_special="all")
    array = tok.encode_to_numpy(sample, allowed_special="all", dtype="uint16")
    assert array.dtype.name == "uint16" and array.tolist() == ids
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode_to_numpy(EOT)

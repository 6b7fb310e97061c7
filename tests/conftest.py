"""Shared test helpers.

The chapter folders start with digits (``05_gpt``), so they are not importable packages: tests load a
chapter's ``model.py`` or ``train.py`` by path with :func:`load_module`.
"""

import importlib
import inspect
import os
import shutil
import signal
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # so that `import common` works from any working directory

import common  # noqa: E402


def load_module(relative_path):
    """Import ``REPO_ROOT / relative_path`` as a module and return it.

    The module name is unique to the file (``chapter_05_gpt_model``) and the same one a train.py gets
    from ``common.load_module``, so a test and a train.py share one module object.
    """
    return common.load_module(REPO_ROOT / relative_path)


def reference(module_name):
    """Import a reference library (transformers, peft, tokenizers) for a parity test.

    Without it the test skips, so the suite runs with the runtime dependencies alone; with
    LLMFS_REQUIRE_REFERENCE=1 (set by .ci/run after installing them) a missing library fails the test
    instead, so the parity claims are checked in CI, never skipped there."""
    if os.environ.get("LLMFS_REQUIRE_REFERENCE") == "1":
        return importlib.import_module(module_name)
    return pytest.importorskip(module_name)


def _uses_reference(item):
    try:
        return 'reference("' in inspect.getsource(item.function)
    except (OSError, TypeError, AttributeError):
        return False


def pytest_collection_modifyitems(config, items):
    """LLMFS_REFERENCE_ONLY=1 (CI's second pass, with the reference libraries installed) keeps only the
    parity tests: those that call `reference(...)`."""
    if os.environ.get("LLMFS_REFERENCE_ONLY") == "1":
        kept = [item for item in items if _uses_reference(item)]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


_PREVIOUS_TMPDIR = os.environ.get("TMPDIR")


def pytest_configure(config):
    """Point TMPDIR (inherited by every subprocess the tests start) at a folder of this session, before
    any test module is imported (some build their subprocess environment at import), so that the
    torchelastic_* folders torchrun leaves in the temporary folder go when the session ends."""
    folder = tempfile.mkdtemp(prefix="llmfs-tests-")
    config._llmfs_tmpdir = folder
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = None                           # re-read TMPDIR in this process too


def pytest_unconfigure(config):
    folder = getattr(config, "_llmfs_tmpdir", None)
    if folder is None:
        return
    if _PREVIOUS_TMPDIR is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = _PREVIOUS_TMPDIR
    tempfile.tempdir = None
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def repo_root():
    return REPO_ROOT


def interrupt_after_iteration(train_script, out_dir, min_iter=3, extra_args=()):
    """Run ``train_script --preset tiny --stage pretrain`` for a very long time, press Ctrl-C (SIGINT)
    once a progress line shows iteration ``min_iter``, and check what a user must get: exit status 130,
    a message saying where the checkpoint is, no traceback, and a checkpoint written after a whole step.
    Returns the iteration the checkpoint holds."""
    process = subprocess.Popen([sys.executable, str(train_script), "--preset", "tiny", "--stage", "pretrain",
                                "--device", "cpu", "--max_iters", "100000", "--eval_interval", "100000",
                                "--log_interval", "1", "--out_dir", str(out_dir), *extra_args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    for line in process.stdout:
        if line.startswith("iter") and int(line.split()[1].split("/")[0]) >= min_iter:
            process.send_signal(signal.SIGINT)
            break
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors[-2000:]
    assert "interrupted: saved" in output and "Traceback" not in errors
    stopped_at = torch.load(out_dir / "ckpt.pt", weights_only=True)["iter"]
    assert min_iter <= stopped_at < 100000         # the step in flight finished, then the checkpoint was written
    return stopped_at

# ------------------------------------------------------------------ shared by the chapters' corpus tests
def write_mixed_corpus(folder):
    """A corpus folder of two compressed files: a text file, and JSON lines that keep their text in the field
    "body". Returns its documents in the corpus's order (the files sorted by path)."""
    folder.mkdir()
    text = "\n\n".join(f"Paragraph {i}. The model predicts the next word from the words before it." for i in range(40))
    rows = [{"id": i, "body": f"Row {i}: the parser reads line {i} and returns its tokens."} for i in range(80)]
    import gzip
    import json
    with gzip.open(folder / "a_notes.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    with gzip.open(folder / "b_rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return [text] + [row["body"] for row in rows]


def assert_every_document_tokenized(stdout, corpus, documents, tokenizer_path, vocab_size, special_tokens):
    """A run on write_mixed_corpus's folder trained its BPE on every document (the same tokenizer as one
    trained here), and its token stream holds each one, an end-of-text token between two (the train + val
    counts the run printed). Returns the run's tokenizer."""
    import re
    from common.tokenizer import BPETokenizer
    tokenizer = BPETokenizer.load(tokenizer_path)
    assert tokenizer.fingerprint == BPETokenizer.train(documents, vocab_size, special_tokens=special_tokens).fingerprint
    counts = re.search(rf"{re.escape(str(corpus))}: ([\d,]+) train / ([\d,]+) val tokens", stdout).groups()
    separators = len(documents) - 1
    assert sum(int(n.replace(",", "")) for n in counts) == sum(len(tokenizer.encode(d)) for d in documents) + separators
    return tokenizer

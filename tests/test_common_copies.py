"""Intended copies between chapter files stay identical, as Hugging Face checks its "# Copied from".

Each chapter file stands alone for its reader, so a few pieces are repeated on purpose, and marked:
- a function preceded by `# same as NN_x/file.py`, or with that comment on its `def` line, is, character for character, the function of that
  name in that file;
- the optimizer step, after the line `# the optimizer step (same in every train.py)`, is the same six
  lines in every train.py that has one.
"""

import ast
import re
import textwrap

import pytest
from conftest import REPO_ROOT

CHAPTER_FILES = sorted(p for p in REPO_ROOT.glob("0*_*/*.py"))
MARKER = re.compile(r"^\s*# same as (\d\d_\w+/\w+\.py)\s*$")
TRAILING_MARKER = re.compile(r"^(?:def|class) (\w+)\b.*#\s*same as (\d\d_\w+/\w+\.py)\s*$")
STEP_MARKER = "# the optimizer step (same in every train.py)"


def function_sources(path):
    """{name: source} of the top-level functions of a file, the `# same as` comments themselves left out
    (a copy's names its original, the original's names its copy)."""
    text = path.read_text(encoding="utf-8")
    return {node.name: re.sub(r"\s*#\s*same as \d\d_\w+/\w+\.py[^\n]*", "", ast.get_source_segment(text, node))
            for node in ast.parse(text).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def marked_copies():
    """(copy file, original file, function name) for every `# same as` marker above a definition."""
    found = []
    for path in CHAPTER_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines[:-1]):
            match = MARKER.match(line)
            definition = re.match(r"\s*(?:def|class) (\w+)", lines[number + 1])
            if match and definition:
                found.append((path.relative_to(REPO_ROOT).as_posix(), match.group(1), definition.group(1)))
        for line in lines:
            trailing = TRAILING_MARKER.match(line)
            if trailing:
                found.append((path.relative_to(REPO_ROOT).as_posix(), trailing.group(2), trailing.group(1)))
    return found


COPIES = marked_copies()


def test_the_copies_are_found():
    names = {name for _, _, name in COPIES}
    assert "check_token_ids" in names
    assert len([c for c in COPIES if c[2] == "check_token_ids"]) >= 5


@pytest.mark.parametrize("copy, original, name", COPIES, ids=[f"{c[0]}:{c[2]}" for c in COPIES])
def test_a_marked_copy_equals_its_original(copy, original, name):
    theirs = function_sources(REPO_ROOT / original)
    assert name in theirs, f"{original} has no {name}"
    assert function_sources(REPO_ROOT / copy)[name] == theirs[name], f"{copy}'s {name} drifted from {original}'s"


def optimizer_steps(path):
    """The six lines after each optimizer-step marker of a file, dedented."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [textwrap.dedent("\n".join(lines[k + 1:k + 7])) for k, line in enumerate(lines) if line.strip() == STEP_MARKER]


def test_every_optimizer_step_is_the_same_six_lines():
    steps = {path.relative_to(REPO_ROOT).as_posix(): optimizer_steps(path)
             for path in REPO_ROOT.glob("0*_*/train.py")}
    reference = steps["05_gpt/train.py"][0]
    assert reference.splitlines()[0].startswith("if ") and "rt.scaler.step(" in reference
    for name, found in steps.items():
        assert found, f"{name} has no marked optimizer step"
        for step in found:
            assert step == reference, f"{name}: the optimizer step differs from 05_gpt/train.py's:\n{step}"

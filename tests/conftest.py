"""Shared test helpers.

The chapter folders start with digits (``05_gpt``), so they are not importable packages: tests load a
chapter's ``model.py`` or ``train.py`` by path with :func:`load_module`.
"""

import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def repo_root():
    return REPO_ROOT

"""Shared test helpers.

The chapter folders start with digits (``05_gpt``), so they are not importable packages: tests load a
chapter's ``model.py`` or ``train.py`` by path with :func:`load_module`.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # so that `import common` works from any working directory


def load_module(relative_path):
    """Import ``REPO_ROOT / relative_path`` as a module and return it.

    Each file gets a unique module name (``ch_05_gpt_model``), so two chapters' ``model.py`` never
    shadow each other in ``sys.modules``.
    """
    path = REPO_ROOT / relative_path
    name = "ch_" + "_".join(Path(relative_path).with_suffix("").parts)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def repo_root():
    return REPO_ROOT

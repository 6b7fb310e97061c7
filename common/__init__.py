"""Shared helpers of the llm-from-scratch chapters: tokenizer, data, runtime, config, checkpoints, reports."""

import importlib.util
import sys
from pathlib import Path


def load_module(path, name=None):
    """Import the Python file at `path` as a module, under a name unique to that file.

    The chapter folders start with digits (`05_gpt`), so they are not importable packages, and every
    chapter has its own `model.py`: importing them as plain `model` would let one chapter's model
    shadow another's in `sys.modules`. `load_module(HERE / "model.py")` avoids both problems.
    """
    path = Path(path).resolve()
    name = name or "chapter_" + "_".join(path.with_suffix("").parts[-2:]).replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

"""Checkpoints that are never half-written and never unpickle arbitrary objects.

A checkpoint is a plain dict of tensors and plain Python values (numbers, strings, lists, dicts):
configs go in as `dataclasses.asdict(cfg)`, so `torch.load(..., weights_only=True)` can read it back
without executing code from the file. Writes go to a temporary file in the same folder and are then
renamed over the target (`os.replace` is atomic), so a crash or Ctrl-C mid-write leaves the previous
checkpoint intact.
"""

import json
import os
from pathlib import Path

import torch

from common.config import UserError


def save_checkpoint(path, state):
    """Write `state` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by `save_checkpoint`; a missing or corrupt file is a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle errors, truncated zip archives, foreign objects
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a readable checkpoint ({first_line[:200]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint of this repository (expected a dict)")
    return state


def load_model_state(model, state_dict, path="checkpoint"):
    """`model.load_state_dict` with a one-line error when the checkpoint was saved for another config."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise UserError(
            f"{path} does not match this model's config ({details[0][:200] if details else 'shape mismatch'})"
        ) from None


def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")

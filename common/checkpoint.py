"""Files: checkpoints that are never half-written and never unpickle arbitrary objects, atomic writes,
and the cache folder.

A checkpoint is a plain dict of tensors and plain Python values (numbers, strings, lists, dicts):
configs go in as `dataclasses.asdict(cfg)`, so `torch.load(..., weights_only=True)` can read it back
without executing code from the file. Writes go to a temporary file in the same folder and are then
renamed over the target (`os.replace` is atomic), so a crash or Ctrl-C mid-write leaves the previous
checkpoint intact. Every file this repository writes (tokenizers, reports, token caches, exported
weights) goes through `atomic_path`, the one mechanism for that.
"""

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from common.config import UserError


def cache_dir():
    """Where everything built once lives (corpora, token caches, trained tokenizers, measured peaks):
    $LLMFS_CACHE if it is set and not empty, else ~/.cache/llm-from-scratch."""
    return Path(os.environ.get("LLMFS_CACHE") or Path.home() / ".cache" / "llm-from-scratch")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block ends without an error, it replaces `path`
    (`os.replace` is atomic on one file system), else it is deleted. A reader sees the old file or
    the whole new one, never half of one.

        with atomic_path("out/report.json") as temporary:
            temporary.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_checkpoint(path, state):
    """Write `state` to `path` atomically."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by `save_checkpoint`; a missing or corrupt file is a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch 2.1's own loader warns that TypedStorage is deprecated: nothing the user can act on
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
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


def claim_out_dir(out_dir, config, fields):
    """Make sure a run does not destroy another run's results: `out_dir/run.json` records the values of
    `fields` (those that decide what the folder's checkpoints are: model shape, vocabulary, corpus) of
    the run that wrote the folder. A run with other values is refused with one line naming --out_dir;
    a run with the same values (a rerun, --resume, another stage) goes on. `config` is a dict."""
    out_dir = Path(out_dir)
    path = out_dir / "run.json"
    claimed = {name: config[name] for name in fields}
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path} is corrupt: delete it, or pass another --out_dir") from None
        differing = [name for name in fields if name in previous and previous[name] != claimed[name]]
        if differing:
            shown = ", ".join(f"{name} {previous[name]!r} (now {claimed[name]!r})" for name in differing[:3])
            raise UserError(f"{out_dir} holds a run with another config: {shown}; pass --out_dir to keep "
                            f"both runs, or delete {out_dir}")
    atomic_write_json(path, {"config": claimed})


def atomic_write_bytes(path, data):
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")

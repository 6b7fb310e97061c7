"""Typed command-line configs: a dataclass becomes flags, its comments become the --help text.

    @dataclass
    class Config:
        n_layer: int = 4          # Transformer blocks
        lr: float = 3e-3          # peak learning rate

    cfg = parse_config(Config, presets={"tiny": {"n_layer": 1}})
    # python train.py --preset tiny --lr 1e-3   ->  Config(n_layer=1, lr=0.001)

A preset is a named set of overrides; flags given explicitly win over it. Every chapter has `tiny`
(seconds, for tests), `default` (the config as written: the 2-core CPU run) and a GPU preset. A run
with another preset than `default` writes to its own folder unless --out_dir says otherwise
(out/05_gpt -> out/05_gpt-tiny), so a smoke test never touches the default run's results. Bad input (an unknown flag or
preset, a value of the wrong type) is one clear line and exit code 2, never a traceback. `UserError`
is how a train.py reports any other bad input (a missing data file, a mismatched checkpoint), and
`run_main` turns it into that same one line.
"""

import argparse
import dataclasses
import difflib
import inspect
import os
import re
import sys
import typing


class UserError(Exception):
    """Bad input from the user: printed as one line by `run_main`, with exit code 2."""


def run_main(main, *args, **kwargs):
    """Call `main`; a `UserError` becomes "error: <message>" on stderr and exit code 2, and a Ctrl-C
    outside the training loops (which stop at a step boundary and save first, see `StopFlag`) one
    line and exit code 130, the shell's code for SIGINT, never a traceback."""
    try:
        return main(*args, **kwargs)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted (files already written are complete: every write is atomic)", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:
        line = lost_process_line(error)
        if line is None:
            raise                                   # a bug: its traceback is what a developer needs
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)   # not sys.exit: the atexit teardown would wait for the process that is gone


def lost_process_line(error):
    """The one line for a collective that failed because another process of a torchrun run died or hung
    (gloo: "Connection reset by peer", "Timed out waiting ... for recv"; NCCL: "remote process exited",
    watchdog timeouts; torch's DistNetworkError / DistStoreError), else None: any other error while a
    process group is up is a bug and keeps its traceback. The process that failed first prints its own
    reason; the others say they lost it."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    text = str(error).strip()
    lost_peer = r"connection (reset|closed|refused)|timed out|timeout|broken pipe|remote process|peer"
    network_errors = tuple(getattr(dist, name) for name in ("DistNetworkError", "DistStoreError") if hasattr(dist, name))
    if not (isinstance(error, network_errors) or re.search(lost_peer, text, re.IGNORECASE)):
        return None
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(error).__name__)  # gloo's file:line
    reason = reason.split(". This is typically")[0].rstrip(".")[:200]
    return (f"error: rank {dist.get_rank()}: another process of this run stopped or hung ({reason}); its own output "
            f"says why, and the checkpoints already written are complete")


def field_comments(config_class):
    """The trailing comment of each field in the class source: {"n_layer": "Transformer blocks", ...}."""
    comments = {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+?)\s*$", source, re.MULTILINE):
            comments[match.group(1)] = match.group(2)
    return comments


def parse_bool(text):
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(config_class, field):
    """The field's Python type (dataclass annotations may be strings under `from __future__`)."""
    hints = typing.get_type_hints(config_class)
    kind = hints.get(field.name, field.type)
    origin = typing.get_origin(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        arguments = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = arguments[0] if len(arguments) == 1 else str
    return kind


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line that lists the valid choices, and exits with 2."""

    def error(self, message):
        match = re.search(r"unrecognized arguments: (.+)", message)
        if match:
            flags = sorted(a.option_strings[0] for a in self._actions if a.option_strings)
            unknown = match.group(1).split()[0]
            close = difflib.get_close_matches(unknown, flags, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            message = f"unknown flag {unknown} ({hint}valid flags: {' '.join(flags)})"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_config(config_class, presets=None, argv=None, description=None, default_preset=None):
    """Parse `argv` (default: sys.argv[1:]) into an instance of the dataclass `config_class`.

    With presets, `default_preset` is "default" when there is one. A config with an `out_dir` field
    gets `<out_dir>-<preset>` under any other preset, unless the preset or a flag sets out_dir.
    """
    presets = dict(presets or {})
    if default_preset is None and "default" in presets:
        default_preset = "default"
    fields = dataclasses.fields(config_class)
    names = {f.name for f in fields}
    for preset_name, overrides in presets.items():
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"preset {preset_name!r} sets unknown fields {sorted(unknown)}")

    comments = field_comments(config_class)
    # allow_abbrev=False: argparse would otherwise read --task as --tasks, silently.
    parser = _OneLineParser(description=description, formatter_class=argparse.HelpFormatter, allow_abbrev=False)
    preset_help = "named set of overrides: " + ", ".join(
        f"{name} ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'the defaults'})"
        for name, overrides in presets.items()
    )
    if presets:
        parser.add_argument("--preset", default=default_preset,
                            help=f"{preset_help} (default: {default_preset or 'none: the config defaults'})")
    for field in fields:
        kind = _field_type(config_class, field)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = comments.get(field.name, "")
        if kind is bool:
            parser.add_argument(f"--{field.name}", type=parse_bool, nargs="?", const=True, default=None,
                                metavar="true|false", help=f"{help_text} (default: {default})")
        else:
            converter = kind if kind in (int, float, str) else str
            parser.add_argument(f"--{field.name}", type=converter, default=None,
                                metavar=converter.__name__.upper(), help=f"{help_text} (default: {default})")

    arguments = parser.parse_args(argv)
    values = {}
    preset_name = getattr(arguments, "preset", None)
    if preset_name is not None:
        if preset_name not in presets:
            parser.error(f"unknown preset {preset_name!r} (valid presets: {', '.join(presets)})")
        values.update(presets[preset_name])
    for field in fields:
        given = getattr(arguments, field.name)
        if given is not None:
            values[field.name] = given
    if "out_dir" in names and "out_dir" not in values and preset_name not in (None, default_preset):
        default_out_dir = next(f for f in fields if f.name == "out_dir").default
        values["out_dir"] = f"{str(default_out_dir).rstrip('/')}-{preset_name}"
    return config_class(**values)

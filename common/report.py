"""Progress lines during training and the final report, printed and written as JSON.

    progress = Progress(total_iters=300, tokens_per_iter=16 * 256, log=rt.log)
    for it in range(300):
        ...
        progress.step(it, loss=loss, lr=lr)
    # iter   40/300 | loss 4.1234 | lr 3.00e-03 | 12.3k tok/s | MFU 1.2% | ETA 1m20s
    (on CUDA also "mem 3.21GiB": the peak GPU memory allocated so far)

`loss` may be a tensor: it is turned into a float only on the iterations that print, so the loop does
not wait for the GPU on every step.
"""

import json
import time
from pathlib import Path

from common.checkpoint import atomic_write_json


def format_seconds(seconds):
    """3725 -> "1h02m", 80 -> "1m20s", 4.2 -> "4.2s"."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_count(number):
    """12345 -> "12.3k", 1234567 -> "1.23M"."""
    if number >= 1e6:
        return f"{number / 1e6:.2f}M"
    if number >= 1e3:
        return f"{number / 1e3:.1f}k"
    return f"{number:.0f}"


class Progress:
    """Prints iteration, loss, learning rate, tokens/s, MFU and ETA every `log_interval` iterations."""

    def __init__(self, total_iters, tokens_per_iter, log=print, log_interval=10, flops_per_token=None,
                 device=None, dtype=None, start_iter=0, name=""):
        self.total_iters = total_iters
        self.tokens_per_iter = tokens_per_iter
        self.log = log
        self.log_interval = max(1, log_interval)
        self.flops_per_token = flops_per_token
        self.device = device
        self.dtype = dtype
        self.name = f"{name} " if name else ""
        self.start_time = time.perf_counter()
        self.last_time = self.start_time
        self.last_iter = start_iter - 1
        self.start_iter = start_iter
        self.tokens_per_second = None           # over the latest interval
        self.tokens_seen = 0
        self.interval_tokens = 0
        self.peak = None                        # FLOP/s, looked up at the first line that shows MFU

    def step(self, it, loss=None, lr=None, tokens=None, **extra):
        """Record that iteration `it` (0-based) finished, having processed `tokens` tokens (default
        tokens_per_iter); print a line when one is due."""
        tokens = self.tokens_per_iter if tokens is None else tokens
        self.tokens_seen += tokens
        self.interval_tokens += tokens
        last = it == self.total_iters - 1
        if (it + 1) % self.log_interval and not last and it != self.start_iter:
            return None
        now = time.perf_counter()
        elapsed = now - self.last_time
        self.last_time, self.last_iter = now, it
        self.tokens_per_second = self.interval_tokens / elapsed if elapsed > 0 else None
        self.interval_tokens = 0
        done_iters = it + 1 - self.start_iter
        per_iter = (now - self.start_time) / done_iters
        eta = per_iter * (self.total_iters - it - 1)
        parts = [f"{self.name}iter {it + 1:>{len(str(self.total_iters))}}/{self.total_iters}"]
        if loss is not None:
            parts.append(f"loss {float(loss.detach() if hasattr(loss, 'detach') else loss):.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        for key, value in extra.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        if self.tokens_per_second:
            parts.append(f"{format_count(self.tokens_per_second)} tok/s")
            if self.flops_per_token and self.device is not None:
                achieved = self.flops_per_token * self.tokens_per_second
                if self.peak is None or (self.peak and achieved > self.peak):
                    # Looked up once; measured again only when a reading would pass 100% (a CPU peak
                    # measured on a busy machine), and then never below what this step reached.
                    from common.runtime import peak_flops
                    dtype = {"dtype": self.dtype} if self.dtype is not None else {}
                    self.peak = peak_flops(self.device, at_least=achieved, **dtype) or 0.0
                if self.peak:
                    parts.append(f"MFU {100 * achieved / self.peak:.1f}%")
        if self.device is not None and str(self.device).startswith("cuda"):
            import torch
            parts.append(f"mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f}GiB")   # peak so far
        parts.append(f"ETA {format_seconds(eta)}")
        line = " | ".join(parts)
        self.log(line)
        return line

    @property
    def seconds(self):
        return time.perf_counter() - self.start_time

    @property
    def average_tokens_per_second(self):
        return self.tokens_seen / self.seconds if self.seconds > 0 else None


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def format_table(rows, columns):
    """Rows (dicts) -> an aligned text table with the given columns."""
    cells = [[str(c) for c in columns]] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_report(report, title=None, log=print):
    """The final report as a short table: header facts, pretraining figures, one row per finetuned task."""
    title = title or f"{report.get('chapter', 'run')} report"
    log(f"\n=== {title} ===")
    header = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    if header:
        log("  ".join(f"{k}: {_cell(v)}" for k, v in header.items()))
    if isinstance(report.get("pretrain"), dict):
        log("pretraining: " + "  ".join(f"{k} {_cell(v)}" for k, v in report["pretrain"].items()
                                         if not isinstance(v, (dict, list))))
    if isinstance(report.get("finetune"), dict) and report["finetune"]:
        rows = [{"task": task, **{k: v for k, v in row.items() if not isinstance(v, (dict, list))}}
                for task, row in report["finetune"].items()]
        columns = ["task", "metric", "pretrained", "scratch", "baseline", "seconds"]
        columns += [c for row in rows for c in row if c not in columns and not columns.count(c)]
        columns = list(dict.fromkeys(columns))
        log(format_table(rows, columns))


def merge_report(previous, report):
    """`report` laid over `previous`: what this run measured replaces the old figures, and what it did not
    run stays. Sections are replaced whole ("pretrain", "samples"...), except "finetune", whose tasks
    are replaced one by one, so that finetuning one task keeps the rows of the others.

    >>> merge_report({"pretrain": {"val_loss": 4.1}, "finetune": {"a": {"scratch": 0.5}}},
    ...              {"finetune": {"b": {"scratch": 0.7}}})
    {'pretrain': {'val_loss': 4.1}, 'finetune': {'a': {'scratch': 0.5}, 'b': {'scratch': 0.7}}}
    """
    merged = dict(previous)
    for key, value in report.items():
        if key == "finetune" and isinstance(value, dict) and isinstance(previous.get(key), dict):
            merged[key] = {**previous[key], **value}
        else:
            merged[key] = value
    return merged


def write_report(path, report, log=print):
    """Merge `report` into the report.json at `path` (see `merge_report`) and write it atomically;
    return the merged report, which is what the folder's results now are."""
    path = Path(path)
    previous = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict):
            log(f"warning: {path} was not a readable report; writing a new one")
            previous = {}
    merged = merge_report(previous, json.loads(json.dumps(report, default=str)))
    atomic_write_json(path, merged)
    return merged

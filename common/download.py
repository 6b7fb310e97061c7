"""Downloads of named corpora that survive a dropped connection or a Ctrl-C, and are checked before use.

    path = download("https://example.org/corpus.txt", cache_dir() / "corpora" / "corpus.txt",
                    name="corpus", expected_size=2_228_017_467, sha256="9f86d0...")
    # data: downloading corpus from https://example.org/corpus.txt
    # data: downloading corpus: 312.4/2228.0 MB (14%) | 9.8 MB/s | ETA 3m15s
    # data: downloaded corpus: 2228.0 MB in 3m47s (9.8 MB/s)

- The bytes go to `path.part` as they arrive, one chunk at a time, so a 2 GB corpus never sits in memory.
- A `.part` left by an interrupted run is resumed with an HTTP Range request; a server that ignores
  Range (200 instead of 206) makes it start again from zero, and one that answers 416 (nothing left to
  send) either confirms that the `.part` is already whole or shows that it is not and must be redone.
- The size is checked against `expected_size` or what the server declared, and the sha256 when given.
  Only then is the `.part` renamed to `path`: a file at `path` is always complete, which is why its
  mere presence means "done, no network needed".
- Every failure is a `UserError` of one line that says what to do; a Ctrl-C keeps the `.part` to resume.
"""

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.config import UserError
from common.report import format_seconds

OFFLINE_HINT = "offline? download it another way and pass the local file or folder with --data PATH"


def download(url, path, *, name, expected_size=None, sha256=None, hint=OFFLINE_HINT, log=print, timeout=60,
             chunk_bytes=1 << 20, progress_seconds=2.0):
    """Fetch `url` to `path` once, resuming an interrupted run, and return `path` (see the module docstring).

    `name` is what the messages call the file ("wikitext-2"); `hint` ends the message of a failed fetch
    (the caller knows how its user passes a local copy); a progress line is logged at most every
    `progress_seconds`; `timeout` is in seconds, per connection attempt and per read.
    """
    path = Path(path)
    if path.exists():
        return path
    part = path.with_name(path.name + ".part")
    offset = part.stat().st_size if part.exists() else 0

    def failed(reason):
        return UserError(f"could not download {name} from {url} ({reason}); {hint}")

    log(f"data: downloading {name} from {url}" + (f" (resuming at {offset / 1e6:.1f} MB)" if offset else ""))
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        # 416: the server has nothing after `offset`. Either the last run wrote every byte but stopped
        # before the rename, or the .part is longer than the file (the file changed): then start over.
        complete_size = expected_size or _range_total(error.headers.get("Content-Range"))
        if error.code == 416 and offset and offset == complete_size:
            return _check_and_rename(part, path, name, offset, expected_size, sha256)
        if error.code == 416 and offset:
            part.unlink()
            return download(url, path, name=name, expected_size=expected_size, sha256=sha256, hint=hint,
                            log=log, timeout=timeout, chunk_bytes=chunk_bytes, progress_seconds=progress_seconds)
        raise failed(error) from None
    except (OSError, ValueError, http.client.HTTPException) as error:   # URLError and timeouts are OSErrors
        raise failed(getattr(error, "reason", None) or error) from None

    with response:
        # Where this response starts in the file, and how long the whole file is, as far as the server says.
        content_range = response.headers.get("Content-Range")
        length = _int_or_none(response.headers.get("Content-Length"))
        start, total = 0, length
        if response.status == 206:
            start = _range_start(content_range)
            if start != offset:            # not the range we asked for: it cannot be spliced on, start over
                part.unlink(missing_ok=True)
                raise failed(f"the server resumed at byte {start} instead of {offset}; run again to start afresh")
            total = _range_total(content_range) or (offset + length if length is not None else None)
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)   # not the file expected: not worth fetching, nor resuming later
            raise UserError(f"{name} from {url} has {total} bytes, expected {expected_size}; "
                            f"not downloaded (has the file changed on the server?)")

        done = start
        began = last_log = time.perf_counter()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = open(part, "ab" if start else "wb")             # "wb": a 200 replaces any old .part
        except OSError as error:                                   # not the network's fault: say so
            raise UserError(f"cannot write the download of {name} to {part} ({error})") from None
        try:
            with file:
                while chunk := response.read(chunk_bytes):
                    file.write(chunk)
                    done += len(chunk)
                    now = time.perf_counter()
                    if now - last_log >= progress_seconds:
                        last_log = now
                        log(_progress_line(name, done, total, speed=(done - start) / max(now - began, 1e-9)))
        except (OSError, http.client.HTTPException) as error:   # the connection broke (or the disk filled)
            raise failed(f"{str(error) or type(error).__name__} after {done / 1e6:.1f} MB; "
                         f"run again to resume from there") from None
        # http.client ends the stream quietly when the connection closes early: only the count tells.
        if total is not None and done < total:
            raise failed(f"the connection closed after {done} of {total} bytes; run again to resume from there")

    seconds = time.perf_counter() - began
    path = _check_and_rename(part, path, name, done, expected_size, sha256)
    log(f"data: downloaded {name}: {done / 1e6:.1f} MB in {format_seconds(seconds)} "
        f"({(done - start) / 1e6 / max(seconds, 1e-9):.1f} MB/s)")
    return path


def _check_and_rename(part, path, name, size, expected_size, sha256):
    """Check the complete .part's size and sha256, then rename it to `path`; a bad one is deleted."""
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise UserError(f"{name}: downloaded {size} bytes, expected {expected_size}; deleted {part}, run again")
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(part, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            part.unlink()
            raise UserError(f"{name}: the download's sha256 is {digest.hexdigest()}, expected {sha256}; "
                            f"deleted {part}, run again")
    os.replace(part, path)        # atomic: `path` appears whole or not at all
    return path


def _progress_line(name, done, total, speed):
    """'data: downloading corpus: 312.4/2228.0 MB (14%) | 9.8 MB/s | ETA 3m15s' (no total: no % and ETA)."""
    if total:
        eta = format_seconds((total - done) / speed) if speed > 0 else "?"
        return (f"data: downloading {name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB ({100 * done // total}%)"
                f" | {speed / 1e6:.1f} MB/s | ETA {eta}")
    return f"data: downloading {name}: {done / 1e6:.1f} MB | {speed / 1e6:.1f} MB/s"


def _int_or_none(text):
    return int(text) if text and text.strip().isdigit() else None


def _range_start(content_range):
    """"bytes 100-999/1000" -> 100 (None when absent or malformed)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (content_range or "").strip())
    return int(match[1]) if match else None


def _range_total(content_range):
    """"bytes 100-999/1000" -> 1000, "bytes */1000" -> 1000, "bytes 100-999/*" -> None."""
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (content_range or "").strip())
    return int(match[1]) if match else None

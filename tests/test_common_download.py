"""common/download.py against a real HTTP server on 127.0.0.1 that can be told to misbehave: drop the
connection, ignore Range, answer 404, lie about the length. No network beyond the loopback."""

import hashlib
import http.server
import random
import re
import socket
import threading

import pytest

from common.config import UserError
from common.download import download

PAYLOAD = random.Random(0).randbytes(300_000)       # a few hundred KB: many 4 KB chunks, still instant
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class PayloadHandler(http.server.BaseHTTPRequestHandler):
    """Serves `server.payload` at every path, honouring "Range: bytes=N-" with 206 (or 416 past the end),
    unless the server's settings say to misbehave; records what each request asked for and got."""

    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        if server.status:
            server.sent.append(0)
            self.send_error(server.status)
            return
        payload, start = server.payload, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not server.ignore_range:
            start = int(match[1])
            if start >= len(payload):
                server.sent.append(0)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        if server.send_length:
            self.send_header("Content-Length", str(server.content_length or len(body)))
        self.end_headers()
        if server.drop_after is not None:     # once: the next request gets the whole answer
            body, server.drop_after = body[:server.drop_after], None
        server.sent.append(len(body))
        try:
            self.wfile.write(body)            # then the connection closes (HTTP/1.0)
        except (BrokenPipeError, ConnectionResetError):
            pass                              # the client stopped reading (a Ctrl-C, a size check)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A threaded local server serving PAYLOAD at `server.url`; set its attributes to make it misbehave."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PayloadHandler)
    httpd.daemon_threads = True
    httpd.payload = PAYLOAD
    httpd.status = None             # answer every request with this error status (404)
    httpd.ignore_range = False      # answer a Range request with 200 and the whole file
    httpd.drop_after = None         # send only this many body bytes of the next answer, then hang up
    httpd.send_length = True        # False: no Content-Length, the end is when the connection closes
    httpd.content_length = None     # a Content-Length to claim instead of the true one
    httpd.ranges = []               # the Range header of each request (None without one)
    httpd.sent = []                 # the body bytes sent in answer to each request
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/corpus.bin"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def quiet(line):
    pass


def refused_url():
    with socket.socket() as probe:                     # a port that nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/corpus.bin"


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ------------------------------------------------------------------------------------ the happy path
def test_full_download_equals_the_payload_and_a_second_call_stays_offline(tmp_path, server):
    target = tmp_path / "corpora" / "corpus.bin"          # the folder does not exist yet
    lines = []
    assert download(server.url, target, name="corpus", sha256=SHA256, expected_size=len(PAYLOAD),
                    log=lines.append) == target
    assert target.read_bytes() == PAYLOAD
    assert not (tmp_path / "corpora" / "corpus.bin.part").exists()
    assert server.ranges == [None] and server.sent == [len(PAYLOAD)]
    assert lines[0] == f"data: downloading corpus from {server.url}"
    assert lines[-1].startswith("data: downloaded corpus: 0.3 MB in ")

    # The file is there: no request at all, not even to a URL where nothing listens.
    assert download(refused_url(), target, name="corpus", log=quiet) == target
    assert len(server.ranges) == 1


def test_progress_lines_show_amount_percent_speed_and_eta(tmp_path, server):
    lines = []
    download(server.url, tmp_path / "corpus.bin", name="corpus", log=lines.append, chunk_bytes=4096,
             progress_seconds=0)
    progress = [line for line in lines if re.search(r"\d MB/s", line)]
    assert len(progress) >= len(PAYLOAD) // 4096                      # one line a chunk at interval 0
    assert re.fullmatch(r"data: downloading corpus: 0\.0/0\.3 MB \(1%\) \| [\d.]+ MB/s \| ETA \S+", progress[0])
    assert "0.3/0.3 MB (100%)" in progress[-2]        # the last chunk, then "downloaded ..."


def test_progress_without_a_declared_length_shows_the_amount_and_speed(tmp_path, server):
    server.send_length = False
    lines = []
    download(server.url, tmp_path / "corpus.bin", name="corpus", log=lines.append, chunk_bytes=65536,
             progress_seconds=0)
    assert (tmp_path / "corpus.bin").read_bytes() == PAYLOAD
    assert re.fullmatch(r"data: downloading corpus: 0\.1 MB \| [\d.]+ MB/s", lines[1])


# ---------------------------------------------------------------------------------------- resuming
def test_an_interrupted_transfer_leaves_a_part_that_the_next_run_resumes_with_range(tmp_path, server):
    target, part = tmp_path / "corpus.bin", tmp_path / "corpus.bin.part"
    server.drop_after = 100_000
    with pytest.raises(UserError) as excinfo:
        download(server.url, target, name="corpus", sha256=SHA256, log=quiet, chunk_bytes=4096)
    message = one_line_error(excinfo)
    assert "could not download corpus" in message and "100000 of 300000 bytes" in message and "resume" in message
    assert not target.exists() and part.read_bytes() == PAYLOAD[:100_000]

    lines = []
    download(server.url, target, name="corpus", sha256=SHA256, log=lines.append, chunk_bytes=4096)
    assert target.read_bytes() == PAYLOAD and not part.exists()
    assert server.ranges == [None, "bytes=100000-"]
    assert server.sent == [100_000, len(PAYLOAD) - 100_000]           # only the rest came the second time
    assert "(resuming at 0.1 MB)" in lines[0]


def test_a_server_that_ignores_range_makes_the_download_restart_from_zero(tmp_path, server):
    target = tmp_path / "corpus.bin"
    (tmp_path / "corpus.bin.part").write_bytes(b"not the start of the payload")
    server.ignore_range = True
    download(server.url, target, name="corpus", log=quiet, chunk_bytes=4096)
    assert server.ranges == ["bytes=28-"] and server.sent == [len(PAYLOAD)]
    assert target.read_bytes() == PAYLOAD                   # the old .part was replaced, not appended to


def test_416_on_a_complete_part_renames_it_after_checking(tmp_path, server):
    target = tmp_path / "corpus.bin"
    (tmp_path / "corpus.bin.part").write_bytes(PAYLOAD)     # a run stopped between the last byte and the rename
    download(server.url, target, name="corpus", sha256=SHA256, log=quiet)
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"] and server.sent == [0]
    assert target.read_bytes() == PAYLOAD


def test_416_on_a_part_longer_than_the_file_starts_over(tmp_path, server):
    target = tmp_path / "corpus.bin"
    (tmp_path / "corpus.bin.part").write_bytes(PAYLOAD + b"junk")     # the file shrank on the server
    download(server.url, target, name="corpus", log=quiet)
    assert server.ranges == [f"bytes={len(PAYLOAD) + 4}-", None]
    assert target.read_bytes() == PAYLOAD


def test_ctrl_c_keeps_the_part_and_reraises_and_the_next_run_resumes(tmp_path, server):
    target, part = tmp_path / "corpus.bin", tmp_path / "corpus.bin.part"
    lines = []

    def log_then_press_ctrl_c(line):           # the interrupt lands mid-transfer, between two chunks
        lines.append(line)
        if len(lines) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(server.url, target, name="corpus", log=log_then_press_ctrl_c, chunk_bytes=4096, progress_seconds=0)
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD) and part.read_bytes() == PAYLOAD[:kept] and not target.exists()

    download(server.url, target, name="corpus", sha256=SHA256, log=quiet, chunk_bytes=4096)
    assert server.ranges[-1] == f"bytes={kept}-" and server.sent[-1] == len(PAYLOAD) - kept
    assert target.read_bytes() == PAYLOAD and not part.exists()


# ------------------------------------------------------------------------------------------- checks
def test_a_sha256_mismatch_deletes_the_part_and_leaves_no_file(tmp_path, server):
    target = tmp_path / "corpus.bin"
    with pytest.raises(UserError) as excinfo:
        download(server.url, target, name="corpus", sha256="0" * 64, log=quiet)
    message = one_line_error(excinfo)
    assert f"sha256 is {SHA256}, expected {'0' * 64}" in message
    assert not target.exists() and not (tmp_path / "corpus.bin.part").exists()


def test_a_declared_size_other_than_the_expected_one_is_refused_before_the_transfer(tmp_path, server):
    target = tmp_path / "corpus.bin"
    with pytest.raises(UserError) as excinfo:
        download(server.url, target, name="corpus", expected_size=len(PAYLOAD) + 1, log=quiet)
    assert f"has {len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}" in one_line_error(excinfo)
    assert not target.exists() and not (tmp_path / "corpus.bin.part").exists()


def test_a_size_mismatch_after_a_complete_transfer_deletes_the_part(tmp_path, server):
    server.send_length = False                  # nothing to compare with until the transfer has ended
    target = tmp_path / "corpus.bin"
    with pytest.raises(UserError) as excinfo:
        download(server.url, target, name="corpus", expected_size=len(PAYLOAD) - 1, log=quiet)
    assert f"downloaded {len(PAYLOAD)} bytes, expected {len(PAYLOAD) - 1}" in one_line_error(excinfo)
    assert not target.exists() and not (tmp_path / "corpus.bin.part").exists()


def test_a_too_short_content_length_is_caught_by_the_expected_size(tmp_path, server):
    server.content_length = len(PAYLOAD) - 1000           # the client would stop 1000 bytes early
    with pytest.raises(UserError, match=f"has {len(PAYLOAD) - 1000} bytes, expected {len(PAYLOAD)}"):
        download(server.url, tmp_path / "corpus.bin", name="corpus", expected_size=len(PAYLOAD), log=quiet)
    assert not (tmp_path / "corpus.bin").exists()


def test_a_too_long_content_length_is_an_interruption_that_the_next_run_completes(tmp_path, server):
    server.content_length = len(PAYLOAD) + 1000           # the connection closes before the claimed end
    target = tmp_path / "corpus.bin"
    with pytest.raises(UserError, match=f"{len(PAYLOAD)} of {len(PAYLOAD) + 1000} bytes"):
        download(server.url, target, name="corpus", log=quiet)
    server.content_length = None
    download(server.url, target, name="corpus", sha256=SHA256, log=quiet)   # 416: the .part was whole
    assert server.ranges == [None, f"bytes={len(PAYLOAD)}-"] and target.read_bytes() == PAYLOAD


# ------------------------------------------------------------------------------------------ failures
def test_http_errors_and_unreachable_servers_are_one_line_that_says_what_to_do(tmp_path, server):
    server.status = 404
    cases = {server.url: "HTTP Error 404: Not Found", refused_url(): "Connection refused",
             "not-a-url": "unknown url type"}
    for url, reason in cases.items():
        with pytest.raises(UserError) as excinfo:
            download(url, tmp_path / "corpus.bin", name="corpus", log=quiet)
        message = one_line_error(excinfo)
        assert message.startswith(f"could not download corpus from {url} (") and reason in message
        assert message.endswith("offline? download it another way and pass the local file or folder with --data PATH")
    assert list(tmp_path.iterdir()) == []                             # nothing written, not even a .part


def test_a_folder_that_cannot_be_written_is_not_blamed_on_the_network(tmp_path, server):
    (tmp_path / "corpora").write_text("a file where the folder should be")
    with pytest.raises(UserError) as excinfo:
        download(server.url, tmp_path / "corpora" / "corpus.bin", name="corpus", log=quiet)
    message = one_line_error(excinfo)
    assert message.startswith(f"cannot write the download of corpus to {tmp_path / 'corpora' / 'corpus.bin.part'} (")
    assert "offline?" not in message


def test_the_caller_can_say_how_its_user_passes_a_local_copy(tmp_path):
    with pytest.raises(UserError, match=r"\(.*refused.*\); get it by hand: --data path/to/file\.txt$"):
        download(refused_url(), tmp_path / "corpus.bin", name="corpus", log=quiet,
                 hint="get it by hand: --data path/to/file.txt")


def test_a_server_that_never_answers_times_out(tmp_path):
    with socket.socket() as silent:                # accepts connections (the backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/corpus.bin"
        with pytest.raises(UserError, match=r"could not download corpus .*timed out.*offline\?"):
            download(url, tmp_path / "corpus.bin", name="corpus", log=quiet, timeout=0.3)

"""Every bad input a new user gives, in every chapter: one clear line on stderr, a non-zero exit, no
traceback, and nothing slow run before it. Each row runs a chapter's `main` in this process (no torch
start-up per row), the way `python NN_x/train.py ARGS` would under `run_main`.

A row: (chapter, args, message, files). `args` follow `--preset tiny --device cpu --out_dir OUT`;
"{tmp}" in an argument or a file name stands for the row's own temporary folder and "{out}" for OUT.
`files` maps a path (relative to {tmp}) to the text written there before the run; a path ending in
"/" is an empty folder. `message` must appear in the one line printed.
"""

import pytest
from conftest import REPO_ROOT, load_module

from common.config import run_main

CHAPTERS = ["01_hello_pytorch", "02_attention", "03_transformer", "04_bert", "05_gpt", "06_t5", "07_peft"]

# Bad input every chapter must turn down the same way.
SHARED_ROWS = [
    (["--batch_size", "0"], "batch_size", {}),
    (["--vocab_size", "100"], "vocab_size", {}),
    (["--max_iters", "-1"], "max_iters", {}),
    (["--lr", "-0.1"], "lr", {}),
    (["--data", "{tmp}/missing.txt"], "missing.txt", {}),
    (["--data", "{tmp}/empty.txt"], "empty", {"empty.txt": ""}),
    (["--data", "{tmp}/folder"], "no .txt files", {"folder/": ""}),
    (["--device", "tpu"], "unknown device", {}),
    (["--dtype", "float8"], "unknown dtype", {}),
    (["--preset", "huge"], "unknown preset", {}),
    (["--max_itres", "3"], "did you mean --max_iters", {}),
    (["--resume", "--init_from", "{tmp}/nowhere"], "nowhere", {}),
]

# Bad input that only some chapters can be given, by chapter.
CHAPTER_ROWS = {
    "01_hello_pytorch": [
    ],
    "02_attention": [
    ],
    "03_transformer": [
    ],
    "04_bert": [
    ],
    "05_gpt": [
    ],
    "06_t5": [
    ],
    "07_peft": [
    ],
}

ROWS = [(chapter, *row) for chapter in CHAPTERS for row in SHARED_ROWS]
ROWS += [(chapter, *row) for chapter, rows in CHAPTER_ROWS.items() for row in rows]


def _fill(text, tmp, out):
    return text.replace("{tmp}", str(tmp)).replace("{out}", str(out))


@pytest.mark.parametrize("chapter, args, message, files", ROWS,
                         ids=[f"{row[0][:2]}-{' '.join(row[1])[:40]}" for row in ROWS])
def test_bad_input_is_one_clear_line(chapter, args, message, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # nothing may land in the repository's own out/
    out = tmp_path / "out"
    for name, content in files.items():
        path = tmp_path / _fill(name, tmp_path, out)
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    train = load_module(f"{chapter}/train.py")
    argv = ["--preset", "tiny", "--device", "cpu", "--out_dir", str(out), *[_fill(a, tmp_path, out) for a in args]]
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main, argv)
    captured = capsys.readouterr()
    assert exit_info.value.code not in (0, None), f"exit {exit_info.value.code}\n{captured.out[-1500:]}"
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-2000:]
    assert message in lines[0], lines[0]


def test_bench_rejects_an_unknown_benchmark():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "bench.py"), "--only", "bogus"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "bogus" in result.stderr and "Traceback" not in result.stderr

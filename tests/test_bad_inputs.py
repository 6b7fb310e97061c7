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
    (["--data", "{tmp}/folder"], "no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files", {"folder/": ""}),
    (["--data", "{tmp}/binary.txt"], "binary.txt is a binary file", {"binary.txt": "text\x00more"}),
    (["--data", "{tmp}/rows.jsonl"], "rows.jsonl, line 2: not a JSON object with a 'text' string",
     {"rows.jsonl": '{"text": "fine"}\n{"body": "no text field"}\n'}),
    (["--device", "tpu"], "unknown device", {}),
    (["--dtype", "float8"], "unknown dtype", {}),
    (["--preset", "huge"], "unknown preset", {}),
    (["--max_itres", "3"], "did you mean --max_iters", {}),
    (["--resume", "--init_from", "{tmp}/nowhere"], "nowhere", {}),
]

# Bad input that only some chapters can be given, by chapter.
CHAPTER_ROWS = {
    "01_hello_pytorch": [
        (["--task", "{tmp}/missing.txt"], "missing.txt", {}),
        (["--task", "{tmp}/empty.txt"], "empty", {"empty.txt": ""}),
        (["--data", "{tmp}/short.txt"], "validation tokens is too few", {"short.txt": "a few words"}),
        (["--context_size", "0"], "context_size", {}),
        (["--block_size", "1"], "block_size", {}),
        (["--ft_batch_size", "0"], "ft_batch_size", {}),
        (["--ft_lr", "0"], "ft_lr", {}),
        (["--optim_lr_factors", "1,fast"], "optim_lr_factors", {}),
        (["--stage", "everything"], "unknown --stage", {}),
        (["--stage", "finetune"], "pretrain first", {}),
        (["--resume"], "to resume", {}),
        (["--resume", "--stage", "optimizers"], "--stage optimizers has none", {}),
        (["--init_from", "{tmp}/nowhere"], "no checkpoint at", {}),
        (["--init_from", "{tmp}/bad.pt"], "not a readable checkpoint", {"bad.pt": "not a checkpoint"}),
        (["--init_from", "{tmp}/run", "--stage", "pretrain"], "would ignore it", {}),
        (["--data", "{tmp}/rows.jsonl", "--text_field", "body"], "rows.jsonl, line 1: not a JSON object with a 'body' string",
         {"rows.jsonl": '{"text": "this corpus keeps its text under another name"}\n'}),
        (["--data", "{tmp}/notes"], "no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files in the folder", {"notes/readme.md": "# notes"}),
        (["--data", "{tmp}/corpus.txt.gz"], "corpus.txt.gz is not a gzip file", {"corpus.txt.gz": "plain text, not gzip"}),
        (["--tokenizer_sample_mb", "0"], "--tokenizer_sample_mb must be positive", {}),
        (["--task", "{tmp}/binary.txt"], "binary.txt is a binary file", {"binary.txt": "text\x00more"}),
        (["--task", "{tmp}/notes"], "no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files in the folder", {"notes/readme.md": "# notes"}),
    ],
    "02_attention": [
        (["--recall_pairs", "40"], "recall_pairs", {}),
        (["--recall_pairs", "10"], "longer than block_size", {}),
        (["--attn_impl", "magic"], "attn_impl", {}),
        (["--d_model", "30", "--n_head", "4"], "divisible", {}),
        (["--dropout", "1"], "dropout", {}),
        (["--prev_tokens", "-1"], "prev_tokens", {}),
        (["--ft_iters", "0"], "ft_iters", {}),
        (["--ft_batch_size", "0"], "ft_batch_size", {}),
        (["--scale_d_ks", "4,x"], "scale_d_ks", {}),
        (["--timing_lengths", "0"], "timing_lengths", {}),
        (["--stage", "finetune"], "pretrain first", {}),
        (["--resume"], "to resume", {}),
        (["--init_from", "{tmp}/nowhere"], "no checkpoint at", {}),
        (["--init_from", "{tmp}/bad.pt"], "not a readable checkpoint", {"bad.pt": "not a checkpoint"}),
        (["--init_from", "{tmp}/run", "--stage", "experiments"], "would ignore it", {}),
        (["--data", "{tmp}/rows.jsonl", "--text_field", "body"], "rows.jsonl, line 1: not a JSON object with a 'body' string",
         {"rows.jsonl": '{"text": "this corpus keeps its text under another name"}\n'}),
        (["--data", "{tmp}/notes"], "no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files in the folder", {"notes/readme.md": "# notes"}),
        (["--data", "{tmp}/corpus.txt.gz"], "corpus.txt.gz is not a gzip file", {"corpus.txt.gz": "plain text, not gzip"}),
        (["--tokenizer_sample_mb", "0"], "--tokenizer_sample_mb must be positive", {}),
    ],
    "03_transformer": [
        (["--stage", "sample"], "unknown --stage", {}),
        (["--schedule", "sometimes"], "unknown --schedule", {}),
        (["--bleu_unit", "token"], "bleu_unit", {}),
        (["--d_model", "30", "--n_head", "4"], "divisible", {}),
        (["--mask_rate", "1.5"], "mask_rate", {}),
        (["--ft_batch_size", "0"], "ft_batch_size", {}),
        (["--ft_lr", "0"], "ft_lr", {}),
        (["--init_from", "{tmp}/run", "--stage", "pretrain"], "would ignore it", {"run/": ""}),
        (["--init_from", "{tmp}/run"], "pretrain.pt not found", {"run/": ""}),
        (["--init_from", "{tmp}/bad.pt"], "not a readable checkpoint", {"bad.pt": "not a checkpoint"}),
        (["--stage", "finetune"], "pretrain first", {}),
        (["--stage", "finetune"], "not a readable checkpoint", {"out/pretrain.pt": "not a checkpoint"}),
        (["--task", "{tmp}/missing.jsonl"], "missing.jsonl", {}),
        (["--task", "{tmp}/rows.jsonl"], "expected the columns", {"rows.jsonl": '{"question": "q", "answer": "a"}\n'}),
        (["--task", "{tmp}/rows.txt"], "must be .jsonl or .csv", {"rows.txt": "input,target\na,b\n"}),
        (["--data", "{tmp}/rows.jsonl", "--text_field", "body"], "rows.jsonl, line 1: not a JSON object with a 'body' string",
         {"rows.jsonl": '{"text": "this corpus keeps its text under another name"}\n'}),
        (["--data", "{tmp}/notes"], "no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files in the folder", {"notes/readme.md": "# notes"}),
        (["--data", "{tmp}/corpus.txt.gz"], "corpus.txt.gz is not a gzip file", {"corpus.txt.gz": "plain text, not gzip"}),
        (["--tokenizer_sample_mb", "0"], "--tokenizer_sample_mb must be positive", {}),
    ],
    "04_bert": [
        (["--stage", "export"], "unknown stage 'export'", {}),
        (["--n_head", "3"], "--d_model 32 is not a multiple of --n_head 3", {}),
        (["--ft_max_len", "8"], "--ft_max_len must be at least 16", {}),
        (["--mask_prob", "0"], "--mask_prob must be between", {}),
        (["--resume", "--stage", "simcse"], "--resume continues pretraining", {}),
        (["--data", "{tmp}/two"], "has 3 documents (blank-line-separated paragraphs); BERT pretraining needs at least 20",
         {"two/a.txt": "One sentence.\n\nTwo sentences. Here.", "two/b.txt": "Just one paragraph,\non two lines."}),
        (["--task", "{tmp}/qa.jsonl"], "is not a classification task",
         {"qa.jsonl": "".join(f'{{"input": "question {i}", "target": "answer {i}"}}\n' for i in range(60))}),
        (["--stage", "finetune"], "no pretraining run in", {}),
        (["--resume"], "is not a readable checkpoint", {"out/ckpt.pt": "not a checkpoint"}),
        (["--init_from", "{tmp}/hf", "--stage", "pretrain"], "--stage pretrain would ignore it", {"hf/": ""}),
        (["--init_from", "{tmp}/hf"], "no tokenizer there", {"hf/config.json": "{}"}),
        (["--init_from", "{tmp}/hf"], "the tokenizer lacks the special tokens [CLS], [SEP], [MASK]",
         {"hf/vocab.txt": "[PAD]\n[UNK]\nhello\n", "hf/config.json": "{}"}),
        (["--init_from", "{tmp}/hf"], "not found: not a Hugging Face checkpoint folder",
         {"hf/vocab.txt": "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"}),
        (["--data", "{tmp}/rows.jsonl", "--text_field", "body"], "rows.jsonl, line 1: not a JSON object with a 'body' string",
         {"rows.jsonl": '{"text": "this corpus keeps its text under another name"}\n'}),
        (["--data", "{tmp}/notes"], "no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files in the folder", {"notes/readme.md": "# notes"}),
        (["--data", "{tmp}/corpus.txt.gz"], "corpus.txt.gz is not a gzip file", {"corpus.txt.gz": "plain text, not gzip"}),
        (["--tokenizer_sample_mb", "0"], "--tokenizer_sample_mb must be positive", {}),
        (["--max_corpus_mb", "0"], "--max_corpus_mb must be positive", {}),
    ],
    "05_gpt": [
        (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4)", {}),
        (["--arch", "mamba"], "unknown arch 'mamba' (valid: gpt2, llama)", {}),
        (["--n_kv_head", "3"], "--n_kv_head must divide n_head (2), got 3", {}),
        (["--arch", "llama", "--n_embd", "36", "--n_head", "4"], "RoPE rotates pairs of dimensions", {}),
        (["--stage", "ablation", "--init_from", "{tmp}/gpt2"], "--stage ablation pretrains", {"gpt2/": ""}),
        (["--rope_theta", "0"], "--rope_theta must be positive", {}),
        (["--tasks", "summarise"], "unknown task 'summarise'", {}),
        (["--stage", "everything"], "unknown stage", {}),
        (["--dropout", "1.5"], "--dropout", {}),
        (["--top_p", "0"], "top_p", {}),
        (["--freeze_layers", "-2"], "--freeze_layers", {}),
        (["--stage", "finetune"], "run --stage pretrain first", {}),
        (["--stage", "sample"], "run --stage pretrain first", {}),
        (["--resume"], "--resume: there is no", {}),
        (["--resume", "--stage", "finetune"], "--stage finetune does not pretrain", {}),
        (["--init_from", "{tmp}/gpt2", "--stage", "pretrain"], "--stage pretrain", {"gpt2/": ""}),
        (["--init_from", "{tmp}/gpt2"], "config.json", {"gpt2/": ""}),
        (["--init_from", "{tmp}/nowhere"], "no such folder", {}),
        (["--n_layer", "2"], "n_layer 1 (now 2)", {"{out}/run.json": '{"config": {"n_layer": 1}}'}),
        (["--prompt", "word " * 40], "longer than the context", {}),
        (["--task", "{tmp}/missing.jsonl"], "missing.jsonl", {}),
        (["--task", "{tmp}/cls.jsonl", "--max_ft_examples", "2"], "--max_ft_examples 2 is fewer than its 3 labels",
         {"cls.jsonl": "".join(f'{{"text": "row {i}", "label": "{"abc"[i % 3]}"}}\n' for i in range(90))}),
    ],
    "06_t5": [
        (["--stage", "sample"], "unknown --stage", {}),
        (["--variant", "v2"], "variant", {}),
        (["--ft_schedule", "sometimes"], "ft_schedule", {}),
        (["--noise_density", "1.5"], "noise_density", {}),
        (["--num_sentinels", "2", "--input_length", "512"], "num_sentinels", {}),
        (["--ft_batch_size", "0"], "ft_batch_size", {}),
        (["--tasks", "summarize,poems"], "poems", {}),
        (["--tasks", ""], "no finetuning task", {}),
        (["--task", "{tmp}/name.jsonl"], "rename the file", {}),
        (["--task", "{tmp}/rows.jsonl"], "expected the columns", {"rows.jsonl": '{"question": "q", "answer": "a"}\n'}),
        (["--init_from", "{tmp}/hf", "--stage", "pretrain"], "would ignore it", {"hf/": ""}),
        (["--init_from", "{tmp}/hf.json"], "no such folder", {"hf.json": "{}"}),
        (["--init_from", "{tmp}/hf"], "has no llmfs_tokenizer.json", {"hf/config.json": "{}"}),
        (["--init_from", "{tmp}/hf"], "BPE vocabularies only", {"hf/config.json": "{}", "hf/spiece.model": "x"}),
        (["--init_from", "{tmp}/hf"], "Unigram vocabulary", {"hf/tokenizer.json": '{"model": {"type": "Unigram"}}'}),
        (["--init_from", "{tmp}/hf"], "not valid JSON", {"hf/llmfs_tokenizer.json": "{broken"}),
        (["--stage", "finetune"], "pretrain first", {}),
        (["--stage", "finetune"], "not a readable checkpoint", {"out/pretrain.pt": "not a checkpoint"}),
        (["--data", "{tmp}/rows.jsonl", "--text_field", "body"], "rows.jsonl, line 1: not a JSON object with a 'body' string",
         {"rows.jsonl": '{"text": "this corpus keeps its text under another name"}\n'}),
        (["--data", "{tmp}/notes"], "no .txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz files in the folder", {"notes/readme.md": "# notes"}),
        (["--data", "{tmp}/corpus.txt.gz"], "corpus.txt.gz is not a gzip file", {"corpus.txt.gz": "plain text, not gzip"}),
        (["--tokenizer_sample_mb", "0"], "--tokenizer_sample_mb must be positive", {}),
    ],
    "07_peft": [
        (["--methods", "lora0"], "unknown method 'lora0'", {}),
        (["--methods", ","], "--methods is empty", {}),
        (["--lora_targets", "q,query"], "unknown LoRA target 'query'", {}),
        (["--tasks", "docstring-nope"], "unknown task 'docstring-nope'", {}),
        (["--stage", "sample"], "unknown stage 'sample'", {}),
        (["--pooling", "max"], "unknown --pooling 'max'", {}),
        (["--prompt_init", "zeros"], "unknown --prompt_init 'zeros'", {}),
        (["--ft_lr", "0"], "--ft_lr must be positive", {}),
        (["--ft_lr_ia3", "-1"], "--ft_lr_ia3 must be positive", {}),
        (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)", {}),
        (["--num_labels", "1"], "--num_labels must be at least 2", {}),
        (["--threads", "-1"], "--threads must not be negative", {}),
        (["--ft_max_len", "60"], "exceed the base's block_size 48", {}),
        (["--base", "{tmp}/a.pt", "--init_from", "{tmp}/b"], "--base or --init_from, not both", {}),
        (["--base", "{tmp}/missing.pt"], "missing.pt: no such file or folder", {}),
        (["--base", "{tmp}/ckpt.pt"], "is not a readable checkpoint", {"ckpt.pt": "not a checkpoint"}),
        (["--base", "{tmp}/ckpt.pt", "--stage", "pretrain"], "would ignore --base", {"ckpt.pt": "x"}),
        (["--init_from", "{tmp}/hf", "--stage", "pretrain"], "would ignore --init_from", {"hf/": ""}),
        (["--init_from", "{tmp}/hf"], "config.json not found", {"hf/": ""}),
        (["--init_from", "{tmp}/hf"], "vocabulary is not GPT-2's",
         {"hf/config.json": '{"vocab_size": 60, "n_positions": 48, "n_layer": 1, "n_head": 2, "n_embd": 32}'}),
        (["--stage", "finetune"], "run --stage pretrain first", {}),
        (["--resume"], "is not a readable checkpoint", {"out/ckpt.pt": "not a checkpoint"}),
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


def test_the_gpu_check_runs_only_flags_that_exist_and_reads_its_figures(tmp_path):
    """The GPU check runs where no test can (a GPU machine, minutes at a time): its commands must at
    least parse, and its figures come from the progress lines' format."""
    import sys
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import bench
    from common.config import parse_config
    for name, command, _ in bench.gpu_check_runs(tmp_path):
        script = next(part for part in command if part.endswith("train.py"))
        argv = command[command.index(script) + 1:]
        train = load_module(script)
        cfg = parse_config(train.Config, train.PRESETS, argv)
        assert cfg.device == "cuda", name
        assert cfg.data == "pydocs", (name, cfg.data)   # built in: the GPU machine may be offline
    line = "iter 20/200 | loss 3.2100 | lr 1.00e-03 | 412.3k tok/s | MFU 41.2% | mem 12.31GiB | ETA 1m20s"
    assert bench.last_progress_figures(line) == {"tok/s": "412.3k", "MFU": "41.2%", "peak mem": "12.31GiB"}

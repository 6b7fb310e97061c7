"""05_gpt/train.py end to end: the tiny recipe runs every stage, resumes exactly after Ctrl-C, runs
under 2-process DDP, masks prompt tokens, and rejects bad input with one line."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT, load_module

TRAIN = REPO_ROOT / "05_gpt" / "train.py"


@pytest.fixture(scope="module")
def train():
    return load_module("05_gpt/train.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One corpus cache for the module (the pydocs walk runs once)."""
    path = tmp_path_factory.mktemp("llmfs-cache")
    old = os.environ.get("LLMFS_CACHE")
    os.environ["LLMFS_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["LLMFS_CACHE"]
    else:
        os.environ["LLMFS_CACHE"] = old


def run_cli(args, cache, timeout=300, **kwargs):
    env = {**os.environ, "LLMFS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def tiny_run(train, cache, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpt-tiny")
    report = train.main(["--preset", "tiny", "--out_dir", str(out_dir), "--device", "cpu"])
    return out_dir, report


def test_tiny_run_does_every_stage_and_writes_the_report(tiny_run, train):
    out_dir, report = tiny_run
    saved = json.loads((out_dir / "report.json").read_text())
    pretrain = saved["pretrain"]
    assert pretrain["val_loss"] < math.log(300)                 # below the uniform guess over the vocabulary
    assert pretrain["tokens_per_second"] > 0 and pretrain["seconds"] > 0
    assert saved["device"] == "cpu"
    for task, metric in (("python-qa", "response_loss"), ("docstring-module", "accuracy")):
        row = saved["finetune"][task]
        assert row["metric"] == metric
        assert isinstance(row["pretrained"], float) and isinstance(row["scratch"], float)
        assert row["seconds"] > 0
        assert set(row["deployment"]) >= {"float32", "int8 (ours)"}
    assert 0 <= saved["finetune"]["docstring-module"]["baseline"] <= 1
    assert len(saved["finetune"]["python-qa"]["examples"]) == 3
    assert len(saved["samples"]) == 1
    # the checkpoint loads, without unpickling code, into a model of the saved config
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    model = train.GPT(train.GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert ckpt["iter"] == 20
    # the training loss went down
    history = pretrain["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_same_seed_same_result(tiny_run, train, tmp_path):
    out_dir, report = tiny_run
    again = train.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--device", "cpu", "--stage", "pretrain"])
    assert again["pretrain"]["val_loss"] == report["pretrain"]["val_loss"]


def test_sample_stage_and_too_long_prompt(tiny_run, train, capsys):
    out_dir, _ = tiny_run
    report = train.main(["--preset", "tiny", "--out_dir", str(out_dir), "--stage", "sample", "--prompt", "def ",
                         "--num_samples", "2"])
    assert len(report["samples"]) == 2 and all(s.startswith("def ") for s in report["samples"])
    with pytest.raises(SystemExit) as exit_info:
        train.run_main(train.main, ["--preset", "tiny", "--out_dir", str(out_dir), "--stage", "sample",
                                    "--prompt", "word " * 100])
    assert exit_info.value.code == 2
    assert "longer than the context" in capsys.readouterr().err


def test_loss_masking_ignores_prompt_tokens(train, tiny_run):
    out_dir, _ = tiny_run
    tokenizer = train.BPETokenizer.load(out_dir / "tokenizer.json")
    example = {"instruction": "What does `json.dumps` do?", "input": "", "response": "Serialize obj to JSON."}
    ids, labels = train.instruction_example(tokenizer, example, block_size=256)
    prompt_len = len(tokenizer.encode(train.format_prompt(example)))
    response = tokenizer.encode(example["response"]) + [tokenizer.special_tokens[train.EOT]]
    assert len(ids) == len(labels)
    assert labels[:prompt_len - 1] == [-100] * (prompt_len - 1)
    assert labels[prompt_len - 1:] == response                   # the response and EOT, shifted by one
    # the loss with masked labels equals the mean over response positions only, whatever the prompt says
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(block_size=256, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.tensor([ids]), torch.tensor([labels])
    logits, loss = model(x, y)
    keep = y[0] != -100
    manual = torch.nn.functional.cross_entropy(logits[0][keep], y[0][keep])
    torch.testing.assert_close(loss, manual)


def test_classifier_reads_the_last_real_token_and_ignores_padding(train):
    torch.manual_seed(0)
    gpt = train.GPT(train.GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    classifier = train.GPTClassifier(gpt, num_labels=3).eval()
    alone = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    logits_alone, _ = classifier(alone, torch.ones_like(alone))
    logits_padded, _ = classifier(padded, mask)
    torch.testing.assert_close(logits_padded[0], logits_alone[0])
    _, loss = classifier(padded, mask, labels=torch.tensor([0, 2]), lm_weight=0.5)
    _, loss_ce = classifier(padded, mask, labels=torch.tensor([0, 2]), lm_weight=0.0)
    assert loss > loss_ce                                          # L = L_CE + lambda L_LM adds the LM term


def test_int8_quantization_is_close_and_four_times_smaller(train):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    quantized = train.Int8Linear(linear)
    x = torch.randn(8, 64)
    error = (quantized(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert error < 0.02
    assert quantized.weight_int8.dtype == torch.int8 and quantized.scale.shape == (32,)
    assert quantized.weight_int8.abs().max() == 127                 # each row uses the full int8 range
    float_bytes = linear.weight.numel() * 4
    int8_bytes = quantized.weight_int8.numel() + quantized.scale.numel() * 4
    assert int8_bytes < float_bytes / 3.5


def test_macro_f1_on_a_hand_checked_case(train):
    accuracy, macro_f1 = train.accuracy_and_macro_f1([0, 0, 0, 1], [0, 0, 1, 1], num_classes=2)
    assert accuracy == 0.75
    # class 0: P = 2/3, R = 1 -> F1 0.8; class 1: P = 1, R = 1/2 -> F1 2/3
    assert macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)


@pytest.mark.parametrize("args, message", [
    (["--n_layr", "2"], "unknown flag --n_layr"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["--tasks", "summarise"], "unknown task 'summarise'"),
])
def test_bad_input_is_one_line_and_nonzero_exit(train, capsys, tmp_path, args, message, cache):
    with pytest.raises(SystemExit) as exit_info:
        train.run_main(train.main, ["--preset", "tiny", "--out_dir", str(tmp_path), *args])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_checkpoint_of_another_config_is_rejected(tiny_run, train, capsys, tmp_path):
    out_dir, _ = tiny_run
    (tmp_path / "ckpt.pt").write_bytes((out_dir / "ckpt.pt").read_bytes())
    for name in ("tokenizer.json", "tokenizer.data"):
        (tmp_path / name).write_bytes((out_dir / name).read_bytes())
    with pytest.raises(SystemExit):
        train.run_main(train.main, ["--preset", "tiny", "--out_dir", str(tmp_path), "--stage", "pretrain",
                                    "--resume", "--n_embd", "64"])
    assert "was saved for another model config" in capsys.readouterr().err
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        train.run_main(train.main, ["--preset", "tiny", "--out_dir", str(tmp_path), "--stage", "finetune"])
    assert "is not a readable checkpoint" in capsys.readouterr().err


def test_ctrl_c_saves_and_resume_continues_exactly(cache, tmp_path):
    args = ["--preset", "tiny", "--stage", "pretrain", "--device", "cpu", "--max_iters", "60",
            "--log_interval", "1", "--eval_interval", "30"]
    full = run_cli([*args, "--out_dir", str(tmp_path / "full")], cache)
    assert full.returncode == 0, full.stderr[-2000:]

    env = {**os.environ, "LLMFS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(TRAIN), *args, "--out_dir", str(tmp_path / "cut")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    for line in process.stdout:
        if line.startswith("iter") and int(line.split()[1].split("/")[0]) >= 5:
            process.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline
    output, errors = process.communicate(timeout=240)
    assert process.returncode == 130, errors[-2000:]
    assert "interrupted: checkpoint saved" in output
    stopped_at = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["iter"]
    assert 5 <= stopped_at < 60

    resumed = run_cli([*args, "--out_dir", str(tmp_path / "cut"), "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from" in resumed.stdout
    full_report = json.loads((tmp_path / "full" / "report.json").read_text())["pretrain"]
    resumed_report = json.loads((tmp_path / "cut" / "report.json").read_text())["pretrain"]
    # The same losses at every evaluation and the same final weights. Equal up to float rounding, not
    # bit for bit: a new process may get differently aligned buffers, and the CPU kernels then sum in
    # another order (~1e-7). A resume that lost the optimizer state or the data order is off by ~1e-2.
    assert [h["iter"] for h in resumed_report["history"]] == [h["iter"] for h in full_report["history"]]
    for resumed_eval, full_eval in zip(resumed_report["history"], full_report["history"]):
        assert resumed_eval["val_loss"] == pytest.approx(full_eval["val_loss"], rel=1e-5, abs=1e-6)
        assert resumed_eval["train_loss"] == pytest.approx(full_eval["train_loss"], rel=1e-5, abs=1e-6)
    full_state = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    resumed_state = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["model"]
    for name in full_state:
        torch.testing.assert_close(resumed_state[name], full_state[name], rtol=1e-4, atol=1e-5)


def test_two_process_ddp_on_cpu(cache, tmp_path):
    env = {**os.environ, "LLMFS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
               "--preset", "tiny", "--stage", "pretrain", "--device", "cpu", "--out_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["pretrain"]["val_loss"] < math.log(300)


def test_init_from_a_hugging_face_folder_finetunes_it(train, cache, tmp_path):
    """--init_from loads GPT-2-format weights and vocabulary (here a tiny hand-made pair) and finetunes."""
    from test_common_tokenizer import write_gpt2_format
    from test_gpt_model import write_gpt2_folder
    folder = tmp_path / "gpt2-tiny"
    folder.mkdir()
    vocab = write_gpt2_format(folder)                       # 256 bytes + 4 merges + <|endoftext|>
    torch.manual_seed(0)
    source = train.GPT(train.GPTConfig(block_size=64, vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16))
    write_gpt2_folder(source, folder)
    report = train.main(["--preset", "tiny", "--init_from", str(folder), "--stage", "finetune", "--device", "cpu",
                         "--out_dir", str(tmp_path / "out"), "--scratch", "false"])
    assert "pretrain" not in report
    for task in ("python-qa", "docstring-module"):
        assert report["finetune"][task]["pretrained"] is not None
    with pytest.raises(SystemExit):
        train.run_main(train.main, ["--preset", "tiny", "--init_from", str(tmp_path / "missing"),
                                    "--out_dir", str(tmp_path / "out")])

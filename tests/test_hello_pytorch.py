"""Chapter 01: the neural language model, its gradients, and the train.py recipe end to end."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (REPO_ROOT, assert_every_document_tokenized, interrupt_after_iteration, load_module,
                      write_mixed_corpus)

from common.checkpoint import load_checkpoint
from common.config import run_main
from common.tokenizer import BPETokenizer

model_lib = load_module("01_hello_pytorch/model.py")
NeuralLM, numerical_gradient = model_lib.NeuralLM, model_lib.numerical_gradient
TRAIN = REPO_ROOT / "01_hello_pytorch" / "train.py"
train = load_module("01_hello_pytorch/train.py")


def test_numerical_gradient_of_a_known_function():
    x = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    grad = numerical_gradient(lambda: (x ** 3).sum(), x, eps=1e-6)
    assert torch.allclose(grad, 3 * x ** 2, atol=1e-6)
    assert x.tolist() == [1.0, 2.0, -3.0]                      # restored after the perturbations


def test_autograd_matches_finite_differences_for_every_parameter():
    torch.manual_seed(0)
    model = NeuralLM(vocab_size=13, context_size=3, d_embed=4, d_hidden=6, direct=True).double()
    ids = torch.randint(0, 13, (2, 7))
    _, loss = model(ids, ids)
    loss.backward()
    for name, parameter in model.named_parameters():
        numeric = numerical_gradient(lambda: model(ids, ids)[1], parameter, eps=1e-6)
        assert torch.allclose(parameter.grad, numeric, atol=1e-7), name


def test_torch_gradcheck_on_the_model():
    torch.manual_seed(0)
    model = NeuralLM(vocab_size=7, context_size=2, d_embed=3, d_hidden=4).double()
    ids = torch.randint(0, 7, (1, 5))
    embeddings = model.embed.weight.detach().clone().requires_grad_(True)
    hidden = model.hidden.weight.detach().clone().requires_grad_(True)

    def loss_of(embed_weight, hidden_weight):                  # the loss as a function of two parameters
        parameters = {"embed.weight": embed_weight, "hidden.weight": hidden_weight}
        return torch.func.functional_call(model, parameters, (ids, ids))[1]

    assert torch.autograd.gradcheck(loss_of, (embeddings, hidden), eps=1e-6, atol=1e-6)


def test_windows_hold_the_k_previous_tokens_with_start_padding():
    model = NeuralLM(vocab_size=10, context_size=3)
    windows = model.windows(torch.tensor([[5, 6, 7, 8]]))
    S = model.start_id
    assert windows.tolist() == [[[S, S, 5], [S, 5, 6], [5, 6, 7], [6, 7, 8]]]


def test_prediction_depends_only_on_the_last_k_tokens():
    torch.manual_seed(0)
    model = NeuralLM(vocab_size=20, context_size=3, d_embed=4, d_hidden=8)
    ids = torch.randint(0, 20, (1, 10))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 20                     # position 2 is in the windows ending at 2, 3, 4
    logits, changed_logits = model(ids)[0], model(changed)[0]
    assert torch.equal(logits[0, :2], changed_logits[0, :2])  # the past cannot see the future
    assert not torch.allclose(logits[0, 2:5], changed_logits[0, 2:5])
    assert torch.equal(logits[0, 5:], changed_logits[0, 5:])  # beyond k tokens the model has forgotten


def test_untrained_loss_is_near_uniform_and_shapes():
    torch.manual_seed(0)
    model = NeuralLM(vocab_size=100, context_size=4, d_embed=8, d_hidden=16)
    ids = torch.randint(0, 100, (4, 12))
    logits, loss = model(ids, ids)
    assert logits.shape == (4, 12, 100)
    assert abs(loss.item() - math.log(100)) < 0.1
    assert model(ids)[1] is None


def test_token_id_outside_the_vocabulary_is_a_clear_error():
    model = NeuralLM(vocab_size=10, context_size=2, d_embed=4, d_hidden=8)
    for bad in (10, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            model(torch.tensor([[1, bad, 2]]))


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = NeuralLM(vocab_size=30, context_size=2, d_embed=8, d_hidden=32)
    x = torch.randint(0, 30, (2, 16))
    y = torch.roll(x, -1, dims=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


def test_generate_appends_tokens_and_is_seeded():
    torch.manual_seed(0)
    model = NeuralLM(vocab_size=25, context_size=3)
    prompt = torch.tensor([[1, 2]])
    a = model.generate(prompt, 6, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 6, generator=torch.Generator().manual_seed(5))
    assert a.shape == (1, 8) and torch.equal(a, b) and torch.equal(a[:, :2], prompt)
    assert int(a.max()) < 25                                   # never samples the start id


# ------------------------------------------------------------------------------------- train.py end to end
def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, str(TRAIN), "--preset", "tiny", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hello")
    result = run_train("--out_dir", str(out_dir), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    return out_dir, result.stdout


def test_tiny_run_writes_a_complete_report(tiny_run):
    out_dir, stdout = tiny_run
    report = json.loads((out_dir / "report.json").read_text())
    assert report["chapter"] == "01_hello_pytorch"
    assert report["gradcheck_max_error"] < 1e-6
    assert math.isfinite(report["pretrain"]["val_loss"]) and report["pretrain"]["tokens_per_second"] > 0
    topics = report["finetune"]["pydoc topics"]
    for key in ("before", "pretrained", "scratch", "baseline"):
        assert math.isfinite(topics[key])
    assert topics["pretrained"] < topics["scratch"]            # even 30 pretraining steps help
    assert set(report["optimizers"]) >= {"SGD", "SGD+momentum", "RMSprop", "Adam", "AdamW"}
    assert len(report["samples"]) == 2 and all(isinstance(s, str) for s in report["samples"])
    assert "iter" in stdout and "tok/s" in stdout and "ETA" in stdout   # progress lines
    assert "SGD+momentum" in stdout and any(block in stdout for block in "▁▂▃▄▅▆▇█")  # table + sparklines


def test_unigram_baseline_is_the_cross_entropy_of_train_frequencies():
    class Split:                                   # stands in for a TokenCache: train and val token ids
        def __init__(self, train, val):
            self.splits = {"train": np.array(train), "val": np.array(val)}

        def memmap(self, split):
            return self.splits[split]

    # train counts 0:3, 1:1, 2:0 -> add-one (4, 2, 1)/7; val is [0, 1]
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert train.unigram_loss(Split([0, 0, 0, 1], [0, 1]), vocab_size=3) == pytest.approx(expected)


def test_tiny_run_loss_goes_down(tiny_run):
    out_dir, stdout = tiny_run
    report = json.loads((out_dir / "report.json").read_text())
    assert report["pretrain"]["val_loss"] < math.log(300) - 0.5   # well below the uniform model's ln(V)
    for row in (v for v in report["optimizers"].values() if isinstance(v, dict)):
        assert sum(row["curve"][-3:]) / 3 < row["curve"][0]


def copy_of(tiny_run, tmp_path):
    """A copy of the tiny run's folder, for a test that writes into it."""
    return Path(shutil.copytree(tiny_run[0], tmp_path / "run"))


def test_checkpoint_and_tokenizer_load_and_resume_continues(tiny_run, tmp_path):
    out_dir = copy_of(tiny_run, tmp_path)
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter"] == 30
    model = NeuralLM(vocab_size=300, context_size=ckpt["config"]["context_size"],
                     d_embed=ckpt["config"]["d_embed"], d_hidden=ckpt["config"]["d_hidden"])
    model.load_state_dict(ckpt["model"])
    assert BPETokenizer.load(out_dir / "tokenizer.json").fingerprint == ckpt["tokenizer"]["fingerprint"]
    # resume: train 10 more iterations from the saved state
    result = run_train("--out_dir", str(out_dir), "--device", "cpu", "--resume", "--max_iters", "40",
                       "--stage", "pretrain")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming the pretraining at iteration 30" in result.stdout
    assert "iter 40/40" in result.stdout and "iter  1/40" not in result.stdout
    assert load_checkpoint(out_dir / "ckpt.pt")["iter"] == 40


def test_resume_after_ctrl_c_equals_the_uninterrupted_run(tmp_path):
    # Long enough that Ctrl-C lands mid-run; the same flags for all three runs, so the same lr schedule.
    flags = ["--max_iters", "1500", "--eval_interval", "400"]
    stopped_at = interrupt_after_iteration(TRAIN, tmp_path / "stopped", extra_args=flags)
    resumed = run_train("--out_dir", str(tmp_path / "stopped"), "--device", "cpu", "--stage", "pretrain", "--resume",
                        *flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming the pretraining at iteration {stopped_at}" in resumed.stdout
    whole = run_train("--out_dir", str(tmp_path / "whole"), "--device", "cpu", "--stage", "pretrain", *flags)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed_ckpt, whole_ckpt = (load_checkpoint(tmp_path / run / "ckpt.pt") for run in ("stopped", "whole"))
    assert resumed_ckpt["iter"] == whole_ckpt["iter"] == 1500
    for name, weight in whole_ckpt["model"].items():
        assert torch.equal(resumed_ckpt["model"][name], weight), name
    assert resumed_ckpt["best_val_loss"] == whole_ckpt["best_val_loss"]
    assert resumed_ckpt["report"]["val_loss"] == whole_ckpt["report"]["val_loss"]


def test_a_text_file_of_your_own_pretrains_and_the_default_task_finetunes(tmp_path):
    words = "the model reads a window of tokens and predicts the next one from what it has seen".split()
    rng = np.random.default_rng(0)
    corpus = tmp_path / "my.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(400)))
    out_dir = tmp_path / "out"
    result = run_train("--data", str(corpus), "--out_dir", str(out_dir), "--device", "cpu", "--stage", "all")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out_dir / "report.json").read_text())
    assert report["pretrain"]["corpus"] == str(corpus) and math.isfinite(report["pretrain"]["val_loss"])
    topics = report["finetune"]["pydoc topics"]
    assert all(math.isfinite(topics[key]) for key in ("before", "pretrained", "scratch", "baseline"))
    assert json.loads((out_dir / "run.json").read_text())["config"]["data"] == str(corpus)
    trained_on_my_text = BPETokenizer.train(corpus.read_text(), 300, special_tokens=("<|endoftext|>",))
    assert BPETokenizer.load(out_dir / "tokenizer.json").fingerprint == trained_on_my_text.fingerprint




def test_a_folder_of_compressed_text_and_json_lines_pretrains(tmp_path):
    """--data a folder with a .txt.gz and a .jsonl.gz (its text under --text_field body): the BPE is trained on
    every document, and the token stream holds each one, an end-of-text token between two."""
    corpus = tmp_path / "corpus"
    documents = write_mixed_corpus(corpus)
    out_dir = tmp_path / "out"
    result = run_train("--data", str(corpus), "--text_field", "body", "--out_dir", str(out_dir), "--device", "cpu",
                       "--stage", "pretrain")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_every_document_tokenized(result.stdout, corpus, documents, out_dir / "tokenizer.json", 300, (train.EOT,))
    report = json.loads((out_dir / "report.json").read_text())
    assert report["pretrain"]["corpus"] == str(corpus) and report["pretrain"]["val_loss"] < math.log(300)


def test_init_from_finetunes_a_checkpoint_as_its_own_run_did(tiny_run, tmp_path):
    tiny_dir, _ = tiny_run
    result = run_train("--init_from", str(tiny_dir), "--out_dir", str(tmp_path / "elsewhere"), "--device", "cpu",
                       "--stage", "finetune")
    assert result.returncode == 0, result.stderr[-2000:]
    own = json.loads((tiny_dir / "report.json").read_text())
    report = json.loads((tmp_path / "elsewhere" / "report.json").read_text())
    assert report["pretrain"]["init_from"] == str(tiny_dir / "ckpt.pt")
    assert report["pretrain"]["val_loss"] == own["pretrain"]["val_loss"]
    for key in ("before", "pretrained", "scratch", "baseline"):      # same weights, same seeds: same numbers
        assert report["finetune"]["pydoc topics"][key] == pytest.approx(own["finetune"]["pydoc topics"][key], abs=1e-6)
    assert not (tmp_path / "elsewhere" / "ckpt.pt").exists()          # finetuning writes no checkpoint


def test_a_stage_replaces_only_its_part_of_the_report(tiny_run, tmp_path):
    out_dir = copy_of(tiny_run, tmp_path)
    before = json.loads((out_dir / "report.json").read_text())
    result = run_train("--out_dir", str(out_dir), "--device", "cpu", "--stage", "optimizers", "--optim_iters", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    after = json.loads((out_dir / "report.json").read_text())
    assert after["optimizers"]["iters"] == 4 and before["optimizers"]["iters"] == 8
    for section in ("pretrain", "finetune", "samples"):
        assert after[section] == before[section], section
    assert "pydoc topics" in result.stdout                            # the printed report is the merged one


def test_a_corrupt_or_foreign_tokenizer_file_is_one_clear_line(tiny_run, tmp_path, capsys):
    out_dir = copy_of(tiny_run, tmp_path)
    argv = ["--preset", "tiny", "--device", "cpu", "--out_dir", str(out_dir), "--stage", "finetune"]
    for content, message in ((b"{not json", "not a tokenizer file"), (None, "is not the tokenizer")):
        if content is None:                                            # a valid tokenizer, but not the run's
            BPETokenizer.train("some other text " * 50, 270).save(out_dir / "tokenizer.json")
        else:
            (out_dir / "tokenizer.json").write_bytes(content)
        with pytest.raises(SystemExit) as exit_info:
            run_main(train.main, argv)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = run_train("--out_dir", str(tmp_path), "--resume", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ckpt.pt" in result.stderr

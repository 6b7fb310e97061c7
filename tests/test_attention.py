"""Chapter 02: four implementations of attention agree, masks hide what they should, the scale matters,
and the train.py recipe runs end to end."""

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO_ROOT, assert_every_document_tokenized, interrupt_after_iteration, load_module,
                      write_mixed_corpus)

from common.checkpoint import load_checkpoint
from common.config import run_main
from common.runtime import setup
from common.tokenizer import BPETokenizer

attention = load_module("02_attention/model.py")
train = load_module("02_attention/train.py")
TRAIN = REPO_ROOT / "02_attention" / "train.py"
ATOL = 1e-6                                                    # float32 precision for these sizes


def random_qkv(B=2, h=3, T=7, d_k=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, T, d_k, generator=generator) for _ in range(3))


def right_padding(B, T, lengths):
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    return mask


@pytest.mark.parametrize("masked", ["none", "causal", "padding", "both"])
def test_loop_matrix_and_sdpa_agree(masked):
    q, k, v = random_qkv()
    padding = attention.padding_mask(right_padding(2, 7, [7, 4]))
    mask = padding if masked in ("padding", "both") else None
    is_causal = masked in ("causal", "both")
    by_loop, w_loop = attention.attention_loop(q, k, v, mask, is_causal)
    by_matrix, w_matrix = attention.attention_matrix(q, k, v, mask, is_causal)
    by_sdpa, _ = attention.attention_sdpa(q, k, v, mask, is_causal)
    assert torch.allclose(by_loop, by_matrix, atol=ATOL)
    assert torch.allclose(by_matrix, by_sdpa, atol=ATOL)
    assert torch.allclose(w_loop, w_matrix, atol=ATOL)
    assert torch.allclose(w_matrix.sum(-1), torch.ones(2, 3, 7), atol=ATOL)   # rows are distributions


def test_matrix_form_is_the_formula():
    q, k, v = random_qkv(d_k=16)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v    # sqrt(16) = 4
    assert torch.allclose(attention.attention_matrix(q, k, v)[0], expected, atol=ATOL)


def copy_into_reference(mha, reference):
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([mha.W_q.weight, mha.W_k.weight, mha.W_v.weight]))
        reference.in_proj_bias.copy_(torch.cat([mha.W_q.bias, mha.W_k.bias, mha.W_v.bias]))
        reference.out_proj.weight.copy_(mha.W_o.weight)
        reference.out_proj.bias.copy_(mha.W_o.bias)


@pytest.mark.parametrize("impl", ["loop", "matrix", "sdpa"])
@pytest.mark.parametrize("masked", ["none", "causal+padding"])
def test_multi_head_matches_torch_multihead_attention(impl, masked):
    torch.manual_seed(0)
    B, T, d_model, n_head = 3, 6, 24, 4
    mha = attention.MultiHeadAttention(d_model, n_head, impl=impl)
    reference = torch.nn.MultiheadAttention(d_model, n_head, batch_first=True)
    copy_into_reference(mha, reference)
    x = torch.randn(B, T, d_model)
    if masked == "none":
        ours, weights = mha(x, x, x)
        theirs, their_weights = reference(x, x, x, average_attn_weights=False)
    else:
        pad = right_padding(B, T, [6, 3, 5])
        ours, weights = mha(x, x, x, attention.padding_mask(pad), is_causal=True)
        theirs, their_weights = reference(x, x, x, attn_mask=~attention.causal_mask(T), key_padding_mask=pad == 0,
                                          average_attn_weights=False)
    assert torch.allclose(ours, theirs, atol=ATOL)
    if weights is not None:
        assert torch.allclose(weights, their_weights, atol=ATOL)


def test_cross_attention_with_different_lengths_matches_reference():
    torch.manual_seed(1)
    mha = attention.MultiHeadAttention(16, 2, impl="loop")
    reference = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    copy_into_reference(mha, reference)
    query, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    assert torch.allclose(mha(query, memory, memory)[0], reference(query, memory, memory)[0], atol=ATOL)


def test_causal_mask_hides_the_future():
    torch.manual_seed(0)
    model = attention.AttentionLM(vocab_size=50, block_size=16, d_model=32, n_head=4, n_layer=2)
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 50
    logits, changed_logits = model(ids)[0], model(changed)[0]
    assert torch.equal(logits[0, :6], changed_logits[0, :6])
    assert not torch.allclose(logits[0, 6:], changed_logits[0, 6:])


def test_padding_mask_makes_pad_tokens_invisible():
    torch.manual_seed(0)
    model = attention.AttentionLM(vocab_size=50, block_size=16, d_model=32, n_head=4, n_layer=2)
    ids = torch.randint(0, 50, (2, 8))
    ids[1, :5] = ids[0, :5]
    ids[1, 5:] = 7                                             # whatever sits at the pad positions
    attention_mask = right_padding(2, 8, [8, 5])
    padded = model(ids, attention_mask=attention_mask)[0]
    alone = model(ids[1:, :5])[0]
    assert torch.allclose(padded[1, :5], alone[0], atol=1e-5)    # as if the pads were not there
    unmasked = model(ids)[0]
    assert not torch.allclose(unmasked[1, 5:], padded[1, 5:], atol=1e-3)   # the mask did change something


def test_previous_token_window_reaches_exactly_w_tokens_back():
    torch.manual_seed(0)
    model = attention.AttentionLM(vocab_size=30, block_size=12, d_model=16, n_head=2, n_layer=0, prev_tokens=2)
    ids = torch.randint(0, 30, (1, 10))
    changed = ids.clone()
    changed[0, 4] = (ids[0, 4] + 1) % 30
    differs = (model(ids)[0] - model(changed)[0]).abs().amax(-1)[0] > 0
    # with no attention layers, position t sees x_t, x_{t-1}, x_{t-2} only
    assert differs.tolist() == [False] * 4 + [True] * 3 + [False] * 3
    assert model.shifted(torch.tensor([[5, 6, 7]]), 1).tolist() == [[30, 5, 6]]
    assert model.shifted(torch.tensor([[5, 6, 7]]), 5).tolist() == [[30, 30, 30]]


def test_language_model_is_the_same_with_every_impl():
    torch.manual_seed(0)
    model = attention.AttentionLM(vocab_size=40, block_size=12, d_model=16, n_head=2, n_layer=2)
    ids = torch.randint(0, 40, (2, 12))
    outputs = {}
    for impl in ("loop", "matrix", "sdpa"):
        model.set_impl(impl)
        outputs[impl] = model(ids)[0]
    assert torch.allclose(outputs["loop"], outputs["matrix"], atol=1e-5)
    assert torch.allclose(outputs["matrix"], outputs["sdpa"], atol=1e-5)
    logits, loss, maps = model(ids, ids, return_attention=True)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 12, 12)
    assert torch.equal(maps[0].triu(1), torch.zeros_like(maps[0]))   # no weight on the future


def test_gradients_of_the_implementations_agree_and_pass_gradcheck():
    q, k, v = (t.double().requires_grad_(True) for t in random_qkv(B=1, h=2, T=4, d_k=3))
    assert torch.autograd.gradcheck(lambda *t: attention.attention_loop(*t, is_causal=True)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: attention.attention_matrix(*t, is_causal=True)[0], (q, k, v))
    grads = []
    for impl in (attention.attention_loop, attention.attention_matrix, attention.attention_sdpa):
        out = impl(q, k, v, is_causal=True)[0]
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-10)


def test_longer_than_block_size_is_an_error():
    model = attention.AttentionLM(vocab_size=10, block_size=4, d_model=8, n_head=2, n_layer=1)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


# ------------------------------------------------------------------------------- the scale experiment
def test_unscaled_softmax_saturates_and_its_gradient_vanishes():
    small, large = train.scale_experiment([4, 1024], seed=0)
    assert small["score_std_raw"] == pytest.approx(2.0, rel=0.2)              # std sqrt(d_k)
    assert large["score_std_raw"] == pytest.approx(32.0, rel=0.2)
    for row in (small, large):
        assert row["score_std_scaled"] == pytest.approx(1.0, rel=0.2)         # std 1 at every size
    assert large["max_weight_raw"] > 0.8 and large["max_weight_scaled"] < 0.3
    assert large["grad_raw"] < 0.2 * large["grad_scaled"]                   # the saturated softmax passes ~nothing
    assert large["grad_raw"] < small["grad_raw"] / 4                          # and it gets worse as d_k grows
    assert large["grad_scaled"] == pytest.approx(small["grad_scaled"], rel=0.5)


def recall_tokenizer():
    return BPETokenizer.train(" a=1 b=2 c=3 d=4 e=5 f=6 ? 7 8 9 0 " * 20, 300)


def test_recall_examples_are_fresh_and_well_formed():
    tokenizer = recall_tokenizer()
    task = train.KeyValueRecall(tokenizer, n_pairs=4)
    rng = random.Random(0)
    prompts = set()
    for _ in range(20):
        prompt, answer = task.example(rng)
        pairs = prompt.split(" ? ")[0].split()
        keys = [p.split("=")[0] for p in pairs]
        asked = prompt.split(" ? ")[1].rstrip("=")
        assert len(set(keys)) == 4 and asked in keys
        assert dict(p.split("=") for p in pairs)[asked] == answer
        prompts.add(prompt)
    assert len(prompts) == 20
    input_ids, labels = task.batch(rng, 5, "cpu")
    assert (labels[:, :-1] == -100).all() and set(labels[:, -1].tolist()) <= set(task.value_ids)


class Answers(torch.nn.Module):
    """A stand-in model whose last-position logits pick one token: the true answer (read from the prompt
    the way a perfect lookup would: the token two places after the earlier occurrence of the asked key),
    or always one fixed token."""

    def __init__(self, vocab_size, fixed=None):
        super().__init__()
        self.vocab_size, self.fixed = vocab_size, fixed

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row, ids in enumerate(input_ids.tolist()):
            if self.fixed is None:
                asked = ids[-2]                                        # " b" in "... ? b="
                answer = ids[ids.index(asked) + 2]                     # " b", "=", "7"
            else:
                answer = self.fixed
            logits[row, -1, answer] = 1.0
        return logits, None


def test_recall_accuracy_is_one_for_a_perfect_lookup_and_the_answer_rate_for_a_fixed_guess():
    tokenizer = recall_tokenizer()
    task = train.KeyValueRecall(tokenizer, n_pairs=4)
    rt = setup("cpu")
    assert train.recall_accuracy(Answers(tokenizer.vocab_size), task, 300, seed=5, rt=rt, batch_size=64) == 1.0
    seven = tokenizer.encode("7")[0]
    rng = random.Random(5)                                             # the examples recall_accuracy draws
    sevens = sum(task.example(rng)[1] == "7" for _ in range(300))
    accuracy = train.recall_accuracy(Answers(tokenizer.vocab_size, fixed=seven), task, 300, seed=5, rt=rt, batch_size=64)
    assert accuracy == sevens / 300 and 0.03 < accuracy < 0.2          # about 1 in 10: the value is a random digit


# ------------------------------------------------------------------------------------- train.py end to end
def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, str(TRAIN), "--preset", "tiny", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("attention")
    result = run_train("--out_dir", str(out_dir), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    return out_dir, result.stdout


def test_tiny_run_report(tiny_run):
    out_dir, stdout = tiny_run
    report = json.loads((out_dir / "report.json").read_text())
    assert report["chapter"] == "02_attention"
    assert report["max_implementation_difference"] < 1e-5
    assert [r["d_k"] for r in report["scale"]] == [4, 64]
    assert {r["T"] for r in report["timing"]} == {32, 64}
    assert all(r["matrix MiB"] > r["sdpa, is_causal MiB"] for r in report["timing"])   # the T^2 matrix
    assert report["pretrain"]["val_loss"] < math.log(300)                              # below uniform
    recall = report["finetune"]["key-value recall"]
    assert recall["metric"] == "accuracy" and recall["baseline"] == 0.1 and recall["iters"] == 20
    assert len(recall["curve_pretrained"]) == len(recall["curve_scratch"]) == 10    # ten checks per run
    for key in ("pretrained", "scratch", "pretrained_before"):
        assert (recall[key] * 100) % 1 == 0                          # a count out of the 100 held-out examples
    assert report["attention_map"]["answer"] in "0123456789"
    assert "░" in stdout or "█" in stdout or "▓" in stdout          # the heatmap was printed
    assert "iter" in stdout and "ETA" in stdout and len(report["samples"]) == 2


def copy_of(tiny_run, tmp_path):
    """A copy of the tiny run's folder, for a test that writes into it."""
    return Path(shutil.copytree(tiny_run[0], tmp_path / "run"))


def test_checkpoint_and_tokenizer_load_and_resume_continues(tiny_run, tmp_path):
    out_dir = copy_of(tiny_run, tmp_path)
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter"] == 30
    config = ckpt["config"]
    model = attention.AttentionLM(300, config["block_size"], config["d_model"], config["n_head"], config["n_layer"])
    model.load_state_dict(ckpt["model"])
    assert BPETokenizer.load(out_dir / "tokenizer.json").fingerprint == ckpt["tokenizer"]["fingerprint"]
    result = run_train("--out_dir", str(out_dir), "--device", "cpu", "--resume", "--max_iters", "40",
                       "--stage", "pretrain")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming the pretraining at iteration 30" in result.stdout and "iter 40/40" in result.stdout
    assert load_checkpoint(out_dir / "ckpt.pt")["iter"] == 40


def test_resume_after_ctrl_c_equals_the_uninterrupted_run(tmp_path):
    # Dropout on, so that torch's random state matters too; the same flags for all three runs.
    flags = ["--max_iters", "500", "--eval_interval", "200", "--dropout", "0.1"]
    stopped_at = interrupt_after_iteration(TRAIN, tmp_path / "stopped", extra_args=flags)
    resumed = run_train("--out_dir", str(tmp_path / "stopped"), "--device", "cpu", "--stage", "pretrain", "--resume",
                        *flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming the pretraining at iteration {stopped_at}" in resumed.stdout
    whole = run_train("--out_dir", str(tmp_path / "whole"), "--device", "cpu", "--stage", "pretrain", *flags)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed_ckpt, whole_ckpt = (load_checkpoint(tmp_path / run / "ckpt.pt") for run in ("stopped", "whole"))
    assert resumed_ckpt["iter"] == whole_ckpt["iter"] == 500
    for name, weight in whole_ckpt["model"].items():
        assert torch.equal(resumed_ckpt["model"][name], weight), name
    assert resumed_ckpt["best_val_loss"] == whole_ckpt["best_val_loss"]
    assert resumed_ckpt["report"]["val_loss"] == whole_ckpt["report"]["val_loss"]




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
    result = run_train("--init_from", str(tiny_dir / "ckpt.pt"), "--out_dir", str(tmp_path / "elsewhere"),
                       "--device", "cpu", "--stage", "finetune")
    assert result.returncode == 0, result.stderr[-2000:]
    own = json.loads((tiny_dir / "report.json").read_text())["finetune"]["key-value recall"]
    report = json.loads((tmp_path / "elsewhere" / "report.json").read_text())
    assert report["pretrain"]["init_from"] == str(tiny_dir / "ckpt.pt")
    recall = report["finetune"]["key-value recall"]
    for key in ("pretrained", "scratch", "pretrained_before", "curve_pretrained", "curve_scratch"):
        assert recall[key] == own[key], key                          # same weights, same seeds: same numbers


def test_a_stage_replaces_only_its_part_of_the_report(tiny_run, tmp_path):
    out_dir = copy_of(tiny_run, tmp_path)
    before = json.loads((out_dir / "report.json").read_text())
    result = run_train("--out_dir", str(out_dir), "--device", "cpu", "--stage", "experiments", "--scale_d_ks", "4,16")
    assert result.returncode == 0, result.stderr[-2000:]
    after = json.loads((out_dir / "report.json").read_text())
    assert [r["d_k"] for r in after["scale"]] == [4, 16]
    for section in ("pretrain", "finetune", "attention_map", "samples"):
        assert after[section] == before[section], section
    assert "key-value recall" in result.stdout                       # the printed report is the merged one


def test_a_corrupt_or_foreign_tokenizer_file_is_one_clear_line(tiny_run, tmp_path, capsys):
    out_dir = copy_of(tiny_run, tmp_path)
    argv = ["--preset", "tiny", "--device", "cpu", "--out_dir", str(out_dir), "--resume"]
    for content, message in ((b"{not json", "not a tokenizer file"), (None, "is not the tokenizer")):
        if content is None:                                            # a valid tokenizer, but not the run's
            recall_tokenizer().save(out_dir / "tokenizer.json")
        else:
            (out_dir / "tokenizer.json").write_bytes(content)
        with pytest.raises(SystemExit) as exit_info:
            run_main(train.main, argv)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = run_train("--out_dir", str(tmp_path), "--stage", "finetune", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ckpt.pt" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_token_id_outside_the_vocabulary_is_a_clear_error():
    model = attention.AttentionLM(10, block_size=8, d_model=16, n_head=2, n_layer=1)
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary"):
        model(torch.tensor([[1, 12]]))

"""07_peft: every method starts at the base model, trains only its own parameters, counts them by its
formula, saves and loads adapter-only weights; LoRA merges exactly; prefix tuning handles padding; and
train.py runs end to end (report, checkpoint, --resume, bad input)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, load_module

peft = load_module("07_peft/model.py")
TRAIN = REPO_ROOT / "07_peft" / "train.py"

TINY = dict(block_size=40, vocab_size=60, n_layer=2, n_head=2, n_embd=32)
L, C = TINY["n_layer"], TINY["n_embd"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up would cost more than the arithmetic on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_base(seed=0):
    """A tiny GPT with weights large enough that its outputs are far from uniform."""
    torch.manual_seed(seed)
    model = peft.GPT(peft.GPTConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def fresh_copy(model):
    other = peft.GPT(peft.GPTConfig(**TINY))
    other.load_state_dict(model.state_dict())
    return other.eval()


def ids(B, T, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, scale=0.2, seed=3):
    """Move the trainable parameters away from their (identity) start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


# the methods with a zero-initialised (or all-ones) path, and how to apply each
IDENTITY_METHODS = {
    "lora q,v": lambda g: peft.add_lora(g, r=4, targets="q,v"),
    "lora all": lambda g: peft.add_lora(g, r=4, targets="all", dropout=0.1),
    "dora all": lambda g: peft.add_lora(g, r=4, targets="all", dora=True),
    "adapter": lambda g: peft.add_adapters(g, bottleneck=8),
    "ia3": lambda g: peft.add_ia3(g),
}
ALL_METHODS = {
    **IDENTITY_METHODS,
    "prefix mlp": lambda g: peft.PrefixTuning(g, num_tokens=4, hidden=16),
    "prefix direct": lambda g: peft.PrefixTuning(g, num_tokens=4, hidden=0),
    "prompt": lambda g: peft.PromptTuning(g, num_tokens=4),
}


# ---------------------------------------------------------------------------- the starting point
@pytest.mark.parametrize("method", IDENTITY_METHODS)
def test_method_starts_exactly_at_the_base_model(method):
    base = make_base()
    x = ids(3, 12)
    expected, _ = base(x)
    model = IDENTITY_METHODS[method](fresh_copy(base)).eval()
    got, _ = model(x)
    assert torch.equal(got, expected)            # bit for bit: B = 0, W_up = 0, l = 1, m = ||W0||


def test_prefix_from_token_activations_equals_the_base_model_reading_those_tokens():
    """A prefix initialised with the keys/values of real tokens w is the base model run on w + x."""
    base = make_base()
    w, x = ids(1, 5, seed=7), ids(2, 9)
    model = peft.PrefixTuning(fresh_copy(base), num_tokens=5, hidden=0, init_ids=w[0].tolist()).eval()
    got, _ = model(x)
    expected, _ = base(torch.cat([w.expand(2, 5), x], dim=1))
    torch.testing.assert_close(got, expected[:, 5:], atol=1e-5, rtol=1e-5)


def test_prompt_from_token_embeddings_equals_the_base_model_reading_those_tokens():
    base = make_base()
    w, x = ids(1, 6, seed=8), ids(2, 9)
    model = peft.PromptTuning(fresh_copy(base), num_tokens=6, init_ids=w[0].tolist()).eval()
    got, _ = model(x)
    expected, _ = base(torch.cat([w.expand(2, 6), x], dim=1))
    torch.testing.assert_close(got, expected[:, 6:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- gradients reach the right tensors
@pytest.mark.parametrize("method", ALL_METHODS)
def test_only_the_method_parameters_get_gradients_and_change(method):
    base = make_base()
    model = ALL_METHODS[method](fresh_copy(base)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and frozen_before
    # the trainable names are the method's own, never a base weight
    assert not any(n.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "ln_1.weight"))
                   and ".base." not in n and "adapter" not in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 10)
    for step in range(2):          # two steps: with B = 0 (or W_up = 0), A's first gradient is zero
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, trainable_before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"


def test_full_and_head_only_finetuning_train_what_they_say():
    model = peft.apply_method(make_base(), "full")
    assert all(p.requires_grad for p in model.parameters())
    classifier = peft.SequenceClassifier(peft.apply_method(make_base(), "head"), num_labels=3)
    assert {n for n, p in classifier.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


# -------------------------------------------------------------------------------- parameter counts
def test_parameter_counts_equal_their_formulas():
    base_total = peft.trainable_parameters(make_base())["total"]
    r, m, P, H, n = 4, 8, 4, 16, 5
    expected = {
        # one (A, B) pair per part: r d_in + d_out_part r
        "lora q,v": lambda g: (peft.add_lora(g, r=r, targets="q,v"), L * 2 * r * (C + C)),
        # q, k, v, attn.c_proj: 4 parts of C rows; c_fc: C -> 4C; mlp.c_proj: 4C -> C
        "lora all": lambda g: (peft.add_lora(g, r=r, targets="all"), L * r * (4 * 2 * C + 5 * C + 5 * C)),
        # DoRA adds a magnitude per output row: 4 C + 4 C + C per layer
        "dora all": lambda g: (peft.add_lora(g, r=r, targets="all", dora=True),
                               L * (r * (4 * 2 * C + 5 * C + 5 * C) + 9 * C)),
        # two adapters per layer, each C m + m + m C + C
        "adapter": lambda g: (peft.add_adapters(g, bottleneck=m), L * 2 * (2 * C * m + m + C)),
        # l_k, l_v (C each) and l_ff (4 C) per layer
        "ia3": lambda g: (peft.add_ia3(g), L * 6 * C),
        # P' (P C) + W_1 (C H + H) + W_2 (H 2LC + 2LC)
        "prefix mlp": lambda g: (peft.PrefixTuning(g, num_tokens=P, hidden=H),
                                 P * C + C * H + H + H * 2 * L * C + 2 * L * C),
        "prefix folded": lambda g: (peft.PrefixTuning(g, num_tokens=P, hidden=H).fold(), P * 2 * L * C),
        "prompt": lambda g: (peft.PromptTuning(g, num_tokens=n), n * C),
    }
    for name, make in expected.items():
        model, formula = make(make_base())
        counts = peft.trainable_parameters(model)
        assert counts["trainable"] == formula, name
        assert counts["total"] == base_total + formula, name   # the base is all still there, frozen


# -------------------------------------------------------------------------------------- LoRA merge
@pytest.mark.parametrize("dora", [False, True])
def test_lora_merged_equals_unmerged_and_unmerge_restores_the_base(dora):
    base = make_base()
    model = randomize(peft.add_lora(fresh_copy(base), r=4, targets="all", dropout=0.1, dora=dora)).eval()
    x = ids(2, 11)
    unmerged, _ = model(x)
    assert not torch.allclose(unmerged, base(x)[0], atol=1e-3)       # the adapter does something
    peft.merge_lora(model)
    merged, _ = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    peft.unmerge_lora(model)
    for name, tensor in base.state_dict().items():
        key = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias") \
            if any(s in name for s in ("c_attn", "c_proj", "c_fc")) else name
        torch.testing.assert_close(model.state_dict()[key], tensor, atol=1e-6, rtol=0)
    again, _ = model(x)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)


def test_merged_adapter_cannot_be_switched_before_unmerging():
    model = peft.add_lora(make_base(), r=2, targets="q")
    peft.merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"):
        peft.set_adapter(model, None)


# ----------------------------------------------------------------------------- several adapters
def test_several_lora_adapters_on_one_base_switch_by_name():
    base = make_base()
    model = peft.add_lora(fresh_copy(base), r=4, targets="q,v", name="qa")
    randomize(model, seed=1)
    peft.add_lora(model, r=2, targets="mlp", name="cls")
    randomize(model, seed=2)
    only_cls = [n for n, p in model.named_parameters() if p.requires_grad]
    assert only_cls and all(".adapters.cls." in n for n in only_cls)         # the new one is active
    x = ids(2, 8)
    out = {}
    for name in ("qa", "cls", None):
        peft.set_adapter(model, name)
        out[name] = model(x)[0]
    torch.testing.assert_close(out[None], base(x)[0], atol=0, rtol=0)       # no adapter: the base itself
    alone = peft.load_lora(fresh_copy(base), peft.lora_state_dict(model, "qa")).eval()
    torch.testing.assert_close(out["qa"], alone(x)[0], atol=1e-6, rtol=0)
    assert not torch.allclose(out["qa"], out["cls"])
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        peft.set_adapter(model, "summaries")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        peft.add_lora(model, targets="c_query", name="x")


# ---------------------------------------------------------------------------- adapter save / load
@pytest.mark.parametrize("method", ALL_METHODS)
def test_adapter_only_weights_round_trip_into_a_fresh_base(method, tmp_path):
    base = make_base()
    model = randomize(ALL_METHODS[method](fresh_copy(base))).eval()
    if isinstance(model, peft.PrefixTuning):
        before, _ = model(ids(2, 7))
        model.fold()                                 # what is saved: P alone, not the MLP
        torch.testing.assert_close(model(ids(2, 7))[0], before, atol=1e-6, rtol=0)
    path = tmp_path / "adapter.pt"
    torch.save(peft.trainable_state_dict(model), path)
    state = torch.load(path, weights_only=True)
    adapter_numbers = sum(t.numel() for t in state.values())
    assert adapter_numbers == peft.trainable_parameters(model)["trainable"] < sum(p.numel() for p in base.parameters())
    fresh = ALL_METHODS[method](fresh_copy(base))
    if isinstance(fresh, peft.PrefixTuning):
        fresh.fold()
    peft.load_trainable_state_dict(fresh.eval(), state)
    x = ids(2, 9)
    torch.testing.assert_close(fresh(x)[0], model(x)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        peft.load_trainable_state_dict(peft.add_ia3(fresh_copy(base)) if "ia3" not in method
                                       else peft.add_adapters(fresh_copy(base)), state)


# ------------------------------------------------------------------------- prefix tuning and padding
def test_prefix_tuning_with_padding_in_the_batch():
    model = randomize(peft.PrefixTuning(make_base(), num_tokens=4, hidden=16)).eval()
    short, long = ids(1, 6, seed=4), ids(1, 10, seed=5)
    alone = {6: model(short)[0], 10: model(long)[0]}
    pad = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.tensor([[1] * 6 + [0] * 4, [1] * 10])
    # right padding, with and without a mask: the real tokens never see the padding after them
    for attention_mask in (mask, None):
        logits, _ = model(torch.cat([torch.cat([short, pad], 1), long]), attention_mask=attention_mask)
        torch.testing.assert_close(logits[0, :6], alone[6][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], alone[10][0], atol=1e-5, rtol=1e-5)
    # left padding (generation): positions count the prefix and the real tokens only
    left = torch.tensor([[0] * 4 + [1] * 6, [1] * 10])
    logits, _ = model(torch.cat([torch.cat([pad, short], 1), long]), attention_mask=left)
    torch.testing.assert_close(logits[0, 4:], alone[6][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], alone[10][0], atol=1e-5, rtol=1e-5)
    # a classifier (mean or last-token pooling) gives each row of a padded batch what it gets alone
    for pooling in ("mean", "last"):
        classifier = peft.SequenceClassifier(model, num_labels=3, pooling=pooling).eval()
        batch_logits, _ = classifier(torch.cat([torch.cat([short, pad], 1), long]), mask)
        single, _ = classifier(short, torch.ones(1, 6, dtype=torch.long))
        torch.testing.assert_close(batch_logits[0], single[0], atol=1e-5, rtol=1e-5)
        pooled_wrong, _ = classifier(torch.cat([torch.cat([short, pad], 1), long]), torch.ones(2, 10, dtype=torch.long))
        assert not torch.allclose(pooled_wrong[0], single[0], atol=1e-3)     # the mask matters


def test_prompt_tuning_with_padding_in_the_batch():
    model = randomize(peft.PromptTuning(make_base(), num_tokens=3)).eval()
    short, long = ids(1, 5, seed=4), ids(1, 8, seed=5)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    logits, _ = model(batch, attention_mask=torch.tensor([[0] * 3 + [1] * 5, [1] * 8]))
    torch.testing.assert_close(logits[0, 3:], model(short)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(long)[0][0], atol=1e-5, rtol=1e-5)


def test_virtual_tokens_count_against_the_context():
    model = peft.PrefixTuning(make_base(), num_tokens=8, hidden=0)
    with pytest.raises(ValueError, match="block_size"):
        model(ids(1, TINY["block_size"] - 7))
    with pytest.raises(ValueError, match="block_size"):
        peft.PromptTuning(make_base(), num_tokens=8)(ids(1, TINY["block_size"] - 7))


# ------------------------------------------------------------------------------------ train.py end to end
@pytest.fixture(scope="module")
def train():
    return load_module("07_peft/train.py")


@pytest.fixture(scope="module")
def tiny_run(train, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("peft-tiny")
    report = train.main(["--preset", "tiny", "--out_dir", str(out_dir), "--device", "cpu"])
    return out_dir, report


def test_tiny_run_writes_the_table_for_every_method_and_task(tiny_run, train):
    out_dir, report = tiny_run
    saved = json.loads((out_dir / "report.json").read_text())
    rows = {(r["task"], r["method"]): r for r in saved["table"]}
    methods = ["full finetuning", "LoRA r=4", "LoRA r=8", "LoRA r=16", "DoRA r=8", "prefix tuning",
               "prompt tuning", "adapters (Houlsby)", "(IA)^3"]
    for task in ("python-qa", "docstring-module"):
        for method in methods:
            row = rows[(task, method)]
            assert row["trainable"] > 0 and row["ms/step"] > 0 and row["peak MB"] > 0 and row["file KB"] > 0
            assert math.isfinite(row["test"])
    assert rows[("python-qa", "frozen base (no training)")]["trainable"] == 0
    assert rows[("docstring-module", "frozen base + head")]["trainable"] > 0
    base_params = saved["base"]["parameters"]
    # full finetuning trains the whole base; LoRA's count grows linearly with r; PEFT is a small fraction
    assert rows[("python-qa", "full finetuning")]["trainable"] == base_params
    assert rows[("python-qa", "LoRA r=16")]["trainable"] == 4 * rows[("python-qa", "LoRA r=4")]["trainable"]
    for method in methods[1:]:
        assert rows[("python-qa", method)]["% of base"] < 100
        assert rows[("python-qa", method)]["file KB"] < rows[("python-qa", "full finetuning")]["file KB"]
        assert rows[("python-qa", method)]["peak MB"] > base_params * 4 / 1e6            # the frozen weights are there
    # full finetuning holds weights, gradients and two AdamW moments for every parameter (+ activations)
    assert rows[("python-qa", "full finetuning")]["peak MB"] > 4 * base_params * 4 / 1e6
    # the pretraining loss went down, and finetuning lowered the response loss below the frozen base's
    history = saved["pretrain"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] < math.log(300) + 0.5
    assert rows[("python-qa", "full finetuning")]["test"] < rows[("python-qa", "frozen base (no training)")]["test"]
    assert 0 <= saved["finetune"]["docstring-module"]["baseline"] <= 1
    examples = saved["finetune"]["python-qa"]["examples"]
    assert examples["merge_max_abs_difference"] < 1e-4 and len(examples["answers"]) == 3


def test_saved_base_and_adapter_reproduce_the_reported_metric(tiny_run, train):
    """base.pt loads without unpickling code; an adapter file on a fresh copy of it gives the test
    metric the run reported."""
    out_dir, report = tiny_run
    ckpt = torch.load(out_dir / "base.pt", weights_only=True)
    assert ckpt["iter"] == 16
    cfg = train.parse_config(train.Config, train.PRESETS, ["--preset", "tiny", "--out_dir", str(out_dir)])
    rt = train.setup(device="cpu")
    tokenizer = train.BPETokenizer.load(out_dir / "tokenizer.json")
    tasks = train.load_tasks(cfg, tokenizer)
    pad_id = tokenizer.special_tokens[train.EOT]
    for task, key in (("python-qa", "lora8"), ("python-qa", "prefix"), ("docstring-module", "ia3")):
        adapter = torch.load(out_dir / "adapters" / f"{task}_{key}.pt", weights_only=True)
        gpt = train.GPT(train.GPTConfig(**ckpt["model_config"]))
        gpt.load_state_dict(ckpt["model"])
        backbone = peft.apply_method(gpt, adapter["method"], **adapter["options"])
        spec = tasks[task]
        if spec["kind"] == "classification":
            backbone = peft.SequenceClassifier(backbone, len(spec["labels"]), cfg.pooling)
        model = backbone
        peft.load_trainable_state_dict(model, adapter["state_dict"])
        metrics = train.evaluate(spec["kind"], model, spec["items"]["test"], cfg, rt, pad_id, len(spec["labels"] or []))
        reported = report["finetune"][task]["methods"][key]["test"]
        for name, value in reported.items():
            assert metrics[name] == pytest.approx(value, abs=1e-5), (task, key, name)


def test_resume_continues_pretraining_exactly_and_reuses_finished_methods(tiny_run, train, tmp_path, monkeypatch):
    out_dir, report = tiny_run
    reference = report["pretrain"]["history"][-1]["val_loss"]

    class StopAfter(train.StopFlag):
        """Ctrl-C after the 5th step: read by the loop once per step."""
        reads = 0

        @property
        def requested(self):
            StopAfter.reads += 1
            return StopAfter.reads == 5

        @requested.setter
        def requested(self, value):
            pass

    args = ["--preset", "tiny", "--out_dir", str(tmp_path), "--device", "cpu", "--methods", "lora4,ia3",
            "--tasks", "python-qa"]
    monkeypatch.setattr(train, "StopFlag", StopAfter)
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 130 and torch.load(tmp_path / "base.pt", weights_only=True)["iter"] == 5
    monkeypatch.undo()
    resumed = train.main(args + ["--resume"])
    assert resumed["pretrain"]["history"][-1]["val_loss"] == reference      # as if never stopped
    # a finished method is not trained again on --resume: drop one, and only that one is redone
    results = json.loads((tmp_path / "results.json").read_text())
    lora_row = results["results"]["python-qa"]["methods"].pop("lora4")
    results["results"]["python-qa"]["methods"]["ia3"]["test"]["response_loss"] = 123.0   # marks the reused row
    (tmp_path / "results.json").write_text(json.dumps(results))
    again = train.main(args + ["--resume"])
    rows = again["finetune"]["python-qa"]["methods"]
    assert rows["ia3"]["test"]["response_loss"] == 123.0
    assert rows["lora4"]["test"] == lora_row["test"]                          # same seed, same result


def test_bad_input_is_one_line_and_a_nonzero_exit(train, tmp_path, capsys):
    corrupt = tmp_path / "ckpt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for args, message in ((["--methods", "lora0"], "unknown method 'lora0'"),
                          (["--lora_targets", "q,query"], "unknown LoRA target 'query'"),
                          (["--base", str(corrupt)], "not a readable checkpoint")):
        with pytest.raises(SystemExit) as exit_info:
            train.run_main(train.main, ["--preset", "tiny", "--out_dir", str(tmp_path), *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_base_flag_starts_from_a_saved_checkpoint(tiny_run, train, tmp_path):
    """--base takes a chapter-05 style checkpoint (here the tiny run's base.pt, with its tokenizer.json
    beside it): no pretraining, and the same base + seed give the same row as in the full run."""
    out_dir, report = tiny_run
    again = train.main(["--preset", "tiny", "--base", str(out_dir / "base.pt"), "--out_dir", str(tmp_path),
                        "--device", "cpu", "--methods", "ia3", "--tasks", "docstring-module"])
    assert again["base"]["source"] == str(out_dir / "base.pt")
    assert not (tmp_path / "base.pt").exists()
    assert again["finetune"]["docstring-module"]["methods"]["ia3"]["test"] == \
        report["finetune"]["docstring-module"]["methods"]["ia3"]["test"]

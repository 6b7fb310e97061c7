"""04_bert: the model matches Hugging Face BERT, honours padding and ties its weights; the pretraining
data follows the original recipe (80/10/10 masking, a prediction cap, 50% random next segments); the
whole train.py runs end to end on a tiny preset."""

import json
import math
import re
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, load_module, reference

bert = load_module("04_bert/model.py")


def tiny_config(**overrides):
    fields = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return bert.BertConfig(**{**fields, **overrides})


def perturbed_model(config, seed=0):
    """A model whose LayerNorms and biases are not at their init values, so that mistakes in them show."""
    torch.manual_seed(seed)
    model = bert.BertForPretraining(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------------------- model

def test_padding_does_not_change_real_positions():
    """Appending [PAD]s (attention_mask 0) leaves the MLM logits at real positions and NSP unchanged."""
    for use_sdpa in (True, False):
        model = perturbed_model(tiny_config(use_sdpa=use_sdpa))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 61, (2, 9), generator=g)
        segments = torch.tensor([[0] * 5 + [1] * 4] * 2)
        padded = torch.cat([ids, torch.full((2, 6), 3)], dim=1)   # id 3 stands for [PAD]
        padded_segments = torch.cat([segments, torch.zeros(2, 6, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 6)], dim=1).long()
        with torch.no_grad():
            mlm, nsp = model(ids, segments)
            mlm_p, nsp_p = model(padded, padded_segments, mask)
        torch.testing.assert_close(mlm_p[:, :9], mlm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nsp_p, nsp, atol=1e-5, rtol=1e-5)
        # and the mask matters: without it the padding does change the outputs
        with torch.no_grad():
            mlm_unmasked, _ = model(padded, padded_segments)
        assert (mlm_unmasked[:, :9] - mlm).abs().max() > 1e-3


def test_sdpa_path_equals_explicit_path():
    model = perturbed_model(tiny_config())
    ids = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        fast = model(ids, attention_mask=mask)
        for layer in model.bert.encoder.layer:
            layer.attention.self.use_sdpa = False
        slow = model(ids, attention_mask=mask)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decoder_is_tied_to_word_embeddings_and_bias_is_separate():
    model = bert.BertForPretraining(tiny_config())
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert decoder.bias is None and model.cls.predictions.bias.shape == (61,)
    names = [n for n, _ in model.named_parameters()]    # a shared parameter is listed once
    assert "cls.predictions.decoder.weight" not in names and "cls.predictions.bias" in names
    # one matrix, so the MLM loss's gradient reaches the embedding through both uses
    mlm, _ = model(torch.tensor([[1, 2, 3]]))
    mlm[0, 0, 5].backward()
    assert model.bert.embeddings.word_embeddings.weight.grad[5].abs().sum() > 0


def test_masked_positions_select_the_same_logits():
    model = perturbed_model(tiny_config())
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[1, 4, 0], [9, 2, 0]])
    with torch.no_grad():
        full, nsp = model(ids)
        picked, nsp_picked = model(ids, masked_positions=positions)
    torch.testing.assert_close(picked, torch.stack([full[b, positions[b]] for b in range(2)]))
    torch.testing.assert_close(nsp_picked, nsp)


def test_sequence_longer_than_positions_is_refused():
    model = bert.BertForPretraining(tiny_config())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_frozen_classifier_trains_only_its_head():
    config = tiny_config(hidden_dropout_prob=0.5)
    clf = bert.BertClassifier(config, num_labels=3, freeze_encoder=True).train()
    assert not clf.bert.training and clf.dropout.training          # encoder stays deterministic
    ids = torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(4))
    F.cross_entropy(clf(ids), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is None for p in clf.bert.parameters())
    assert clf.classifier.weight.grad.abs().sum() > 0
    full = bert.BertClassifier(config, num_labels=3).train()
    F.cross_entropy(full(ids), torch.tensor([0, 1, 2, 0])).backward()
    assert full.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_pretraining_loss_ignores_unused_prediction_slots():
    mlm = torch.randn(2, 3, 7)
    nsp = torch.randn(2, 2)
    labels = torch.tensor([[1, 2, -100], [4, -100, -100]])
    total, l_mlm, l_nsp = bert.pretraining_loss(mlm, nsp, labels, torch.tensor([0, 1]))
    expected = -(F.log_softmax(mlm, -1)[0, 0, 1] + F.log_softmax(mlm, -1)[0, 1, 2]
                 + F.log_softmax(mlm, -1)[1, 0, 4]) / 3
    torch.testing.assert_close(l_mlm, expected)
    torch.testing.assert_close(total, l_mlm + F.cross_entropy(nsp, torch.tensor([0, 1])))


# ----------------------------------------------------------------------------------------- checkpoints

def write_safetensors_by_hand(tensors, file):
    """The format, written independently of model.py: u64 header size, JSON header, raw bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def reference_forward(w, cfg, ids, segments):
    """BERT written out with plain tensor ops from the raw checkpoint dict (HF names, old gamma/beta)."""
    def ln(x, prefix):
        return F.layer_norm(x, (x.size(-1),), w[prefix + ".gamma"], w[prefix + ".beta"], eps=1e-12)

    def lin(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    T, C, nh = ids.size(1), cfg["hidden_size"], cfg["num_attention_heads"]
    h = ln(w["bert.embeddings.word_embeddings.weight"][ids] + w["bert.embeddings.position_embeddings.weight"][:T]
           + w["bert.embeddings.token_type_embeddings.weight"][segments], "bert.embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(h, p + "attention.self." + n).view(1, T, nh, -1).transpose(1, 2) for n in ("query", "key", "value"))
        heads = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // nh), -1) @ v
        a = ln(h + lin(heads.transpose(1, 2).reshape(1, T, C), p + "attention.output.dense"), p + "attention.output.LayerNorm")
        u = lin(a, p + "intermediate.dense")
        u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))                  # exact GELU
        h = ln(a + lin(u, p + "output.dense"), p + "output.LayerNorm")
    t = lin(h, "cls.predictions.transform.dense")
    t = ln(0.5 * t * (1 + torch.erf(t / math.sqrt(2))), "cls.predictions.transform.LayerNorm")
    mlm = t @ w["bert.embeddings.word_embeddings.weight"].T + w["cls.predictions.bias"]
    pooled = torch.tanh(lin(h[:, 0], "bert.pooler.dense"))
    return mlm, lin(pooled, "cls.seq_relationship")


def test_from_pretrained_reads_a_hand_made_folder(tmp_path):
    """A folder written by hand (old TF-style gamma/beta names, a position_ids buffer, an unused key in
    config.json) loads, and the model computes what BERT's equations give from those raw tensors."""
    cfg = {"vocab_size": 23, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 12, "max_position_embeddings": 16, "type_vocab_size": 2,
           "hidden_act": "gelu", "layer_norm_eps": 1e-12, "model_type": "bert", "some_new_field": 1}
    g = torch.Generator().manual_seed(5)
    shapes = {"bert.embeddings.word_embeddings.weight": (23, 8), "bert.embeddings.position_embeddings.weight": (16, 8),
              "bert.embeddings.token_type_embeddings.weight": (2, 8), "bert.pooler.dense.weight": (8, 8),
              "bert.pooler.dense.bias": (8,), "cls.predictions.bias": (23,), "cls.seq_relationship.weight": (2, 8),
              "cls.seq_relationship.bias": (2,), "cls.predictions.transform.dense.weight": (8, 8),
              "cls.predictions.transform.dense.bias": (8,)}
    p = "bert.encoder.layer.0."
    for name in ("query", "key", "value"):
        shapes[p + f"attention.self.{name}.weight"], shapes[p + f"attention.self.{name}.bias"] = (8, 8), (8,)
    shapes.update({p + "attention.output.dense.weight": (8, 8), p + "attention.output.dense.bias": (8,),
                   p + "intermediate.dense.weight": (12, 8), p + "intermediate.dense.bias": (12,),
                   p + "output.dense.weight": (8, 12), p + "output.dense.bias": (8,)})
    for ln in ("bert.embeddings.LayerNorm", p + "attention.output.LayerNorm", p + "output.LayerNorm",
               "cls.predictions.transform.LayerNorm"):
        shapes[ln + ".gamma"], shapes[ln + ".beta"] = (8,), (8,)
    weights = {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}
    weights["bert.embeddings.position_ids"] = torch.arange(16).float()[None]   # a buffer some files carry
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_safetensors_by_hand(weights, tmp_path / "model.safetensors")

    model = bert.BertForPretraining.from_pretrained(tmp_path).eval()
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 8
    torch.testing.assert_close(model.bert.encoder.layer[0].attention.self.key.weight,
                               weights[p + "attention.self.key.weight"])
    torch.testing.assert_close(model.bert.embeddings.LayerNorm.bias, weights["bert.embeddings.LayerNorm.beta"])
    ids, segments = torch.tensor([[1, 7, 3, 22, 5, 2]]), torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        mlm, nsp = model(ids, segments)
    ref_mlm, ref_nsp = reference_forward(weights, cfg, ids, segments)
    torch.testing.assert_close(mlm, ref_mlm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsp, ref_nsp, atol=1e-5, rtol=1e-5)

    # the same weights as pytorch_model.bin load to the same model; save_pretrained round-trips
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps(cfg))
    torch.save(weights, bin_dir / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(bert.BertForPretraining.from_pretrained(bin_dir).eval()(ids, segments)[0], mlm)
    model.save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(bert.BertForPretraining.from_pretrained(tmp_path / "resaved").eval()(ids, segments)[0], mlm)

    # a checkpoint that lacks a weight, or a folder without weights, is refused with a clear message
    del weights["cls.seq_relationship.bias"]
    write_safetensors_by_hand(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*seq_relationship"):
        bert.BertForPretraining.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        bert.BertForPretraining.from_pretrained(tmp_path)


def test_matches_transformers_bert_for_pretraining(tmp_path):
    """Our forward equals transformers.BertForPreTraining's (mlm, nsp) logits to float32 precision, with
    padding and two segments; and transformers loads what save_pretrained writes."""
    transformers = reference("transformers")
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, max_position_embeddings=64)
    reference = transformers.BertForPreTraining(hf_config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "hf")
    ours = bert.BertForPretraining.from_pretrained(tmp_path / "hf").eval()

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 99, (3, 20), generator=g)
    segments = torch.randint(0, 2, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:], mask[2, 5:] = 0, 0
    with torch.no_grad():
        expected = reference(input_ids=ids, token_type_ids=segments, attention_mask=mask)
        mlm, nsp = ours(ids, segments, mask)
    diff = max((mlm - expected.prediction_logits).abs().max().item(),
               (nsp - expected.seq_relationship_logits).abs().max().item())
    print(f"max abs diff vs transformers: {diff:.2e}")
    assert diff < 1e-5

    ours.save_pretrained(tmp_path / "ours")
    reloaded = transformers.BertForPreTraining.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).prediction_logits,
                                   ours(ids, attention_mask=mask)[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- pretraining data

train = load_module("04_bert/train.py")
CLS, SEP, MASK, PAD = 1001, 1002, 1003, 1000
SPECIALS = {"[PAD]": PAD, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK}


def test_masking_follows_80_10_10_with_a_cap_and_never_touches_special_tokens():
    import random
    rng = random.Random(0)
    counts = {"mask": 0, "same": 0, "random": 0}
    for draw in range(3000):
        tokens = [CLS] + [rng.randrange(1000) for _ in range(100)] + [SEP] + [rng.randrange(1000) for _ in range(50)] + [SEP]
        masked, positions, labels = train.mask_tokens(tokens, rng, 0.15, 20, MASK, {CLS, SEP, PAD, MASK}, 1000)
        assert len(positions) == 20                     # round(153 * 0.15) = 23, capped at 20
        assert positions == sorted(set(positions))
        assert all(tokens[p] not in (CLS, SEP) for p in positions)
        assert [masked[i] for i in (0, 101, 152)] == [CLS, SEP, SEP]
        assert labels == [tokens[p] for p in positions]
        assert all(masked[i] == tokens[i] for i in range(len(tokens)) if i not in positions)
        for p in positions:
            kind = "mask" if masked[p] == MASK else "same" if masked[p] == tokens[p] else "random"
            counts[kind] += 1
            assert masked[p] < 1000 or masked[p] == MASK   # a random replacement is an ordinary token
    total = sum(counts.values())
    # 60000 draws: the standard error of each fraction is below 0.002; a random token equals the
    # original 1 time in 1000, which moves 0.01% from "random" to "same"
    assert abs(counts["mask"] / total - 0.8) < 0.01
    assert abs(counts["same"] / total - 0.1) < 0.01
    assert abs(counts["random"] / total - 0.1) < 0.01
    # below the cap the count is max(1, round(len * 0.15))
    short = [CLS, 5, 6, 7, SEP]
    assert len(train.mask_tokens(short, rng, 0.15, 20, MASK, {CLS, SEP, PAD, MASK}, 1000)[1]) == 1
    middle = [CLS] + list(range(38)) + [SEP]
    assert len(train.mask_tokens(middle, rng, 0.15, 20, MASK, {CLS, SEP, PAD, MASK}, 1000)[1]) == 6


def toy_documents(num_docs=30, seed=0):
    """Documents whose token ids say where they come from: doc * 1000 + sentence * 10 + k (k < 10)."""
    import random
    rng = random.Random(seed)
    return [[[d * 1000 + s * 10 + k for k in range(rng.randint(2, 9))] for s in range(rng.randint(1, 8))]
            for d in range(num_docs)]


def test_nsp_pairs_are_true_continuations_or_another_documents_text():
    import random
    documents = toy_documents()
    flat = [[t for sentence in doc for t in sentence] for doc in documents]
    is_random = []
    covered = set()
    for trial in range(40):
        rng = random.Random(trial)
        for index in range(len(documents)):
            for a, b, random_next in train.sentence_pairs(documents, index, rng, 1000, 0.1):
                assert a and b
                assert {t // 1000 for t in a} == {index}
                covered.update(a)
                if random_next:
                    other = {t // 1000 for t in b}
                    assert len(other) == 1 and other != {index}          # all of B from one other document
                    doc = flat[other.pop()]
                    start = doc.index(b[0])
                    assert doc[start:start + len(b)] == b                # a contiguous span of it
                else:
                    covered.update(b)
                    doc = flat[index]
                    start = doc.index(a[0])
                    assert doc[start:start + len(a) + len(b)] == a + b   # B continues A exactly
                is_random.append(random_next)
    assert abs(sum(is_random) / len(is_random) - 0.5) < 0.03
    assert covered == {t for doc in flat for t in doc}                   # no sentence is ever skipped


def test_pairs_are_truncated_to_the_max_length_and_instances_have_bert_layout():
    import random
    documents = toy_documents(num_docs=10, seed=1)
    rng = random.Random(0)
    for index in range(len(documents)):
        for a, b, _ in train.sentence_pairs(documents, index, rng, 12, 0.0):
            assert len(a) + len(b) <= 12 and a and b
    cfg = train.Config(seq_len=16, max_predictions=3)
    for tokens, segments, positions, labels, random_next in train.make_instances(documents, rng, cfg, SPECIALS):
        assert len(tokens) == len(segments) <= 16 and tokens[0] == CLS and tokens[-1] == SEP
        first_sep = segments.index(1) - 1 if 1 in segments else None
        assert segments == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
        assert len(positions) <= 3 and 0 not in positions and random_next in (0, 1)
    batch = train.collate(train.make_instances(documents, random.Random(2), cfg, SPECIALS)[:4], PAD, 16, 3)
    assert batch["input_ids"].shape == (4, 16) and batch["masked_positions"].shape == (4, 3)
    assert ((batch["input_ids"] == PAD) == (batch["attention_mask"] == 0)).all()


def test_pretraining_stream_resumes_where_it_stopped():
    """The batch stream is a function of the seed: skipping k batches gives batch k of a fresh stream,
    across the boundary between passes too (so --resume trains on the data it would have seen)."""
    documents = toy_documents(num_docs=12, seed=2)
    cfg = train.Config(seq_len=24, max_predictions=3, seed=5)
    fresh = train.pretraining_batches(documents, cfg, SPECIALS, PAD, batch_size=8)
    batches = [next(fresh) for _ in range(12)]
    resumed = train.pretraining_batches(documents, cfg, SPECIALS, PAD, batch_size=8, start_iter=9)
    for expected in batches[9:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_train_helpers_doctests():
    import doctest
    assert doctest.testmod(train, verbose=False).failed == 0


# ----------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of train.py on a small corpus (the last 300 pydocs documents, as one text file)."""
    from common import data
    folder = tmp_path_factory.mktemp("bert")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(data.corpus_documents("pydocs")[-300:]))
    out_dir = folder / "out"
    command = [sys.executable, str(REPO_ROOT / "04_bert/train.py"), "--preset", "tiny", "--data", str(corpus),
               "--out_dir", str(out_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return command, out_dir, result.stdout


def test_tiny_run_reports_pretraining_and_three_finetuning_modes(tiny_run):
    _, out_dir, stdout = tiny_run
    report = json.loads((out_dir / "report.json").read_text())
    pre = report["pretrain"]
    for key in ("val_loss", "mlm_accuracy", "nsp_accuracy", "tokens_per_second", "seconds"):
        assert isinstance(pre[key], float)
    assert 0 <= pre["mlm_accuracy"] <= 1 and 0 <= pre["nsp_accuracy"] <= 1
    history = pre["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]           # the loss went down
    assert pre["last_train_loss"] < pre["first_train_loss"]
    assert set(report["finetune"]) == {"full", "probe", "prompt"}
    for row in report["finetune"].values():
        assert row["metric"] == "accuracy"
        for key in ("pretrained", "scratch", "baseline", "pretrained_f1", "scratch_f1", "seconds"):
            assert 0 <= row[key] <= (1 if key != "seconds" else 1e4)
    assert re.search(r"pretrain iter\s+10/30 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d.]+k? tok/s .*ETA", stdout)
    assert "tok/s" in stdout and "ETA" in stdout and "MLM accuracy" in stdout and "04_bert report" in stdout


def test_tiny_run_checkpoint_and_export_load(tiny_run):
    from common.checkpoint import load_checkpoint
    _, out_dir, _ = tiny_run
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter"] == train.PRESETS["tiny"]["pretrain_iters"]
    exported = bert.BertForPretraining.from_pretrained(out_dir / "pretrained").eval()
    model = bert.BertForPretraining(exported.config)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], exported(ids)[0])   # the export is the checkpoint's model


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(tiny_run, tmp_path):
    import shutil
    import signal
    command, out_dir, _ = tiny_run
    for tokenizer_file in out_dir.glob("tokenizer-*.json"):             # reuse the trained tokenizer
        shutil.copy(tokenizer_file, tmp_path)
    long_run = command + ["--out_dir", str(tmp_path), "--stage", "pretrain", "--pretrain_iters", "100000",
                          "--eval_interval", "100000"]
    process = subprocess.Popen(long_run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if re.search(r"pretrain iter\s+20/100000", line):
            process.send_signal(signal.SIGINT)
            break
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 2
    assert stderr.startswith("error: interrupted after iter ") and len(stderr.strip().splitlines()) == 1, stderr
    from common.checkpoint import load_checkpoint
    stopped = load_checkpoint(tmp_path / "ckpt.pt")["iter"]
    assert stopped >= 20 and f"after iter {stopped};" in stderr

    resumed = subprocess.run(long_run[:-4] + ["--stage", "pretrain", "--resume", "--pretrain_iters", str(stopped + 10)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'ckpt.pt'} at iter {stopped}" in resumed.stdout
    assert re.search(rf"pretrain iter\s+{stopped + 1}/{stopped + 10}", resumed.stdout)   # no restart at iter 1
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == stopped + 10


def test_bad_input_is_one_line_and_a_nonzero_exit(tiny_run, tmp_path):
    import shutil
    command, out_dir, _ = tiny_run
    for tokenizer_file in out_dir.glob("tokenizer-*.json"):             # skip training a tokenizer
        shutil.copy(tokenizer_file, tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    for extra in (["--data", str(tmp_path / "missing.txt")], ["--out_dir", str(tmp_path), "--resume"],
                  ["--preset", "huge"]):
        bad = subprocess.run(command + extra, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert bad.stderr.startswith("error:")


def test_tiny_simcse_stage_reports_retrieval_before_and_after(tiny_run):
    command, out_dir, _ = tiny_run
    report = train.main(command[2:] + ["--stage", "simcse"])            # in-process: argv without the script
    simcse = report["simcse"]
    assert simcse["metric"] == "top1_retrieval"
    assert 0 <= simcse["before"] <= 1 and 0 <= simcse["after"] <= 1 and 0 < simcse["baseline"] < 0.05
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["simcse"] == pytest.approx(simcse) and "finetune" in saved   # earlier stages kept


def test_two_process_ddp_pretraining_on_cpu(tiny_run, tmp_path):
    """Under torchrun each rank trains on its share of every step's batch; rank 0 writes the checkpoint."""
    import os
    import shutil
    command, out_dir, _ = tiny_run
    for tokenizer_file in out_dir.glob("tokenizer-*.json"):
        shutil.copy(tokenizer_file, tmp_path)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command[1:],
           "--out_dir", str(tmp_path), "--stage", "pretrain", "--device", "cpu"]
    result = subprocess.run(ddp, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    from common.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == train.PRESETS["tiny"]["pretrain_iters"]
    assert json.loads((tmp_path / "report.json").read_text())["pretrain"]["val_loss"] > 0


def test_token_id_outside_the_vocabulary_is_a_clear_error():
    model = bert.BertForPretraining(bert.BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16,
                                                    max_position_embeddings=8))
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary"):
        model(torch.tensor([[1, 12]]))

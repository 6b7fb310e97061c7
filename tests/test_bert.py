"""04_bert: the model matches Hugging Face BERT, honours padding and ties its weights; the pretraining
data follows the original recipe (80/10/10 masking, a prediction cap, 50% random next segments); the
whole train.py runs end to end on a tiny preset, stops on Ctrl-C and resumes to the uninterrupted result."""

import gzip
import json
import math
import re
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, interrupt_after_iteration, load_module, reference, write_mixed_corpus

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


@pytest.mark.parametrize("sharded", [False, True])
def test_matches_transformers_bert_for_pretraining(tmp_path, sharded):
    """Our forward equals transformers.BertForPreTraining's (mlm, nsp) logits to float32 precision, with
    padding and two segments, loaded from its model.safetensors or from shards and their index. (The
    other direction, our export loaded by transformers, is the last test of this file.)"""
    transformers = reference("transformers")
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, max_position_embeddings=64)
    theirs = transformers.BertForPreTraining(hf_config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="20kB" if sharded else "5GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    ours = bert.BertForPretraining.from_pretrained(tmp_path / "hf").eval()

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 99, (3, 20), generator=g)
    segments = torch.randint(0, 2, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:], mask[2, 5:] = 0, 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=segments, attention_mask=mask)
        mlm, nsp = ours(ids, segments, mask)
    diff = max((mlm - expected.prediction_logits).abs().max().item(),
               (nsp - expected.seq_relationship_logits).abs().max().item())
    print(f"max abs diff vs transformers: {diff:.2e}")
    assert diff < 1e-5


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


def test_the_gpu_preset_pretrains_on_about_20_tokens_per_parameter():
    """`bert-mini-gpu`'s comment, kept honest: BERT-Mini's shape on C4 for Chinchilla's compute-optimal
    ~20 tokens per parameter (every input position counted), no more than the head it reads holds."""
    cfg = train.parse_config(train.Config, presets=train.PRESETS, argv=["--preset", "bert-mini-gpu"])
    model = bert.BertForPretraining(train.bert_config(cfg, cfg.vocab_size, pad_id=0))
    tokens = cfg.max_iters * cfg.batch_size * cfg.seq_len
    parameters = sum(p.numel() for p in model.parameters())
    assert cfg.data.startswith("c4:") and 18 <= tokens / parameters <= 22
    assert tokens <= cfg.max_corpus_mb * 1e6 / 4.7                         # ~4.7 characters per GPT-2 token


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


def test_a_corpus_smaller_than_a_batch_still_gives_full_batches():
    """Passes are chained: one pass of 3 short documents makes fewer pairs than a batch of 64 holds."""
    documents = toy_documents(num_docs=3, seed=3)
    cfg = train.Config(seq_len=24, max_predictions=3)
    per_pass = len(train.make_instances(documents, __import__("random").Random(cfg.seed), cfg, SPECIALS))
    assert per_pass < 64
    batch = next(train.pretraining_batches(documents, cfg, SPECIALS, PAD, batch_size=64))
    assert batch["input_ids"].shape == (64, 24)


def test_text_files_are_split_into_documents_at_blank_lines(tmp_path):
    """BERT's data format: blank lines separate documents, so two files give many documents; too few is
    one line that says what is needed."""
    from common import data
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i}. It has two sentences." for i in range(12)))
    (tmp_path / "b.txt").write_text("\n \n".join(f"Another {i}.\nOn two lines." for i in range(9)))
    documents = train.pretraining_documents(data.Corpus(str(tmp_path)), 512)
    assert len(documents) == 21 and documents[0] == "Paragraph 0. It has two sentences."
    (tmp_path / "b.txt").write_text("Only one paragraph here.")
    with pytest.raises(train.UserError, match=r"has 13 documents .*needs at least 20"):
        train.pretraining_documents(data.Corpus(str(tmp_path)), 512)




def test_json_lines_are_documents_and_max_corpus_mb_reads_the_head(tmp_path):
    """A row of JSON lines is one document, blank lines and all (C4's rows are whole web pages); the corpus
    is read into memory up to --max_corpus_mb of text, its head, and a line says when the rest is left."""
    from common import data
    rows = [{"text": f"Page {i}, first paragraph.\n\nPage {i}, second paragraph."} for i in range(30)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = []
    documents = train.pretraining_documents(data.Corpus(str(tmp_path / "rows.jsonl")), 512, log=lines.append)
    assert documents == [row["text"] for row in rows] and lines == []
    documents = write_mixed_corpus(tmp_path / "mixed")
    bound = len(documents[0]) + 10 * len(documents[1])                  # the text file and ten rows
    head = train.pretraining_documents(data.Corpus(str(tmp_path / "mixed"), "body"), bound / 1e6, log=lines.append)
    assert head == documents[0].split("\n\n") + documents[1:11]       # with a text file, paragraphs are documents
    assert len(lines) == 1 and f"--max_corpus_mb {bound / 1e6:g}" in lines[0] and "not read" in lines[0]


def test_a_folder_of_compressed_text_and_json_lines_pretrains_and_an_edit_of_it_stops_resume(tmp_path, capsys):
    """--data a folder with a .txt.gz and a .jsonl.gz (its text under --text_field body): the text file's 40
    paragraphs and the 80 rows are the documents of the sentence pairs. The checkpoint records the corpus's
    fingerprint: once a file changes, --resume refuses to continue on other text."""
    corpus = tmp_path / "corpus"
    write_mixed_corpus(corpus)
    argv = ["--preset", "tiny", "--device", "cpu", "--data", str(corpus), "--text_field", "body", "--stage", "pretrain",
            "--out_dir", str(tmp_path / "out")]
    report = train.main(argv)
    found = re.search(r"pretraining data: (\d+) train / (\d+) val documents", capsys.readouterr().out)
    assert int(found.group(1)) + int(found.group(2)) == 40 + 80
    assert report["pretrain"]["history"][-1]["val_loss"] < report["pretrain"]["history"][0]["val_loss"]
    with gzip.open(corpus / "b_rows.jsonl.gz", "at", encoding="utf-8") as f:
        f.write(json.dumps({"body": "One more row, written after the run."}) + "\n")
    code, errors = run_in_process(argv + ["--resume"], capsys)
    assert code == 2 and len(errors) == 1 and "pretrained on another version of --data" in errors[0], errors


def test_train_helpers_doctests():
    import doctest
    assert doctest.testmod(train, verbose=False).failed == 0


# ----------------------------------------------------------------------------------------- WordPiece

WORDPIECE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "un", "##aff", "##able", "return",
                   "##s", "a", "new", "list", "cafe", "hello", "world", "!", ",", ".", "(", ")", "$", "中", "国",
                   "x", "##y", "##z", "Hello", "World"]


def test_wordpiece_matches_transformers_bert_tokenizer(tmp_path):
    """The WordPiece tokenizer of an official BERT folder gives the ids of transformers' BertTokenizer:
    accents stripped when uncased, punctuation and CJK characters split, longest match first, [UNK]."""
    transformers = reference("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB) + "\n")
    texts = ["unaffable", "Returns a new list (the list)!", "  Café,\tHELLO  world.", "中国 x xy xyz xq",
             "$5 hello\u00a0world\u200b", "unaffablez", "a" * 101]
    for lower_case in (True, False):
        ours = train.WordPieceTokenizer(train.WordPieceTokenizer.load(tmp_path).vocab, lower_case=lower_case)
        theirs = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=lower_case)
        for text in texts:
            assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), (lower_case, text)
    ours = train.WordPieceTokenizer.load(tmp_path)
    assert ours.encode("the [MASK] list", allowed_special={"[MASK]"}) == [5, 4, 13]
    assert ours.decode(ours.encode("unaffable")) == "unaffable"


def test_an_official_style_bert_folder_with_vocab_txt_finetunes(tmp_path, capsys):
    """--init_from a Hugging Face folder holding a WordPiece vocab.txt (as the official checkpoints do)
    runs the three finetuning modes."""
    folder = tmp_path / "bert-wordpiece"
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = WORDPIECE_VOCAB + letters + ["##" + c for c in letters]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    perturbed_model(tiny_config(vocab_size=len(vocab), max_position_embeddings=64)).save_pretrained(folder)
    report = train.main(["--preset", "tiny", "--device", "cpu", "--init_from", str(folder), "--stage", "finetune",
                         "--out_dir", str(tmp_path / "out")])
    assert set(report["finetune"]) == {"full", "probe", "prompt"} and report["init_from"] == str(folder)
    assert "pretrain" not in report
    assert f"pretrained model: {folder} (2 layers, hidden 32, {len(vocab)}-token bert-wordpiece tokenizer)" \
        in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of train.py on a small corpus: the last 300 pydocs documents, as a folder of two text
    files with blank lines between the documents."""
    from common import data
    folder = tmp_path_factory.mktemp("bert")
    corpus = folder / "corpus"
    corpus.mkdir()
    documents = data.corpus_documents("pydocs")[-300:]
    (corpus / "a.txt").write_text("\n\n".join(documents[:150]))
    (corpus / "b.txt").write_text("\n\n".join(documents[150:]))
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
    assert re.search(r"^iter 10/30 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d.]+k? tok/s .*ETA", stdout, re.MULTILINE)
    assert "MLM accuracy" in stdout and "04_bert report" in stdout
    assert re.search(r"pretraining data: \d+ train / \d+ val documents", stdout)


def test_tiny_run_checkpoint_and_export_load(tiny_run):
    """ckpt.pt, tokenizer.json and the exported Hugging Face folder (with our tokenizer) are one model."""
    from common.checkpoint import load_checkpoint
    from common.tokenizer import BPETokenizer
    _, out_dir, _ = tiny_run
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter"] == train.PRESETS["tiny"]["max_iters"]
    tokenizer = BPETokenizer.load(out_dir / "tokenizer.json")
    assert ckpt["tokenizer"] == tokenizer.fingerprint
    assert BPETokenizer.load(out_dir / "pretrained" / "llmfs_tokenizer.json").fingerprint == tokenizer.fingerprint
    exported = bert.BertForPretraining.from_pretrained(out_dir / "pretrained").eval()
    model = bert.BertForPretraining(exported.config)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], exported(ids)[0])   # the export is the checkpoint's model


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_run, tmp_path):
    command, _, _ = tiny_run
    corpus = command[command.index("--data") + 1]
    interrupt_after_iteration(REPO_ROOT / "04_bert/train.py", tmp_path, extra_args=["--data", corpus])
    assert (tmp_path / "tokenizer.json").is_file()               # what --resume needs beside the checkpoint


class StopAfter:
    """Stands in for StopFlag: Ctrl-C pressed during step `steps` (its `requested` turns true at the
    `steps`-th reading, one per step), at the same step every time, unlike a real signal."""

    def __init__(self, steps):
        self.steps, self.readings = steps, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self):
        self.readings += 1
        return self.readings >= self.steps


def test_resume_after_a_stop_equals_the_uninterrupted_run(tiny_run, tmp_path, monkeypatch, capsys):
    """Stopped at step 17 of 30 (after the eval at 10), then --resume: the same weights, bit for bit, and
    the same eval history as one uninterrupted run: data stream, dropout masks, optimizer and schedule
    all continue where they stopped."""
    command, _, _ = tiny_run
    argv = command[2:] + ["--stage", "pretrain", "--device", "cpu", "--eval_interval", "10"]
    whole = train.main(argv + ["--out_dir", str(tmp_path / "whole")])
    monkeypatch.setattr(train, "StopFlag", lambda: StopAfter(17))
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--out_dir", str(tmp_path / "stopped")])
    assert stop.value.code == 130
    ckpt_path = tmp_path / "stopped" / "ckpt.pt"
    assert f"interrupted: saved {ckpt_path} at iter 17; continue with --resume" in capsys.readouterr().out
    monkeypatch.undo()
    resumed = train.main(argv + ["--out_dir", str(tmp_path / "stopped"), "--resume"])
    assert f"resumed from {ckpt_path} at iter 17" in capsys.readouterr().out
    assert [h["iter"] for h in resumed["pretrain"]["history"]] == [10, 20, 30]
    assert resumed["pretrain"]["history"] == whole["pretrain"]["history"]
    expected = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    got = torch.load(ckpt_path, weights_only=True)
    assert got["iter"] == expected["iter"] == 30
    assert all(torch.equal(got["model"][k], expected["model"][k]) for k in expected["model"])


def run_in_process(argv, capsys):
    """main(argv) as `python train.py ARGV` runs it: (exit code, the lines on stderr)."""
    from common.config import run_main
    try:
        run_main(train.main, argv)
        code = 0
    except SystemExit as error:
        code = error.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_stages_that_read_a_run_check_its_tokenizer_and_that_it_finished(tiny_run, tmp_path, capsys):
    import shutil
    command, out_dir, _ = tiny_run
    for name in ("ckpt.pt", "tokenizer.json", "run.json"):
        shutil.copy(out_dir / name, tmp_path / name)
    argv = command[2:] + ["--out_dir", str(tmp_path), "--stage", "finetune"]
    from common.tokenizer import BPETokenizer
    other = BPETokenizer.train("some other text entirely " * 20, 270, special_tokens=train.SPECIAL_TOKENS)
    other.save(tmp_path / "tokenizer.json")
    code, errors = run_in_process(argv, capsys)
    assert code == 2 and len(errors) == 1 and "is not the tokenizer the checkpoint beside it was trained with" in errors[0]
    (tmp_path / "tokenizer.json").write_text("{not json")
    code, errors = run_in_process(argv, capsys)
    assert code == 2 and len(errors) == 1 and "tokenizer.json is not a tokenizer file" in errors[0]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "iter": 12}, tmp_path / "ckpt.pt")
    code, errors = run_in_process(argv, capsys)
    assert code == 2 and len(errors) == 1 and "stopped at iter 12 of 30: finish it with --resume" in errors[0]


def test_init_from_the_exported_folder_finetunes_as_the_run_did(tiny_run, tmp_path):
    """--init_from out_dir/pretrained (a Hugging Face folder with our tokenizer) gives the finetuning
    results of the run that exported it; its report goes to its own --out_dir."""
    command, out_dir, _ = tiny_run
    report = train.main(command[2:] + ["--init_from", str(out_dir / "pretrained"), "--stage", "finetune",
                                       "--out_dir", str(tmp_path)])
    expected = json.loads((out_dir / "report.json").read_text())["finetune"]
    for mode, row in report["finetune"].items():
        assert (row["pretrained"], row["scratch"]) == (expected[mode]["pretrained"], expected[mode]["scratch"]), mode
    assert json.loads((tmp_path / "run.json").read_text())["config"] == {"init_from": str((out_dir / "pretrained").resolve())}


def test_tiny_simcse_stage_reports_retrieval_before_and_after(tiny_run):
    command, out_dir, _ = tiny_run
    before = json.loads((out_dir / "report.json").read_text())
    report = train.main(command[2:] + ["--stage", "simcse"])            # in-process: argv without the script
    simcse = report["simcse"]
    assert simcse["metric"] == "top1_retrieval"
    assert 0 <= simcse["before"] <= 1 and 0 <= simcse["after"] <= 1 and 0 < simcse["baseline"] < 0.05
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["simcse"] == pytest.approx(simcse)
    assert (saved["pretrain"], saved["finetune"], saved["seconds"]) == (before["pretrain"], before["finetune"], before["seconds"])


def test_two_process_ddp_pretraining_on_cpu(tiny_run, tmp_path):
    """Under torchrun each rank trains on its share of every step's batch; rank 0 writes the checkpoint."""
    import os
    command, _, _ = tiny_run
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command[1:],
           "--out_dir", str(tmp_path), "--stage", "pretrain", "--device", "cpu"]
    result = subprocess.run(ddp, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    from common.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == train.PRESETS["tiny"]["max_iters"]
    assert json.loads((tmp_path / "report.json").read_text())["pretrain"]["val_loss"] > 0


def test_token_id_outside_the_vocabulary_is_a_clear_error():
    model = bert.BertForPretraining(bert.BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16,
                                                    max_position_embeddings=8))
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary"):
        model(torch.tensor([[1, 12]]))


# ----------------------------------------------------------------------------------------- export

def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path):
    """A random model of ours, exported, is a BertForPreTraining with the same (mlm, nsp) logits, its
    decoder tied to the word embeddings again; the export is two files, written atomically."""
    transformers = reference("transformers")
    ours = perturbed_model(tiny_config())
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    theirs = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    decoder, embedding = theirs.cls.predictions.decoder.weight, theirs.bert.embeddings.word_embeddings.weight
    assert decoder.data_ptr() == embedding.data_ptr()                   # tied again, not a copy
    g = torch.Generator().manual_seed(3)
    ids, segments = torch.randint(0, 61, (3, 20), generator=g), torch.randint(0, 2, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=segments, attention_mask=mask)
        mlm, nsp = ours(ids, segments, mask)
    mlm_diff = (mlm - expected.prediction_logits).abs().max().item()
    nsp_diff = (nsp - expected.seq_relationship_logits).abs().max().item()
    print(f"BERT export: max |ours - transformers| MLM {mlm_diff:.2e}, NSP {nsp_diff:.2e}")
    assert mlm_diff < 1e-5 and nsp_diff < 1e-5

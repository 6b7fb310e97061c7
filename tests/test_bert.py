"""04_bert: the model matches Hugging Face BERT, honours padding and ties its weights; the pretraining
data follows the original recipe (80/10/10 masking, a prediction cap, 50% random next segments); the
whole train.py runs end to end on a tiny preset."""

import json
import math
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, load_module

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
    transformers = pytest.importorskip("transformers")
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

"""Tests for 06_t5: the T5 model (v1.0 and v1.1), span corruption, ROUGE-L and an end-to-end run."""

import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, assert_every_document_tokenized, load_module, reference, write_mixed_corpus

t5 = load_module("06_t5/model.py")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation (and, on a shared machine,
    oversubscription made the tests several times slower). Restored afterwards for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(variant="v1.0", **overrides):
    base = dict(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if variant == "v1.0":
        base.update(feed_forward_proj="relu", tie_word_embeddings=True)
    else:
        base.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    base.update(overrides)
    return t5.T5Config(**base)


def tiny_model(variant="v1.0", seed=0, **overrides):
    torch.manual_seed(seed)
    return t5.T5(tiny_config(variant, **overrides)).eval()


def padded_inputs(seed=1, vocab=61):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (3, 14), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[2, 4:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    decoder_input_ids = torch.randint(2, vocab, (3, 11), generator=g)
    decoder_input_ids[:, 0] = 0
    return input_ids, attention_mask, decoder_input_ids


# ------------------------------------------------------------------------------ relative position buckets
def test_bucket_bidirectional_hand_computed():
    # 32 buckets, max distance 128: 16 per direction, distances 0..7 exact, then log-spaced up to 128:
    # bucket(d) = 8 + floor(log(d/8) / log(128/8) * 8) for d >= 8, capped at 15; keys to the right +16.
    distances = torch.tensor([0, -1, -7, -8, -12, -20, -50, -100, -127, -128, -1000, 1, 7, 12, 50, 1000])
    expected = [0, 1, 7, 8, 9, 10, 13, 15, 15, 15, 15, 17, 23, 25, 29, 31]
    # e.g. -12: log(1.5)/log(16)*8 = 1.17 -> 9;  -20: log(2.5)/log(16)*8 = 2.64 -> 10;
    #      -50: log(6.25)/log(16)*8 = 5.29 -> 13;  -100: log(12.5)/log(16)*8 = 7.29 -> 15
    got = t5.relative_position_bucket(distances, bidirectional=True, num_buckets=32, max_distance=128)
    assert got.tolist() == expected


def test_bucket_causal_hand_computed():
    # Decoder: the future (j - i > 0) is bucket 0; the past uses all 32 buckets, 16 exact, then
    # 16 + floor(log(d/16) / log(128/16) * 16), capped at 31.
    distances = torch.tensor([5, 1, 0, -1, -15, -16, -20, -40, -100, -127, -500])
    expected = [0, 0, 0, 1, 15, 16, 17, 23, 30, 31, 31]
    # -20: log(1.25)/log(8)*16 = 1.72 -> 17;  -40: log(2.5)/log(8)*16 = 7.05 -> 23;
    # -100: log(6.25)/log(8)*16 = 14.1 -> 30
    got = t5.relative_position_bucket(distances, bidirectional=False, num_buckets=32, max_distance=128)
    assert got.tolist() == expected


def test_bucket_is_monotone_in_distance():
    d = torch.arange(0, 300)
    left = t5.relative_position_bucket(-d, bidirectional=True)
    right = t5.relative_position_bucket(d, bidirectional=True)
    assert (left.diff() >= 0).all() and (right[1:].diff() >= 0).all()
    assert set(left.tolist()) == set(range(16)) and set(right[1:].tolist()) == set(range(17, 32))


# ------------------------------------------------------------------------------------------- the model
def test_position_bias_computed_once_and_shared_across_layers():
    model = tiny_model("v1.1")
    for stack in (model.encoder, model.decoder):
        owners = [i for i, block in enumerate(stack.block)
                  if hasattr(block.layer[0].SelfAttention, "relative_attention_bias")]
        assert owners == [0]                                    # only the first layer holds the table
    seen = {"encoder": [], "decoder": [], "cross": []}

    def record(name):
        def hook(module, args, kwargs):
            seen[name].append(args[1] if len(args) > 1 else kwargs.get("attn_bias"))
        return hook

    for block in model.encoder.block:
        block.layer[0].SelfAttention.register_forward_pre_hook(record("encoder"), with_kwargs=True)
    for block in model.decoder.block:
        block.layer[0].SelfAttention.register_forward_pre_hook(record("decoder"), with_kwargs=True)
        block.layer[1].EncDecAttention.register_forward_pre_hook(record("cross"), with_kwargs=True)
    input_ids, _, decoder_input_ids = padded_inputs()
    model(input_ids, decoder_input_ids)
    for name, n_layers in (("encoder", 2), ("decoder", 3)):
        assert len(seen[name]) == n_layers
        assert all(bias is seen[name][0] for bias in seen[name])     # the very same tensor in every layer
    assert all(bias is None for bias in seen["cross"])             # no position bias in cross-attention
    # and each layer really uses it: the gradient reaches the table from the last layer alone
    enc_bias = seen["encoder"][0]
    assert enc_bias.shape == (1, 4, 14, 14) and enc_bias.requires_grad


def test_decoder_bias_is_causal_and_encoder_bias_bidirectional():
    model = tiny_model("v1.0")
    enc = model.encoder.position_bias(6, 0)
    dec = model.decoder.position_bias(6, 0)
    neg = torch.finfo(torch.float32).min
    assert (dec[0, :, torch.triu_indices(6, 6, 1)[0], torch.triu_indices(6, 6, 1)[1]] == neg).all()
    assert (enc > neg / 2).all()
    # the encoder bias depends on j - i only (a Toeplitz matrix per head)
    assert torch.equal(enc[0, :, 1:, 1:], enc[0, :, :-1, :-1])


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_sdpa_path_equals_explicit_path(variant):
    fast = tiny_model(variant, use_sdpa=True).train()           # dropout 0: deterministic in train mode
    slow = tiny_model(variant, use_sdpa=False).train()
    slow.load_state_dict(fast.state_dict())
    input_ids, attention_mask, decoder_input_ids = padded_inputs()
    labels = torch.randint(2, 61, decoder_input_ids.shape)
    out_fast, loss_fast = fast(input_ids, decoder_input_ids, attention_mask, labels)
    out_slow, loss_slow = slow(input_ids, decoder_input_ids, attention_mask, labels)
    torch.testing.assert_close(out_fast, out_slow, atol=1e-5, rtol=1e-5)
    loss_fast.backward()
    loss_slow.backward()
    for (name, p_fast), p_slow in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p_fast.grad, p_slow.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_is_unscaled_softmax_plus_bias():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    bias = torch.randn(1, 2, 3, 5)
    expected = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v     # no 1/sqrt(d_k)
    torch.testing.assert_close(t5.attention_explicit(q, k, v, bias), expected)


def test_rms_norm_scales_without_centering():
    norm = t5.T5LayerNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(2, 3, 8) + 5.0                                 # far from zero mean
    expected = torch.arange(1.0, 9.0) * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    assert not torch.allclose(norm(x), norm(x - x.mean(-1, keepdim=True)))   # the mean is not removed
    assert not any(n.endswith("bias") for n, _ in norm.named_parameters())


def test_variants_differ_as_the_paper_says():
    v10, v11 = tiny_model("v1.0"), tiny_model("v1.1")
    assert not hasattr(v10, "lm_head")                              # tied: the embedding is the output layer
    assert hasattr(v11, "lm_head")
    assert hasattr(v10.encoder.block[0].layer[1].DenseReluDense, "wi")
    assert hasattr(v11.encoder.block[0].layer[1].DenseReluDense, "wi_0")
    assert not any(n.endswith(".bias") for n, _ in v11.named_parameters())   # no biases anywhere
    # tied logits = (decoder output * d_model^-0.5) E^T
    input_ids, attention_mask, decoder_input_ids = padded_inputs()
    hidden = v10.decoder(v10.shared(decoder_input_ids), None, v10.encode(input_ids, attention_mask), attention_mask)
    torch.testing.assert_close(v10(input_ids, decoder_input_ids, attention_mask)[0],
                               (hidden * 32 ** -0.5) @ v10.shared.weight.T)


def test_t5_initialisation_scales():
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=500, d_model=256, d_kv=32, d_ff=1024, num_layers=1, num_heads=8,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = t5.T5(cfg)
    attn = model.encoder.block[0].layer[0].SelfAttention
    ff = model.encoder.block[0].layer[1].DenseReluDense
    for weight, std in ((attn.q.weight, (256 * 32) ** -0.5), (attn.k.weight, 256 ** -0.5),
                        (attn.o.weight, 256 ** -0.5), (ff.wi_0.weight, 256 ** -0.5), (ff.wo.weight, 1024 ** -0.5),
                        (model.shared.weight, 1.0), (model.lm_head.weight, 256 ** -0.5)):
        assert abs(weight.std().item() / std - 1) < 0.05


def test_shift_right_and_ignored_labels():
    labels = torch.tensor([[5, 6, 1, -100], [7, 1, -100, -100]])
    assert t5.shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 1], [0, 7, 1, 0]]
    model = tiny_model("v1.1")
    input_ids, attention_mask, _ = padded_inputs()
    labels = torch.randint(2, 61, (3, 6))
    labels[0, 4:] = -100
    logits, loss = model(input_ids, attention_mask=attention_mask, labels=labels)
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(loss, manual)
    wide = torch.randint(2, 61, (3, 12))
    wide[:, 6:] = labels                                     # labels as a non-contiguous slice work too
    torch.testing.assert_close(model(input_ids, attention_mask=attention_mask, labels=wide[:, 6:])[1], loss)


def test_decoder_is_causal_and_encoder_padding_is_ignored():
    model = tiny_model("v1.1")
    input_ids, attention_mask, decoder_input_ids = padded_inputs()
    logits = model(input_ids, decoder_input_ids, attention_mask)[0]
    changed = decoder_input_ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 61
    logits2 = model(input_ids, changed, attention_mask)[0]
    torch.testing.assert_close(logits[:, :6], logits2[:, :6])           # the past does not see token 6
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:])
    other_pads = input_ids.masked_fill(attention_mask == 0, 7)          # garbage under the padding
    torch.testing.assert_close(model(other_pads, decoder_input_ids, attention_mask)[0], logits)


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_cached_decoding_equals_uncached(variant):
    # a sharp random model, so that greedy and beam search produce varied, non-trivial outputs
    model = tiny_model(variant, seed=3, initializer_factor=3.0)
    input_ids, attention_mask, _ = padded_inputs(seed=5)
    greedy = model.generate(input_ids, attention_mask, max_new_tokens=12, use_cache=True)
    assert greedy == model.generate(input_ids, attention_mask, max_new_tokens=12, use_cache=False)
    assert len({tuple(g) for g in greedy}) > 1 or len(greedy[0]) > 1
    beams = model.generate(input_ids, attention_mask, max_new_tokens=12, num_beams=3, use_cache=True)
    assert beams == model.generate(input_ids, attention_mask, max_new_tokens=12, num_beams=3, use_cache=False)
    # step by step, the cached next-token logits equal the full recomputation (in float64, where the
    # sharp model's float32 roundoff, amplified to ~1e-4 relative, does not blur the comparison)
    model = model.double()
    encoder_out = model.encode(input_ids, attention_mask)
    cache = model.init_cache(encoder_out)
    tokens = torch.zeros(3, 1, dtype=torch.long)
    for _ in range(6):
        cached = model._next_logits(tokens, encoder_out, attention_mask, cache)
        full = model._next_logits(tokens, encoder_out, attention_mask, None)
        torch.testing.assert_close(cached, full, atol=1e-9, rtol=1e-9)
        tokens = torch.cat([tokens, full.argmax(-1, keepdim=True)], dim=1)


def test_wide_beam_search_is_exact_search():
    # With as many beams as there are prefixes, nothing is ever pruned: the answer must be the most likely
    # of all sequences that end with EOS within 3 tokens or run to the 3-token limit (brute force below).
    V, eos = 12, 1
    model = tiny_model("v1.1", seed=4, vocab_size=V)
    input_ids, attention_mask, _ = padded_inputs(seed=6, vocab=V)
    beams = model.generate(input_ids, attention_mask, max_new_tokens=3, num_beams=V * V, length_penalty=0.0)
    greedy = model.generate(input_ids, attention_mask, max_new_tokens=3)
    assert beams != greedy                                   # this model is one where search matters
    grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))                         # all (a, b)
    decoder_in = torch.cat([torch.zeros(V * V, 1, dtype=torch.long), grid], dim=1)        # [start, a, b]
    for row in range(3):
        src = input_ids[row:row + 1].expand(V * V, -1)
        mask = attention_mask[row:row + 1].expand(V * V, -1)
        logp = torch.log_softmax(model(src, decoder_in, mask)[0].double(), -1)           # (V*V, 3, V)
        scores = {(): logp[0, 0, eos].item()}
        for i, (a, b) in enumerate(grid.tolist()):
            if eos in (a, b):
                continue
            pa, pab = logp[i, 0, a], logp[i, 0, a] + logp[i, 1, b]
            scores[(a,)] = (pa + logp[i, 1, eos]).item()
            scores[(a, b)] = (pab + logp[i, 2, eos]).item()
            for c in range(V):
                if c != eos:
                    scores[(a, b, c)] = (pab + logp[i, 2, c]).item()        # ran into the limit
        best = max(scores, key=scores.get)
        assert tuple(beams[row]) == best, (row, beams[row], best)


# ---------------------------------------------------------------------------------- loading checkpoints
def write_safetensors(path, tensors):
    """The safetensors layout, written by hand: u64 header size, JSON header, raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, tensor in tensors.items():
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def hand_made_folder(folder, variant, fmt="safetensors"):
    """A checkpoint folder as Hugging Face lays it out: config.json with HF field names, the shared
    embedding repeated under encoder/decoder.embed_tokens, a bf16 tensor, and the unused decoder
    cross-attention bias that old checkpoints carry."""
    model = tiny_model(variant, seed=7)
    cfg = model.config
    config = {"model_type": "t5", "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv,
              "d_ff": cfg.d_ff, "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers,
              "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
              "relative_attention_max_distance": cfg.relative_attention_max_distance, "dropout_rate": 0.1,
              "feed_forward_proj": cfg.feed_forward_proj, "tie_word_embeddings": cfg.tie_word_embeddings,
              "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
              "architectures": ["T5ForConditionalGeneration"]}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    state["decoder.embed_tokens.weight"] = state["shared.weight"]
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(8, 4)
    name = "encoder.final_layer_norm.weight"
    state[name] = state[name].to(torch.bfloat16)                        # checkpoints are often half precision
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.copy_(state[name].float())
    if fmt == "safetensors":
        write_safetensors(folder / "model.safetensors", state)
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return model


@pytest.mark.parametrize("variant,fmt", [("v1.0", "safetensors"), ("v1.1", "safetensors"), ("v1.1", "bin")])
def test_from_pretrained_hand_made_folder(tmp_path, variant, fmt):
    original = hand_made_folder(tmp_path / "ckpt", variant, fmt)
    loaded = t5.T5.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.tie_word_embeddings == (variant == "v1.0")
    assert loaded.config.dropout_rate == 0.1 and loaded.config.num_decoder_layers == 3
    input_ids, attention_mask, decoder_input_ids = padded_inputs()
    torch.testing.assert_close(loaded(input_ids, decoder_input_ids, attention_mask)[0],
                               original(input_ids, decoder_input_ids, attention_mask)[0], atol=0, rtol=0)


def test_from_pretrained_rejects_a_mismatched_or_broken_folder(tmp_path):
    hand_made_folder(tmp_path / "ckpt", "v1.0")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["d_ff"] = 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        t5.T5.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="corrupt"):
        t5.T5.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="config.json"):
        t5.T5.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant,sharded", [("v1.0", False), ("v1.1", False), ("v1.1", True)])
def test_logits_match_hugging_face_t5(tmp_path, variant, sharded):
    transformers = reference("transformers")
    torch.manual_seed(0)
    gated = variant == "v1.1"
    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   feed_forward_proj="gated-gelu" if gated else "relu",
                                   tie_word_embeddings=not gated, dropout_rate=0.0, decoder_start_token_id=0)
    theirs = transformers.T5ForConditionalGeneration(config).eval()
    if gated:
        # Real v1.1 checkpoints have an LM head of their own; recent transformers ties it to the embedding
        # unless it is given its own parameter, which save_pretrained then writes as lm_head.weight.
        theirs.lm_head.weight = torch.nn.Parameter(torch.randn(97, 32))
    theirs.save_pretrained(tmp_path, max_shard_size="20kB" if sharded else "5GB")  # shared.weight: 12.4 kB
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ours = t5.T5.from_pretrained(tmp_path).eval()
    assert ours.config.tie_word_embeddings == (not gated)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 97, (3, 40), generator=g)                 # 40 > max_distance: far buckets too
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 25:] = 0
    decoder_input_ids = torch.randint(2, 97, (3, 30), generator=g)
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask,
                             decoder_input_ids=decoder_input_ids).logits
        for use_sdpa in (True, False):
            ours.config.use_sdpa = use_sdpa
            for module in ours.modules():
                if isinstance(module, t5.T5Attention):
                    module.use_sdpa = use_sdpa
            got = ours(input_ids, decoder_input_ids, attention_mask)[0]
            print(f"{variant} sdpa={use_sdpa}: max |ours - transformers| = {(got - expected).abs().max().item():.3g}")
            torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)
        hf_greedy = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    hf_greedy = [row.tolist()[1:] for row in hf_greedy]                        # drop the start token
    hf_greedy = [row[:row.index(1)] if 1 in row else row for row in hf_greedy]  # cut at EOS (and its padding)
    assert ours.generate(input_ids, attention_mask, max_new_tokens=8) == hf_greedy


# ------------------------------------------------------------------------------------------- train.py
train = load_module("06_t5/train.py")


def test_random_segmentation_parts_are_positive_and_all_reachable():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        parts = train.random_segmentation(4, 2, g)
        assert sum(parts) == 4 and len(parts) == 2 and min(parts) >= 1
        seen.add(tuple(parts))
    assert seen == {(1, 3), (2, 2), (3, 1)}


def test_span_corruption_paper_example():
    # The paper's Figure 2: "Thank you <X> me to your party <Y> week ." / "<X> for inviting <Y> last <Z>"
    # (here the target ends with EOS instead of a final sentinel).
    words = "Thank you for inviting me to your party last week .".split()
    mask = [w in ("for", "inviting", "last") for w in words]
    inputs, targets = train.span_corrupt(words, mask, ["<X>", "<Y>", "<Z>"], "</s>")
    assert inputs == "Thank you <X> me to your party <Y> week . </s>".split()
    assert targets == "<X> for inviting <Y> last </s>".split()


def test_span_corruption_reconstructs_the_original_with_sentinels_in_order():
    g = torch.Generator().manual_seed(1)
    sentinels = list(range(1000, 1100))
    for length in (20, 57, 141, 300):
        tokens = list(range(length))                                   # distinct ids: nothing ambiguous
        mask = train.random_spans_noise_mask(length, 0.15, 3.0, g)
        inputs, targets = train.span_corrupt(tokens, mask, sentinels, -1)
        assert inputs[-1] == -1 and targets[-1] == -1                   # both end with EOS
        used = [t for t in inputs if t >= 1000]
        assert used == sentinels[:len(used)] == [t for t in targets if t >= 1000]   # 0, 1, 2... in both
        spans, current = {}, None
        for t in targets[:-1]:                                         # target = S_k span_k S_k+1 span_k+1 ...
            if t >= 1000:
                current = spans.setdefault(t, [])
            else:
                current.append(t)
        rebuilt = [u for t in inputs[:-1] for u in (spans[t] if t >= 1000 else [t])]
        assert rebuilt == tokens
        assert all(spans.values())                                     # no empty span
        assert sum(mask) == round(length * 0.15)


def test_noise_density_and_span_length_hold_on_average():
    g = torch.Generator().manual_seed(2)
    noise = total = spans = 0
    for _ in range(300):
        length = int(torch.randint(40, 400, (1,), generator=g))
        mask = train.random_spans_noise_mask(length, 0.15, 3.0, g)
        assert len(mask) == length and not mask[0]                    # starts with a kept span
        noise += sum(mask)
        total += length
        spans += sum(1 for i, m in enumerate(mask) if m and not mask[i - 1])
    assert abs(noise / total - 0.15) < 0.002
    assert abs(noise / spans - 3.0) < 0.15


@pytest.mark.parametrize("input_length", [16, 64, 128, 512])
def test_corrupted_input_fills_the_context(input_length):
    raw, target = train.raw_length_for(input_length, 0.15, 3.0)
    g = torch.Generator().manual_seed(3)
    inputs, targets = train.span_corrupt(list(range(raw)), train.random_spans_noise_mask(raw, 0.15, 3.0, g),
                                         list(range(10_000, 10_200)), -1)
    assert len(inputs) == input_length and len(targets) == target           # exactly full
    assert train.corrupted_lengths(raw + 1, 0.15, 3.0)[0] > input_length    # one more raw token would not fit
    assert train.corrupted_lengths(148, 0.15, 3.0) == (134, 30)             # the docstring's worked example


@pytest.mark.parametrize("prediction,reference,expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),      # LCS "the cat on the mat": P = R = 5/6
    ("Return the length", "Return the number of items", 0.5),        # LCS 2: P = 2/3, R = 2/5, F = 0.5
    ("a b c d", "a x b y d", 2 / 3),                                 # LCS "a b d" (gaps allowed): P 3/4, R 3/5
    ("b a", "a b", 0.5),                                             # order matters: LCS 1
    ("Return the `len()`.", "return the len", 1.0),                  # case and punctuation ignored
    ("completely different words", "nothing in common", 0.0),
    ("", "a reference", 0.0),
    ("", "", 1.0),
])
def test_rouge_l_hand_checked(prediction, reference, expected):
    assert train.rouge_l(prediction, reference) == pytest.approx(expected)


def test_lcs_and_scores():
    assert train.lcs_length("the cat sat".split(), "the cat on the mat sat".split()) == 3
    assert train.lcs_length("abcbdab", "bdcaba") == 4                 # the textbook example (CLRS)
    assert train.score("exact_match", ["open", "close "], ["open", "read"]) == 0.5
    assert train.score("rouge_l", ["a b", "c"], ["a b", "d"]) == 0.5


def test_optimizer_groups_and_rms_scaled_learning_rates():
    model = tiny_model("v1.1")
    plain = train.configure_optimizer(model, 1e-3, 0.01)
    assert all(group["lr_scale"] == 1.0 for group in plain.param_groups)
    scaled = train.configure_optimizer(model, 1e-2, 0.01, scale_lr_by_rms=True)
    names = [n for n, _ in model.named_parameters()]
    for name, group in zip(names, scaled.param_groups):
        p = group["params"][0]
        assert group["lr_scale"] == pytest.approx(max(p.detach().pow(2).mean().sqrt().item(), 1e-3))
        decayed = p.dim() >= 2 and name != "shared.weight" and "relative_attention_bias" not in name
        assert group["weight_decay"] == (0.01 if decayed else 0.0), name
    by_name = dict(zip(names, scaled.param_groups))
    # T5's initialisation: the embedding has std 1, W^Q std (d_model d_kv)^-0.5, so their lrs differ as much
    assert by_name["shared.weight"]["lr_scale"] > 10 * by_name["encoder.block.0.layer.0.SelfAttention.q.weight"]["lr_scale"]


def test_the_gpu_preset_pretrains_on_about_20_tokens_per_parameter():
    """`small`'s comment, kept honest: T5-small's shape, pretrained on C4 for Chinchilla's compute-optimal
    ~20 tokens per parameter (the corpus tokens its steps read)."""
    cfg = train.parse_config(train.Config, presets=train.PRESETS, argv=["--preset", "small"])
    model = t5.T5(t5.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                              num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
                              num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    raw_length, _ = train.raw_length_for(cfg.input_length, cfg.noise_density, cfg.mean_noise_span_length)
    tokens = cfg.max_iters * cfg.batch_size * raw_length
    assert cfg.data.startswith("c4:") and 18 <= tokens / model.num_parameters() <= 22
    assert tokens <= int(cfg.data.split(":")[1]) * 170e6                  # C4 shards of ~170M GPT-2 tokens each


def test_learning_rate_schedules():
    assert train.get_lr(0, 1.0, 10, 100, "inverse_sqrt", 0.0) == pytest.approx(0.1)          # warmup: linear
    assert train.get_lr(9, 1.0, 10, 100, "inverse_sqrt", 0.0) == pytest.approx(1.0)
    assert train.get_lr(39, 1.0, 10, 100, "inverse_sqrt", 0.0) == pytest.approx(0.5)         # sqrt(10 / 40)
    assert train.get_lr(500, 1.0, 10, 100, "constant", 0.0) == 1.0
    linear = [train.get_lr(it, 1.0, 10, 100, "linear", 0.0) for it in range(100)]
    assert linear[10] == pytest.approx(1.0) and linear[-1] == pytest.approx(1 / 90)           # the last step still learns
    assert all(a > b for a, b in zip(linear[10:], linear[11:]))
    assert train.get_lr(99, 1.0, 10, 100, "linear", 0.1) == pytest.approx(0.1 + 0.9 / 90)     # the floor


def test_the_shared_recipe_functions_are_the_same_in_03_and_06():
    """train_stage (but for its forward line), get_lr, mean_loss, source_and_target, read_pretrained and
    load_tokenizer_file are deliberate copies of 03_transformer/train.py's: they must stay identical."""
    import inspect
    transformer_train = load_module("03_transformer/train.py")
    for name in ("get_lr", "mean_loss", "source_and_target", "read_pretrained", "load_tokenizer_file"):
        ours, theirs = (inspect.getsource(getattr(module, name)) for module in (train, transformer_train))
        assert ours.replace("03_transformer", "06_t5") == theirs.replace("03_transformer", "06_t5"), name
    ours, theirs = (inspect.getsource(module.train_stage).splitlines() for module in (train, transformer_train))
    differing = [(a, b) for a, b in zip(ours, theirs) if a != b]
    assert len(ours) == len(theirs) and differing == [
        ("                _, loss = train_model(**batch)",
         "                _, loss = train_model(**batch, label_smoothing=cfg.label_smoothing)")]


# ---------------------------------------------------------------------------------------- end to end
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(*args):
    # One thread: the tiny model's matrices are too small to gain from two, and on a shared machine an
    # oversubscribed OpenMP pool made the run several times slower.
    return subprocess.run([sys.executable, str(REPO_ROOT / "06_t5" / "train.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)


def tiny_args(out):
    return ["--preset", "tiny", "--device", "cpu", "--out_dir", str(out), "--log_interval", "1"]


def iter_losses(stdout, stage):
    return [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines()
            if line.startswith(f"{stage} iter")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5_tiny")
    result = run_train(*tiny_args(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def without_timings(row):
    """A report section without the figures that differ from run to run (seconds, tokens per second)."""
    if isinstance(row, dict):
        return {k: without_timings(v) for k, v in row.items() if "second" not in k}
    return row


def test_tiny_run_reports_what_the_issue_asks(tiny_run):
    out, result = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert report["chapter"] == "06_t5" and report["pretrain"]["val_loss"] > 0
    assert {task: row["metric"] for task, row in report["finetune"].items()} == {
        "summarize": "rouge_l", "name": "exact_match", "module": "accuracy"}
    for row in report["finetune"].values():
        assert 0 <= row["pretrained"] <= 1 and 0 <= row["scratch"] <= 1 and row["seconds"] > 0
        assert set(row["by_search"]["pretrained"]) == {"greedy", "beam"}
    assert {s["task"] for s in report["samples"]} == {"summarize", "name", "module"}
    for stage in ("pretrain", "finetune-pretrained", "finetune-scratch"):
        losses = iter_losses(result.stdout, stage)
        assert len(losses) >= 3 and min(losses[1:]) < losses[0], (stage, losses)   # the loss went down
    assert "=== 06_t5" in result.stdout and "samples from the test splits" in result.stdout


def test_tiny_run_checkpoints_load_and_the_export_is_the_pretrained_model(tiny_run):
    out, _ = tiny_run
    common_checkpoint = load_module("common/checkpoint.py")
    fingerprint = load_module("common/tokenizer.py").BPETokenizer.load(out / "tokenizer.json").fingerprint
    for name in ("pretrain.pt", "t5-pretrained.pt", "t5-scratch.pt"):
        ckpt = common_checkpoint.load_checkpoint(out / name)
        model = t5.T5(t5.T5Config(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])                                    # strict: every key matches
        assert ckpt["tokenizer"] == fingerprint
    assert not list(out.glob(".*.tmp*"))                                        # no half-written leftovers
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["config.json", "llmfs_tokenizer.json", "model.safetensors"]
    exported = t5.T5.from_pretrained(out / "hf").state_dict()
    pretrained = common_checkpoint.load_checkpoint(out / "pretrain.pt")["model"]
    assert exported.keys() == pretrained.keys()
    assert all(torch.equal(exported[name], pretrained[name]) for name in pretrained)
    assert (out / "hf" / "llmfs_tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def interrupt(args, stage, at_iter):
    """Run train.py with `args`, press Ctrl-C once a progress line of `stage` shows iteration `at_iter` or
    later; check the stop: exit 130, the one line saying where the checkpoint is, no traceback."""
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "06_t5" / "train.py"), *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    for line in process.stdout:
        if line.startswith(f"{stage} iter") and int(line.split()[2].split("/")[0]) >= at_iter:
            process.send_signal(signal.SIGINT)
            break
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 130, errors[-2000:]
    assert "interrupted: saved" in output and "continue with --resume" in output and "Traceback" not in errors


def test_ctrl_c_twice_then_resume_ends_exactly_where_an_uninterrupted_run_ends(tiny_run, tmp_path):
    """Stopped in pretraining, resumed, stopped again in finetuning, resumed: the very weights and report of
    the uninterrupted run (batches are a function of the step; optimizer, RNG state, schedule position
    and best-val bookkeeping are checkpointed; tiny has dropout on in both stages)."""
    out, _ = tiny_run
    common_checkpoint = load_module("common/checkpoint.py")
    interrupt(tiny_args(tmp_path), "pretrain", 12)
    assert 12 <= common_checkpoint.load_checkpoint(tmp_path / "pretrain.pt")["iter"] < 30
    interrupt(tiny_args(tmp_path) + ["--resume"], "finetune-pretrained", 7)
    assert 7 <= common_checkpoint.load_checkpoint(tmp_path / "finetune-pretrained.pt")["iter"] < 20
    resumed = run_train(*tiny_args(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "pretrain: resumed from" in resumed.stdout and "pretrain iter" not in resumed.stdout
    for name in ("pretrain.pt", "t5-pretrained.pt", "t5-scratch.pt"):
        straight = common_checkpoint.load_checkpoint(out / name)["model"]
        again = common_checkpoint.load_checkpoint(tmp_path / name)["model"]
        assert all(torch.equal(straight[key], again[key]) for key in straight), name
    straight, again = (json.loads((folder / "report.json").read_text()) for folder in (out, tmp_path))
    assert without_timings(again["pretrain"]) == without_timings(straight["pretrain"])
    assert without_timings(again["finetune"]) == without_timings(straight["finetune"])


def test_init_from_the_exported_folder_finetunes_on_a_users_task(tiny_run, tmp_path):
    """--init_from out_dir/hf: no pretraining; --task FILE (instruction rows) is one more task in the mix,
    its prefix the file's name, scored by ROUGE-L."""
    out, _ = tiny_run
    rows = [{"instruction": "Spell the word backwards.", "input": word, "response": word[::-1]}
            for word in (f"{a}{b}" for a in ("get", "set", "read", "load", "dump", "open", "close", "send")
                         for b in ("_file", "_name", "_item", "_line", "_data", "_path", "_key", "_value"))]
    task_file = tmp_path / "backwards.jsonl"
    task_file.write_text("\n".join(json.dumps(row) for row in rows))
    result = run_train(*tiny_args(tmp_path / "run"), "--init_from", str(out / "hf"), "--tasks", "module",
                       "--task", str(task_file))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrain iter" not in result.stdout and "finetune-scratch iter" in result.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["pretrain"]["init_from"] == str(out / "hf")
    assert {task: row["metric"] for task, row in report["finetune"].items()} == {"module": "accuracy",
                                                                                "backwards": "rouge_l"}
    assert any(sample["input"].startswith("backwards: Spell") for sample in report["samples"])




def test_a_folder_of_compressed_text_and_json_lines_pretrains_and_an_edit_of_it_stops_resume(tmp_path):
    """--data a folder with a .txt.gz and a .jsonl.gz (its text under --text_field body): the BPE is trained on
    every document and the token stream holds each one, an end-of-text token between two. The checkpoint
    records the corpus's fingerprint: once a file changes, --resume refuses to continue on other text."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    documents = write_mixed_corpus(corpus)
    args = [*tiny_args(out), "--data", str(corpus), "--text_field", "body", "--stage", "pretrain"]
    result = run_train(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    sentinels = tuple(f"<extra_id_{i}>" for i in range(train.PRESETS["tiny"]["num_sentinels"]))
    assert_every_document_tokenized(result.stdout, corpus, documents, out / "tokenizer.json", 320,
                                    train.SPECIAL_TOKENS + sentinels)
    assert json.loads((out / "report.json").read_text())["pretrain"]["iters"] == 30
    with gzip.open(corpus / "b_rows.jsonl.gz", "at", encoding="utf-8") as f:
        f.write(json.dumps({"body": "One more row, written after the run."}) + "\n")
    result = run_train(*args, "--resume")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "corpus_fingerprint" in lines[0], result.stderr[-2000:]


def test_bad_input_is_one_line_and_nonzero_exit(tiny_run, tmp_path):
    out, _ = tiny_run

    def one_line_error(*args):
        result = run_train(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        return lines[0]

    assert "unknown preset" in one_line_error("--preset", "nope")
    assert "missing.txt" in one_line_error(*tiny_args(tmp_path), "--data", str(tmp_path / "missing.txt"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    (broken / "pretrain.pt").write_bytes(b"not a checkpoint")
    assert "pretrain.pt" in one_line_error(*tiny_args(broken), "--stage", "finetune")
    (broken / "pretrain.pt").write_bytes((out / "pretrain.pt").read_bytes())
    (broken / "tokenizer.json").write_text("{not json")                         # a corrupt tokenizer
    assert "tokenizer.json" in one_line_error(*tiny_args(broken), "--stage", "finetune")
    (broken / "tokenizer.json").write_text((out / "hf" / "config.json").read_text())   # JSON, not a tokenizer
    assert "tokenizer.json" in one_line_error(*tiny_args(broken), "--resume")
    hf = tmp_path / "hf"
    shutil.copytree(out / "hf", hf)
    (hf / "llmfs_tokenizer.json").unlink()
    (hf / "spiece.model").write_bytes(b"\x0a\x0b")                              # Google's T5 folders have this
    assert "BPE vocabularies only" in one_line_error(*tiny_args(tmp_path / "other"), "--init_from", str(hf))


def test_two_process_ddp_on_cpu(tiny_run, tmp_path):
    """Pretraining and finetuning under torchrun with 2 processes (gloo): each rank trains on its share of
    a step's batch, and rank 0 evaluates and writes the report."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO_ROOT / "06_t5" / "train.py"), "--preset", "tiny", "--device", "cpu",
                             "--out_dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pretrain"]["val_loss"] > 0 and set(report["finetune"]) == {"summarize", "name", "module"}


def test_token_id_outside_the_vocabulary_is_a_clear_error():
    model = t5.T5(t5.T5Config(vocab_size=10, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary"):
        model(torch.tensor([[1, 12]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="token id 10 is outside the vocabulary"):
        model(torch.tensor([[1]]), torch.tensor([[10]]))                    # the decoder's ids too


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_save_pretrained_round_trips_exactly(tmp_path, variant):
    """from_pretrained(save_pretrained(m)) is m: the same config, every tensor bit for bit. The embedding
    is written once (no embed_tokens copies); only v1.1 writes an LM head of its own."""
    model = tiny_model(variant, seed=3, dropout_rate=0.1)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp file
    loaded = t5.T5.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert ("lm_head.weight" in loaded.state_dict()) == (variant == "v1.1")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    """A random T5 of ours, exported, is a T5ForConditionalGeneration with the same logits: v1.0 with its
    tied, rescaled output layer, v1.1 with its gated-GELU FFN and an LM head of its own."""
    transformers = reference("transformers")
    ours = tiny_model(variant, seed=4)
    ours.save_pretrained(tmp_path)
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert theirs.config.feed_forward_proj == ours.config.feed_forward_proj
    lm_head_is_shared = theirs.lm_head.weight.data_ptr() == theirs.shared.weight.data_ptr()
    assert lm_head_is_shared == (variant == "v1.0")
    input_ids, attention_mask, decoder_input_ids = padded_inputs()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids).logits
        got = ours(input_ids, decoder_input_ids, attention_mask)[0]
    diff = (got - expected).abs().max().item()
    print(f"T5 {variant} export: max |ours - transformers| = {diff:.2e}")
    assert diff < 1e-5

"""Tests for 06_t5: the T5 model (v1.0 and v1.1), span corruption, ROUGE-L and an end-to-end run."""

import json
import struct
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, load_module

t5 = load_module("06_t5/model.py")


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
                        (model.shared.weight, 1.0), (model.lm_head.weight, 1.0)):
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


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_logits_match_hugging_face_t5(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gated = variant == "v1.1"
    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   feed_forward_proj="gated-gelu" if gated else "relu",
                                   tie_word_embeddings=not gated, dropout_rate=0.0, decoder_start_token_id=0)
    reference = transformers.T5ForConditionalGeneration(config).eval()
    if gated:
        # Real v1.1 checkpoints have an LM head of their own; recent transformers ties it to the embedding
        # unless it is given its own parameter, which save_pretrained then writes as lm_head.weight.
        reference.lm_head.weight = torch.nn.Parameter(torch.randn(97, 32))
    reference.save_pretrained(tmp_path)
    ours = t5.T5.from_pretrained(tmp_path).eval()
    assert ours.config.tie_word_embeddings == (not gated)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 97, (3, 40), generator=g)                 # 40 > max_distance: far buckets too
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 25:] = 0
    decoder_input_ids = torch.randint(2, 97, (3, 30), generator=g)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask,
                             decoder_input_ids=decoder_input_ids).logits
        for use_sdpa in (True, False):
            ours.config.use_sdpa = use_sdpa
            for module in ours.modules():
                if isinstance(module, t5.T5Attention):
                    module.use_sdpa = use_sdpa
            got = ours(input_ids, decoder_input_ids, attention_mask)[0]
            print(f"{variant} sdpa={use_sdpa}: max |ours - transformers| = {(got - expected).abs().max().item():.3g}")
            torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)
        hf_greedy = reference.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    hf_greedy = [row.tolist()[1:] for row in hf_greedy]                        # drop the start token
    hf_greedy = [row[:row.index(1)] if 1 in row else row for row in hf_greedy]  # cut at EOS (and its padding)
    assert ours.generate(input_ids, attention_mask, max_new_tokens=8) == hf_greedy

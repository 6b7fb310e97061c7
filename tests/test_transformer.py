"""Chapter 03: the encoder-decoder Transformer (model properties, metrics, and one tiny end-to-end run)."""

import gzip
import itertools
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO_ROOT, assert_every_document_tokenized, load_module, write_mixed_corpus

M = load_module("03_transformer/model.py")

PAD, BOS, EOS = 0, 1, 2


def tiny_model(norm_first=False, vocab_size=40, seed=0, **overrides):
    torch.manual_seed(seed)
    config = M.TransformerConfig(vocab_size=vocab_size, d_model=32, n_head=4, n_encoder_layers=2,
                                 n_decoder_layers=2, d_ff=64, dropout=0.0, max_len=64,
                                 norm_first=norm_first, **overrides)
    model = M.Transformer(config).eval()
    with torch.no_grad():                       # sharper distributions than at init, so decoding varies
        model.embed.weight.mul_(4.0)
    return model


# ----------------------------------------------------------------------------------------------------
# positions and embeddings


def test_sinusoidal_positions_follow_the_formula():
    d_model = 16
    pe = M.sinusoidal_positions(50, d_model)
    for i in (0, 1, 7, 49):
        for j in range(d_model // 2):
            angle = i / 10000 ** (2 * j / d_model)
            assert pe[i, 2 * j].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[i, 2 * j + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_one_embedding_matrix_embeds_both_sides_and_projects_the_output():
    model = tiny_model()
    vocab_matrices = [n for n, p in model.named_parameters() if p.shape[0] == model.config.vocab_size]
    assert vocab_matrices == ["embed.weight"]
    ids = torch.tensor([[5, 6, 7]])
    expected = model.embed.weight[ids] * math.sqrt(32) + M.sinusoidal_positions(64, 32)[:3]
    assert torch.allclose(model.embed_tokens(ids), expected, atol=1e-6)
    # the output projection is E^T: nudging one row of E changes that token's logit
    src = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[BOS, 9]])
    before, _ = model(src, tgt)
    with torch.no_grad():
        model.embed.weight[30] += torch.randn(32)   # token 30 appears on neither side
    after, _ = model(src, tgt)
    changed = (after - before).abs().amax(dim=(0, 1)) > 1e-6
    assert changed[30] and changed.sum() == 1


# ----------------------------------------------------------------------------------------------------
# layers against PyTorch's reference implementations


def copy_attention(ours, theirs):
    theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
    theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    theirs.out_proj.weight.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.copy_(ours.out_proj.bias)


def copy_common(ours, theirs, norms):
    theirs.linear1.load_state_dict(ours.ffn.linear1.state_dict())
    theirs.linear2.load_state_dict(ours.ffn.linear2.state_dict())
    for name in norms:
        getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())
    copy_attention(ours.self_attn, theirs.self_attn)


def randomize_norms(layer):
    for module in layer.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.3)
            nn.init.normal_(module.bias, 0.0, 0.3)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = M.EncoderLayer(32, 4, 64, dropout=0.0, norm_first=norm_first).eval()
    randomize_norms(ours)
    theirs = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                        norm_first=norm_first).eval()
    with torch.no_grad():
        copy_common(ours, theirs, ["norm1", "norm2"])
    x = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 3:] = False
    with torch.no_grad():
        got = ours(x, key_padding_mask=mask)
        want = theirs(x, src_key_padding_mask=~mask)          # torch: True = ignore this key
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = M.DecoderLayer(32, 4, 64, dropout=0.0, norm_first=norm_first).eval()
    randomize_norms(ours)
    theirs = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                        norm_first=norm_first).eval()
    with torch.no_grad():
        copy_common(ours, theirs, ["norm1", "norm2", "norm3"])
        copy_attention(ours.cross_attn, theirs.multihead_attn)
    x, memory = torch.randn(3, 6, 32), torch.randn(3, 8, 32)
    tgt_mask = torch.ones(3, 6, dtype=torch.bool)
    tgt_mask[2, 4:] = False
    mem_mask = torch.ones(3, 8, dtype=torch.bool)
    mem_mask[0, 5:] = False
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)          # torch: True = hidden
    with torch.no_grad():
        got = ours(x, memory, memory_padding_mask=mem_mask, tgt_padding_mask=tgt_mask)
        want = theirs(x, memory, tgt_mask=causal, tgt_key_padding_mask=~tgt_mask,
                      memory_key_padding_mask=~mem_mask, tgt_is_causal=True)
    assert torch.allclose(got[tgt_mask], want[tgt_mask], atol=1e-5)


def test_fused_attention_equals_the_written_out_formula():
    torch.manual_seed(0)
    mha = M.MultiHeadAttention(32, 4).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    outputs = []
    for fused in (True, False):
        mha.use_sdpa = fused
        outputs.append((mha(x, is_causal=True), mha(x, memory, key_padding_mask=mask)))
    for fused_out, explicit_out in zip(*outputs):
        assert torch.allclose(fused_out, explicit_out, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_is_causal(norm_first):
    model = tiny_model(norm_first)
    src = torch.randint(3, 40, (2, 8))
    tgt = torch.randint(3, 40, (2, 7))
    logits, _ = model(src, tgt)
    for t in range(6):
        changed = tgt.clone()
        changed[:, t + 1:] = torch.randint(3, 40, (2, 6 - t))  # rewrite the future of position t
        new_logits, _ = model(src, changed)
        assert torch.allclose(logits[:, : t + 1], new_logits[:, : t + 1], atol=1e-5)
        assert not torch.allclose(logits[:, t + 1:], new_logits[:, t + 1:], atol=1e-4)


def test_decoder_reads_the_source_through_cross_attention():
    model = tiny_model()
    src = torch.randint(3, 40, (1, 8))
    tgt = torch.randint(3, 40, (1, 5))
    other_src = src.clone()
    other_src[0, -1] = (src[0, -1] - 3 + 1) % 37 + 3      # one source token differs
    assert not torch.allclose(model(src, tgt)[0], model(other_src, tgt)[0], atol=1e-4)


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_does_not_change_real_tokens(norm_first):
    model = tiny_model(norm_first)
    src = torch.randint(3, 40, (1, 6))
    tgt = torch.randint(3, 40, (1, 4))
    alone, _ = model(src, tgt)
    # the same pair inside a batch, padded on both sides to a longer neighbour's length
    src_batch = torch.full((2, 11), PAD)
    src_batch[0, :6], src_batch[1] = src[0], torch.randint(3, 40, (11,))
    tgt_batch = torch.full((2, 9), PAD)
    tgt_batch[0, :4], tgt_batch[1] = tgt[0], torch.randint(3, 40, (9,))
    src_mask, tgt_mask = (src_batch != PAD).long(), (tgt_batch != PAD).long()
    batched, _ = model(src_batch, tgt_batch, src_mask, tgt_mask)
    assert torch.allclose(alone[0], batched[0, :4], atol=1e-5)
    # and what stands at the padded positions does not matter either
    src_batch[0, 6:] = torch.randint(3, 40, (5,))
    tgt_batch[0, 4:] = torch.randint(3, 40, (5,))
    garbage_in_pads, _ = model(src_batch, tgt_batch, src_mask, tgt_mask)
    assert torch.allclose(alone[0], garbage_in_pads[0, :4], atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# decoding


def sources(batch=4, length=9, vocab=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1 % batch, 5:] = 0
    mask[3 % batch, 2:] = 0
    return src.masked_fill(mask == 0, PAD), mask


def test_cached_decoder_logits_equal_the_full_forward():
    model = tiny_model(norm_first=True)
    src, mask = sources()
    tgt = torch.randint(3, 40, (4, 6))
    full, _ = model(src, tgt, mask)
    memory = model.encode(src, mask)
    cache = []
    steps = [model.decode(tgt[:, t:t + 1], memory, mask, cache=cache) for t in range(6)]
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_cached_generation_equals_uncached(num_beams):
    model = tiny_model()
    src, mask = sources()
    kwargs = dict(bos_id=BOS, eos_id=EOS, max_new_tokens=10, num_beams=num_beams, length_penalty=0.6)
    cached = model.generate(src, mask, **kwargs)
    uncached = model.generate(src, mask, use_cache=False, **kwargs)
    assert cached == uncached
    assert len({tuple(row) for row in cached}) > 1            # the rows differ: decoding reads the source


def test_greedy_takes_the_argmax_and_stops_at_eos():
    model = tiny_model(seed=3)
    src, mask = sources(batch=3)
    out = model.generate(src, mask, bos_id=BOS, eos_id=EOS, max_new_tokens=8)
    for b, row in enumerate(out):
        assert EOS not in row and len(row) <= 8
        prefix = torch.tensor([[BOS] + row])
        logits, _ = model(src[b:b + 1], prefix, mask[b:b + 1])
        assert logits[0, :-1].argmax(-1).tolist() == row              # each token was the argmax
        if len(row) < 8:
            assert logits[0, -1].argmax().item() == EOS               # and it stopped on EOS


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_model(seed=2)
    src, mask = sources()
    memory = model.encode(src, mask)
    greedy = model._greedy(memory, mask, BOS, EOS, 10, use_cache=True)
    beam1 = model._beam_search(memory, mask, BOS, EOS, 10, 1, 0.0, use_cache=True)
    assert greedy == beam1


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_best_scoring_sequence(alpha):
    """With a beam as wide as the whole search tree, beam search must return the exact optimum of
    score(Y) = log p(Y|X) / ((5 + |Y|) / 6)^alpha, found here by enumerating every sequence."""
    vocab, max_new = 5, 3
    model = tiny_model(vocab_size=vocab, seed=4)
    src, mask = sources(batch=2, vocab=vocab)
    tokens = [t for t in range(vocab) if t != EOS]
    for b in range(2):
        # every hypothesis: up to max_new - 1 tokens then EOS, or max_new tokens cut off without EOS
        ended = [list(body) + [EOS] for n in range(max_new) for body in itertools.product(tokens, repeat=n)]
        cut = [list(body) for body in itertools.product(tokens, repeat=max_new)]
        hypotheses = ended + cut
        # log p(Y|X) of every hypothesis in one teacher-forced batch (right padding: causal mask suffices)
        targets = torch.tensor([seq + [PAD] * (max_new - len(seq)) for seq in hypotheses])
        decoder_inputs = torch.cat([torch.full((len(hypotheses), 1), BOS), targets[:, :-1]], dim=1)
        logits, _ = model(src[b:b + 1].expand(len(hypotheses), -1), decoder_inputs,
                          mask[b:b + 1].expand(len(hypotheses), -1))
        token_logp = F.log_softmax(logits, -1).gather(2, targets[:, :, None]).squeeze(2)
        lengths = torch.tensor([len(seq) for seq in hypotheses])
        real = torch.arange(max_new)[None, :] < lengths[:, None]
        scores = (token_logp * real).sum(1) / ((5 + lengths) / 6) ** alpha
        best = [t for t in hypotheses[scores.argmax().item()] if t != EOS]
        got = model.generate(src[b:b + 1], mask[b:b + 1], bos_id=BOS, eos_id=EOS,
                             max_new_tokens=max_new, num_beams=16, length_penalty=alpha)
        assert got[0] == best


# ----------------------------------------------------------------------------------------------------
# loss


def test_label_smoothed_loss_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = -100
    for eps in (0.0, 0.1, 0.3):
        ours = M.label_smoothed_cross_entropy(logits, labels, eps)
        theirs = F.cross_entropy(logits.view(-1, 11), labels.view(-1), label_smoothing=eps)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_model_learns_to_copy():
    """A few hundred steps on a copy task: the loss must fall and greedy decoding must copy."""
    torch.manual_seed(0)
    config = M.TransformerConfig(vocab_size=12, d_model=32, n_head=4, n_encoder_layers=1,
                                 n_decoder_layers=1, d_ff=64, dropout=0.0, max_len=16, norm_first=True)
    model = M.Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(250):
        src = torch.randint(3, 12, (32, 5))
        tgt = torch.cat([torch.full((32, 1), BOS), src, torch.full((32, 1), EOS)], dim=1)
        _, loss = model(src, tgt[:, :-1], labels=tgt[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 < losses[0]
    model.eval()
    src = torch.randint(3, 12, (8, 5))
    assert model.generate(src, bos_id=BOS, eos_id=EOS, max_new_tokens=8, num_beams=3) == src.tolist()


# ----------------------------------------------------------------------------------------------------
# train.py: noise, schedule, metrics (hand-checked), and one tiny end-to-end run

T = load_module("03_transformer/train.py")


def noise_config(**rates):
    cfg = T.Config()
    cfg.mask_rate = cfg.delete_rate = 0.0
    cfg.shuffle_distance = 0
    for key, value in rates.items():
        setattr(cfg, key, value)
    return cfg


def clean_windows(B=64, L=40):
    return torch.arange(B * L).view(B, L) + 10                 # all ids distinct, none is the mask id


def test_corrupt_without_noise_is_the_identity():
    x = clean_windows()
    assert T.corrupt(x, noise_config(), mask_id=4, generator=torch.Generator().manual_seed(0)) == x.tolist()


def test_local_shuffle_moves_no_token_further_than_k():
    x = clean_windows()
    noisy = T.corrupt(x, noise_config(shuffle_distance=3), 4, torch.Generator().manual_seed(0))
    moved = 0
    for row, clean in zip(noisy, x.tolist()):
        assert sorted(row) == clean                            # a permutation
        shifts = [abs(i - clean.index(t)) for i, t in enumerate(row)]
        assert max(shifts) <= 3
        moved += sum(s > 0 for s in shifts)
    assert moved > 0.3 * x.numel()


def test_span_deletion_keeps_order_and_deletes_about_the_rate():
    x = clean_windows(B=200)
    noisy = T.corrupt(x, noise_config(delete_rate=0.2), 4, torch.Generator().manual_seed(0))
    for row, clean in zip(noisy, x.tolist()):
        assert row == sorted(row) and set(row) <= set(clean)  # a subsequence
    deleted = 1 - sum(map(len, noisy)) / x.numel()
    assert 0.15 < deleted < 0.25


def test_masking_replaces_about_the_rate_and_nothing_else():
    x = clean_windows(B=200)
    noisy = torch.tensor(T.corrupt(x, noise_config(mask_rate=0.15), 4, torch.Generator().manual_seed(0)))
    masked = noisy == 4
    assert 0.12 < masked.float().mean().item() < 0.18
    assert torch.equal(noisy[~masked], x[~masked])


def test_schedule_warms_up_then_decays():
    lr = [T.get_lr(it, 1.0, 10, 100, "cosine", 0.1) for it in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:])) and lr[-1] == pytest.approx(0.1)
    inv = [T.get_lr(it, 1.0, 10, 100, "inverse_sqrt", 0.1) for it in range(100)]
    assert inv[9] == pytest.approx(1.0) and inv[39] == pytest.approx(0.5)   # sqrt(10 / 40)


def test_exact_match_and_char_f1_on_hand_checked_cases():
    assert T.exact_match(["a", " b ", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)
    assert T.char_f1("abc", "abd") == pytest.approx(2 / 3)                # P = R = 2/3
    assert T.char_f1("aab", "ab") == pytest.approx(0.8)                   # P = 2/3, R = 1
    assert T.char_f1("read_file", "readfile") == pytest.approx(2 * (8 / 9) / (1 + 8 / 9))
    assert T.char_f1("xyz", "abc") == 0.0
    assert T.char_f1("", "") == 1.0 and T.char_f1("", "a") == 0.0


def test_corpus_bleu_on_hand_checked_cases():
    assert T.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # p1..p4 = 5/6, 3/5, 2/4, 1/3 (counted by hand), equal lengths so BP = 1
    assert T.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # Papineni et al.'s clipping example: "the" counts at most twice
    assert T.corpus_bleu(["the the the the the the the"], ["the cat is on the mat"], max_n=1) == pytest.approx(2 / 7)
    # every n-gram matches but the hypothesis is short: BP = exp(1 - 6/4)
    assert T.corpus_bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(-0.5))
    # corpus-level: counts are summed before dividing (4/5 unigrams, 2/3 bigrams), not averaged per sentence
    assert T.corpus_bleu(["a b c", "x y"], ["a b d", "x y"], max_n=2) == pytest.approx(math.sqrt(4 / 5 * 2 / 3))
    assert T.corpus_bleu(["a b c d"], ["e f g h"]) == 0.0
    # characters as tokens: unigrams 2/3, bigrams 1/2
    assert T.corpus_bleu(["abc"], ["abd"], max_n=2, unit="char") == pytest.approx(math.sqrt(2 / 3 * 1 / 2))


def test_train_stage_stopped_and_resumed_ends_with_the_same_weights(tmp_path):
    """A SIGINT mid-stage saves a checkpoint and exits 130; --resume then ends with the very weights an
    uninterrupted run reaches (dropout 0.1: the saved RNG state matters)."""
    import os
    import signal

    from common.checkpoint import load_checkpoint
    from common.config import parse_config
    from common.runtime import setup

    rt = setup("cpu", seed=0)

    def run(out, interrupt_at=None, resume=False):
        cfg = parse_config(T.Config, T.PRESETS, ["--preset", "tiny", "--log_interval", "100"] +
                           (["--resume"] if resume else []))
        torch.manual_seed(0)
        model = M.Transformer(M.TransformerConfig(vocab_size=30, d_model=16, n_head=2, n_encoder_layers=1,
                                                  n_decoder_layers=1, d_ff=32, dropout=0.1, max_len=16))

        def get_batch(it):
            if it == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)            # what Ctrl-C sends
            g = torch.Generator().manual_seed(it)
            src, tgt = torch.randint(3, 30, (4, 6), generator=g), torch.randint(3, 30, (4, 5), generator=g)
            return {"input_ids": src, "decoder_input_ids": tgt[:, :-1], "labels": tgt[:, 1:]}

        def evaluate(m):
            with torch.no_grad():
                return m(**get_batch(10_000))[1].item()

        optimizer = T.configure_optimizer(model, 1e-2, 0.01)
        T.train_stage("pretrain", model, optimizer, get_batch, evaluate, 12, 1e-2, 2, "cosine", 5, out / "ckpt.pt",
                      cfg, rt, tokens_per_iter=44, flops=1.0, extra_state={})
        return model

    straight = run(tmp_path / "straight")
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path / "cut", interrupt_at=7)
    assert stopped.value.code == 130
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["iter"] == 8        # step 7 finished, then saved
    resumed = run(tmp_path / "cut", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def tiny_command(out):
    return [sys.executable, str(REPO_ROOT / "03_transformer" / "train.py"), "--preset", "tiny",
            "--device", "cpu", "--out_dir", str(out), "--log_interval", "1"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}      # tiny matrices: threads only add overhead


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    command = tiny_command(out)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, command, ONE_THREAD, result.stdout


def test_tiny_run_reports_learns_and_checkpoints(tiny_run):
    out, _, _, stdout = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert report["chapter"] == "03_transformer"
    row = report["finetune"]["docstring-name"]
    for key in ("metric", "pretrained", "scratch", "baseline", "seconds"):
        assert key in row
    for variant in ("pretrained", "scratch"):
        for search in ("greedy", "beam"):
            assert set(row["details"][variant][search]) == {"exact_match", "char_f1", "bleu"}
    assert len(report["samples"]) == 2 and "reference" in report["samples"][0]
    # the loss went down: the first logged training loss vs the final validation loss
    first = float(stdout.split("pretrain iter  1/30 | loss ")[1].split()[0])
    assert report["pretrain"]["val_loss"] < first - 0.5
    assert "exact_match" in stdout and "samples from the test split" in stdout
    # the checkpoints load into a model that decodes, and name the tokenizer saved beside them
    from common.checkpoint import load_checkpoint
    from common.tokenizer import BPETokenizer
    fingerprint = BPETokenizer.load(out / "tokenizer.json").fingerprint
    for name in ("pretrain.pt", "finetune-pretrained.pt", "finetune-scratch-best.pt"):
        ckpt = load_checkpoint(out / name)
        model = M.Transformer(M.TransformerConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        assert ckpt["tokenizer"] == fingerprint
    assert load_checkpoint(out / "pretrain.pt")["iter"] == 30
    assert model.eval().generate(torch.tensor([[5, 6, 7]]), bos_id=BOS, eos_id=EOS, max_new_tokens=3)
    assert json.loads((out / "run.json").read_text())["config"]["d_model"] == 32


def without_timings(row):
    """A report section without the figures that differ from run to run (seconds, tokens per second)."""
    if isinstance(row, dict):
        return {k: without_timings(v) for k, v in row.items() if "second" not in k}
    return row


def test_tiny_run_resume_skips_finished_stages_and_reproduces_the_report(tiny_run):
    out, command, env, _ = tiny_run
    before = json.loads((out / "report.json").read_text())
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrain: resumed from" in result.stdout and "at iter 30/30" in result.stdout
    assert "pretrain iter" not in result.stdout                     # nothing left to train
    after = json.loads((out / "report.json").read_text())
    assert after["pretrain"]["val_loss"] == before["pretrain"]["val_loss"]
    assert (without_timings(after["finetune"]["docstring-name"]["details"])
            == without_timings(before["finetune"]["docstring-name"]["details"]))


def interrupt(command, stage, at_iter):
    """Run `command`, press Ctrl-C once a progress line of `stage` shows iteration `at_iter` or later;
    check the stop: exit 130, the one line saying where the checkpoint is, no traceback."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    for line in process.stdout:
        if line.startswith(f"{stage} iter") and int(line.split()[2].split("/")[0]) >= at_iter:
            process.send_signal(signal.SIGINT)
            break
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 130, errors[-2000:]
    assert "interrupted: saved" in output and "continue with --resume" in output and "Traceback" not in errors


def test_ctrl_c_twice_then_resume_ends_exactly_where_an_uninterrupted_run_ends(tiny_run, tmp_path):
    """Stopped in pretraining, resumed, stopped again in finetuning, resumed: the same weights and the same
    report as the uninterrupted run (batches are a function of the step; optimizer, RNG, schedule
    position and best-val bookkeeping are checkpointed)."""
    from common.checkpoint import load_checkpoint
    out, _, _, _ = tiny_run
    command = tiny_command(tmp_path)
    interrupt(command, "pretrain", 12)
    assert 12 <= load_checkpoint(tmp_path / "pretrain.pt")["iter"] < 30
    interrupt(command + ["--resume"], "finetune-pretrained", 7)
    assert 7 <= load_checkpoint(tmp_path / "finetune-pretrained.pt")["iter"] < 20
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("pretrain.pt", "finetune-pretrained-best.pt", "finetune-scratch-best.pt"):
        straight, resumed = load_checkpoint(out / name)["model"], load_checkpoint(tmp_path / name)["model"]
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (name, key)
    straight, resumed = (json.loads((folder / "report.json").read_text()) for folder in (out, tmp_path))
    assert without_timings(resumed["pretrain"]) == without_timings(straight["pretrain"])
    assert without_timings(resumed["finetune"]) == without_timings(straight["finetune"])


def test_init_from_finetunes_a_finished_run_on_instruction_rows(tiny_run, tmp_path):
    """--init_from a run folder: no pretraining; a task file of instruction rows is accepted (instruction +
    input -> response); a second task in the same folder adds its row to the report."""
    out, _, env, _ = tiny_run
    rows = [{"instruction": "Spell the word backwards.", "input": word, "response": word[::-1]}
            for word in (f"{a}{b}" for a in ("get", "set", "read", "load", "dump", "open", "close", "send")
                         for b in ("_file", "_name", "_item", "_line", "_data", "_path", "_key", "_value"))]
    task_file = tmp_path / "backwards.jsonl"
    task_file.write_text("\n".join(json.dumps(row) for row in rows))
    finetuned = tmp_path / "finetuned"
    command = tiny_command(finetuned) + ["--init_from", str(out), "--task", str(task_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrain iter" not in result.stdout and "finetune-scratch iter" in result.stdout
    report = json.loads((finetuned / "report.json").read_text())
    assert report["pretrain"]["init_from"] == str(out / "pretrain.pt")
    assert report["pretrain"]["val_loss"] == json.loads((out / "report.json").read_text())["pretrain"]["val_loss"]
    assert report["finetune"]["backwards.jsonl"]["test_examples"] > 0
    result = subprocess.run(tiny_command(finetuned) + ["--init_from", str(out), "--task", "docstring-summary"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(json.loads((finetuned / "report.json").read_text())["finetune"]) == {"backwards.jsonl", "docstring-summary"}
    # pretraining into a folder that holds the finetunings of another run's model would mix two runs: refused
    result = subprocess.run(tiny_command(finetuned) + ["--stage", "pretrain"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2 and "--out_dir" in result.stderr and len(result.stderr.strip().splitlines()) == 1




def test_a_folder_of_compressed_text_and_json_lines_pretrains_and_an_edit_of_it_stops_resume(tmp_path):
    """--data a folder with a .txt.gz and a .jsonl.gz (its text under --text_field body): the BPE is trained on
    every document and the token stream holds each one, an end-of-text token between two. The checkpoint
    records the corpus's fingerprint: once a file changes, --resume refuses to continue on other text."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    documents = write_mixed_corpus(corpus)
    command = tiny_command(out) + ["--data", str(corpus), "--text_field", "body", "--stage", "pretrain"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_every_document_tokenized(result.stdout, corpus, documents, out / "tokenizer.json", 300, T.SPECIAL_TOKENS)
    assert json.loads((out / "report.json").read_text())["pretrain"]["iters"] == 30
    with gzip.open(corpus / "b_rows.jsonl.gz", "at", encoding="utf-8") as f:
        f.write(json.dumps({"body": "One more row, written after the run."}) + "\n")
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "corpus_fingerprint" in lines[0], result.stderr[-2000:]


def test_bad_input_is_one_line_and_nonzero_exit(tiny_run, tmp_path):
    out, command, env, _ = tiny_run

    def one_line_error(folder, *args):
        result = subprocess.run(tiny_command(folder) + list(args), capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        return lines[0]

    # a corrupt pretraining checkpoint, read by --stage finetune
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pretrain.pt").write_bytes(b"not a checkpoint")
    assert "pretrain.pt" in one_line_error(broken, "--stage", "finetune")
    # a real checkpoint beside a corrupt tokenizer, and beside another run's tokenizer
    (broken / "pretrain.pt").write_bytes((out / "pretrain.pt").read_bytes())
    (broken / "tokenizer.json").write_text("{not json")
    assert "tokenizer.json" in one_line_error(broken, "--stage", "finetune")
    assert "tokenizer.json" in one_line_error(tmp_path / "other", "--init_from", str(broken / "pretrain.pt"))
    from common.tokenizer import BPETokenizer
    BPETokenizer.train("some other text " * 50, 300, special_tokens=T.SPECIAL_TOKENS).save(broken / "tokenizer.json")
    assert "not the tokenizer" in one_line_error(broken, "--stage", "finetune")
    # an unfinished pretraining is not finetuned silently
    ckpt = torch.load(out / "pretrain.pt", weights_only=True)
    ckpt["iter"] = 12
    torch.save(ckpt, broken / "pretrain.pt")
    (broken / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    assert "unfinished" in one_line_error(broken, "--stage", "finetune")
    # an unknown preset
    result = subprocess.run([sys.executable, str(REPO_ROOT / "03_transformer" / "train.py"), "--preset", "huge"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "huge" in result.stderr


def test_token_id_outside_the_vocabulary_is_a_clear_error():
    model = M.Transformer(M.TransformerConfig(vocab_size=10, d_model=16, n_head=2, n_encoder_layers=1,
                                              n_decoder_layers=1, d_ff=16, max_len=8))
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary"):
        model(torch.tensor([[1, 12]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="token id -3 is outside the vocabulary"):
        model(torch.tensor([[1, 2]]), torch.tensor([[-3]]))

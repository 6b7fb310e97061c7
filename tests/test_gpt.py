"""05_gpt: the model (causality, the two attention paths, the KV cache, batched generation, sampling
filters, the optimizer groups, loading Hugging Face GPT-2 folders) and the recipe (the tiny run does every
stage, resumes exactly after Ctrl-C, runs under 2-process DDP, masks prompt tokens, rejects bad input with
one line)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, load_module, reference

gpt = load_module("05_gpt/model.py")

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: thread start-up and sync would cost more than the arithmetic, and a
    lot more when the 2 cores are shared. Restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def make_model(attn_impl="sdpa", seed=0, **overrides):
    """A tiny GPT with weights large enough that the logits are far from uniform."""
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(**{**TINY, "attn_impl": attn_impl, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def same_weights(model, attn_impl):
    other = gpt.GPT(gpt.GPTConfig(**{**model.config.__dict__, "attn_impl": attn_impl}))
    other.load_state_dict(model.state_dict())
    return other.eval()


def random_ids(B, T, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- configuration and forward

def test_config_rejects_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match="divisible"):
        gpt.GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attn_impl"):
        gpt.GPTConfig(attn_impl="flash")


def test_forward_shapes_tied_head_and_initial_loss_near_log_vocab():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**TINY))
    idx = random_ids(3, 10)
    logits, loss = model(idx, targets=random_ids(3, 10, seed=2))
    assert logits.shape == (3, 10, TINY["vocab_size"])
    assert model.lm_head.weight is model.transformer.wte.weight
    # N(0, 0.02) weights give nearly uniform predictions: loss ~ ln(V)
    assert abs(loss.item() - math.log(TINY["vocab_size"])) < 0.1
    assert model(idx)[1] is None


def test_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=2, n_embd=128))
    resid_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - resid_std) < 0.1 * resid_std, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name


def test_loss_ignores_positions_marked_minus_100():
    model = make_model()
    idx, targets = random_ids(2, 12), random_ids(2, 12, seed=3)
    targets[:, :5] = -100  # e.g. the prompt of an instruction example
    logits, loss = model(idx, targets=targets)
    by_hand = F.cross_entropy(logits[:, 5:].reshape(-1, TINY["vocab_size"]), targets[:, 5:].reshape(-1))
    assert torch.allclose(loss, by_hand)


def test_return_hidden_gives_the_states_the_head_reads():
    model = make_model()
    idx = random_ids(2, 9)
    logits, _, hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 9, TINY["n_embd"])
    assert torch.allclose(model.lm_head(hidden), logits)
    assert torch.equal(model.forward_hidden(idx), hidden)


def test_clear_errors_for_too_long_sequences_and_out_of_range_ids():
    model = make_model()
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(random_ids(1, 33))
    with pytest.raises(ValueError, match=r"token id 50 .*vocab_size 50"):
        model(torch.tensor([[1, 50, 2]]))
    with pytest.raises(ValueError, match=r"token id -1 .*vocab_size 50"):
        model(torch.tensor([[1, -1, 2]]))
    cache = gpt.KVCache(TINY["n_layer"])
    model(random_ids(1, 30), cache=cache)
    with pytest.raises(ValueError, match=r"30 cached \+ 3 new"):
        model(random_ids(1, 3), cache=cache)


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_causality_changing_a_future_token_leaves_earlier_logits_unchanged(attn_impl):
    model = make_model(attn_impl)
    idx = random_ids(2, 16)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % TINY["vocab_size"]
    before, after = model(idx)[0], model(changed)[0]
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the change is visible from position 9 on


def test_sdpa_path_equals_explicit_path():
    model = make_model("sdpa")
    explicit = same_weights(model, "explicit")
    idx = random_ids(3, 20)
    assert torch.allclose(model(idx)[0], explicit(idx)[0], atol=1e-5)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :7] = 0  # a left-padded row
    a, b = model(idx, attention_mask=mask)[0], explicit(idx, attention_mask=mask)[0]
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)
    # with a cache: a prefill of 12, then a chunk of 8 that is causal within itself
    outputs = []
    for m in (model, explicit):
        cache = gpt.KVCache(TINY["n_layer"])
        m(idx[:, :12], cache=cache)
        outputs.append(m(idx[:, 12:], cache=cache)[0])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_cached_forward_in_chunks_equals_full_forward(attn_impl):
    model = make_model(attn_impl)
    idx = random_ids(2, 20)
    full = model(idx)[0]
    cache = gpt.KVCache(TINY["n_layer"])
    pieces = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:12], cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_left_padded_rows_give_the_same_logits_as_unpadded(attn_impl):
    model = make_model(attn_impl)
    short = random_ids(1, 6, seed=4)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 6])
    alone = model(short)[0]
    batched = model(padded, attention_mask=mask)[0]
    assert torch.allclose(batched[:, 4:], alone, atol=1e-5)


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_cached_generation_equals_uncached_greedy_and_sampled(attn_impl):
    model = make_model(attn_impl)
    prompt = random_ids(2, 5)
    greedy = [model.generate(prompt, 20, temperature=0, use_cache=c) for c in (True, False)]
    assert greedy[0].shape == (2, 25) and torch.equal(greedy[0], greedy[1])
    sampled = [model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.95, use_cache=c,
                              generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    other_seed = model.generate(prompt, 20, use_cache=True, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other_seed, sampled[0])  # the samples do depend on the generator


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    model = make_model()
    prompts = [random_ids(1, 3, seed=5)[0], random_ids(1, 8, seed=6)[0]]
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, 8 - len(p):], mask[row, 8 - len(p):] = p, 1
    for use_cache in (True, False):
        out = model.generate(batch, 12, temperature=0, attention_mask=mask, use_cache=use_cache)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], 12, temperature=0)
            assert torch.equal(out[row, -12:], alone[0, -12:]), (use_cache, row)


def first_index(row, token_id, default):
    hits = (row == token_id).nonzero()
    return hits[0].item() if len(hits) else default


def test_generation_stops_when_every_row_has_produced_eos():
    model = make_model()
    prompt = random_ids(2, 4, seed=9)
    N = 15

    def sample(eos_id=None):  # the same generator state: eos handling must not change the draws
        out = model.generate(prompt, N, eos_id=eos_id, generator=torch.Generator().manual_seed(3))
        return out[:, 4:]

    free = sample()
    # an eos that row 0 samples before row 1 does, and that row 0 would not have repeated on its own
    candidates = [t for t in free[0].tolist()
                  if first_index(free[0], t, N) < first_index(free[1], t, N)
                  and (free[0, first_index(free[0], t, N):] != t).any()]
    assert candidates, "test setup: pick another seed"
    eos_id = candidates[0]
    out = sample(eos_id)
    stops = [first_index(row, eos_id, N) for row in free]
    assert out.size(1) == min(N, max(stops) + 1)
    for row, stop in enumerate(stops):
        assert torch.equal(out[row, :stop + 1], free[row, :stop + 1][:out.size(1)])
        assert torch.all(out[row, stop:] == eos_id)  # a finished row keeps emitting eos
    single = model.generate(prompt[:1], N, eos_id=eos_id, generator=torch.Generator().manual_seed(3))
    assert single.size(1) == 4 + stops[0] + 1


def test_context_longer_than_block_size_slides_without_cache_and_errors_with_cache():
    model = make_model()
    prompt = random_ids(1, 30)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(prompt, 5, temperature=0, use_cache=True)
    out = model.generate(prompt, 5, temperature=0, use_cache=False)
    assert out.shape == (1, 35)
    for t in range(30, 35):  # each new token is the argmax given the last block_size tokens
        context = out[:, max(0, t - 32):t]
        assert out[0, t].item() == model(context)[0][0, -1].argmax().item()


def kept(filtered):
    return filtered.isfinite()[0].tolist()


def test_filters_keep_only_the_allowed_tokens():
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0]])
    assert kept(gpt.top_k_filter(logits, 2)) == [True, False, True, False]
    assert kept(gpt.top_k_filter(logits, 10)) == [True] * 4
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # probabilities 0.5, 0.3, 0.15, 0.05
    assert kept(gpt.top_p_filter(logits, 0.7)) == [True, True, False, False]
    assert kept(gpt.top_p_filter(logits, 0.5)) == [True, False, False, False]
    assert kept(gpt.top_p_filter(logits, 0.81)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # the filter scatters its decision back to the original order
    assert kept(gpt.top_p_filter(shuffled, 0.7)) == [False, True, False, True]


def test_sampling_with_top_k_and_top_p_draws_only_allowed_tokens():
    model = make_model()
    prompt = random_ids(1, 6).repeat(400, 1)
    logits = model(prompt[:1])[0][0, -1]
    generator = torch.Generator().manual_seed(0)
    temperature = 3.0  # flattens the distribution, so an unfiltered sampler would stray outside the sets

    def draw(**filters):
        out = model.generate(prompt, 1, temperature=temperature, generator=generator, **filters)
        return set(out[:, -1].tolist())

    top3 = set(torch.topk(logits, 3).indices.tolist())
    drawn = draw(top_k=3)
    assert drawn <= top3 and len(drawn) > 1
    probs = F.softmax(logits / temperature, dim=-1)
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    nucleus = set(order[:nucleus_size].tolist())
    drawn = draw(top_p=0.5)
    assert drawn <= nucleus and len(drawn) > 1
    assert not draw() <= nucleus


def test_sampling_follows_the_temperature():
    model = make_model()
    prompt = random_ids(1, 6).repeat(3000, 1)
    logits = model(prompt[:1])[0][0, -1]
    top = logits.argmax().item()
    expected = {t: F.softmax(logits / t, dim=-1)[top].item() for t in (0.5, 2.0)}
    assert expected[0.5] - expected[2.0] > 0.1  # test setup: the two temperatures are distinguishable
    for temperature, p_top in expected.items():
        out = model.generate(prompt, 1, temperature=temperature, generator=torch.Generator().manual_seed(1))
        assert abs((out[:, -1] == top).float().mean().item() - p_top) < 0.04  # ~4 standard deviations


def test_mlp_is_gelu_tanh_ffn():
    mlp = make_model().transformer.h[0].mlp
    x = torch.randn(2, 3, TINY["n_embd"])
    u = mlp.c_fc(x)
    gelu_tanh = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    assert torch.allclose(mlp(x), mlp.c_proj(gelu_tanh), atol=1e-6)


def test_dropout_only_in_training_mode():
    model = make_model(dropout=0.2).train()
    idx = random_ids(2, 8)
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_generate_restores_training_mode_and_rejects_bad_settings():
    model = make_model(dropout=0.3).train()
    prompt = random_ids(1, 3)
    first, second = (model.generate(prompt, 8, temperature=0) for _ in range(2))
    assert model.training
    assert torch.equal(first, second)  # dropout is off while generating
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(random_ids(1, 3), 2, **bad)


# ---------------------------------------------------------------- optimizer and accounting

def test_configure_optimizers_decays_only_matrices_and_skips_frozen():
    model = make_model()
    model.transformer.wpe.weight.requires_grad_(False)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)  # tied wte counted once


def test_parameter_and_flop_counts():
    model = make_model()
    C, L, V, T = TINY["n_embd"], TINY["n_layer"], TINY["vocab_size"], TINY["block_size"]
    per_block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    total = V * C + T * C + L * per_block + 2 * C
    assert model.num_parameters(non_embedding=False) == total
    assert model.num_parameters() == total - T * C
    assert model.num_flops_per_token() == 6 * (total - T * C) + 12 * L * C * T


# ---------------------------------------------------------------- loading Hugging Face GPT-2 folders

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def write_gpt2_folder(model, folder, prefix="transformer.", with_mask_buffers=False):
    """Export `model` as Hugging Face would: config.json + pytorch_model.bin, Conv1D weights (in, out)."""
    cfg = model.config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", activation_function="gelu_new", n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, n_positions=cfg.block_size, vocab_size=cfg.vocab_size, layer_norm_epsilon=1e-5)))
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.t().contiguous() if name.endswith(CONV1D) else tensor.clone()
        state[prefix + name.removeprefix("transformer.")] = tensor
    if with_mask_buffers:
        for i in range(cfg.n_layer):
            T = cfg.block_size
            state[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    torch.save(state, folder / "pytorch_model.bin")
    return state


@pytest.mark.parametrize("prefix,with_mask_buffers", [("transformer.", False), ("", True)])
def test_from_pretrained_hand_made_folder_gives_identical_logits(tmp_path, prefix, with_mask_buffers):
    source = make_model()
    write_gpt2_folder(source, tmp_path, prefix, with_mask_buffers)
    loaded = gpt.GPT.from_pretrained(tmp_path).eval()
    idx = random_ids(2, 16)
    assert torch.equal(loaded(idx)[0], source(idx)[0])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_from_pretrained_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config.json"):
        gpt.GPT.from_pretrained(tmp_path)
    state = write_gpt2_folder(make_model(), tmp_path)
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.1.mlp.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\].*mlp.extra"):
        gpt.GPT.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="neither"):
        gpt.GPT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if the package were not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        gpt.GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_from_pretrained_matches_transformers_gpt2(tmp_path, file_format):
    transformers = reference("transformers")
    if file_format == "safetensors":
        pytest.importorskip("safetensors")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                                     bos_token_id=0, eos_token_id=0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # move the logits away from uniform
    if file_format == "safetensors":
        reference.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:  # the older format; recent transformers only writes safetensors, so save the state dict
        config.save_pretrained(tmp_path)
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    idx = torch.randint(0, 100, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(idx).logits
    for attn_impl in ("sdpa", "explicit"):
        ours = gpt.GPT.from_pretrained(tmp_path, attn_impl=attn_impl).eval()
        assert (ours(idx)[0] - expected).abs().max().item() < 1e-5, attn_impl


# ------------------------------------------------------------------------------------------ train.py
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

"""07_peft: every method starts at the base model, trains only its own parameters, counts them by its
formula, saves and loads adapter-only weights, on GPT-2 and on the modern decoder (RMSNorm, RoPE, SwiGLU,
grouped-query attention); LoRA merges exactly; prefix tuning handles padding; and each method's output
equals its formula computed by hand, and the peft library's (on a tiny GPT-2 and a tiny Llama) where the
two map exactly; train.py runs end to end (report, checkpoint, Ctrl-C, --resume, bad input, a Hugging
Face Llama folder, chapter 05's base by default)."""

import json
import math
import random
import shutil

import pytest
import torch

from conftest import REPO_ROOT, interrupt_after_iteration, load_module, reference

peft = load_module("07_peft/model.py")
TRAIN = REPO_ROOT / "07_peft" / "train.py"

TINY = dict(block_size=40, vocab_size=60, n_layer=2, n_head=2, n_embd=32)
L, C = TINY["n_layer"], TINY["n_embd"]
# The modern decoder at the same size: Llama's switches, 4 query heads sharing 2 K/V heads (d_k 8, so
# k and v are 16 rows of c_attn's 64), a SwiGLU of width 48, an untied head.
LLAMA = dict(TINY, n_head=4, n_kv_head=2, norm="rmsnorm", pos="rope", mlp="swiglu", intermediate_size=48, bias=False,
             tie_word_embeddings=False)
ARCHS = {"gpt2": TINY, "llama": LLAMA}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up would cost more than the arithmetic on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_base(seed=0, arch="gpt2"):
    """A tiny GPT-2 (or Llama: `arch`) with weights large enough that its outputs are far from uniform."""
    torch.manual_seed(seed)
    model = peft.GPT(peft.GPTConfig(**ARCHS[arch]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def fresh_copy(model):
    other = peft.GPT(model.config)
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


# ------------------------------------------------------- each method against its formula, by hand
# `formula_logits` is the GPT of chapter 05 written out once more from its equations with plain tensor
# operations (no nn.Module of either model file), with a slot for each method's change. Each test below
# sets a method's parameters to arbitrary values (B != 0, l != 1, ...) and checks the model's logits
# against these formulas, so a wrong constant (alpha instead of alpha / r) or a wrong tensor (q rescaled
# instead of k) fails.
def layer_norm(h, weight, bias, eps=1e-5):
    """LN(h) = (h - mean) / sqrt(var + eps) * g + b, over the last dimension."""
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(h):
    """GELU(h) ~ 0.5 h (1 + tanh(sqrt(2 / pi) (h + 0.044715 h^3))), GPT-2's approximation."""
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))


def bottleneck(h, down_w, down_b, up_w, up_b):
    """W_up f(W_down h + b_down) + b_up: the adapter's residual branch."""
    return gelu_tanh(h @ down_w.T + down_b) @ up_w.T + up_b


def formula_logits(base, idx, weights=None, soft_prompt=None, prefix=None, l_k=None, l_v=None, l_ff=None,
                   adapters=None):
    """The logits of the GPT `base` for idx (B, T), from the formulas, with these changes:

    weights      {name: matrix} replacing base weights (LoRA: W0 + (alpha / r) B A)
    soft_prompt  (n, C) embeddings put before the tokens'; their outputs are dropped (prompt tuning)
    prefix       per layer (P_K, P_V), each (nh, P, hs), put before the keys and values; the tokens
                 then sit at positions P .. P + T - 1 (prefix tuning)
    l_k, l_v     per layer (C,): K <- l_k * K, V <- l_v * V; l_ff per layer (4C,): hidden <- l_ff * hidden
    adapters     per layer (attention adapter, MLP adapter), each (W_down, b_down, W_up, b_up):
                 a sublayer's output h becomes h + W_up f(W_down h + b_down) + b_up
    """
    W = {**base.state_dict(), **(weights or {})}
    cfg = base.config
    B, nh, C = idx.size(0), cfg.n_head, cfg.n_embd
    hs = C // nh
    x = W["transformer.wte.weight"][idx]                                      # (B, T, C)
    n = 0 if soft_prompt is None else soft_prompt.size(0)
    if soft_prompt is not None:
        x = torch.cat([soft_prompt.expand(B, n, C), x], dim=1)                # (B, n + T, C)
    P = 0 if prefix is None else prefix[0][0].size(1)
    T = x.size(1)
    x = x + W["transformer.wpe.weight"][P:P + T]

    def linear(h, name):
        return h @ W[f"{name}.weight"].T + W[f"{name}.bias"]

    visible = torch.arange(P + T)[None, :] <= P + torch.arange(T)[:, None]    # (T, P + T): key j <= query i
    for layer in range(cfg.n_layer):
        p = f"transformer.h.{layer}."
        h = layer_norm(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"])
        q, k, v = linear(h, p + "attn.c_attn").split(C, dim=-1)
        if l_k is not None:
            k, v = l_k[layer] * k, l_v[layer] * v
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if prefix is not None:
            P_K, P_V = prefix[layer]
            k = torch.cat([P_K.expand(B, nh, P, hs), k], dim=2)              # [P_K; K]
            v = torch.cat([P_V.expand(B, nh, P, hs), v], dim=2)              # [P_V; V]
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~visible, float("-inf"))
        attention = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        attention = linear(attention, p + "attn.c_proj")
        if adapters is not None:
            attention = attention + bottleneck(attention, *adapters[layer][0])
        x = x + attention
        hidden = gelu_tanh(linear(layer_norm(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"]), p + "mlp.c_fc"))
        if l_ff is not None:
            hidden = l_ff[layer] * hidden
        ffn = linear(hidden, p + "mlp.c_proj")
        if adapters is not None:
            ffn = ffn + bottleneck(ffn, *adapters[layer][1])
        x = x + ffn
    x = layer_norm(x, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"])
    return (x @ W["transformer.wte.weight"].T)[:, n:]                         # tied head: logits = LN(h_L) W_e^T


def set_randomly(tensor, seed, mean=0.0, std=0.3):
    with torch.no_grad():
        tensor.copy_(mean + std * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return tensor


def test_the_formulas_give_the_base_model():
    """The reference itself: with no method, the formulas give 05's GPT."""
    base = make_base()
    x = ids(3, 12)
    torch.testing.assert_close(formula_logits(base, x), base(x)[0], atol=1e-5, rtol=1e-5)


def test_lora_adds_alpha_over_r_times_B_A_x():
    """LoRA: h = W0 x + b + (alpha / r) B A x, on the rows of the chosen part only (v of the fused
    q, k, v projection) and on a whole Linear ("up": GPT-2's mlp.c_fc); r = 2, alpha = 6: the scale is 3."""
    base = make_base()
    r, alpha = 2, 6.0
    model = peft.add_lora(fresh_copy(base), r=r, alpha=alpha, targets="v,up").eval()
    weights = {}
    for layer in range(L):
        for name, part, rows in (("attn.c_attn", "v", slice(2 * C, 3 * C)), ("mlp.c_fc", "all", slice(None))):
            update = model.get_submodule(f"transformer.h.{layer}.{name}").adapters["default"]
            A, B = update.lora_A[part], set_randomly(update.lora_B[part], seed=10 * layer + len(name))
            W0 = base.get_submodule(f"transformer.h.{layer}.{name}").weight.detach()
            W = W0.clone()
            W[rows] += (alpha / r) * B @ A
            weights[f"transformer.h.{layer}.{name}.weight"] = W
    # one layer: x W0^T + b + (alpha / r) x A^T B^T on the v rows, the q and k rows untouched
    lora_layer = model.transformer.h[0].attn.c_attn
    update = lora_layer.adapters["default"]
    base_layer = base.transformer.h[0].attn.c_attn
    h = torch.randn(5, C, generator=torch.Generator().manual_seed(2))
    expected = h @ base_layer.weight.T + base_layer.bias
    expected[:, 2 * C:] += (alpha / r) * h @ update.lora_A["v"].T @ update.lora_B["v"].T
    torch.testing.assert_close(lora_layer(h), expected, atol=1e-5, rtol=1e-5)
    # the whole model: every target layer with W0 + (alpha / r) B A
    x = ids(2, 10)
    got = model(x)[0]
    torch.testing.assert_close(got, formula_logits(base, x, weights=weights), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base(x)[0], atol=1e-3)                # B != 0: the update is there


def test_dora_is_magnitude_times_unit_rows_of_the_adapted_weight():
    """DoRA: W' = m * (W0 + s B A) / ||W0 + s B A||_row, s = alpha / r, h = W' x + b; here with m and B
    both moved away from their start (m = ||W0||_row, B = 0)."""
    base = make_base()
    r, alpha = 2, 6.0
    model = peft.add_lora(fresh_copy(base), r=r, alpha=alpha, targets="q,o", dora=True).eval()
    weights = {}
    for layer in range(L):
        for name, part, rows in (("attn.c_attn", "q", slice(0, C)), ("attn.c_proj", "all", slice(None))):
            update = model.get_submodule(f"transformer.h.{layer}.{name}").adapters["default"]
            A, B = update.lora_A[part], set_randomly(update.lora_B[part], seed=layer + 20 * len(name))
            m = set_randomly(update.magnitude[part], seed=layer + 30, mean=1.0, std=0.2)
            W = base.get_submodule(f"transformer.h.{layer}.{name}").weight.detach().clone()
            V = W[rows] + (alpha / r) * B @ A
            W[rows] = m[:, None] * V / V.norm(dim=1, keepdim=True)
            weights[f"transformer.h.{layer}.{name}.weight"] = W
    x = ids(2, 10)
    got = model(x)[0]
    torch.testing.assert_close(got, formula_logits(base, x, weights=weights), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base(x)[0], atol=1e-3)


@pytest.mark.parametrize("hidden", [0, 16])
def test_prefix_tuning_attends_over_the_prefix_keys_and_values(hidden):
    """Prefix: head_i = Attention(Q, [P_K^l; K], [P_V^l; V]) in every layer, the text at positions
    P .. P+T-1; with hidden > 0, P = W_2 tanh(W_1 P' + b_1) + b_2 (Li & Liang's reparameterisation)."""
    base = make_base()
    P, nh = 3, TINY["n_head"]
    model = randomize(peft.PrefixTuning(fresh_copy(base), num_tokens=P, hidden=hidden), scale=0.5).eval()
    if hidden:
        mlp = model.prefix_mlp
        values = (torch.tanh(model.prefix_input @ mlp[0].weight.T + mlp[0].bias) @ mlp[2].weight.T + mlp[2].bias)
    else:
        values = model.prefix
    values = values.detach().view(P, L, 2, nh, C // nh)                     # [P_K^1; P_V^1; ...; P_V^L] per position
    prefix = [(values[:, layer, 0].transpose(0, 1), values[:, layer, 1].transpose(0, 1)) for layer in range(L)]
    x = ids(2, 9)
    got = model(x)[0]
    torch.testing.assert_close(got, formula_logits(base, x, prefix=prefix), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base(x)[0], atol=1e-3)


def test_prompt_tuning_puts_soft_embeddings_before_the_tokens():
    """Prompt: h_0 = [E_soft; W_e[x]] + W_p[0 .. n + T - 1]; the logits of the T real tokens."""
    base = make_base()
    model = peft.PromptTuning(fresh_copy(base), num_tokens=4).eval()
    soft = set_randomly(model.soft_prompt, seed=5)
    x = ids(2, 9)
    got = model(x)[0]
    torch.testing.assert_close(got, formula_logits(base, x, soft_prompt=soft.detach()), atol=1e-5, rtol=1e-5)


def test_adapters_add_a_bottleneck_branch_after_attention_and_after_the_mlp():
    """Adapter: a sublayer's output h becomes h + W_up f(W_down h + b_down) + b_up (W_up moved off zero)."""
    base = make_base()
    model = randomize(peft.add_adapters(fresh_copy(base), bottleneck=8), scale=0.3).eval()
    adapters = []
    for block in model.transformer.h:
        adapters.append([tuple(t.detach() for t in (a.down.weight, a.down.bias, a.up.weight, a.up.bias))
                         for a in (block.attn.adapter, block.mlp.adapter)])
    x = ids(2, 9)
    got = model(x)[0]
    torch.testing.assert_close(got, formula_logits(base, x, adapters=adapters), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base(x)[0], atol=1e-3)


def test_ia3_rescales_keys_values_and_ffn_hidden_units_and_leaves_queries_alone():
    """(IA)^3: K <- l_k * K, V <- l_v * V, FFN hidden <- l_ff * GELU(x W_1 + b_1); Q unchanged."""
    base = make_base()
    model = peft.add_ia3(fresh_copy(base)).eval()
    l_k, l_v, l_ff = [], [], []
    for layer, block in enumerate(model.transformer.h):
        l_k.append(set_randomly(block.attn.c_attn.l_k, seed=layer, mean=1.0, std=0.5).detach())
        l_v.append(set_randomly(block.attn.c_attn.l_v, seed=layer + 10, mean=1.0, std=0.5).detach())
        l_ff.append(set_randomly(block.mlp.c_proj.l_ff, seed=layer + 20, mean=1.0, std=0.5).detach())
    x = ids(2, 9)
    got = model(x)[0]
    torch.testing.assert_close(got, formula_logits(base, x, l_k=l_k, l_v=l_v, l_ff=l_ff), atol=1e-5, rtol=1e-5)
    # the fused projection alone: [q; l_k * k; l_v * v]
    layer = model.transformer.h[0].attn.c_attn
    h = torch.randn(4, C, generator=torch.Generator().manual_seed(3))
    q, k, v = (h @ layer.base.weight.T + layer.base.bias).split(C, dim=-1)
    torch.testing.assert_close(layer(h), torch.cat([q, l_k[0] * k, l_v[0] * v], dim=-1), atol=1e-6, rtol=1e-6)


# ------------------------------------------------- the modern decoder: GQA row blocks, SwiGLU's hidden units
def test_lora_targets_are_the_row_blocks_of_gqa_and_swiglu():
    """q, k, v are attn.qkv_sizes rows of c_attn (32, 16, 16 under GQA: not three equal thirds), gate and
    up the two halves of SwiGLU's c_fc, o and down whole Linears; on GPT-2, up is the whole c_fc."""
    llama, gpt2 = make_base(arch="llama"), make_base()
    h0 = "transformer.h.0."
    found = peft.lora_targets(llama, "k,v,gate,o")
    assert found[h0 + "attn.c_attn"] == {"k": (32, 48), "v": (48, 64)}
    assert found[h0 + "attn.c_proj"] == {"all": (0, 32)}
    assert found[h0 + "mlp.c_fc"] == {"gate": (0, 48)}
    assert set(found) == {f"transformer.h.{i}.{m}" for i in range(L) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")}
    assert peft.lora_targets(llama, "mlp")[h0 + "mlp.c_fc"] == {"gate": (0, 48), "up": (48, 96)}
    assert peft.lora_targets(gpt2, "up,down") == {f"transformer.h.{i}.{m}": {"all": (0, rows)}
                                                  for i in range(L) for m, rows in (("mlp.c_fc", 4 * C), ("mlp.c_proj", C))}
    assert set(peft.lora_targets(gpt2, "mlp")) == set(peft.lora_targets(gpt2, "up,down"))   # no gate to add
    with pytest.raises(ValueError, match="no gate"):
        peft.lora_targets(gpt2, "q,gate")
    with pytest.raises(ValueError, match="unknown LoRA target 'mlp.c_fc'"):
        peft.lora_targets(gpt2, "mlp.c_fc")


def test_lora_on_one_row_block_changes_only_those_rows():
    """LoRA on k (GQA: 16 rows) and up (SwiGLU's second half): the q, v and gate outputs are the base's,
    bit for bit; the k and up outputs are W0 x + (alpha / r) B A x."""
    base = make_base(arch="llama")
    model = randomize(peft.add_lora(fresh_copy(base), r=2, alpha=4.0, targets="k,up")).eval()
    h = torch.randn(3, C, generator=torch.Generator().manual_seed(2))
    for name, changed, rows in (("attn.c_attn", "k", slice(32, 48)), ("mlp.c_fc", "up", slice(48, 96))):
        layer, base_layer = model.transformer.h[1].get_submodule(name), base.transformer.h[1].get_submodule(name)
        update = layer.adapters["default"]
        expected = base_layer(h)
        assert set(update.parts) == {changed}
        expected[:, rows] += 2.0 * h @ update.lora_A[changed].T @ update.lora_B[changed].T
        got = layer(h)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        untouched = torch.ones(got.size(1), dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(got[:, untouched], base_layer(h)[:, untouched])


def test_ia3_on_the_modern_decoder_scales_kv_heads_and_swiglu_hidden_units():
    """(IA)^3 under GQA and SwiGLU: l_k, l_v of n_kv_head d_k = 16, l_ff of intermediate_size = 48, and
    the FFN is W2 (l_ff * silu(W1 x) * W3 x)."""
    base = make_base(arch="llama")
    model = peft.add_ia3(fresh_copy(base)).eval()
    block = model.transformer.h[0]
    l_k = set_randomly(block.attn.c_attn.l_k, seed=1, mean=1.0, std=0.5).detach()
    l_v = set_randomly(block.attn.c_attn.l_v, seed=2, mean=1.0, std=0.5).detach()
    l_ff = set_randomly(block.mlp.c_proj.l_ff, seed=3, mean=1.0, std=0.5).detach()
    assert (l_k.shape, l_v.shape, l_ff.shape) == ((16,), (16,), (48,))
    h = torch.randn(4, C, generator=torch.Generator().manual_seed(4))
    W_qkv = base.transformer.h[0].attn.c_attn.weight.detach()
    q, k, v = (h @ W_qkv.T).split([32, 16, 16], dim=-1)
    torch.testing.assert_close(block.attn.c_attn(h), torch.cat([q, l_k * k, l_v * v], dim=-1), atol=1e-6, rtol=1e-6)
    W1, W3 = base.transformer.h[0].mlp.c_fc.weight.detach().chunk(2)
    W2 = base.transformer.h[0].mlp.c_proj.weight.detach()
    hidden = torch.nn.functional.silu(h @ W1.T) * (h @ W3.T)
    torch.testing.assert_close(block.mlp(h), (l_ff * hidden) @ W2.T, atol=1e-6, rtol=1e-6)


# ------------------------------------------------- against the peft library, on the same tiny GPT-2
# The same weights in transformers' GPT2LMHeadModel and in 05's GPT (from_pretrained on the folder
# transformers wrote), the same method applied in both with the same shapes, the adapter weights copied
# across: the logits must agree to float32 precision. What maps exactly: LoRA and DoRA (peft puts one A,
# B pair on the fused c_attn; ours has one per q, k, v block, which is the same map when the three A are
# equal and the B are peft's B cut into its three row blocks), (IA)^3 (peft rescales all of c_attn's
# output, so its q third is set to ones), prompt tuning, and prefix tuning, direct or through the MLP.
# Bottleneck adapters have no peft counterpart (peft has no Houlsby adapter for GPT-2).
def hf_gpt2_pair(tmp_path):
    """(transformers' tiny GPT2LMHeadModel, 05's GPT loaded from the folder it saved), both eval."""
    transformers = reference("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=L, n_head=TINY["n_head"], n_embd=C, n_positions=TINY["block_size"],
                                     vocab_size=TINY["vocab_size"], bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)              # logits far from uniform
    theirs.save_pretrained(tmp_path)
    ours = peft.GPT.from_pretrained(tmp_path).eval()
    return theirs, ours


def peft_parameter(model, suffix):
    matches = [p for name, p in model.named_parameters() if name.endswith(suffix)]
    assert len(matches) == 1, (suffix, len(matches))
    return matches[0].detach()


def assert_same_logits(theirs_logits, ours_logits):
    difference = (theirs_logits - ours_logits).abs().max().item()
    print(f"max |theirs - ours| = {difference:.1e}")
    assert difference < 1e-5, difference


@pytest.mark.parametrize("dora", [False, True])
def test_lora_and_dora_equal_peft(tmp_path, dora):
    peft_lib = reference("peft")
    theirs, ours = hf_gpt2_pair(tmp_path)
    r, alpha = 4, 12.0
    # init_lora_weights=False: B random, not zero, so that the update is there to compare
    theirs = peft_lib.get_peft_model(theirs, peft_lib.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        lora_dropout=0.0, use_dora=dora, init_lora_weights=False)).eval()
    ours = peft.add_lora(ours, r=r, alpha=alpha, targets="all", dora=dora).eval()
    with torch.no_grad():
        for layer in range(L):
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                prefix = f"h.{layer}.{name}"
                A = peft_parameter(theirs, f"{prefix}.lora_A.default.weight")          # (r, d_in)
                B = peft_parameter(theirs, f"{prefix}.lora_B.default.weight")          # (d_out, r)
                update = ours.get_submodule(f"transformer.{prefix}").adapters["default"]
                for part, (start, end) in update.parts.items():
                    update.lora_A[part].copy_(A)
                    update.lora_B[part].copy_(B[start:end])
                    if dora:
                        m = peft_parameter(theirs, f"{prefix}.lora_magnitude_vector.default.weight")
                        update.magnitude[part].copy_(m.flatten()[start:end])
    x = ids(3, 20)
    with torch.no_grad():
        expected = theirs(input_ids=x).logits
        got = ours(x)[0]
    assert not torch.allclose(got, peft.GPT.from_pretrained(tmp_path).eval()(x)[0], atol=1e-3)   # B != 0
    assert_same_logits(expected, got)


def test_ia3_equals_peft(tmp_path):
    peft_lib = reference("peft")
    theirs, ours = hf_gpt2_pair(tmp_path)
    theirs = peft_lib.get_peft_model(theirs, peft_lib.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)).eval()
    ours = peft.add_ia3(ours).eval()
    with torch.no_grad():
        for layer in range(L):
            qkv = peft_parameter(theirs, f"h.{layer}.attn.c_attn.ia3_l.default")       # (3C, 1): all of c_attn
            set_randomly(qkv, seed=layer, mean=1.0, std=0.5)
            qkv[:C] = 1.0                                                              # (IA)^3 leaves q alone
            hidden = set_randomly(peft_parameter(theirs, f"h.{layer}.mlp.c_proj.ia3_l.default"), seed=layer + 9,
                                  mean=1.0, std=0.5)                                   # (1, 4C): c_proj's input
            block = ours.transformer.h[layer]
            block.attn.c_attn.l_k.copy_(qkv[C:2 * C, 0])
            block.attn.c_attn.l_v.copy_(qkv[2 * C:, 0])
            block.mlp.c_proj.l_ff.copy_(hidden[0])
    x = ids(3, 20)
    with torch.no_grad():
        assert_same_logits(theirs(input_ids=x).logits, ours(x)[0])


def test_prompt_tuning_equals_peft(tmp_path):
    peft_lib = reference("peft")
    theirs, ours = hf_gpt2_pair(tmp_path)
    n = 5
    theirs = peft_lib.get_peft_model(theirs, peft_lib.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=n)).eval()
    ours = peft.PromptTuning(ours, num_tokens=n).eval()
    with torch.no_grad():
        soft = set_randomly(peft_parameter(theirs, "prompt_encoder.default.embedding.weight"), seed=4)
        ours.soft_prompt.copy_(soft)
        x = ids(3, 20)
        expected = theirs(input_ids=x).logits                    # (B, n + T, V): peft keeps the soft positions
        assert expected.shape[1] == n + 20
        assert_same_logits(expected[:, n:], ours(x)[0])


@pytest.mark.parametrize("hidden", [0, 16])
def test_prefix_tuning_equals_peft(tmp_path, hidden):
    peft_lib = reference("peft")
    theirs, ours = hf_gpt2_pair(tmp_path)
    P = 4
    options = dict(prefix_projection=True, encoder_hidden_size=hidden) if hidden else {}
    theirs = peft_lib.get_peft_model(theirs, peft_lib.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=P, **options)).eval()
    ours = peft.PrefixTuning(ours, num_tokens=P, hidden=hidden).eval()
    with torch.no_grad():
        embedding = set_randomly(peft_parameter(theirs, "prompt_encoder.default.embedding.weight"), seed=6)
        if hidden:   # peft's transform = Linear, Tanh, Linear: our prefix_mlp, P' its embedding
            ours.prefix_input.copy_(embedding)
            for index in (0, 2):
                for kind in ("weight", "bias"):
                    source = set_randomly(peft_parameter(theirs, f"prompt_encoder.default.transform.{index}.{kind}"),
                                          seed=7 + index + len(kind))
                    getattr(ours.prefix_mlp[index], kind).copy_(source)
        else:        # peft's (P, L * 2 * C) table has our layout: per position, layer by layer, keys then values
            ours.prefix.copy_(embedding)
        x = ids(3, 20)
        assert_same_logits(theirs(input_ids=x).logits, ours(x)[0])


# ------------------------------------------------- against the peft library, on a tiny Llama (GQA)
# 05's modern decoder (LLAMA above: RMSNorm, RoPE, SwiGLU, 4 query heads on 2 K/V heads, untied head) saved
# by save_pretrained and loaded by transformers as a LlamaForCausalLM, with peft on its separate q_proj,
# k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. Each is one row block of ours (lora_row_blocks),
# with its own A and B here as there, so the adapter weights copy across one to one.
LLAMA_MODULES = {"q": ("attn.c_attn", "self_attn.q_proj"), "k": ("attn.c_attn", "self_attn.k_proj"),
                 "v": ("attn.c_attn", "self_attn.v_proj"), "o": ("attn.c_proj", "self_attn.o_proj"),
                 "gate": ("mlp.c_fc", "mlp.gate_proj"), "up": ("mlp.c_fc", "mlp.up_proj"),
                 "down": ("mlp.c_proj", "mlp.down_proj")}


def hf_llama_pair(tmp_path):
    """(transformers' LlamaForCausalLM read from the folder 05's save_pretrained wrote, 05's GPT), both eval."""
    transformers = reference("transformers")
    make_base(arch="llama").save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.config.num_key_value_heads == 2
    return theirs, peft.GPT.from_pretrained(tmp_path).eval()


def llama_part(ours, layer, target):
    """Our module and row block that is peft's `target` module of `layer`."""
    module = ours.get_submodule(f"transformer.h.{layer}.{LLAMA_MODULES[target][0]}")
    return module, target if target in ("q", "k", "v", "gate", "up") else "all"


@pytest.mark.parametrize("dora", [False, True])
def test_lora_and_dora_on_llama_equal_peft(tmp_path, dora):
    peft_lib = reference("peft")
    theirs, ours = hf_llama_pair(tmp_path)
    r, alpha = 4, 12.0
    theirs = peft_lib.get_peft_model(theirs, peft_lib.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=[hf.split(".")[-1] for _, hf in LLAMA_MODULES.values()],
        lora_dropout=0.0, use_dora=dora, init_lora_weights=False)).eval()
    ours = peft.add_lora(ours, r=r, alpha=alpha, targets="q,k,v,o,gate,up,down", dora=dora).eval()
    with torch.no_grad():
        for layer in range(L):
            for target, (_, hf_name) in LLAMA_MODULES.items():
                prefix = f"layers.{layer}.{hf_name}"
                module, part = llama_part(ours, layer, target)
                update = module.adapters["default"]
                update.lora_A[part].copy_(peft_parameter(theirs, f"{prefix}.lora_A.default.weight"))   # (r, d_in)
                update.lora_B[part].copy_(peft_parameter(theirs, f"{prefix}.lora_B.default.weight"))   # (rows, r)
                if dora:
                    m = peft_parameter(theirs, f"{prefix}.lora_magnitude_vector.default.weight")
                    set_randomly(m, seed=layer + len(target), mean=1.0, std=0.2)        # off ||W0||, both sides
                    update.magnitude[part].copy_(m.flatten())
    x = ids(3, 20)
    with torch.no_grad():
        got = ours(x)[0]
        assert not torch.allclose(got, peft.GPT.from_pretrained(tmp_path).eval()(x)[0], atol=1e-3)   # B != 0
        assert_same_logits(theirs(input_ids=x).logits, got)


def test_ia3_on_llama_equals_peft(tmp_path):
    """peft's (IA)^3 on k_proj and v_proj (outputs: l_k, l_v of n_kv_head d_k) and down_proj as a
    feedforward module (its input: l_ff on silu(gate) * up), its default for Llama."""
    peft_lib = reference("peft")
    theirs, ours = hf_llama_pair(tmp_path)
    theirs = peft_lib.get_peft_model(theirs, peft_lib.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])).eval()
    ours = peft.add_ia3(ours).eval()
    with torch.no_grad():
        for layer in range(L):
            block = ours.transformer.h[layer]
            for ia3_l, name in ((block.attn.c_attn.l_k, "self_attn.k_proj"), (block.attn.c_attn.l_v, "self_attn.v_proj"),
                                (block.mlp.c_proj.l_ff, "mlp.down_proj")):
                theirs_l = set_randomly(peft_parameter(theirs, f"layers.{layer}.{name}.ia3_l.default"),
                                        seed=layer + len(name), mean=1.0, std=0.5)  # (16, 1), (16, 1), (1, 48)
                ia3_l.copy_(theirs_l.flatten())
    x = ids(3, 20)
    with torch.no_grad():
        got = ours(x)[0]
        assert not torch.allclose(got, peft.GPT.from_pretrained(tmp_path).eval()(x)[0], atol=1e-3)   # l != 1
        assert_same_logits(theirs(input_ids=x).logits, got)


def test_prompt_tuning_on_llama_equals_peft(tmp_path):
    """The soft tokens at positions 0 .. n-1 and the text at n .. n+T-1, rotated by RoPE accordingly."""
    peft_lib = reference("peft")
    theirs, ours = hf_llama_pair(tmp_path)
    n = 5
    theirs = peft_lib.get_peft_model(theirs, peft_lib.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=n)).eval()
    ours = peft.PromptTuning(ours, num_tokens=n).eval()
    with torch.no_grad():
        ours.soft_prompt.copy_(set_randomly(peft_parameter(theirs, "prompt_encoder.default.embedding.weight"), seed=4))
        x = ids(3, 20)
        assert_same_logits(theirs(input_ids=x).logits[:, n:], ours(x)[0])


@pytest.mark.parametrize("hidden", [0, 16])
def test_prefix_tuning_on_llama_equals_peft(tmp_path, hidden):
    """peft's prefix on a GQA Llama: n_kv_head heads of d_k per layer (token_dim = n_kv_head d_k, P' that
    wide too), keys used unrotated as a past_key_values cache, the text at positions P .. P+T-1."""
    peft_lib = reference("peft")
    theirs, ours = hf_llama_pair(tmp_path)
    P = 4
    options = dict(prefix_projection=True, encoder_hidden_size=hidden) if hidden else {}
    theirs = peft_lib.get_peft_model(theirs, peft_lib.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=P, **options)).eval()
    ours = peft.PrefixTuning(ours, num_tokens=P, hidden=hidden).eval()
    with torch.no_grad():
        embedding = set_randomly(peft_parameter(theirs, "prompt_encoder.default.embedding.weight"), seed=6)
        assert embedding.shape == (P, 16 if hidden else L * 2 * 16)                 # n_kv_head d_k = 16, not C
        if hidden:
            ours.prefix_input.copy_(embedding)
            for index in (0, 2):
                for kind in ("weight", "bias"):
                    source = set_randomly(peft_parameter(theirs, f"prompt_encoder.default.transform.{index}.{kind}"),
                                          seed=7 + index + len(kind))
                    getattr(ours.prefix_mlp[index], kind).copy_(source)
        else:
            ours.prefix.copy_(embedding)
        x = ids(3, 20)
        got = ours(x)[0]
        assert not torch.allclose(got, peft.GPT.from_pretrained(tmp_path).eval()(x)[0], atol=1e-3)
        assert_same_logits(theirs(input_ids=x).logits, got)


# ---------------------------------------------------------------------------- the starting point
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", IDENTITY_METHODS)
def test_method_starts_exactly_at_the_base_model(method, arch):
    base = make_base(arch=arch)
    x = ids(3, 12)
    expected, _ = base(x)
    model = IDENTITY_METHODS[method](fresh_copy(base)).eval()
    got, _ = model(x)
    assert torch.equal(got, expected)            # bit for bit: B = 0, W_up = 0, l = 1, m = ||W0||


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_from_token_activations_equals_the_base_model_reading_those_tokens(arch):
    """A prefix initialised with the keys/values of real tokens w is the base model run on w + x. Under
    RoPE and GQA this holds only if the prefix has n_kv_head heads and the text sits at positions P.."""
    base = make_base(arch=arch)
    w, x = ids(1, 5, seed=7), ids(2, 9)
    model = peft.PrefixTuning(fresh_copy(base), num_tokens=5, hidden=0, init_ids=w[0].tolist()).eval()
    got, _ = model(x)
    expected, _ = base(torch.cat([w.expand(2, 5), x], dim=1))
    torch.testing.assert_close(got, expected[:, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_from_token_embeddings_equals_the_base_model_reading_those_tokens(arch):
    """Under RoPE this holds only if the soft tokens and the text are rotated by positions 0 .. n+T-1."""
    base = make_base(arch=arch)
    w, x = ids(1, 6, seed=8), ids(2, 9)
    model = peft.PromptTuning(fresh_copy(base), num_tokens=6, init_ids=w[0].tolist()).eval()
    got, _ = model(x)
    expected, _ = base(torch.cat([w.expand(2, 6), x], dim=1))
    torch.testing.assert_close(got, expected[:, 6:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- gradients reach the right tensors
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_only_the_method_parameters_get_gradients_and_change(method, arch):
    base = make_base(arch=arch)
    model = ALL_METHODS[method](fresh_copy(base)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and frozen_before
    # the trainable names are the method's own, never a base weight
    assert not any(n.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "ln_1.weight", "lm_head.weight"))
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
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_equal_their_formulas(arch):
    """Per layer, with q = n_head d_k rows, kv = n_kv_head d_k (= C in GPT-2, 16 of the Llama's 32) and
    F the FFN's width (4 C in GPT-2, 48 in the Llama, whose c_fc holds gate and up: 2 F rows)."""
    cfg = peft.GPTConfig(**ARCHS[arch])
    gated = cfg.mlp == "swiglu"
    q, kv, F = cfg.n_head * cfg.d_head, cfg.kv_heads * cfg.d_head, cfg.ffn_width
    base_total = peft.trainable_parameters(make_base(arch=arch))["total"]
    r, m, P, H, n = 4, 8, 4, 16, 5
    # one (A, B) pair per part: r d_in + d_out_part r. q, k, v: d_in C; o: q -> C; up (and gate): C -> F; down: F -> C
    lora_qv = r * ((C + q) + (C + kv))
    lora_all = r * ((C + q) + 2 * (C + kv) + (q + C) + (2 if gated else 1) * (C + F) + (F + C))
    # DoRA adds a magnitude per output row of every adapted part
    dora_rows = q + 2 * kv + C + (2 if gated else 1) * F + C
    expected = {
        "lora q,v": lambda g: (peft.add_lora(g, r=r, targets="q,v"), L * lora_qv),
        "lora all": lambda g: (peft.add_lora(g, r=r, targets="all"), L * lora_all),
        "dora all": lambda g: (peft.add_lora(g, r=r, targets="all", dora=True), L * (lora_all + dora_rows)),
        # two adapters per layer, each C m + m + m C + C
        "adapter": lambda g: (peft.add_adapters(g, bottleneck=m), L * 2 * (2 * C * m + m + C)),
        # l_k, l_v (kv each) and l_ff (F) per layer: 6 C in GPT-2
        "ia3": lambda g: (peft.add_ia3(g), L * (2 * kv + F)),
        # P' (P kv) + W_1 (kv H + H) + W_2 (H 2 L kv + 2 L kv)
        "prefix mlp": lambda g: (peft.PrefixTuning(g, num_tokens=P, hidden=H),
                                 P * kv + kv * H + H + H * 2 * L * kv + 2 * L * kv),
        "prefix folded": lambda g: (peft.PrefixTuning(g, num_tokens=P, hidden=H).fold(), P * 2 * L * kv),
        "prompt": lambda g: (peft.PromptTuning(g, num_tokens=n), n * C),
    }
    if arch == "gpt2":
        assert (lora_all, peft.trainable_parameters(peft.add_ia3(make_base()))["trainable"]) == \
            (r * (4 * 2 * C + 5 * C + 5 * C), L * 6 * C)       # GPT-2's own figures, as the README gives them
    for name, make in expected.items():
        model, formula = make(make_base(arch=arch))
        counts = peft.trainable_parameters(model)
        assert counts["trainable"] == formula, name
        assert counts["total"] == base_total + formula, name   # the base is all still there, frozen


# -------------------------------------------------------------------------------------- LoRA merge
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dora", [False, True])
def test_lora_merged_equals_unmerged_and_unmerge_restores_the_base(dora, arch):
    base = make_base(arch=arch)
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
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_adapter_only_weights_round_trip_into_a_fresh_base(method, arch, tmp_path):
    base = make_base(arch=arch)
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
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_tuning_with_padding_in_the_batch(arch):
    model = randomize(peft.PrefixTuning(make_base(arch=arch), num_tokens=4, hidden=16)).eval()
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


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_tuning_with_padding_in_the_batch(arch):
    model = randomize(peft.PromptTuning(make_base(arch=arch), num_tokens=3)).eval()
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


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_token_id_outside_the_vocabulary_is_a_clear_error(method):
    model = ALL_METHODS[method](make_base())
    for bad in (TINY["vocab_size"], -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            model(torch.tensor([[1, bad, 2]]))


# ------------------------------------------------------------------------------------ train.py end to end
@pytest.fixture(scope="module")
def train():
    return load_module("07_peft/train.py")


@pytest.fixture(scope="module")
def tiny_run(train, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("peft-tiny")
    report = train.main(["--preset", "tiny", "--out_dir", str(out_dir), "--device", "cpu"])
    return out_dir, report


def test_measuring_a_steps_memory_leaves_no_graph_behind(train):
    """training_memory_mb builds a step's graph without running backward: nothing of it may outlive the
    call (a pack hook keeping saved outputs with their grad_fn leaked ~150 MB per method of the default run)."""
    import gc
    import warnings
    from common.runtime import Runtime
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=False, seed=0, rank=0, local_rank=0,
                 world_size=1, ddp=False)
    model = peft.apply_method(make_base(), "lora", r=4, alpha=8)
    batch = {"input_ids": torch.randint(0, TINY["vocab_size"], (4, 16)),
             "labels": torch.randint(0, TINY["vocab_size"], (4, 16))}

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():       # isinstance() on torch.distributed's deprecated reduce_op warns
            warnings.simplefilter("ignore", FutureWarning)
            return sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    train.training_memory_mb("instruction", model, batch, rt)      # anything cached on first use
    before = live_tensors()
    for _ in range(3):
        assert train.training_memory_mb("instruction", model, batch, rt) > 0
    assert live_tensors() == before


def test_tiny_run_writes_the_table_for_every_method_and_task(tiny_run, train):
    out_dir, report = tiny_run
    saved = json.loads((out_dir / "report.json").read_text())
    rows = {(r["task"], r["method"]): r for r in train.table_rows(saved["finetune"])}
    methods = ["full finetuning", "LoRA r=4", "LoRA r=8", "LoRA r=16", "DoRA r=8", "prefix tuning",
               "prompt tuning", "adapters (Houlsby)", "(IA)^3", "full, from scratch"]
    for task in ("python-qa", "docstring-module"):
        for method in methods:
            row = rows[(task, method)]
            assert row["trainable"] > 0 and row["ms/step"] > 0 and row["peak MB"] > 0 and row["file KB"] > 0
            assert math.isfinite(row["test"])
        # the summary row: full finetuning from the base ("pretrained") and from random weights ("scratch")
        block = saved["finetune"][task]
        assert block["pretrained"] == block["methods"]["full"]["test"][block["metric"]]
        assert block["scratch"] == block["methods"]["scratch"]["test"][block["metric"]]
        assert block["seconds"] == pytest.approx(sum(row["seconds"] for row in block["methods"].values()))
    assert rows[("python-qa", "frozen base (no training)")]["trainable"] == 0
    assert rows[("docstring-module", "frozen base + head")]["trainable"] > 0
    base_params = saved["base"]["parameters"]
    # full finetuning trains the whole base; LoRA's count grows linearly with r; PEFT is a small fraction
    assert rows[("python-qa", "full finetuning")]["trainable"] == base_params
    assert rows[("python-qa", "full, from scratch")]["trainable"] == base_params
    assert rows[("python-qa", "LoRA r=16")]["trainable"] == 4 * rows[("python-qa", "LoRA r=4")]["trainable"]
    for method in methods[1:-1]:
        assert rows[("python-qa", method)]["% of base"] < 100
        assert rows[("python-qa", method)]["file KB"] < rows[("python-qa", "full finetuning")]["file KB"]
        assert rows[("python-qa", method)]["peak MB"] > base_params * 4 / 1e6            # the frozen weights are there
    # full finetuning holds weights, gradients and two AdamW moments for every parameter (+ activations)
    assert rows[("python-qa", "full finetuning")]["peak MB"] > 4 * base_params * 4 / 1e6
    # the pretraining loss went down, and finetuning lowered the response loss below the frozen base's
    history = saved["pretrain"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] < math.log(300) + 0.5
    assert saved["pretrain"]["tokens_per_second"] > 0 and saved["seconds"] > saved["pretrain"]["seconds"] > 0
    assert rows[("python-qa", "full finetuning")]["test"] < rows[("python-qa", "frozen base (no training)")]["test"]
    assert 0 <= saved["finetune"]["docstring-module"]["baseline"] <= 1
    examples = saved["finetune"]["python-qa"]["examples"]
    assert examples["merge_max_abs_difference"] < 1e-4 and len(examples["answers"]) == 3
    # the run's tokenizer lies beside its checkpoint, which records its fingerprint
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"]["fingerprint"] == train.BPETokenizer.load(out_dir / "tokenizer.json").fingerprint


def test_saved_base_and_adapter_reproduce_the_reported_metric(tiny_run, train):
    """ckpt.pt loads without unpickling code; an adapter file on a fresh copy of it gives the test
    metric the run reported."""
    out_dir, report = tiny_run
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
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


def stop_after(train, reads):
    """A StopFlag whose Ctrl-C arrives once the loops have asked `reads` times (once per step)."""
    class StopAfter(train.StopFlag):
        count = 0

        @property
        def requested(self):
            StopAfter.count += 1
            return StopAfter.count == reads

        @requested.setter
        def requested(self, value):
            pass

    return StopAfter


def test_resume_after_stops_in_pretraining_and_in_finetuning_equals_the_uninterrupted_run(
        tiny_run, train, tmp_path, monkeypatch, capsys):
    """Stopped after pretraining step 5, resumed, stopped again after LoRA's second finetuning step,
    resumed: the base, every row and the adapter weights are those of the uninterrupted tiny run."""
    out_dir, report = tiny_run
    args = ["--preset", "tiny", "--out_dir", str(tmp_path), "--device", "cpu", "--methods", "lora4,ia3",
            "--tasks", "python-qa"]
    monkeypatch.setattr(train, "StopFlag", stop_after(train, 5))
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 130 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"] == 5
    assert f"interrupted: saved {tmp_path / 'ckpt.pt'} at iter 5; continue with --resume" in capsys.readouterr().out
    monkeypatch.setattr(train, "StopFlag", stop_after(train, 11 + 2))      # 11 pretraining steps left, then LoRA's 2nd
    with pytest.raises(SystemExit) as stopped:
        train.main(args + ["--resume"])
    assert stopped.value.code == 130
    assert f"interrupted: saved {tmp_path / 'finetune.pt'} at iter 2; continue with --resume" in capsys.readouterr().out
    monkeypatch.undo()
    resumed = train.main(args + ["--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert resumed["base"]["fingerprint"] == report["base"]["fingerprint"]          # the same weights, bit for bit
    assert resumed["pretrain"]["history"] == report["pretrain"]["history"]
    for key in ("lora4", "ia3"):
        ours, uninterrupted = resumed["finetune"]["python-qa"]["methods"][key], report["finetune"]["python-qa"]["methods"][key]
        assert (ours["val"], ours["test"], ours["steps"]) == (uninterrupted["val"], uninterrupted["test"], uninterrupted["steps"])
        saved = torch.load(tmp_path / "adapters" / f"python-qa_{key}.pt", weights_only=True)["state_dict"]
        reference_weights = torch.load(out_dir / "adapters" / f"python-qa_{key}.pt", weights_only=True)["state_dict"]
        assert saved.keys() == reference_weights.keys()
        assert all(torch.equal(saved[name], reference_weights[name]) for name in saved), key
    assert not (tmp_path / "finetune.pt").exists()                   # spent once its row was saved
    # a finished method is not trained again on --resume: drop one, and only that one is redone
    results = json.loads((tmp_path / "results.json").read_text())
    lora_row = results["results"]["python-qa"]["methods"].pop("lora4")
    results["results"]["python-qa"]["methods"]["ia3"]["test"]["response_loss"] = 123.0   # marks the reused row
    (tmp_path / "results.json").write_text(json.dumps(results))
    again = train.main(args + ["--resume"])
    rows = again["finetune"]["python-qa"]["methods"]
    assert rows["ia3"]["test"]["response_loss"] == 123.0
    assert rows["lora4"]["test"] == lora_row["test"]                          # same seed, same result


def test_ctrl_c_saves_at_a_step_boundary_and_exits_130(tmp_path):
    interrupt_after_iteration(TRAIN, tmp_path)


def run_bad(train, capsys, args):
    """The one line `python 07_peft/train.py ARGS` prints for bad input (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        train.run_main(train.main, args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_corrupt_or_foreign_files_in_the_run_folder_are_one_line(tiny_run, train, tmp_path, capsys):
    out_dir, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out_dir, run)
    args = ["--preset", "tiny", "--out_dir", str(run), "--device", "cpu", "--methods", "ia3,lora4",
            "--tasks", "python-qa", "--stage", "finetune"]
    tokenizer_text = (run / "tokenizer.json").read_text()
    (run / "tokenizer.json").write_text("{not json")
    assert "cannot read the tokenizer" in run_bad(train, capsys, args)
    train.BPETokenizer.train("another corpus, another tokenizer " * 50, 300, special_tokens=(train.EOT,)).save(
        run / "tokenizer.json")
    assert "is not the tokenizer" in run_bad(train, capsys, args)
    (run / "tokenizer.json").write_text(tokenizer_text)
    results_text = (run / "results.json").read_text()
    (run / "results.json").write_text("{oops")
    assert "results.json is corrupt" in run_bad(train, capsys, args + ["--resume"])
    (run / "results.json").write_text(results_text)
    assert "holds the rows of another run (ft_iters 6 (now 5))" in run_bad(train, capsys, args + ["--resume", "--ft_iters", "5"])
    results = json.loads(results_text)
    del results["results"]["python-qa"]["methods"]["lora4"]
    (run / "results.json").write_text(json.dumps(results))
    (run / "finetune.pt").write_bytes(b"not a checkpoint")
    assert "finetune.pt is not a readable checkpoint" in run_bad(train, capsys, args + ["--resume"])
    # a stopped run's state for this very row whose tensors are not the method's (an older naming)
    identity = {"task": "python-qa", "method": "lora4", **results["signature"]}
    torch.save({"identity": identity, "trainable": {"transformer.h.0.mlp.gelu.l_ff": torch.ones(4)}}, run / "finetune.pt")
    assert "finetune.pt: adapter weights do not fit this model" in run_bad(train, capsys, args + ["--resume"])
    # another run's settings into the same folder: refused before anything is written
    assert "holds a run with another config: n_embd 32 (now 64)" in run_bad(
        train, capsys, ["--preset", "tiny", "--out_dir", str(run), "--device", "cpu", "--n_embd", "64"])


def test_an_edited_corpus_trains_a_new_tokenizer(train, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path / "cache"))
    words = [f"w{i}x{i % 7}" for i in range(120)]
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--stage", "pretrain", "--data", str(corpus), "--out_dir", str(out), "--device", "cpu",
            "--max_iters", "2", "--eval_interval", "2"]

    def run_tokenizer():
        train.main(args)
        fingerprint = train.BPETokenizer.load(out / "tokenizer.json").fingerprint
        assert torch.load(out / "ckpt.pt", weights_only=True)["tokenizer"]["fingerprint"] == fingerprint
        return fingerprint, len(list((tmp_path / "cache" / "tokenizers").glob("*.json")))

    first = run_tokenizer()
    assert run_tokenizer() == first == (first[0], 1)                 # the same text: the cached tokenizer
    corpus.write_text(" ".join(rng.choice(words[:60]) + "y" for _ in range(6000)))
    edited = run_tokenizer()
    assert edited[0] != first[0] and edited[1] == 2                  # the edited text: a new one, trained


def write_hf_folder(folder, vocab_files=True, vocab_size=None):
    """A Hugging Face GPT-2 folder written by 05's save_pretrained, with a tiny GPT-2-format vocabulary
    (the 256 bytes, two merges, <|endoftext|>) unless vocab_files is False."""
    from common.tokenizer import bytes_to_unicode
    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    merges = [(byte_char[ord(" ")], "t"), ("h", "e")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    if vocab_files:
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                           encoding="utf-8")
    model = peft.GPT(peft.GPTConfig(vocab_size=vocab_size or len(vocab), block_size=48, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(folder, eos_token_id=vocab["<|endoftext|>"])
    return folder


def test_init_from_a_hugging_face_folder_finetunes_it(train, tmp_path):
    folder = write_hf_folder(tmp_path / "gpt2-tiny")
    report = train.main(["--preset", "tiny", "--init_from", str(folder), "--out_dir", str(tmp_path / "out"),
                         "--device", "cpu", "--methods", "lora4,head", "--tasks", "docstring-module"])
    assert report["base"]["source"] == str(folder) and "pretrain" not in report
    assert set(report["finetune"]["docstring-module"]["methods"]) == {"lora4", "head"}
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_init_from_without_vocab_files_while_offline_is_one_line(train, tmp_path, capsys, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    folder = write_hf_folder(tmp_path / "gpt2-like", vocab_files=False, vocab_size=50257)
    err = run_bad(train, capsys, ["--preset", "tiny", "--init_from", str(folder), "--out_dir", str(tmp_path / "out")])
    assert "no tokenizer.json (nor vocab.json + merges.txt)" in err and "offline" in err


def test_base_flag_starts_from_a_saved_checkpoint(tiny_run, train, tmp_path):
    """--base takes a chapter-05 style checkpoint (here the tiny run's ckpt.pt, with its tokenizer.json
    beside it): no pretraining, and the same base + seed give the same row as in the full run."""
    out_dir, report = tiny_run
    again = train.main(["--preset", "tiny", "--base", str(out_dir / "ckpt.pt"), "--out_dir", str(tmp_path),
                        "--device", "cpu", "--methods", "ia3", "--tasks", "docstring-module"])
    assert again["base"]["source"] == str(out_dir / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()
    assert again["finetune"]["docstring-module"]["methods"]["ia3"]["test"] == \
        report["finetune"]["docstring-module"]["methods"]["ia3"]["test"]
    # the folder now belongs to a run on that base: pretraining into it is refused, in one line
    with pytest.raises(train.UserError, match="holds a run with another config: base"):
        train.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--device", "cpu"])


# ----------------------------------------------------------- train.py on the modern decoder, and --base auto
def write_llama_folder(folder, end_of_text="<|end_of_text|>", tie_word_embeddings=True):
    """A tiny random Llama folder as transformers would read it: 05's save_pretrained (RMSNorm, RoPE,
    SwiGLU, multi-query: one K/V head) and a tokenizer.json from BPETokenizer.save_hf, whose end-of-text
    token is `end_of_text` (Llama 3's name by default; None: no such token)."""
    from common.tokenizer import BPETokenizer
    text = "def add(a, b):\n    return a + b\n" * 40 + "Return the sum of the items of a list.\n" * 40
    tokenizer = BPETokenizer.train(text, 300, special_tokens=(end_of_text,) if end_of_text else ())
    tokenizer.save_hf(folder)
    config = peft.GPTConfig(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=1, vocab_size=tokenizer.vocab_size,
                            block_size=48, n_layer=1, n_head=2, n_embd=16, intermediate_size=40,
                            tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(0)
    peft.GPT(config).save_pretrained(folder, eos_token_id=tokenizer.eot_id)
    return folder, tokenizer


def test_base_flag_finetunes_a_hugging_face_llama_folder_with_every_method(train, tmp_path, capsys):
    """--base FOLDER (a Llama with tokenizer.json and Llama 3's <|end_of_text|>) runs --preset tiny end to
    end: every method on both tasks, LoRA on q, k, v, o, gate, up, down, and the table written."""
    folder, tokenizer = write_llama_folder(tmp_path / "llama-tiny")
    out_dir = tmp_path / "out"
    report = train.main(["--preset", "tiny", "--base", str(folder), "--out_dir", str(out_dir), "--device", "cpu"])
    log = capsys.readouterr().out
    assert f"loaded {folder}: Hugging Face llama" in log and "end of text '<|end_of_text|>'" in log
    assert report["base"]["source"] == str(folder) and "pretrain" not in report
    assert not (out_dir / "ckpt.pt").exists()
    saved = json.loads((out_dir / "report.json").read_text())
    rows = {(r["task"], r["method"]): r for r in train.table_rows(saved["finetune"])}
    assert len(rows) == 2 * 11
    for (task, method), row in rows.items():
        assert math.isfinite(row["test"]), (task, method)
        assert row["trainable"] > 0 or method == "frozen base (no training)"
    # LoRA r=4 on all seven matrices of the one layer: r (d_in + rows) each; d_k 8, 1 K/V head, F 40
    C, q, kv, F, r = 16, 16, 8, 40, 4
    assert rows[("python-qa", "LoRA r=4")]["trainable"] == r * ((C + q) + 2 * (C + kv) + (q + C) + 2 * (C + F) + (F + C))
    assert rows[("python-qa", "(IA)^3")]["trainable"] == 2 * kv + F
    assert rows[("python-qa", "full finetuning")]["test"] < rows[("python-qa", "frozen base (no training)")]["test"]
    # the instruction examples end with the folder's own end-of-text id
    lora = torch.load(out_dir / "adapters" / "python-qa_lora4.pt", weights_only=True)
    assert any(".mlp.c_fc.adapters.default.lora_A.gate" in name for name in lora["state_dict"])
    _, labels = train.instruction_example(tokenizer, {"instruction": "Add.", "response": "a + b"}, 32)
    assert labels[-1] == tokenizer.eot_id == tokenizer.special_tokens["<|end_of_text|>"]
    # --init_from is the same function: the same folder, the same row
    again = train.main(["--preset", "tiny", "--init_from", str(folder), "--out_dir", str(out_dir), "--device", "cpu",
                        "--methods", "ia3", "--tasks", "python-qa"])
    assert again["finetune"]["python-qa"]["methods"]["ia3"]["test"] == \
        report["finetune"]["python-qa"]["methods"]["ia3"]["test"]


def test_a_hugging_face_folder_without_end_of_text_or_a_gate_is_one_line(train, tmp_path, capsys):
    folder, _ = write_llama_folder(tmp_path / "no-eot", end_of_text=None)
    args = ["--preset", "tiny", "--out_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert "has no end-of-text token" in run_bad(train, capsys, args + ["--base", str(folder)])
    gpt2 = write_hf_folder(tmp_path / "gpt2-tiny")
    assert "has no gate" in run_bad(train, capsys, args + ["--init_from", str(gpt2), "--lora_targets", "q,gate"])
    assert "has no gate" in run_bad(train, capsys, args + ["--lora_targets", "gate"])      # pretrained here: GPT-2
    assert "unknown LoRA target 'mlp.c_fc'" in run_bad(train, capsys, args + ["--lora_targets", "mlp.c_fc"])


def test_base_auto_starts_from_chapter_05s_finished_run(tiny_run, train, tmp_path, monkeypatch, capsys):
    """--base auto (the default preset's) takes out/05_gpt/ckpt.pt of the working directory when it is a
    finished run, says so on the first line, and claims out_dir for that base; a stopped run there, or
    none, means pretraining here; the tiny preset never looks."""
    out_dir, report = tiny_run
    monkeypatch.chdir(tmp_path)
    chapter_05 = tmp_path / "out" / "05_gpt"
    chapter_05.mkdir(parents=True)
    for name in ("ckpt.pt", "tokenizer.json"):                 # a finished run (iter 16 of max_iters 16)
        shutil.copy(out_dir / name, chapter_05 / name)
    assert train.parse_config(train.Config, train.PRESETS, []).base == "auto"
    assert train.resolve_base(train.parse_config(train.Config, train.PRESETS, ["--preset", "tiny"]))[0].base == ""
    args = ["--preset", "tiny", "--base", "auto", "--device", "cpu", "--methods", "ia3", "--tasks", "docstring-module"]
    again = train.main(args + ["--out_dir", "on-05"])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("base model: out/05_gpt/ckpt.pt (chapter 05's pretrained GPT") and "--base ''" in first_line
    assert again["base"]["source"] == "out/05_gpt/ckpt.pt" and again["base"]["fingerprint"] == report["base"]["fingerprint"]
    assert not (tmp_path / "on-05" / "ckpt.pt").exists()
    assert again["finetune"]["docstring-module"]["methods"]["ia3"]["test"] == \
        report["finetune"]["docstring-module"]["methods"]["ia3"]["test"]        # same base, same seed, same row
    # the folder belongs to 05's base now: pretraining here into it, or resuming with a base of its own, is refused
    for other in (["--base", ""], ["--base", "", "--resume"]):
        with pytest.raises(train.UserError, match="holds a run with another config: base"):
            train.main(["--preset", "tiny", "--device", "cpu", "--out_dir", "on-05", *other])
    # and a folder pretrained here is not silently switched to 05's base: one line that says how to choose
    train.main(["--preset", "tiny", "--device", "cpu", "--out_dir", "own", "--stage", "pretrain", "--max_iters", "2"])
    with pytest.raises(train.UserError, match="--base auto chose chapter 05's model: --base '' pretrains one here"):
        train.main(args + ["--out_dir", "own"])
    # ... unless the run continues that folder's own base (--stage finetune, --resume)
    cfg, note = train.resolve_base(train.parse_config(train.Config, train.PRESETS, args + ["--out_dir", "own", "--resume"]))
    assert cfg.base == "" and note.startswith("base model: own/ckpt.pt, pretrained here")
    # a stopped run in out/05_gpt is no base: pretraining here, and the first line says why
    ckpt = torch.load(chapter_05 / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "iter": 5}, chapter_05 / "ckpt.pt")
    cfg, note = train.resolve_base(train.parse_config(train.Config, train.PRESETS, args))
    assert cfg.base == "" and note.startswith("base model: pretrained here") and "stopped run (iter 5 of 16)" in note


def test_a_base_pretrained_here_reads_a_folder_of_compressed_json_lines(train, tmp_path):
    """--data a folder with a .jsonl.gz whose text is in the field --text_field names: the base pretrains
    on it (streamed; the tokenizer trained on its sample)."""
    import gzip
    documents = train.data.corpus_documents("pydocs")[:300]
    (tmp_path / "corpus").mkdir()
    with gzip.open(tmp_path / "corpus" / "rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in documents)
    report = train.main(["--preset", "tiny", "--stage", "pretrain", "--device", "cpu", "--data", str(tmp_path / "corpus"),
                         "--text_field", "body", "--out_dir", str(tmp_path / "out")])
    assert report["pretrain"]["val_loss"] < math.log(300)
    tokenizer = train.BPETokenizer.load(tmp_path / "out" / "tokenizer.json")
    assert tokenizer.fingerprint == train.BPETokenizer.train(documents, 300, special_tokens=("<|endoftext|>",)).fingerprint

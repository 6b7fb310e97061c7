"""GPT-2 from scratch: a decoder-only Transformer language model, in pure PyTorch.

    h_0 = W_e[x] + W_p[position]                        token + learned position embeddings
    h_l = h_{l-1} + MultiHead(LN(h_{l-1}))              pre-LayerNorm causal self-attention
    h_l = h_l + FFN(LN(h_l))                            FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, 4x wide
    p(x_t | x_<t) = softmax(LN(h_L) W_e^T)              LM head tied to the token embedding

trained with L_LM = -sum_t log p(x_t | x_<t). Parameter names follow the Hugging Face GPT-2 checkpoints
(`transformer.h.0.attn.c_attn.weight`...), so `GPT.from_pretrained` loads real GPT-2 weights and
`save_pretrained` writes a folder that transformers' GPT2LMHeadModel loads (through `common/safetensors.py`,
without the `safetensors` package).
Generation keeps a KV cache: the prompt is run once, then each step feeds one new token.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from common.safetensors import load_folder, read_config, save_folder  # noqa: E402  (Hugging Face folders)


@dataclass
class GPTConfig:
    block_size: int = 256         # longest sequence (number of learned positions)
    vocab_size: int = 1024        # token ids are 0 .. vocab_size - 1
    n_layer: int = 4              # Transformer blocks
    n_head: int = 4               # attention heads per block
    n_embd: int = 256             # width d_model; each head gets d_k = n_embd / n_head
    dropout: float = 0.0          # on embeddings, attention weights and residual branches
    bias: bool = True             # biases in Linear and LayerNorm (GPT-2 has them)
    attn_impl: str = "sdpa"       # "sdpa" (fused F.scaled_dot_product_attention) or "explicit"
    layer_norm_eps: float = 1e-5  # GPT-2's epsilon

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attn_impl not in ("sdpa", "explicit"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'explicit', got {self.attn_impl!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def is_compiling():
    """True while torch.compile traces the model (torch.compiler.is_compiling is torch 2.3+)."""
    check = getattr(torch.compiler, "is_compiling", None) or getattr(torch._dynamo, "is_compiling", None)
    return bool(check and check())


class KVCache:
    """Keys and values of every layer for the tokens processed so far.

    `layers[i]` is None or a pair (k, v), each (B, n_head, T_past, d_k). A forward pass given a cache
    appends its new keys and values in place, so the next call only feeds the new tokens. A cache can
    also start pre-filled, e.g. with learned per-layer prefixes: `KVCache(n_layer, [(k0, v0), ...])`.
    """

    def __init__(self, n_layer, layers=None):
        self.layers = list(layers) if layers is not None else [None] * n_layer
        if len(self.layers) != n_layer:
            raise ValueError(f"KVCache needs {n_layer} layers, got {len(self.layers)}")

    @property
    def length(self):
        """T_past: how many positions the cache holds (a Python int, no device sync)."""
        return 0 if self.layers[0] is None else self.layers[0][0].size(2)

    def update(self, layer_idx, k, v):
        """Append this step's k, v (B, nh, T, hs) to layer `layer_idx`; return all keys and values."""
        if self.layers[layer_idx] is not None:
            past_k, past_v = self.layers[layer_idx]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer_idx] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, computed for h = n_head heads in parallel;
    MultiHead(x) = Concat(head_1, ..., head_h) W^O with head_i = Attention(x W_i^Q, x W_i^K, x W_i^V).
    W^Q, W^K, W^V of all heads are one matrix `c_attn` (n_embd -> 3 n_embd); W^O is `c_proj`.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # which entry of a KVCache belongs to this layer
        self.n_head = config.n_head
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None):
        """x: (B, T, C). mask: None for plain causal attention, else a bool (B or 1, 1, T, T_total)
        tensor, True where a query may see a key (built once per forward by `GPT.causal_padding_mask`)."""
        B, T, C = x.shape                                        # batch, time, channels (d_model)
        q, k, v = self.c_attn(x).split(C, dim=2)                 # one matmul for all three projections
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)            # (B, nh, T_total, hs), T_total = T_past + T
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1)                # mask None and T > 1 implies no cache
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T_total)
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v                                          # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)        # concatenate the heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, with the tanh approximation of GELU (as GPT-2)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN Transformer block: x = x + Attention(LN(x)); x = x + FFN(LN(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


def top_k_filter(logits, k):
    """Keep the k largest logits of each row, set the rest to -inf (ties with the k-th are kept).

    [2.0, 0.5, 1.0, -1.0] with k=2 -> [2.0, -inf, 1.0, -inf]
    """
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]   # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus filtering: keep the smallest set of most likely tokens whose probabilities sum to >= p.

    probabilities [0.5, 0.3, 0.15, 0.05] with p=0.7 -> keep the first two (0.5 + 0.3 >= 0.7).
    A token is kept when the mass of the tokens ranked above it is still < p, so the top one always is.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs                # mass of the tokens ranked higher
    sorted_logits = sorted_logits.masked_fill(mass_above >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),       # W_e, token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),       # W_p, learned positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: the output layer is W_e^T
        # GPT-2 initialisation: N(0, 0.02), biases zero; the projections that write into the residual
        # stream get 0.02 / sqrt(2 n_layer), since 2 n_layer of them add up along the residual path.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding=True):
        """Number of parameters; non_embedding leaves out the position embeddings. The token embeddings
        stay counted: tied to the LM head, they do the work of the output layer's matmul."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def num_flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Q T.

        6 N: each weight does a multiply-add (2 FLOPs) per token forward, twice that backward.
        12 L H Q T: the attention scores Q K^T and the weighted sum with V, over T keys, for L layers
        of H heads of width Q. Divide achieved FLOPs/s by the hardware peak to get MFU.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_parameters() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    @staticmethod
    def causal_padding_mask(T, T_past, padding_mask, device):
        """Which keys each of the T new queries may see: None for plain causal attention, else a bool
        (B or 1, 1, T, T_past + T) tensor. Query i sits at absolute position T_past + i and sees keys
        j <= T_past + i (the whole cache, causal within the new chunk) that are not padding."""
        if padding_mask is None and (T_past == 0 or T == 1):
            return None  # causal within the chunk (or a single query that may see every cached key)
        query_pos = torch.arange(T_past, T_past + T, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(T_past + T, device=device)[None, :]            # (1, T_total)
        allowed = key_pos <= query_pos                                        # (T, T_total)
        if padding_mask is not None:
            allowed = allowed & padding_mask.bool()[:, None, :]               # (B, T, T_total)
            # A padding query would otherwise see no key at all: softmax over an empty row is NaN,
            # and NaN * 0 leaks into every later layer. Letting it see itself keeps all values finite.
            allowed = allowed | (key_pos == query_pos)
            return allowed[:, None]                                           # (B, 1, T, T_total)
        return allowed[None, None]                                            # (1, 1, T, T_total)

    def forward_hidden(self, idx, attention_mask=None, cache=None):
        """Final hidden states LN(h_L), (B, T, C), for token ids idx (B, T).

        attention_mask: optional (B, T_past + T), 1 for real tokens, 0 for padding; positions then
        count real tokens only, so a left-padded row gets the same result as the unpadded one (the
        outputs at padding positions are meaningless: give them target -100).
        cache: optional KVCache, extended in place with this chunk's keys and values.
        """
        B, T = idx.shape
        T_past = cache.length if cache is not None else 0
        if T_past + T > self.config.block_size:
            raise ValueError(f"sequence of {T_past + T} tokens ({T_past} cached + {T} new) exceeds "
                             f"block_size {self.config.block_size}")
        if not is_compiling():  # one min/max (a single device sync), not under compile
            for token_id in torch.stack(torch.aminmax(idx)).tolist():
                if not 0 <= token_id < self.config.vocab_size:
                    raise ValueError(f"token id {token_id} is outside the vocabulary "
                                     f"(vocab_size {self.config.vocab_size})")
        if attention_mask is None:
            positions = torch.arange(T_past, T_past + T, device=idx.device)    # (T,)
        else:
            if attention_mask.shape != (B, T_past + T):
                raise ValueError(f"attention_mask must have shape {(B, T_past + T)} (batch, cached + "
                                 f"new tokens), got {tuple(attention_mask.shape)}")
            # the i-th real token of a row sits at position i, however much padding precedes it
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, T_past:]  # (B, T)
        mask = self.causal_padding_mask(T, T_past, attention_mask, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, mask, cache)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, attention_mask=None, cache=None, return_hidden=False):
        """idx (B, T) -> (logits (B, T, V), loss or None); (logits, loss, hidden (B, T, C)) if return_hidden.

        targets (B, T) are already aligned: targets[:, t] is the token after idx[:, t]; positions with
        -100 do not count in the mean cross-entropy (prompt tokens, padding).
        """
        hidden = self.forward_hidden(idx, attention_mask=attention_mask, cache=cache)
        logits = self.lm_head(hidden)                                           # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, attention_mask=None, generator=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

        temperature 0 is greedy (argmax); otherwise sample from softmax(logits / temperature), after
        top-k and then top-p filtering. Batched prompts of different lengths are left-padded, with
        attention_mask (B, T) marking the real tokens. With eos_id, a row that has produced it keeps
        emitting it, and generation stops once every row has.

        With use_cache the prompt is run once and each step feeds only the new token; prompt plus new
        tokens must then fit in block_size (ValueError otherwise: a cache cannot drop its oldest
        positions, since every cached key was computed at its own position). Without the cache, the
        context is cropped to the last block_size tokens at every step (a sliding window).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        block_size = self.config.block_size
        if use_cache and idx.size(1) + max_new_tokens > block_size:
            raise ValueError(f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"block_size {block_size}; shorten them, or pass use_cache=False to slide "
                             f"a window over the last {block_size} tokens")
        was_training = self.training
        self.eval()  # no dropout while generating
        try:
            cache = KVCache(self.config.n_layer) if use_cache else None
            finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            for step in range(max_new_tokens):
                if use_cache:  # prefill with the whole prompt once, then one token per step
                    logits, _ = self(idx if step == 0 else idx[:, -1:], attention_mask=attention_mask,
                                     cache=cache)
                else:
                    mask = attention_mask[:, -block_size:] if attention_mask is not None else None
                    logits, _ = self(idx[:, -block_size:], attention_mask=mask)
                logits = logits[:, -1, :]                                     # (B, V) next-token logits
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)             # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        logits = top_k_filter(logits, top_k)
                    if top_p is not None:
                        logits = top_p_filter(logits, top_p)
                    next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished[:, None], eos_id)
                    finished = finished | (next_id[:, 0] == eos_id)
                idx = torch.cat([idx, next_id], dim=1)
                if attention_mask is not None:
                    new_column = torch.ones_like(attention_mask[:, :1])
                    attention_mask = torch.cat([attention_mask, new_column], dim=1)
                if eos_id is not None and finished.all():
                    break
        finally:
            self.train(was_training)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on the matrices (Linear weights, embeddings) only; biases and
        LayerNorm gains are not decayed. Frozen parameters are left out. One fused kernel for the whole
        update where this torch has it for the device (CUDA; CPU since torch 2.4); `device_type` is kept
        for the familiar signature, the parameters' device decides."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # One kernel for all parameters: on CUDA, and on CPU since torch 2.4 (~4x faster step). Older
        # torch builds the optimizer with fused=True on CPU and only fails at its first step, so ask first.
        device = params[0].device.type if params else device_type
        version = tuple(int(part) for part in torch.__version__.split(".")[:2])
        if device == "cuda" or (device == "cpu" and version >= (2, 4)):
            try:
                return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
            except (RuntimeError, ValueError):
                pass  # no fused kernel for this device or dtype: the plain loop below
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    # Hugging Face stores GPT-2's projections as Conv1D, weight (in, out); nn.Linear keeps (out, in)
    CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, path, dropout=0.0, attn_impl="sdpa"):
        """Load a Hugging Face GPT-2 folder: config.json plus model.safetensors or pytorch_model.bin (or
        the sharded index of either).

        The CONV1D_WEIGHTS are transposed to nn.Linear's (out, in). The attn.bias / attn.masked_bias
        buffers of older checkpoints are causal masks, not parameters, and are skipped.
        """
        path = Path(path)
        config_file = path / "config.json"
        hf = read_config(path)
        for key, supported in [("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
                               ("n_inner", (None, 4 * hf.get("n_embd", 0))),
                               ("scale_attn_by_inverse_layer_idx", (False,)),
                               ("scale_attn_weights", (True,))]:
            if hf.get(key, supported[0]) not in supported:
                raise ValueError(f"{config_file}: {key}={hf[key]!r} is not supported "
                                 f"(GPT-2 uses {supported[0]!r})")
        try:
            config = GPTConfig(block_size=hf["n_positions"] if "n_positions" in hf else hf["n_ctx"],
                               vocab_size=hf["vocab_size"],
                               n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                               layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=dropout,
                               bias=True, attn_impl=attn_impl)
        except KeyError as missing:
            raise ValueError(f"{config_file} has no {missing} entry: not a GPT-2 config") from None

        checkpoint = load_folder(path)

        model = cls(config)
        ours = model.state_dict()
        loaded = {}
        for name, tensor in checkpoint.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not name.startswith("transformer.") and name != "lm_head.weight":
                name = "transformer." + name  # the original OpenAI conversion has no prefix
            loaded[name] = tensor.t() if name.endswith(cls.CONV1D_WEIGHTS) else tensor
        lm_head = loaded.pop("lm_head.weight", None)  # tied to wte: the same matrix when present
        missing = sorted(set(ours) - set(loaded) - {"lm_head.weight"})
        unexpected = sorted(set(loaded) - set(ours))
        if missing or unexpected:
            raise ValueError(f"{path} does not match a GPT-2 of this config: missing {missing[:4]} "
                             f"({len(missing)} in all), unexpected {unexpected[:4]} "
                             f"({len(unexpected)} in all)")
        if lm_head is not None and not torch.equal(lm_head, loaded["transformer.wte.weight"]):
            raise ValueError(f"{path}: lm_head.weight differs from wte.weight; "
                             "untied output heads are not supported")
        with torch.no_grad():
            for name, tensor in loaded.items():
                if tensor.shape != ours[name].shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(ours[name].shape)}")
                ours[name].copy_(tensor)
        return model

    def save_pretrained(self, path, eos_token_id=None):
        """Write a folder that transformers' GPT2LMHeadModel loads: config.json + model.safetensors, each
        atomically. The inverse of from_pretrained: the CONV1D_WEIGHTS go back to (in, out), and
        lm_head.weight is left out (it is wte.weight, which transformers ties again on load).

        eos_token_id goes to the config as GPT-2's bos and eos id (both <|endoftext|>); None means 50256
        for GPT-2's own 50257-token vocabulary and no id for any other. A bias=False model is written
        with zero biases, since GPT-2 has a bias in every Linear and LayerNorm: the same function, though
        from_pretrained then gives it back as a bias=True model.
        """
        cfg = self.config
        if eos_token_id is None and cfg.vocab_size == 50257:
            eos_token_id = 50256
        hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                     "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                     "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
                     "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
                     "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                     "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
                     "bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
        state = {name: tensor.t() if name.endswith(self.CONV1D_WEIGHTS) else tensor
                 for name, tensor in self.state_dict().items() if name != "lm_head.weight"}
        if not cfg.bias:
            for name, module in self.named_modules():
                if isinstance(module, (nn.Linear, nn.LayerNorm)) and module is not self.lm_head:
                    state[f"{name}.bias"] = module.weight.new_zeros(module.weight.shape[0])
        save_folder(path, hf_config, state)


class GPTClassifier(nn.Module):
    """GPT with a linear head on the hidden state of the last real token:

        p(y | x) = softmax(W h_L[last]),  L = L_CE + lambda * L_LM

    The last token is the one that has attended to the whole text (attention is causal). The auxiliary
    L_LM keeps the language-modelling objective alive during finetuning (GPT-1, Radford et al. 2018).
    """

    def __init__(self, gpt, num_labels):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, labels=None, lm_weight=0.0):
        # Right padding and causal attention: real tokens never see the padding after them.
        hidden = self.gpt.forward_hidden(input_ids)                        # (B, T, C)
        last = attention_mask.sum(dim=1) - 1                               # (B,) index of the last real token
        pooled = hidden[torch.arange(input_ids.size(0), device=input_ids.device), last]   # (B, C)
        logits = self.head(pooled)                                         # (B, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            if lm_weight > 0:
                lm_logits = self.gpt.lm_head(hidden[:, :-1])               # (B, T-1, V)
                lm_targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
                lm_loss = F.cross_entropy(lm_logits.reshape(-1, lm_logits.size(-1)), lm_targets.reshape(-1),
                                          ignore_index=-100)
                loss = loss + lm_weight * lm_loss
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return GPT.configure_optimizers(self, weight_decay, learning_rate, betas, device_type)

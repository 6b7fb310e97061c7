"""GPT-2 from scratch, and the modern decoder it became (Llama, Qwen): one decoder-only Transformer language
model, in pure PyTorch.

    h_0 = W_e[x] + W_p[position]                        token + learned position embeddings
    h_l = h_{l-1} + MultiHead(LN(h_{l-1}))              pre-LayerNorm causal self-attention
    h_l = h_l + FFN(LN(h_l))                            FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, 4x wide
    p(x_t | x_<t) = softmax(LN(h_L) W_e^T)              LM head tied to the token embedding

trained with L_LM = -sum_t log p(x_t | x_<t). That is GPT-2, the default `GPTConfig`. Five switches of the
config turn it into Llama 3, SmolLM2, TinyLlama, Qwen2/2.5 or Qwen3, each one change of a later paper:

    norm="rmsnorm"        LN -> RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g         Zhang & Sennrich 2019
    pos="rope"            no W_p; q and k rotated by their position (RoPE)         Su et al. 2021
    mlp="swiglu"          FFN(x) = W2 (silu(W1 x) * W3 x)                          Shazeer 2020
    n_kv_head < n_head    grouped-query attention: K/V heads shared by query heads Ainslie et al. 2023
    qk_norm=True          RMSNorm on q and k of each head (Qwen3)                  Dehghani et al. 2023
    (and bias=False, qkv_bias, head_dim, tie_word_embeddings=False: which matrices have biases, how wide a
    head is, whether the LM head is its own matrix)

Parameter names follow the Hugging Face GPT-2 checkpoints (`transformer.h.0.attn.c_attn.weight`...), so
`GPT.from_pretrained` loads real GPT-2 weights; Llama and Qwen checkpoints map onto the same names through
one table (`GPT.hf_decoder_names`). `save_pretrained` writes a folder that transformers loads as either
family (through `common/safetensors.py`, without the `safetensors` package).
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
    block_size: int = 256         # longest sequence (number of learned positions; RoPE: max_position_embeddings)
    vocab_size: int = 1024        # token ids are 0 .. vocab_size - 1
    n_layer: int = 4              # Transformer blocks
    n_head: int = 4               # attention heads per block
    n_embd: int = 256             # width d_model; each head gets d_k = n_embd / n_head (unless head_dim)
    dropout: float = 0.0          # on embeddings, attention weights and residual branches
    bias: bool = True             # biases in Linear and LayerNorm (GPT-2 has them, Llama and Qwen do not)
    attn_impl: str = "sdpa"       # "sdpa" (fused F.scaled_dot_product_attention) or "explicit"
    layer_norm_eps: float = 1e-5  # GPT-2's epsilon
    # The modern decoder (Llama, Qwen): each switch below is one change to GPT-2, whose values are the defaults
    norm: str = "layernorm"               # "layernorm", or "rmsnorm": x / sqrt(mean(x^2) + eps) * g
    rms_norm_eps: float = 1e-6            # RMSNorm's epsilon (Llama 3: 1e-5, Qwen: 1e-6)
    pos: str = "learned"                  # "learned" (W_p), or "rope": q, k at position m turned by m theta^(-2i/d)
    rope_theta: float = 10000.0           # RoPE's base theta (Llama 3: 500000)
    rope_scaling: dict | None = None      # None, or Llama 3's {"rope_type": "llama3", "factor", "low_freq_factor",
                                          #   "high_freq_factor", "original_max_position_embeddings"}
    mlp: str = "gelu"                     # "gelu": GELU(x W_1) W_2, or "swiglu": W2 (silu(W1 x) * W3 x)
    intermediate_size: int | None = None  # hidden width of the FFN; None: 4 n_embd
    n_kv_head: int | None = None          # key/value heads (grouped-query attention); None: n_head; 1: multi-query
    head_dim: int | None = None           # d_k of each head; None: n_embd / n_head (Qwen3: n_head d_k != n_embd)
    qkv_bias: bool | None = None          # biases of W^Q, W^K, W^V; None: as `bias` (Qwen2: True with bias False)
    qk_norm: bool = False                 # RMSNorm on q and k of each head, before RoPE (Qwen3)
    tie_word_embeddings: bool = True      # LM head = W_e^T; False: a matrix of its own (Llama 3 8B, Qwen3 8B)

    def __post_init__(self):
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name, allowed in [("attn_impl", ("sdpa", "explicit")), ("norm", ("layernorm", "rmsnorm")),
                              ("pos", ("learned", "rope")), ("mlp", ("gelu", "swiglu"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0):
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.d_head % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim ({self.d_head}) must be even")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            if self.pos != "rope" or scaling.pop("rope_type", None) != "llama3":
                raise ValueError(f"rope_scaling {self.rope_scaling!r} is not supported: only pos='rope' with "
                                 "rope_type 'llama3' (Llama 3's low-frequency rescaling)")
            if sorted(scaling) != sorted(LLAMA3_SCALING_KEYS):
                raise ValueError(f"rope_scaling of type 'llama3' needs exactly {', '.join(LLAMA3_SCALING_KEYS)}; "
                                 f"got {', '.join(sorted(scaling))}")

    # The defaults that depend on other fields, resolved where they are used (the fields stay None, so that
    # dataclasses.replace(config, n_head=8) still means what it says).
    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def d_head(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def ffn_width(self):
        return self.intermediate_size or 4 * self.n_embd


# scaled_dot_product_attention shares each K/V head among its query heads itself (enable_gqa) since torch 2.5,
# without the copies repeat_interleave makes; before, the heads are repeated here.
SDPA_SHARES_KV_HEADS = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)
# True while torch.compile traces: eager-only fast paths step aside (torch.compiler's is torch 2.3+)
is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# The original of check_token_ids: 01-04, 06 and 07 carry identical copies, marked "same as 05_gpt/model.py".
def check_token_ids(ids, vocab_size):
    """Raise a clear ValueError for an id outside [0, vocab_size): the embedding lookup would otherwise
    fail deep inside torch ("index out of range in self"). One min/max (a single device sync), skipped
    while torch.compile traces (torch.compiler.is_compiling is torch 2.3+; torch._dynamo's before)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None) or getattr(torch._dynamo, "is_compiling", None)
    if ids.numel() and not (is_compiling and is_compiling()):
        for token_id in torch.stack(torch.aminmax(ids)).tolist():
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (vocab_size {vocab_size})")


class KVCache:
    """Keys and values of every layer for the tokens processed so far.

    `layers[i]` is None or a pair (k, v), each (B, n_kv_head, T_past, d_k): with grouped-query attention the
    cache holds only the K/V heads, n_head / n_kv_head times less memory than one per query head. Keys are
    cached after RoPE, each rotated by its own position. A forward pass given a cache appends its new keys
    and values in place, so the next call only feeds the new tokens. A cache can also start pre-filled,
    e.g. with learned per-layer prefixes: `KVCache(n_layer, [(k0, v0), ...])`.

    With `capacity` (generate gives prompt + new tokens), each layer's keys and values go into buffers of
    that length, allocated once and written in place, instead of a new, longer tensor at every step; only
    without autograd (training through a cache, as prefix tuning does, concatenates).
    """

    def __init__(self, n_layer, layers=None, capacity=None):
        self.layers = list(layers) if layers is not None else [None] * n_layer
        if len(self.layers) != n_layer:
            raise ValueError(f"KVCache needs {n_layer} layers, got {len(self.layers)}")
        self.capacity = capacity
        self.buffers = [None] * n_layer       # (k, v) of shape (B, nkv, capacity, hs), once allocated

    @property
    def length(self):
        """T_past: how many positions the cache holds (a Python int, no device sync)."""
        return 0 if self.layers[0] is None else self.layers[0][0].size(2)

    def update(self, layer_idx, k, v):
        """Append this step's k, v (B, nkv, T, hs) to layer `layer_idx`; return all keys and values."""
        past = self.layers[layer_idx]
        T_past = 0 if past is None else past[0].size(2)
        T_total = T_past + k.size(2)
        if self.capacity is None or T_total > self.capacity or torch.is_grad_enabled():
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            self.layers[layer_idx] = (k, v)
            return k, v
        if self.buffers[layer_idx] is None:
            shape = (k.size(0), k.size(1), self.capacity, k.size(3))
            self.buffers[layer_idx] = (k.new_empty(shape), v.new_empty(shape))
            if past is not None:
                self.buffers[layer_idx][0][:, :, :T_past] = past[0]
                self.buffers[layer_idx][1][:, :, :T_past] = past[1]
        buffer_k, buffer_v = self.buffers[layer_idx]
        buffer_k.narrow(2, T_past, k.size(2)).copy_(k)             # buffer[:, :, T_past:T_total] = k
        buffer_v.narrow(2, T_past, v.size(2)).copy_(v)
        self.layers[layer_idx] = (buffer_k.narrow(2, 0, T_total), buffer_v.narrow(2, 0, T_total))
        return self.layers[layer_idx]


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g, over the last dimension (Zhang & Sennrich 2019).

    LayerNorm without the mean subtraction and the bias: [3, 4] -> mean(x^2) = 12.5 -> [0.85, 1.13] (g = 1).
    Computed in float32 and cast back before the gain, as Llama and Qwen do, so a bf16 model matches theirs.
    `formula` is the definition, differentiated by autograd; in eager mode the forward runs `RMSNormFunction`
    instead, the same numbers with a hand-written backward (a test keeps the two equal).
    """

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))             # g
        self.eps = eps
        self.normalized_shape = (dim,)                          # as nn.LayerNorm's, which chapter 07 reads

    def formula(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def forward(self, x):
        if is_compiling():   # torch.compile fuses the formula itself
            return self.formula(x)
        if torch.is_grad_enabled():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return self.weight * rms_normalize(x, self.eps)[0].to(x.dtype)   # inference: no graph to record


def rms_normalize(x, eps):
    """(x^, r): x^ = x r in float32, r = 1 / sqrt(mean(x^2) + eps) per row, (..., 1). Two passes over x (the
    sum of squares in one reduction, then the product), where the formula makes four."""
    x32 = x.float()
    r = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
    return x32 * r, r


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out, for eager mode: autograd's graph of the formula is ~15 small
    elementwise kernels on a CPU (LayerNorm is one fused kernel each way); this is 3 forward, 5 backward.
    With r = 1 / sqrt(mean(x^2) + eps) per row (a scalar), x^ = x r and y = g x^:

        dL/dg = sum over rows of dy * x^
        dL/dx = r (dy g - x^ mean(dy g x^))

    the second term removes the component along x^, the direction in which scaling x leaves x^ unchanged;
    both terms share P = dy * x^: dL/dg = sum of P's rows, mean(dy g x^) = P g / C.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        x_hat, r = rms_normalize(x, eps)                                       # (..., C), (..., 1)
        ctx.save_for_backward(x_hat, weight, r)
        ctx.x_dtype = x.dtype
        return weight * x_hat.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, r = ctx.saved_tensors
        dy, g, C = dy.float(), weight.float(), x_hat.size(-1)
        P = (dy * x_hat).reshape(-1, C)                                        # (rows, C)
        along = (P @ g).view(r.shape).div_(C)                                  # mean(dy g x^), (..., 1)
        dx = torch.mul(dy, g).addcmul_(x_hat, along, value=-1).mul_(r)
        return dx.to(ctx.x_dtype), P.sum(0).to(weight.dtype), None


def make_norm(config, dim):
    """The block's normalisation: LayerNorm (GPT-2) or RMSNorm (Llama, Qwen)."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.rms_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoPE, Su et al. 2021) in the Hugging Face half-split layout: dimension i
    of a head is paired with i + d/2 (i < d/2), and the pair at position m is rotated by the angle m w_i,

        RoPE(x, m)_i       = x_i cos(m w_i) - x_{i+d/2} sin(m w_i),        w_i = theta^(-2i/d)
        RoPE(x, m)_{i+d/2} = x_{i+d/2} cos(m w_i) + x_i sin(m w_i),

    i.e. RoPE(x, m) = x cos + rotate_half(x) sin with rotate_half([x1, x2]) = [-x2, x1]. Rotating q by m and
    k by n leaves q_m . k_n = q^T R(n - m) k: attention scores depend on m - n only, and a cached key keeps
    the rotation of its own position. The fast frequencies (w_0 = 1 rad per token) resolve nearby tokens,
    the slow ones (wavelength 2 pi / w_i up to ~2 pi theta tokens) far ones.

    Llama 3 (rope_scaling "llama3") stretches the context by dividing the slow frequencies by `factor`:
    with L = original_max_position_embeddings, a wavelength above L / low_freq_factor is divided, one below
    L / high_freq_factor is kept, and those in between interpolate, s = (L / wavelength - low_freq_factor)
    / (high_freq_factor - low_freq_factor), w <- (1 - s) w / factor + s w.
    """

    def __init__(self, config):
        super().__init__()
        d = config.d_head
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)   # w_i, (d/2,)
        if config.rope_scaling is not None:
            scaling = config.rope_scaling
            factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            L = scaling["original_max_position_embeddings"]
            wavelength = 2 * math.pi / inv_freq
            smooth = (L / wavelength - low) / (high - low)
            interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
            inv_freq = torch.where(wavelength > L / low, inv_freq / factor,
                                   torch.where(wavelength < L / high, inv_freq, interpolated))
        self.register_buffer("inv_freq", inv_freq, persistent=False)   # derived from the config, never saved

    def forward(self, positions, dtype=torch.float32):
        """positions (T,) or (B, T) -> (cos, sin) of the angles m w_i, each (1 or B, 1, T, d/2): broadcast over
        the heads, one per pair (i, i + d/2). The angles are computed in float32; cos and sin are given in
        `dtype`, the residual stream's (as Llama)."""
        angles = positions[..., None].float() * self.inv_freq.float()  # (.., T, d/2): m w_i
        if angles.dim() == 2:
            angles = angles[None]                                        # (1, T, d/2): the same for every row
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """x (B, h, T, d) rotated by the angles of its positions, the docstring's two lines:
    [x1 cos - x2 sin, x2 cos + x1 sin] for the halves x1, x2 = x[..., :d/2], x[..., d/2:]."""
    if is_compiling() or not torch.is_grad_enabled():   # compiled: fused by torch.compile; no backward
        x1, x2 = x.chunk(2, dim=-1)                                      # (B, h, T, d/2) each
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return RotaryFunction.apply(x, cos, sin)   # eager training: the same numbers, a cheaper backward


def rotate_into(x, cos, sin):
    """The formula of apply_rope with each half written in place: 2 kernels per half, where the formula
    makes 3 temporaries and a concatenation."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    y1, y2 = rotated.chunk(2, dim=-1)                                    # views of its two halves
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=-1)              # x1 cos - x2 sin
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin)                         # x2 cos + x1 sin
    return rotated


class RotaryFunction(torch.autograd.Function):
    """apply_rope with its gradient: a rotation's transpose is the rotation back, R(m w)^T = R(-m w), so
    dL/dx = rotate_into(dL/dy, cos, -sin). One rotation, where autograd would keep the formula's
    temporaries and differentiate each product and the concatenation apart."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return rotate_into(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotate_into(dy, cos, -sin).to(ctx.x_dtype), None, None


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, computed for h = n_head heads in parallel;
    MultiHead(x) = Concat(head_1, ..., head_h) W^O with head_i = Attention(x W_i^Q, x W_i^K, x W_i^V).
    W^Q, W^K, W^V of all heads are one matrix `c_attn` (n_embd -> 3 n_embd); W^O is `c_proj`.

    Grouped-query attention (n_kv_head < n_head; Ainslie et al. 2023) has n_kv_head key/value heads, each
    serving n_head / n_kv_head query heads: c_attn is n_embd -> (n_head + 2 n_kv_head) d_k, and the cache
    stores n_kv_head heads. n_kv_head = 1 is multi-query attention, n_kv_head = n_head plain multi-head.
    With RoPE, q and k are rotated by their positions (after QK-norm, when qk_norm: RMSNorm over the d_k
    of each head, Qwen3), before k goes into the cache.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # which entry of a KVCache belongs to this layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.d_head
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv_sizes = [q_width, kv_width, kv_width]               # the rows of W^Q, W^K, W^V in c_attn
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.uses_rope = config.pos == "rope"
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, rope=None):
        """x: (B, T, C). mask: None for plain causal attention, else a bool (B or 1, 1, T, T_total)
        tensor, True where a query may see a key (built once per forward by `GPT.causal_padding_mask`).
        rope: the (cos, sin) of the T new positions (from `GPT.rotary`), when the model uses RoPE."""
        B, T, C = x.shape                                        # batch, time, channels (d_model)
        # one matmul for all three projections; its rows are the heads of q, then of k, then of v
        qkv = self.c_attn(x).view(B, T, -1, self.head_dim).transpose(1, 2)      # (B, nh + 2 nkv, T, hs)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, nh or nkv, T, hs)
        if self.uses_rope and rope is None:
            raise ValueError("this attention uses RoPE: pass rope=(cos, sin) of the positions")
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)                # QK-norm, per head over hs
        if self.uses_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)    # rotate each by its own position
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)            # (B, nkv, T_total, hs), T_total = T_past + T
        grouped = self.n_kv_head != self.n_head
        if grouped and not (self.attn_impl == "sdpa" and SDPA_SHARES_KV_HEADS):  # each K/V head serves nh / nkv
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)         # query heads: (B, nh, T_total, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            grouped = False
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1,                # mask None and T > 1 implies no cache
                **({"enable_gqa": True} if grouped else {}))
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T_total)
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v                                          # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # concatenate the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, with the tanh approximation of GELU (as GPT-2)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_width, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.ffn_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """The gated FFN of Llama and Qwen (Shazeer 2020): FFN(x) = W2 (silu(W1 x) * W3 x), silu(z) = z sigmoid(z).

    The gate W1 and the up-projection W3 are one matrix c_fc = [W1; W3] (n_embd -> 2 intermediate_size),
    one matmul as c_attn is for q, k, v; W2 is c_proj. Three matrices instead of GELU's two, so models keep
    the parameter count with intermediate_size ~ 8/3 n_embd instead of 4 n_embd.
    """

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.ffn_width, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)                                         # [W1 x, W3 x]: (B, T, 2 intermediate_size)
        eager_training = torch.is_grad_enabled() and not is_compiling()
        gated = GatedSiLUFunction.apply(h) if eager_training else self.gate(h)   # silu(W1 x) * W3 x
        return self.dropout(self.c_proj(gated))

    @staticmethod
    def gate(h):
        """silu(W1 x) * W3 x from h = [W1 x, W3 x], differentiated by autograd (GatedSiLUFunction in eager)."""
        gate, up = h.chunk(2, dim=-1)                            # W1 x, W3 x: (B, T, intermediate_size) each
        return F.silu(gate) * up


class GatedSiLUFunction(torch.autograd.Function):
    """SwiGLU.gate with its gradient written straight into the two halves of one tensor: for y = silu(g) * u,
    dL/du = dy silu(g) and dL/dg = dy u silu'(g). Autograd would compute them apart and then copy both into
    place (the backward of chunk: a concatenation as wide as 2 intermediate_size, the widest tensor of the
    block); written in place, eager mode saves that copy. torch.compile fuses SwiGLU.gate itself."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        activated = F.silu(gate)                                 # silu(g) = g sigmoid(g)
        ctx.save_for_backward(h, activated)
        return activated * up

    @staticmethod
    def backward(ctx, dy):
        h, activated = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)                       # views: written in place
        torch.mul(dy, activated, out=d_up)                       # dL/du = dy silu(g)
        torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=d_gate)   # dL/dg = (dy u) silu'(g)
        return dh


class Block(nn.Module):
    """Pre-LN Transformer block: x = x + Attention(LN(x)); x = x + FFN(LN(x)). LN is RMSNorm in the modern
    decoder, FFN the SwiGLU one."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x, mask=None, cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), mask, cache, rope)
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
        learned = config.pos == "learned"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),       # W_e, token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd) if learned else None,  # W_p, learned positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.rotary = None if learned else RotaryEmbedding(config)   # RoPE: no W_p, q and k are rotated
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
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
        """Number of parameters; non_embedding leaves out the position embeddings (none with RoPE). The
        token embeddings stay counted: tied to the LM head, they do the work of the output layer's matmul."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        wpe = self.transformer.wpe
        return n - wpe.weight.numel() if non_embedding and wpe is not None else n

    def num_flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Q T.

        6 N: each weight does a multiply-add (2 FLOPs) per token forward, twice that backward.
        12 L H Q T: the attention scores Q K^T and the weighted sum with V, over T keys, for L layers
        of H heads of width Q. Divide achieved FLOPs/s by the hardware peak to get MFU.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_parameters() + 12 * cfg.n_layer * cfg.n_head * cfg.d_head * T

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

        attention_mask: optional (B, T_past + T), 1 for real tokens, 0 for padding; positions (of W_p or
        of RoPE) then count real tokens only, so a left-padded row gets the same result as the unpadded
        one (the outputs at padding positions are meaningless: give them target -100).
        cache: optional KVCache, extended in place with this chunk's keys and values.
        """
        B, T = idx.shape
        T_past = cache.length if cache is not None else 0
        if T_past + T > self.config.block_size:
            raise ValueError(f"sequence of {T_past + T} tokens ({T_past} cached + {T} new) exceeds "
                             f"block_size {self.config.block_size}")
        check_token_ids(idx, self.config.vocab_size)
        if attention_mask is None:
            positions = torch.arange(T_past, T_past + T, device=idx.device)    # (T,)
        else:
            if attention_mask.shape != (B, T_past + T):
                raise ValueError(f"attention_mask must have shape {(B, T_past + T)} (batch, cached + "
                                 f"new tokens), got {tuple(attention_mask.shape)}")
            # the i-th real token of a row sits at position i, however much padding precedes it
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, T_past:]  # (B, T)
        mask = self.causal_padding_mask(T, T_past, attention_mask, idx.device)
        x, rope = self.transformer.wte(idx), None                                   # (B, T, C)
        if self.rotary is None:
            x = x + self.transformer.wpe(positions)
        else:
            rope = self.rotary(positions, x.dtype)      # cos, sin of each position's angles, for every layer
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, mask, cache, rope)
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
            cache = KVCache(self.config.n_layer, capacity=idx.size(1) + max_new_tokens) if use_cache else None
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
        """Load a Hugging Face folder: config.json plus model.safetensors or pytorch_model.bin (or the
        sharded index of either), of GPT-2 or of a modern decoder (model_type "llama": Llama 2/3,
        SmolLM2, TinyLlama; "qwen2": Qwen2/2.5; "qwen3"), whose weights are read through the
        `hf_decoder_names` table. Weights of any dtype (bf16, fp16, fp32) load into the float32 model.

        For GPT-2, the CONV1D_WEIGHTS are transposed to nn.Linear's (out, in). The attn.bias /
        attn.masked_bias buffers of older checkpoints are causal masks, not parameters, and are skipped.
        """
        path = Path(path)
        config_file = path / "config.json"
        hf = read_config(path)
        model_type = hf.get("model_type", "gpt2")      # the original OpenAI conversion has no model_type
        if model_type in HF_DECODERS:
            return cls._from_pretrained_decoder(path, hf, dropout, attn_impl)
        if model_type != "gpt2":
            raise ValueError(f"{config_file}: model_type={model_type!r} is not supported "
                             f"(supported: gpt2, {', '.join(HF_DECODERS)})")
        for key, supported in [("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
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
                               bias=True, attn_impl=attn_impl, intermediate_size=hf.get("n_inner"))
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

    @classmethod
    def _from_pretrained_decoder(cls, path, hf, dropout, attn_impl):
        """from_pretrained for a Llama / Qwen2 / Qwen3 folder: its config, then each of our parameters
        from the Hugging Face tensors `hf_decoder_names` lists (stacked along dim 0 where we fuse them)."""
        model = cls(config_from_hf_decoder(hf, path / "config.json", dropout=dropout, attn_impl=attn_impl))
        checkpoint = load_folder(path)
        table = model.hf_decoder_names()
        wanted = {hf_name for parts in table.values() for hf_name, _ in parts}
        # A tied head stored anyway is ignored, as transformers ties it again; older checkpoints hold
        # RoPE's inverse frequencies as a buffer, which we compute from the config.
        ignored = {name for name in checkpoint if name.endswith("rotary_emb.inv_freq")}
        if model.config.tie_word_embeddings:
            ignored.add("lm_head.weight")
        missing, unexpected = sorted(wanted - set(checkpoint)), sorted(set(checkpoint) - wanted - ignored)
        if missing or unexpected:
            raise ValueError(f"{path} does not match a {hf['model_type']} of this config: missing {missing[:4]} "
                             f"({len(missing)} in all), unexpected {unexpected[:4]} ({len(unexpected)} in all)")
        ours = model.state_dict()
        with torch.no_grad():
            for name, parts in table.items():
                for hf_name, rows in parts:
                    expected = (rows or ours[name].shape[0], *ours[name].shape[1:])
                    if tuple(checkpoint[hf_name].shape) != expected:
                        raise ValueError(f"{path}: {hf_name} has shape {tuple(checkpoint[hf_name].shape)}, "
                                         f"expected {expected}")
                ours[name].copy_(torch.cat([checkpoint[hf_name] for hf_name, _ in parts]))
        return model

    def hf_decoder_names(self):
        """{our parameter name: [(Hugging Face name, rows), ...]}: the one table from which from_pretrained
        and save_pretrained map a Llama / Qwen2 / Qwen3 checkpoint onto this model. Most of ours are one of
        theirs (rows None: the whole tensor); c_attn and c_fc stack several along dim 0, each with its
        number of rows, so that q, k, v (and gate, up) are one matmul here as in GPT-2:

            transformer.h.0.attn.c_attn.weight <- [q_proj (nh d_k rows); k_proj (nkv d_k); v_proj (nkv d_k)]
            transformer.h.0.mlp.c_fc.weight    <- [gate_proj (W1, intermediate_size rows); up_proj (W3, same)]
        """
        cfg = self.config
        q_rows, kv_rows, ffn_rows = cfg.n_head * cfg.d_head, cfg.kv_heads * cfg.d_head, cfg.ffn_width
        modules = {"transformer.wte": [("model.embed_tokens", None)], "transformer.ln_f": [("model.norm", None)],
                   "lm_head": [("lm_head", None)]}
        for i in range(cfg.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            modules.update({
                ours + "ln_1": [(theirs + "input_layernorm", None)],
                ours + "attn.c_attn": [(theirs + "self_attn.q_proj", q_rows),
                                       (theirs + "self_attn.k_proj", kv_rows),
                                       (theirs + "self_attn.v_proj", kv_rows)],
                ours + "attn.q_norm": [(theirs + "self_attn.q_norm", None)],                 # Qwen3
                ours + "attn.k_norm": [(theirs + "self_attn.k_norm", None)],
                ours + "attn.c_proj": [(theirs + "self_attn.o_proj", None)],
                ours + "ln_2": [(theirs + "post_attention_layernorm", None)],
                ours + "mlp.c_fc": [(theirs + "mlp.gate_proj", ffn_rows), (theirs + "mlp.up_proj", ffn_rows)],
                ours + "mlp.c_proj": [(theirs + "mlp.down_proj", None)],
            })
        names = {}
        for name in self.state_dict():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue                                       # the same matrix as wte.weight
            module, _, kind = name.rpartition(".")             # "transformer.h.0.attn.c_attn", "weight"
            names[name] = [(f"{hf_module}.{kind}", rows) for hf_module, rows in modules[module]]
        return names

    def hf_family(self):
        """The Hugging Face model_type this architecture is: "gpt2"; "llama" (RMSNorm, RoPE, SwiGLU, GQA, no
        biases or biases everywhere); "qwen2" (the same with q, k, v biases alone); "qwen3" (with QK-norm, no
        biases). A mix that no family has (RoPE with LayerNorm, GPT-2 with GQA...) is a ValueError."""
        cfg = self.config
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        switches = (cfg.norm, cfg.pos, cfg.mlp)
        if switches == ("layernorm", "learned", "gelu"):
            if (cfg.kv_heads == cfg.n_head and cfg.d_head * cfg.n_head == cfg.n_embd and not cfg.qk_norm
                    and cfg.tie_word_embeddings):
                return "gpt2"
        elif switches == ("rmsnorm", "rope", "swiglu"):
            if cfg.qk_norm and not qkv_bias and not cfg.bias:
                return "qwen3"
            if not cfg.qk_norm and qkv_bias and not cfg.bias:
                return "qwen2"
            if not cfg.qk_norm and qkv_bias == cfg.bias:
                return "llama"
        raise ValueError(f"no Hugging Face family has this architecture (norm={cfg.norm!r}, pos={cfg.pos!r}, "
                         f"mlp={cfg.mlp!r}, n_kv_head={cfg.n_kv_head}, head_dim={cfg.head_dim}, bias={cfg.bias}, "
                         f"qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings}): it cannot be saved as one")

    def save_pretrained(self, path, eos_token_id=None):
        """Write a folder that transformers loads: config.json + model.safetensors, each atomically, as
        GPT2LMHeadModel, or LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM for a modern decoder
        (`hf_family` says which). The inverse of from_pretrained: the CONV1D_WEIGHTS go back to (in, out),
        c_attn and c_fc are split back into the tensors `hf_decoder_names` lists, and a tied
        lm_head.weight is left out (it is wte.weight, which transformers ties again on load).

        eos_token_id goes to the config (for GPT-2 as its bos and eos id, both <|endoftext|>); None means
        50256 for GPT-2's own 50257-token vocabulary and no id for any other. A GPT-2 with bias=False is
        written with zero biases, since GPT-2 has a bias in every Linear and LayerNorm: the same function,
        though from_pretrained then gives it back as a bias=True model.
        """
        cfg = self.config
        family = self.hf_family()
        if family != "gpt2":
            ours, state = self.state_dict(), {}
            for name, parts in self.hf_decoder_names().items():
                tensor = ours[name]
                pieces = tensor.split([rows for _, rows in parts]) if len(parts) > 1 else [tensor]
                state.update({hf_name: piece.clone() for (hf_name, _), piece in zip(parts, pieces)})
            save_folder(path, hf_decoder_config(cfg, family, eos_token_id), state)
            return
        if eos_token_id is None and cfg.vocab_size == 50257:
            eos_token_id = 50256
        hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                     "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                     "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.intermediate_size,
                     "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
                     "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                     "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
                     "bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
        state = {name: tensor.t() if name.endswith(self.CONV1D_WEIGHTS) else tensor
                 for name, tensor in self.state_dict().items() if name != "lm_head.weight"}
        for name, module in self.named_modules():          # GPT-2 has a bias everywhere: zeros where we have none
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and module is not self.lm_head:
                state[f"{name}.bias"] = module.weight.new_zeros(module.weight.shape[0])
        save_folder(path, hf_config, state)


# ------------------------------------------------------------------ Hugging Face Llama / Qwen2 / Qwen3 configs
HF_DECODERS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_from_hf_decoder(hf, config_file, dropout=0.0, attn_impl="sdpa"):
    """The GPTConfig of a Llama / Qwen2 / Qwen3 config.json (a dict). What the switches cannot express is a
    ValueError naming the field: sliding windows in use, RoPE scaling other than Llama 3's, an activation
    other than silu, bias combinations the family does not have. (MoE models have model_types of their own,
    which from_pretrained refuses.)"""
    family = hf["model_type"]

    def refuse(key, why):
        raise ValueError(f"{config_file}: {key}={hf.get(key)!r} is not supported ({why})")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "SwiGLU here gates with silu")
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window", "every layer attends to the whole context here")
    if any(layer_type != "full_attention" for layer_type in hf.get("layer_types") or ()):
        refuse("layer_types", "every layer attends to the whole context here")
    # RoPE: the older rope_theta + rope_scaling, or transformers 5's rope_parameters (rope_scaling wins, as there)
    rope_key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(rope_key) or {})
    if any(isinstance(value, dict) for value in rope.values()):
        refuse(rope_key, "one RoPE for all layers here")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        refuse(rope_key, f"rope_type {rope_type!r}; supported: 'default', 'llama3'")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(rope_key, "RoPE rotates the whole head here")
    rope_scaling = None
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        if any(rope.get(key) is None for key in LLAMA3_SCALING_KEYS):
            refuse(rope_key, f"llama3 scaling needs {', '.join(LLAMA3_SCALING_KEYS)}")
        rope_scaling = {"rope_type": "llama3", **{key: rope[key] for key in LLAMA3_SCALING_KEYS}}
    # Biases: Qwen2 has them on q, k, v alone; Llama's attention_bias covers q, k, v, o and mlp_bias the
    # MLP, so `bias` (o and the MLP) needs the two equal; Qwen3's MLP has none, so attention_bias must be off.
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if family == "qwen2":
        qkv_bias, bias = True, False
    elif family == "llama" and attention_bias != mlp_bias:
        refuse("attention_bias", f"with mlp_bias={mlp_bias}: `bias` is the output projection's and the MLP's")
    elif family == "qwen3" and attention_bias:
        refuse("attention_bias", "Qwen3 with attention biases and none in the MLP")
    else:
        qkv_bias = bias = attention_bias
    try:
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        n_kv_head, ffn_width = hf.get("num_key_value_heads") or n_head, hf["intermediate_size"]
        head_dim = hf.get("head_dim") or (128 if family == "qwen3" else n_embd // n_head)  # transformers' defaults
        return GPTConfig(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                         n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd, dropout=dropout,
                         bias=bias, attn_impl=attn_impl, norm="rmsnorm", rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                         pos="rope", rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                         rope_scaling=rope_scaling, mlp="swiglu",
                         # a field equal to its default stays None, so that a saved model loads back equal
                         intermediate_size=None if ffn_width == 4 * n_embd else ffn_width,
                         n_kv_head=None if n_kv_head == n_head else n_kv_head,
                         head_dim=None if head_dim * n_head == n_embd else head_dim,
                         qkv_bias=None if qkv_bias == bias else qkv_bias, qk_norm=family == "qwen3",
                         tie_word_embeddings=hf.get("tie_word_embeddings", False))
    except KeyError as missing:
        raise ValueError(f"{config_file} has no {missing} entry: not a {family} config") from None
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from None


def hf_decoder_config(cfg, family, eos_token_id=None):
    """The config.json of a Llama / Qwen2 / Qwen3 `family` for GPTConfig `cfg`: the inverse of
    config_from_hf_decoder. RoPE is written as rope_theta + rope_scaling, which transformers 4 and 5 read."""
    hf = {"architectures": [HF_DECODERS[family]], "model_type": family, "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_width, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_head,
          "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.rms_norm_eps,
          "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
          "tie_word_embeddings": cfg.tie_word_embeddings, "attention_dropout": cfg.dropout,
          "bos_token_id": None, "eos_token_id": eos_token_id}
    if family == "llama":
        hf.update(attention_bias=cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias, mlp_bias=cfg.bias)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
        if family == "qwen3":
            hf["attention_bias"] = False
    return hf


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

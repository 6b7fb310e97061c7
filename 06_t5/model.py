"""T5: the Text-to-Text Transfer Transformer (Raffel et al., 2020), in its v1.0 and v1.1 forms.

An encoder-decoder Transformer where every task is "prefix: input" -> "target text":

    L_T5 = -sum_i log p(y_i | y_<i, x)

What makes it T5 rather than the 2017 Transformer (03_transformer):
- RMS layer norm: y = w * x / sqrt(mean(x^2) + eps). Scale only: no mean subtracted, no bias.
- No absolute positions. Each attention adds a learned scalar per head to its logits, looked up by the
  *bucketed* relative distance j - i between key j and query i (32 buckets, log-spaced up to 128).
  The bias is computed once per stack, by the first layer, and shared by every layer of that stack.
  Cross-attention has no position bias.
- Attention logits are not scaled by 1/sqrt(d_k): T5 folds that factor into the initialisation of W^Q.
- Pre-norm residual blocks x = x + Dropout(Sublayer(RMSNorm(x))), no biases anywhere, a final norm.
- v1.0: FFN(x) = ReLU(x W_i) W_o, output layer tied to the input embedding, decoder output scaled by
  d_model^-0.5 before it. v1.1: FFN(x) = (GELU_tanh(x W_i0) * x W_i1) W_o and an untied LM head.

Parameter names match the Hugging Face checkpoints one to one (``encoder.block.0.layer.0.SelfAttention.q``),
so ``T5.from_pretrained(folder)`` loads real T5 weights and ``save_pretrained(folder)`` writes a folder that
transformers loads. Only torch, the standard library and `common/safetensors.py` (the checkpoint format,
without the `safetensors` package) are used.
"""

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from common.safetensors import load_folder, read_config, save_folder  # noqa: E402  (Hugging Face folders)


@dataclass
class T5Config:
    # Field names are those of a Hugging Face T5 config.json, so a checkpoint's config maps onto them.
    vocab_size: int = 32128                  # embedding rows (tokens, sentinels included)
    d_model: int = 512                       # width of the residual stream
    d_kv: int = 64                           # width of one attention head (d_k = d_v)
    d_ff: int = 2048                         # inner width of the feed-forward network
    num_layers: int = 6                      # encoder blocks
    num_decoder_layers: int | None = None    # decoder blocks (None: same as the encoder)
    num_heads: int = 8                       # attention heads h
    relative_attention_num_buckets: int = 32  # position-bias buckets per stack
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    dropout_rate: float = 0.1                # dropout on embeddings, sublayers, attention weights
    layer_norm_epsilon: float = 1e-6         # eps of the RMS norm
    initializer_factor: float = 1.0          # multiplies every init std (1.0 in T5)
    feed_forward_proj: str = "relu"          # "relu" (v1.0) or "gated-gelu" (v1.1)
    tie_word_embeddings: bool = True         # v1.0: LM head = embedding, with the d_model^-0.5 rescale
    pad_token_id: int = 0                    # padding; also the decoder start token
    eos_token_id: int = 1                    # end of sequence
    decoder_start_token_id: int = 0          # first decoder input (T5 uses the pad id)
    use_sdpa: bool = True                    # F.scaled_dot_product_attention instead of the explicit path

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Map a relative position j - i (key minus query) to one of `num_buckets` buckets.

    Bidirectional (encoder): half the buckets for j - i <= 0, half for j - i > 0. Causal (decoder): only
    j - i <= 0 is meaningful, so every future position goes to bucket 0 and all buckets are for the past.
    Within a direction of n buckets, distances 0..n/2-1 get a bucket each; larger distances d get
        n/2 + floor(log(d / (n/2)) / log(max_distance / (n/2)) * (n - n/2)),
    capped at n-1, so buckets grow log-wide and everything beyond `max_distance` shares the last one.

    Worked example, bidirectional, 32 buckets, max_distance 128 (n = 16 per direction, 8 exact):
        j - i = -3 -> 3,   +3 -> 16 + 3 = 19,   -12 -> 8 + floor(log(1.5)/log(16) * 8) = 9,
        -1000 -> 15,   +1000 -> 31.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets   # upper half: keys to the right
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)                  # future -> 0
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets for the large distances; clamp(min=1) only avoids log(0) where is_small anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm: y = w * x / sqrt(mean(x^2) + eps), the mean of squares taken in float32."""

    def __init__(self, d_model, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)               # (B, T, 1), float32 on purpose
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):           # a half-precision model stays half
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head attention with T5's additive position bias and no 1/sqrt(d_k):

        Attention(Q, K, V) = softmax(Q K^T + B) V,   B[h, i, j] = b_h(bucket(j - i)) (+ masks),

    for h heads in parallel, then the output projection W^O. No biases in any projection.
    """

    def __init__(self, config: T5Config, has_relative_attention_bias=False, is_decoder=False):
        super().__init__()
        self.n_heads, self.d_kv, self.is_decoder = config.num_heads, config.d_kv, is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.dropout = config.dropout_rate
        self.use_sdpa = config.use_sdpa
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:                                    # only in a stack's first layer
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def compute_bias(self, query_positions, key_positions):
        """Position bias B (1, h, Tq, Tk) for absolute query and key positions (LongTensors)."""
        relative_position = key_positions[None, :] - query_positions[:, None]      # (Tq, Tk): j - i
        bucket = relative_position_bucket(relative_position, bidirectional=not self.is_decoder,
                                          num_buckets=self.num_buckets, max_distance=self.max_distance)
        values = self.relative_attention_bias(bucket)                               # (Tq, Tk, h)
        return values.permute(2, 0, 1).unsqueeze(0)                                # (1, h, Tq, Tk)

    def forward(self, x, attn_bias=None, key_value_states=None, past_kv=None, static_kv=None):
        """x (B, Tq, C) gives the queries; keys/values come from x (self-attention), from
        `key_value_states` (cross-attention), or from `static_kv` (cross-attention keys/values computed
        once from the encoder output). `past_kv` holds earlier steps' self-attention keys/values, which
        the new ones are appended to. `attn_bias` (B or 1, h, Tq, Tk) is added to the logits.
        Returns the output (B, Tq, C) and the (k, v) used, for the cache."""
        B, Tq, _ = x.shape
        q = self.q(x).view(B, Tq, self.n_heads, self.d_kv).transpose(1, 2)         # (B, h, Tq, d_kv)
        if static_kv is not None:
            k, v = static_kv
        else:
            source = x if key_value_states is None else key_value_states
            k = self.k(source).view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)  # (B, h, Tk, d_kv)
            v = self.v(source).view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)
            if past_kv is not None:
                k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            # the bias rides in as a float mask; scale=1.0 because T5 has no 1/sqrt(d_k)
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
        else:
            y = attention_explicit(q, k, v, attn_bias, dropout_p)
        y = y.transpose(1, 2).reshape(B, Tq, self.n_heads * self.d_kv)             # concat heads
        return self.o(y), (k, v)


def attention_explicit(q, k, v, attn_bias=None, dropout_p=0.0):
    """softmax(Q K^T + B) V, written out; the softmax runs in float32. q (B, h, Tq, d), k/v (B, h, Tk, d)."""
    scores = q @ k.transpose(-2, -1)                                               # (B, h, Tq, Tk), unscaled
    if attn_bias is not None:
        scores = scores + attn_bias
    weights = F.softmax(scores.float(), dim=-1).type_as(q)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return weights @ v                                                             # (B, h, Tq, d)


class T5DenseActDense(nn.Module):
    """v1.0 feed-forward: FFN(x) = act(x W_i) W_o (act = ReLU), dropout on the hidden layer."""

    def __init__(self, config: T5Config, act):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = act

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi(x))))


class T5DenseGatedActDense(nn.Module):
    """v1.1 feed-forward (GEGLU): FFN(x) = (GELU_tanh(x W_i0) * x W_i1) W_o."""

    def __init__(self, config: T5Config, act):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = act

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,                                          # exact (erf) GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),     # the tanh GELU of T5 v1.1
    "silu": F.silu,
}


def feed_forward_activation(feed_forward_proj):
    """'relu' -> (ReLU, not gated); 'gated-gelu' -> (tanh GELU, gated), as T5 v1.1 means it."""
    gated = feed_forward_proj.startswith("gated-")
    name = feed_forward_proj.split("-")[-1]
    if feed_forward_proj == "gated-gelu":
        name = "gelu_new"
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported feed_forward_proj {feed_forward_proj!r}; use 'relu' or 'gated-gelu'")
    return ACTIVATIONS[name], gated


class T5LayerSelfAttention(nn.Module):
    """x + Dropout(SelfAttention(RMSNorm(x)))"""

    def __init__(self, config, has_relative_attention_bias, is_decoder):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, is_decoder)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, attn_bias, past_kv=None):
        y, kv = self.SelfAttention(self.layer_norm(x), attn_bias, past_kv=past_kv)
        return x + self.dropout(y), kv


class T5LayerCrossAttention(nn.Module):
    """x + Dropout(EncDecAttention(RMSNorm(x), encoder output)): Q from the decoder, K, V from the encoder."""

    def __init__(self, config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, is_decoder=True)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, encoder_hidden_states, attn_bias, static_kv=None):
        y, kv = self.EncDecAttention(self.layer_norm(x), attn_bias, key_value_states=encoder_hidden_states,
                                     static_kv=static_kv)
        return x + self.dropout(y), kv


class T5LayerFF(nn.Module):
    """x + Dropout(FFN(RMSNorm(x)))"""

    def __init__(self, config):
        super().__init__()
        act, gated = feed_forward_activation(config.feed_forward_proj)
        self.DenseReluDense = T5DenseGatedActDense(config, act) if gated else T5DenseActDense(config, act)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """Encoder block: [self-attention, FFN]. Decoder block: [causal self-attention, cross-attention, FFN]."""

    def __init__(self, config, has_relative_attention_bias, is_decoder):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias, is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, x, self_bias, encoder_hidden_states=None, cross_bias=None, layer_cache=None):
        """layer_cache (decoding only): {"self": (k, v) or None, "cross": (k, v)}, updated in place."""
        past_kv = layer_cache["self"] if layer_cache is not None else None
        x, self_kv = self.layer[0](x, self_bias, past_kv=past_kv)
        if self.is_decoder:
            static_kv = layer_cache["cross"] if layer_cache is not None else None
            x, _ = self.layer[1](x, encoder_hidden_states, cross_bias, static_kv=static_kv)
        if layer_cache is not None:
            layer_cache["self"] = self_kv
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """A stack of blocks: Dropout(embeddings) -> blocks -> final RMS norm -> Dropout.

    The relative position bias is computed once, by the first block's self-attention, and the same tensor
    is given to every block (with the padding mask, or the causal mask in the decoder, folded into it).
    """

    def __init__(self, config: T5Config, is_decoder):
        super().__init__()
        self.is_decoder = is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList([T5Block(config, has_relative_attention_bias=(i == 0), is_decoder=is_decoder)
                                    for i in range(n)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def position_bias(self, query_length, past_length, attention_mask=None, device=None):
        """B (1 or B, h, Tq, past+Tq): the shared position bias plus the causal (decoder) or padding
        (encoder) mask, as large negative numbers where attention is not allowed."""
        query_positions = torch.arange(past_length, past_length + query_length, device=device)
        key_positions = torch.arange(past_length + query_length, device=device)
        bias = self.block[0].layer[0].SelfAttention.compute_bias(query_positions, key_positions)
        neg = torch.finfo(bias.dtype).min
        if self.is_decoder:
            future = key_positions[None, :] > query_positions[:, None]                # (Tq, Tk): j > i hidden
            bias = bias.masked_fill(future, neg)
        if attention_mask is not None:                                                 # (B, Tk) 1 = real
            bias = bias + (1.0 - attention_mask[:, None, None, :].to(bias.dtype)) * neg
        return bias

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cache=None):
        B, T, _ = hidden_states.shape
        past_length = 0
        if cache is not None and cache[0]["self"] is not None:
            past_length = cache[0]["self"][0].size(2)
        self_bias = self.position_bias(T, past_length, None if self.is_decoder else attention_mask,
                                       hidden_states.device)
        cross_bias = None
        if self.is_decoder and encoder_attention_mask is not None:                   # no position bias here
            neg = torch.finfo(self_bias.dtype).min
            cross_bias = (1.0 - encoder_attention_mask[:, None, None, :].to(self_bias.dtype)) * neg
        x = self.dropout(hidden_states)
        for i, block in enumerate(self.block):
            x = block(x, self_bias, encoder_hidden_states, cross_bias, None if cache is None else cache[i])
        return self.dropout(self.final_layer_norm(x))


def shift_right(labels, decoder_start_token_id=0, pad_token_id=0):
    """Decoder inputs from labels (teacher forcing): [start, y_1, ..., y_{n-1}], -100 -> pad.

    [[5, 6, 1, -100]] -> [[0, 5, 6, 1]]
    """
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


# same as 05_gpt/model.py
def check_token_ids(ids, vocab_size):
    """Raise a clear ValueError for an id outside [0, vocab_size): the embedding lookup would otherwise
    fail deep inside torch ("index out of range in self"). One min/max (a single device sync), skipped
    while torch.compile traces (torch.compiler.is_compiling is torch 2.3+; torch._dynamo's before)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None) or getattr(torch._dynamo, "is_compiling", None)
    if ids.numel() and not (is_compiling and is_compiling()):
        for token_id in torch.stack(torch.aminmax(ids)).tolist():
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (vocab_size {vocab_size})")


class T5(nn.Module):
    """T5ForConditionalGeneration: shared embedding -> encoder; shared embedding -> decoder -> LM head."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """T5's initialisation (Mesh TensorFlow): std d^-0.5 for the matrices that read a d-wide input,
        and W^Q with (d_model d_kv)^-0.5, which is where the missing 1/sqrt(d_k) of attention went.
        Embeddings get std 1. The untied v1.1 LM head reads the d_model-wide stream, so it gets
        d_model^-0.5 like every such matrix (Hugging Face draws it with std 1, which starts training
        with logits of std sqrt(d_model) and a loss far above log(vocab))."""
        f = self.config.initializer_factor
        d_model, d_ff, d_kv, h = self.config.d_model, self.config.d_ff, self.config.d_kv, self.config.num_heads
        if isinstance(module, T5LayerNorm):
            nn.init.constant_(module.weight, f * 1.0)
        elif isinstance(module, T5):
            nn.init.normal_(module.shared.weight, std=f * 1.0)
            if not self.config.tie_word_embeddings:
                nn.init.normal_(module.lm_head.weight, std=f * d_model ** -0.5)
        elif isinstance(module, T5DenseActDense):
            nn.init.normal_(module.wi.weight, std=f * d_model ** -0.5)
            nn.init.normal_(module.wo.weight, std=f * d_ff ** -0.5)
        elif isinstance(module, T5DenseGatedActDense):
            nn.init.normal_(module.wi_0.weight, std=f * d_model ** -0.5)
            nn.init.normal_(module.wi_1.weight, std=f * d_model ** -0.5)
            nn.init.normal_(module.wo.weight, std=f * d_ff ** -0.5)
        elif isinstance(module, T5Attention):
            nn.init.normal_(module.q.weight, std=f * (d_model * d_kv) ** -0.5)
            nn.init.normal_(module.k.weight, std=f * d_model ** -0.5)
            nn.init.normal_(module.v.weight, std=f * d_model ** -0.5)
            nn.init.normal_(module.o.weight, std=f * (h * d_kv) ** -0.5)
            if module.has_relative_attention_bias:
                nn.init.normal_(module.relative_attention_bias.weight, std=f * d_model ** -0.5)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    # --- the two halves ---------------------------------------------------------------------------------

    def encode(self, input_ids, attention_mask=None):
        """(B, S) token ids -> encoder output (B, S, d_model)."""
        check_token_ids(input_ids, self.config.vocab_size)
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(self, decoder_input_ids, encoder_hidden_states, attention_mask=None, cache=None):
        """(B, T) decoder ids -> logits (B, T, vocab). `attention_mask` is the encoder's padding mask."""
        check_token_ids(decoder_input_ids, self.config.vocab_size)
        x = self.decoder(self.shared(decoder_input_ids), None, encoder_hidden_states, attention_mask, cache)
        if self.config.tie_word_embeddings:
            # v1.0: the output layer is the embedding; d_model^-0.5 keeps the logits at unit scale
            return F.linear(x * self.config.d_model ** -0.5, self.shared.weight)
        return self.lm_head(x)

    def forward(self, input_ids, decoder_input_ids=None, attention_mask=None, labels=None):
        """Returns (logits (B, T, vocab), loss or None). Without decoder_input_ids they are
        shift_right(labels); label -100 is ignored by the loss."""
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        logits = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    # --- decoding --------------------------------------------------------------------------------------

    def init_cache(self, encoder_hidden_states):
        """One dict per decoder block: cross-attention keys/values computed once from the encoder output,
        self-attention keys/values filled in step by step."""
        cache = []
        for block in self.decoder.block:
            attn = block.layer[1].EncDecAttention
            B, S, _ = encoder_hidden_states.shape
            k = attn.k(encoder_hidden_states).view(B, S, attn.n_heads, attn.d_kv).transpose(1, 2)
            v = attn.v(encoder_hidden_states).view(B, S, attn.n_heads, attn.d_kv).transpose(1, 2)
            cache.append({"self": None, "cross": (k, v)})
        return cache

    def _next_logits(self, tokens, encoder_hidden_states, attention_mask, cache):
        """Logits (B, vocab) for the next token after `tokens` (B, t): with a cache only the last token
        is run through the decoder; without one the whole prefix is recomputed."""
        if cache is None:
            return self.decode(tokens, encoder_hidden_states, attention_mask)[:, -1].float()
        return self.decode(tokens[:, -1:], encoder_hidden_states, attention_mask, cache)[:, -1].float()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, num_beams=1, length_penalty=1.0,
                 use_cache=True):
        """Greedy (num_beams=1) or beam search. Returns one list of token ids per input, EOS removed."""
        if num_beams > 1:
            return self._beam_search(input_ids, attention_mask, max_new_tokens, num_beams, length_penalty,
                                     use_cache)
        cfg = self.config
        B = input_ids.size(0)
        encoder_hidden_states = self.encode(input_ids, attention_mask)               # computed once
        cache = self.init_cache(encoder_hidden_states) if use_cache else None
        tokens = input_ids.new_full((B, 1), cfg.decoder_start_token_id)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            next_token = self._next_logits(tokens, encoder_hidden_states, attention_mask, cache).argmax(-1)
            next_token = next_token.masked_fill(done, cfg.pad_token_id)              # finished rows idle
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == cfg.eos_token_id
            if done.all():
                break
        return [_strip(row[1:].tolist(), cfg.eos_token_id) for row in tokens]

    def _beam_search(self, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, use_cache):
        """Keep the K best prefixes by sum of log-probs; a hypothesis that emits EOS is finished and scored
        sum_logp / length^length_penalty. An input is done once it has K finished hypotheses and no live
        beam can beat the worst of them (the usual heuristic)."""
        cfg, K = self.config, num_beams
        B = input_ids.size(0)
        encoder_hidden_states = self.encode(input_ids, attention_mask)               # computed once ...
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(K, dim=0)    # ... shared by K beams
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(K, dim=0)
        cache = self.init_cache(encoder_hidden_states) if use_cache else None
        tokens = input_ids.new_full((B * K, 1), cfg.decoder_start_token_id)
        beam_scores = torch.zeros(B, K, device=input_ids.device)
        beam_scores[:, 1:] = float("-inf")                                           # K copies of one start
        finished = [[] for _ in range(B)]                                            # (score, ids) per input
        done = [False] * B
        for step in range(1, max_new_tokens + 1):
            logp = F.log_softmax(self._next_logits(tokens, encoder_hidden_states, attention_mask, cache), -1)
            V = logp.size(-1)
            candidates = (beam_scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            top_scores, top_index = candidates.topk(2 * K, dim=1)                    # (B, 2K): enough non-EOS
            new_scores = torch.full((B, K), float("-inf"), device=input_ids.device)
            new_rows = torch.arange(B * K, device=input_ids.device)                  # default: keep own row
            new_tokens = torch.full((B * K,), cfg.pad_token_id, dtype=torch.long, device=input_ids.device)
            for b in range(B):
                if done[b]:
                    continue
                kept = 0
                for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                    beam, token = divmod(index, V)
                    if score == float("-inf"):
                        break
                    if token == cfg.eos_token_id:
                        ids = tokens[b * K + beam, 1:].tolist()
                        finished[b].append((score / step ** length_penalty, ids))
                        continue
                    new_scores[b, kept] = score
                    new_rows[b * K + kept] = b * K + beam
                    new_tokens[b * K + kept] = token
                    kept += 1
                    if kept == K:
                        break
                finished[b] = sorted(finished[b], key=lambda t: -t[0])[:K]
                if kept == 0:                                                        # nothing left alive
                    done[b] = True
                    continue
                best_live = new_scores[b].max().item() / step ** length_penalty
                if len(finished[b]) == K and finished[b][-1][0] >= best_live:
                    done[b] = True
            if all(done):
                break
            beam_scores = new_scores
            tokens = torch.cat([tokens[new_rows], new_tokens[:, None]], dim=1)
            if cache is not None:                                                    # beams were reordered
                for layer_cache in cache:
                    k, v = layer_cache["self"]
                    layer_cache["self"] = (k[new_rows], v[new_rows])
        results = []
        for b in range(B):
            hypotheses = list(finished[b])
            if not done[b]:                                                          # ran out of steps
                length = tokens.size(1) - 1
                for j in range(K):
                    if beam_scores[b, j] > float("-inf"):
                        hypotheses.append((beam_scores[b, j].item() / length ** length_penalty,
                                           tokens[b * K + j, 1:].tolist()))
            results.append(max(hypotheses, key=lambda t: t[0])[1] if hypotheses else [])
        return results

    # --- Hugging Face checkpoint folders ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a Hugging Face T5 folder (config.json + model.safetensors / pytorch_model.bin, or their
        sharded index). Works for v1.0 (t5-small...) and v1.1 (google/t5-v1_1-*, flan-t5-*)."""
        folder = Path(path)
        raw = read_config(folder)
        names = {f.name for f in fields(T5Config)}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        # v1.1 configs say tie_word_embeddings=false. Newer transformers write tie_word_embeddings=true
        # together with scale_decoder_outputs=false for v1.1; the rescale is what tells the variants apart.
        kwargs["tie_word_embeddings"] = bool(raw.get("scale_decoder_outputs", raw.get("tie_word_embeddings", True)))
        kwargs.update(overrides)
        model = cls(T5Config(**kwargs))
        state = load_folder(folder)
        if not model.config.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["shared.weight"]                          # saved tied: same values
        # copies of shared.weight, and a cross-attention bias old checkpoints carry but T5 never uses
        ignored = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                   "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
        if model.config.tie_word_embeddings:
            ignored.add("lm_head.weight")
        state = {k: v for k, v in state.items() if k not in ignored}
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{folder}: checkpoint does not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, tensor in state.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(own[name].shape)}")
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model

    def save_pretrained(self, path):
        """Write a folder that transformers' T5ForConditionalGeneration loads: config.json (the fields of
        T5Config, which are already Hugging Face's) + model.safetensors, each atomically.

        The embedding is written once, as shared.weight: transformers ties encoder.embed_tokens and
        decoder.embed_tokens to it on load, and lm_head too for v1.0. v1.1's own LM head is written as
        lm_head.weight. tie_word_embeddings=false is how v1.1 configs say "no d_model^-0.5 rescale";
        transformers 5 also writes that as scale_decoder_outputs, so the config carries both."""
        cfg = self.config
        hf_config = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "use_sdpa"}
        hf_config.update(architectures=["T5ForConditionalGeneration"], model_type="t5", is_encoder_decoder=True,
                         scale_decoder_outputs=cfg.tie_word_embeddings)
        save_folder(path, hf_config, self.state_dict())


def _strip(ids, eos_token_id):
    """Token ids up to (not including) the first EOS."""
    return ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids


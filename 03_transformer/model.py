"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), from the formulas.

    src ids -> Embed * sqrt(d_model) + PE -> N x EncoderLayer ----------------------------- memory
                                                                                             |
    tgt ids -> Embed * sqrt(d_model) + PE -> N x DecoderLayer (masked self-attn, cross-attn over memory, FFN)
            -> Linear (the same embedding matrix, transposed) -> softmax over the vocabulary

Everything here is plain torch: no data, no training loop, no printing. `train.py` builds the recipe
around it. The parameter names follow `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer` where
they can (`self_attn`, `linear1`, `linear2`, `norm1`...), which is what lets the tests copy weights
across and compare outputs.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    vocab_size: int = 4096        # shared source/target vocabulary (one BPE tokenizer for both sides)
    d_model: int = 512            # width of every residual stream
    n_head: int = 8               # h, attention heads per attention sublayer; d_k = d_v = d_model / h
    n_encoder_layers: int = 6     # N on the encoder side
    n_decoder_layers: int = 6     # N on the decoder side
    d_ff: int = 2048              # inner width of the position-wise FFN
    dropout: float = 0.1          # P_drop: on sublayer outputs, on embeddings + PE, in attention and FFN
    max_len: int = 512            # longest sequence the sinusoid table covers (either side)
    norm_first: bool = False      # False: post-LN x = LN(x + Sublayer(x)) as in the paper; True: pre-LN
    layer_norm_eps: float = 1e-5
    pad_id: int = 0               # only used to zero the embedding of padding, never for masking


# ----------------------------------------------------------------------------------------------------
# positions


def sinusoidal_positions(max_len, d_model):
    """The fixed positional encoding of section 3.5.

        PE(i, 2j)   = sin(i / 10000^(2j / d_model))
        PE(i, 2j+1) = cos(i / 10000^(2j / d_model))

    Each pair of dimensions is a sinusoid of its own wavelength, from 2*pi up to 10000 * 2*pi, so that
    PE(i + k) is a linear function (a rotation) of PE(i) for any fixed offset k.

    >>> sinusoidal_positions(2, 4)        # rows: positions 0 and 1
    tensor([[0.0000, 1.0000, 0.0000, 1.0000],
            [0.8415, 0.5403, 0.0100, 0.9999]])
    """
    position = torch.arange(max_len, dtype=torch.float32)[:, None]               # (L, 1): i
    two_j = torch.arange(0, d_model, 2, dtype=torch.float32)                     # (d/2,): 2j
    angle = position / torch.pow(10000.0, two_j / d_model)                       # (L, d/2)
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])                            # odd d_model: one fewer cos
    return pe


# ----------------------------------------------------------------------------------------------------
# attention


def attention(q, k, v, mask=None, dropout_p=0.0):
    """Scaled dot-product attention, written out (the readable path; chapter 02 derives it).

        Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

    q: (B, h, T, d_k), k and v: (B, h, S, d_k), mask: broadcastable to (B, h, T, S), True = may attend.
    Returns the output (B, h, T, d_k) and the attention weights (B, h, T, S).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))                     # (B, h, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention (section 3.2.2).

        MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O
        head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

    The h projections W_i^Q (d_model x d_k) are stored side by side as one d_model x d_model matrix
    (`q_proj`), likewise for K and V. Self-attention: Q, K and V all come from `x`. Cross-attention
    (`memory` given): Q from the decoder's `x`, K and V from the encoder output `memory`.

    `use_sdpa=True` runs the fused `F.scaled_dot_product_attention`; False runs `attention` above.
    A test checks the two agree.
    """

    use_sdpa = True

    def __init__(self, d_model, n_head, dropout=0.0, bias=True):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)     # W^Q for all heads
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)     # W^K
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)     # W^V
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)   # W^O

    def _heads(self, t):
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)      # (B, h, T, d_k)

    def forward(self, x, memory=None, key_padding_mask=None, is_causal=False, cache=None):
        """x: (B, T, C) queries. memory: (B, S, C) or None for self-attention.

        key_padding_mask: (B, S) bool, True at real keys, False at padding (hidden from every query).
        is_causal: query t sees keys <= t only (decoder self-attention).
        cache: a dict this module reads and fills. Self-attention appends the new K, V to
        cache["k"], cache["v"] (so decoding one token costs one row, not the whole prefix);
        cross-attention computes K, V of `memory` once and reuses them.
        """
        B, T, C = x.shape
        q = self._heads(self.q_proj(x))                                          # (B, h, T, d_k)
        if memory is None:                                                       # self-attention
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            if cache is not None:
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)                        # (B, h, T_past + T, d_k)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:                                 # cross-attention, cached
            k, v = cache["k"], cache["v"]
        else:                                                                    # cross-attention
            k, v = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
            if cache is not None:
                cache["k"], cache["v"] = k, v
        S = k.size(2)

        mask = None                                                              # True = may attend
        if key_padding_mask is not None:
            mask = key_padding_mask.bool()[:, None, None, :]                     # (B, 1, 1, S)
        if is_causal:
            # query t (counted after the S - T cached positions) sees keys 0 .. S - T + t
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            mask = causal if mask is None else mask & causal                     # (B, 1, T, S)

        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            y, _ = attention(q, k, v, mask, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                         # Concat(head_1..head_h)
        return self.out_proj(y)                                                  # ... W^O


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, the same two layers at every position (section 3.3)."""

    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)     # W1, b1
        self.linear2 = nn.Linear(d_ff, d_model)     # W2, b2
        self.dropout = nn.Dropout(dropout)          # on the hidden ReLU, as tensor2tensor and nn.Transformer do

    def forward(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


# ----------------------------------------------------------------------------------------------------
# layers


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each wrapped in a residual connection and LayerNorm.

        post-LN (paper):  x = LN(x + Dropout(Sublayer(x)))
        pre-LN:           x = x + Dropout(Sublayer(LN(x)))

    Post-LN normalises the residual stream itself, so every gradient to the lower layers passes
    through N LayerNorms; early in training that makes large learning rates unstable and is why the
    paper needs warmup. Pre-LN keeps an identity path from the loss to the embeddings.
    """

    def __init__(self, d_model, n_head, d_ff, dropout=0.1, norm_first=False, layer_norm_eps=1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.ffn = PositionwiseFeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask=None):
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), key_padding_mask=key_padding_mask))
            x = x + self.dropout2(self.ffn(self.norm2(x)))
        else:
            x = self.norm1(x + self.dropout1(self.self_attn(x, key_padding_mask=key_padding_mask)))
            x = self.norm2(x + self.dropout2(self.ffn(x)))
        return x


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, FFN; each with residual + LN.

    The causal mask hides positions j > i, so p(y_i | y_<i, x) never sees y_i itself or later tokens.
    In the cross-attention, Q comes from the decoder stream and K, V from `memory` (the encoder output),
    with the source padding hidden.
    """

    def __init__(self, d_model, n_head, d_ff, dropout=0.1, norm_first=False, layer_norm_eps=1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.ffn = PositionwiseFeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x, memory, memory_padding_mask=None, tgt_padding_mask=None, cache=None):
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})

        def self_block(h):
            return self.self_attn(h, key_padding_mask=tgt_padding_mask, is_causal=True, cache=self_cache)

        def cross_block(h):
            return self.cross_attn(h, memory, key_padding_mask=memory_padding_mask, cache=cross_cache)

        if self.norm_first:
            x = x + self.dropout1(self_block(self.norm1(x)))
            x = x + self.dropout2(cross_block(self.norm2(x)))
            x = x + self.dropout3(self.ffn(self.norm3(x)))
        else:
            x = self.norm1(x + self.dropout1(self_block(x)))
            x = self.norm2(x + self.dropout2(cross_block(x)))
            x = self.norm3(x + self.dropout3(self.ffn(x)))
        return x


# ----------------------------------------------------------------------------------------------------
# loss


def label_smoothed_cross_entropy(logits, labels, smoothing=0.0, ignore_index=-100):
    """Cross-entropy against a smoothed target q = (1 - eps) * onehot(y) + eps / V (section 5.4).

        L = -sum_v q_v log p_v = (1 - eps) * (-log p_y) + eps * mean_v(-log p_v)

    Averaged over the positions whose label is not `ignore_index`. eps = 0 is plain cross-entropy.
    Equals F.cross_entropy(..., label_smoothing=eps) (a test checks it).
    """
    logits = logits.reshape(-1, logits.size(-1)).float()                         # (N, V)
    labels = labels.reshape(-1)                                                  # (N,)
    keep = labels != ignore_index
    log_p = F.log_softmax(logits[keep], dim=-1)                                  # (n, V)
    nll = -log_p.gather(1, labels[keep][:, None]).squeeze(1)                     # -log p_y
    uniform = -log_p.mean(dim=-1)                                                # mean_v -log p_v
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


# ----------------------------------------------------------------------------------------------------
# the model


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


class Transformer(nn.Module):
    """Encoder-decoder Transformer with shared embeddings (section 3.4).

    One embedding matrix E (V x d_model) serves three roles: it embeds source tokens, embeds target
    tokens, and (transposed) projects the decoder output to logits. Embeddings are multiplied by
    sqrt(d_model) before the positional encoding is added; with E ~ N(0, 1/d_model) that gives unit-
    variance inputs while the tied output projection stays at a sensible scale.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.register_buffer("pe", sinusoidal_positions(c.max_len, c.d_model), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        args = (c.d_model, c.n_head, c.d_ff, c.dropout, c.norm_first, c.layer_norm_eps)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*args) for _ in range(c.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*args) for _ in range(c.n_decoder_layers))
        # pre-LN leaves the residual stream unnormalised, so a final LayerNorm closes each stack
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("embed"):
                nn.init.xavier_uniform_(p)                        # as the reference implementations do
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.embed.weight, std=self.config.d_model ** -0.5)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def embed_tokens(self, ids, start=0):
        """E[ids] * sqrt(d_model) + PE[start : start + T]; `start` > 0 when decoding with a cache."""
        T = ids.size(1)
        if start + T > self.config.max_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_len={self.config.max_len}")
        check_token_ids(ids, self.config.vocab_size)
        x = self.embed(ids) * math.sqrt(self.config.d_model) + self.pe[start : start + T]  # (B, T, C)
        return self.dropout(x)

    def encode(self, input_ids, attention_mask=None):
        """Source ids (B, S) -> memory (B, S, C). attention_mask: (B, S), 1 at real tokens, 0 at pads."""
        x = self.embed_tokens(input_ids)
        for layer in self.encoder_layers:
            x = layer(x, key_padding_mask=attention_mask)
        return self.encoder_norm(x)

    def decode(self, decoder_input_ids, memory, attention_mask=None, decoder_attention_mask=None,
               cache=None):
        """Target prefix (B, T) + memory (B, S, C) -> logits (B, T, V).

        cache: a list (one dict per decoder layer) that keeps K, V between calls; feed only the new
        tokens and the positions continue from where the cache ends.
        """
        start = 0
        if cache is not None:
            if not cache:
                cache.extend({} for _ in self.decoder_layers)
            start = cache[0]["self"]["k"].size(2) if "self" in cache[0] else 0
        x = self.embed_tokens(decoder_input_ids, start)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, memory, memory_padding_mask=attention_mask,
                      tgt_padding_mask=decoder_attention_mask,
                      cache=None if cache is None else cache[i])
        x = self.decoder_norm(x)
        return x @ self.embed.weight.t()                                         # (B, T, V), tied W_out = E^T

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None,
                labels=None, label_smoothing=0.0):
        """Teacher forcing: the decoder reads y_<i and predicts y_i at every position in parallel.

        Returns (logits (B, T, V), loss or None); labels (B, T) with -100 where no loss is taken.
        """
        memory = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)
        loss = None
        if labels is not None:
            loss = label_smoothed_cross_entropy(logits, labels, label_smoothing)
        return logits, loss

    # ------------------------------------------------------------------------------------------------
    # decoding

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, bos_id, eos_id, max_new_tokens=32,
                 num_beams=1, length_penalty=1.0, use_cache=True):
        """Decode a target for each source row. Returns a list of token lists (no BOS, no EOS).

        num_beams == 1 is greedy search: y_i = argmax_v p(v | y_<i, x). Otherwise beam search.
        use_cache=False recomputes the whole prefix at every step (the slow reference: same output).
        """
        memory = self.encode(input_ids, attention_mask)
        if num_beams == 1:
            return self._greedy(memory, attention_mask, bos_id, eos_id, max_new_tokens, use_cache)
        return self._beam_search(memory, attention_mask, bos_id, eos_id, max_new_tokens, num_beams,
                                 length_penalty, use_cache)

    def _next_logits(self, tokens, memory, attention_mask, cache):
        """Logits (B, V) for the token after `tokens` (B, t); with a cache only the last token is fed."""
        if cache is None:
            return self.decode(tokens, memory, attention_mask)[:, -1]
        return self.decode(tokens[:, -1:], memory, attention_mask, cache=cache)[:, -1]

    def _greedy(self, memory, attention_mask, bos_id, eos_id, max_new_tokens, use_cache):
        B = memory.size(0)
        tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        cache = [] if use_cache else None
        for _ in range(max_new_tokens):
            next_token = self._next_logits(tokens, memory, attention_mask, cache).argmax(-1)  # (B,)
            next_token = next_token.masked_fill(done, eos_id)          # finished rows keep emitting EOS
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == eos_id
            if done.all():
                break
        return [_strip(row, eos_id) for row in tokens[:, 1:].tolist()]

    def _beam_search(self, memory, attention_mask, bos_id, eos_id, max_new_tokens, K, alpha, use_cache):
        """Beam search with the length penalty of Wu et al. (2016), which the paper uses (alpha = 0.6):

            score(Y) = log p(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6) ^ alpha

        K hypotheses stay alive per source. A hypothesis that emits EOS leaves the beam and joins the
        finished list (|Y| counts the EOS). A source is done when it has K finished hypotheses and no
        alive one can still beat the worst of them: log-probabilities only fall as a hypothesis grows,
        so the best an alive beam can reach is its log p divided by the largest lp it could get.
        """
        B, S, C = memory.shape
        device = memory.device
        memory = memory.repeat_interleave(K, dim=0)                                       # (B*K, S, C)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(K, dim=0)                   # (B*K, S)

        def lp(length):
            return ((5.0 + length) / 6.0) ** alpha

        tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
        beam_scores = torch.full((B, K), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0                        # all K beams start equal: expand only the first
        finished = [[] for _ in range(B)]              # per source: (score, token list)
        done = [False] * B
        cache = [] if use_cache else None

        for step in range(1, max_new_tokens + 1):     # `step` = |Y| of the hypotheses made this step
            log_p = F.log_softmax(self._next_logits(tokens, memory, attention_mask, cache).float(), -1)
            V = log_p.size(-1)
            candidates = beam_scores[:, :, None] + log_p.view(B, K, V)                    # (B, K, V)
            top_scores, top_ids = candidates.view(B, K * V).topk(2 * K, dim=1)            # (B, 2K)
            top_scores, top_ids = top_scores.tolist(), top_ids.tolist()

            next_beam, next_token, next_score = [], [], []
            for b in range(B):
                alive = []
                for score, idx in zip(top_scores[b], top_ids[b]):
                    beam, token = divmod(idx, V)
                    if score == float("-inf"):
                        break
                    if token == eos_id:
                        if not done[b]:
                            hyp = tokens[b * K + beam, 1:].tolist()
                            finished[b].append((score / lp(step), hyp))
                    else:
                        alive.append((b * K + beam, token, score))
                    if len(alive) == K:
                        break
                while len(alive) < K:                                  # only in the first steps
                    alive.append((b * K, eos_id, float("-inf")))
                for row, token, score in alive:
                    next_beam.append(row)
                    next_token.append(token)
                    next_score.append(score)
                if not done[b] and len(finished[b]) >= K:
                    finished[b] = sorted(finished[b], key=lambda f: -f[0])[:K]
                    best_alive = max(s for _, _, s in alive)
                    reachable = best_alive / (lp(max_new_tokens) if alpha > 0 else lp(step))
                    done[b] = reachable <= finished[b][-1][0]
            if all(done):
                break
            order = torch.tensor(next_beam, device=device)
            tokens = torch.cat([tokens[order], torch.tensor(next_token, device=device)[:, None]], dim=1)
            beam_scores = torch.tensor(next_score, device=device).view(B, K)
            if cache is not None:
                _reorder_cache(cache, order)

        results = []
        for b in range(B):
            if not done[b]:                            # ran out of steps: alive beams compete too
                for k in range(K):
                    score = beam_scores[b, k].item()
                    if score > float("-inf"):
                        finished[b].append((score / lp(tokens.size(1) - 1), tokens[b * K + k, 1:].tolist()))
            best = max(finished[b], key=lambda f: f[0])[1] if finished[b] else []
            results.append(_strip(best, eos_id))
        return results


def _strip(ids, eos_id):
    """Cut a decoded row at its first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _reorder_cache(cache, order):
    """Beam search re-picks its K beams each step: the self-attention K, V follow their beams."""
    for layer_cache in cache:
        for key in ("k", "v"):
            layer_cache["self"][key] = layer_cache["self"][key][order]

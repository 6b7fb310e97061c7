"""Scaled dot-product attention, from the formula up.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

written four ways that compute the same thing, each readable on its own:

1. `attention_loop`    one query position at a time, the way the formula reads for a single row;
2. `attention_matrix`  all query positions at once, softmax(Q K^T / sqrt(d_k)) V with one matmul each;
3. `MultiHeadAttention` h heads in parallel with learned W^Q, W^K, W^V, W^O:
       MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)
4. `attention_sdpa`    PyTorch's fused `F.scaled_dot_product_attention` (flash / memory-efficient kernels
   that never store the T x T matrix of weights).

Masks say which keys each query may look at. Here a mask is a boolean tensor that broadcasts to
(..., T_q, T_k), True = "may attend" (the convention of `F.scaled_dot_product_attention`):
- causal:  query i sees keys j <= i, so a language model cannot peek at the token it must predict;
- padding: no query sees a key at a pad position of a batch padded to a common length.
Every query must keep at least one visible key, otherwise its softmax is 0/0.

Why each piece is there:
- Q K^T scores every (query, key) pair by similarity; softmax turns a row of scores into weights that
  are positive and sum to 1; multiplying by V averages the values with those weights.
- 1 / sqrt(d_k): if q and k have independent unit-variance entries, q . k has variance d_k. Without the
  scale the scores grow with d_k, the softmax saturates to one-hot and its gradient vanishes
  (train.py --stage scale measures this).
- several heads: one softmax can only form one weighted average per query; h heads of size d_model / h
  can look at h different places for the same cost.

The file ends with `AttentionLM`, a small language model made of these layers only.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# masks

def causal_mask(T, device=None):
    """(T, T) bool, True on and below the diagonal: query i may attend to keys j <= i.

    Example, T = 3:  [[1, 0, 0],
                      [1, 1, 0],
                      [1, 1, 1]]
    """
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def padding_mask(attention_mask):
    """(B, T) with 1 = real token, 0 = pad  ->  (B, 1, 1, T) bool, True where the key is real.

    The two singleton dimensions broadcast over heads and query positions: a pad key is hidden from
    every query of its own sequence.
    """
    return attention_mask.bool()[:, None, None, :]


def combine_masks(*masks):
    """Logical AND of the masks that are not None (None if all are): a key is visible if every mask allows it."""
    result = None
    for mask in masks:
        if mask is not None:
            result = mask if result is None else result & mask
    return result


# ----------------------------------------------------------------------------------------------------
# 1. one query at a time

def attention_loop(q, k, v, mask=None, is_causal=False):
    """For each query position i:  a_i = softmax_j(q_i . k_j / sqrt(d_k)),  out_i = sum_j a_ij v_j.

    q: (..., T_q, d_k), k: (..., T_k, d_k), v: (..., T_k, d_v), mask broadcastable to (..., T_q, T_k);
    is_causal=True adds the causal mask. Returns (out (..., T_q, d_v), weights (..., T_q, T_k)).
    Slow, and as clear as it gets.
    """
    d_k = q.size(-1)
    T_q, T_k = q.size(-2), k.size(-2)
    if is_causal:
        mask = combine_masks(mask, causal_mask(T_q, q.device))
    if mask is not None:
        mask = mask.expand(*q.shape[:-2], T_q, T_k)
    outputs, weights = [], []
    for i in range(T_q):
        q_i = q[..., i, :]                                                 # (..., d_k)
        scores = (k @ q_i.unsqueeze(-1)).squeeze(-1) / math.sqrt(d_k)     # (..., T_k): q_i . k_j for all j
        if mask is not None:
            scores = scores.masked_fill(~mask[..., i, :], float("-inf"))  # exp(-inf) = 0: hidden keys get no weight
        a_i = torch.softmax(scores, dim=-1)                                # (..., T_k), sums to 1
        outputs.append((a_i.unsqueeze(-1) * v).sum(dim=-2))               # (..., d_v): weighted average of values
        weights.append(a_i)
    return torch.stack(outputs, dim=-2), torch.stack(weights, dim=-2)


# ----------------------------------------------------------------------------------------------------
# 2. all queries at once

def attention_matrix(q, k, v, mask=None, is_causal=False, scale=True):
    """softmax(Q K^T / sqrt(d_k)) V for all queries at once.

    Same arguments as `attention_loop`; returns (out, weights). `weights` is the full (..., T_q, T_k)
    matrix: memory grows as T^2. `scale=False` drops the 1/sqrt(d_k), for the experiment that shows
    why it is there.
    """
    d_k = q.size(-1)
    if is_causal:
        mask = combine_masks(mask, causal_mask(q.size(-2), q.device))
    scores = q @ k.transpose(-2, -1)                                       # (..., T_q, T_k)
    if scale:
        scores = scores / math.sqrt(d_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)                                # each row sums to 1
    return weights @ v, weights                                            # (..., T_q, d_v)


# ----------------------------------------------------------------------------------------------------
# 4. the fused kernel

def attention_sdpa(q, k, v, mask=None, is_causal=False):
    """`F.scaled_dot_product_attention`: the same formula in one fused call; returns (out, None).

    It dispatches to FlashAttention-style kernels (on GPUs, and on CPUs too) that compute the softmax
    block by block and never store the (T_q, T_k) weights, so there are none to return. Pass the causal
    mask as is_causal=True rather than as a tensor where you can: a (T, T) mask tensor is itself T^2
    memory, while is_causal lets the kernel skip the hidden blocks without building anything.
    """
    if is_causal and mask is not None:                     # SDPA takes one or the other, not both
        mask, is_causal = combine_masks(mask, causal_mask(q.size(-2), q.device)), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal), None


ATTENTION_IMPLS = {"loop": attention_loop, "matrix": attention_matrix, "sdpa": attention_sdpa}


# ----------------------------------------------------------------------------------------------------
# 3. several heads with learned projections

class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    The h per-head projections W_i^Q (d_model x d_k) are stored side by side as one (d_model x d_model)
    linear layer W^Q, and likewise W^K, W^V; d_k = d_v = d_model / h. Parameter names and layout match
    `nn.MultiheadAttention` (in_proj = [W^Q; W^K; W^V], out_proj = W^O) up to the split into four layers.
    `impl` picks how each head's attention is computed: "loop", "matrix" or "sdpa".
    """

    def __init__(self, d_model, n_head, bias=True, impl="sdpa"):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.d_model, self.n_head, self.d_k = d_model, n_head, d_model // n_head
        self.impl = impl
        self.W_q = nn.Linear(d_model, d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_model, bias=bias)
        self.W_o = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x):
        """(B, T, d_model) -> (B, h, T, d_k): head i is the i-th slice of d_k channels."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.d_k).transpose(1, 2)

    def forward(self, query, key, value, mask=None, is_causal=False, impl=None):
        """query (B, T_q, d_model), key/value (B, T_k, d_model), mask broadcastable to (B, h, T_q, T_k),
        is_causal: also hide the future. Returns (out (B, T_q, d_model), weights (B, h, T_q, T_k) or
        None for "sdpa")."""
        attend = ATTENTION_IMPLS[impl or self.impl]
        q = self.split_heads(self.W_q(query))                              # (B, h, T_q, d_k)
        k = self.split_heads(self.W_k(key))                                # (B, h, T_k, d_k)
        v = self.split_heads(self.W_v(value))                              # (B, h, T_k, d_k)
        heads, weights = attend(q, k, v, mask, is_causal)                  # (B, h, T_q, d_k)
        B, _, T_q, _ = heads.shape
        concat = heads.transpose(1, 2).reshape(B, T_q, self.d_model)       # Concat(head_1, ..., head_h)
        return self.W_o(concat), weights


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


# ----------------------------------------------------------------------------------------------------
# a language model made of attention layers

class AttentionLM(nn.Module):
    """A language model built from attention: p(x_t | x_<t) from causal multi-head self-attention.

        h_0 = E[x_t] + S_1[x_{t-1}] + ... + S_w[x_{t-w}] + P[t]   the token, the w tokens before it, its position
        h_l = h_{l-1} + MultiHead(LN(h_{l-1}))  with a causal mask, l = 1..n_layer
        logits = LN(h_L) E^T                                       output layer tied to the token embeddings

    Chapter 01's model saw a fixed window of k tokens and nothing else; here every position can attend
    to every earlier one. The `+` (a residual connection) lets each layer add to what the earlier
    ones wrote instead of replacing it, and LN (LayerNorm) keeps that running sum at a steady scale;
    chapter 03 treats both properly and adds the feed-forward layers this model lacks.

    Why S_1..S_w, a short window of previous-token embeddings (w = `prev_tokens`, 0 = none)? To look
    something up in the context (" a=3 b=7 ? b=" -> "7"), a position holding a value must also know
    which key came before it. Attention alone can learn that too: one head in layer 1 copies the
    previous tokens forward, a head in layer 2 matches the query against them. But that two-step
    circuit only starts to help once both steps exist, and a small model trained from scratch sits on
    a plateau (about 30% on 6 pairs) for thousands of steps before it forms. The window hands every
    position its recent tokens directly, so a single attention step does the lookup (train.py
    --prev_tokens 0 shows the plateau; the README has the numbers).
    """

    def __init__(self, vocab_size, block_size=128, d_model=128, n_head=4, n_layer=2, dropout=0.0,
                 impl="sdpa", prev_tokens=2):
        super().__init__()
        self.block_size = block_size
        self.start_id = vocab_size                                     # "no token here" for S_i before the start
        self.tok_emb = nn.Embedding(vocab_size, d_model)               # E
        self.prev_embs = nn.ModuleList([nn.Embedding(vocab_size + 1, d_model) for _ in range(prev_tokens)])  # S_1..S_w
        self.pos_emb = nn.Embedding(block_size, d_model)               # P: position i has its own vector
        self.norms = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(n_layer)])
        self.attns = nn.ModuleList([MultiHeadAttention(d_model, n_head, impl=impl) for _ in range(n_layer)])
        self.norm_f = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight                      # weight tying: one E for input and output
        self.apply(self._init_weights)
        for attn in self.attns:                                        # keep the residual sum's variance flat in depth
            nn.init.normal_(attn.W_o.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def shifted(self, input_ids, shift):
        """The token `shift` places back at every position: [5, 6, 7], shift 1 -> [S, 5, 6] (S = start_id)."""
        B, T = input_ids.shape
        pad = input_ids.new_full((B, min(shift, T)), self.start_id)
        return torch.cat([pad, input_ids[:, : max(0, T - shift)]], dim=1)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_impl(self, impl):
        """Switch every layer's attention to "loop", "matrix" or "sdpa" (the outputs do not change)."""
        for attn in self.attns:
            attn.impl = impl

    def forward(self, input_ids, labels=None, attention_mask=None, return_attention=False):
        """input_ids (B, T); labels (B, T) already aligned with the logits (-100 = ignore);
        attention_mask (B, T) 1 = real, 0 = pad. Returns (logits (B, T, V), loss or None), plus the
        list of per-layer attention weights (B, h, T, T) if return_attention (computed with "matrix")."""
        B, T = input_ids.shape
        if T > self.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size {self.block_size}")
        check_token_ids(input_ids, self.tok_emb.num_embeddings)
        positions = torch.arange(T, device=input_ids.device)
        h = self.tok_emb(input_ids) + self.pos_emb(positions)                  # (B, T, d_model)
        for shift, prev_emb in enumerate(self.prev_embs, start=1):
            h = h + prev_emb(self.shifted(input_ids, shift))                   # S_shift[x_{t-shift}]
        h = self.dropout(h)
        mask = padding_mask(attention_mask) if attention_mask is not None else None   # (B, 1, 1, T)
        maps = []
        for norm, attn in zip(self.norms, self.attns):
            x = norm(h)
            out, weights = attn(x, x, x, mask, is_causal=True, impl="matrix" if return_attention else None)
            h = h + self.dropout(out)                                          # residual: add, don't replace
            maps.append(weights)
        logits = self.lm_head(self.norm_f(h))                                  # (B, T, vocab_size)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=-100)
        if return_attention:
            return logits, loss, maps
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens tokens after input_ids (B, T), keeping the last block_size as context."""
        for _ in range(max_new_tokens):
            logits, _ = self(input_ids[:, -self.block_size:])
            logits = logits[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids

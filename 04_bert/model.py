"""BERT: a bidirectional Transformer encoder pretrained by masked language modelling and next sentence
prediction (Devlin et al., 2018), written to load the Hugging Face BERT checkpoints unchanged.

    h^0 = LayerNorm(E_word[x] + E_pos[i] + E_seg[s])                      embeddings
    a   = LayerNorm(h^{l-1} + MultiHead(h^{l-1}))                          post-LN encoder block
    h^l = LayerNorm(a + W_2 GELU(W_1 a + b_1) + b_2)
    pooled = tanh(W_p h^L_[CLS] + b_p)                                    pooler
    p(w_i | x~) = softmax(E_word LayerNorm(GELU(W_t h^L_i + b_t)) + b_v)  MLM head, decoder tied to E_word
    p(IsNext | A, B) = softmax(W_nsp pooled + b_nsp)                       NSP head

    L_BERT = L_MLM + L_NSP,   L_MLM = -sum_{i in masked} log p(w_i | x~)

Every module and parameter is named as in Hugging Face's `modeling_bert.py` (``bert.encoder.layer.0.
attention.self.query.weight`` ...), so a checkpoint's state dict maps one-to-one onto this model, and
the config fields are the ones of its ``config.json``. This file imports torch, the standard library and
`common/safetensors.py`, which reads and writes ``model.safetensors`` (a JSON header and raw little-endian
tensors) without the `safetensors` package.
"""

import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from common.safetensors import load_folder, read_config, save_folder  # noqa: E402  (Hugging Face folders)


@dataclass
class BertConfig:
    vocab_size: int = 30522               # word-piece (here BPE) vocabulary, special tokens included
    hidden_size: int = 768                # d_model
    num_hidden_layers: int = 12           # encoder blocks
    num_attention_heads: int = 12         # h heads, d_k = hidden_size / h
    intermediate_size: int = 3072         # FFN inner width, 4 * d_model in the paper
    hidden_act: str = "gelu"              # "gelu" is the exact erf GELU of the reference code
    hidden_dropout_prob: float = 0.1      # dropout on embeddings and on every sublayer output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention weights
    max_position_embeddings: int = 512    # learned absolute positions
    type_vocab_size: int = 2              # segments A and B
    layer_norm_eps: float = 1e-12         # the reference code's epsilon (not PyTorch's 1e-5)
    initializer_range: float = 0.02       # std of the truncated-normal init (plain normal here, as HF)
    pad_token_id: int = 0                 # written to config.json for Hugging Face; the model itself
                                          # finds padding through attention_mask only
    use_sdpa: bool = True                 # F.scaled_dot_product_attention; False: the explicit path

    @classmethod
    def from_dict(cls, d):
        """Build from a Hugging Face ``config.json`` dict; keys this model does not use are ignored."""
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in known})
        if config.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {config.hidden_act!r} not supported (one of {sorted(ACT2FN)})")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return config

    def to_dict(self):
        """The ``config.json`` that Hugging Face's BertForPreTraining reads."""
        d = asdict(self)
        d.pop("use_sdpa")
        return {"architectures": ["BertForPreTraining"], "model_type": "bert", **d}


ACT2FN = {
    "gelu": lambda x: F.gelu(x),                                   # x * Phi(x), Phi the normal CDF (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),           # tanh approximation (GPT-2)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


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


# ----------------------------------------------------------------------------------------- embeddings

class BertEmbeddings(nn.Module):
    """h^0 = Dropout(LayerNorm(E_word[x_i] + E_pos[i] + E_seg[s_i]))."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # HF's capitalisation
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.size(1)
        check_token_ids(input_ids, self.word_embeddings.num_embeddings)
        position_ids = torch.arange(T, device=input_ids.device)                        # (T,)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids))                             # (B, T, C)
        return self.dropout(self.LayerNorm(x))


# ----------------------------------------------------------------------------------------- encoder

class BertSelfAttention(nn.Module):
    """MultiHead(Q, K, V) before W^O: head_i = softmax(Q_i K_i^T / sqrt(d_k) + M) V_i, h heads at once.

    M is -inf at padding keys, so a real token never attends to padding; padding queries still get an
    output (they attend to the real keys) that nobody reads.
    """

    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.use_sdpa = config.use_sdpa

    def forward(self, x, key_mask):
        B, T, C = x.shape                                                   # batch, time, d_model
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))          # (B, nh, T, hs)
        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        else:  # the formula, step by step (02_attention derives it); a test checks both paths agree
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))        # (B, nh, T, T)
            att = att.masked_fill(~key_mask, float("-inf"))                 # key_mask (B, 1, 1, T)
            att = self.dropout(F.softmax(att, dim=-1))
            y = att @ v                                                     # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)                           # concat heads: (B, T, C)


class BertSelfOutput(nn.Module):
    """a = LayerNorm(x + Dropout(W^O head_concat)): the output projection and the post-LN residual."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, heads, x):
        return self.LayerNorm(x + self.dropout(self.dense(heads)))


class BertAttention(nn.Module):
    """The attention sublayer: self-attention, then W^O, residual and LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)   # named `self` as in the checkpoints: attention.self.query
        self.output = BertSelfOutput(config)

    def forward(self, x, key_mask):
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    """GELU(x W_1 + b_1), the first half of the position-wise FFN."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))                                      # (B, T, intermediate_size)


class BertOutput(nn.Module):
    """h = LayerNorm(a + Dropout(u W_2 + b_2)), the second half of the FFN and its post-LN residual."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, u, a):
        return self.LayerNorm(a + self.dropout(self.dense(u)))


class BertLayer(nn.Module):
    """One post-LN encoder block: a = LN(x + MultiHead(x)); h = LN(a + FFN(a))."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, key_mask):
        a = self.attention(x, key_mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, key_mask):
        for block in self.layer:
            x = block(x, key_mask)
        return x


class BertPooler(nn.Module):
    """pooled = tanh(W_p h_[CLS] + b_p): the sentence vector that NSP and classifiers read."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))                              # (B, C), position 0 is [CLS]


class BertModel(nn.Module):
    """Embeddings -> num_hidden_layers post-LN blocks -> (sequence output, pooled [CLS] output)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)                    # everything is segment A
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]                  # (B, 1, 1, T), True = attend
        h = self.encoder(self.embeddings(input_ids, token_type_ids), key_mask)  # (B, T, C)
        return h, self.pooler(h)


# ----------------------------------------------------------------------------------------- heads

class BertPredictionHeadTransform(nn.Module):
    """LayerNorm(GELU(W_t h + b_t)), applied before the tied decoder."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h):
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    """MLM logits = transform(h) E_word^T + b_v. The decoder weight IS the word embedding matrix (tied,
    set by BertForPretraining); the output bias is a separate parameter, `cls.predictions.bias`."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h):
        return self.decoder(self.transform(h)) + self.bias                 # (..., vocab_size)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)            # NSP: 0 = IsNext, 1 = NotNext


def init_weights(module, std):
    """The reference init: N(0, std) weights, zero biases, LayerNorm gain 1 and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertForPretraining(nn.Module):
    """BERT with its two pretraining heads; forward returns (mlm_logits, nsp_logits)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        init_weights(self, config.initializer_range)
        # tie after init: the decoder and the input embedding are one matrix, one gradient
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_positions=None):
        """input_ids, token_type_ids, attention_mask: (B, T). masked_positions: optional (B, P) indices;
        given, the MLM head runs on those P positions only (as the reference pretraining code does: the
        vocab-sized matmul at every position would cost more than the encoder on a small model).
        Returns mlm_logits (B, T or P, vocab_size) and nsp_logits (B, 2)."""
        h, pooled = self.bert(input_ids, token_type_ids, attention_mask)   # (B, T, C), (B, C)
        if masked_positions is not None:
            h = torch.gather(h, 1, masked_positions[:, :, None].expand(-1, -1, h.size(-1)))  # (B, P, C)
        return self.cls.predictions(h), self.cls.seq_relationship(pooled)

    # ---- Hugging Face folders: config.json + model.safetensors (or pytorch_model.bin) ----

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a Hugging Face BERT folder (``config.json`` and weights). ``overrides`` replace config
        fields (e.g. ``hidden_dropout_prob=0.0``). Missing or unexpected weights -> ValueError."""
        config = BertConfig.from_dict({**read_config(path), **overrides})
        model = cls(config)
        model.load_hf_state_dict(load_folder(path))
        return model

    def load_hf_state_dict(self, state_dict):
        """Copy a Hugging Face BERT state dict in, accepting the old spellings: TF-converted
        checkpoints call LayerNorm's weight/bias gamma/beta, a bare BertModel has no ``bert.`` prefix;
        the position_ids buffer and the tied decoder copies carry no information of their own."""
        renamed = {}
        for name, tensor in state_dict.items():
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if name.startswith(("embeddings.", "encoder.", "pooler.")):
                name = "bert." + name
            if name.endswith("position_ids") or name in ("cls.predictions.decoder.weight",
                                                         "cls.predictions.decoder.bias"):
                continue
            renamed[name] = tensor
        renamed["cls.predictions.decoder.weight"] = renamed.get("bert.embeddings.word_embeddings.weight")
        own = self.state_dict()
        missing = sorted(k for k in own if renamed.get(k) is None)
        unexpected = sorted(k for k in renamed if k not in own)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match BertForPretraining: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
        wrong = [k for k in own if own[k].shape != renamed[k].shape]
        if wrong:
            raise ValueError(f"shape mismatch for {wrong[0]}: checkpoint {tuple(renamed[wrong[0]].shape)}, "
                             f"config {tuple(own[wrong[0]].shape)}")
        self.load_state_dict(renamed)

    def save_pretrained(self, path):
        """Write ``config.json`` + ``model.safetensors`` (each atomically) that Hugging Face's
        BertForPreTraining loads. The decoder is the word embedding: saved once, tied again on load."""
        state = {k: v for k, v in self.state_dict().items() if k != "cls.predictions.decoder.weight"}
        save_folder(path, self.config.to_dict(), state)


class BertClassifier(nn.Module):
    """Sequence classification: logits = W_c Dropout(pooled) + b_c.

    freeze_encoder=True is the linear probe: the encoder (pooler included) gets no gradient and runs
    in eval mode (no dropout) even while the classifier trains, so only W_c, b_c learn.
    """

    def __init__(self, config, num_labels, freeze_encoder=False):
        super().__init__()
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self, config.initializer_range)
        self.freeze_encoder = freeze_encoder
        self.bert.requires_grad_(not freeze_encoder)

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_encoder:
            self.bert.eval()
        return self

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            _, pooled = self.bert(input_ids, token_type_ids, attention_mask)   # (B, C)
        return self.classifier(self.dropout(pooled))                           # (B, num_labels)


def pretraining_loss(mlm_logits, nsp_logits, mlm_labels, next_sentence_label):
    """L_BERT = L_MLM + L_NSP: mean cross-entropy over the masked positions (label -100 elsewhere,
    e.g. the unused slots of masked_positions) plus cross-entropy of IsNext/NotNext on [CLS]."""
    mlm = F.cross_entropy(mlm_logits.flatten(0, 1).float(), mlm_labels.flatten(), ignore_index=-100)
    nsp = F.cross_entropy(nsp_logits.float(), next_sentence_label)
    return mlm + nsp, mlm, nsp

"""A neural probabilistic language model (Bengio, Ducharme, Vincent & Jauvin, 2003).

The first language model of this repository, and the smallest one that is still a neural network:

    x = [e(x_{t-k}); ...; e(x_{t-1})]            concatenated embeddings of the previous k tokens
    h = tanh(U x + d)                            one hidden layer
    p(x_t | x_{t-k..t-1}) = softmax(W h + b [+ D x])   a distribution over the whole vocabulary

`D x` is the paper's optional "direct connection" from the embeddings to the output (off by default).
The model sees exactly k tokens: it has no notion of anything further back. Chapter 02 replaces the
fixed window with attention, which can look at every earlier token.

The file also holds `numerical_gradient`, the finite-difference check that train.py and the tests use
to show that autograd computes the derivative we think it does.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class NeuralLM(nn.Module):
    """p(x_t | x_{t-k..t-1}) = softmax(W tanh(U [e(x_{t-k}); ...; e(x_{t-1})] + d) + b).

    forward(input_ids (B, T)) predicts the next token at every position t, from the k tokens ending at t
    (so logits[:, t] is the distribution of input_ids[:, t + 1], as in every language model here).
    Positions t < k-1 have fewer than k real tokens before them: the missing ones are filled with a
    learned "before the start" embedding (row `vocab_size` of the table), so the output lines up with
    the labels of an ordinary next-token batch (labels = input_ids shifted by one).
    """

    def __init__(self, vocab_size, context_size=4, d_embed=32, d_hidden=256, direct=False):
        super().__init__()
        self.vocab_size = vocab_size
        self.context_size = context_size                          # k, the number of tokens the model sees
        self.start_id = vocab_size                                # padding id for "no token yet"
        self.embed = nn.Embedding(vocab_size + 1, d_embed)        # e(.), one extra row for start_id
        self.hidden = nn.Linear(context_size * d_embed, d_hidden)   # U, d
        self.output = nn.Linear(d_hidden, vocab_size)              # W, b
        self.direct = nn.Linear(context_size * d_embed, vocab_size, bias=False) if direct else None  # D
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # Small normal weights: with tanh, large initial pre-activations saturate and stall learning.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02 if isinstance(module, nn.Linear) else 1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def windows(self, input_ids):
        """The k-token window ending at every position: (B, T) -> (B, T, k).

        Example with k = 3 and start id S:  [5, 6, 7, 8] -> [[S, S, 5], [S, 5, 6], [5, 6, 7], [6, 7, 8]]
        """
        B, T = input_ids.shape
        k = self.context_size
        pad = input_ids.new_full((B, k - 1), self.start_id)
        padded = torch.cat([pad, input_ids], dim=1)                 # (B, T + k - 1)
        return padded.unfold(dimension=1, size=k, step=1)          # (B, T, k)

    def forward(self, input_ids, labels=None):
        """Return (logits (B, T, vocab_size), loss or None). labels: (B, T), -100 = ignore."""
        B, T = input_ids.shape
        check_token_ids(input_ids, self.vocab_size)
        x = self.embed(self.windows(input_ids))                    # (B, T, k, d_embed)
        x = x.view(B, T, -1)                                       # (B, T, k * d_embed): the concatenation
        h = torch.tanh(self.hidden(x))                             # (B, T, d_hidden)
        logits = self.output(h)                                    # (B, T, vocab_size)
        if self.direct is not None:
            logits = logits + self.direct(x)
        loss = None
        if labels is not None:
            # Cross-entropy = -log p(correct next token), averaged over positions.
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens tokens after input_ids (B, T); only the last k tokens matter."""
        for _ in range(max_new_tokens):
            context = input_ids[:, -self.context_size:]                # the model never sees further back
            logits, _ = self(context)
            logits = logits[:, -1, :] / max(temperature, 1e-6)         # (B, vocab_size)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids


def numerical_gradient(f, tensor, eps=1e-3):
    """Central finite differences: df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps), for every i.

    `f` takes no argument and returns a scalar computed from `tensor`, which is perturbed in place and
    restored. The error is O(eps^2), so in float64 with eps = 1e-6 it agrees with autograd to ~1e-8.
    Example: f = lambda: (x ** 2).sum() with x = [1., 2.] gives [2., 4.].
    """
    grad = torch.zeros_like(tensor)
    flat, flat_grad = tensor.data.view(-1), grad.view(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            f_plus = float(f())
            flat[i] = original - eps
            f_minus = float(f())
            flat[i] = original
            flat_grad[i] = (f_plus - f_minus) / (2 * eps)
    return grad

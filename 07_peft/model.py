"""Parameter-efficient finetuning (PEFT): the major methods, each on chapter 05's GPT, side by side.

Full finetuning learns W = W0 + dW for every matrix. The methods below freeze the pretrained weights W0
and learn a few new parameters instead, each with a path that starts at (or as close as it can to) the
base model:

    LoRA       h = W0 x + (alpha / r) B A x,  A (r, d_in) Kaiming, B (d_out, r) = 0        Hu et al. 2021
    DoRA       h = m * (W0 + s B A) x / ||W0 + s B A||_row,  m = ||W0||_row at start        Liu et al. 2024
    prefix     head_i = Attention(Q, [P_K^l; K], [P_V^l; V]) in every layer l,
               P = MLP(P') while training, the MLP folded away afterwards                   Li & Liang 2021
    prompt     X = [E_soft; E x]: n learned embeddings before the input's own              Lester et al. 2021
    adapter    h <- h + W_up f(W_down h) after attention and after the MLP, W_up = 0      Houlsby et al. 2019
    (IA)^3     K <- l_k * K, V <- l_v * V, FFN hidden <- l_ff * hidden, all l = 1         Liu et al. 2022

LoRA, DoRA, adapters and (IA)^3 go inside the blocks: `add_lora`, `add_adapters`, `add_ia3` replace
modules of the GPT in place by small wrappers (a frozen nn.Linear plus its update). Prefix and prompt
tuning work at the inputs of attention and of the model: `PrefixTuning` and `PromptTuning` wrap the GPT.
Everything here works on `05_gpt/model.py`'s GPT unchanged, GPT-2 and the modern decoder (Llama, Qwen)
alike: grouped-query attention gives K and V n_kv_head d_k rows of the fused projection (so LoRA's k and
v blocks, (IA)^3's l_k and l_v, and the prefix's keys and values are that wide), SwiGLU's hidden units
silu(W1 x) * W3 x take (IA)^3's l_ff where GELU's do, and with RoPE the soft prompt and the prefix take
positions as real tokens would. `trainable_parameters` counts for all.
"""

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from common import load_module  # noqa: E402  (imports 05's file by path; nothing else from common)

gpt_lib = load_module(REPO_ROOT / "05_gpt" / "model.py")
GPT, GPTConfig, KVCache = gpt_lib.GPT, gpt_lib.GPTConfig, gpt_lib.KVCache


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


# ------------------------------------------------------------------------------------------ counting
def trainable_parameters(model):
    """{"trainable": n, "total": N, "percent": 100 n / N}, shared (tied) tensors counted once.

    >>> trainable_parameters(nn.Linear(4, 2).requires_grad_(False))
    {'trainable': 0, 'total': 10, 'percent': 0.0}
    """
    params = list(model.parameters())                       # parameters() yields a tied tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(1, total)}


def trainable_state_dict(model):
    """The trainable tensors only, by parameter name: all an adapter file needs next to the base model."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, state):
    """Copy `state` (from `trainable_state_dict`) into the same-named parameters of `model`; every
    trainable parameter must be there, and nothing else."""
    own = {name: p for name, p in model.named_parameters()}
    wanted = {name for name, p in own.items() if p.requires_grad}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(own[name].shape)}")
            own[name].copy_(tensor)
    return model


def _replace_module(model, name, new_module):
    """model.get_submodule(name) = new_module."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new_module)


# ----------------------------------------------------------------------------------------- LoRA, DoRA
# Target names are those of the Llama checkpoints (and of peft's target_modules there, q_proj ... down_proj):
# q, k, v, o for W^Q, W^K, W^V, W^O, and gate, up, down for the FFN's W1, W3, W2. In 05's GPT, q, k and v
# are row blocks of the fused attn.c_attn ([q; k; v] = W x, of attn.qkv_sizes rows: n_head d_k, n_kv_head
# d_k, n_kv_head d_k), and gate and up the two row blocks of SwiGLU's mlp.c_fc = [W1; W3]; o is attn.c_proj
# and down mlp.c_proj. GPT-2's GELU MLP has no gate: there, up is the whole mlp.c_fc. Groups expand to
# several names (on a GELU MLP, "mlp" and "all" have no gate).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": LORA_TARGETS}
TARGET_MODULES = {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
                  "gate": "mlp.c_fc", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def parse_lora_targets(targets):
    """"q,v", ["q", "v"] or a group -> (every target name, the names given one by one); an unknown name is
    a ValueError. ["attn", "down"] -> ({"q", "k", "v", "o", "down"}, {"down"})."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    wanted, named = set(), set()
    for target in targets:
        if target not in LORA_GROUPS and target not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {target!r} (valid: {', '.join(LORA_TARGETS + tuple(LORA_GROUPS))})")
        wanted.update(LORA_GROUPS.get(target, (target,)))
        named.update({target} - set(LORA_GROUPS))
    if not wanted:
        raise ValueError("no LoRA target given (valid: " + ", ".join(LORA_TARGETS + tuple(LORA_GROUPS)) + ")")
    return wanted, named


def lora_row_blocks(block):
    """{module name in `block`: {part: (first row, last row + 1)}}: every block of output rows of the four
    Linear layers LoRA can adapt. With n_head 4, n_kv_head 2, d_k 8, intermediate_size 48 (SwiGLU):

        attn.c_attn  {"q": (0, 32), "k": (32, 48), "v": (48, 64)}      attn.c_proj  {"all": (0, 32)}   (o)
        mlp.c_fc     {"gate": (0, 48), "up": (48, 96)}                 mlp.c_proj   {"all": (0, 32)}   (down)

    and on GPT-2's GELU MLP mlp.c_fc is {"all": (0, 4 C)} (up). A whole Linear is the single part "all".
    """
    q_rows, kv_rows, _ = block.attn.qkv_sizes
    ffn_width = _base_linear(block.mlp.c_proj).in_features
    gated = isinstance(block.mlp, gpt_lib.SwiGLU)
    return {"attn.c_attn": {"q": (0, q_rows), "k": (q_rows, q_rows + kv_rows),
                            "v": (q_rows + kv_rows, q_rows + 2 * kv_rows)},
            "attn.c_proj": {"all": (0, _base_linear(block.attn.c_proj).out_features)},
            "mlp.c_fc": {"gate": (0, ffn_width), "up": (ffn_width, 2 * ffn_width)} if gated
            else {"all": (0, ffn_width)},
            "mlp.c_proj": {"all": (0, _base_linear(block.mlp.c_proj).out_features)}}


def lora_targets(model, targets):
    """{module name: {part: (first row, last row + 1)}} for the Linear layers that `targets` names.

    ["q", "v"] on a 2-layer GPT-2 of width 32 ->
        {"transformer.h.0.attn.c_attn": {"q": (0, 32), "v": (64, 96)}, "transformer.h.1.attn.c_attn": ...}
    and on a GQA model the k and v blocks are n_kv_head d_k rows (see `lora_row_blocks`). "gate" on a GELU
    MLP is a ValueError.
    """
    wanted, named = parse_lora_targets(targets)
    found = {}
    for block_name, block in _named_blocks(model):
        row_blocks = lora_row_blocks(block)
        for target in sorted(wanted, key=LORA_TARGETS.index):
            module_name = TARGET_MODULES[target]
            parts = row_blocks[module_name]
            part = target if target in parts else "all" if target in ("o", "up", "down") else None
            if part is None:
                if target in named:
                    raise ValueError(f"LoRA target {target!r}: this model's MLP is GELU(x W_1) W_2, which has no "
                                     f"gate (SwiGLU's W1); its matrices are up (mlp.c_fc) and down (mlp.c_proj)")
                continue                                   # "mlp" / "all" on a GELU MLP: no gate to adapt
            module = block.get_submodule(module_name)
            if not isinstance(_base_linear(module), nn.Linear):
                raise ValueError(f"LoRA target {target!r}: {block_name}.{module_name} is a {type(module).__name__}, "
                                 f"not an nn.Linear (another method already wraps it)")
            found.setdefault(f"{block_name}.{module_name}", {})[part] = parts[part]
    if not found:
        raise ValueError(f"no Linear layer of the model matches the LoRA targets {sorted(wanted)}")
    return found


def _base_linear(module):
    """The nn.Linear itself, under a LoRALinear wrapper if there is one."""
    return module.base if isinstance(module, LoRALinear) else module


class LoRAUpdate(nn.Module):
    """One named low-rank update of one Linear layer: for each part (block of output rows) p,

        dW_p = (alpha / r) B_p A_p,   A_p (r, d_in) Kaiming-uniform,  B_p (rows_p, r) zero

    so dW = 0 at the start. With dora, also a magnitude m_p (rows_p,) = ||W0_p||_row.
    """

    def __init__(self, base_weight, parts, r, alpha, dropout=0.0, dora=False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        d_in = base_weight.size(1)
        self.parts = dict(parts)
        self.r, self.alpha, self.dora = r, alpha, dora
        self.scaling = alpha / r
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(r, d_in)) for p in self.parts})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(end - start, r))
                                        for p, (start, end) in self.parts.items()})
        for A in self.lora_A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))     # as nn.Linear, and the LoRA reference code
        self.dropout = nn.Dropout(dropout)
        if dora:
            with torch.no_grad():
                self.magnitude = nn.ParameterDict({p: nn.Parameter(base_weight[start:end].norm(dim=1).clone())
                                                   for p, (start, end) in self.parts.items()})
        else:
            self.magnitude = None

    def delta_weight(self, part):
        """dW_p = (alpha / r) B_p A_p, (rows_p, d_in): formed only for merging and DoRA's norm."""
        return self.scaling * self.lora_B[part] @ self.lora_A[part]


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus named low-rank updates, at most one of them active:

        LoRA:  h = W0 x + b + (alpha / r) B A dropout(x)
        DoRA:  h = m / ||W0 + (alpha / r) B A||_row * (W0 x + (alpha / r) B A dropout(x)) + b

    B A x is computed as B (A x): the d_out x d_in matrix B A is never formed on the LoRA path. On the
    fused q/k/v projection (and SwiGLU's fused gate/up) each selected part has its own A and B acting on
    its rows only, which is exactly LoRA on separate W_q, W_k, W_v (as in the paper, and as peft on a
    Llama's q_proj, k_proj, v_proj). `merge` writes the active update into W0 (inference then costs
    nothing extra); `unmerge` takes it out again.
    """

    def __init__(self, base, parts):
        super().__init__()
        self.base = base                                   # the pretrained nn.Linear, frozen
        self.row_blocks = dict(parts)                      # every block of output rows, in order
        self.adapters = nn.ModuleDict()                    # adapter name -> LoRAUpdate
        self.active = None                                 # name of the update applied in forward
        self.merged = None                                 # name of the update written into base.weight
        self._weight_before_merge = {}                     # DoRA: the W0 rows to restore on unmerge

    def forward(self, x):
        y = self.base(x)                                                   # (..., d_out) = W0 x + b
        if self.active is None or self.merged is not None:
            return y
        update = self.adapters[self.active]
        x = update.dropout(x)
        pieces = []
        for part, (start, end) in self.row_blocks.items():
            y_part = y[..., start:end]                                     # (..., rows_p)
            if part in update.parts:
                delta = (x @ update.lora_A[part].t()) @ update.lora_B[part].t() * update.scaling  # (..., rows_p)
                if update.magnitude is None:
                    y_part = y_part + delta
                else:
                    W0 = self.base.weight[start:end]
                    # The norm is treated as a constant in backward (DoRA section 4.3): far less memory,
                    # the same accuracy. Written so that scale = 1 and delta = 0 give y back exactly:
                    # scale * (W0 x + delta) + b  =  y + (scale - 1) (y - b) + scale * delta.
                    with torch.no_grad():
                        norm = (W0 + update.delta_weight(part)).norm(dim=1)           # (rows_p,)
                    scale = update.magnitude[part] / norm
                    bias = self.base.bias[start:end] if self.base.bias is not None else 0.0
                    y_part = y_part + (scale - 1) * (y_part - bias) + scale * delta
            pieces.append(y_part)
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + dW (LoRA) or W0 <- m * (W0 + dW) / ||W0 + dW||_row (DoRA), for the active update."""
        if self.merged is not None or self.active is None:
            return
        update = self.adapters[self.active]
        for part, (start, end) in update.parts.items():
            W = self.base.weight[start:end]                                # a view: edits base.weight
            if update.magnitude is None:
                W += update.delta_weight(part)
            else:
                self._weight_before_merge[part] = W.clone()
                V = W + update.delta_weight(part)
                W.copy_(update.magnitude[part][:, None] * V / V.norm(dim=1, keepdim=True))
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self):
        """Undo `merge`: W0 <- W0 - dW (LoRA), or the saved W0 rows back (DoRA's division by a norm that
        depends on W0 itself does not invert in closed form)."""
        if self.merged is None:
            return
        update = self.adapters[self.merged]
        for part, (start, end) in update.parts.items():
            if update.magnitude is None:
                self.base.weight[start:end] -= update.delta_weight(part)
            else:
                self.base.weight[start:end] = self._weight_before_merge.pop(part)
        self.merged = None


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model, r=8, alpha=16.0, dropout=0.0, targets=("q", "v"), dora=False, name="default"):
    """Add a LoRA (or DoRA) adapter called `name` to the target Linear layers of `model`, in place.

    The first call wraps each target nn.Linear in a LoRALinear and freezes every parameter of the base
    model; later calls add more named adapters on the same frozen base. The new adapter becomes the
    active one, and the only trainable parameters are its A, B (and DoRA's m). Returns `model`.
    alpha / r scales the update: with alpha fixed, a larger r does not change the initial step size of
    dW much, so r can be changed without retuning the learning rate (the paper keeps alpha fixed).
    """
    if any(name in layer.adapters for layer in lora_layers(model)):
        raise ValueError(f"the model already has a LoRA adapter named {name!r}")
    targets_found = lora_targets(model, targets)
    if not lora_layers(model):
        model.requires_grad_(False)
    row_blocks = {f"{block_name}.{module_name}": blocks for block_name, block in _named_blocks(model)
                  for module_name, blocks in lora_row_blocks(block).items()}
    for module_name, parts in targets_found.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, row_blocks[module_name])
            _replace_module(model, module_name, module)
        if module.merged is not None:
            raise ValueError(f"{module_name} has adapter {module.merged!r} merged; unmerge before adding another")
        update = LoRAUpdate(module.base.weight, parts, r, alpha, dropout, dora)
        module.adapters[name] = update.to(module.base.weight.device)
    model.lora_configs = {**getattr(model, "lora_configs", {}),
                          name: {"r": r, "alpha": alpha, "dropout": dropout, "dora": dora,
                                 "targets": list(targets) if not isinstance(targets, str) else targets}}
    set_adapter(model, name)
    return model


def set_adapter(model, name):
    """Make adapter `name` the active (and only trainable) LoRA update everywhere; None = the base model."""
    layers = lora_layers(model)
    if name is not None and not any(name in layer.adapters for layer in layers):
        known = sorted({n for layer in layers for n in layer.adapters})
        raise ValueError(f"no LoRA adapter named {name!r} (adapters: {', '.join(known) or 'none'})")
    for layer in layers:
        if layer.merged is not None:
            raise ValueError(f"adapter {layer.merged!r} is merged; unmerge before switching")
        layer.active = name if name in layer.adapters else None
        for adapter_name, update in layer.adapters.items():
            update.requires_grad_(adapter_name == name)
    return model


def merge_lora(model):
    """Write the active adapter into the base weights of every LoRA layer (forward then skips it)."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model):
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def lora_state_dict(model, name="default"):
    """Adapter `name` alone: {"config": how it was added, "state_dict": its A, B (and m) tensors}."""
    marker = f".adapters.{name}."
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if marker in k}
    if not state:
        raise ValueError(f"no LoRA adapter named {name!r}")
    return {"name": name, "config": dict(model.lora_configs[name]), "state_dict": state}


def load_lora(model, saved, name=None):
    """Add the adapter saved by `lora_state_dict` to `model` (a base with or without other adapters),
    under its own name or `name`, and load its weights. It becomes the active adapter."""
    name = name or saved["name"]
    add_lora(model, name=name, **saved["config"])
    marker_from, marker_to = f".adapters.{saved['name']}.", f".adapters.{name}."
    state = {k.replace(marker_from, marker_to): v for k, v in saved["state_dict"].items()}
    own = model.state_dict()
    expected = {k for k in own if marker_to in k}
    if expected != set(state):
        raise ValueError(f"saved adapter does not fit: missing {sorted(expected - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - expected)[:3]}")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
    return model


# --------------------------------------------------------------------------------- bottleneck adapters
class BottleneckAdapter(nn.Module):
    """Adapter(h) = h + W_up f(W_down h + b_down) + b_up, with W_down (m, d), W_up (d, m) and m << d.

    W_up and b_up start at zero, so the adapter starts as the identity (Houlsby et al. use a near-zero
    initialisation for the same reason).
    """

    def __init__(self, d, bottleneck, dropout=0.0):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.act = nn.GELU(approximate="tanh")
        self.up = nn.Linear(bottleneck, d)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.dropout(self.up(self.act(self.down(h))))


class WithAdapter(nn.Module):
    """A sublayer followed by an adapter on its output, so the block computes x + Adapter(Sublayer(LN(x)))."""

    def __init__(self, sublayer, adapter):
        super().__init__()
        self.sublayer = sublayer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.sublayer(*args, **kwargs))


def add_adapters(model, bottleneck=16, dropout=0.0):
    """Houlsby adapters after the attention and the MLP sublayer of every block; only they train."""
    model.requires_grad_(False)
    for block in _blocks(model):
        d = block.ln_1.normalized_shape[0]
        block.attn = WithAdapter(block.attn, BottleneckAdapter(d, bottleneck, dropout))
        block.mlp = WithAdapter(block.mlp, BottleneckAdapter(d, bottleneck, dropout))
    return model.to(next(model.parameters()).device)


def _named_blocks(model):
    """[(name, block)] of the Transformer blocks of 05's GPT inside `model`."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, gpt_lib.Block)]
    if not blocks:
        raise ValueError("no Transformer blocks of 05_gpt's GPT found in the model")
    return blocks


def _blocks(model):
    return [block for _, block in _named_blocks(model)]


# ------------------------------------------------------------------------------------------- (IA)^3
class IA3QKV(nn.Module):
    """The fused projection [q; k; v] = W x + b with the keys and values rescaled: [q; l_k * k; l_v * v].

    `sizes` are the rows of q, k and v (attn.qkv_sizes): with grouped-query attention k and v have
    n_kv_head d_k rows each, and so l_k and l_v (as peft's ia3_l on a Llama's k_proj and v_proj).
    """

    def __init__(self, base, sizes):
        super().__init__()
        self.base = base
        self.sizes = list(sizes)                                   # [nh d_k, nkv d_k, nkv d_k]
        self.l_k = nn.Parameter(torch.ones(self.sizes[1]))
        self.l_v = nn.Parameter(torch.ones(self.sizes[2]))

    def forward(self, x):
        q, k, v = self.base(x).split(self.sizes, dim=-1)           # (..., nh d_k), (..., nkv d_k) x 2
        return torch.cat([q, self.l_k * k, self.l_v * v], dim=-1)


class IA3ScaledInput(nn.Module):
    """The FFN's output projection W_2 reading rescaled hidden units: W_2 (l_ff * hidden) + b_2.

    hidden is the input of mlp.c_proj: GELU(x W_1 + b_1) in GPT-2 (l_ff of size 4 C), silu(W1 x) * W3 x
    in SwiGLU (size intermediate_size). Scaling the input of W_2 is scaling the hidden units, whatever
    the activation that made them, and it is what peft's (IA)^3 does to a `feedforward_modules` layer.
    """

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.l_ff = nn.Parameter(torch.ones(base.in_features))

    def forward(self, hidden):
        return self.base(self.l_ff * hidden)


def add_ia3(model):
    """(IA)^3: learned vectors that rescale keys, values and the FFN's hidden units, all ones at the
    start (the base model exactly); 2 n_kv_head d_k + ffn_width numbers per layer (6 C in GPT-2), the
    only trainable parameters."""
    model.requires_grad_(False)
    for block in _blocks(model):
        block.attn.c_attn = IA3QKV(block.attn.c_attn, block.attn.qkv_sizes)
        block.mlp.c_proj = IA3ScaledInput(block.mlp.c_proj)
    return model.to(next(model.parameters()).device)


# ----------------------------------------------------------------------------------- prefix tuning
class PrefixTuning(nn.Module):
    """Learned keys and values P_K^l, P_V^l (P of each) put before every layer's own:

        head_i = Attention(Q, [P_K^l; K], [P_V^l; V])        l = 1 .. L, the GPT itself frozen

    Each P_K^l, P_V^l is (P, D) with D = n_kv_head d_k, the width of one layer's keys: n_embd in GPT-2,
    less under grouped-query attention (a prefix key serves its group of query heads, as a cached key
    does). Training the prefix directly is unstable (Li & Liang), so it is reparameterised by a small MLP:
    [P_K^1; P_V^1; ...; P_V^L] at position j = W_2 tanh(W_1 P'_j + b_1) + b_2, P' of shape (P, D) (peft's
    token_dim). Only the MLP's output matters afterwards: `fold()` stores it as one (P, 2 L D) tensor and
    drops the MLP. hidden=0 trains that tensor directly.

    The prefix goes into 05's GPT as a pre-filled KVCache: every layer sees it exactly as it sees the
    cached keys and values of earlier tokens. So the text's tokens sit at positions P .. P+T-1, as if the
    prefix were P real tokens before them (the view the prefix's "activations of real words"
    initialisation takes, `init_ids`), and P + T must fit in block_size. With RoPE, the text's q and k are
    rotated by those positions and the prefix keys are used as they are, as cached keys (already
    rotated) are: what peft does too, where the prefix is the past_key_values of a Llama. A padding
    attention_mask (B, T) is extended to (B, P + T) with ones: the prefix is visible to every real token.
    """

    def __init__(self, gpt, num_tokens=16, hidden=256, init_ids=None):
        super().__init__()
        cfg = gpt.config
        self.gpt = gpt.requires_grad_(False)
        self.num_tokens = num_tokens
        self.hidden = hidden
        self.kv_width = cfg.kv_heads * cfg.d_head             # D: one layer's keys at one position
        width = 2 * cfg.n_layer * self.kv_width               # keys and values of every layer, one position
        if init_ids is not None:
            if len(init_ids) != num_tokens or hidden:
                raise ValueError("init_ids needs len(init_ids) == num_tokens and hidden=0")
            self.prefix = nn.Parameter(self.token_activations(init_ids))      # (P, 2 L D)
        elif hidden:
            self.register_parameter("prefix", None)
            self.prefix_input = nn.Parameter(torch.randn(num_tokens, self.kv_width))  # P', N(0, 1) as nn.Embedding
            self.prefix_mlp = nn.Sequential(nn.Linear(self.kv_width, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.prefix = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.to(next(gpt.parameters()).device)

    @property
    def config(self):
        return self.gpt.config

    @property
    def lm_head(self):
        return self.gpt.lm_head

    @torch.no_grad()
    def token_activations(self, ids):
        """The keys and values the base model computes for tokens `ids` (keys rotated by their positions
        0 .. P-1 under RoPE, as the cache holds them), as a (P, 2 L D) prefix."""
        was_training = self.gpt.training
        self.gpt.eval()
        cache = KVCache(self.gpt.config.n_layer)
        self.gpt.forward_hidden(torch.tensor([ids], device=next(self.gpt.parameters()).device), cache=cache)
        self.gpt.train(was_training)
        kv = torch.stack([torch.stack(pair) for pair in cache.layers])       # (L, 2, 1, nkv, P, hs)
        return kv[:, :, 0].permute(3, 0, 1, 2, 4).reshape(len(ids), -1)     # (P, L*2*nkv*hs)

    def prefix_values(self):
        """The prefix as one (P, 2 L D) tensor: the MLP's output, or the stored (folded) tensor."""
        return self.prefix if self.prefix is not None else self.prefix_mlp(self.prefix_input)

    @torch.no_grad()
    def fold(self):
        """Replace the MLP reparameterisation by its output; the model's outputs do not change."""
        if self.prefix is not None:
            return self
        self.prefix = nn.Parameter(self.prefix_values().detach().clone())
        del self.prefix_mlp, self.prefix_input
        self.hidden = 0
        return self

    def past_key_values(self, batch_size):
        """[(P_K^l, P_V^l) for each layer], each (B, nkv, P, hs), for a pre-filled KVCache."""
        cfg = self.gpt.config
        P, nkv, hs = self.num_tokens, cfg.kv_heads, cfg.d_head
        kv = self.prefix_values().view(P, cfg.n_layer, 2, nkv, hs).permute(1, 2, 3, 0, 4)  # (L, 2, nkv, P, hs)
        return [(k.expand(batch_size, nkv, P, hs), v.expand(batch_size, nkv, P, hs)) for k, v in kv]

    def forward_hidden(self, idx, attention_mask=None):
        """LN(h_L) of the T real tokens, (B, T, C); idx (B, T), attention_mask optional (B, T)."""
        B, T = idx.shape
        if self.num_tokens + T > self.gpt.config.block_size:
            raise ValueError(f"{T} tokens + a prefix of {self.num_tokens} exceed block_size {self.gpt.config.block_size}")
        cache = KVCache(self.gpt.config.n_layer, self.past_key_values(B))
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, self.num_tokens), attention_mask], dim=1)
        return self.gpt.forward_hidden(idx, attention_mask=attention_mask, cache=cache)

    def forward(self, idx, targets=None, attention_mask=None):
        return _lm_outputs(self.gpt, self.forward_hidden(idx, attention_mask), targets)


def _lm_outputs(gpt, hidden, targets):
    """(logits (B, T, V), mean cross-entropy over targets != -100 or None), as GPT.forward."""
    logits = gpt.lm_head(hidden)
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    return logits, loss


# ----------------------------------------------------------------------------------- prompt tuning
class PromptTuning(nn.Module):
    """n learned "soft token" embeddings before the input's token embeddings, the GPT frozen:

        h_0 = [E_soft; W_e[x]] + W_p[0 .. n + T - 1]        (RoPE: h_0 = [E_soft; W_e[x]], and q, k of
                                                             position i rotated by i in every layer)

    init="vocab": E_soft starts as the embeddings of n random vocabulary tokens (or of `init_ids`: then
    the model starts exactly as the base model reading those tokens first); "random": N(0, std(W_e)).
    The soft tokens take positions 0 .. n-1 and the text n .. n+T-1 (as peft's inputs_embeds do), so
    n + T must fit in block_size. The outputs at the soft positions are dropped: forward_hidden returns
    the T real tokens' hidden states.
    """

    def __init__(self, gpt, num_tokens=16, init="vocab", init_ids=None, seed=0):
        super().__init__()
        self.gpt = gpt.requires_grad_(False)
        self.num_tokens = num_tokens
        wte = gpt.transformer.wte.weight
        generator = torch.Generator().manual_seed(seed)
        if init_ids is not None or init == "vocab":
            if init_ids is not None:
                ids = torch.tensor(init_ids)
            else:
                ids = torch.randint(0, wte.size(0), (num_tokens,), generator=generator)
            if ids.numel() != num_tokens:
                raise ValueError(f"init_ids has {ids.numel()} ids, expected num_tokens={num_tokens}")
            soft = wte.detach()[ids.to(wte.device)].clone()
        elif init == "random":
            soft = torch.randn(num_tokens, wte.size(1), generator=generator).to(wte.device) * wte.detach().std()
        else:
            raise ValueError(f"unknown prompt init {init!r} (valid: vocab, random)")
        self.soft_prompt = nn.Parameter(soft)                                 # (n, C)

    @property
    def config(self):
        return self.gpt.config

    @property
    def lm_head(self):
        return self.gpt.lm_head

    def forward_hidden(self, idx, attention_mask=None):
        """GPT.forward_hidden (chapter 05) with the soft tokens spliced in before the token embeddings."""
        gpt, n = self.gpt, self.num_tokens
        B, T = idx.shape
        if n + T > gpt.config.block_size:
            raise ValueError(f"{T} tokens + {n} soft tokens exceed block_size {gpt.config.block_size}")
        check_token_ids(idx, gpt.config.vocab_size)        # the embeddings are looked up here, not in 05's GPT
        if attention_mask is None:
            positions = torch.arange(n + T, device=idx.device)                           # (n + T,)
            mask = None                                                                   # plain causal
        else:
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)   # (B, n + T)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)              # (B, n + T)
            mask = gpt.causal_padding_mask(n + T, 0, attention_mask, idx.device)
        x = torch.cat([self.soft_prompt.expand(B, n, -1), gpt.transformer.wte(idx)], dim=1)  # (B, n + T, C)
        rope = None
        if gpt.rotary is None:
            x = x + gpt.transformer.wpe(positions)                                        # W_p
        else:
            rope = gpt.rotary(positions, x.dtype)          # cos, sin of every position, soft ones included
        x = gpt.transformer.drop(x)
        for block in gpt.transformer.h:
            x = block(x, mask, None, rope)
        return gpt.transformer.ln_f(x)[:, n:]                                             # (B, T, C)

    def forward(self, idx, targets=None, attention_mask=None):
        return _lm_outputs(self.gpt, self.forward_hidden(idx, attention_mask), targets)


# ------------------------------------------------------------------------------------ classification
class SequenceClassifier(nn.Module):
    """A linear head on a pooled summary of the text's hidden states: p(y | x) = softmax(W pool(h_L) + b).

    pooling="mean": the mean of h_L over the real tokens; "last": h_L of the last real token (chapter
    05's GPTClassifier). Attention is causal, so only the last token has seen the whole text, but a
    small, briefly pretrained base has not learnt to gather a summary there: the mean is the more robust
    feature, and with a frozen base the head can only use the features the base already has.
    `backbone` is a GPT (possibly with LoRA, adapters or (IA)^3 inside) or a PrefixTuning /
    PromptTuning wrapper; all three return (B, T, C) for the real tokens. Right padding only.
    """

    def __init__(self, backbone, num_labels, pooling="mean"):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"unknown pooling {pooling!r} (valid: mean, last)")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).device)

    def forward(self, input_ids, attention_mask, labels=None):
        # Right padding and causal attention: the real tokens never see the padding after them.
        hidden = self.backbone.forward_hidden(input_ids)                     # (B, T, C)
        if self.pooling == "mean":
            real = attention_mask.unsqueeze(-1).to(hidden.dtype)             # (B, T, 1)
            pooled = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)    # (B, C)
        else:
            last = attention_mask.sum(dim=1) - 1                             # (B,) the last real token
            pooled = hidden[torch.arange(input_ids.size(0), device=input_ids.device), last]
        logits = self.head(pooled)                                           # (B, num_labels)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return logits, loss


# -------------------------------------------------------------------------- one entry point for all
METHODS = ("full", "lora", "dora", "prefix", "prompt", "adapter", "ia3", "head")


def apply_method(gpt, method, **options):
    """The GPT (chapter 05) made ready to finetune with `method`; returns the model to train.

    full     every parameter trains                      lora / dora  add_lora(gpt, **options)
    prefix   PrefixTuning(gpt, **options)                prompt       PromptTuning(gpt, **options)
    adapter  add_adapters(gpt, **options)                ia3          add_ia3(gpt)
    head     the base frozen (a classifier then trains its head only)
    """
    if method == "full":
        return gpt.requires_grad_(True)
    if method == "head":
        return gpt.requires_grad_(False)
    if method in ("lora", "dora"):
        return add_lora(gpt, dora=method == "dora", **options)
    if method == "prefix":
        return PrefixTuning(gpt, **options)
    if method == "prompt":
        return PromptTuning(gpt, **options)
    if method == "adapter":
        return add_adapters(gpt, **options)
    if method == "ia3":
        return add_ia3(gpt, **options)
    raise ValueError(f"unknown method {method!r} (valid: {', '.join(METHODS)})")

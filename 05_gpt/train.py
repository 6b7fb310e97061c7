"""Chapter 05: pretrain a GPT, tune it to chat (SFT, then DPO) and to classify, deploy it, talk to it.

    python 05_gpt/train.py                                  # everything, on 2 CPU cores in ~5.5 minutes
    python 05_gpt/train.py --preset tiny                    # seconds: a smoke test, in out/05_gpt-tiny
    python 05_gpt/train.py --device cuda --preset gpt2-124m --data my_corpus.txt
    torchrun --standalone --nproc_per_node=2 05_gpt/train.py
    python 05_gpt/train.py --stage sample --prompt "def "
    python 05_gpt/train.py --stage chat                     # talk to the tuned model (or 05_gpt/chat.py)
    python 05_gpt/train.py --arch llama --n_kv_head 2       # the modern decoder (RMSNorm, RoPE, SwiGLU, GQA)
    python 05_gpt/train.py --stage ablation                 # GPT-2 -> Llama, one change at a time
    torchrun --nproc_per_node=8 05_gpt/train.py --preset gpt2-124m --device cuda --parallel fsdp

The recipe, top to bottom:
 1. config and flags              every field of `Config` is a flag; --preset tiny | default | gpt2-124m
 2. runtime                       device, bf16 autocast on CUDA, --compile, DDP under torchrun, or
                                  --parallel fsdp | tp (common/parallel.py)
 3. tokenizer                     byte-level BPE trained once per corpus (on a sample spread over it,
                                  cached by its fingerprint), saved with the checkpoint as
                                  out_dir/tokenizer.json; the corpus streamed into a token cache
 4. pretraining                   L_LM = -sum_t log p(x_t | x_<t), AdamW, warmup + cosine decay,
                                  gradient accumulation and clipping, periodic val loss / perplexity,
                                  atomic checkpoints, --resume, Ctrl-C saves first; --arch gpt2 | llama;
                                  --stage ablation pretrains GPT-2 -> + RMSNorm -> + RoPE -> + SwiGLU ->
                                  + GQA -> + QK-norm side by side
 5. chat SFT                      multi-turn conversations in a chat template (chat.py: ChatML's
                                  <|im_start|> / <|im_end|>, reserved in the tokenizer), loss on the
                                  assistant's tokens only
 6. classification finetuning     docstring-module: a head on the last token, L = L_CE + lambda L_LM
    (both from the pretrained model and from scratch with the same budget, early stopping on val)
 6b. preference tuning (DPO)      L_DPO = -log sigmoid(beta [(log pi(y_w|x) - log pi_ref(y_w|x))
                                  - (log pi(y_l|x) - log pi_ref(y_l|x))]), the SFT model as pi_ref
 7. deployment                    int8 weights with per-channel scales: size, speed, metric
 8. report                        a table and out_dir/report.json (--stage X updates its part), samples
 9. chat                          --stage chat: the KV cache kept across turns, tokens streamed
"""

import copy
import dataclasses
import itertools
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # so that `common` imports from any working directory

from common import data, load_module  # noqa: E402
from common.checkpoint import claim_out_dir, load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main  # noqa: E402
from common import parallel  # noqa: E402
from common.report import Progress, format_seconds, format_table, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup  # noqa: E402
from common.tokenizer import BPETokenizer  # noqa: E402

gpt_model = load_module(HERE / "model.py")
GPT, GPTConfig, GPTClassifier = gpt_model.GPT, gpt_model.GPTConfig, gpt_model.GPTClassifier
chat = load_module(HERE / "chat.py")          # chat templates and the chat session

EOT = "<|endoftext|>"
# The pretraining tokenizer reserves ChatML's two tokens (as nanochat reserves its chat tokens): pretraining
# never sees them, chat SFT teaches them, and the vocabulary need not change between the two.
SPECIAL_TOKENS = (EOT, chat.IM_START, chat.IM_END)
STAGES = ("all", "pretrain", "finetune", "sample", "ablation", "chat")
BUILTIN_TASKS = {"chat": "chat", "docstring-module": "classification"}


# ----------------------------------------------------------------------------------------- 1. config
@dataclass
class Config:
    # what to run
    stage: str = "all"               # all | pretrain | finetune | sample | ablation (GPT-2 -> Llama) | chat
    out_dir: str = "out/05_gpt"      # checkpoints, tokenizer and report.json go here
    resume: bool = False             # continue a stopped pretraining run from out_dir/ckpt.pt
    init_from: str = ""              # a Hugging Face folder (GPT-2, Llama, Qwen) to finetune, not pretrain
    # data
    data: str = "pydocs"             # corpus: pydocs | shakespeare | wikitext-2 | tinystories | c4[:N] | file | folder
    text_field: str = "text"         # the field of a .jsonl corpus's rows that holds the text
    tokenizer_sample_mb: float = 100  # the BPE is trained on this many MB, spread over the corpus
    rebuild_cache: bool = False      # encode the corpus again (after an edit its fingerprint cannot see)
    vocab_size: int = 1024           # BPE vocabulary size (256 bytes + merges + <|endoftext|>)
    # model
    n_layer: int = 4                 # Transformer blocks
    n_head: int = 4                  # attention heads per block
    n_embd: int = 192                # width d_model
    block_size: int = 128            # context length in tokens
    dropout: float = 0.0             # dropout in pretraining (finetuning uses ft_dropout)
    arch: str = "gpt2"               # gpt2 (LayerNorm, learned positions, GELU) | llama (RMSNorm, RoPE, SwiGLU)
    n_kv_head: int = 0               # key/value heads: 0 = n_head; fewer = grouped-query attention (1 = multi-query)
    qk_norm: bool = False            # RMSNorm on each head's q and k before RoPE (Qwen3)
    rope_theta: float = 10000.0      # RoPE's base theta (llama)
    bias: bool = True                # biases in Linear and LayerNorm, as GPT-2 (llama has none)
    attn_impl: str = "sdpa"          # sdpa (fused kernel) | explicit (softmax(QK^T/sqrt(d_k))V written out)
    # pretraining
    batch_size: int = 16             # sequences per micro-batch (per process under DDP)
    grad_accum: int = 1              # micro-batches per optimizer step
    max_iters: int = 550             # optimizer steps
    lr: float = 2e-3                 # peak learning rate, reached after warmup_iters
    min_lr: float = 2e-4             # floor of the cosine decay
    warmup_iters: int = 50           # linear warmup steps
    weight_decay: float = 0.1        # AdamW decay on matrices only
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.95              # AdamW beta2
    grad_clip: float = 1.0           # clip the global gradient norm to this (0 = off)
    eval_interval: int = 110         # evaluate val loss, print a sample and save a checkpoint this often
    eval_iters: int = 20             # batches per loss estimate
    log_interval: int = 25           # print a progress line this often
    # finetuning
    tasks: str = "chat,docstring-module"  # built-in tasks to finetune on, comma-separated
    task: str = ""                   # your own .jsonl/.csv task instead (messages | text,label | instruction,input,response | input,target)
    num_labels: int = 10             # docstring-module: classify among the most frequent modules
    ft_iters: int = 200              # finetuning steps per run (pretrained and scratch alike)
    ft_batch_size: int = 16          # finetuning batch size
    ft_lr: float = 1e-3              # finetuning peak learning rate
    ft_dropout: float = 0.1          # dropout while finetuning
    ft_eval_interval: int = 40       # evaluate on val this often; keep the best checkpoint
    patience: int = 3                # stop after this many evaluations without improvement
    lm_aux_weight: float = 0.1       # lambda in L = L_CE + lambda * L_LM for classification
    freeze_layers: int = -1          # classification: freeze embeddings + first N blocks (-1 = train all)
    max_ft_examples: int = 0         # cap train examples per task, keeping every label (0 = all)
    scratch: bool = True             # also finetune a randomly initialised model for comparison
    quantize: bool = True            # int8-quantise the finetuned models and compare
    # preference tuning (DPO), after chat SFT, from the SFT model, which stays frozen as the reference
    dpo: bool = True                 # run DPO after chat SFT
    preferences: str = "pydocs"      # preference pairs: pydocs (built in) | a .jsonl of prompt,chosen,rejected
    dpo_beta: float = 0.1            # beta in L_DPO: how far the policy may move from the reference
    dpo_iters: int = 200             # DPO steps
    dpo_batch_size: int = 16         # preference pairs per step (each gives a chosen and a rejected sequence)
    dpo_lr: float = 2e-4             # DPO peak learning rate (5e-4 overfits: val L_DPO above log 2, greedy answers break)
    dpo_eval_interval: int = 50      # evaluate on val pairs this often; keep the best checkpoint
    # chat (--stage chat; --max_new_tokens, --temperature, --top_k, --top_p apply)
    system: str = ""                 # a system prompt for the conversation (empty: none)
    # sampling
    prompt: str = ""                 # text to continue (default: a fresh document)
    num_samples: int = 3             # samples printed at the end
    max_new_tokens: int = 64         # tokens per sample
    temperature: float = 0.8         # 0 = greedy
    top_k: int = 0                   # keep the k most likely tokens (0 = off)
    top_p: float = 0.95              # nucleus sampling mass (1 = off)
    # runtime
    device: str = "auto"             # auto | cpu | cuda | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False            # torch.compile the model
    seed: int = 1337                 # same seed, same device -> same result
    # model parallelism (under torchrun; finetuning stays data-parallel, on the consolidated model)
    parallel: str = "ddp"            # ddp (a model copy per rank) | fsdp (parameters, gradients, AdamW sharded) | tp (by heads)
    tp_size: int = 0                 # --parallel tp: ranks per tensor-parallel group (0 = all); FSDP across the groups (2-D)
    activation_checkpointing: bool = False  # keep only each block's input, recompute the block in backward


PRESETS = {
    "tiny": dict(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                 max_iters=20, warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=5,
                 ft_iters=8, ft_batch_size=4, ft_eval_interval=4, max_ft_examples=64, num_samples=1,
                 max_new_tokens=8, dpo_iters=8, dpo_batch_size=4, dpo_eval_interval=4),
    "default": {},   # the defaults: all stages in about 5 minutes on 2 CPU cores
    # GPT-2 small's shape on TinyStories (downloaded once, 2.2 GB): 7,500 steps of 16 x 4 x 1024 tokens are
    # 490M tokens, about one pass over it and 4 tokens per parameter (Chinchilla's compute-optimal 20 would be
    # 2.5B tokens, five passes); on one H100 about 40 minutes at 200k tokens/s
    "gpt2-124m": dict(data="tinystories", vocab_size=16384, n_layer=12, n_head=12, n_embd=768, block_size=1024,
                      dropout=0.0, batch_size=16, grad_accum=4, max_iters=7500, lr=6e-4, min_lr=6e-5, warmup_iters=300,
                      eval_interval=500, eval_iters=50, log_interval=20, ft_iters=1000, ft_batch_size=16,
                      ft_lr=1e-4, ft_eval_interval=100, max_new_tokens=128),
}

# What decides the checkpoints in out_dir: a run with other values is refused there (claim_out_dir).
CLAIMED_FIELDS = ("init_from", "data", "text_field", "vocab_size", "n_layer", "n_head", "n_embd", "block_size", "bias",
                  "arch", "n_kv_head", "qk_norm", "rope_theta")
ABLATION_FIELDS = ("data", "text_field", "vocab_size", "n_layer", "n_head", "n_embd", "block_size")  # rows set the rest
ARCHS = ("gpt2", "llama")


def swiglu_width(n_embd, multiple=32):
    """SwiGLU's hidden width: 2/3 of GELU's 4 n_embd (three matrices instead of two, the same parameters),
    rounded up to a multiple of 32 as Llama rounds it (to 256 there) for matmul-friendly shapes."""
    return multiple * math.ceil(8 * n_embd / 3 / multiple)


def model_config_for(cfg, vocab_size, **switches):
    """The GPTConfig that cfg describes: --arch gpt2 is GPT-2's block, --arch llama the modern decoder's
    (RMSNorm, RoPE, SwiGLU, no biases); --n_kv_head and --qk_norm apply to both. `switches` overrides
    single GPTConfig fields (the ablation's rows)."""
    fields = dict(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, attn_impl=cfg.attn_impl,
                  n_kv_head=cfg.n_kv_head or None, qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta)
    if cfg.arch == "llama":
        fields.update(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, intermediate_size=swiglu_width(cfg.n_embd))
    fields.update(switches)
    return GPTConfig(**fields)


# The ablation (--stage ablation): GPT-2 turned into the modern decoder one change at a time, each row
# pretrained from scratch on the same data, steps, batches and learning rate as the row before.
def ablation_rows(cfg):
    kv_heads = max(1, cfg.n_head // 2)
    rows = [("GPT-2", dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, intermediate_size=None,
                          n_kv_head=None, qk_norm=False)),
            ("+ RMSNorm, no biases", dict(norm="rmsnorm", bias=False)),
            ("+ RoPE", dict(pos="rope")),
            ("+ SwiGLU", dict(mlp="swiglu", intermediate_size=swiglu_width(cfg.n_embd))),
            (f"+ GQA ({kv_heads} kv head{'s' if kv_heads > 1 else ''} for {cfg.n_head})", dict(n_kv_head=kv_heads)),
            ("+ QK-norm", dict(qk_norm=True))]
    switches, cumulative = {}, []
    for name, change in rows:
        switches = {**switches, **change}
        cumulative.append((name, switches))
    return cumulative


def check_config(cfg):
    """Bad values -> one clear line (UserError), before anything slow runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    if cfg.init_from and cfg.stage == "pretrain":
        raise UserError("--init_from finetunes a Hugging Face model instead of pretraining, so --stage pretrain "
                        "has nothing to do with it (use --stage all, finetune or sample)")
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise UserError(f"--init_from {cfg.init_from}: no such folder (a Hugging Face folder: config.json, "
                        "model.safetensors or pytorch_model.bin, tokenizer.json or vocab.json + merges.txt)")
    if cfg.resume and cfg.init_from:
        raise UserError("--resume continues a stopped pretraining run and --init_from skips pretraining: "
                        "pass one of them")
    if cfg.resume and cfg.stage not in ("all", "pretrain", "ablation"):
        raise UserError(f"--resume continues a stopped pretraining run; --stage {cfg.stage} does not pretrain")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if cfg.arch not in ARCHS:
        raise UserError(f"unknown arch {cfg.arch!r} (valid: {', '.join(ARCHS)})")
    if cfg.n_kv_head < 0 or (cfg.n_kv_head and cfg.n_head % cfg.n_kv_head):
        raise UserError(f"--n_kv_head must divide n_head ({cfg.n_head}), got {cfg.n_kv_head}")
    if (cfg.arch == "llama" or cfg.stage == "ablation") and (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"RoPE rotates pairs of dimensions: n_embd / n_head ({cfg.n_embd // cfg.n_head}) must be even")
    if not cfg.rope_theta > 0:
        raise UserError(f"--rope_theta must be positive, got {cfg.rope_theta}")
    if not cfg.tokenizer_sample_mb > 0:
        raise UserError(f"--tokenizer_sample_mb must be positive, got {cfg.tokenizer_sample_mb}")
    if cfg.stage == "ablation" and cfg.init_from:
        raise UserError("--stage ablation pretrains every row from scratch: --init_from has no place in it")
    parallel.check_parallel_config(cfg.parallel, cfg.tp_size, cfg.n_head, cfg.n_kv_head or cfg.n_head,
                                   swiglu_width(cfg.n_embd) if cfg.arch == "llama" else 4 * cfg.n_embd)
    if cfg.attn_impl not in ("sdpa", "explicit"):
        raise UserError(f"unknown attn_impl {cfg.attn_impl!r} (valid: sdpa, explicit)")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_iters",
                 "eval_interval", "eval_iters", "log_interval", "ft_iters", "ft_batch_size", "ft_eval_interval",
                 "patience", "num_samples", "max_new_tokens", "dpo_iters", "dpo_batch_size", "dpo_eval_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "ft_lr", "dpo_lr", "dpo_beta"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("min_lr", "warmup_iters", "weight_decay", "grad_clip", "lm_aux_weight", "max_ft_examples"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    for name in ("dropout", "ft_dropout", "beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.freeze_layers < -1:
        raise UserError(f"--freeze_layers must be -1 (train all) or a number of blocks, got {cfg.freeze_layers}")
    if cfg.num_labels < 2:
        raise UserError(f"--num_labels must be at least 2, got {cfg.num_labels}")
    if cfg.vocab_size < 256 + len(SPECIAL_TOKENS) and not cfg.init_from:
        raise UserError(f"--vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                        f"{', '.join(SPECIAL_TOKENS)}), got {cfg.vocab_size}")
    unknown = [t for t in cfg.tasks.split(",") if t and t not in BUILTIN_TASKS]
    if unknown and not cfg.task:
        raise UserError(f"unknown task {unknown[0]!r} (built-in: {', '.join(BUILTIN_TASKS)}; "
                        "or --task file.jsonl)")
    if not 0 < cfg.top_p <= 1 or cfg.temperature < 0 or cfg.top_k < 0:
        raise UserError("need 0 < top_p <= 1, temperature >= 0 and top_k >= 0")


# -------------------------------------------------------------------------- 3. tokenizer and base model
def load_run_tokenizer(out_dir, ckpt):
    """The tokenizer a run in out_dir was trained with: out_dir/tokenizer.json, checked against the
    fingerprint its checkpoint recorded (equal fingerprints, equal token ids)."""
    path = out_dir / "tokenizer.json"
    try:
        tokenizer = BPETokenizer.load(path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the run's tokenizer: {error} (pretrain again, or pass the --out_dir of "
                        "an intact run)") from None
    if ckpt.get("tokenizer", {}).get("fingerprint") != tokenizer.fingerprint:
        raise UserError(f"{path} is not the tokenizer {out_dir / 'ckpt.pt'} was trained with (pretrain again, "
                        "or pass the --out_dir of an intact run)")
    return tokenizer


def load_stopped_run(cfg, out_dir, corpus):
    """--resume: the checkpoint a stopped pretraining run left in out_dir, and its tokenizer."""
    ckpt_path = out_dir / "ckpt.pt"
    if not ckpt_path.exists():
        raise UserError(f"--resume: there is no {ckpt_path} to continue; run without --resume to start")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("corpus_fingerprint") != corpus.fingerprint:
        raise UserError(f"--resume: the corpus {cfg.data!r} is not the one {ckpt_path} was trained on (edited "
                        "since?); run without --resume to start over")
    return ckpt, load_run_tokenizer(out_dir, ckpt)


def load_pretrained_run(out_dir, rt):
    """--stage finetune / sample: the pretrained GPT in out_dir, its tokenizer and its pretraining report."""
    ckpt_path = out_dir / "ckpt.pt"
    if not ckpt_path.exists():
        raise UserError(f"no pretrained model in {out_dir} ({ckpt_path} not found): run --stage pretrain "
                        "first, or pass --init_from a Hugging Face folder")
    ckpt = load_checkpoint(ckpt_path, map_location=rt.device)
    try:
        base = GPT(GPTConfig(**ckpt["model_config"])).to(rt.device)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{ckpt_path} is not a checkpoint of this chapter (no valid model_config)") from None
    load_model_state(base, ckpt["model"], ckpt_path)
    tokenizer = load_run_tokenizer(out_dir, ckpt)
    planned = ckpt.get("config", {}).get("max_iters", ckpt["iter"])
    if ckpt["iter"] < planned:
        rt.log(f"note: {ckpt_path} is a stopped run (iter {ckpt['iter']} of {planned}); --resume continues it")
    return base, tokenizer, ckpt.get("report")


def load_tuned_chat_model(base, out_dir, rt):
    """--stage chat: load into `base` the latest chat-tuned weights in out_dir (DPO's chat_dpo.pt, or a chat
    SFT run's ft_<task>_pretrained.pt: the newest checkpoint whose "kind" is chat)."""
    found = []
    for path in [out_dir / "chat_dpo.pt", *sorted(out_dir.glob("ft_*_pretrained.pt"))]:
        if path.exists():
            ckpt = load_checkpoint(path, map_location=rt.device)
            if ckpt.get("kind") == "chat":
                found.append((path.stat().st_mtime, path, ckpt))
    if not found:
        raise UserError(f"no chat-tuned model in {out_dir}: run --stage finetune (chat SFT and DPO) first, or "
                        "pass --init_from a Hugging Face instruct folder")
    _, path, ckpt = max(found, key=lambda item: item[0])
    load_model_state(base, ckpt["model"], path)
    rt.log(f"chat model: {path} (iter {ckpt['iter']})")


def load_gpt2_folder(cfg, rt):
    """--init_from: a Hugging Face folder's weights (GPT-2, or a Llama / Qwen that model.py reads) and its
    vocabulary: tokenizer.json, or GPT-2's older vocab.json + merges.txt; a GPT-2 folder with neither
    gets tiktoken's copy of GPT-2's vocabulary (downloaded once)."""
    folder = Path(cfg.init_from)
    try:
        base = GPT.from_pretrained(folder, dropout=cfg.ft_dropout, attn_impl=cfg.attn_impl)
        if (folder / "tokenizer.json").exists():
            tokenizer = BPETokenizer.from_hf(folder)
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            tokenizer = BPETokenizer.from_hf(folder / "vocab.json", folder / "merges.txt")
        else:
            tokenizer = None
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise UserError(f"--init_from {folder}: {error}") from None
    if tokenizer is None and base.config.pos != "learned":
        raise UserError(f"--init_from {folder} has no tokenizer.json (nor vocab.json + merges.txt)")
    if tokenizer is None:
        try:
            tokenizer = BPETokenizer.from_tiktoken("gpt2")
        except (RuntimeError, ValueError):
            raise UserError(f"--init_from {folder} has no tokenizer.json or vocab.json + merges.txt, and tiktoken "
                            f"could not fetch GPT-2's vocabulary either (offline?): copy GPT-2's tokenizer.json "
                            f"(or vocab.json and merges.txt) into {folder}") from None
    if tokenizer.eot_id is None:
        raise UserError(f"--init_from {folder}: the vocabulary has no end-of-text token ({EOT} or <|end_of_text|>)")
    if tokenizer.vocab_size > base.config.vocab_size:
        raise UserError(f"--init_from {folder}: the vocabulary has {tokenizer.vocab_size} tokens, the model's "
                        f"embedding only {base.config.vocab_size}")
    rt.log(f"loaded {folder}: {base.num_parameters() / 1e6:.1f}M parameters, "
           f"{tokenizer.vocab_size}-token vocabulary")
    return base.to(rt.device), tokenizer


# ------------------------------------------------------------------------------------ 4. pretraining
def get_lr(it, peak, floor, warmup, total):
    """Linear warmup to `peak`, then cosine decay to `floor` at `total`."""
    if it < warmup:
        return peak * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


@torch.no_grad()
def estimate_loss(model, tokens, cfg, rt, split):
    """Mean LM loss over `eval_iters` batches; the same windows every call (a fixed generator),
    so successive estimates differ only because the model changed."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + (0 if split == "train" else 1))
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = tokens.get_batch(split, cfg.batch_size, cfg.block_size, rt.device, generator)
        with rt.autocast():
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def prompt_ids(tokenizer, prompt, block_size):
    """The ids to continue: the prompt's, or <|endoftext|> alone (a fresh document); one line if the
    prompt leaves no room in the context."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    if len(ids) >= block_size:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than the context (block_size {block_size})")
    return ids


def sample_text(model, tokenizer, rt, prompt="", max_new_tokens=64, temperature=0.8, top_k=0, top_p=0.95,
                num_samples=1, seed=0):
    """Continue `prompt` (or start a new document after <|endoftext|>) with the KV cache."""
    eot = tokenizer.eot_id
    ids = prompt_ids(tokenizer, prompt, model.config.block_size)
    idx = torch.tensor([ids] * num_samples, device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    with rt.autocast():
        out = model.generate(idx, min(max_new_tokens, model.config.block_size - len(ids)),
                             temperature=temperature, top_k=top_k or None, top_p=top_p if top_p < 1 else None,
                             eos_id=eot, generator=generator)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        new = new[:new.index(eot)] if eot in new else new
        texts.append(prompt + tokenizer.decode(new))
    return texts


def pretrain(cfg, rt, tokenizer, tokens, out_dir, stopped=None, model_config=None):
    """Train a GPT from random weights on the corpus, or continue `stopped` (the checkpoint of a stopped
    run, --resume) exactly where it stopped; returns (model, pretraining report). The model is the one cfg
    describes, or `model_config` (an ablation row)."""
    ckpt_path = out_dir / "ckpt.pt"
    model_config = model_config or model_config_for(cfg, tokenizer.vocab_size)
    if stopped is not None and stopped.get("model_config") != dataclasses.asdict(model_config):
        raise UserError(f"{ckpt_path} was saved for another model config ({stopped.get('model_config')}); "
                        f"use the same flags, or another --out_dir")
    model = GPT(model_config).to(rt.device)
    start_iter, best_val, history, seconds_before = 0, float("inf"), [], 0.0
    if stopped is not None:
        load_model_state(model, stopped["model"], ckpt_path)   # whole tensors, before any sharding
        torch.set_rng_state(stopped["torch_rng"])          # dropout draws from the global generators
        if rt.device_type == "cuda":
            torch.cuda.set_rng_state(stopped["cuda_rng"])
        start_iter, best_val, history = stopped["iter"], stopped["best_val_loss"], stopped["history"]
        seconds_before = stopped["seconds"]                 # time spent before the stop counts too
        rt.log(f"resumed from {ckpt_path} at iter {start_iter}")
        if start_iter >= cfg.max_iters:
            return model, stopped["report"]

    rt.log(f"model: {model.num_parameters() / 1e6:.2f}M parameters ({model_config.n_layer} layers, "
           f"{model_config.n_head} heads, {model_config.n_embd} wide, context {model_config.block_size}; "
           f"{model_config.norm}, {model_config.pos} positions, {model_config.mlp}"
           f"{f', {model_config.kv_heads} kv heads' if model_config.kv_heads != model_config.n_head else ''}"
           f"{', QK-norm' if model_config.qk_norm else ''})")
    # Data parallel (DDP: a whole copy per rank) or model parallel (--parallel fsdp | tp: each rank holds a
    # shard). The optimizer is built after sharding, so that AdamW's moments are sharded like the parameters.
    par = parallel.setup_parallel(rt, cfg.parallel, cfg.tp_size, dataclasses.asdict(cfg))
    if cfg.activation_checkpointing:
        parallel.checkpoint_blocks(model)
    if par.sharded:
        model = par.shard(model, mixed_precision=rt.dtype if rt.device_type == "cuda" else None)
        rt.log(par.describe(model_config))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), rt.device_type)
    if stopped is not None:
        parallel.load_full_optimizer_state_dict(model, optimizer, stopped["optimizer"], par)
        if stopped.get("scaler"):
            rt.scaler.load_state_dict(stopped["scaler"])
    train_model = rt.maybe_compile(model) if par.sharded else rt.wrap(rt.maybe_compile(model))
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * par.dp_size
    progress = Progress(cfg.max_iters, tokens_per_iter, log=rt.log, log_interval=cfg.log_interval,
                        flops_per_token=model.num_flops_per_token(), device=rt.device, dtype=rt.dtype,
                        start_iter=start_iter)

    def pretrain_report():
        return {"val_loss": best_val if best_val < float("inf") else None,
                "perplexity": math.exp(best_val) if best_val < 50 else None,
                "tokens_per_second": progress.average_tokens_per_second,
                "seconds": seconds_before + progress.seconds, "iters": cfg.max_iters,
                "parameters": model.num_parameters(), "history": history,
                **({"memory": memory} if memory else {})}

    def save(it):
        """Everything --resume needs to continue exactly: weights, optimizer, step, RNG states, bookkeeping.
        Sharded runs gather the whole tensors first (every rank takes part), so that ckpt.pt is the file one
        process writes and reads (see common/parallel.py for why not torch.distributed.checkpoint)."""
        model_state = parallel.full_state_dict(model, par)
        optimizer_state = parallel.full_optimizer_state_dict(model, optimizer, par)
        if rt.is_main:
            tokenizer.save(out_dir / "tokenizer.json")
            save_checkpoint(ckpt_path, {
                "model": model_state, "optimizer": optimizer_state, "scaler": rt.scaler.state_dict(),
                "model_config": dataclasses.asdict(model_config), "config": dataclasses.asdict(cfg),
                "iter": it, "best_val_loss": best_val, "history": history, "torch_rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state()} if rt.device_type == "cuda" else {}),
                "tokenizer": {"path": "tokenizer.json", "fingerprint": tokenizer.fingerprint},
                "corpus_fingerprint": tokens.corpus_fingerprint,
                "report": pretrain_report(), "seconds": seconds_before + progress.seconds,
            })

    memory = None
    model.train()
    with StopFlag() as stop:
        for it in range(start_iter, cfg.max_iters):
            lr = get_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # This step's windows depend on (seed, step, rank) alone, so a resumed run, on every rank,
            # draws the very batches the stopped run would have drawn next.
            # (The rank is the data-parallel one: the ranks of a tensor-parallel group share their batch.)
            batch_generator = torch.Generator().manual_seed(cfg.seed * 2**32 + it * par.dp_size + par.dp_rank)
            for micro_step in range(cfg.grad_accum):
                x, y = tokens.get_batch("train", cfg.batch_size, cfg.block_size, rt.device, batch_generator)
                # Under DDP / FSDP, gradients are averaged across ranks only on the last micro-batch of the step.
                with par.gradient_sync(train_model, micro_step == cfg.grad_accum - 1, rt.ddp), rt.autocast():
                    _, loss = train_model(x, y)
                rt.scaler.scale(loss / cfg.grad_accum).backward()
            if it == start_iter:   # what each rank holds: parameters and gradients now, AdamW's moments after the step
                held = parallel.state_bytes(model)
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if it == start_iter:
                held["optimizer"] = parallel.optimizer_bytes(optimizer)
                memory = {"state_bytes_per_rank": parallel.gather_objects(rt, held)}
                rt.log(parallel.describe_memory(memory["state_bytes_per_rank"]))
            progress.step(it, loss=loss, lr=lr)

            # once in a while: val loss, a sample, a checkpoint
            if (it + 1) % cfg.eval_interval == 0 or it == cfg.max_iters - 1:
                train_loss = estimate_loss(model, tokens, cfg, rt, "train")
                val_loss = estimate_loss(model, tokens, cfg, rt, "val")
                best_val = min(best_val, val_loss)
                history.append({"iter": it + 1, "train_loss": train_loss, "val_loss": val_loss})
                rt.log(f"eval iter {it + 1}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                       f"val perplexity {math.exp(val_loss):.1f}")
                text = sample_text(model, tokenizer, rt, max_new_tokens=min(48, cfg.block_size - 1), seed=it)[0]
                rt.log(f"  sample: {text.strip()[:200]!r}")
                save(it + 1)
            if rt.all_reduce_mean(float(stop.requested)) > 0:    # under DDP every rank stops at the same step
                save(it + 1)
                rt.log(f"interrupted: saved {ckpt_path} at iter {it + 1}; continue with --resume")
                sys.exit(130)
    memory["peak_bytes_per_rank"] = parallel.gather_objects(rt, parallel.peak_memory_bytes(rt.device))
    rt.log(f"peak memory per rank: {', '.join(f'{b / 2**20:.0f} MiB' for b in memory['peak_bytes_per_rank'])} "
           f"({'allocated on the GPU' if rt.device_type == 'cuda' else 'resident set size'})")
    if par.sharded:   # finetuning, sampling and export go on with the whole model, as after a DDP run
        full = parallel.full_state_dict(model, par)
        model = GPT(model_config).to(rt.device)
        load_model_state(model, full, ckpt_path)
    return model, pretrain_report()


def ablation(cfg, rt, tokenizer, tokens, corpus, out_dir):
    """--stage ablation: pretrain each row of `ablation_rows` from scratch with cfg's budget, in
    out_dir/ablation/<row>; returns {row: its parameters, best val loss, tokens/s and seconds}. With
    --resume, finished rows are read back and a stopped row continues."""
    results, rows = {}, ablation_rows(cfg)
    for number, (name, switches) in enumerate(rows, 1):
        row_dir = out_dir / "ablation" / str(number)
        rt.log(f"\nablation {number}/{len(rows)}: {name}")
        stopped = None
        if cfg.resume and (row_dir / "ckpt.pt").exists():
            stopped, _ = load_stopped_run(cfg, row_dir, corpus)
        _, summary = pretrain(cfg, rt, tokenizer, tokens, row_dir, stopped,
                              model_config_for(cfg, tokenizer.vocab_size, **switches))
        results[name] = {key: summary[key] for key in ("parameters", "val_loss", "perplexity", "tokens_per_second",
                                                       "seconds")}
    return results


# ------------------------------------------------------------------------------ 5-6. finetuning data
def chat_example(tokenizer, template, messages, block_size):
    """(input ids, label ids) of one conversation: labels are -100 everywhere but on the assistant's tokens
    (its answers and their stop tokens), so only those are learned:

        L = -sum over assistant positions t of log p(x_t | x_<t); roles, system and user text are context.

    A conversation longer than the context keeps block_size + 1 tokens: from the start (its later turns are
    cut), unless the first answer starts past the middle of the context; then the window starts
    block_size / 2 tokens before that answer (a very long first message keeps its end).
    """
    ids, assistant_mask = template.render(tokenizer, messages)
    first_answer = assistant_mask.index(1) if 1 in assistant_mask else 0
    start = max(0, first_answer - block_size // 2) if len(ids) > block_size + 1 else 0
    ids, assistant_mask = ids[start:start + block_size + 1], assistant_mask[start:start + block_size + 1]
    labels = [token if learned else -100 for token, learned in zip(ids, assistant_mask)]
    return ids[:-1], labels[1:]                            # labels[t] is the token after ids[t]


def as_conversation(example):
    """A conversation {"messages": [...]} as it is; a user's instruction,input,response or input,target row
    as a one-turn conversation (the input below the instruction, in the user's message)."""
    if "messages" in example:
        return example
    if "instruction" in example:
        user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": example["response"]}]}
    return {"messages": [{"role": "user", "content": example["input"]},
                         {"role": "assistant", "content": example["target"]}]}


def capped(examples, cap, seed, task, keep_every_label=False):
    """A random (seeded) subset of at most `cap` examples (the files are sorted by name, not shuffled).
    keep_every_label: one example of each label goes in first, so that the cap never drops a class."""
    if len(examples) <= cap:
        return examples
    shuffled = random.Random(seed).sample(examples, len(examples))
    if not keep_every_label:
        return shuffled[:cap]
    first_of_label = {}
    for position, example in enumerate(shuffled):
        first_of_label.setdefault(example["label"], position)
    if len(first_of_label) > cap:
        raise UserError(f"{task}: --max_ft_examples {cap} is fewer than its {len(first_of_label)} labels; "
                        f"pass at least {len(first_of_label)}, or 0 for all examples")
    keep = set(first_of_label.values())
    keep.update([p for p in range(len(shuffled)) if p not in keep][:cap - len(keep)])
    return [shuffled[p] for p in sorted(keep)]


def load_finetuning_tasks(cfg):
    """{task name: (kind, {split: examples})} for the built-in tasks or the user's file, checked now,
    before any pretraining: a classification task needs every val/test label in train."""
    names = [cfg.task] if cfg.task else [t for t in cfg.tasks.split(",") if t]
    tasks = {}
    for name in names:
        task = Path(name).stem if cfg.task else name
        if name == "chat" or (cfg.task and data.is_conversation_file(name)):
            splits = {split: data.load_conversations("pydocs" if name == "chat" else name, split)
                      for split in data.SPLITS}
        else:
            splits = {split: data.load_task(name, split, num_labels=cfg.num_labels) for split in data.SPLITS}
        kind = BUILTIN_TASKS.get(name) or ("classification" if "label" in splits["train"][0] else "chat")
        if kind == "chat":
            splits = {s: [as_conversation(e) for e in examples] for s, examples in splits.items()}
        else:
            labels = set(data.task_labels(splits["train"]))
            unknown = {e["label"] for s in ("val", "test") for e in splits[s]} - labels
            if unknown:
                raise UserError(f"{task}: the labels {sorted(unknown)[:3]} are in val/test but in no train row "
                                "(each row's split is a stable hash of the row: add rows with these labels)")
            if len(labels) < 2:
                raise UserError(f"{task}: a classification task needs at least 2 labels, found {sorted(labels)}")
        if cfg.max_ft_examples:
            small = max(16, cfg.max_ft_examples // 4)
            splits = {"train": capped(splits["train"], cfg.max_ft_examples, cfg.seed, task,
                                      keep_every_label=kind == "classification"),
                      "val": capped(splits["val"], small, cfg.seed, task),
                      "test": capped(splits["test"], small, cfg.seed, task)}
        tasks[task] = (kind, splits)
    return tasks


def finetuning_start(base, init, cfg, rt):
    """The GPT a finetuning run starts from, with finetuning dropout: a copy of the pretrained weights, or
    (init "scratch") the same architecture freshly initialised; both seeded alike."""
    torch.manual_seed(cfg.seed)
    gpt = GPT(dataclasses.replace(base.config, dropout=cfg.ft_dropout)).to(rt.device)
    if init == "pretrained":
        gpt.load_state_dict(base.state_dict())
    return gpt


def shuffled_batches(items, cfg, rt):
    """Batches of example indices, endlessly: each epoch a new seeded order of length-bucketed batches
    (similar lengths together, so little padding); under DDP each rank takes its share."""
    lengths = [len(ids) for ids, _ in items]
    for epoch in itertools.count():
        order = data.batch_indices(lengths, cfg.ft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True)
        order = order[rt.rank::rt.world_size] or order
        while order:
            yield order.pop()


# ---------------------------------------------------------------------------------------- 5. chat SFT
def chat_batch(items, pad_id, device):
    """(ids, labels) pairs -> right-padded input_ids, attention_mask and labels (-100 at the padding)."""
    batch = data.pad_batch([ids for ids, _ in items], pad_id, labels=[labels for _, labels in items])
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def assistant_loss(model, items, cfg, rt, pad_id):
    """The mean loss per assistant token (roles, system and user tokens and padding do not count); lower is
    better."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    lengths = [len(ids) for ids, _ in items]
    for indices in data.batch_indices(lengths, cfg.ft_batch_size * 2, shuffle=False, bucket=True):
        batch = chat_batch([items[i] for i in indices], pad_id, rt.device)
        with rt.autocast():
            logits, _ = model(batch["input_ids"])
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1),
                                   ignore_index=-100, reduction="sum")
        total_loss += loss.item()
        total_tokens += (batch["labels"] != -100).sum().item()
    model.train()
    return total_loss / max(1, total_tokens)


@torch.no_grad()
def answer_examples(model, tokenizer, template, conversations, cfg, rt):
    """The tuned model's greedy answers, turn after turn, to the user messages of test conversations (its
    own answers stay in the conversation, as in a chat), next to the reference answers."""
    rows = []
    for conversation in conversations:
        messages = conversation["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        session = chat.ChatSession(model, tokenizer, template, system=system, max_new_tokens=48, temperature=0)
        for user, reference in zip(messages, messages[1:]):
            if user["role"] != "user" or reference["role"] != "assistant":
                continue
            try:
                with rt.autocast():
                    answer, _ = session.reply(user["content"])
            except UserError:                               # a turn too long for a tiny context
                break
            rows.append({"user": user["content"], "reference": reference["content"], "answer": answer.strip()})
    return rows


def chat_sft(task, splits, base, tokenizer, template, cfg, rt, out_dir):
    """Supervised finetuning on conversations (the loss on the assistant's tokens), from the pretrained
    weights and from scratch with the same budget; returns the task's report row (metric: the test
    assistant-token loss)."""
    pad_id = tokenizer.eot_id
    try:
        items = {split: [chat_example(tokenizer, template, e["messages"], cfg.block_size) for e in examples]
                 for split, examples in splits.items()}
    except ValueError as error:                            # a message holding a special token's text
        raise UserError(f"{task}: {error}") from None
    rt.log(f"\nchat SFT on {task} ({template.name} template): {len(items['train'])} train / {len(items['val'])} "
           f"val / {len(items['test'])} test conversations")
    row, finetuned = {"metric": "assistant_loss"}, {}
    for init in ("pretrained", "scratch") if cfg.scratch else ("pretrained",):
        name, ckpt_path, start = f"{task}/{init}", out_dir / f"ft_{task}_{init}.pt", time.perf_counter()
        model = finetuning_start(base, init, cfg, rt)
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.ft_lr, (cfg.beta1, cfg.beta2), rt.device_type)
        train_model = rt.wrap(model)
        batches = shuffled_batches(items["train"], cfg, rt)
        progress = Progress(cfg.ft_iters, cfg.ft_batch_size * cfg.block_size, log=rt.log,
                            log_interval=cfg.ft_eval_interval, name=name)
        best_val, bad_evals = None, 0
        model.train()
        for it in range(cfg.ft_iters):
            batch = chat_batch([items["train"][i] for i in next(batches)], pad_id, rt.device)
            lr = get_lr(it, cfg.ft_lr, cfg.ft_lr / 10, max(1, cfg.ft_iters // 10), cfg.ft_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with rt.autocast():
                _, loss = train_model(batch["input_ids"], batch["labels"])   # on the assistant's tokens only
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.step(it, loss=loss, lr=lr, tokens=batch["attention_mask"].numel() * rt.world_size)

            # once in a while: val assistant loss; keep the best weights, stop when they stop improving
            if (it + 1) % cfg.ft_eval_interval == 0 or it == cfg.ft_iters - 1:
                val_loss = assistant_loss(model, items["val"], cfg, rt, pad_id)
                rt.log(f"{name} eval at iter {it + 1}: val assistant_loss {val_loss:.4f}")
                if best_val is None or val_loss < best_val:
                    best_val, bad_evals = val_loss, 0
                    if rt.is_main:   # "kind" and "template": what --stage chat looks for and talks in
                        save_checkpoint(ckpt_path, {"model": model.state_dict(), "iter": it + 1, "kind": "chat",
                                                    "template": template.name, "val": {"assistant_loss": val_loss}})
                else:
                    bad_evals += 1
                    if bad_evals >= cfg.patience:
                        rt.log(f"{name}: early stop at iter {it + 1} (no val improvement in {cfg.patience} evals)")
                        break
        rt.barrier()                                      # rank 0 wrote the best weights; every rank loads them
        load_model_state(model, load_checkpoint(ckpt_path, map_location=rt.device)["model"], ckpt_path)
        test_loss = assistant_loss(model, items["test"], cfg, rt, pad_id)
        rt.log(f"{name}: test assistant_loss {test_loss:.4f}")
        row[init] = test_loss
        row[f"{init}_detail"] = {"test": {"assistant_loss": test_loss}, "val": {"assistant_loss": best_val},
                                 "seconds": time.perf_counter() - start}
        finetuned[init] = model
    row["seconds"] = sum(row[f"{init}_detail"]["seconds"] for init in finetuned)

    row["examples"] = answer_examples(finetuned["pretrained"], tokenizer, template, splits["test"][:2], cfg, rt)
    for example in row["examples"]:
        rt.log(f"  user: {example['user']}\n    reference: {example['reference']}\n"
               f"    answer:    {example['answer']}")
    if cfg.quantize and rt.is_main:
        cpu = cpu_float32(rt)
        row["deployment"] = {}
        for variant, (deployed, megabytes) in deployment_variants(finetuned["pretrained"], rt).items():
            test_loss = assistant_loss(deployed, items["test"], cfg, cpu, pad_id)
            row["deployment"][variant] = {"assistant_loss": test_loss, "megabytes": megabytes,
                                          "generate_tokens_per_second": generation_speed(deployed, cpu)}
        log_deployment(row["deployment"], rt)
    return row, finetuned["pretrained"]


# ------------------------------------------------------------------------ 5b. preference tuning (DPO)
def preference_example(tokenizer, template, pair, block_size):
    """(chosen, rejected): each the (ids, labels) of the one-turn conversation prompt -> that answer, labels
    on the answer's tokens only (its stop token included), as in chat SFT."""
    def answered(answer):
        return chat_example(tokenizer, template, [{"role": "user", "content": pair["prompt"]},
                                                  {"role": "assistant", "content": answer}], block_size)
    return answered(pair["chosen"]), answered(pair["rejected"])


def preference_batch(items, pad_id, device):
    """Pairs -> one padded batch of 2B sequences: the B chosen answers, then the B rejected ones."""
    return chat_batch([chosen for chosen, _ in items] + [rejected for _, rejected in items], pad_id, device)


def sequence_logprobs(model, batch):
    """log pi(y|x) = sum over the answer's positions t of log p(y_t | x, y_<t), one per row (B,), and the
    number of answer tokens per row (B,): the prompt and padding (labels -100) do not count."""
    logits, _ = model(batch["input_ids"])                                          # (B, T, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    answer = batch["labels"] != -100                                               # (B, T)
    token_logp = logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]  # (B, T) log p(label)
    return (token_logp * answer).sum(-1), answer.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """Direct preference optimisation (Rafailov et al. 2023), per pair, from the sequences' log-probabilities:

        L_DPO = -log sigmoid(beta [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

    with y_w the chosen and y_l the rejected answer. beta log pi(y|x) / pi_ref(y|x) is the reward the policy
    implicitly defines, and L_DPO the Bradley-Terry loss of that reward on the pair: minimising it raises the
    chosen answer's reward over the rejected one's. When pi = pi_ref both rewards are 0 and L = log 2.
    Returns (mean loss, chosen rewards (B,), rejected rewards (B,)).
    """
    chosen_reward = beta * (policy_chosen - reference_chosen)          # r(x, y_w) = beta log pi / pi_ref
    rejected_reward = beta * (policy_rejected - reference_rejected)    # r(x, y_l)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    return losses.mean(), chosen_reward.detach(), rejected_reward.detach()


@torch.no_grad()
def preference_scores(model, items, cfg, rt, pad_id):
    """log pi(y_w|x), log pi(y_l|x) and the answers' token counts over all pairs: four (N,) tensors."""
    model.eval()
    scores = [[], [], [], []]
    for start in range(0, len(items), cfg.dpo_batch_size * 2):
        chunk = items[start:start + cfg.dpo_batch_size * 2]
        with rt.autocast():
            logps, counts = sequence_logprobs(model, preference_batch(chunk, pad_id, rt.device))
        for column, values in zip(scores, (logps[:len(chunk)], logps[len(chunk):], counts[:len(chunk)],
                                           counts[len(chunk):])):
            column.append(values.float().cpu())
    return [torch.cat(column) for column in scores]


def preference_metrics(policy, reference, beta):
    """The figures of one model on a set of pairs, from preference_scores of it (`policy`) and of the SFT model
    (`reference`):
    - preference_accuracy: the share of pairs whose chosen answer the model gives the higher log-probability,
      log pi(y_w|x) > log pi(y_l|x): the same measure for the SFT model and for the DPO model;
    - reward_accuracy: the share with r(x, y_w) > r(x, y_l), the implicit reward against the SFT reference
      (0 for the SFT model itself, whose rewards are all 0), and reward_margin, the mean r(x, y_w) - r(x, y_l);
    - chosen_loss and rejected_loss: the mean per-token loss of the chosen (rejected) answers;
    - dpo_loss: L_DPO (log 2 for the SFT model)."""
    chosen, rejected, chosen_tokens, rejected_tokens = policy
    loss, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, reference[0], reference[1], beta)
    return {"preference_accuracy": (chosen > rejected).float().mean().item(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
            "reward_margin": (chosen_reward - rejected_reward).mean().item(),
            "chosen_loss": (-chosen.sum() / chosen_tokens.sum()).item(),
            "rejected_loss": (-rejected.sum() / rejected_tokens.sum()).item(),
            "dpo_loss": loss.item()}


def preference_tuning(pairs, sft_model, tokenizer, template, cfg, rt, out_dir):
    """DPO from the chat-SFT model, which stays frozen as the reference pi_ref; returns the report row
    (metric: the test preference accuracy, of the SFT model and of the DPO model)."""
    pad_id = tokenizer.eot_id
    try:
        items = {split: [preference_example(tokenizer, template, pair, cfg.block_size) for pair in split_pairs]
                 for split, split_pairs in pairs.items()}
    except ValueError as error:                            # an answer holding a special token's text
        raise UserError(f"--preferences {cfg.preferences}: {error}") from None
    rt.log(f"\npreference tuning (DPO, beta {cfg.dpo_beta}) from the chat SFT model: {len(items['train'])} train / "
           f"{len(items['val'])} val / {len(items['test'])} test pairs")
    ckpt_path, start = out_dir / "chat_dpo.pt", time.perf_counter()
    reference = sft_model.eval().requires_grad_(False)
    # `model` is the policy pi, trained; `reference` is pi_ref, frozen. The policy starts as the SFT model,
    # without dropout: at step 0 pi = pi_ref exactly (L = log 2), and the log-ratios measure what DPO
    # changed, not dropout noise.
    torch.manual_seed(cfg.seed)
    model = GPT(dataclasses.replace(reference.config, dropout=0.0)).to(rt.device)
    model.load_state_dict(reference.state_dict())
    # the reference's scores of the val and test pairs, computed once: pi_ref never changes
    reference_scores = {split: preference_scores(reference, items[split], cfg, rt, pad_id) for split in ("val", "test")}
    sft = preference_metrics(reference_scores["test"], reference_scores["test"], cfg.dpo_beta)
    sft_val = preference_metrics(reference_scores["val"], reference_scores["val"], cfg.dpo_beta)
    rt.log(f"SFT model: val preference accuracy {sft_val['preference_accuracy']:.4f}; on test pairs: preference "
           f"accuracy {sft['preference_accuracy']:.4f} | chosen loss "
           f"{sft['chosen_loss']:.4f} | rejected loss {sft['rejected_loss']:.4f}")

    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.dpo_lr, (cfg.beta1, cfg.beta2), rt.device_type)
    train_policy = rt.wrap(model)
    batch_order = data.batch_indices([len(c[0]) + len(r[0]) for c, r in items["train"]], cfg.dpo_batch_size,
                                     shuffle=True, seed=cfg.seed)
    progress = Progress(cfg.dpo_iters, cfg.dpo_batch_size * 2 * cfg.block_size, log=rt.log,
                        log_interval=cfg.dpo_eval_interval, name="dpo")
    best = None
    model.train()
    for it in range(cfg.dpo_iters):
        if not batch_order:                               # a new epoch, a new order
            batch_order = data.batch_indices([len(c[0]) + len(r[0]) for c, r in items["train"]], cfg.dpo_batch_size,
                                             shuffle=True, seed=cfg.seed + it)
        indices = batch_order.pop()[rt.rank::rt.world_size] or [0]
        batch = preference_batch([items["train"][i] for i in indices], pad_id, rt.device)
        lr = get_lr(it, cfg.dpo_lr, cfg.dpo_lr / 10, max(1, cfg.dpo_iters // 10), cfg.dpo_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with rt.autocast():
            policy_logps, _ = sequence_logprobs(train_policy, batch)                  # (2B,) log pi(y|x)
            with torch.no_grad():
                reference_logps, _ = sequence_logprobs(reference, batch)              # (2B,) log pi_ref(y|x)
        B = len(indices)
        loss, chosen_reward, rejected_reward = dpo_loss(policy_logps[:B], policy_logps[B:], reference_logps[:B],
                                                        reference_logps[B:], cfg.dpo_beta)
        rt.scaler.scale(loss).backward()
        # the optimizer step (same in every train.py)
        if cfg.grad_clip > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.step(it, loss=loss, lr=lr, tokens=batch["attention_mask"].numel() * rt.world_size,
                      margin=(chosen_reward - rejected_reward).mean().item())

        # once in a while: L_DPO on val pairs; keep the best policy
        if (it + 1) % cfg.dpo_eval_interval == 0 or it == cfg.dpo_iters - 1:
            val = preference_metrics(preference_scores(model, items["val"], cfg, rt, pad_id), reference_scores["val"],
                                     cfg.dpo_beta)
            model.train()
            rt.log(f"dpo eval at iter {it + 1}: val dpo_loss {val['dpo_loss']:.4f} | preference accuracy "
                   f"{val['preference_accuracy']:.4f} | reward accuracy {val['reward_accuracy']:.4f} | "
                   f"margin {val['reward_margin']:.3f}")
            if best is None or val["dpo_loss"] < best["dpo_loss"]:
                best = val
                if rt.is_main:
                    save_checkpoint(ckpt_path, {"model": model.state_dict(), "iter": it + 1, "kind": "chat",
                                                "template": template.name, "val": val})
    rt.barrier()
    load_model_state(model, load_checkpoint(ckpt_path, map_location=rt.device)["model"], ckpt_path)
    dpo = preference_metrics(preference_scores(model, items["test"], cfg, rt, pad_id), reference_scores["test"],
                             cfg.dpo_beta)
    rt.log(f"DPO model on test pairs: preference accuracy {dpo['preference_accuracy']:.4f} (SFT "
           f"{sft['preference_accuracy']:.4f}) | reward accuracy {dpo['reward_accuracy']:.4f} | margin "
           f"{dpo['reward_margin']:.3f} | chosen loss {dpo['chosen_loss']:.4f} (SFT {sft['chosen_loss']:.4f})")
    return {"metric": "preference_accuracy", "baseline": 0.5, "sft": sft["preference_accuracy"],
            "dpo": dpo["preference_accuracy"], "reward_accuracy": dpo["reward_accuracy"],
            "reward_margin": dpo["reward_margin"], "chosen_loss_sft": sft["chosen_loss"],
            "chosen_loss_dpo": dpo["chosen_loss"], "beta": cfg.dpo_beta, "seconds": time.perf_counter() - start,
            "test": {"sft": sft, "dpo": dpo}, "val": best}


# ----------------------------------------------------------------------- 6. classification finetuning
def classification_batch(items, pad_id, device):
    """(ids, class index) pairs -> right-padded input_ids and attention_mask, and the labels (B,)."""
    batch = data.pad_batch([ids for ids, _ in items], pad_id)
    batch["labels"] = torch.tensor([label for _, label in items])
    return {k: v.to(device) for k, v in batch.items()}


def accuracy_and_macro_f1(predictions, targets, num_classes):
    """Accuracy, and macro-F1: the mean over classes of F1 = 2 P R / (P + R), so rare classes count
    as much as frequent ones (a majority-class guesser scores high accuracy but low macro-F1)."""
    correct = sum(p == t for p, t in zip(predictions, targets))
    f1s = []
    for c in range(num_classes):
        tp = sum(p == c and t == c for p, t in zip(predictions, targets))
        fp = sum(p == c and t != c for p, t in zip(predictions, targets))
        fn = sum(p != c and t == c for p, t in zip(predictions, targets))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return correct / max(1, len(targets)), sum(f1s) / num_classes


@torch.no_grad()
def classification_metrics(model, items, cfg, rt, pad_id, num_labels):
    """Accuracy and macro-F1 of the classifier's argmax over `items`."""
    model.eval()
    predictions = []
    lengths = [len(ids) for ids, _ in items]
    for indices in data.batch_indices(lengths, cfg.ft_batch_size * 2, shuffle=False, bucket=True):
        batch = classification_batch([items[i] for i in indices], pad_id, rt.device)
        with rt.autocast():
            logits, _ = model(batch["input_ids"], batch["attention_mask"])
        predictions += [(i, p) for i, p in zip(indices, logits.argmax(-1).tolist())]
    model.train()
    predicted = [p for _, p in sorted(predictions)]
    accuracy, macro_f1 = accuracy_and_macro_f1(predicted, [label for _, label in items], num_labels)
    return {"accuracy": accuracy, "macro_f1": macro_f1}


def classification_finetuning(task, splits, base, tokenizer, cfg, rt, out_dir):
    """Finetune a classifier head on the GPT (and the GPT with it), from the pretrained weights and from
    scratch with the same budget; returns the task's report row (metric: test accuracy)."""
    pad_id = tokenizer.eot_id
    labels = data.task_labels(splits["train"])
    index = {label: i for i, label in enumerate(labels)}
    items = {split: [(tokenizer.encode(e["text"])[:cfg.block_size], index[e["label"]]) for e in examples]
             for split, examples in splits.items()}
    rt.log(f"\nfinetuning on {task} (classification): {len(items['train'])} train / {len(items['val'])} val / "
           f"{len(items['test'])} test examples")
    row = {"metric": "accuracy", "baseline": data.majority_baseline(splits["train"], splits["test"])}
    finetuned = {}
    for init in ("pretrained", "scratch") if cfg.scratch else ("pretrained",):
        name, ckpt_path, start = f"{task}/{init}", out_dir / f"ft_{task}_{init}.pt", time.perf_counter()
        gpt = finetuning_start(base, init, cfg, rt)
        model = GPTClassifier(gpt, len(labels)).to(rt.device)
        if cfg.freeze_layers >= 0:
            embeddings = [gpt.transformer.wte] + ([gpt.transformer.wpe] if gpt.transformer.wpe is not None else [])
            for module in (*embeddings, *gpt.transformer.h[:cfg.freeze_layers]):
                module.requires_grad_(False)
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.ft_lr, (cfg.beta1, cfg.beta2), rt.device_type)
        train_model = rt.wrap(model)
        batches = shuffled_batches(items["train"], cfg, rt)
        progress = Progress(cfg.ft_iters, cfg.ft_batch_size * cfg.block_size, log=rt.log,
                            log_interval=cfg.ft_eval_interval, name=name)
        best, bad_evals = None, 0
        model.train()
        for it in range(cfg.ft_iters):
            batch = classification_batch([items["train"][i] for i in next(batches)], pad_id, rt.device)
            lr = get_lr(it, cfg.ft_lr, cfg.ft_lr / 10, max(1, cfg.ft_iters // 10), cfg.ft_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with rt.autocast():
                _, loss = train_model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      lm_weight=cfg.lm_aux_weight)               # L = L_CE + lambda * L_LM
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.step(it, loss=loss, lr=lr, tokens=batch["attention_mask"].numel() * rt.world_size)

            # once in a while: val accuracy; keep the best weights, stop when they stop improving
            if (it + 1) % cfg.ft_eval_interval == 0 or it == cfg.ft_iters - 1:
                metrics = classification_metrics(model, items["val"], cfg, rt, pad_id, len(labels))
                rt.log(f"{name} eval at iter {it + 1}: val accuracy {metrics['accuracy']:.4f} "
                       f"macro_f1 {metrics['macro_f1']:.4f}")
                if best is None or metrics["accuracy"] > best["accuracy"]:
                    best, bad_evals = metrics, 0
                    if rt.is_main:
                        save_checkpoint(ckpt_path, {"model": model.state_dict(), "iter": it + 1, "val": metrics})
                else:
                    bad_evals += 1
                    if bad_evals >= cfg.patience:
                        rt.log(f"{name}: early stop at iter {it + 1} (no val improvement in {cfg.patience} evals)")
                        break
        rt.barrier()                                      # rank 0 wrote the best weights; every rank loads them
        load_model_state(model, load_checkpoint(ckpt_path, map_location=rt.device)["model"], ckpt_path)
        test = classification_metrics(model, items["test"], cfg, rt, pad_id, len(labels))
        rt.log(f"{name}: test accuracy {test['accuracy']:.4f} macro_f1 {test['macro_f1']:.4f}")
        row[init] = test["accuracy"]
        row[f"{init}_detail"] = {"test": test, "val": best, "seconds": time.perf_counter() - start}
        finetuned[init] = model
    row["seconds"] = sum(row[f"{init}_detail"]["seconds"] for init in finetuned)

    if cfg.quantize and rt.is_main:
        cpu = cpu_float32(rt)
        row["deployment"] = {}
        for variant, (deployed, megabytes) in deployment_variants(finetuned["pretrained"], rt).items():
            test = classification_metrics(deployed, items["test"], cfg, cpu, pad_id, len(labels))
            row["deployment"][variant] = {**test, "megabytes": megabytes,
                                          "generate_tokens_per_second": generation_speed(deployed.gpt, cpu)}
        log_deployment(row["deployment"], rt)
    return row


# ---------------------------------------------------------------------------------- 7. deployment
class Int8Linear(nn.Module):
    """A Linear layer stored as int8 weights with one float scale per output channel:

        W ~= s[:, None] * Q,  Q = round(W / s[:, None]) in [-127, 127],  s = max_j |W_ij| / 127

    A quarter of the float32 size. The weights are dequantised inside the matmul, the scale applied to
    the output: y = x (s Q)^T + b = (x Q^T) * s + b. Per-channel scales keep one outlier row from
    costing every other row its precision.
    """

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0                    # (out,)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)       # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_int8(model):
    """Replace every nn.Linear of `model` (in place) by an Int8Linear; the tied LM head gets its own
    int8 copy of the embedding matrix."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model


def state_dict_bytes(model):
    """Size of the model's state dict as saved to disk (tied weights counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def cpu_float32(rt):
    """The runtime deployment is measured in: the CPU, float32, no autocast. Int8 kernels take float32
    activations only (under --dtype bfloat16, autocast would hand them bfloat16 ones)."""
    return dataclasses.replace(rt, device=torch.device("cpu"), dtype=torch.float32)


def deployment_variants(model, rt):
    """{name: (model, megabytes on disk)}: a CPU float32 copy of the finetuned model, the same with our int8
    weights, and with torch's own dynamic int8 quantization where this torch still has it (its packed
    weights are not in the state dict, so its size is not measured)."""
    base = copy.deepcopy(model).cpu().eval()
    int8 = quantize_int8(copy.deepcopy(base))
    variants = {"float32": (base, state_dict_bytes(base) / 1e6),
                "int8 (ours)": (int8, state_dict_bytes(int8) / 1e6)}
    try:
        from torch.ao.quantization import quantize_dynamic   # deprecated upstream; may be gone in later torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants["int8 (torch quantize_dynamic)"] = (quantize_dynamic(copy.deepcopy(base), {nn.Linear},
                                                                          dtype=torch.qint8), None)
    except Exception as error:  # ImportError, or no quantized engine on this platform
        rt.log(f"  torch.ao quantize_dynamic not available here ({type(error).__name__}); skipped")
    return variants


@torch.no_grad()
def generation_speed(gpt, rt, new_tokens=64):
    """Tokens per second of greedy generation with the KV cache, batch 1 (the best of 3 runs)."""
    idx = torch.zeros((1, 1), dtype=torch.long, device=rt.device)
    new_tokens = min(new_tokens, gpt.config.block_size - 1)
    gpt.generate(idx, 4, temperature=0)                                      # warm up
    best = float("inf")
    for _ in range(3):
        rt.synchronize()
        start = time.perf_counter()
        gpt.generate(idx, new_tokens, temperature=0)
        rt.synchronize()
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def log_deployment(rows, rt):
    for variant, figures in rows.items():
        rt.log(f"  {variant:<30} " + " | ".join(f"{k} {v:.4g}" for k, v in figures.items() if v is not None))


# ------------------------------------------------------------------------------------- the recipe
def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    rt = setup(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, seed=cfg.seed)
    out_dir = Path(cfg.out_dir)
    run_start = time.perf_counter()
    rt.log(f"05_gpt | stage {cfg.stage} | device {rt.device} ({str(rt.dtype).replace('torch.', '')})"
           f"{f' | {rt.world_size} processes' if rt.ddp else ''} | out_dir {out_dir}")
    report = {"chapter": "05_gpt", "device": str(rt.device), "dtype": str(rt.dtype).replace("torch.", ""),
              "world_size": rt.world_size}

    # What can fail fails here, before the slow work: the corpus, the tasks, the folder, the weights.
    pretraining = cfg.stage in ("all", "pretrain", "ablation") and not cfg.init_from
    corpus = data.Corpus(cfg.data, cfg.text_field, log=rt.log, runtime=rt) if pretraining else None
    tasks = load_finetuning_tasks(cfg) if cfg.stage in ("all", "finetune") else {}
    # DPO starts from the chat SFT model: it runs when a chat task does
    preference_pairs = ({split: data.load_preferences(cfg.preferences, split) for split in data.SPLITS}
                        if cfg.dpo and any(kind == "chat" for kind, _ in tasks.values()) else None)
    if preference_pairs and cfg.max_ft_examples:   # capped as the tasks are
        preference_pairs = {split: capped(pairs, cfg.max_ft_examples if split == "train" else
                                          max(16, cfg.max_ft_examples // 4), cfg.seed, "preferences")
                            for split, pairs in preference_pairs.items()}

    # 3. tokenizer and base model -------------------------------------------------------------------
    if cfg.init_from:
        base, tokenizer = load_gpt2_folder(cfg, rt)
        claim_out_dir(out_dir, dataclasses.asdict(cfg), ["init_from"])
        cfg.block_size = min(cfg.block_size, base.config.block_size)
    elif pretraining:
        base = None
        if cfg.stage == "ablation":   # its rows have their own folders; what they share is claimed for them
            claim_out_dir(out_dir / "ablation", dataclasses.asdict(cfg), ABLATION_FIELDS)
        else:
            claim_out_dir(out_dir, dataclasses.asdict(cfg), CLAIMED_FIELDS)
        if cfg.resume and cfg.stage != "ablation":
            stopped, tokenizer = load_stopped_run(cfg, out_dir, corpus)
        else:   # trained once per corpus (its fingerprint), sample size, vocabulary size and specials, then cached
            stopped = None
            tokenizer = BPETokenizer.load_or_train(lambda: corpus.sample_texts(cfg.tokenizer_sample_mb * 1e6),
                                                   cfg.vocab_size, special_tokens=SPECIAL_TOKENS, runtime=rt,
                                                   log=rt.log, key=f"{corpus.fingerprint}-{cfg.tokenizer_sample_mb:g}")
        rt.log(f"tokenizer: {tokenizer.vocab_size}-token BPE of {cfg.data}")
        tokens = data.TokenCache(corpus, tokenizer, runtime=rt, log=rt.log, rebuild=cfg.rebuild_cache)
        rt.log(f"corpus: {cfg.data}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens"
               f" ({'encoded now' if tokens.built else 'cached'})")
    else:
        base, tokenizer, report["pretrain"] = load_pretrained_run(out_dir, rt)
        cfg.block_size = base.config.block_size
    template = chat.chat_template_for(tokenizer)   # ChatML for ours; a loaded folder's own format
    if cfg.stage == "chat":                        # 9. talk to the tuned model, then nothing else
        if not cfg.init_from:
            load_tuned_chat_model(base, out_dir, rt)
        session = chat.ChatSession(base, tokenizer, template, system=cfg.system, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
        with rt.autocast():
            chat.chat_loop(session)
        rt.cleanup()
        return {}
    if cfg.stage in ("all", "sample"):   # a prompt too long for the context fails now, not after training
        prompt_ids(tokenizer, cfg.prompt, cfg.block_size if base is None else base.config.block_size)

    # 4. pretraining (or the ablation: one pretraining per architecture) ----------------------------
    if cfg.stage == "ablation":
        report["ablation"] = ablation(cfg, rt, tokenizer, tokens, corpus, out_dir)
    elif pretraining:
        if stopped is None and rt.is_main:   # a new model: the old report's finetuning rows measured another one
            (out_dir / "report.json").unlink(missing_ok=True)
        base, report["pretrain"] = pretrain(cfg, rt, tokenizer, tokens, out_dir, stopped)
        rt.log(f"pretraining done: best val loss {report['pretrain']['val_loss']:.4f} in "
               f"{format_seconds(report['pretrain']['seconds'])}")

    # 5-7. finetuning and deployment ----------------------------------------------------------------
    if tasks:
        report["finetune"] = {}
        for task, (kind, splits) in tasks.items():
            if kind == "chat":
                row, sft_model = chat_sft(task, splits, base, tokenizer, template, cfg, rt, out_dir)
            else:
                row = classification_finetuning(task, splits, base, tokenizer, cfg, rt, out_dir)
            report["finetune"][task] = row
        if preference_pairs is not None:   # 5b. DPO from the (last) chat SFT model, frozen as the reference
            report["finetune"]["preference"] = preference_tuning(preference_pairs, sft_model, tokenizer, template,
                                                                 cfg, rt, out_dir)

    # 8. samples and report -------------------------------------------------------------------------
    if cfg.stage in ("all", "sample"):
        report["samples"] = sample_text(base, tokenizer, rt, cfg.prompt, cfg.max_new_tokens, cfg.temperature,
                                        cfg.top_k, cfg.top_p, cfg.num_samples, seed=cfg.seed)
        rt.log("\nsamples:")
        for text in report["samples"]:
            rt.log(f"---\n{text}")
    if cfg.stage == "all":
        report["seconds"] = time.perf_counter() - run_start     # the whole recipe; each stage has its own too
    if rt.is_main:   # merged into out_dir/report.json: --stage X replaces its part and keeps the rest
        report = write_report(out_dir / "report.json", report, log=rt.log)
        print_report({k: v for k, v in report.items() if k not in ("samples", "ablation")}, title="05_gpt report",
                     log=rt.log)
        if report.get("ablation"):
            rt.log("ablation (each row adds one change to the row above; all pretrained alike):")
            rt.log(format_table([{"architecture": name, **row} for name, row in report["ablation"].items()],
                                ["architecture", "parameters", "val_loss", "perplexity", "tokens_per_second",
                                 "seconds"]))
        rt.log(f"report written to {out_dir / 'report.json'}")
    rt.cleanup()
    return report


if __name__ == "__main__":
    run_main(main)

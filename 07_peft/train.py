"""Chapter 07: parameter-efficient finetuning, every major method on one base GPT, in one table.

    python 07_peft/train.py                                   # base + 2 tasks x 11 methods (05's base, if finished)
    python 07_peft/train.py --base ''                         # pretrain the base here: ~4 CPU-minutes in all
    python 07_peft/train.py --stage finetune --methods lora8,prefix --tasks python-qa
    python 07_peft/train.py --init_from path/to/SmolLM2-135M --device cuda --preset gpu --methods lora8
    python 07_peft/train.py --device cuda --preset gpu

The recipe, top to bottom:
 1. config and flags          every field of `Config` is a flag; --preset tiny | default | gpu
 2. runtime                   device, bf16 autocast on CUDA, --compile
 3. base model                --base auto (the default): chapter 05's finished run in out/05_gpt, else a
                              short pretraining run on the corpus here (the starting point, not the
                              lesson: tokenizer, L_LM, AdamW + cosine, checkpoints, --resume); or --base /
                              --init_from a chapter-05 style checkpoint or a Hugging Face folder (GPT-2,
                              Llama, Qwen: its tokenizer.json, or GPT-2's vocab.json + merges.txt)
 4. tasks                     python-qa (instruction template, loss on response tokens only) and
                              docstring-module (a classifier head on the mean hidden state)
 5. methods                   full finetuning, LoRA r = 4 / 8 / 16, DoRA, prefix tuning, prompt tuning,
                              bottleneck adapters, (IA)^3, the frozen base with a head only, and full
                              finetuning from random weights (scratch); each from the same base, same
                              batches, same number of steps, early stopping on val
 6. measurements              trainable parameters, test metric, time per step, peak memory, adapter
                              file size (the trainable tensors alone, prefix MLP folded away)
 7. report                    a table, out_dir/report.json, and answers of the LoRA model after merging
"""

import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # so that `common` imports from any working directory

from common import data, load_module  # noqa: E402
from common.checkpoint import (atomic_write_json, claim_out_dir, load_checkpoint, load_model_state,  # noqa: E402
                               save_checkpoint)
from common.config import UserError, parse_config, run_main  # noqa: E402
from common.report import Progress, format_seconds, format_table, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup  # noqa: E402
from common.safetensors import read_config  # noqa: E402
from common.tokenizer import BPETokenizer  # noqa: E402

peft = load_module(HERE / "model.py")
GPT, GPTConfig, SequenceClassifier = peft.GPT, peft.GPTConfig, peft.SequenceClassifier

EOT = "<|endoftext|>"
STAGES = ("all", "pretrain", "finetune")
TASK_KINDS = {"python-qa": "instruction", "docstring-module": "classification"}
GPT2_VOCAB_SIZE = 50257


# ----------------------------------------------------------------------------------------- 1. config
@dataclass
class Config:
    # what to run
    stage: str = "all"               # all | pretrain (the base only) | finetune (every method, on a finished base)
    out_dir: str = "out/07_peft"     # ckpt.pt, tokenizer.json, adapters/, results.json, report.json
    resume: bool = False             # continue a stopped run exactly (ckpt.pt, results.json, finetune.pt)
    base: str = "auto"               # auto (out/05_gpt's finished run, else pretrain) | '' (pretrain) | checkpoint | folder
    init_from: str = ""              # a Hugging Face folder (GPT-2, Llama, Qwen): the same as --base FOLDER (05's flag)
    # data
    data: str = "pydocs"             # corpus: pydocs | shakespeare | wikitext-2 | tinystories | c4[:N] | file | folder
    text_field: str = "text"         # the field of a .jsonl corpus's rows that holds the text
    tokenizer_sample_mb: float = 100  # the BPE is trained on this many MB, spread over the corpus
    rebuild_cache: bool = False      # encode the corpus again (after an edit its fingerprint cannot see)
    vocab_size: int = 1024           # BPE vocabulary size of a base pretrained here
    # base model, pretrained here when neither --base nor --init_from is given
    n_layer: int = 4                 # Transformer blocks
    n_head: int = 4                  # attention heads per block
    n_embd: int = 128                # width d_model
    block_size: int = 96             # context length in tokens (finetuning text + virtual tokens must fit)
    batch_size: int = 16             # pretraining sequences per step
    max_iters: int = 1200            # pretraining steps (at 600 the base did not help classification: 0.33 vs 0.35 scratch)
    lr: float = 3e-3                 # pretraining peak learning rate
    min_lr: float = 3e-4             # floor of the cosine decay
    warmup_iters: int = 30           # linear warmup steps
    weight_decay: float = 0.1        # AdamW decay on matrices, pretraining only
    grad_clip: float = 1.0           # clip the global gradient norm, pretraining and finetuning (0 = off)
    eval_interval: int = 150         # pretraining: evaluate val loss and save ckpt.pt this often
    eval_iters: int = 10             # batches per loss estimate
    log_interval: int = 50           # print a progress line this often
    # finetuning: one budget for every method
    tasks: str = "python-qa,docstring-module"  # tasks, comma-separated
    methods: str = "full,lora4,lora8,lora16,dora8,prefix,prompt,adapter,ia3,head,scratch"  # to compare (loraR: rank R)
    num_labels: int = 10             # docstring-module: the most frequent modules
    pooling: str = "mean"            # classifier input: mean (of the hidden states) | last (token's state)
    ft_iters: int = 60               # finetuning steps per method (the same for all)
    ft_batch_size: int = 16          # finetuning batch size
    ft_max_len: int = 80             # finetuning examples are cut to this many tokens
    ft_eval_interval: int = 20       # evaluate on val this often; keep the best trainable weights
    patience: int = 2                # stop after this many evaluations without improvement
    max_ft_examples: int = 0         # cap train examples per task (0 = all)
    max_eval_examples: int = 0       # cap val and test examples per task (0 = all)
    # each method's learning rate: methods with fewer, more leveraged parameters want larger ones
    ft_lr: float = 1e-3              # full finetuning, from the base and from scratch (PEFT: ft_lr_<method>)
    ft_lr_lora: float = 3e-3         # LoRA and DoRA
    ft_lr_prefix: float = 3e-3       # prefix tuning (through the MLP)
    ft_lr_prompt: float = 3e-2       # prompt tuning
    ft_lr_adapter: float = 1e-2      # bottleneck adapters
    ft_lr_ia3: float = 1e-1          # (IA)^3
    ft_lr_head: float = 3e-2         # the classifier's head (in every method), and the head-only row
    # each method's shape
    lora_alpha: float = 16.0         # LoRA scale alpha / r, alpha fixed across ranks (as the paper)
    lora_dropout: float = 0.0        # dropout on the LoRA path (costs a copy of each input: memory)
    lora_targets: str = "all"        # q,k,v,o,gate,up,down (Llama's names; GPT-2 has no gate) | attn | mlp | all
    prefix_tokens: int = 16          # prefix length P
    prefix_hidden: int = 256         # width of the reparameterisation MLP (0 = train P directly)
    prompt_tokens: int = 16          # soft tokens
    prompt_init: str = "vocab"       # vocab (embeddings of random tokens) | random
    adapter_size: int = 16           # bottleneck width m
    # runtime
    device: str = "auto"             # auto | cpu | cuda | mps
    dtype: str = "auto"              # auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False            # torch.compile the models
    seed: int = 1337                 # same seed, same device -> same result
    threads: int = 0                 # CPU threads for torch (0 = one per core; 1 is far faster on a busy machine)


PRESETS = {
    # tiny and gpu pretrain their own base (of their own shape), whatever out/05_gpt holds
    "tiny": dict(base="", vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=48, batch_size=4, max_iters=16,
                 warmup_iters=2, eval_interval=8, eval_iters=2, log_interval=4, ft_iters=6, ft_batch_size=4,
                 ft_max_len=32, ft_eval_interval=3, max_ft_examples=48, max_eval_examples=16,
                 prefix_tokens=4, prefix_hidden=16, prompt_tokens=4, adapter_size=4),
    "default": {},   # the config as written: the whole table in about 4 CPU-minutes (one thread, base pretrained here)
    "gpu": dict(base="", vocab_size=8192, n_layer=8, n_head=8, n_embd=512, block_size=256, batch_size=32, max_iters=3000,
                lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=500, eval_iters=40, log_interval=100,
                ft_iters=600, ft_batch_size=32, ft_max_len=224, ft_eval_interval=100, patience=3,
                ft_lr=1e-4, ft_lr_lora=1e-3, ft_lr_prefix=1e-3, ft_lr_prompt=3e-2, ft_lr_adapter=1e-3,
                ft_lr_ia3=1e-2, ft_lr_head=1e-3, prefix_tokens=32, prompt_tokens=32, prefix_hidden=512,
                adapter_size=64),
}

# What decides the checkpoints of a base pretrained in out_dir (claim_out_dir refuses a run with others).
PRETRAINING_FIELDS = ("base", "data", "text_field", "vocab_size", "n_layer", "n_head", "n_embd", "block_size")
# What decides a finished row of the table, with the base itself (results.json: --resume reuses a row
# only under the same values).
FINETUNING_FIELDS = ("num_labels", "pooling", "ft_iters", "ft_batch_size", "ft_max_len", "ft_eval_interval",
                     "patience", "max_ft_examples", "max_eval_examples", "ft_lr", "ft_lr_lora", "ft_lr_prefix",
                     "ft_lr_prompt", "ft_lr_adapter", "ft_lr_ia3", "ft_lr_head", "lora_alpha", "lora_dropout",
                     "lora_targets", "prefix_tokens", "prefix_hidden", "prompt_tokens", "prompt_init",
                     "adapter_size", "grad_clip", "seed", "dtype")


# Where chapter 05's train.py leaves its finished model by default: --base auto starts from it.
CHAPTER_05_CKPT = Path("out/05_gpt/ckpt.pt")


def parse_methods(text):
    """"full,lora8,dora8,prefix" -> [(key, method, options)], e.g. ("lora8", "lora", {"r": 8})."""
    methods = []
    for key in [m.strip() for m in text.split(",") if m.strip()]:
        head, digits = key.rstrip("0123456789"), key[len(key.rstrip("0123456789")):]
        if head in ("lora", "dora") and digits and int(digits) > 0:
            methods.append((key, head, {"r": int(digits)}))
        elif key in ("full", "prefix", "prompt", "adapter", "ia3", "head", "scratch"):
            methods.append((key, key, {}))
        else:
            raise UserError(f"unknown method {key!r} (valid: full, lora<r>, dora<r>, prefix, prompt, adapter, ia3, "
                            f"head, scratch)")
    if not methods:
        raise UserError("--methods is empty")
    return methods


def pretrains_here(cfg):
    """Whether this run pretrains the base itself (and so reads --data and uses the model-shape flags)."""
    return not (cfg.base or cfg.init_from) and cfg.stage != "finetune"


def check_context(cfg, block_size):
    """A finetuning example plus the longest prefix or soft prompt among --methods must fit the context."""
    methods = {method for _, method, _ in parse_methods(cfg.methods)}
    virtual = max([cfg.prefix_tokens] * ("prefix" in methods) + [cfg.prompt_tokens] * ("prompt" in methods) + [0])
    if cfg.ft_max_len + virtual > block_size:
        raise UserError(f"--ft_max_len {cfg.ft_max_len} + {virtual} prefix/prompt tokens exceed the base's "
                        f"block_size {block_size}: lower --ft_max_len")


def check_config(cfg):
    """Every bad value is one clear line (UserError) here, before anything slow runs (`cfg.base` is no
    longer "auto": `resolve_base` made it a path or "")."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    if cfg.base and cfg.init_from:
        raise UserError("give --base or --init_from, not both")
    for flag, path in (("--base", cfg.base), ("--init_from", cfg.init_from)):
        if path and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file or folder")
        if path and cfg.stage == "pretrain":
            raise UserError(f"--stage pretrain trains a new base, which would ignore {flag} {path}: "
                            f"drop one of the two")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval",
                 "eval_iters", "log_interval", "ft_iters", "ft_batch_size", "ft_max_len", "ft_eval_interval",
                 "patience", "prefix_tokens", "prompt_tokens", "adapter_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "max_ft_examples", "max_eval_examples", "prefix_hidden", "threads", "min_lr",
                 "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    for name in ("lr", "ft_lr", "ft_lr_lora", "ft_lr_prefix", "ft_lr_prompt", "ft_lr_adapter", "ft_lr_ia3",
                 "ft_lr_head", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.num_labels < 2:
        raise UserError(f"--num_labels must be at least 2, got {cfg.num_labels}")
    if cfg.vocab_size < 257 and not (cfg.base or cfg.init_from):
        raise UserError(f"--vocab_size must be at least 257 (256 bytes + {EOT}), got {cfg.vocab_size}")
    if not cfg.tokenizer_sample_mb > 0:
        raise UserError(f"--tokenizer_sample_mb must be positive, got {cfg.tokenizer_sample_mb}")
    tasks = [t for t in cfg.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASK_KINDS]
    if unknown or not tasks:
        problem = f"unknown task {unknown[0]!r}" if unknown else "--tasks is empty"
        raise UserError(f"{problem} (valid: {', '.join(TASK_KINDS)})")
    if cfg.pooling not in ("mean", "last"):
        raise UserError(f"unknown --pooling {cfg.pooling!r} (valid: mean, last)")
    if cfg.prompt_init not in ("vocab", "random"):
        raise UserError(f"unknown --prompt_init {cfg.prompt_init!r} (valid: vocab, random)")
    methods = {method for _, method, _ in parse_methods(cfg.methods)}
    try:
        peft.parse_lora_targets(cfg.lora_targets)
        if methods & {"lora", "dora"} and not (cfg.base or cfg.init_from) and cfg.stage != "pretrain":
            # a base pretrained here is a GPT-2, whose GELU MLP has no gate; a loaded one is checked once loaded
            peft.lora_targets(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=8)), cfg.lora_targets)
    except ValueError as error:
        raise UserError(f"--lora_targets: {error}") from None
    if pretrains_here(cfg):
        check_context(cfg, cfg.block_size)          # a base from a file is checked once it is loaded
        if cfg.data != "pydocs" and data.corpus_urls(cfg.data) is None:
            data.Corpus(cfg.data, cfg.text_field)   # a missing, empty or binary file: one line, now


# -------------------------------------------------------------------------------------- 3. base model
def get_lr(it, peak, floor, warmup, total):  # same as 05_gpt/train.py
    """Linear warmup to `peak`, then cosine decay to `floor` at `total`."""
    if it < warmup:
        return peak * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


@torch.no_grad()
def estimate_loss(model, tokens, cfg, rt, split):  # same as 05_gpt/train.py
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


def pretrain(cfg, rt, tokenizer, corpus, out_dir, ckpt=None):
    """A short pretraining run on `corpus` (a data.Corpus): the base every method starts from, saved as
    out_dir/ckpt.pt in chapter 05's checkpoint format (so --base out/07_peft/ckpt.pt reuses it from another
    folder). `ckpt`: a stopped run's checkpoint to continue (--resume) exactly where it stopped.
    Returns (model, pretraining report)."""
    tokens = data.TokenCache(corpus, tokenizer, runtime=rt, log=rt.log, rebuild=cfg.rebuild_cache)
    rt.log(f"corpus: {cfg.data}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens"
           f" ({'encoded now' if tokens.built else 'cached'})")
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd)
    model = GPT(model_config).to(rt.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (0.9, 0.95), rt.device_type)
    # The generator's state is checkpointed, so --resume draws the very batches the stopped run would
    # have drawn next.
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    start_iter, best_val, history, seconds_before = 0, float("inf"), [], 0.0
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt is not None:
        if ckpt.get("model_config") != dataclasses.asdict(model_config):
            raise UserError(f"{ckpt_path} was saved for another model config ({ckpt.get('model_config')}); "
                            f"use the same flags, or another --out_dir")
        load_model_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            rt.scaler.load_state_dict(ckpt["scaler"])
        batch_generator.set_state(ckpt["batch_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_iter, best_val, history = ckpt["iter"], ckpt["best_val_loss"], ckpt["history"]
        seconds_before = ckpt["seconds"]                 # time spent before the stop counts too
        rt.log(f"resumed pretraining from {ckpt_path} at iter {start_iter}")
    rt.log(f"base model: {model.num_parameters() / 1e6:.2f}M parameters ({cfg.n_layer} layers, {cfg.n_head} heads, "
           f"{cfg.n_embd} wide, context {cfg.block_size}), {cfg.max_iters} pretraining steps")
    train_model = rt.maybe_compile(model)
    progress = Progress(cfg.max_iters, cfg.batch_size * cfg.block_size, log=rt.log, log_interval=cfg.log_interval,
                        flops_per_token=model.num_flops_per_token(), device=rt.device, dtype=rt.dtype,
                        start_iter=start_iter)

    def pretrain_report():
        return {"val_loss": best_val if best_val < float("inf") else None,
                "perplexity": math.exp(best_val) if best_val < 50 else None,
                "tokens_per_second": progress.average_tokens_per_second,
                "seconds": seconds_before + progress.seconds, "iters": cfg.max_iters,
                "parameters": model.num_parameters(), "history": history}

    def save(it):
        tokenizer.save(out_dir / "tokenizer.json")      # beside the checkpoint it belongs to, every time
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict(),
            "model_config": dataclasses.asdict(model_config), "config": dataclasses.asdict(cfg),
            "iter": it, "best_val_loss": best_val, "history": history,
            "batch_generator": batch_generator.get_state(), "torch_rng": torch.get_rng_state(),
            "tokenizer": {"path": "tokenizer.json", "fingerprint": tokenizer.fingerprint},
            "report": pretrain_report(), "seconds": seconds_before + progress.seconds})

    model.train()
    with StopFlag() as stop:
        for it in range(start_iter, cfg.max_iters):
            lr = get_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = tokens.get_batch("train", cfg.batch_size, cfg.block_size, rt.device, batch_generator)
            with rt.autocast():
                _, loss = train_model(x, y)
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.step(it, loss=loss, lr=lr)
            if (it + 1) % cfg.eval_interval == 0 or it == cfg.max_iters - 1:
                train_loss = estimate_loss(model, tokens, cfg, rt, "train")
                val_loss = estimate_loss(model, tokens, cfg, rt, "val")
                best_val = min(best_val, val_loss)
                history.append({"iter": it + 1, "train_loss": train_loss, "val_loss": val_loss})
                rt.log(f"eval iter {it + 1}: train loss {train_loss:.4f} | val loss {val_loss:.4f}")
                save(it + 1)
            if stop.requested:                  # one process only (07 refuses torchrun): no ranks to agree
                save(it + 1)
                rt.log(f"interrupted: saved {ckpt_path} at iter {it + 1}; continue with --resume")
                sys.exit(130)
    return model, pretrain_report()


def load_run_tokenizer(ckpt_path, ckpt):
    """The tokenizer a checkpoint was trained with: the tokenizer.json beside it, checked against the
    fingerprint the checkpoint recorded."""
    path = ckpt_path.parent / ckpt.get("tokenizer", {}).get("path", "tokenizer.json")
    try:
        tokenizer = BPETokenizer.load(path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the tokenizer of {ckpt_path}: {error}") from None
    if ckpt.get("tokenizer", {}).get("fingerprint") != tokenizer.fingerprint:
        raise UserError(f"{path} is not the tokenizer {ckpt_path} was trained with (another fingerprint); "
                        f"put the run's own tokenizer.json back, or pretrain again")
    return tokenizer


def load_base_checkpoint(ckpt_path, ckpt, rt):
    """The GPT a chapter-05 style checkpoint holds, and its tokenizer."""
    if "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{ckpt_path} is not a GPT checkpoint (no 'model' / 'model_config')")
    tokenizer = load_run_tokenizer(ckpt_path, ckpt)
    if tokenizer.eot_id is None:
        raise UserError(f"the tokenizer of {ckpt_path} has no end-of-text token ({EOT} or <|end_of_text|>), "
                        f"which the finetuning tasks end with")
    try:
        base = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": 0.0}))
    except (TypeError, ValueError) as error:
        raise UserError(f"{ckpt_path}: bad model_config ({error})") from None
    load_model_state(base, ckpt["model"], ckpt_path)
    rt.log(f"loaded {ckpt_path}: {base.num_parameters() / 1e6:.2f}M parameters, {tokenizer.vocab_size}-token vocabulary")
    return base.to(rt.device), tokenizer


def hf_tokenizer(folder, hf, flag):
    """The vocabulary of a Hugging Face folder: its tokenizer.json (GPT-2, Llama 3, Qwen, SmolLM), or GPT-2's
    older vocab.json + merges.txt, or, for a GPT-2 folder with neither, GPT-2's own from tiktoken."""
    try:
        if (folder / "tokenizer.json").is_file():
            return BPETokenizer.from_hf(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return BPETokenizer.from_hf(folder / "vocab.json", folder / "merges.txt")
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {folder}: {error}") from None
    vocab_size = hf.get("vocab_size")
    if hf.get("model_type", "gpt2") == "gpt2" and vocab_size == GPT2_VOCAB_SIZE:
        try:
            return BPETokenizer.from_tiktoken("gpt2")       # downloaded once by tiktoken
        except (RuntimeError, ValueError):
            raise UserError(f"{flag} {folder} has no tokenizer.json (nor vocab.json + merges.txt), and GPT-2's "
                            f"vocabulary could not be fetched (offline?): copy its tokenizer files into {folder}") from None
    raise UserError(f"{flag} {folder} has no tokenizer.json (nor vocab.json + merges.txt), and its {vocab_size}-token "
                    f"vocabulary is not GPT-2's: put its tokenizer files beside config.json")


def load_hf_base(folder, flag, rt):
    """A Hugging Face folder of GPT-2, Llama (SmolLM2, TinyLlama, Llama 3) or Qwen2/3, whatever chapter 05's
    from_pretrained reads: first its config and tokenizer (cheap, and where most mistakes show), then
    its weights, in float32."""
    try:
        hf = read_config(folder)
    except ValueError as error:
        raise UserError(f"{flag} {folder}: {error}") from None
    tokenizer = hf_tokenizer(folder, hf, flag)
    if tokenizer.eot_id is None:
        raise UserError(f"{flag} {folder}: its tokenizer has no end-of-text token ({EOT} or <|end_of_text|>), "
                        f"which the finetuning examples end with")
    if tokenizer.vocab_size > (hf.get("vocab_size") or 0):
        raise UserError(f"{flag} {folder}: its tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                        f"{hf.get('vocab_size')}")
    try:
        base = GPT.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as error:
        raise UserError(f"{flag} {folder}: {error}") from None
    rt.log(f"loaded {folder}: Hugging Face {hf.get('model_type', 'gpt2')}, {base.num_parameters() / 1e6:.2f}M "
           f"parameters, {tokenizer.vocab_size}-token vocabulary, end of text {tokenizer.id_to_token(tokenizer.eot_id)!r} "
           f"(id {tokenizer.eot_id})")
    return base.to(rt.device), tokenizer


def load_base(path, flag, rt):
    """--base PATH and --init_from PATH, one function for both: a Hugging Face folder (it has config.json),
    a run folder (its ckpt.pt, chapter 05's or this chapter's) or a checkpoint file of that format.
    Returns (base GPT, tokenizer, the pretraining report or None, the file or folder it came from)."""
    if path.is_dir() and not (path / "config.json").exists() and (path / "ckpt.pt").exists():
        path = path / "ckpt.pt"
    if path.is_dir():
        base, tokenizer = load_hf_base(path, flag, rt)
        return base, tokenizer, None, path
    ckpt = load_checkpoint(path)
    base, tokenizer = load_base_checkpoint(path, ckpt, rt)
    return base, tokenizer, ckpt.get("report"), path


def finished_run_problem(ckpt_path):
    """None when `ckpt_path` holds a finished pretraining run (its iter reached its config's max_iters)
    with its own tokenizer beside it: a base --base auto may start from. Otherwise why not, in a few words."""
    if not ckpt_path.is_file():
        return f"no {ckpt_path}"
    try:
        ckpt = load_checkpoint(ckpt_path)
        planned = ckpt.get("config", {}).get("max_iters")
        if "model" not in ckpt or not isinstance(planned, int):
            return f"{ckpt_path} is not a chapter-05 checkpoint"
        if ckpt.get("iter", 0) < planned:
            return f"{ckpt_path} is a stopped run (iter {ckpt.get('iter')} of {planned})"
        if load_run_tokenizer(ckpt_path, ckpt).eot_id is None:
            return f"the tokenizer of {ckpt_path} has no end-of-text token"
    except UserError as error:
        return str(error)
    return None


def resolve_base(cfg):
    """--base auto made concrete: (the config with `base` a path or "", the line that says so, or None).

    auto means chapter 05's model, out/05_gpt/ckpt.pt, when that holds a finished run, and a base pretrained
    here otherwise; but where this out_dir's own pretrained base is being continued (--stage finetune,
    --resume, with out_dir/ckpt.pt there) it is that one, and where none is wanted (--init_from, --stage
    pretrain) it is "". A run on 05's base claims out_dir for that base (run.json), so its rows are never
    mixed with those of a base pretrained here.
    """
    if cfg.base != "auto":
        return cfg, None
    if cfg.init_from or cfg.stage == "pretrain":
        return dataclasses.replace(cfg, base=""), None
    own = Path(cfg.out_dir) / "ckpt.pt"
    if (cfg.stage == "finetune" or cfg.resume) and own.exists():
        return dataclasses.replace(cfg, base=""), (f"base model: {own}, pretrained here (--base auto continues "
                                                   f"out_dir's own base under --stage finetune and --resume)")
    problem = finished_run_problem(CHAPTER_05_CKPT)
    if problem is None:
        return dataclasses.replace(cfg, base=str(CHAPTER_05_CKPT)), (
            f"base model: {CHAPTER_05_CKPT} (chapter 05's pretrained GPT, by --base auto; --base '' pretrains "
            f"one here instead)")
    if cfg.stage == "finetune":
        return dataclasses.replace(cfg, base=""), None     # nothing to finetune: get_base says so, in one line
    return dataclasses.replace(cfg, base=""), (f"base model: pretrained here (--base auto: {problem}; a finished "
                                               f"run of 05_gpt/train.py there would be used instead)")


def get_base(cfg, rt, out_dir, by_auto=False):
    """(base GPT, tokenizer, {"source", "pretrain"}): --base or --init_from a checkpoint or a Hugging Face
    folder, --stage finetune the finished run in out_dir, --resume a stopped (or finished) one, else
    pretraining here. Each claims out_dir (claim_out_dir) before writing into it. `by_auto`: --base auto
    chose cfg.base (a refusal of out_dir then says how to choose otherwise)."""
    if cfg.init_from or cfg.base:
        given = cfg.init_from or cfg.base
        base, tokenizer, pretrain_report, source = load_base(Path(given), "--init_from" if cfg.init_from else "--base", rt)
        if source.resolve() != (out_dir / "ckpt.pt").resolve():     # not the folder's own base
            try:
                claim_out_dir(out_dir, {"base": str(source.resolve())}, ["base"])
            except UserError as error:
                if not by_auto:
                    raise
                raise UserError(f"{error} (--base auto chose chapter 05's model: --base '' pretrains one here "
                                f"instead)") from None
        info = {"source": given if source.is_dir() else str(source)}
        return base, tokenizer, {**info, "pretrain": pretrain_report} if pretrain_report else info
    ckpt_path = out_dir / "ckpt.pt"
    claimed = {**dataclasses.asdict(cfg), "base": "pretrained here"}
    if cfg.stage == "finetune" or (cfg.resume and ckpt_path.exists()):
        if not ckpt_path.exists():
            raise UserError(f"--stage finetune needs a pretrained base, and {ckpt_path} does not exist: run "
                            f"--stage pretrain first, or give --base or --init_from")
        ckpt = load_checkpoint(ckpt_path)
        if cfg.stage != "finetune":
            claim_out_dir(out_dir, claimed, PRETRAINING_FIELDS)      # --resume: the same run, or a refusal
        target = ckpt.get("config", {}).get("max_iters", 0) if cfg.stage == "finetune" else cfg.max_iters
        if ckpt.get("iter", 0) >= target:                             # a finished base: use it as it is
            base, tokenizer = load_base_checkpoint(ckpt_path, ckpt, rt)
            return base, tokenizer, {"source": "pretrained here", "pretrain": ckpt.get("report")}
        if cfg.stage == "finetune":
            raise UserError(f"{ckpt_path} is a stopped pretraining run (iter {ckpt.get('iter')} of {target}): "
                            f"finish it with --resume first")
        tokenizer = load_run_tokenizer(ckpt_path, ckpt)
        base, summary = pretrain(cfg, rt, tokenizer, data.Corpus(cfg.data, cfg.text_field, log=rt.log, runtime=rt), out_dir, ckpt)
        return base, tokenizer, {"source": "pretrained here", "pretrain": summary}
    claim_out_dir(out_dir, claimed, PRETRAINING_FIELDS)
    for spent in (out_dir / "results.json", out_dir / "finetune.pt"):   # rows of the base this run replaces
        spent.unlink(missing_ok=True)
    rt.log(f"tokenizer: {cfg.vocab_size}-token BPE on {cfg.data} (trained once per corpus, then cached)")
    corpus = data.Corpus(cfg.data, cfg.text_field, log=rt.log, runtime=rt)
    tokenizer = BPETokenizer.load_or_train(lambda: corpus.sample_texts(cfg.tokenizer_sample_mb * 1e6), cfg.vocab_size,
                                           special_tokens=(EOT,), runtime=rt, log=rt.log,
                                           key=f"{corpus.fingerprint}-{cfg.tokenizer_sample_mb:g}")
    base, summary = pretrain(cfg, rt, tokenizer, corpus, out_dir)
    return base, tokenizer, {"source": "pretrained here", "pretrain": summary}


def state_fingerprint(state):
    """A short digest of a state dict's names and bytes: the same base model, the same fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- 4. tasks
# The Alpaca-style template 05_gpt used before it moved to chat templates (05_gpt/chat.py); kept here, where
# single-turn instructions are enough to compare the PEFT methods.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def format_prompt(example):
    """The instruction template (Alpaca style): the model learns to answer after "### Response:"."""
    input_block = f"### Input:\n{example['input']}\n\n" if example.get("input") else ""
    return PROMPT_TEMPLATE.format(instruction=example["instruction"], input_block=input_block)


def instruction_example(tokenizer, example, block_size):
    """(input ids, label ids): labels are -100 on the prompt, so only the response (+ EOT) is learned.

    Loss masking: L = -sum over response positions t of log p(x_t | x_<t); the prompt is context only.
    """
    prompt = tokenizer.encode(format_prompt(example))
    response = tokenizer.encode(example["response"]) + [tokenizer.eot_id]
    prompt = prompt[-(block_size // 2):]                 # a very long prompt keeps its end
    sequence = (prompt + response)[:block_size + 1]
    labels = ([-100] * len(prompt) + response)[:block_size + 1]
    return sequence[:-1], labels[1:]                       # labels[t] is the token after sequence[t]


def load_tasks(cfg, tokenizer):
    """{task: {"kind", "labels", "examples": {split: raw}, "items": {split: [(ids, target)]}}}."""
    tasks = {}
    for name in [t for t in cfg.tasks.split(",") if t]:
        kind = TASK_KINDS[name]
        splits = {split: data.load_task(name, split, num_labels=cfg.num_labels) for split in data.SPLITS}
        rng = random.Random(cfg.seed)                    # the task files are sorted by name: sample, don't cut
        caps = {"train": cfg.max_ft_examples, "val": cfg.max_eval_examples, "test": cfg.max_eval_examples}
        for split, cap in caps.items():
            if cap and len(splits[split]) > cap:
                splits[split] = rng.sample(splits[split], cap)
        labels = data.task_labels(splits["train"]) if kind == "classification" else None
        if kind == "instruction":
            items = {s: [instruction_example(tokenizer, e, cfg.ft_max_len) for e in ex] for s, ex in splits.items()}
        else:
            index = {label: i for i, label in enumerate(labels)}
            items = {s: [(tokenizer.encode(e["text"])[:cfg.ft_max_len], index[e["label"]])
                         for e in ex if e["label"] in index] for s, ex in splits.items()}
        tasks[name] = {"kind": kind, "labels": labels, "examples": splits, "items": items}
    return tasks


def collate(kind, items, pad_id, device):
    if kind == "instruction":
        batch = data.pad_batch([ids for ids, _ in items], pad_id, labels=[lab for _, lab in items])
    else:
        batch = data.pad_batch([ids for ids, _ in items], pad_id)
        batch["labels"] = torch.tensor([label for _, label in items])
    return {k: v.to(device) for k, v in batch.items()}


def model_loss(kind, model, batch):
    """The training loss: response-token cross-entropy, or the classifier's cross-entropy."""
    if kind == "instruction":
        return model(batch["input_ids"], batch["labels"])[1]
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"])[1]


def accuracy_and_macro_f1(predictions, targets, num_classes):  # same as 05_gpt/train.py
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
def evaluate(kind, model, items, cfg, rt, pad_id, num_labels=None):
    """Instruction: mean response-token loss (lower is better). Classification: accuracy and macro-F1."""
    model.eval()
    total_loss, total_tokens, predictions = 0.0, 0, []
    lengths = [len(ids) for ids, _ in items]
    for indices in data.batch_indices(lengths, cfg.ft_batch_size * 2, shuffle=False, bucket=True):
        batch = collate(kind, [items[i] for i in indices], pad_id, rt.device)
        with rt.autocast():
            if kind == "instruction":
                logits, _ = model(batch["input_ids"])
                n = (batch["labels"] != -100).sum().item()
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1),
                                       ignore_index=-100, reduction="sum")
                total_loss, total_tokens = total_loss + loss.item(), total_tokens + n
            else:
                logits, _ = model(batch["input_ids"], batch["attention_mask"])
                predictions += [(i, p) for i, p in zip(indices, logits.argmax(-1).tolist())]
    model.train()
    if kind == "instruction":
        return {"response_loss": total_loss / max(1, total_tokens)}
    predicted = [p for _, p in sorted(predictions)]
    accuracy, macro_f1 = accuracy_and_macro_f1(predicted, [label for _, label in items], num_labels)
    return {"accuracy": accuracy, "macro_f1": macro_f1}


# -------------------------------------------------------------------------------------- 5. methods
METHOD_NAMES = {"full": "full finetuning", "prefix": "prefix tuning", "prompt": "prompt tuning",
                "adapter": "adapters (Houlsby)", "ia3": "(IA)^3", "head": "frozen base + head",
                "scratch": "full, from scratch"}


def method_name(kind, method, options):
    if method in ("lora", "dora"):
        return f"{'LoRA' if method == 'lora' else 'DoRA'} r={options['r']}"
    if method == "head" and kind == "instruction":
        return "frozen base (no training)"
    return METHOD_NAMES[method]


def build_model(kind, base_state, base_config, method, options, cfg, num_labels):
    """A fresh copy of the base with `method` applied (and a head for classification); returns
    (model to train, the method's module, options as applied, learning rate). "scratch" is full
    finetuning of the same architecture from random weights: what the pretraining is worth."""
    gpt = GPT(base_config)                   # random weights (the same draw for every method: seeded)
    if method != "scratch":
        gpt.load_state_dict(base_state)
    lr = {"full": cfg.ft_lr, "scratch": cfg.ft_lr, "lora": cfg.ft_lr_lora, "dora": cfg.ft_lr_lora,
          "prefix": cfg.ft_lr_prefix, "prompt": cfg.ft_lr_prompt, "adapter": cfg.ft_lr_adapter,
          "ia3": cfg.ft_lr_ia3, "head": cfg.ft_lr_head}[method]
    options = dict(options)
    if method in ("lora", "dora"):
        options.update(alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    elif method == "prefix":
        options.update(num_tokens=cfg.prefix_tokens, hidden=cfg.prefix_hidden)
    elif method == "prompt":
        options.update(num_tokens=cfg.prompt_tokens, init=cfg.prompt_init, seed=cfg.seed)
    elif method == "adapter":
        options.update(bottleneck=cfg.adapter_size)
    backbone = peft.apply_method(gpt, "full" if method == "scratch" else method, **options)
    model = backbone if kind == "instruction" else SequenceClassifier(backbone, num_labels, cfg.pooling)
    return model, backbone, options, lr


def activation_bytes(model, loss_fn):
    """Bytes of the tensors autograd keeps for backward during loss_fn() (weights left out: they are
    counted as parameters), via saved_tensors_hooks; each storage counted once."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        # detached: a saved output kept with its grad_fn would form a cycle through C++ that no gc.collect()
        # frees when backward never runs, as here (pytorch#189025): every method's graph stayed alive
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in weights), loss


def training_memory_mb(kind, model, probe, rt):
    """Peak memory of a training step on CPU, which has no allocator statistics, in MB: weights +
    gradients + AdamW's two moments (for the trainable parameters only) + the activations saved for
    backward, measured on `probe` (the longest training examples). On CUDA the allocator's own peak
    over the finetuning run is reported instead."""
    params = list(model.parameters())
    with rt.autocast():
        saved, loss = activation_bytes(model, lambda: model_loss(kind, model, probe))
    del loss
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return (weight_bytes + 3 * trainable_bytes + saved) / 1e6          # gradients + 2 moments = 3x trainable


def finetune(kind, model, lr, items, cfg, rt, pad_id, name, num_labels, partial_path, identity):
    """ft_iters AdamW steps on the trainable parameters (warmup + cosine), evaluating on val every
    ft_eval_interval steps; the best trainable weights are kept in memory (they are small) and loaded
    back at the end; `patience` evaluations without improvement stop early.

    Ctrl-C finishes the step and saves everything the rest of the run depends on to `partial_path`
    (trainable weights, AdamW, the remaining batch order, the best weights so far, the RNG); --resume
    continues from there when the file's `identity` (task, method, settings, base) is this run's.
    Returns {"val": best val metrics, "seconds_per_step": median, "steps": steps done, "seconds"}."""
    metric = "response_loss" if kind == "instruction" else "accuracy"
    better = (lambda a, b: a < b) if kind == "instruction" else (lambda a, b: a > b)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # A classifier's new head learns at ft_lr_head whatever the method (it starts from scratch in every
    # row); the method's own parameters at the method's rate. No weight decay: short runs.
    head = {id(p) for p in model.head.parameters()} if kind == "classification" else set()
    groups = [{"params": [p for p in trainable if id(p) not in head], "peak_lr": lr},
              {"params": [p for p in trainable if id(p) in head], "peak_lr": cfg.ft_lr_head}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    train_model = rt.maybe_compile(model)
    warmup = max(1, cfg.ft_iters // 10)
    lengths = [len(ids) for ids, _ in items["train"]]
    start_iter, epoch, order = 0, 0, []
    best, best_metrics, best_state, bad_evals = None, None, None, 0
    step_seconds, seconds_before = [], 0.0
    if cfg.resume and partial_path.exists():
        saved = load_checkpoint(partial_path)
        if saved.get("identity") == identity:
            try:
                peft.load_trainable_state_dict(model, saved["trainable"])
            except ValueError as error:                   # e.g. written before a method's parameters were renamed
                raise UserError(f"{partial_path}: {error}; delete it to start this method afresh") from None
            optimizer.load_state_dict(saved["optimizer"])
            if saved.get("scaler"):
                rt.scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["torch_rng"])
            start_iter, epoch, order = saved["iter"], saved["epoch"], saved["order"]
            best, best_metrics, best_state = saved["best"], saved["best_metrics"], saved["best_state"]
            bad_evals, step_seconds, seconds_before = saved["bad_evals"], saved["step_seconds"], saved["seconds"]
            rt.log(f"  {name}: resumed from {partial_path} at step {start_iter}")
    progress = Progress(cfg.ft_iters, cfg.ft_batch_size * cfg.ft_max_len, log=rt.log,
                        log_interval=cfg.ft_eval_interval, start_iter=start_iter, name=f"  {name}")

    def save(it):
        save_checkpoint(partial_path, {
            "identity": identity, "trainable": peft.trainable_state_dict(model),
            "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
            "iter": it, "epoch": epoch, "order": order, "best": best, "best_metrics": best_metrics,
            "best_state": best_state, "bad_evals": bad_evals, "step_seconds": step_seconds,
            "seconds": seconds_before + progress.seconds})

    model.train()
    with StopFlag() as stop:
        for it in range(start_iter, cfg.ft_iters):
            if bad_evals >= cfg.patience:
                rt.log(f"  {name}: early stop at step {it}")
                break
            if not order:   # a new epoch: length-bucketed batches, the same order for every method
                order = data.batch_indices(lengths, cfg.ft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True)
                epoch += 1
            batch = collate(kind, [items["train"][i] for i in order.pop()], pad_id, rt.device)
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it, group["peak_lr"], group["peak_lr"] / 10, warmup, cfg.ft_iters)
            lr_now = optimizer.param_groups[0]["lr"]
            rt.synchronize()
            start = time.perf_counter()
            with rt.autocast():
                loss = model_loss(kind, train_model, batch)
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            rt.synchronize()
            step_seconds.append(time.perf_counter() - start)
            progress.step(it, loss=loss, lr=lr_now, tokens=batch["attention_mask"].numel())
            if (it + 1) % cfg.ft_eval_interval == 0 or it == cfg.ft_iters - 1:
                metrics = evaluate(kind, model, items["val"], cfg, rt, pad_id, num_labels)
                improved = best is None or better(metrics[metric], best)
                rt.log(f"  {name} eval at step {it + 1}: val {metric} {metrics[metric]:.4f}"
                       f"{' (best)' if improved else ''}")
                if improved:
                    best, best_metrics, bad_evals = metrics[metric], metrics, 0
                    best_state = peft.trainable_state_dict(model)
                else:
                    bad_evals += 1
            if stop.requested:                  # one process only (07 refuses torchrun): no ranks to agree
                save(it + 1)
                rt.log(f"interrupted: saved {partial_path} at iter {it + 1}; continue with --resume")
                sys.exit(130)
    peft.load_trainable_state_dict(model, best_state)
    # the median step: robust to the few steps a shared machine stalls (the mean is not)
    return {"val": best_metrics, "seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2],
            "steps": len(step_seconds), "seconds": seconds_before + progress.seconds}


def save_adapter(path, model, backbone, method, options):
    """The trainable tensors alone (+ how to rebuild the model around them); returns the file size."""
    if isinstance(backbone, peft.PrefixTuning):
        backbone.fold()                       # the prefix alone: the reparameterisation MLP is not needed
        options = {**options, "hidden": 0}
    save_checkpoint(path, {"method": method, "options": options, "state_dict": peft.trainable_state_dict(model)})
    return path.stat().st_size


# -------------------------------------------------------------------------------- 6. measurements
@torch.no_grad()
def answers(gpt, tokenizer, examples, rt, max_new_tokens=40):
    """Greedy answers to instructions (chapter 05's generate with the KV cache)."""
    eot = tokenizer.eot_id
    rows = []
    for example in examples:
        prompt = tokenizer.encode(format_prompt(example))[-(gpt.config.block_size // 2):]
        idx = torch.tensor([prompt], device=rt.device)
        with rt.autocast():
            out = gpt.generate(idx, min(max_new_tokens, gpt.config.block_size - len(prompt)), temperature=0,
                               eos_id=eot)[0, len(prompt):].tolist()
        rows.append({"instruction": example["instruction"], "reference": example["response"],
                     "answer": tokenizer.decode(out[:out.index(eot)] if eot in out else out).strip()})
    return rows


def merged_lora_answers(model, tokenizer, examples, items, rt):
    """Merge the LoRA update into the weights (W0 <- W0 + (alpha/r) B A), check that the merged model
    gives the unmerged outputs, answer a few test questions with it, and unmerge."""
    batch = collate("instruction", items["test"][:4], tokenizer.eot_id, rt.device)
    model.eval()
    with torch.no_grad():
        unmerged = model(batch["input_ids"])[0]
        peft.merge_lora(model)
        difference = (model(batch["input_ids"])[0] - unmerged).abs().max().item()
    rows = answers(model, tokenizer, examples, rt)
    peft.unmerge_lora(model)
    rt.log(f"  merged LoRA: max |logit difference| to the unmerged model {difference:.2e}")
    for row in rows:
        rt.log(f"  Q: {row['instruction']}\n    reference: {row['reference']}\n    answer:    {row['answer']}")
    return {"merge_max_abs_difference": difference, "answers": rows}


def read_results(path, signature):
    """The finished rows of the run that wrote `path` (results.json), for --resume: {} when there is none;
    one clear line when the file is corrupt or holds the rows of other settings or another base."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        previous, results = saved["signature"], saved["results"]
        if not isinstance(previous, dict) or not isinstance(results, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is corrupt: run without --resume to start the table afresh "
                        f"(or delete the file)") from None
    differing = [name for name in signature if previous.get(name) != signature[name]]
    if differing:
        shown = ", ".join(f"{name} {previous.get(name)!r} (now {signature[name]!r})" for name in differing[:3])
        raise UserError(f"{path} holds the rows of another run ({shown}): run without --resume to start the "
                        f"table afresh, or pass another --out_dir")
    return results


# ---------------------------------------------------------------------------------------- 7. report
TABLE_COLUMNS = ["task", "method", "trainable", "% of base", "metric", "test", "steps", "ms/step", "peak MB",
                 "file KB"]


def table_rows(finetune):
    """One row per (task, method): the numbers of the methods table."""
    rows = []
    for task, block in finetune.items():
        for row in block["methods"].values():
            rows.append({"task": task, "method": row["method"], "trainable": row["trainable"],
                         "% of base": row["percent_of_base"], "metric": block["metric"],
                         "test": row["test"][block["metric"]], "steps": row["steps"],
                         "ms/step": row["seconds_per_step"] * 1000 if row["seconds_per_step"] else None,
                         "peak MB": row["peak_memory_mb"],
                         "file KB": row["file_bytes"] / 1e3 if row["file_bytes"] else None})
    return rows


def printable(row):
    """The same row with the numbers rounded for reading."""
    formats = {"trainable": "{:,}", "% of base": "{:.2f}", "test": "{:.4f}", "ms/step": "{:.0f}",
               "peak MB": "{:.1f}", "file KB": "{:.1f}"}
    return {k: (formats[k].format(v) if k in formats and v is not None else v) for k, v in row.items()}


def task_block(metric, rows, baseline, examples):
    """A task's report: its metric, full finetuning from the base ("pretrained") against the same from
    random weights ("scratch"), the majority baseline, the seconds of all its rows, and every row."""
    block = {"metric": metric,
             "pretrained": rows["full"]["test"][metric] if "full" in rows else None,
             "scratch": rows["scratch"]["test"][metric] if "scratch" in rows else None,
             "baseline": baseline, "seconds": sum(row["seconds"] for row in rows.values()), "methods": rows}
    if examples:
        block["examples"] = examples
    return block


def finish(report, rt, out_dir):
    """Write report.json (merged into the folder's earlier report, unless that one describes another base
    model) and print the merged report: the summary, then the methods table."""
    path = out_dir / "report.json"
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        previous_base = previous.get("base", {}).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        previous_base = None                           # none, or unreadable: write_report says so
    if previous_base not in (None, report["base"]["fingerprint"]):
        rt.log(f"{path} described another base model: starting it afresh")
        path.unlink()
    merged = write_report(path, report, log=rt.log)
    print_report(merged, title="07_peft report", log=rt.log)
    if merged.get("finetune"):
        rt.log("")
        rt.log(format_table([printable(row) for row in table_rows(merged["finetune"])], TABLE_COLUMNS))
        rt.log("pretrained / scratch: full finetuning from the base / from random weights; peak MB: "
               + ("CUDA allocator peak" if rt.device_type == "cuda" else
                  "weights + gradients + AdamW state + activations saved for backward (CPU estimate)")
               + "; file KB: the trainable tensors alone, as saved in out_dir/adapters/")
    rt.log(f"report written to {path} ({format_seconds(report['seconds'])} in all)")
    return merged


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.splitlines()[0])
    cfg, base_note = resolve_base(cfg)
    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rt = setup(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, seed=cfg.seed)
    if rt.ddp:
        raise UserError("07_peft runs in one process (each method is small); start it without torchrun")
    out_dir = Path(cfg.out_dir)
    run_start = time.perf_counter()
    if base_note:
        rt.log(base_note)                             # what --base auto chose, before anything else
    rt.log(f"07_peft | device {rt.device} ({str(rt.dtype).replace('torch.', '')}) | out_dir {out_dir} | "
           f"{torch.get_num_threads()} threads")
    report = {"chapter": "07_peft", "device": str(rt.device), "dtype": str(rt.dtype).replace("torch.", "")}

    # 3. base model -------------------------------------------------------------------------------
    base, tokenizer, base_info = get_base(cfg, rt, out_dir, by_auto=bool(base_note and cfg.base))
    if cfg.stage != "pretrain" and any(method in ("lora", "dora") for _, method, _ in parse_methods(cfg.methods)):
        try:
            peft.lora_targets(base, cfg.lora_targets)  # "gate" needs a SwiGLU MLP
        except ValueError as error:
            raise UserError(f"--lora_targets: {error}") from None
    base_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}  # every method starts here
    base_config = dataclasses.replace(base.config, dropout=0.0)
    base_params = peft.trainable_parameters(base)["total"]
    report["base"] = {"source": base_info["source"], "parameters": base_params, "n_layer": base_config.n_layer,
                      "n_embd": base_config.n_embd, "block_size": base_config.block_size,
                      "fingerprint": state_fingerprint(base_state)}
    if base_info.get("pretrain"):
        report["pretrain"] = base_info["pretrain"]
    del base                                          # off the device: only the model in training is there

    # 4-6. every method on every task ---------------------------------------------------------------
    if cfg.stage != "pretrain":
        check_context(cfg, base_config.block_size)
        results_path, partial_path = out_dir / "results.json", out_dir / "finetune.pt"
        signature = {**{name: getattr(cfg, name) for name in FINETUNING_FIELDS},
                     "base_fingerprint": report["base"]["fingerprint"]}
        results = read_results(results_path, signature) if cfg.resume else {}
        if results:
            rt.log(f"resumed: {sum(len(r['methods']) for r in results.values())} finished runs from {results_path}")
        pad_id = tokenizer.eot_id                      # padding is masked out: any id would do
        methods = parse_methods(cfg.methods)
        tasks = load_tasks(cfg, tokenizer)
        report["finetune"] = {}
        for task, spec in tasks.items():
            kind, items, labels = spec["kind"], spec["items"], spec["labels"]
            num_labels = len(labels or [])
            metric = "response_loss" if kind == "instruction" else "accuracy"
            rt.log(f"\n{task} ({kind}, test {metric}): {len(items['train'])} train / {len(items['val'])} val / "
                   f"{len(items['test'])} test examples")
            done = results.setdefault(task, {"methods": {}})        # finished runs, saved after each method
            rows = {}
            longest = sorted(range(len(items["train"])), key=lambda i: -len(items["train"][i][0]))[:cfg.ft_batch_size]
            probe = collate(kind, [items["train"][i] for i in longest], pad_id, rt.device)
            for key, method, options in methods:
                if key in done["methods"]:
                    rows[key] = done["methods"][key]
                    continue
                name = method_name(kind, method, options)
                torch.manual_seed(cfg.seed)                     # the same head initialisation for every method
                model, backbone, options, lr = build_model(kind, base_state, base_config, method, options, cfg,
                                                           num_labels)
                model.to(rt.device)
                counts = peft.trainable_parameters(model)
                row = {"method": name, "trainable": counts["trainable"], "lr": lr, "options": options,
                       "percent_of_base": 100 * counts["trainable"] / base_params}
                rt.log(f"{task} | {name}: {counts['trainable']:,} trainable parameters "
                       f"({row['percent_of_base']:.2f}% of the base), lr {lr:g}")
                if counts["trainable"] == 0:    # the frozen base on a generation task: nothing to train
                    row.update(val=evaluate(kind, model, items["val"], cfg, rt, pad_id, num_labels),
                               seconds_per_step=None, steps=0, peak_memory_mb=None, file_bytes=0, seconds=0.0)
                else:
                    if rt.device_type == "cuda":
                        torch.cuda.reset_peak_memory_stats(rt.device)
                    else:
                        row["peak_memory_mb"] = training_memory_mb(kind, model, probe, rt)
                    identity = {"task": task, "method": key, **signature}
                    row.update(finetune(kind, model, lr, items, cfg, rt, pad_id, name, num_labels, partial_path,
                                        identity))
                    if rt.device_type == "cuda":
                        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(rt.device) / 1e6
                    row["file_bytes"] = save_adapter(out_dir / "adapters" / f"{task}_{key}.pt", model, backbone,
                                                     method, options)
                row["test"] = evaluate(kind, model, items["test"], cfg, rt, pad_id, num_labels)
                rt.log(f"{task} | {name}: test " + " ".join(f"{k} {v:.4f}" for k, v in row["test"].items()))
                if kind == "instruction" and method == "lora" and "examples" not in done:
                    done["examples"] = merged_lora_answers(model, tokenizer, spec["examples"]["test"][:3], items, rt)
                done["methods"][key] = rows[key] = row
                atomic_write_json(results_path, {"signature": signature, "results": results})
                partial_path.unlink(missing_ok=True)           # the row is saved: its stopped state is spent
            baseline = (data.majority_baseline(spec["examples"]["train"], spec["examples"]["test"])
                        if kind == "classification" else None)
            report["finetune"][task] = task_block(metric, rows, baseline, done.get("examples"))

    # 7. report -------------------------------------------------------------------------------------
    report["seconds"] = time.perf_counter() - run_start
    return finish(report, rt, out_dir)


if __name__ == "__main__":
    run_main(main)

"""Chapter 05: pretrain a GPT, then finetune it to follow instructions and to classify, then deploy it.

    python 05_gpt/train.py                                  # everything, on 2 CPU cores in ~5 minutes
    python 05_gpt/train.py --device cuda --preset gpt2-124m --data my_corpus.txt
    torchrun --standalone --nproc_per_node=2 05_gpt/train.py
    python 05_gpt/train.py --stage sample --prompt "def "

The recipe, top to bottom:
 1. config and flags              every field of `Config` is a flag; --preset tiny | cpu | gpt2-124m
 2. runtime                       device, bf16 autocast on CUDA, --compile, DDP under torchrun
 3. tokenizer                     byte-level BPE trained on the corpus once, cached in out_dir
 4. pretraining                   L_LM = -sum_t log p(x_t | x_<t), AdamW, warmup + cosine decay,
                                  gradient accumulation and clipping, periodic val loss / perplexity,
                                  atomic checkpoints, --resume, Ctrl-C saves first
 5. instruction finetuning        python-qa: a prompt template, loss on response tokens only
 6. classification finetuning     docstring-module: a head on the last token, L = L_CE + lambda L_LM
    (both from the pretrained model and from scratch with the same budget, early stopping on val)
 7. deployment                    int8 weights with per-channel scales: size, speed, metric
 8. report                        a table, out_dir/report.json, and samples
"""

import dataclasses
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # so that `common` imports from any working directory

from common import data, load_module  # noqa: E402
from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main  # noqa: E402
from common.report import Progress, format_seconds, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup  # noqa: E402
from common.tokenizer import BPETokenizer  # noqa: E402

gpt_model = load_module(HERE / "model.py")
GPT, GPTConfig, GPTClassifier = gpt_model.GPT, gpt_model.GPTConfig, gpt_model.GPTClassifier

EOT = "<|endoftext|>"
STAGES = ("all", "pretrain", "finetune", "sample")
BUILTIN_TASKS = {"python-qa": "instruction", "docstring-module": "classification"}


# ----------------------------------------------------------------------------------------- 1. config
@dataclass
class Config:
    # what to run
    stage: str = "all"               # all | pretrain | finetune | sample
    out_dir: str = "out/05_gpt"      # checkpoints, tokenizer and report.json go here
    resume: bool = False             # continue a stopped run from out_dir/ckpt.pt
    init_from: str = ""              # a Hugging Face GPT-2 folder to start from instead of pretraining
    # data
    data: str = "pydocs"             # pretraining corpus: pydocs | shakespeare | wikitext-2 | file.txt | folder
    vocab_size: int = 1024           # BPE vocabulary size (256 bytes + merges + <|endoftext|>)
    # model
    n_layer: int = 4                 # Transformer blocks
    n_head: int = 4                  # attention heads per block
    n_embd: int = 192                # width d_model
    block_size: int = 128            # context length in tokens
    dropout: float = 0.0             # dropout in pretraining (finetuning uses ft_dropout)
    bias: bool = True                # biases in Linear and LayerNorm, as GPT-2
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
    tasks: str = "python-qa,docstring-module"  # built-in tasks to finetune on, comma-separated
    task: str = ""                   # your own .jsonl/.csv task instead (text,label | instruction,input,response | input,target)
    num_labels: int = 10             # docstring-module: classify among the most frequent modules
    ft_iters: int = 200              # finetuning steps per run (pretrained and scratch alike)
    ft_batch_size: int = 16          # finetuning batch size
    ft_lr: float = 1e-3              # finetuning peak learning rate
    ft_dropout: float = 0.1          # dropout while finetuning
    ft_eval_interval: int = 40       # evaluate on val this often; keep the best checkpoint
    patience: int = 3                # stop after this many evaluations without improvement
    lm_aux_weight: float = 0.1       # lambda in L = L_CE + lambda * L_LM for classification
    freeze_layers: int = -1          # classification: freeze embeddings + first N blocks (-1 = train all)
    max_ft_examples: int = 0         # cap train examples per task (0 = all)
    scratch: bool = True             # also finetune a randomly initialised model for comparison
    quantize: bool = True            # int8-quantise the finetuned models and compare
    # sampling
    prompt: str = ""                 # --stage sample: text to continue (default: a fresh document)
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


PRESETS = {
    "tiny": dict(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                 max_iters=20, warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=5,
                 ft_iters=8, ft_batch_size=4, ft_eval_interval=4, max_ft_examples=64, num_samples=1,
                 max_new_tokens=8),
    "cpu": {},   # the defaults: all stages in about 5 minutes on 2 CPU cores
    "gpt2-124m": dict(vocab_size=16384, n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0,
                      batch_size=16, grad_accum=4, max_iters=5000, lr=6e-4, min_lr=6e-5, warmup_iters=200,
                      eval_interval=500, eval_iters=50, log_interval=20, ft_iters=1000, ft_batch_size=16,
                      ft_lr=1e-4, ft_eval_interval=100, max_new_tokens=128),
}


def check_config(cfg):
    """Bad values -> one clear line (UserError) before anything runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if cfg.attn_impl not in ("sdpa", "explicit"):
        raise UserError(f"unknown attn_impl {cfg.attn_impl!r} (valid: sdpa, explicit)")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_iters",
                 "eval_interval", "eval_iters", "ft_batch_size", "ft_eval_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.vocab_size < 257 and not cfg.init_from:
        raise UserError(f"--vocab_size must be at least 257 (256 bytes + {EOT}), got {cfg.vocab_size}")
    unknown = [t for t in cfg.tasks.split(",") if t and t not in BUILTIN_TASKS]
    if unknown and not cfg.task:
        raise UserError(f"unknown task {unknown[0]!r} (built-in: {', '.join(BUILTIN_TASKS)}; or --task file.jsonl)")
    if not 0 < cfg.top_p <= 1 or cfg.temperature < 0 or cfg.top_k < 0:
        raise UserError("need 0 < top_p <= 1, temperature >= 0 and top_k >= 0")


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


def sample_text(model, tokenizer, rt, prompt="", max_new_tokens=64, temperature=0.8, top_k=0, top_p=0.95,
                num_samples=1, seed=0):
    """Continue `prompt` (or start a new document after <|endoftext|>) with the KV cache."""
    eot = tokenizer.special_tokens[EOT]
    prompt_ids = tokenizer.encode(prompt) if prompt else [eot]
    room = model.config.block_size - len(prompt_ids)
    if room < 1:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens, longer than the context "
                        f"(block_size {model.config.block_size})")
    idx = torch.tensor([prompt_ids] * num_samples, device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    with rt.autocast():
        out = model.generate(idx, min(max_new_tokens, room), temperature=temperature, top_k=top_k or None,
                             top_p=top_p if top_p < 1 else None, eos_id=eot, generator=generator)
    texts = []
    for row in out.tolist():
        new = row[len(prompt_ids):]
        new = new[:new.index(eot)] if eot in new else new
        texts.append(prompt + tokenizer.decode(new))
    return texts


def pretrain(cfg, rt, tokenizer, out_dir):
    """Train a GPT from random weights on the corpus; returns (model, pretraining report)."""
    tokens = data.TokenCache(cfg.data, tokenizer)
    rt.log(f"corpus: {cfg.data}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens"
           f" ({'encoded now' if tokens.built else 'cached'})")
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                             attn_impl=cfg.attn_impl)
    model = GPT(model_config).to(rt.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), rt.device_type)
    # Each rank draws its own windows; the generator's state is checkpointed, so --resume draws the
    # very batches the stopped run would have drawn next.
    batch_generator = torch.Generator().manual_seed(cfg.seed + rt.rank)
    start_iter, best_val, history, seconds_before = 0, float("inf"), [], 0.0

    ckpt_path = out_dir / "ckpt.pt"
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("model_config") != dataclasses.asdict(model_config):
            raise UserError(f"{ckpt_path} was saved for another model config ({ckpt.get('model_config')}); "
                            f"use the same flags, or another --out_dir")
        load_model_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        batch_generator.set_state(ckpt["batch_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_iter, best_val, history = ckpt["iter"], ckpt["best_val_loss"], ckpt.get("history", [])
        seconds_before = ckpt.get("seconds", 0.0)        # time spent before the stop counts too
        rt.log(f"resumed from {ckpt_path} at iter {start_iter}")
        if start_iter >= cfg.max_iters:
            return model, ckpt["report"]

    rt.log(f"model: {model.num_parameters() / 1e6:.2f}M parameters ({model_config.n_layer} layers, "
           f"{model_config.n_head} heads, {model_config.n_embd} wide, context {model_config.block_size})")
    train_model = rt.wrap(rt.maybe_compile(model))
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * rt.world_size
    progress = Progress(cfg.max_iters, tokens_per_iter, log=rt.log, log_interval=cfg.log_interval,
                        flops_per_token=model.num_flops_per_token(), device=rt.device, dtype=rt.dtype,
                        start_iter=start_iter)

    def save(it):
        if rt.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": dataclasses.asdict(model_config), "config": dataclasses.asdict(cfg),
                "iter": it, "best_val_loss": best_val, "history": history,
                "batch_generator": batch_generator.get_state(), "torch_rng": torch.get_rng_state(),
                "tokenizer": {"path": "tokenizer.json", "fingerprint": tokenizer.fingerprint},
                "report": pretrain_report(), "seconds": seconds_before + progress.seconds,
            })

    def pretrain_report():
        return {"val_loss": best_val if best_val < float("inf") else None,
                "perplexity": math.exp(best_val) if best_val < 50 else None,
                "tokens_per_second": progress.average_tokens_per_second,
                "seconds": seconds_before + progress.seconds, "iters": cfg.max_iters,
                "parameters": model.num_parameters(), "history": history}

    model.train()
    with StopFlag() as stop:
        for it in range(start_iter, cfg.max_iters):
            lr = get_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro_step in range(cfg.grad_accum):
                x, y = tokens.get_batch("train", cfg.batch_size, cfg.block_size, rt.device, batch_generator)
                # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
                sync = nullcontext() if not rt.ddp or micro_step == cfg.grad_accum - 1 else train_model.no_sync()
                with sync, rt.autocast():
                    _, loss = train_model(x, y)
                rt.scaler.scale(loss / cfg.grad_accum).backward()
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.step(it, loss=loss, lr=lr)

            last = it == cfg.max_iters - 1
            if (it + 1) % cfg.eval_interval == 0 or last:
                train_loss = estimate_loss(model, tokens, cfg, rt, "train")
                val_loss = estimate_loss(model, tokens, cfg, rt, "val")
                best_val = min(best_val, val_loss)
                history.append({"iter": it + 1, "train_loss": train_loss, "val_loss": val_loss})
                rt.log(f"eval iter {it + 1}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                       f"val perplexity {math.exp(val_loss):.1f}")
                text = sample_text(model, tokenizer, rt, max_new_tokens=min(48, cfg.block_size - 1), seed=it)[0]
                rt.log(f"  sample: {text.strip()[:200]!r}")
                save(it + 1)
            stop_now = rt.all_reduce_mean(float(stop.requested)) > 0 if rt.ddp else stop.requested
            if stop_now:
                save(it + 1)
                rt.log(f"interrupted: checkpoint saved to {ckpt_path} at iter {it + 1}; "
                       f"continue with --resume")
                sys.exit(130)
    return model, pretrain_report()


# --------------------------------------------------------------------------- 5-6. finetuning: data
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
    response = tokenizer.encode(example["response"]) + [tokenizer.special_tokens[EOT]]
    prompt = prompt[-(block_size // 2):]                 # a very long prompt keeps its end
    sequence = (prompt + response)[:block_size + 1]
    labels = ([-100] * len(prompt) + response)[:block_size + 1]
    return sequence[:-1], labels[1:]                       # labels[t] is the token after sequence[t]


def as_instruction(example):
    """User files with input,target columns become instructions too."""
    if "instruction" in example:
        return example
    return {"instruction": example["input"], "input": "", "response": example["target"]}


def load_finetuning_tasks(cfg):
    """{task name: (kind, {split: examples})} for the built-in tasks or the user's file."""
    names = [cfg.task] if cfg.task else [t for t in cfg.tasks.split(",") if t]
    tasks = {}
    for name in names:
        splits = {split: data.load_task(name, split, num_labels=cfg.num_labels) for split in data.SPLITS}
        kind = BUILTIN_TASKS.get(name) or ("classification" if "label" in splits["train"][0] else "instruction")
        if kind == "instruction":
            splits = {s: [as_instruction(e) for e in examples] for s, examples in splits.items()}
        if cfg.max_ft_examples:   # a random (seeded) subset: the files are sorted by name, not shuffled
            for split, cap in (("train", cfg.max_ft_examples), ("val", max(16, cfg.max_ft_examples // 4)),
                               ("test", max(16, cfg.max_ft_examples // 4))):
                if len(splits[split]) > cap:
                    splits[split] = random.Random(cfg.seed).sample(splits[split], cap)
        tasks[Path(name).stem if cfg.task else name] = (kind, splits)
    return tasks


# --------------------------------------------------------------------- 6. classification metrics
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


# ------------------------------------------------------------------------- 5-6. finetuning: the loop
def make_batches(kind, examples, tokenizer, cfg, labels=None):
    """Tokenize once: a list of (ids, target) pairs, target = label ids (instruction) or class index."""
    if kind == "instruction":
        return [instruction_example(tokenizer, e, cfg.block_size) for e in examples]
    index = {label: i for i, label in enumerate(labels)}
    return [(tokenizer.encode(e["text"])[:cfg.block_size], index[e["label"]]) for e in examples]


def collate(kind, items, pad_id, device):
    if kind == "instruction":
        batch = data.pad_batch([ids for ids, _ in items], pad_id, labels=[lab for _, lab in items])
    else:
        batch = data.pad_batch([ids for ids, _ in items], pad_id)
        batch["labels"] = torch.tensor([label for _, label in items])
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(kind, model, items, cfg, rt, pad_id, num_labels=None):
    """Instruction: mean response-token loss (lower is better). Classification: accuracy and macro-F1."""
    model.eval()
    total_loss, total_tokens, predictions = 0.0, 0, []
    for indices in data.batch_indices([len(ids) for ids, _ in items], cfg.ft_batch_size * 2, shuffle=False, bucket=True):
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


def finetune(kind, model, train_items, val_items, cfg, rt, pad_id, name, ckpt_path, num_labels=None):
    """Finetune for up to ft_iters steps; evaluate on val every ft_eval_interval steps, keep the best
    weights (saved atomically to ckpt_path) and stop early after `patience` evaluations without
    improvement. Returns the model with the best weights loaded, and the best val metrics."""
    metric = "response_loss" if kind == "instruction" else "accuracy"
    better = (lambda a, b: a < b) if kind == "instruction" else (lambda a, b: a > b)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.ft_lr, (cfg.beta1, cfg.beta2), rt.device_type)
    train_model = rt.wrap(model)
    warmup = max(1, cfg.ft_iters // 10)
    lengths = [len(ids) for ids, _ in train_items]
    epoch, order = 0, []
    best, best_metrics, bad_evals = None, None, 0
    progress = Progress(cfg.ft_iters, cfg.ft_batch_size * cfg.block_size, log=rt.log,
                        log_interval=cfg.ft_eval_interval, name=name)
    model.train()
    for it in range(cfg.ft_iters):
        if not order:   # a new epoch: length-bucketed batches in a fresh order; each rank takes its share
            order = data.batch_indices(lengths, cfg.ft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True)
            order = order[rt.rank::rt.world_size] or order
            epoch += 1
        batch = collate(kind, [train_items[i] for i in order.pop()], pad_id, rt.device)
        lr = get_lr(it, cfg.ft_lr, cfg.ft_lr / 10, warmup, cfg.ft_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with rt.autocast():
            if kind == "instruction":
                _, loss = train_model(batch["input_ids"], batch["labels"])
            else:
                _, loss = train_model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      lm_weight=cfg.lm_aux_weight)
        rt.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.step(it, loss=loss, lr=lr, tokens=batch["attention_mask"].numel() * rt.world_size)

        if (it + 1) % cfg.ft_eval_interval == 0 or it == cfg.ft_iters - 1:
            metrics = evaluate(kind, model, val_items, cfg, rt, pad_id, num_labels)
            rt.log(f"{name} eval at iter {it + 1}: val " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if best is None or better(metrics[metric], best):
                best, best_metrics, bad_evals = metrics[metric], metrics, 0
                if rt.is_main:
                    save_checkpoint(ckpt_path, {"model": model.state_dict(), "iter": it + 1, "val": metrics})
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    rt.log(f"{name}: early stop at iter {it + 1} (no val improvement in {cfg.patience} evals)")
                    break
    rt.barrier()
    load_model_state(model, load_checkpoint(ckpt_path, map_location=rt.device)["model"], ckpt_path)
    return model, best_metrics


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


def deployment_report(kind, model, test_items, cfg, rt, pad_id, num_labels):
    """Quantize a copy of the finetuned model on CPU: size, generation speed and test metric, before
    and after; and the same with torch's own dynamic int8 quantization where this torch still has it."""
    import copy
    cpu = dataclasses.replace(rt, device=torch.device("cpu"), dtype=torch.float32) if rt.device_type != "cpu" else rt
    base = copy.deepcopy(model).cpu().eval()
    gpt_of = (lambda m: m) if kind == "instruction" else (lambda m: m.gpt)
    rows = {}
    variants = {"float32": base, "int8 (ours)": quantize_int8(copy.deepcopy(base))}
    try:
        from torch.ao.quantization import quantize_dynamic   # deprecated upstream; may be gone in later torch
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants["int8 (torch quantize_dynamic)"] = quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
    except Exception as error:  # ImportError, or no quantized engine on this platform
        rt.log(f"  torch.ao quantize_dynamic not available here ({type(error).__name__}); skipped")
    for label, variant in variants.items():
        metrics = evaluate(kind, variant, test_items, cfg, cpu, pad_id, num_labels)
        size = state_dict_bytes(variant) if "torch" not in label else None
        rows[label] = {**metrics, "megabytes": size / 1e6 if size else None,
                       "generate_tokens_per_second": generation_speed(gpt_of(variant), cpu)}
    return rows


# ------------------------------------------------------------------------------------- the recipe
def get_tokenizer(cfg, rt, out_dir):
    """Train the BPE tokenizer on the corpus once; later runs (and --resume) load the cached file."""
    path = out_dir / "tokenizer.json"
    documents = data.corpus_documents(cfg.data)
    source = out_dir / "tokenizer.data"              # which corpus the cached tokenizer was trained on
    if path.exists() and source.exists() and source.read_text() == cfg.data:
        tokenizer = BPETokenizer.load(path)
        if tokenizer.vocab_size == cfg.vocab_size:
            return tokenizer
    if rt.ddp and not rt.is_main:
        rt.barrier()                                   # rank 0 trains it; the others wait and load it
        return BPETokenizer.load(path)
    start = time.perf_counter()
    tokenizer = BPETokenizer.train(documents, cfg.vocab_size, special_tokens=(EOT,))
    tokenizer.save(path)
    (out_dir / "tokenizer.data").write_text(cfg.data)
    rt.log(f"tokenizer: trained {cfg.vocab_size}-token BPE on {cfg.data} in {time.perf_counter() - start:.1f}s")
    if rt.ddp:
        rt.barrier()
    return tokenizer


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    rt = setup(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, seed=cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_start = time.perf_counter()
    rt.log(f"05_gpt | stage {cfg.stage} | device {rt.device} ({str(rt.dtype).replace('torch.', '')})"
           f"{f' | {rt.world_size} processes' if rt.ddp else ''} | out_dir {out_dir}")
    report_path = out_dir / "report.json"
    report = {"chapter": "05_gpt", "device": str(rt.device), "dtype": str(rt.dtype).replace("torch.", ""),
              "world_size": rt.world_size}

    # 3. tokenizer and base model ----------------------------------------------------------------
    if cfg.init_from:
        folder = Path(cfg.init_from)
        try:
            base = GPT.from_pretrained(folder, dropout=cfg.ft_dropout, attn_impl=cfg.attn_impl).to(rt.device)
        except (OSError, ValueError, ImportError) as error:
            raise UserError(f"--init_from {folder}: {error}") from None
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            tokenizer = BPETokenizer.from_hf(folder / "vocab.json", folder / "merges.txt")
        else:
            tokenizer = BPETokenizer.from_tiktoken("gpt2")
        cfg.block_size = min(cfg.block_size, base.config.block_size)
        rt.log(f"loaded GPT-2 from {folder}: {base.num_parameters() / 1e6:.1f}M parameters")
    else:
        tokenizer = get_tokenizer(cfg, rt, out_dir)
        base = None

    # 4. pretraining --------------------------------------------------------------------------------
    if cfg.stage in ("all", "pretrain") and base is None:
        base, report["pretrain"] = pretrain(cfg, rt, tokenizer, out_dir)
        rt.log(f"pretraining done: best val loss {report['pretrain']['val_loss']:.4f} in "
               f"{format_seconds(report['pretrain']['seconds'])}")
    elif base is None:
        ckpt = load_checkpoint(out_dir / "ckpt.pt", map_location=rt.device)
        base = GPT(GPTConfig(**ckpt["model_config"])).to(rt.device)
        load_model_state(base, ckpt["model"], out_dir / "ckpt.pt")
        if ckpt.get("tokenizer", {}).get("fingerprint") != tokenizer.fingerprint:
            raise UserError(f"{out_dir / 'ckpt.pt'} was trained with another tokenizer than {out_dir / 'tokenizer.json'}")
        report["pretrain"] = ckpt["report"]
        cfg.block_size = base.config.block_size

    # 5-7. finetuning and deployment ------------------------------------------------------------------
    if cfg.stage in ("all", "finetune"):
        report["finetune"] = {}
        pad_id = tokenizer.special_tokens.get(EOT, 0)
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        for task, (kind, splits) in load_finetuning_tasks(cfg).items():
            labels = data.task_labels(splits["train"]) if kind == "classification" else None
            if labels is not None:
                unknown = {e["label"] for s in ("val", "test") for e in splits[s]} - set(labels)
                if unknown:
                    raise UserError(f"{task}: labels {sorted(unknown)[:3]} appear in val/test but not in train")
            items = {s: make_batches(kind, examples, tokenizer, cfg, labels) for s, examples in splits.items()}
            rt.log(f"\nfinetuning on {task} ({kind}): {len(items['train'])} train / {len(items['val'])} val / "
                   f"{len(items['test'])} test examples")
            row = {"metric": "response_loss" if kind == "instruction" else "accuracy"}
            if kind == "classification":
                row["baseline"] = data.majority_baseline(splits["train"], splits["test"])
            finetuned = {}
            for init in ("pretrained", "scratch") if cfg.scratch else ("pretrained",):
                torch.manual_seed(cfg.seed)
                gpt = GPT(dataclasses.replace(base.config, dropout=cfg.ft_dropout)).to(rt.device)
                if init == "pretrained":
                    gpt.load_state_dict(base_state)
                model = gpt if kind == "instruction" else GPTClassifier(gpt, len(labels)).to(rt.device)
                if kind == "classification" and cfg.freeze_layers >= 0:
                    frozen = [gpt.transformer.wte, gpt.transformer.wpe, *gpt.transformer.h[:cfg.freeze_layers]]
                    for module in frozen:
                        module.requires_grad_(False)
                start = time.perf_counter()
                model, val_metrics = finetune(kind, model, items["train"], items["val"], cfg, rt, pad_id,
                                              f"{task}/{init}", out_dir / f"ft_{task}_{init}.pt", len(labels or []))
                test_metrics = evaluate(kind, model, items["test"], cfg, rt, pad_id, len(labels or []))
                row[init] = test_metrics[row["metric"]]
                row[f"{init}_detail"] = {"test": test_metrics, "val": val_metrics,
                                         "seconds": time.perf_counter() - start}
                finetuned[init] = model
                rt.log(f"{task}/{init}: test " + " ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
            row["seconds"] = sum(row[f"{init}_detail"]["seconds"] for init in finetuned)
            if kind == "instruction":
                row["examples"] = answer_examples(finetuned["pretrained"], tokenizer, splits["test"][:3], cfg, rt)
                for example in row["examples"]:
                    rt.log(f"  Q: {example['instruction']}\n    reference: {example['reference']}\n"
                           f"    answer:    {example['answer']}")
            if cfg.quantize and rt.is_main:
                row["deployment"] = deployment_report(kind, finetuned["pretrained"], items["test"], cfg, rt,
                                                      pad_id, len(labels or []))
                for variant, figures in row["deployment"].items():
                    rt.log(f"  {variant:<30} " + " | ".join(f"{k} {v:.4g}" for k, v in figures.items() if v is not None))
            report["finetune"][task] = row

    # 8. samples and report -------------------------------------------------------------------------
    if cfg.stage in ("all", "sample"):
        report["samples"] = sample_text(base, tokenizer, rt, cfg.prompt, cfg.max_new_tokens, cfg.temperature,
                                        cfg.top_k, cfg.top_p, cfg.num_samples, seed=cfg.seed)
        rt.log("\nsamples:")
        for text in report["samples"]:
            rt.log(f"---\n{text}")
    report["seconds"] = time.perf_counter() - run_start
    if rt.is_main:
        print_report({k: v for k, v in report.items() if k != "samples"}, title="05_gpt report", log=rt.log)
        write_report(report_path, report)
        rt.log(f"report written to {report_path}")
    rt.cleanup()
    return report


@torch.no_grad()
def answer_examples(model, tokenizer, examples, cfg, rt):
    """Greedy answers of the instruction-tuned model next to the reference answers."""
    eot = tokenizer.special_tokens[EOT]
    rows = []
    for example in examples:
        prompt = tokenizer.encode(format_prompt(example))[-(cfg.block_size // 2):]
        idx = torch.tensor([prompt], device=rt.device)
        with rt.autocast():
            out = model.generate(idx, min(48, cfg.block_size - len(prompt)), temperature=0, eos_id=eot)[0, len(prompt):].tolist()
        answer = tokenizer.decode(out[:out.index(eot)] if eot in out else out)
        rows.append({"instruction": example["instruction"], "reference": example["response"], "answer": answer.strip()})
    return rows


if __name__ == "__main__":
    run_main(main)

"""Chapter 07: parameter-efficient finetuning, every major method on one base GPT, in one table.

    python 07_peft/train.py                                   # base + 2 tasks x 10 methods, ~7 min on 2 CPU cores
    python 07_peft/train.py --base out/05_gpt/ckpt.pt         # start from chapter 05's model
    python 07_peft/train.py --base out/07_peft/base.pt --methods lora8,prefix --tasks python-qa
    python 07_peft/train.py --device cuda --preset gpu

The recipe, top to bottom:
 1. config and flags          every field of `Config` is a flag; --preset tiny | cpu | gpu
 2. runtime                   device, bf16 autocast on CUDA, --compile
 3. base model                --base (a chapter-05 style checkpoint), --init_from (a Hugging Face GPT-2
                              folder), or a short pretraining run on the corpus here (the starting point,
                              not the lesson): tokenizer, L_LM, AdamW + cosine, checkpoints, --resume
 4. tasks                     python-qa (instruction template, loss on response tokens only) and
                              docstring-module (a classifier head on the last token)
 5. methods                   full finetuning, LoRA r = 4 / 8 / 16, DoRA, prefix tuning, prompt tuning,
                              bottleneck adapters, (IA)^3, the frozen base with a head only; each from the
                              same base, same batches, same number of steps, early stopping on val
 6. measurements              trainable parameters, test metric, time per step, peak memory, adapter
                              file size (the trainable tensors alone, prefix MLP folded away)
 7. report                    a table, out_dir/report.json, and answers of the LoRA model after merging
"""

import dataclasses
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
from common.checkpoint import atomic_write_json, load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main  # noqa: E402
from common.report import Progress, format_seconds, format_table, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup  # noqa: E402
from common.tokenizer import BPETokenizer  # noqa: E402

peft = load_module(HERE / "model.py")
GPT, GPTConfig, SequenceClassifier = peft.GPT, peft.GPTConfig, peft.SequenceClassifier

EOT = "<|endoftext|>"
STAGES = ("all", "pretrain", "finetune")
TASK_KINDS = {"python-qa": "instruction", "docstring-module": "classification"}


# ----------------------------------------------------------------------------------------- 1. config
@dataclass
class Config:
    # what to run
    stage: str = "all"               # all | pretrain (the base only) | finetune (needs a base)
    out_dir: str = "out/07_peft"     # base.pt, tokenizer.json, adapters/, results.json, report.json
    resume: bool = False             # continue a stopped run: pretraining from base.pt, finished methods from results.json
    base: str = ""                   # a GPT checkpoint to start from (out/05_gpt/ckpt.pt, out/07_peft/base.pt)
    init_from: str = ""              # or a Hugging Face GPT-2 folder
    # data
    data: str = "pydocs"             # pretraining corpus: pydocs | shakespeare | wikitext-2 | file.txt | folder
    vocab_size: int = 1024           # BPE vocabulary size of a base pretrained here
    # base model, pretrained here when neither --base nor --init_from is given
    n_layer: int = 4                 # Transformer blocks
    n_head: int = 4                  # attention heads per block
    n_embd: int = 128                # width d_model
    block_size: int = 96             # context length in tokens (finetuning text + virtual tokens must fit)
    batch_size: int = 16             # pretraining sequences per step
    max_iters: int = 600             # pretraining steps
    lr: float = 3e-3                 # pretraining peak learning rate
    min_lr: float = 3e-4             # floor of the cosine decay
    warmup_iters: int = 30           # linear warmup steps
    weight_decay: float = 0.1        # AdamW decay on matrices, pretraining only
    grad_clip: float = 1.0           # clip the global gradient norm (0 = off)
    eval_interval: int = 150         # pretraining: evaluate val loss and save base.pt this often
    eval_iters: int = 10             # batches per loss estimate
    log_interval: int = 50           # print a progress line this often
    # finetuning: one budget for every method
    tasks: str = "python-qa,docstring-module"  # tasks, comma-separated
    methods: str = "full,lora4,lora8,lora16,dora8,prefix,prompt,adapter,ia3,head"  # full, loraR, doraR, prefix, prompt, adapter, ia3, head
    num_labels: int = 10             # docstring-module: the most frequent modules
    pooling: str = "mean"            # classifier input: mean (of the hidden states) | last (token's state)
    ft_iters: int = 60               # finetuning steps per method (the same for all)
    ft_batch_size: int = 16          # finetuning batch size
    ft_max_len: int = 80             # finetuning examples are cut to this many tokens
    ft_eval_interval: int = 20       # evaluate on val this often; keep the best trainable weights
    patience: int = 2                # stop after this many evaluations without improvement
    max_ft_examples: int = 0         # cap train examples per task (0 = all)
    max_eval_examples: int = 0       # cap val and test examples per task (0 = all)
    # each method's learning rate (methods with fewer, more leveraged parameters want larger ones)
    lr_full: float = 1e-3            # full finetuning
    lr_lora: float = 3e-3            # LoRA and DoRA
    lr_prefix: float = 3e-3          # prefix tuning (through the MLP)
    lr_prompt: float = 3e-2          # prompt tuning
    lr_adapter: float = 1e-2         # bottleneck adapters
    lr_ia3: float = 1e-1             # (IA)^3
    lr_head: float = 3e-2            # the classifier's head (in every method), and the head-only row
    # each method's shape
    lora_alpha: float = 16.0         # LoRA scale alpha / r, alpha fixed across ranks (as the paper)
    lora_dropout: float = 0.0        # dropout on the LoRA path (costs a copy of each input: memory)
    lora_targets: str = "all"        # q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj or the groups attn, mlp, all
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
    "tiny": dict(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=48, batch_size=4, max_iters=16,
                 warmup_iters=2, eval_interval=8, eval_iters=2, log_interval=4, ft_iters=6, ft_batch_size=4,
                 ft_max_len=32, ft_eval_interval=3, max_ft_examples=48, max_eval_examples=16,
                 prefix_tokens=4, prefix_hidden=16, prompt_tokens=4, adapter_size=4),
    "cpu": {},   # the defaults: the whole table in under 8 minutes on 2 CPU cores
    "gpu": dict(vocab_size=8192, n_layer=8, n_head=8, n_embd=512, block_size=256, batch_size=32, max_iters=3000,
                lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=500, eval_iters=40, log_interval=100,
                ft_iters=600, ft_batch_size=32, ft_max_len=224, ft_eval_interval=100, patience=3,
                lr_full=1e-4, lr_lora=1e-3, lr_prefix=1e-3, lr_prompt=3e-2, lr_adapter=1e-3, lr_ia3=1e-2,
                lr_head=1e-3, prefix_tokens=32, prompt_tokens=32, prefix_hidden=512, adapter_size=64),
}


def parse_methods(text):
    """"full,lora8,dora8,prefix" -> [(key, method, options)], e.g. ("lora8", "lora", {"r": 8})."""
    methods = []
    for key in [m.strip() for m in text.split(",") if m.strip()]:
        head, digits = key.rstrip("0123456789"), key[len(key.rstrip("0123456789")):]
        if head in ("lora", "dora") and digits and int(digits) > 0:
            methods.append((key, head, {"r": int(digits)}))
        elif key in ("full", "prefix", "prompt", "adapter", "ia3", "head"):
            methods.append((key, key, {}))
        else:
            raise UserError(f"unknown method {key!r} (valid: full, lora<r>, dora<r>, prefix, prompt, adapter, ia3, head)")
    if not methods:
        raise UserError("--methods is empty")
    return methods


def check_config(cfg):
    """Bad values -> one clear line (UserError) before anything runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    if cfg.base and cfg.init_from:
        raise UserError("give --base or --init_from, not both")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval",
                 "eval_iters", "log_interval", "ft_iters", "ft_batch_size", "ft_max_len", "ft_eval_interval",
                 "patience", "prefix_tokens", "prompt_tokens", "adapter_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.vocab_size < 257 and not (cfg.base or cfg.init_from):
        raise UserError(f"--vocab_size must be at least 257 (256 bytes + {EOT}), got {cfg.vocab_size}")
    unknown = [t for t in cfg.tasks.split(",") if t and t not in TASK_KINDS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r} (valid: {', '.join(TASK_KINDS)})")
    if cfg.pooling not in ("mean", "last"):
        raise UserError(f"unknown --pooling {cfg.pooling!r} (valid: mean, last)")
    if cfg.prompt_init not in ("vocab", "random"):
        raise UserError(f"unknown --prompt_init {cfg.prompt_init!r} (valid: vocab, random)")
    try:
        peft.lora_targets(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=8)), cfg.lora_targets)
    except ValueError as error:
        raise UserError(f"--lora_targets: {error}") from None
    parse_methods(cfg.methods)


def get_lr(it, peak, floor, warmup, total):
    """Linear warmup to `peak`, then cosine decay to `floor` at `total`."""
    if it < warmup:
        return peak * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


# -------------------------------------------------------------------------------------- 3. base model
def get_tokenizer(cfg, rt, out_dir):
    """Train the BPE tokenizer on the corpus once; later runs load the cached file."""
    path, source = out_dir / "tokenizer.json", out_dir / "tokenizer.data"
    if path.exists() and source.exists() and source.read_text() == f"{cfg.data}|{cfg.vocab_size}":
        return BPETokenizer.load(path)
    start = time.perf_counter()
    tokenizer = BPETokenizer.train(data.corpus_documents(cfg.data), cfg.vocab_size, special_tokens=(EOT,))
    tokenizer.save(path)
    source.write_text(f"{cfg.data}|{cfg.vocab_size}")
    rt.log(f"tokenizer: trained a {cfg.vocab_size}-token BPE on {cfg.data} in {time.perf_counter() - start:.1f}s")
    return tokenizer


@torch.no_grad()
def estimate_loss(model, tokens, cfg, rt, split):
    """Mean LM loss over eval_iters batches, the same windows every call (a fixed generator)."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + (0 if split == "train" else 1))
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = tokens.get_batch(split, cfg.batch_size, cfg.block_size, rt.device, generator)
        with rt.autocast():
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def pretrain(cfg, rt, tokenizer, out_dir):
    """A short pretraining run on the corpus: the base every method starts from. Saves out_dir/base.pt in
    chapter 05's checkpoint format (so --base out/07_peft/base.pt skips this next time)."""
    tokens = data.TokenCache(cfg.data, tokenizer)
    rt.log(f"corpus: {cfg.data}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens")
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd)
    model = GPT(model_config).to(rt.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (0.9, 0.95), rt.device_type)
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    start_iter, history, seconds_before = 0, [], 0.0
    ckpt_path = out_dir / "base.pt"
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("model_config") != dataclasses.asdict(model_config):
            raise UserError(f"{ckpt_path} was saved for another model config; use the same flags or another --out_dir")
        load_model_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        batch_generator.set_state(ckpt["batch_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_iter, history, seconds_before = ckpt["iter"], ckpt["history"], ckpt["seconds"]
        rt.log(f"resumed pretraining from {ckpt_path} at iter {start_iter}")
    rt.log(f"base model: {model.num_parameters() / 1e6:.2f}M parameters ({cfg.n_layer} layers, {cfg.n_head} heads, "
           f"{cfg.n_embd} wide, context {cfg.block_size}), {cfg.max_iters} pretraining steps")
    train_model = rt.maybe_compile(model)
    progress = Progress(cfg.max_iters, cfg.batch_size * cfg.block_size, log=rt.log, log_interval=cfg.log_interval,
                        flops_per_token=model.num_flops_per_token(), device=rt.device, dtype=rt.dtype,
                        start_iter=start_iter, name="pretrain")

    def summary():
        best = min((h["val_loss"] for h in history), default=None)
        return {"val_loss": best, "perplexity": math.exp(best) if best is not None else None,
                "iters": cfg.max_iters, "seconds": seconds_before + progress.seconds, "history": history}

    def save(it):
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "model_config": dataclasses.asdict(model_config),
            "optimizer": optimizer.state_dict(), "iter": it, "history": history,
            "seconds": seconds_before + progress.seconds,
            "batch_generator": batch_generator.get_state(), "torch_rng": torch.get_rng_state(),
            "tokenizer": {"path": "tokenizer.json", "fingerprint": tokenizer.fingerprint}, "report": summary()})

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
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.step(it, loss=loss, lr=lr)
            if (it + 1) % cfg.eval_interval == 0 or it == cfg.max_iters - 1:
                history.append({"iter": it + 1, "train_loss": estimate_loss(model, tokens, cfg, rt, "train"),
                                "val_loss": estimate_loss(model, tokens, cfg, rt, "val")})
                rt.log(f"eval iter {it + 1}: train loss {history[-1]['train_loss']:.4f} | "
                       f"val loss {history[-1]['val_loss']:.4f}")
                save(it + 1)
            if stop.requested:
                save(it + 1)
                rt.log(f"interrupted: {ckpt_path} saved at iter {it + 1}; continue with --resume")
                sys.exit(130)
    return model, summary()


def load_base(cfg, rt, out_dir):
    """(base GPT, tokenizer, how it was made): from --base, --init_from, base.pt on --resume, or pretraining."""
    if cfg.init_from:
        folder = Path(cfg.init_from)
        try:
            base = GPT.from_pretrained(folder)
        except (OSError, ValueError, ImportError) as error:
            raise UserError(f"--init_from {folder}: {error}") from None
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            tokenizer = BPETokenizer.from_hf(folder / "vocab.json", folder / "merges.txt")
        else:
            tokenizer = BPETokenizer.from_tiktoken("gpt2")
        rt.log(f"base model: {folder} (Hugging Face GPT-2, {base.num_parameters() / 1e6:.2f}M parameters)")
        return base.to(rt.device), tokenizer, {"source": str(folder)}
    ckpt_path = Path(cfg.base) if cfg.base else out_dir / "base.pt"
    if cfg.base or cfg.stage == "finetune" or (cfg.resume and ckpt_path.exists()):
        ckpt = load_checkpoint(ckpt_path, map_location=rt.device)
        if "model" not in ckpt or "model_config" not in ckpt:
            raise UserError(f"{ckpt_path} is not a GPT checkpoint (no 'model' / 'model_config')")
        if not cfg.base and ckpt.get("iter", 0) < cfg.max_iters:
            tokenizer = get_tokenizer(cfg, rt, out_dir)                 # an unfinished pretraining run
            base, summary = pretrain(cfg, rt, tokenizer, out_dir)
            return base, tokenizer, {"source": "pretrained here", "pretrain": summary}
        tokenizer_path = ckpt_path.parent / ckpt.get("tokenizer", {}).get("path", "tokenizer.json")
        try:
            tokenizer = BPETokenizer.load(tokenizer_path)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load the tokenizer of {ckpt_path} ({tokenizer_path}): {error}") from None
        if ckpt.get("tokenizer", {}).get("fingerprint") not in (None, tokenizer.fingerprint):
            raise UserError(f"{ckpt_path} was trained with another tokenizer than {tokenizer_path}")
        try:
            base = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": 0.0}))
        except (TypeError, ValueError) as error:
            raise UserError(f"{ckpt_path}: bad model_config ({error})") from None
        load_model_state(base, ckpt["model"], ckpt_path)
        rt.log(f"base model: {ckpt_path} ({base.num_parameters() / 1e6:.2f}M parameters)")
        return base.to(rt.device), tokenizer, {"source": str(ckpt_path), "pretrain": ckpt.get("report")}
    tokenizer = get_tokenizer(cfg, rt, out_dir)
    base, summary = pretrain(cfg, rt, tokenizer, out_dir)
    return base, tokenizer, {"source": "pretrained here", "pretrain": summary}


# ---------------------------------------------------------------------------------------- 4. tasks
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def format_prompt(example):
    """The instruction template (Alpaca style): the model learns to answer after "### Response:"."""
    input_block = f"### Input:\n{example['input']}\n\n" if example.get("input") else ""
    return PROMPT_TEMPLATE.format(instruction=example["instruction"], input_block=input_block)


def instruction_example(tokenizer, example, max_len):
    """(input ids, label ids), labels -100 on the prompt: L = -sum over response tokens of log p(x_t | x_<t)."""
    prompt = tokenizer.encode(format_prompt(example))[-(max_len // 2):]       # a long prompt keeps its end
    response = tokenizer.encode(example["response"]) + [tokenizer.special_tokens[EOT]]
    sequence = (prompt + response)[:max_len + 1]
    labels = ([-100] * len(prompt) + response)[:max_len + 1]
    return sequence[:-1], labels[1:]                   # labels[t] is the token after sequence[t]


def load_tasks(cfg, tokenizer):
    """{task: {"kind", "labels", "examples": {split: raw}, "items": {split: [(ids, target)]}}}."""
    tasks = {}
    for name in [t for t in cfg.tasks.split(",") if t]:
        kind = TASK_KINDS[name]
        splits = {split: data.load_task(name, split, num_labels=cfg.num_labels) for split in data.SPLITS}
        rng = random.Random(cfg.seed)                    # the task files are sorted by name: sample, don't cut
        for split, cap in (("train", cfg.max_ft_examples), ("val", cfg.max_eval_examples), ("test", cfg.max_eval_examples)):
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


@torch.no_grad()
def evaluate(kind, model, items, cfg, rt, pad_id, num_labels=0):
    """Instruction: mean response-token loss (lower is better). Classification: accuracy and macro-F1."""
    model.eval()
    total_loss, total_tokens, predictions = 0.0, 0, {}
    for indices in data.batch_indices([len(ids) for ids, _ in items], cfg.ft_batch_size * 2, shuffle=False, bucket=True):
        batch = collate(kind, [items[i] for i in indices], pad_id, rt.device)
        with rt.autocast():
            if kind == "instruction":
                logits, _ = model(batch["input_ids"])
                total_loss += F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                              ignore_index=-100, reduction="sum").item()
                total_tokens += (batch["labels"] != -100).sum().item()
            else:
                logits, _ = model(batch["input_ids"], batch["attention_mask"])
                predictions.update(zip(indices, logits.argmax(-1).tolist()))
    model.train()
    if kind == "instruction":
        loss = total_loss / max(1, total_tokens)
        return {"response_loss": loss, "perplexity": math.exp(min(loss, 50))}
    predicted, targets = [predictions[i] for i in range(len(items))], [label for _, label in items]
    f1s = []
    for c in range(num_labels):    # macro-F1: every class counts as much, however rare
        tp = sum(p == c and t == c for p, t in zip(predicted, targets))
        wrong = sum((p == c) != (t == c) for p, t in zip(predicted, targets))
        f1s.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return {"accuracy": sum(p == t for p, t in zip(predicted, targets)) / max(1, len(targets)),
            "macro_f1": sum(f1s) / max(1, num_labels)}


# -------------------------------------------------------------------------------------- 5. methods
METHOD_NAMES = {"full": "full finetuning", "prefix": "prefix tuning", "prompt": "prompt tuning",
                "adapter": "adapters (Houlsby)", "ia3": "(IA)^3", "head": "frozen base + head"}


def method_name(kind, method, options):
    if method in ("lora", "dora"):
        return f"{'LoRA' if method == 'lora' else 'DoRA'} r={options['r']}"
    if method == "head" and kind == "instruction":
        return "frozen base (no training)"
    return METHOD_NAMES[method]


def build_model(kind, base_state, base_config, method, options, cfg, num_labels):
    """A fresh copy of the base with `method` applied (and a head for classification); returns
    (model to train, the method's module, options as applied, learning rate)."""
    gpt = GPT(base_config)
    gpt.load_state_dict(base_state)
    lr = {"full": cfg.lr_full, "lora": cfg.lr_lora, "dora": cfg.lr_lora, "prefix": cfg.lr_prefix,
          "prompt": cfg.lr_prompt, "adapter": cfg.lr_adapter, "ia3": cfg.lr_ia3, "head": cfg.lr_head}[method]
    options = dict(options)
    if method in ("lora", "dora"):
        options.update(alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    elif method == "prefix":
        options.update(num_tokens=cfg.prefix_tokens, hidden=cfg.prefix_hidden)
    elif method == "prompt":
        options.update(num_tokens=cfg.prompt_tokens, init=cfg.prompt_init, seed=cfg.seed)
    elif method == "adapter":
        options.update(bottleneck=cfg.adapter_size)
    backbone = peft.apply_method(gpt, method, **options)
    model = backbone if kind == "instruction" else SequenceClassifier(backbone, num_labels, cfg.pooling)
    return model, backbone, options, lr


def activation_bytes(model, loss_fn):
    """Bytes of the tensors autograd keeps for backward during loss_fn() (weights left out: they are
    counted as parameters), via saved_tensors_hooks; each storage counted once."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

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


def finetune(kind, model, lr, train_items, val_items, cfg, rt, pad_id, name, num_labels, stop):
    """ft_iters AdamW steps on the trainable parameters (warmup + cosine), evaluating on val every
    ft_eval_interval steps; the best trainable weights are kept in memory (they are small) and loaded
    back at the end; `patience` evaluations without improvement stop early.
    Returns (best val metrics, median seconds per step, steps done)."""
    metric = "response_loss" if kind == "instruction" else "accuracy"
    better = (lambda a, b: a < b) if kind == "instruction" else (lambda a, b: a > b)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # A classifier's new head learns at lr_head whatever the method (it starts from scratch in every
    # row); the method's own parameters at the method's rate. No weight decay: short runs.
    head = {id(p) for p in model.head.parameters()} if kind == "classification" else set()
    groups = [{"params": [p for p in trainable if id(p) not in head], "peak_lr": lr},
              {"params": [p for p in trainable if id(p) in head], "peak_lr": cfg.lr_head}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    train_model = rt.maybe_compile(model)
    warmup = max(1, cfg.ft_iters // 10)
    lengths = [len(ids) for ids, _ in train_items]
    epoch, order = 0, []
    best, best_metrics, best_state, bad_evals = None, None, None, 0
    step_seconds = []
    progress = Progress(cfg.ft_iters, cfg.ft_batch_size * cfg.ft_max_len, log=rt.log,
                        log_interval=cfg.ft_eval_interval, name=f"  {name}")
    model.train()
    for it in range(cfg.ft_iters):
        if not order:   # a new epoch: length-bucketed batches, the same order for every method
            order = data.batch_indices(lengths, cfg.ft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True)
            epoch += 1
        batch = collate(kind, [train_items[i] for i in order.pop()], pad_id, rt.device)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, group["peak_lr"], group["peak_lr"] / 10, warmup, cfg.ft_iters)
        lr_now = optimizer.param_groups[0]["lr"]
        rt.synchronize()
        start = time.perf_counter()
        with rt.autocast():
            loss = model_loss(kind, train_model, batch)
        rt.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        rt.synchronize()
        step_seconds.append(time.perf_counter() - start)
        progress.step(it, loss=loss, lr=lr_now, tokens=batch["attention_mask"].numel())
        if (it + 1) % cfg.ft_eval_interval == 0 or it == cfg.ft_iters - 1:
            metrics = evaluate(kind, model, val_items, cfg, rt, pad_id, num_labels)
            improved = best is None or better(metrics[metric], best)
            rt.log(f"  {name} eval at step {it + 1}: val {metric} {metrics[metric]:.4f}{' (best)' if improved else ''}")
            if improved:
                best, best_metrics, bad_evals = metrics[metric], metrics, 0
                best_state = peft.trainable_state_dict(model)
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    rt.log(f"  {name}: early stop at step {it + 1}")
                    break
        if stop.requested:
            raise KeyboardInterrupt
    peft.load_trainable_state_dict(model, best_state)
    # the median step: robust to the few steps a shared machine stalls (the mean is not)
    return best_metrics, sorted(step_seconds)[len(step_seconds) // 2], len(step_seconds)


def save_adapter(path, model, backbone, method, options):
    """The trainable tensors alone (+ how to rebuild the model around them); returns the file size."""
    if isinstance(backbone, peft.PrefixTuning):
        backbone.fold()                       # the prefix alone: the reparameterisation MLP is not needed
        options = {**options, "hidden": 0}
    save_checkpoint(path, {"method": method, "options": options, "state_dict": peft.trainable_state_dict(model)})
    return path.stat().st_size


@torch.no_grad()
def answers(gpt, tokenizer, examples, rt, max_new_tokens=40):
    """Greedy answers to instructions (chapter 05's generate with the KV cache)."""
    eot = tokenizer.special_tokens[EOT]
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


# --------------------------------------------------------------------------------------- the recipe
TABLE_COLUMNS = ["task", "method", "trainable", "% of base", "metric", "test", "steps", "ms/step", "peak MB",
                 "file KB"]


def table_rows(finetune):
    """One row per (task, method): the numbers of report.json's "table"."""
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


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rt = setup(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, seed=cfg.seed)
    if rt.ddp:
        raise UserError("07_peft runs in one process (each method is small); start it without torchrun")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_start = time.perf_counter()
    rt.log(f"07_peft | device {rt.device} ({str(rt.dtype).replace('torch.', '')}) | out_dir {out_dir} | "
           f"{torch.get_num_threads()} threads")
    report = {"chapter": "07_peft", "device": str(rt.device), "dtype": str(rt.dtype).replace("torch.", "")}

    # 3. base model -------------------------------------------------------------------------------
    base, tokenizer, base_info = load_base(cfg, rt, out_dir)
    base_params = peft.trainable_parameters(base)["total"]
    report["base"] = {"source": base_info["source"], "parameters": base_params,
                      "n_layer": base.config.n_layer, "n_embd": base.config.n_embd, "block_size": base.config.block_size}
    if base_info.get("pretrain"):
        report["pretrain"] = base_info["pretrain"]
    if cfg.stage == "pretrain":
        return finish(report, cfg, rt, out_dir, run_start)
    longest_virtual = max(cfg.prefix_tokens, cfg.prompt_tokens)
    if cfg.ft_max_len + longest_virtual > base.config.block_size:
        raise UserError(f"--ft_max_len {cfg.ft_max_len} + {longest_virtual} prefix/prompt tokens exceed the base's "
                        f"block_size {base.config.block_size}: lower --ft_max_len")

    # 4-6. every method on every task ---------------------------------------------------------------
    base_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}  # every method starts here
    base_config = dataclasses.replace(base.config, dropout=0.0)
    del base                                          # off the device: only the model in training is there
    pad_id = tokenizer.special_tokens.get(EOT, 0)
    methods = parse_methods(cfg.methods)
    tasks = load_tasks(cfg, tokenizer)
    results_path = out_dir / "results.json"
    signature = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "stage", "device", "compile")}
    signature["base_parameters"] = base_params
    results = {}
    if cfg.resume and results_path.exists():
        saved = load_json(results_path)
        if saved.get("signature") == signature:
            results = saved["results"]
            rt.log(f"resumed: {sum(len(r['methods']) for r in results.values())} finished runs from {results_path}")
    report["finetune"] = {}
    (out_dir / "adapters").mkdir(exist_ok=True)
    with StopFlag() as stop:
        for task, spec in tasks.items():
            kind, items, labels = spec["kind"], spec["items"], spec["labels"]
            num_labels = len(labels or [])
            metric = "response_loss" if kind == "instruction" else "accuracy"
            rt.log(f"\n{task} ({kind}, test {metric}): {len(items['train'])} train / {len(items['val'])} val / "
                   f"{len(items['test'])} test examples")
            done = results.setdefault(task, {"methods": {}})        # finished runs, saved after each method
            block = {"metric": metric, "methods": done["methods"]}
            if kind == "classification":
                block["baseline"] = data.majority_baseline(spec["examples"]["train"], spec["examples"]["test"])
            longest = sorted(range(len(items["train"])), key=lambda i: -len(items["train"][i][0]))[:cfg.ft_batch_size]
            probe = collate(kind, [items["train"][i] for i in longest], pad_id, rt.device)
            for key, method, options in methods:
                if key in block["methods"]:
                    continue
                name = method_name(kind, method, options)
                torch.manual_seed(cfg.seed)                     # the same head initialisation for every method
                model, backbone, options, lr = build_model(kind, base_state, base_config, method, options, cfg, num_labels)
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
                    started = time.perf_counter()
                    if rt.device_type == "cuda":
                        torch.cuda.reset_peak_memory_stats(rt.device)
                    else:
                        row["peak_memory_mb"] = training_memory_mb(kind, model, probe, rt)
                    try:
                        row["val"], row["seconds_per_step"], row["steps"] = finetune(
                            kind, model, lr, items["train"], items["val"], cfg, rt, pad_id, name, num_labels, stop)
                    except KeyboardInterrupt:
                        rt.log(f"interrupted during {task} | {name}: the finished runs are in {results_path}; "
                               f"continue with --resume")
                        sys.exit(130)
                    row["seconds"] = time.perf_counter() - started
                    if rt.device_type == "cuda":
                        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(rt.device) / 1e6
                    row["file_bytes"] = save_adapter(out_dir / "adapters" / f"{task}_{key}.pt", model, backbone,
                                                     method, options)
                row["test"] = evaluate(kind, model, items["test"], cfg, rt, pad_id, num_labels)
                rt.log(f"{task} | {name}: test " + " ".join(f"{k} {v:.4f}" for k, v in row["test"].items()))
                if kind == "instruction" and method == "lora" and "examples" not in done:
                    done["examples"] = merged_lora_answers(model, tokenizer, spec["examples"]["test"][:3], items, rt)
                block["methods"][key] = row
                atomic_write_json(results_path, {"signature": signature, "results": results})
            if "examples" in done:
                block["examples"] = done["examples"]
            report["finetune"][task] = block
    report["seconds"] = time.perf_counter() - run_start
    return finish(report, cfg, rt, out_dir, run_start)


def merged_lora_answers(model, tokenizer, examples, items, rt):
    """Merge the LoRA update into the weights (W0 <- W0 + (alpha/r) B A), check that the merged model
    gives the unmerged outputs, answer a few test questions with it, and unmerge."""
    batch = collate("instruction", items["test"][:4], tokenizer.special_tokens.get(EOT, 0), rt.device)
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


def load_json(path):
    import json
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def finish(report, cfg, rt, out_dir, run_start):
    report["seconds"] = time.perf_counter() - run_start
    print_report({k: v for k, v in report.items() if k != "finetune"}, title="07_peft report", log=rt.log)
    if report.get("finetune"):
        rows = table_rows(report["finetune"])
        report["table"] = rows
        rt.log(format_table([printable(row) for row in rows], TABLE_COLUMNS))
        for task, block in report["finetune"].items():
            if "baseline" in block:
                rt.log(f"{task}: majority-class baseline accuracy {block['baseline']:.4f}")
        rt.log("peak MB: " + ("CUDA allocator peak" if rt.device_type == "cuda" else
                              "weights + gradients + AdamW state + activations saved for backward (CPU estimate)")
               + "; file KB: the trainable tensors alone, as saved in out_dir/adapters/")
    write_report(out_dir / "report.json", report)
    rt.log(f"report written to {out_dir / 'report.json'} ({format_seconds(report['seconds'])} in all)")
    return report


if __name__ == "__main__":
    run_main(main)

"""Chapter 01: PyTorch from the ground up, by training a neural language model (Bengio et al., 2003).

Read top to bottom; every numbered section prints what it shows:

 1. tensors and devices        a tensor is an n-dimensional array that lives on a device
 2. autograd                   backward() computes gradients; we check one against finite differences
 3. tokenizer and data         BPE (common.tokenizer) and random windows of a token stream (common.data)
 4. nn.Module                  model.py's NeuralLM: embeddings -> tanh hidden layer -> softmax
 5. optimizer loop             AdamW, warmup + cosine learning rate, periodic eval, atomic checkpoints
    (+ torch.compile and mixed precision through common.runtime: eager vs compiled step time)
 6. finetuning                 a different domain: before, after, and a model trained from scratch
 7. optimizers compared        SGD, momentum, RMSprop, Adam, AdamW, each at its best learning rate
 8. report and samples

    python 01_hello_pytorch/train.py                  # the default run, under a minute on 2 CPU cores
    python 01_hello_pytorch/train.py --preset tiny    # seconds: a smoke test
    python 01_hello_pytorch/train.py --compile        # also times torch.compile against eager
"""

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # so `common` imports from any cwd

from common import data, load_module                                      # noqa: E402
from common.checkpoint import claim_out_dir, load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main               # noqa: E402
from common.report import Progress, format_table, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup                                # noqa: E402
from common.tokenizer import BPETokenizer                                 # noqa: E402

HERE = Path(__file__).resolve().parent
model_lib = load_module(HERE / "model.py")
NeuralLM, numerical_gradient = model_lib.NeuralLM, model_lib.numerical_gradient

STAGES = ("all", "pretrain", "finetune", "optimizers")
CHAPTER = "01_hello_pytorch"
EOT = "<|endoftext|>"


@dataclass
class Config:
    # data
    data: str = "pydocs"            # pydocs (its docstrings) | shakespeare | wikitext-2 | tinystories | c4[:N] | file (.txt .txt.gz .jsonl .jsonl.gz) | folder
    task: str = "topics"            # finetuning domain: "topics" (pydoc_data's language reference pages), or a file or folder as for --data
    text_field: str = "text"        # the field of a .jsonl corpus's rows that holds the text (--data and --task)
    tokenizer_sample_mb: float = 100  # the BPE is trained on this many MB of --data, spread over the corpus (pydocs: all of it)
    rebuild_cache: bool = False     # encode the corpora again (after an edit their fingerprint cannot see)
    vocab_size: int = 1024          # BPE vocabulary: 256 bytes + merges + 1 special token
    # model
    context_size: int = 4           # k: the model predicts a token from the k tokens before it
    d_embed: int = 32               # size of each token embedding e(x)
    d_hidden: int = 128             # size of the tanh hidden layer
    direct: bool = False            # add the paper's direct connection from the embeddings to the output
    # pretraining
    batch_size: int = 32            # rows per batch
    block_size: int = 64            # positions per row; each one is a training example
    max_iters: int = 500            # optimizer steps of pretraining
    lr: float = 1e-2                # peak learning rate (AdamW), reached after warmup_iters
    min_lr: float = 1e-3            # the cosine schedule ends here
    warmup_iters: int = 50          # linear warmup from 0 to lr (pretraining and finetuning)
    weight_decay: float = 0.01      # AdamW decoupled weight decay on the weight matrices
    grad_clip: float = 1.0          # clip the gradient norm to this (0 = off)
    eval_interval: int = 250        # evaluate and checkpoint every this many iterations
    eval_iters: int = 10            # batches per evaluation
    log_interval: int = 50          # print a progress line every this many iterations
    # finetuning
    ft_iters: int = 150             # steps of finetuning, and of the from-scratch model on the same domain
    ft_batch_size: int = 32         # rows per finetuning batch (block_size positions each)
    ft_lr: float = 3e-3             # learning rate of both (constant after warmup_iters)
    # optimizer experiment
    optim_iters: int = 100          # steps per optimizer and learning rate
    optim_batch_size: int = 8       # rows per batch in the experiment
    optim_lr_factors: str = "0.3,1,3"  # each optimizer tries its tuned lr times each factor and keeps the best
    # compile / precision
    timing_iters: int = 10          # steps timed for the eager vs --compile comparison
    dtype: str = "auto"             # autocast dtype: auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16
    # sampling
    sample_tokens: int = 60         # tokens sampled per prompt at the end
    temperature: float = 0.8        # softmax temperature for sampling
    top_k: int = 40                 # sample among the k most likely tokens (0 = all)
    # run
    stage: str = "all"              # all | pretrain | finetune | optimizers
    device: str = "auto"            # auto | cpu | cuda | mps
    compile: bool = False           # torch.compile the model (and time eager vs compiled steps)
    seed: int = 1337                # random seed: same seed, same result
    out_dir: str = "out/01_hello_pytorch"  # checkpoint, tokenizer.json, run.json and report.json go here
    resume: bool = False            # continue the pretraining stopped in out_dir (its ckpt.pt) exactly where it stopped
    init_from: str = ""             # finetune this chapter's checkpoint (a ckpt.pt or its run folder) instead of pretraining


PRESETS = {
    "tiny": dict(vocab_size=300, d_embed=8, d_hidden=32, batch_size=8, block_size=16, max_iters=30,
                 eval_interval=15, eval_iters=2, log_interval=10, warmup_iters=5, ft_iters=10, ft_batch_size=8,
                 optim_iters=8, optim_batch_size=4, timing_iters=3, sample_tokens=10),
    "default": {},
    "gpu": dict(vocab_size=4096, d_embed=64, d_hidden=1024, batch_size=256, block_size=128, max_iters=3000,
                eval_interval=500, ft_iters=1000, ft_batch_size=256, optim_iters=500, optim_batch_size=64),
}

# What a checkpoint is: a run folder holds one run of these values (run.json), and a checkpoint that is
# resumed or finetuned brings its own values of them.
RUN_FIELDS = ("data", "vocab_size", "context_size", "d_embed", "d_hidden", "direct")

# A learning rate tuned for each optimizer by a wider sweep on the default config (see the README);
# the run itself retries each at optim_lr_factors times that value and keeps the best.
OPTIMIZERS = {
    "SGD": (lambda params, lr: torch.optim.SGD(params, lr=lr), 10.0),
    "SGD+momentum": (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9), 1.0),
    "RMSprop": (lambda params, lr: torch.optim.RMSprop(params, lr=lr), 1e-2),
    "Adam": (lambda params, lr: torch.optim.Adam(params, lr=lr), 1e-2),
    "AdamW": (lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01), 1e-2),
}


def lr_factors(cfg):
    """--optim_lr_factors "0.3,1,3" -> [0.3, 1.0, 3.0]."""
    try:
        factors = [float(f) for f in cfg.optim_lr_factors.split(",")]
    except ValueError:
        factors = []
    if not factors or not all(f > 0 for f in factors):
        raise UserError(f"--optim_lr_factors must be comma-separated positive numbers, got {cfg.optim_lr_factors!r}")
    return factors


def check_config(cfg):
    """Every bad value is one clear line (UserError) here, before anything slow runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown --stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    for name in ("context_size", "d_embed", "d_hidden", "batch_size", "max_iters", "eval_interval", "eval_iters",
                 "log_interval", "ft_iters", "ft_batch_size", "optim_iters", "optim_batch_size", "timing_iters"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.block_size < 2:
        raise UserError(f"--block_size must be at least 2 (an input and its next token), got {cfg.block_size}")
    for name in ("warmup_iters", "sample_tokens", "top_k"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    for name in ("lr", "ft_lr"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("min_lr", "weight_decay", "grad_clip", "temperature"):
        if not getattr(cfg, name) >= 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    if not cfg.tokenizer_sample_mb > 0:
        raise UserError(f"--tokenizer_sample_mb must be positive, got {cfg.tokenizer_sample_mb}")
    if cfg.vocab_size < 257:
        raise UserError(f"--vocab_size must be at least 257 (256 byte tokens + {EOT}), got {cfg.vocab_size}")
    lr_factors(cfg)
    if cfg.init_from and cfg.resume:
        raise UserError(f"--resume continues the pretraining in --out_dir and --init_from {cfg.init_from} "
                        f"skips it: give one of them")
    if cfg.init_from and cfg.stage in ("pretrain", "optimizers"):
        raise UserError(f"--init_from gives a model to finetune, and --stage {cfg.stage} would ignore it "
                        f"(use --stage all or finetune)")
    if cfg.resume and cfg.stage not in ("all", "pretrain"):
        raise UserError(f"--resume continues the pretraining, and --stage {cfg.stage} has none (use --stage all or pretrain)")


# same as 02_attention/train.py
def load_run(path, what):
    """(checkpoint path, checkpoint, tokenizer) of a run of this chapter: `path` is its ckpt.pt or the run
    folder holding it, with the tokenizer.json the run saved beside it. Anything missing, corrupt or
    mismatched is one clear line."""
    path = Path(path)
    ckpt_path = path / "ckpt.pt" if path.is_dir() or not path.suffix else path
    if not ckpt_path.is_file():
        raise UserError(f"no checkpoint at {ckpt_path} {what}")
    ckpt = load_checkpoint(ckpt_path)
    if not {"model", "config", "iter"} <= set(ckpt) or not set(RUN_FIELDS) <= set(ckpt["config"]):
        raise UserError(f"{ckpt_path} is not a checkpoint of {CHAPTER}")
    tokenizer_path = ckpt_path.parent / "tokenizer.json"
    try:
        tokenizer = BPETokenizer.load(tokenizer_path)
    except (OSError, ValueError) as error:
        raise UserError(f"{error} (the tokenizer {ckpt_path} was trained with)") from None
    saved = ckpt.get("tokenizer")
    if not isinstance(saved, dict) or saved.get("fingerprint") != tokenizer.fingerprint:
        raise UserError(f"{tokenizer_path} is not the tokenizer {ckpt_path} was trained with; pretrain again")
    return ckpt_path, ckpt, tokenizer


def encode_corpus(name, corpus, tokenizer, cfg, rt):
    """The corpus encoded once into train and val token files (common.data.TokenCache, in the cache folder),
    its documents joined by the end-of-text token."""
    tokens = data.TokenCache(corpus, tokenizer, runtime=rt, log=rt.log, rebuild=cfg.rebuild_cache)
    if tokens.num_tokens("val") <= cfg.block_size:
        raise UserError(f"{name}: {tokens.num_tokens('val')} validation tokens is too few for "
                        f"block_size={cfg.block_size}; give more text or a smaller --block_size")
    rt.log(f"  {name}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens")
    return tokens


def get_lr(it, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def evaluate(model, tokens, split, cfg, rt, batch_size=None):
    """Mean loss over cfg.eval_iters batches; the same batches every call (a fixed generator)."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = tokens.get_batch(split, batch_size or cfg.batch_size, cfg.block_size, rt.device, generator)
        with rt.autocast():
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def unigram_loss(tokens, vocab_size):
    """The baseline that ignores context: -mean log p(x) over the val tokens, where p(x) is each token's
    frequency in the train tokens (add-one smoothed). A language model must beat it to use its window."""
    counts = np.bincount(tokens.memmap("train"), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[tokens.memmap("val")].mean())


def train_steps(model, optimizer, tokens, iters, cfg, rt, lr_at, batch_size, seed=0, progress=None):
    """`iters` optimizer steps on random training windows; returns the list of training losses."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for it in range(iters):
        lr = lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = tokens.get_batch("train", batch_size, cfg.block_size, rt.device, generator)
        with rt.autocast():
            _, loss = model(x, y)
        rt.scaler.scale(loss).backward()
        # the optimizer step (same in every train.py)
        if cfg.grad_clip > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress.step(it, loss=losses[-1], lr=lr)
    return losses


def sparkline(values, low, high, width=40):
    """A loss curve as one line of block characters: [3, 2, 1] -> '█▄▁' (low..high maps to ▁..█)."""
    blocks = "▁▂▃▄▅▆▇█"
    step = max(1, math.ceil(len(values) / width))
    points = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    span = max(high - low, 1e-9)
    return "".join(blocks[min(len(blocks) - 1, max(0, int((p - low) / span * len(blocks))))] for p in points)


def make_model(cfg, vocab_size):
    return NeuralLM(vocab_size, cfg.context_size, cfg.d_embed, cfg.d_hidden, cfg.direct)


def main(argv=None):
    cfg = parse_config(Config, presets=PRESETS, argv=argv, description=__doc__.split("\n\n")[0])
    check_config(cfg)
    rt = setup(cfg.device, cfg.dtype, cfg.compile, cfg.seed)
    log = rt.log
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    # The run to continue (--resume) or to finetune (--stage finetune, --init_from) is read first, so
    # that a missing or bad file fails here, before any slow work.
    source = None
    if cfg.resume:
        source = load_run(out_dir, "to resume: run without --resume first")
    elif cfg.init_from or cfg.stage == "finetune":
        source = load_run(cfg.init_from or out_dir, "to finetune: pretrain first (--stage pretrain), or give --init_from")
    if source is not None:
        source_path, source_ckpt, tokenizer = source
        saved = source_ckpt["config"]
        if cfg.resume:
            differing = [f for f in RUN_FIELDS if saved[f] != getattr(cfg, f)]
            if differing:
                raise UserError(f"{source_path} was saved with {differing[0]}={saved[differing[0]]!r}, this run has "
                                f"{getattr(cfg, differing[0])!r}: use the same flags or another --out_dir")
            if source_ckpt["iter"] > cfg.max_iters:
                raise UserError(f"{source_path} is at iteration {source_ckpt['iter']}, past --max_iters {cfg.max_iters}")
        else:                                          # the model, its tokenizer and its corpus come from the run
            cfg = dataclasses.replace(cfg, **{f: saved[f] for f in RUN_FIELDS})
    pretrains = cfg.stage in ("all", "pretrain") and not cfg.init_from
    # The corpora are opened here too (lazily: nothing is read in full), so that a missing, empty or binary
    # file fails before any work. pydocs is pretrained on its docstrings only: its other part, the language
    # reference topics, is the default finetuning domain, which the pretrained model must never have seen.
    pretrain_name = "pydocs docstrings" if cfg.data == "pydocs" else cfg.data
    pretrain_corpus = finetune_corpus = None
    if cfg.stage != "finetune":                                    # pretraining and the optimizer experiment
        pretrain_corpus = (data.Corpus(data.pydocs_documents("docstrings")) if cfg.data == "pydocs"
                           else data.Corpus(cfg.data, cfg.text_field, log=log, runtime=rt))
    if cfg.stage in ("all", "finetune"):
        finetune_name = "pydoc topics" if cfg.task == "topics" else Path(cfg.task).name
        finetune_corpus = (data.Corpus(data.pydocs_documents("topics")) if cfg.task == "topics"
                           else data.Corpus(cfg.task, cfg.text_field, log=log, runtime=rt))
    report = {"chapter": CHAPTER, "device": str(rt.device), "dtype": str(rt.dtype).replace("torch.", "")}
    started = time.perf_counter()

    # ------------------------------------------------------------------ 1. tensors and devices
    log("== 1. tensors and devices")
    x = torch.arange(6.0).view(2, 3)                               # a 2 x 3 float32 tensor on the CPU
    w = torch.ones(3, 1, device=rt.device)                         # created directly on the run's device
    log(f"x = {x.tolist()}  shape {tuple(x.shape)} dtype {x.dtype} device {x.device}; "
        f"x.to({rt.device.type}) @ ones(3, 1) = {(x.to(rt.device) @ w).flatten().tolist()}")

    # ------------------------------------------------------------------ 2. autograd, checked
    log("== 2. autograd: backward() against central finite differences (float64)")
    check_model = NeuralLM(vocab_size=11, context_size=3, d_embed=4, d_hidden=5).double()
    check_ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(cfg.seed))
    _, loss = check_model(check_ids, check_ids)
    loss.backward()                                                # fills .grad of every parameter
    worst = 0.0
    for name in ("embed.weight", "hidden.weight", "output.bias"):
        parameter = dict(check_model.named_parameters())[name]
        numeric = numerical_gradient(lambda: check_model(check_ids, check_ids)[1], parameter, eps=1e-6)
        error = (numeric - parameter.grad).abs().max().item()
        worst = max(worst, error)
        log(f"  d loss / d {name:<13} {tuple(parameter.shape)}: max |autograd - numeric| = {error:.2e}")
    report["gradcheck_max_error"] = worst

    # ------------------------------------------------------------------ 3. tokenizer and data
    log("== 3. tokenizer and data")
    if source is None:
        # trained once on a sample spread over the corpus (all of a small one), cached under the corpus's
        # fingerprint and the sample's size: a later run reads no text to find it
        tokenizer = BPETokenizer.load_or_train(lambda: pretrain_corpus.sample_texts(cfg.tokenizer_sample_mb * 1e6),
                                               cfg.vocab_size, special_tokens=(EOT,), runtime=rt, log=log,
                                               key=f"{pretrain_corpus.fingerprint}-{cfg.tokenizer_sample_mb:g}")
    pretrain_tokens = finetune_tokens = None
    if pretrain_corpus is not None:
        pretrain_tokens = encode_corpus(pretrain_name, pretrain_corpus, tokenizer, cfg, rt)
    if finetune_corpus is not None:
        finetune_tokens = encode_corpus(finetune_name, finetune_corpus, tokenizer, cfg, rt)
    sample_ids = tokenizer.encode("Return the")
    log(f"  {tokenizer.vocab_size}-token BPE: 'Return the' -> {sample_ids} -> {[tokenizer.decode([i]) for i in sample_ids]}")

    # ------------------------------------------------------------------ 4. the model
    log("== 4. nn.Module: the neural language model")
    model = make_model(cfg, tokenizer.vocab_size).to(rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    log(f"  {model}".replace("\n", "\n  "))
    log(f"  {n_params:,} parameters; an untrained model is near uniform: loss ~ ln({tokenizer.vocab_size}) "
        f"= {math.log(tokenizer.vocab_size):.2f}")

    decay = [p for p in model.parameters() if p.dim() >= 2]        # weight matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]      # biases: decaying them only hurts
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    # The batches are drawn from their own generator, whose state goes into every checkpoint, so that
    # --resume draws exactly the batches the stopped run would have drawn next.
    generator = torch.Generator().manual_seed(cfg.seed)
    start_iter, best_val, seconds_before = 0, float("inf"), 0.0
    if source is not None:
        load_model_state(model, source_ckpt["model"], source_path)
        log(f"  loaded {source_path} (iteration {source_ckpt['iter']}: "
            f"{', '.join(f'{f} {saved[f]}' for f in RUN_FIELDS)})")
    if cfg.resume:
        optimizer.load_state_dict(source_ckpt["optimizer"])
        generator.set_state(source_ckpt["rng"]["batches"])
        torch.set_rng_state(source_ckpt["rng"]["torch"])
        start_iter, best_val, seconds_before = source_ckpt["iter"], source_ckpt["best_val_loss"], source_ckpt["seconds"]
        log(f"  resuming the pretraining at iteration {start_iter}")
    # Everything is checked: from here on this run writes into out_dir, unless it holds another run.
    claim_out_dir(out_dir, dataclasses.asdict(cfg), RUN_FIELDS)

    def save(it, pretrain_report=None):
        tokenizer.save(out_dir / "tokenizer.json")
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "iter": it, "best_val_loss": best_val, "config": dataclasses.asdict(cfg),
                                    "rng": {"torch": torch.get_rng_state(), "batches": generator.get_state()},
                                    "seconds": seconds_before + progress.seconds, "report": pretrain_report,
                                    "tokenizer": {"path": "tokenizer.json", "fingerprint": tokenizer.fingerprint}})

    # ------------------------------------------------------------------ 5. the optimizer loop
    if pretrains:
        log("== 5. pretraining: AdamW, warmup + cosine schedule")
        # torch.compile traces the model into an optimized graph (fused kernels, C++/Triton code) the
        # first time it runs; that costs seconds up front and pays back on every later step.
        # Mixed precision (rt.autocast) runs matmuls in bf16 on a GPU; on a CPU it stays float32.
        timing_batch = pretrain_tokens.get_batch("train", cfg.batch_size, cfg.block_size, rt.device,
                                                 torch.Generator().manual_seed(cfg.seed))

        def ms_per_step(net):
            scratch_model = copy.deepcopy(model)
            net = net(scratch_model)
            scratch_optimizer = torch.optim.AdamW(scratch_model.parameters(), lr=cfg.lr)
            for i in range(cfg.timing_iters + 2):                  # 2 warm-up steps (compilation happens here)
                if i == 2:
                    rt.synchronize()
                    t0 = time.perf_counter()
                with rt.autocast():
                    _, timing_loss = net(*timing_batch)
                scratch_optimizer.zero_grad(set_to_none=True)
                timing_loss.backward()
                scratch_optimizer.step()
            rt.synchronize()
            return 1000 * (time.perf_counter() - t0) / cfg.timing_iters

        eager_ms = ms_per_step(lambda net: net)
        report["step_ms_eager"] = eager_ms
        compiled = rt.maybe_compile(model)
        if compiled is not model:
            compiled_ms = ms_per_step(lambda net: torch.compile(net))
            report["step_ms_compiled"] = compiled_ms
            log(f"  step time: eager {eager_ms:.1f} ms | compiled {compiled_ms:.1f} ms "
                f"({eager_ms / compiled_ms:.2f}x)")
        else:
            log(f"  step time: eager {eager_ms:.1f} ms (add --compile to compare with torch.compile)")

        progress = Progress(cfg.max_iters, cfg.batch_size * cfg.block_size, log=log, log_interval=cfg.log_interval,
                            flops_per_token=flops_per_token, device=rt.device, start_iter=start_iter)
        with StopFlag() as stop:      # Ctrl-C: finish this step, save, exit (a 2nd Ctrl-C: at once)
            for it in range(start_iter, cfg.max_iters):
                lr = get_lr(it, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = pretrain_tokens.get_batch("train", cfg.batch_size, cfg.block_size, rt.device, generator)
                with rt.autocast():
                    _, loss = compiled(x, y)
                rt.scaler.scale(loss).backward()                   # d loss / d every parameter, into .grad
                # the optimizer step (same in every train.py)
                if cfg.grad_clip > 0:
                    rt.scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                rt.scaler.step(optimizer)
                rt.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                progress.step(it, loss=loss, lr=lr)
                if (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.max_iters:
                    val_loss = evaluate(model, pretrain_tokens, "val", cfg, rt)
                    best_val = min(best_val, val_loss)
                    save(it + 1)
                    log(f"  eval at iter {it + 1}: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.1f}); "
                        f"saved {ckpt_path}")
                if stop.requested:
                    save(it + 1)
                    log(f"interrupted: saved {ckpt_path} at iter {it + 1}; continue with --resume")
                    sys.exit(130)
        val_loss = evaluate(model, pretrain_tokens, "val", cfg, rt)
        report["pretrain"] = {"corpus": pretrain_name, "iters": cfg.max_iters, "val_loss": val_loss,
                              "val_perplexity": math.exp(val_loss),
                              "tokens_per_second": progress.average_tokens_per_second,
                              "seconds": seconds_before + progress.seconds}
        save(cfg.max_iters, report["pretrain"])
    elif cfg.init_from:
        log(f"== 5. pretraining: skipped, the model is {source_path}'s")
        report["pretrain"] = {"init_from": str(source_path), **(source_ckpt.get("report") or {"iters": source_ckpt["iter"]})}

    # ------------------------------------------------------------------ 6. finetuning on another domain
    if cfg.stage in ("all", "finetune"):
        log(f"== 6. finetuning on {finetune_name}: the pretrained model vs one trained from scratch")
        before = evaluate(model, finetune_tokens, "val", cfg, rt)
        log(f"  pretrained on {pretrain_name}, never saw {finetune_name}: val loss {before:.4f}")

        def constant_after_warmup(i):
            return cfg.ft_lr * min(1.0, (i + 1) / max(1, cfg.warmup_iters))

        results, t0 = {}, time.perf_counter()
        for name, start in (("pretrained", model), ("scratch", None)):
            torch.manual_seed(cfg.seed)
            net = copy.deepcopy(start) if start is not None else make_model(cfg, tokenizer.vocab_size).to(rt.device)
            net_optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.ft_lr, weight_decay=cfg.weight_decay)
            ft_progress = Progress(cfg.ft_iters, cfg.ft_batch_size * cfg.block_size, log=log,
                                   log_interval=cfg.log_interval, name=f"  {name}")
            train_steps(net, net_optimizer, finetune_tokens, cfg.ft_iters, cfg, rt, constant_after_warmup,
                        cfg.ft_batch_size, seed=cfg.seed + 2, progress=ft_progress)
            results[name] = evaluate(net, finetune_tokens, "val", cfg, rt)
            log(f"  {name}: val loss {results[name]:.4f} after {cfg.ft_iters} steps")
        baseline = unigram_loss(finetune_tokens, tokenizer.vocab_size)
        log(f"  baseline: a unigram model of the domain (no context) has val loss {baseline:.4f}")
        report["finetune"] = {finetune_name: {"metric": "val_loss", "before": before, **results, "baseline": baseline,
                                              "iters": cfg.ft_iters, "seconds": time.perf_counter() - t0}}

    # ------------------------------------------------------------------ 7. optimizers compared
    if cfg.stage in ("all", "optimizers"):
        log(f"== 7. optimizers: same model, same init, same batches, {cfg.optim_iters} steps each")
        torch.manual_seed(cfg.seed + 3)
        init = make_model(cfg, tokenizer.vocab_size).to(rt.device)   # one initialisation shared by all
        table, t0 = {}, time.perf_counter()
        for name, (make_optimizer, tuned_lr) in OPTIMIZERS.items():
            runs = []
            for factor in lr_factors(cfg):
                net = copy.deepcopy(init)
                net_optimizer = make_optimizer(net.parameters(), tuned_lr * factor)
                curve = train_steps(net, net_optimizer, pretrain_tokens, cfg.optim_iters, cfg, rt,
                                    lambda i, lr=tuned_lr * factor: lr, cfg.optim_batch_size, seed=cfg.seed + 4)
                val = evaluate(net, pretrain_tokens, "val", cfg, rt, batch_size=cfg.optim_batch_size)
                runs.append({"lr": tuned_lr * factor, "val_loss": val, "curve": curve})
                log(f"  {name:<13} lr {tuned_lr * factor:<8.3g} val loss {val:.4f}")
            best = min(runs, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else float("inf"))
            table[name] = {"lr": best["lr"], "final_train_loss": sum(best["curve"][-10:]) / len(best["curve"][-10:]),
                           "val_loss": best["val_loss"], "lrs_tried": [r["lr"] for r in runs],
                           "curve": [round(v, 4) for v in best["curve"]]}
        curves = [v for row in table.values() for v in row["curve"] if math.isfinite(v)]
        low, high = min(curves), max(curves)
        rows = [{"optimizer": name, "best lr": row["lr"], "val loss": row["val_loss"],
                 f"train loss {high:.1f} -> {low:.1f}": sparkline(row["curve"], low, high)}
                for name, row in table.items()]
        log(format_table(rows, list(rows[0])))
        report["optimizers"] = {"iters": cfg.optim_iters, "batch_size": cfg.optim_batch_size,
                                "seconds": time.perf_counter() - t0, **table}

    # ------------------------------------------------------------------ 8. report and samples
    samples = []
    if cfg.stage != "optimizers":                                  # only a pretrained model is worth sampling
        model.eval()
        generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
        for prompt in ("Return the", "The"):
            ids = torch.tensor([tokenizer.encode(prompt)], device=rt.device)
            out = model.generate(ids, cfg.sample_tokens, cfg.temperature, cfg.top_k or None, generator)
            samples.append(tokenizer.decode(out[0].tolist()))
        report["samples"] = samples
    report["seconds"] = time.perf_counter() - started
    # A stage run (--stage optimizers...) replaces its own part of report.json and keeps the rest.
    merged = write_report(out_dir / "report.json", report, log=log)
    print_report(merged, title=f"{CHAPTER} report", log=log)
    if isinstance(merged.get("optimizers"), dict):
        log("optimizers: " + "  ".join(f"{n} {r['val_loss']:.3f} (lr {r['lr']:.3g})"
                                       for n, r in merged["optimizers"].items() if isinstance(r, dict)))
    log(f"wrote {out_dir / 'report.json'}")
    if samples:
        log("\nsamples (pretrained model, temperature {}, top-k {}):".format(cfg.temperature, cfg.top_k))
    for sample in samples:
        log("  " + repr(sample))
    return merged


if __name__ == "__main__":
    run_main(main)

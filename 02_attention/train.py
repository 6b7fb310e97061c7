"""Chapter 02: attention, from the formula up, then a small attention language model put to work.

Read top to bottom; every numbered section prints what it shows:

 1. four implementations        loop, matrix, multi-head, F.scaled_dot_product_attention: the same numbers
 2. why 1/sqrt(d_k)             unscaled scores grow with d_k, the softmax saturates, its gradient vanishes
 3. time and memory             the explicit T x T matrix vs the fused kernel, over sequence lengths
 4. tokenizer and data          BPE (common.tokenizer) and random windows of the corpus (common.data)
 5. pretraining                 AttentionLM (model.py) learns p(x_t | x_<t) on the corpus
 6. finetuning: key-value recall  " a=3 b=7 c=1 ? b=" -> "7" with fresh random pairs every example:
                                the answer is only in the context. Pretrained vs from scratch, same budget
 7. an attention map            one head, one example, as a terminal heatmap
 8. report and samples

    python 02_attention/train.py                   # the default run, under 4 minutes on 2 CPU cores
    python 02_attention/train.py --preset tiny     # seconds: a smoke test
    python 02_attention/train.py --stage experiments   # sections 1-3 only
"""

import contextlib
import copy
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # so `common` imports from any cwd

from common import data, load_module                                      # noqa: E402
from common.checkpoint import claim_out_dir, load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main               # noqa: E402
from common.report import Progress, format_table, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup                                # noqa: E402
from common.tokenizer import BPETokenizer                                 # noqa: E402

HERE = Path(__file__).resolve().parent
attention = load_module(HERE / "model.py")

STAGES = ("all", "experiments", "pretrain", "finetune")
CHAPTER = "02_attention"
EOT = "<|endoftext|>"


@dataclass
class Config:
    # data
    data: str = "pydocs"            # corpus: pydocs | shakespeare | wikitext-2 | tinystories | c4[:N] | file (.txt .txt.gz .jsonl .jsonl.gz) | folder
    text_field: str = "text"        # the field of a .jsonl corpus's rows that holds the text
    tokenizer_sample_mb: float = 100  # the BPE is trained on this many MB, spread over the corpus (pydocs: all of it)
    rebuild_cache: bool = False     # encode the corpus again (after an edit its fingerprint cannot see)
    vocab_size: int = 1024          # BPE vocabulary: 256 bytes + merges + 1 special token
    # model
    block_size: int = 64            # context length T of pretraining (positions have learned embeddings)
    d_model: int = 128              # width of the residual stream
    n_head: int = 4                 # attention heads per layer (d_k = d_model / n_head)
    n_layer: int = 2                # attention layers
    dropout: float = 0.0            # dropout on embeddings and attention outputs
    attn_impl: str = "sdpa"         # how the model computes attention: loop | matrix | sdpa (same numbers)
    prev_tokens: int = 2            # embeddings of the w previous tokens added to each input (0 = attention alone)
    # pretraining
    batch_size: int = 32            # sequences per batch
    max_iters: int = 600            # optimizer steps of pretraining
    lr: float = 3e-3                # peak learning rate (AdamW), reached after warmup_iters
    min_lr: float = 3e-4            # the cosine schedule ends here
    warmup_iters: int = 50          # linear warmup from 0 to lr (pretraining and finetuning)
    weight_decay: float = 0.1       # AdamW decoupled weight decay on the weight matrices
    grad_clip: float = 1.0          # clip the gradient norm to this (0 = off)
    eval_interval: int = 200        # evaluate and checkpoint every this many iterations
    eval_iters: int = 10            # batches per evaluation
    log_interval: int = 50          # print a progress line every this many iterations
    # finetuning: key-value recall
    recall_pairs: int = 6           # key=value pairs per example (keys: distinct letters, values: digits)
    ft_iters: int = 300             # steps of finetuning, and of the from-scratch model on the same task
    ft_batch_size: int = 64         # examples per step
    ft_lr: float = 1e-3             # learning rate of both (constant after warmup_iters)
    recall_eval_examples: int = 1000  # held-out examples for the accuracy
    # experiments
    scale_d_ks: str = "4,16,64,256,1024"  # key sizes d_k in the 1/sqrt(d_k) experiment
    timing_lengths: str = "128,512,1024,2048"  # sequence lengths in the time/memory table
    timing_repeats: int = 3         # timed runs per cell (the best is kept)
    loop_max_len: int = 512         # the Python-loop implementation is timed up to this length only
    dtype: str = "auto"             # autocast dtype: auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16
    # sampling
    sample_tokens: int = 60         # tokens sampled per prompt at the end
    temperature: float = 0.8        # softmax temperature for sampling
    top_k: int = 40                 # sample among the k most likely tokens (0 = all)
    # run
    stage: str = "all"              # all | experiments | pretrain | finetune
    device: str = "auto"            # auto | cpu | cuda | mps
    compile: bool = False           # torch.compile the model for pretraining
    seed: int = 1337                # random seed: same seed, same result
    out_dir: str = "out/02_attention"  # checkpoint, tokenizer.json, run.json and report.json go here
    resume: bool = False            # continue the pretraining stopped in out_dir (its ckpt.pt) exactly where it stopped
    init_from: str = ""             # finetune this chapter's checkpoint (a ckpt.pt or its run folder) instead of pretraining


PRESETS = {
    "tiny": dict(vocab_size=300, block_size=32, d_model=32, n_head=2, batch_size=8, max_iters=30,
                 eval_interval=15, eval_iters=2, log_interval=10, warmup_iters=5, recall_pairs=3,
                 ft_iters=20, ft_batch_size=16, recall_eval_examples=100, scale_d_ks="4,64",
                 timing_lengths="32,64", timing_repeats=1, sample_tokens=10),
    "default": {},
    "gpu": dict(vocab_size=4096, block_size=256, d_model=256, n_head=8, batch_size=64, max_iters=3000,
                eval_interval=500, ft_iters=2000, timing_lengths="1024,4096,8192,16384",
                loop_max_len=1024),
}


# What a checkpoint is: a run folder holds one run of these values (run.json), and a checkpoint that is
# resumed or finetuned brings its own values of them.
RUN_FIELDS = ("data", "vocab_size", "block_size", "d_model", "n_head", "n_layer", "prev_tokens")


def int_list(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--{flag} must be comma-separated positive integers, got {text!r}")
    return values


def check_config(cfg):
    """Every bad value is one clear line (UserError) here, before anything slow runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown --stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    if cfg.attn_impl not in attention.ATTENTION_IMPLS:
        raise UserError(f"unknown --attn_impl {cfg.attn_impl!r} (valid: {', '.join(attention.ATTENTION_IMPLS)})")
    for name in ("block_size", "d_model", "n_head", "batch_size", "max_iters", "eval_interval", "eval_iters",
                 "log_interval", "ft_iters", "ft_batch_size", "recall_eval_examples", "timing_repeats"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("n_layer", "prev_tokens", "warmup_iters", "loop_max_len", "sample_tokens", "top_k"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"d_model={cfg.d_model} is not divisible by n_head={cfg.n_head}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    for name in ("lr", "ft_lr"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("min_lr", "weight_decay", "grad_clip", "temperature"):
        if not getattr(cfg, name) >= 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    if cfg.vocab_size < 257:
        raise UserError(f"--vocab_size must be at least 257 (256 byte tokens + {EOT}), got {cfg.vocab_size}")
    if not cfg.tokenizer_sample_mb > 0:
        raise UserError(f"--tokenizer_sample_mb must be positive, got {cfg.tokenizer_sample_mb}")
    if not 1 <= cfg.recall_pairs <= 26:
        raise UserError(f"--recall_pairs must be between 1 and 26 (keys are distinct letters), got {cfg.recall_pairs}")
    if 3 * cfg.recall_pairs + 3 > cfg.block_size:               # " b", "=", "7" a pair, then " ?", " b", "="
        raise UserError(f"a recall prompt of {cfg.recall_pairs} pairs is at least {3 * cfg.recall_pairs + 3} tokens, "
                        f"longer than block_size={cfg.block_size}: use fewer --recall_pairs or a larger --block_size")
    int_list(cfg.scale_d_ks, "scale_d_ks")
    int_list(cfg.timing_lengths, "timing_lengths")
    if cfg.init_from and cfg.resume:
        raise UserError(f"--resume continues the pretraining in --out_dir and --init_from {cfg.init_from} "
                        f"skips it: give one of them")
    if cfg.init_from and cfg.stage in ("pretrain", "experiments"):
        raise UserError(f"--init_from gives a model to finetune, and --stage {cfg.stage} would ignore it "
                        f"(use --stage all or finetune)")
    if cfg.resume and cfg.stage not in ("all", "pretrain"):
        raise UserError(f"--resume continues the pretraining, and --stage {cfg.stage} has none (use --stage all or pretrain)")


# same as 01_hello_pytorch/train.py
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


# ------------------------------------------------------------------------------------ 2. the scale
def scale_experiment(d_ks, seed, n_queries=256, n_keys=64):
    """Softmax statistics of q.k scores with and without 1/sqrt(d_k), for unit-variance q and k.

    For each d_k: the std of the scores, the mean largest attention weight (1/n_keys = uniform,
    1 = one-hot), and the mean |d loss / d score| for a random upstream gradient: the softmax
    Jacobian diag(a) - a a^T is ~0 once a is one-hot, so a saturated softmax passes no gradient back.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for d_k in d_ks:
        q = torch.randn(n_queries, d_k, generator=generator)
        k = torch.randn(n_keys, d_k, generator=generator)
        upstream = torch.randn(n_queries, n_keys, generator=generator)
        row = {"d_k": d_k}
        for name, divisor in (("raw", 1.0), ("scaled", math.sqrt(d_k))):
            scores = (q @ k.T / divisor).requires_grad_(True)           # (n_queries, n_keys)
            weights = torch.softmax(scores, dim=-1)
            (weights * upstream).sum().backward()
            row[f"score_std_{name}"] = scores.std().item()
            row[f"max_weight_{name}"] = weights.max(dim=-1).values.mean().item()
            row[f"grad_{name}"] = scores.grad.abs().mean().item()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ 3. time, memory
@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment: the profiler's C++ side prints start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory_mib(fn, rt):
    """Peak memory allocated while fn() runs, above what was allocated before, in MiB.

    CUDA keeps the counter itself. On a CPU we ask the profiler for every allocation and free, op by
    op, and replay them in time order (allocations counted when an op starts, frees when it ends, so
    an op's own scratch buffers are included).
    """
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if rt.device_type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    changes = []
    for event in prof.events():
        size = event.self_cpu_memory_usage
        if size > 0:
            changes.append((event.time_range.start, size))
        elif size < 0:
            changes.append((event.time_range.end, size))
    current = peak = 0
    for _, size in sorted(changes):
        current += size
        peak = max(peak, current)
    return peak / 2**20


def timing_table(lengths, cfg, rt, batch=1, n_head=4, d_k=32):
    """Forward time (ms, best of cfg.timing_repeats) and peak memory (MiB) of causal attention."""
    impls = {
        "loop": lambda q, k, v, mask: attention.attention_loop(q, k, v, mask),
        "matrix": lambda q, k, v, mask: attention.attention_matrix(q, k, v, mask),
        "sdpa, mask tensor": lambda q, k, v, mask: attention.attention_sdpa(q, k, v, mask),
        "sdpa, is_causal": lambda q, k, v, mask: attention.attention_sdpa(q, k, v, is_causal=True),
    }
    rows = []
    generator = torch.Generator().manual_seed(cfg.seed)
    for T in lengths:
        q, k, v = (torch.randn(batch, n_head, T, d_k, generator=generator).to(rt.device) for _ in range(3))
        mask = attention.causal_mask(T, rt.device)
        row = {"T": T, "T x T weights MiB": batch * n_head * T * T * 4 / 2**20}
        for name, impl in impls.items():
            if name == "loop" and T > cfg.loop_max_len:
                row[f"{name} ms"] = row[f"{name} MiB"] = None
                continue
            with torch.no_grad():
                impl(q, k, v, mask)                                   # warm-up
                best = float("inf")
                for _ in range(cfg.timing_repeats):
                    rt.synchronize()
                    t0 = time.perf_counter()
                    impl(q, k, v, mask)
                    rt.synchronize()
                    best = min(best, time.perf_counter() - t0)
                row[f"{name} ms"] = 1000 * best
                row[f"{name} MiB"] = peak_memory_mib(lambda: impl(q, k, v, mask)[0], rt)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ 5. pretraining
def make_model(cfg, vocab_size):
    return attention.AttentionLM(vocab_size, cfg.block_size, cfg.d_model, cfg.n_head, cfg.n_layer,
                                 cfg.dropout, cfg.attn_impl, cfg.prev_tokens)


def get_lr(it, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def evaluate(model, tokens, cfg, rt):
    """Mean validation loss over cfg.eval_iters batches; the same batches every call."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = tokens.get_batch("val", cfg.batch_size, cfg.block_size, rt.device, generator)
        with rt.autocast():
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------ 6. the task
class KeyValueRecall:
    """In-context retrieval: " a=3 b=7 c=1 ? b=" -> "7".

    Every example draws fresh keys (distinct letters) and values (digits), so nothing about the answer
    can be memorised in the weights: the model has to find " b" among the pairs in its context and
    copy the value after it. Keys are letters whose " x" is one token of the tokenizer and values
    are single digits, so every pair is exactly three tokens: " x", "=", "d".
    """

    def __init__(self, tokenizer, n_pairs):
        self.tokenizer = tokenizer
        self.keys = [c for c in "abcdefghijklmnopqrstuvwxyz" if len(tokenizer.encode(" " + c)) == 1]
        if n_pairs < 1 or n_pairs > len(self.keys):
            raise UserError(f"--recall_pairs must be between 1 and {len(self.keys)} "
                            f"(the letters that are single tokens), got {n_pairs}")
        self.n_pairs = n_pairs
        self.values = [str(d) for d in range(10)]
        self.value_ids = [tokenizer.encode(d)[0] for d in self.values]

    def example(self, rng):
        """(prompt text, answer text), e.g. (" k=4 c=0 x=4 ? c=", "0")."""
        keys = rng.sample(self.keys, self.n_pairs)
        values = [rng.choice(self.values) for _ in keys]
        asked = rng.randrange(self.n_pairs)
        prompt = "".join(f" {k}={v}" for k, v in zip(keys, values)) + f" ? {keys[asked]}="
        return prompt, values[asked]

    def batch(self, rng, batch_size, device):
        """input_ids (B, T) of prompts; labels (B, T): -100 everywhere but the last position = the answer."""
        prompts, answers = zip(*(self.example(rng) for _ in range(batch_size)))
        input_ids = torch.tensor([self.tokenizer.encode(p) for p in prompts])   # all the same length
        labels = torch.full_like(input_ids, -100)
        labels[:, -1] = torch.tensor([self.tokenizer.encode(a)[0] for a in answers])
        return input_ids.to(device), labels.to(device)


@torch.no_grad()
def recall_accuracy(model, task, examples, seed, rt, batch_size=250):
    """Fraction of held-out examples whose most likely next token is the right value."""
    model.eval()
    rng = random.Random(seed)
    correct = 0
    for start in range(0, examples, batch_size):
        input_ids, labels = task.batch(rng, min(batch_size, examples - start), rt.device)
        with rt.autocast():
            logits, _ = model(input_ids)
        correct += (logits[:, -1].argmax(-1) == labels[:, -1]).sum().item()
    model.train()
    return correct / examples


def finetune(model, task, cfg, rt, name, eval_seed):
    """cfg.ft_iters steps of key-value recall, training `model` in place; returns (accuracy before,
    accuracy after, learning curve). The loss is on the answer token only (labels -100 elsewhere)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.ft_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 2)                               # the same examples for every model
    before = recall_accuracy(model, task, cfg.recall_eval_examples, eval_seed, rt)
    every = max(1, cfg.ft_iters // 10)                              # ten accuracy checks per run
    prompt_tokens = task.batch(random.Random(0), 1, "cpu")[0].size(1)
    progress = Progress(cfg.ft_iters, cfg.ft_batch_size * prompt_tokens, log=rt.log, log_interval=every,
                        name=f"  {name}")
    curve = []
    for it in range(cfg.ft_iters):
        lr = cfg.ft_lr * min(1.0, (it + 1) / max(1, cfg.warmup_iters))
        for group in optimizer.param_groups:
            group["lr"] = lr
        input_ids, labels = task.batch(rng, cfg.ft_batch_size, rt.device)
        with rt.autocast():
            _, loss = model(input_ids, labels)
        rt.scaler.scale(loss).backward()
        # the optimizer step (same in every train.py)
        if cfg.grad_clip > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if (it + 1) % every == 0 or it + 1 == cfg.ft_iters:
            curve.append(round(recall_accuracy(model, task, 200, eval_seed + 1, rt), 3))
            progress.step(it, loss=loss, lr=lr, accuracy=curve[-1])
        else:
            progress.step(it)
    return before, recall_accuracy(model, task, cfg.recall_eval_examples, eval_seed, rt), curve


# ------------------------------------------------------------------------------------ 7. the heatmap
def heatmap(weights, labels, shades=" ░▒▓█"):
    """A (T, T) attention matrix as text: one row per query, one 2-character cell per key.

    Darker = more weight (scaled to the row's largest weight so every row is readable); '·' marks
    keys the causal mask hides.
    """
    T = weights.size(0)
    width = max(len(label) for label in labels)
    lines = [" " * (width + 1) + "".join(label[:2].rjust(2) for label in labels)]
    for i in range(T):
        row = weights[i] / weights[i, : i + 1].max().clamp_min(1e-9)
        cells = []
        for j in range(T):
            if j > i:
                cells.append(" ·")
            else:
                cells.append(shades[min(len(shades) - 1, int(row[j].item() * (len(shades) - 1) + 0.5))] * 2)
        lines.append(labels[i].rjust(width) + " " + "".join(cells))
    return "\n".join(lines)


def show_token(tokenizer, token_id):
    """A token as a short printable label: ' b' -> '_b', '\\n' -> '\\n'."""
    return tokenizer.decode([token_id]).replace(" ", "_").replace("\n", "\\n") or "?"


def main(argv=None):
    cfg = parse_config(Config, presets=PRESETS, argv=argv, description=__doc__.split("\n\n")[0])
    check_config(cfg)
    d_ks = int_list(cfg.scale_d_ks, "scale_d_ks")
    lengths = int_list(cfg.timing_lengths, "timing_lengths")
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
            check_config(cfg)                          # its block_size must hold this run's recall prompts
    pretrains = cfg.stage in ("all", "pretrain") and not cfg.init_from
    # The corpus is opened before the experiments (lazily: nothing is read in full), so that a missing, empty
    # or binary file fails before them too.
    corpus = data.Corpus(cfg.data, cfg.text_field, log=log, runtime=rt) if pretrains else None
    report = {"chapter": CHAPTER, "device": str(rt.device), "dtype": str(rt.dtype).replace("torch.", "")}
    started = time.perf_counter()

    if cfg.stage in ("all", "experiments"):
        # -------------------------------------------------------------- 1. four implementations agree
        log("== 1. four implementations of attention, one answer")
        torch.manual_seed(cfg.seed)
        B, T, d_model, n_head = 2, 9, 32, 4
        x = torch.randn(B, T, d_model, device=rt.device)
        pad = torch.ones(B, T, dtype=torch.long, device=rt.device)
        pad[1, 6:] = 0                                               # the second sequence ends with 3 pads
        mask = attention.padding_mask(pad)
        mha = attention.MultiHeadAttention(d_model, n_head).to(rt.device)
        reference = torch.nn.MultiheadAttention(d_model, n_head, batch_first=True).to(rt.device)
        with torch.no_grad():                                        # the same W^Q, W^K, W^V, W^O in both
            reference.in_proj_weight.copy_(torch.cat([mha.W_q.weight, mha.W_k.weight, mha.W_v.weight]))
            reference.in_proj_bias.copy_(torch.cat([mha.W_q.bias, mha.W_k.bias, mha.W_v.bias]))
            reference.out_proj.weight.copy_(mha.W_o.weight)
            reference.out_proj.bias.copy_(mha.W_o.bias)
            expected, _ = reference(x, x, x, attn_mask=~attention.causal_mask(T, rt.device),
                                    key_padding_mask=pad == 0)
            outputs = {impl: mha(x, x, x, mask, is_causal=True, impl=impl)[0] for impl in attention.ATTENTION_IMPLS}
            q = mha.split_heads(mha.W_q(x))
            k, v = mha.split_heads(mha.W_k(x)), mha.split_heads(mha.W_v(x))
            by_loop = attention.attention_loop(q, k, v, mask, is_causal=True)[0]
            by_matrix = attention.attention_matrix(q, k, v, mask, is_causal=True)[0]
        differences = {f"multi-head ({impl}) vs nn.MultiheadAttention": (out - expected).abs().max().item()
                       for impl, out in outputs.items()}
        differences["loop vs matrix, per head"] = (by_loop - by_matrix).abs().max().item()
        for name, difference in differences.items():
            log(f"  {name:<48} max |difference| = {difference:.1e}")
        report["max_implementation_difference"] = max(differences.values())

        # -------------------------------------------------------------- 2. why 1/sqrt(d_k)
        log("== 2. why divide by sqrt(d_k): q, k with unit-variance entries, 64 keys per query")
        scale_rows = scale_experiment(d_ks, cfg.seed)
        log(format_table([{"d_k": r["d_k"], "score std raw | scaled": f"{r['score_std_raw']:.1f} | {r['score_std_scaled']:.2f}",
                           "max weight raw | scaled": f"{r['max_weight_raw']:.3f} | {r['max_weight_scaled']:.3f}",
                           "mean |grad| raw | scaled": f"{r['grad_raw']:.1e} | {r['grad_scaled']:.1e}"}
                          for r in scale_rows], ["d_k", "score std raw | scaled", "max weight raw | scaled",
                                                 "mean |grad| raw | scaled"]))
        log("  raw scores have std sqrt(d_k): the softmax turns one-hot (max weight -> 1) and the gradient through")
        log("  it collapses; divided by sqrt(d_k) the scores keep std 1 at every size, and so does the gradient.")
        report["scale"] = scale_rows

        # -------------------------------------------------------------- 3. time and memory
        log(f"== 3. causal attention, batch 1, 4 heads of d_k = 32: forward time and peak memory on {rt.device}")
        timing_rows = timing_table(lengths, cfg, rt)
        names = ["loop", "matrix", "sdpa, mask tensor", "sdpa, is_causal"]
        log(format_table([{"T": r["T"], **{n: "-" if r[f"{n} ms"] is None else
                                           f"{r[f'{n} ms']:.1f} ms {r[f'{n} MiB']:.1f} MiB" for n in names},
                           "T x T fp32": f"{r['T x T weights MiB']:.1f} MiB"} for r in timing_rows],
                         ["T", *names, "T x T fp32"]))
        log("  the explicit forms hold (B, h, T, T) scores and weights: 4x the length, 16x the memory. The fused")
        log("  kernel works block by block; given a mask tensor it still reads a T x T mask, with is_causal none.")
        report["timing"] = timing_rows

    if cfg.stage == "experiments":
        report["seconds"] = time.perf_counter() - started
        merged = write_report(out_dir / "report.json", report, log=log)   # replaces the experiments, keeps the rest
        print_report(merged, title=f"{CHAPTER} report", log=log)
        log(f"wrote {out_dir / 'report.json'}")
        return merged

    # ------------------------------------------------------------------ 4. tokenizer and data
    log("== 4. tokenizer and data")
    tokens = None
    if pretrains:
        # trained once on a sample spread over the corpus (all of a small one), cached under the corpus's
        # fingerprint and the sample's size: a later run reads no text to find it
        tokenizer = BPETokenizer.load_or_train(lambda: corpus.sample_texts(cfg.tokenizer_sample_mb * 1e6),
                                               cfg.vocab_size, special_tokens=(EOT,), runtime=rt, log=log,
                                               key=f"{corpus.fingerprint}-{cfg.tokenizer_sample_mb:g}")
        # encoded once and kept in the cache folder, documents joined by the end-of-text token
        tokens = data.TokenCache(corpus, tokenizer, runtime=rt, log=log, rebuild=cfg.rebuild_cache)
        if tokens.num_tokens("val") <= cfg.block_size:
            raise UserError(f"{cfg.data}: {tokens.num_tokens('val')} validation tokens is too few for "
                            f"block_size={cfg.block_size}; give more text or a smaller --block_size")
        log(f"  {cfg.data}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens, "
            f"{tokenizer.vocab_size}-token BPE")
    task = KeyValueRecall(tokenizer, cfg.recall_pairs)
    prompt, answer = task.example(random.Random(0))
    prompt_ids = tokenizer.encode(prompt)
    if len(prompt_ids) > cfg.block_size:
        raise UserError(f"a recall prompt is {len(prompt_ids)} tokens, longer than block_size={cfg.block_size}: "
                        f"use fewer --recall_pairs or a larger --block_size")
    log(f"  recall task: {prompt!r} -> {answer!r}, {len(prompt_ids)} tokens: "
        f"{[tokenizer.decode([i]) for i in prompt_ids]}")

    # ------------------------------------------------------------------ 5. pretraining
    log("== 5. pretraining the attention language model")
    model = make_model(cfg, tokenizer.vocab_size).to(rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    # 6 flops per weight per token (forward + backward) for the matmuls (attention projections and the
    # output layer; embedding lookups are free), plus attention itself: 12 * layers * T * d_model
    matmul_params = sum(p.numel() for p in model.attns.parameters()) + model.lm_head.weight.numel()
    flops_per_token = 6 * matmul_params + 12 * cfg.n_layer * cfg.block_size * cfg.d_model
    log(f"  {n_params:,} parameters: {cfg.n_layer} layers x {cfg.n_head} heads, d_model {cfg.d_model}, "
        f"context {cfg.block_size}; attention computed with {cfg.attn_impl!r}")
    decay = [p for p in model.parameters() if p.dim() >= 2]                # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]              # biases and LayerNorm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    # The batches are drawn from their own generator and dropout from torch's; both states go into every
    # checkpoint, so that --resume continues with exactly the random numbers the stopped run would have used.
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
        if rt.device_type == "cuda" and "cuda" in source_ckpt["rng"]:
            torch.cuda.set_rng_state(source_ckpt["rng"]["cuda"], rt.device)
        start_iter, best_val, seconds_before = source_ckpt["iter"], source_ckpt["best_val_loss"], source_ckpt["seconds"]
        log(f"  resuming the pretraining at iteration {start_iter}")
    # Everything is checked: from here on this run writes into out_dir, unless it holds another run.
    claim_out_dir(out_dir, dataclasses.asdict(cfg), RUN_FIELDS)

    def save(it, pretrain_report=None):
        rng = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
        if rt.device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(rt.device)
        tokenizer.save(out_dir / "tokenizer.json")
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "iter": it, "best_val_loss": best_val, "config": dataclasses.asdict(cfg),
                                    "rng": rng, "seconds": seconds_before + progress.seconds,
                                    "report": pretrain_report,
                                    "tokenizer": {"path": "tokenizer.json", "fingerprint": tokenizer.fingerprint}})

    if pretrains:
        trained = rt.maybe_compile(model)
        progress = Progress(cfg.max_iters, cfg.batch_size * cfg.block_size, log=log, log_interval=cfg.log_interval,
                            flops_per_token=flops_per_token, device=rt.device, start_iter=start_iter)
        with StopFlag() as stop:      # Ctrl-C: finish this step, save, exit (a 2nd Ctrl-C: at once)
            for it in range(start_iter, cfg.max_iters):
                lr = get_lr(it, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = tokens.get_batch("train", cfg.batch_size, cfg.block_size, rt.device, generator)
                with rt.autocast():
                    _, loss = trained(x, y)
                rt.scaler.scale(loss).backward()
                # the optimizer step (same in every train.py)
                if cfg.grad_clip > 0:
                    rt.scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                rt.scaler.step(optimizer)
                rt.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                progress.step(it, loss=loss, lr=lr)
                if (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.max_iters:
                    val_loss = evaluate(model, tokens, cfg, rt)
                    best_val = min(best_val, val_loss)
                    save(it + 1)
                    log(f"  eval at iter {it + 1}: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.1f}); "
                        f"saved {ckpt_path}")
                if stop.requested:
                    save(it + 1)
                    log(f"interrupted: saved {ckpt_path} at iter {it + 1}; continue with --resume")
                    sys.exit(130)
        val_loss = evaluate(model, tokens, cfg, rt)
        report["pretrain"] = {"corpus": cfg.data, "iters": cfg.max_iters, "val_loss": val_loss,
                              "val_perplexity": math.exp(val_loss),
                              "tokens_per_second": progress.average_tokens_per_second,
                              "seconds": seconds_before + progress.seconds}
        save(cfg.max_iters, report["pretrain"])
    elif cfg.init_from:
        log(f"  skipped: the model is {source_path}'s")
        report["pretrain"] = {"init_from": str(source_path), **(source_ckpt.get("report") or {"iters": source_ckpt["iter"]})}

    # ------------------------------------------------------------------ 6. finetuning: key-value recall
    if cfg.stage in ("all", "finetune"):
        log(f"== 6. finetuning on key-value recall ({cfg.recall_pairs} pairs, fresh pairs every example)")
        eval_seed = cfg.seed + 10_000                 # held-out examples: another stream of random pairs
        results, t0 = {}, time.perf_counter()
        for name in ("pretrained", "scratch"):
            torch.manual_seed(cfg.seed)
            net = copy.deepcopy(model) if name == "pretrained" else make_model(cfg, tokenizer.vocab_size).to(rt.device)
            before, accuracy, curve = finetune(net, task, cfg, rt, name, eval_seed)
            results[name] = {"accuracy": accuracy, "before": before, "curve": curve}
            log(f"  {name}: accuracy {before:.3f} before -> {accuracy:.3f} after {cfg.ft_iters} steps")
            if name == "pretrained":
                finetuned = net
        report["finetune"] = {"key-value recall": {
            "metric": "accuracy", "pretrained": results["pretrained"]["accuracy"],
            "scratch": results["scratch"]["accuracy"],
            "baseline": 0.1,                                            # guessing a digit
            "seconds": time.perf_counter() - t0, "pairs": cfg.recall_pairs, "iters": cfg.ft_iters,
            "pretrained_before": results["pretrained"]["before"],
            "curve_pretrained": results["pretrained"]["curve"], "curve_scratch": results["scratch"]["curve"]}}

        # -------------------------------------------------------------- 7. an attention map
        log("== 7. where the finetuned model looks: one example, the head that finds the answer")
        prompt, answer = task.example(random.Random(cfg.seed + 3))
        ids = torch.tensor([tokenizer.encode(prompt)], device=rt.device)
        finetuned.eval()
        with torch.no_grad():
            logits, _, maps = finetuned(ids, return_attention=True)     # maps: per layer (1, h, T, T)
        predicted = tokenizer.decode([logits[0, -1].argmax().item()])
        asked_key = " " + prompt.split("?")[1].strip().rstrip("=")
        key_position = [tokenizer.decode([t]) for t in ids[0].tolist()].index(asked_key)   # in the pairs
        value_position = key_position + 2                                  # " b", "=", "7"
        # the (layer, head) that puts the most weight, from the last position, on the value asked for
        on_value = torch.stack([m[0, :, -1, value_position] for m in maps])  # (n_layer, h)
        layer, head = divmod(int(on_value.argmax()), on_value.size(1))
        labels = [show_token(tokenizer, t) for t in ids[0].tolist()]
        log(f"  prompt {prompt!r}: answer {answer!r}, model says {predicted!r}. Layer {layer + 1}, head {head} puts "
            f"{on_value[layer, head].item():.0%} of the last position's attention on the value after{asked_key!r}:")
        log(heatmap(maps[layer][0, head].float().cpu(), labels))
        report["attention_map"] = {"prompt": prompt, "answer": answer, "predicted": predicted, "layer": layer + 1,
                                   "head": head, "weight_on_value": on_value[layer, head].item()}

    # ------------------------------------------------------------------ 8. report and samples
    model.eval()
    samples = []
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    for prompt in ("Return the", "The"):
        ids = torch.tensor([tokenizer.encode(prompt)], device=rt.device)
        out = model.generate(ids, cfg.sample_tokens, cfg.temperature, cfg.top_k or None, generator)
        samples.append(tokenizer.decode(out[0].tolist()))
    report["samples"] = samples
    report["seconds"] = time.perf_counter() - started
    merged = write_report(out_dir / "report.json", report, log=log)   # replaces this run's parts, keeps the rest
    print_report(merged, title=f"{CHAPTER} report", log=log)
    log(f"wrote {out_dir / 'report.json'}")
    log(f"\nsamples (pretrained model, temperature {cfg.temperature}, top-k {cfg.top_k}):")
    for sample in samples:
        log("  " + repr(sample))
    return merged


if __name__ == "__main__":
    run_main(main)

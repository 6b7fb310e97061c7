"""Pretrain an encoder-decoder Transformer as a denoising autoencoder, then finetune it on a seq2seq task.

    python 03_transformer/train.py                       # default: pydocs corpus -> docstring-name, CPU
    python 03_transformer/train.py --preset tiny         # seconds, for a smoke test
    python 03_transformer/train.py --preset base --device cuda   # the paper's base model, on a GPU
    python 03_transformer/train.py --init_from out/03_transformer --task my_pairs.jsonl --out_dir out/mine

The recipe, top to bottom:
  config -> flags -> setup -> tokenizer -> data -> model -> optimizer and schedule
  -> pretraining: reconstruct clean text x from a corrupted x~ (masked, span-deleted, locally shuffled)
     (or, with --init_from, the pretrained model of an earlier run)
  -> finetuning on the task twice with the same budget: from the pretrained weights and from scratch
  -> evaluation on the test split (exact match, character F1, corpus BLEU; greedy and beam search)
  -> report table + out/03_transformer/report.json -> a few predictions next to their references.
"""

import copy
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # so `common` imports from any cwd

import torch  # noqa: E402

from common import data, load_module  # noqa: E402
from common.checkpoint import claim_out_dir, load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main  # noqa: E402
from common.report import Progress, format_table, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup  # noqa: E402
from common.tokenizer import BPETokenizer  # noqa: E402

model_lib = load_module(Path(__file__).resolve().parent / "model.py")
Transformer, TransformerConfig = model_lib.Transformer, model_lib.TransformerConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<s>", "</s>", "<mask>")   # document break, PAD, BOS, EOS, MASK
STAGES = ("all", "pretrain", "finetune")
SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")


@dataclass
class Config:
    # what to run
    stage: str = "all"                # all | pretrain | finetune (finetune reads out_dir/pretrain.pt, or --init_from)
    out_dir: str = "out/03_transformer"  # tokenizer, checkpoints and report.json go here
    resume: bool = False              # continue every stage from its checkpoint in out_dir (Ctrl-C saves one)
    init_from: str = ""               # finetune this chapter's pretrain.pt (or its run folder) instead of pretraining
    # data
    data: str = "pydocs"              # corpus: pydocs | shakespeare | wikitext-2 | tinystories | c4[:N] | file (.txt .txt.gz .jsonl .jsonl.gz) | folder
    text_field: str = "text"          # the field of a .jsonl corpus's rows that holds the text
    tokenizer_sample_mb: float = 100  # the BPE is trained on this many MB, spread over the corpus (pydocs: all of it)
    rebuild_cache: bool = False       # encode the corpus again (after an edit its fingerprint cannot see)
    task: str = "docstring-name"      # finetuning task: docstring-name | docstring-summary | a .jsonl/.csv file (README)
    vocab_size: int = 2048            # BPE vocabulary shared by source and target (bytes + merges + 5 special tokens)
    # model (the paper's base model is d_model 512, 8 heads, 6 + 6 layers, d_ff 2048: --preset base)
    d_model: int = 128                # width of the residual stream
    n_head: int = 4                   # attention heads per attention sublayer
    n_encoder_layers: int = 2         # encoder layers
    n_decoder_layers: int = 2         # decoder layers
    d_ff: int = 512                   # inner width of the position-wise FFN
    dropout: float = 0.0              # P_drop in pretraining (sublayers, embeddings, attention, FFN): fresh windows barely overfit
    norm_first: bool = False          # pre-LN instead of the paper's post-LN
    # denoising pretraining
    block_size: int = 32              # tokens of clean text per pretraining example
    mask_rate: float = 0.15           # noise: fraction of tokens replaced by <mask>
    delete_rate: float = 0.1          # noise: fraction of tokens deleted, in spans of 1..max_span tokens
    max_span: int = 3                 # noise: longest deleted span
    shuffle_distance: int = 3         # noise: local shuffle, a token moves at most this far (0 = off)
    max_iters: int = 600              # optimizer steps of pretraining
    batch_size: int = 64              # pretraining examples per step
    lr: float = 5e-3                  # peak learning rate of pretraining
    warmup_iters: int = 50            # linear warmup steps (pretraining)
    schedule: str = "cosine"          # after warmup (both stages): cosine | linear | inverse_sqrt (the paper's) | constant
    min_lr_ratio: float = 0.1         # floor of the cosine and linear decay, as a fraction of the peak
    weight_decay: float = 0.01        # AdamW decay on weight matrices (not on biases, norms, embeddings)
    grad_clip: float = 1.0            # clip the global gradient norm to this (0 = off)
    label_smoothing: float = 0.1      # eps of the label-smoothed cross-entropy (the paper: 0.1)
    eval_interval: int = 100          # evaluate (and checkpoint) every this many pretraining steps
    eval_iters: int = 8               # validation batches per pretraining evaluation
    log_interval: int = 50            # progress line every this many steps
    # finetuning
    ft_iters: int = 300               # optimizer steps of finetuning, the same for pretrained and scratch
    ft_batch_size: int = 32           # finetuning examples per step
    ft_lr: float = 1e-3               # peak learning rate of finetuning
    ft_warmup_iters: int = 30         # linear warmup steps (finetuning)
    ft_dropout: float = 0.1           # P_drop in finetuning, where a few thousand examples are seen many times (the paper: 0.1)
    ft_eval_interval: int = 50        # validation loss every this many finetuning steps; the best weights are kept
    max_source_len: int = 64          # task inputs are cut to this many tokens
    max_target_len: int = 16          # task targets are cut to this many tokens (EOS excluded)
    # evaluation and decoding
    num_beams: int = 4                # beam size of beam search
    length_penalty: float = 0.6       # alpha of lp(Y) = ((5 + |Y|) / 6)^alpha (the paper: 0.6)
    bleu_unit: str = "char"           # BLEU over "char"acters (identifiers) or whitespace-separated "word"s
    max_eval_examples: int = 0        # evaluate on at most this many test examples (0 = all)
    num_samples: int = 6              # test predictions to show next to their references
    # runtime
    device: str = "auto"              # auto | cpu | cuda | mps
    dtype: str = "auto"               # autocast dtype: auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False             # torch.compile the model
    seed: int = 1337                  # same seed, same run


PRESETS = {
    # dropout on in pretraining too, so that the resume tests cover the saved RNG state
    "tiny": dict(vocab_size=300, d_model=32, n_head=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=64,
                 dropout=0.1, block_size=24, max_iters=30, batch_size=8, warmup_iters=5, eval_interval=10,
                 eval_iters=2, ft_iters=20, ft_batch_size=8, ft_warmup_iters=4, ft_eval_interval=10,
                 max_source_len=32, max_target_len=8, num_beams=2, max_eval_examples=16, num_samples=2,
                 log_interval=10, lr=3e-3, ft_lr=3e-3),
    "default": {},
    # the GPU preset: the paper's base model
    "base": dict(dropout=0.1, d_model=512, n_head=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, vocab_size=8192,
                 block_size=128, batch_size=64, max_iters=5000, lr=7e-4, warmup_iters=1000,
                 ft_iters=1500, ft_batch_size=64, ft_lr=3e-4, ft_warmup_iters=150,
                 eval_interval=500, ft_eval_interval=250, max_source_len=256, log_interval=100),
}

# The values that decide what a folder's checkpoints are: a run with other values writes elsewhere.
RUN_FIELDS = ("init_from", "data", "text_field", "vocab_size", "d_model", "n_head", "n_encoder_layers", "n_decoder_layers",
              "d_ff", "norm_first", "block_size")


def check_config(cfg):
    """Every bad value -> one clear line (UserError), before anything slow runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown --stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown --schedule {cfg.schedule!r} (valid: {', '.join(SCHEDULES)})")
    if cfg.bleu_unit not in ("char", "word"):
        raise UserError(f"unknown --bleu_unit {cfg.bleu_unit!r} (valid: char, word)")
    for name in ("d_model", "n_head", "n_encoder_layers", "n_decoder_layers", "d_ff", "block_size", "max_span",
                 "max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval", "ft_iters",
                 "ft_batch_size", "ft_eval_interval", "max_source_len", "max_target_len", "num_beams"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "ft_warmup_iters", "shuffle_distance", "weight_decay", "grad_clip",
                 "max_eval_examples", "num_samples"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    for name in ("lr", "ft_lr", "tokenizer_sample_mb"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("dropout", "ft_dropout", "mask_rate", "delete_rate", "label_smoothing", "min_lr_ratio"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"--d_model {cfg.d_model} is not divisible by --n_head {cfg.n_head}")
    if cfg.vocab_size < 256 + len(SPECIAL_TOKENS) and not cfg.init_from:
        raise UserError(f"--vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {cfg.vocab_size}")
    if cfg.init_from and cfg.stage == "pretrain":
        raise UserError(f"--init_from {cfg.init_from} replaces pretraining, so --stage pretrain would ignore it "
                        f"(use --stage all or finetune)")
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise UserError(f"--init_from {cfg.init_from}: no such file or folder (a pretrain.pt of this chapter, "
                        f"or the run folder holding it)")


# ----------------------------------------------------------------------------------------------------
# the pieces the recipe uses


def load_tokenizer_file(path):   # same as 06_t5/train.py
    """A tokenizer file a run wrote; missing or corrupt -> one UserError line naming it."""
    try:
        return BPETokenizer.load(path)
    except (OSError, ValueError) as error:
        raise UserError(str(error)) from None


def read_pretrained(source):   # same as 06_t5/train.py
    """A finished pretraining of this chapter: `source` is a pretrain.pt or the run folder holding one, with
    the run's tokenizer.json beside it. Returns (checkpoint path, checkpoint, tokenizer); anything amiss
    (missing, corrupt, unfinished, another tokenizer) is one UserError line."""
    source = Path(source)
    ckpt_path = source / "pretrain.pt" if source.is_dir() else source
    if not ckpt_path.is_file():
        raise UserError(f"{ckpt_path} not found: pretrain first (--stage pretrain), or pass --init_from a finished run")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("stage") != "pretrain" or "model_config" not in ckpt:
        raise UserError(f"{ckpt_path} is not a pretraining checkpoint of this chapter")
    if ckpt["iter"] < ckpt["total_iters"]:
        raise UserError(f"{ckpt_path} holds an unfinished pretraining (iter {ckpt['iter']} of {ckpt['total_iters']}): "
                        f"finish it first with --stage pretrain --resume --out_dir {ckpt_path.parent}")
    tokenizer = load_tokenizer_file(ckpt_path.parent / "tokenizer.json")
    if tokenizer.fingerprint != ckpt.get("tokenizer"):
        raise UserError(f"{ckpt_path.parent / 'tokenizer.json'} is not the tokenizer {ckpt_path} was trained with")
    return ckpt_path, ckpt, tokenizer


def source_and_target(example):   # same as 06_t5/train.py
    """A task example as (source text, target text), whatever its columns, as T5 casts every task as text
    to text: input -> target; instruction (+ input) -> response; text -> label."""
    if "target" in example:
        return example["input"], example["target"]
    if "response" in example:
        return "\n".join(part for part in (example["instruction"], example.get("input")) if part), example["response"]
    return example["text"], example["label"]


def corrupt(x, cfg, mask_id, generator):
    """The noise of the denoising autoencoder: x (B, T) clean ids -> list of B corrupted id lists x~.

    1. span deletion: a span of 1..max_span tokens starts at each position with probability
       delete_rate / mean_span, so that about delete_rate of the tokens disappear;
    2. token masking: each remaining token becomes <mask> with probability mask_rate;
    3. local shuffle (Lample et al., 2018): sort positions by i + U(0, k + 1), so no token moves
       more than k = shuffle_distance places.
    The model must undo all three: L_DAE = -log p(x | x~). For example, with M = <mask>:

        x  = [10, 11, 12, 13, 14, 15, 16, 17]
        x~ = [10, 12, M, 11, 16, M, 17]          (13 14 deleted; 15, then 11, masked; 11 and 12 swapped)
    """
    B, T = x.shape
    mean_span = (1 + cfg.max_span) / 2
    starts = torch.rand(B, T, generator=generator) < cfg.delete_rate / mean_span
    span = torch.randint(1, cfg.max_span + 1, (B, T), generator=generator)
    deleted = torch.zeros(B, T, dtype=torch.bool)
    for offset in range(cfg.max_span):                  # position i + offset falls in a span started at i
        deleted[:, offset:] |= (starts & (span > offset))[:, : T - offset]
    deleted[deleted.all(dim=1), 0] = False              # never delete a whole example
    masked = torch.rand(B, T, generator=generator) < cfg.mask_rate
    noisy = x.masked_fill(masked, mask_id)
    keys = torch.arange(T) + torch.rand(B, T, generator=generator) * (cfg.shuffle_distance + 1)
    keys = keys.masked_fill(deleted, float("inf"))      # deleted tokens sort to the end, then are cut
    noisy = noisy.gather(1, keys.argsort(dim=1))
    kept = (~deleted).sum(dim=1).tolist()
    return [row[:n] for row, n in zip(noisy.tolist(), kept)]


def get_lr(it, peak, warmup, total, schedule, min_ratio):   # same as 06_t5/train.py
    """Learning rate at step `it` (0-based): linear warmup to `peak` over `warmup` steps, then, with
    r = min_ratio the floor as a fraction of the peak and progress going 0 -> 1 over the other steps,

        cosine:        peak * (r + (1 - r) * (1 + cos(pi * progress)) / 2)
        linear:        peak * (r + (1 - r) * (total - step + 1) / (total - warmup)), its last step at r + 1/(total - warmup)
        inverse_sqrt:  peak * sqrt(warmup / step)   (the 2017 paper's d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
                                                     and T5's 1 / sqrt(max(step, warmup)), rescaled to peak at `peak`)
        constant:      peak                         (T5's finetuning)

    Cosine and linear suit our fixed, short budgets: they spend the last steps at a small learning rate
    (annealing), where the inverse square root is meant for open-ended training and would still be at
    peak / 2.6 after 7 x warmup steps.
    """
    step = it + 1
    if step <= warmup:
        return peak * step / warmup
    if schedule == "inverse_sqrt":
        return peak * math.sqrt(max(1, warmup) / step)
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak * (min_ratio + (1 - min_ratio) * max(0, total - step + 1) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def flops_per_token(model, source_share):
    """Training FLOPs per token (forward + backward = 6 per parameter a token passes through).

    A source token passes through the encoder layers, a target token through the decoder layers and the
    output projection (d_model x V); `source_share` is the fraction of the tokens that are source tokens.
    Attention's T^2 terms are left out, as in the usual 6N estimate.
    """
    encoder = sum(p.numel() for p in model.encoder_layers.parameters())
    decoder = sum(p.numel() for p in model.decoder_layers.parameters()) + model.embed.weight.numel()
    return 6 * (source_share * encoder + (1 - source_share) * decoder)


def configure_optimizer(model, lr, weight_decay):
    """AdamW with the paper's betas (0.9, 0.98) and eps 1e-9; decay only the matrices of the layers.
    (`lr_scale` is 1 for every group: train_stage, shared with 06_t5, multiplies the schedule by it.)"""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed")]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-9)


# ---- metrics: written here, tested on hand-checked cases in tests/test_transformer.py


def exact_match(predictions, references):
    """Fraction of predictions equal to their reference (surrounding whitespace ignored)."""
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(1, len(references))


def char_f1(prediction, reference):
    """F1 of the multisets of characters (SQuAD's token F1, over characters): partial credit for names.

    >>> round(char_f1("read_file", "readfile"), 4)      # 8 common chars: P = 8/9, R = 8/8
    0.9412
    """
    if not prediction or not reference:
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references, max_n=4, unit="word"):
    """Corpus BLEU (Papineni et al., 2002) with one reference per hypothesis, no smoothing.

        p_n  = sum over the corpus of clipped n-gram matches / sum of hypothesis n-grams
        BP   = 1 if c > r else exp(1 - r / c)     (c, r: total hypothesis and reference lengths)
        BLEU = BP * exp(sum_{n=1..N} (1/N) log p_n)

    Clipping: an n-gram counts at most as often as it occurs in the reference ("the the the" gets
    no credit for a third "the"). unit: "word" splits on whitespace, "char" treats each character as
    a token (our identifiers are one "word" each, so character n-grams give the partial credit).
    """
    split = list if unit == "char" else str.split
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = split(hypothesis), split(reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            hyp_ngrams, ref_ngrams = ngrams(hyp, n), ngrams(ref, n)
            matches[n - 1] += sum((hyp_ngrams & ref_ngrams).values())
            totals[n - 1] += sum(hyp_ngrams.values())
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity_penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity_penalty * math.exp(log_precision)


# ---- the loop both stages share


# same as 06_t5/train.py, but for the forward line: 03 smooths the labels, as the 2017 paper did; T5 does not
def train_stage(name, model, optimizer, get_batch, evaluate, total_iters, peak_lr, warmup_iters, schedule,
                eval_interval, ckpt_path, cfg, rt, tokens_per_iter, flops, extra_state):
    """AdamW + warmup/schedule + clipping + AMP (+ DDP), periodic validation keeping the best weights,
    atomic checkpoints, --resume, and Ctrl-C, which saves after the step in flight.

    get_batch(it) -> dict of model inputs for this process: a pure function of the step, so a resumed run
    sees the batches an uninterrupted one would; the torch RNG (dropout) is saved and restored with the
    optimizer, so a resumed run ends with the very weights of an uninterrupted one. evaluate(model) -> val
    loss. `extra_state` (the tokenizer's fingerprint, the task) goes into the checkpoint, and a checkpoint
    with other values is not resumed. Returns (best validation loss, best weights, seconds).
    """
    start_iter, best_loss, best_state, val_loss, seconds_before = 0, math.inf, None, None, 0.0
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        differing = [key for key, value in {"stage": name, "model_config": asdict(model.config), **extra_state}.items()
                     if ckpt.get(key) != value]
        if differing:
            raise UserError(f"{ckpt_path} was written by another run (its {', '.join(differing)} differ); "
                            f"pass another --out_dir, or drop --resume to start again")
        load_model_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_iter, best_loss, best_state = ckpt["iter"], ckpt["best_loss"], ckpt["best_model"]
        val_loss, seconds_before = ckpt["val_loss"], ckpt["seconds"]
        rt.log(f"{name}: resumed from {ckpt_path} at iter {start_iter}/{total_iters}")
    train_model = rt.wrap(rt.maybe_compile(model))     # compiled / DDP-wrapped, sharing `model`'s parameters
    progress = Progress(total_iters, tokens_per_iter * rt.world_size, log=rt.log, log_interval=cfg.log_interval,
                        flops_per_token=flops, device=rt.device, dtype=rt.dtype, start_iter=start_iter, name=name)

    def save(it):
        if rt.is_main:
            save_checkpoint(ckpt_path, {
                "stage": name, "iter": it, "total_iters": total_iters, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "best_loss": best_loss,
                "best_model": best_state, "val_loss": val_loss, "seconds": seconds_before + progress.seconds,
                "model_config": asdict(model.config), "config": asdict(cfg), **extra_state})

    model.train()
    with StopFlag() as stop:
        for it in range(start_iter, total_iters):
            lr = get_lr(it, peak_lr, warmup_iters, total_iters, schedule, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            batch = {k: v.to(rt.device) for k, v in get_batch(it).items()}
            with rt.autocast():
                _, loss = train_model(**batch, label_smoothing=cfg.label_smoothing)
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss.item()):           # before a checkpoint could keep the broken weights
                raise UserError(f"{name}: the loss became {loss.item()} at iter {it + 1}; "
                                f"try a lower learning rate or more warmup steps")
            progress.step(it, loss=loss.detach(), lr=lr)
            if (it + 1) % eval_interval == 0 or it + 1 == total_iters:
                val_loss = evaluate(model)
                model.train()
                improved = val_loss < best_loss
                if improved:
                    best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
                rt.log(f"{name} eval at iter {it + 1}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
                save(it + 1)
            if rt.all_reduce_mean(float(stop.requested)) > 0:     # under DDP every rank stops at the same step
                save(it + 1)
                rt.log(f"interrupted: saved {ckpt_path} at iter {it + 1}; continue with --resume")
                sys.exit(130)
    return best_loss, best_state, seconds_before + progress.seconds


@torch.no_grad()
def mean_loss(model, batches, rt):   # same as 06_t5/train.py
    """Cross-entropy per target token (no label smoothing) over a list of batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        with rt.autocast():
            _, loss = model(**batch)
        n = (batch["labels"] != -100).sum().item()
        total, count = total + loss.item() * n, count + n
    return total / max(1, count)


@torch.no_grad()
def decode_all(model, sources, tokenizer, cfg, rt, num_beams):
    """Decode every source (batched, shortest first) -> list of strings in the original order."""
    model.eval()
    bos, eos, pad = (tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    predictions = [None] * len(sources)
    for indices in data.batch_indices([len(s) for s in sources], 64, shuffle=False, bucket=True):
        batch = data.pad_batch([sources[i] for i in indices], pad)
        with rt.autocast():
            outputs = model.generate(batch["input_ids"].to(rt.device), batch["attention_mask"].to(rt.device),
                                     bos_id=bos, eos_id=eos, max_new_tokens=cfg.max_target_len + 1,
                                     num_beams=num_beams, length_penalty=cfg.length_penalty)
        for i, ids in zip(indices, outputs):
            predictions[i] = tokenizer.decode(ids)
    return predictions


# ----------------------------------------------------------------------------------------------------
# the recipe


def main(argv=None):
    cfg = parse_config(Config, presets=PRESETS, argv=argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    run_started = time.perf_counter()
    rt = setup(cfg.device, cfg.dtype, cfg.compile, cfg.seed)
    if rt.ddp:
        raise UserError("03_transformer trains in one process; run it with python, not torchrun (05_gpt shows DDP)")
    out_dir = Path(cfg.out_dir)
    pretrain_path = out_dir / "pretrain.pt"
    task_name = Path(cfg.task).name                     # a file's name, or the built-in task's

    # ---- what gets read before anything slow: the pretrained run to finetune (when this run does not
    # pretrain), the corpus (when it does) and the task's examples, so that bad input fails at once
    pretrains_here = cfg.stage != "finetune" and not cfg.init_from
    source_path, source_ckpt, tokenizer = None, None, None
    if not pretrains_here:
        source_path, source_ckpt, tokenizer = read_pretrained(cfg.init_from or pretrain_path)
    corpus = data.Corpus(cfg.data, cfg.text_field, log=rt.log, runtime=rt) if pretrains_here else None   # opened, not read
    examples = {} if cfg.stage == "pretrain" else {
        split: data.load_task(cfg.task, split) for split in ("train", "val", "test")}
    if cfg.max_eval_examples and examples:
        examples["test"] = examples["test"][: cfg.max_eval_examples]
    if cfg.init_from and source_path.resolve() != pretrain_path.resolve():   # finetunings of another run's model
        claim_out_dir(out_dir, {"init_from": str(source_path.resolve())}, ["init_from"])
    elif pretrains_here:
        claim_out_dir(out_dir, asdict(cfg), RUN_FIELDS)
    rt.log(f"device {rt.device} | autocast {str(rt.dtype).replace('torch.', '')} | "
           f"{torch.get_num_threads()} CPU threads | out_dir {out_dir}")

    # ---- tokenizer: one byte-level BPE for both sides, trained once on a sample spread over the corpus (all
    # of a small one), cached under the corpus's fingerprint and the sample's size, and kept in
    # out_dir/tokenizer.json; --resume and finetuning read that file
    if pretrains_here and cfg.resume and pretrain_path.exists():
        tokenizer = load_tokenizer_file(out_dir / "tokenizer.json")   # train_stage checks it against pretrain.pt
    elif pretrains_here:
        tokenizer = BPETokenizer.load_or_train(lambda: corpus.sample_texts(cfg.tokenizer_sample_mb * 1e6),
                                               cfg.vocab_size, special_tokens=SPECIAL_TOKENS, name="03_transformer",
                                               runtime=rt, log=rt.log,
                                               key=f"{corpus.fingerprint}-{cfg.tokenizer_sample_mb:g}")
        tokenizer.save(out_dir / "tokenizer.json")
    if list(tokenizer.special_tokens) != list(SPECIAL_TOKENS):
        raise UserError(f"the tokenizer of {source_path or out_dir} was not made by this chapter (other special tokens)")
    pad_id, bos_id, eos_id, mask_id = (tokenizer.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<mask>"))

    # ---- the model's shape: from the flags when pretraining here, else the pretrained checkpoint's
    if pretrains_here:
        model_config = TransformerConfig(
            vocab_size=tokenizer.vocab_size, d_model=cfg.d_model, n_head=cfg.n_head,
            n_encoder_layers=cfg.n_encoder_layers, n_decoder_layers=cfg.n_decoder_layers, d_ff=cfg.d_ff,
            dropout=cfg.dropout, max_len=max(cfg.block_size, cfg.max_source_len) + 2,
            norm_first=cfg.norm_first, pad_id=pad_id)
    else:
        model_config = TransformerConfig(**source_ckpt["model_config"])
        if max(cfg.max_source_len, cfg.max_target_len + 1) > model_config.max_len:
            raise UserError(f"--max_source_len {cfg.max_source_len} / --max_target_len {cfg.max_target_len} do not fit "
                            f"the positions of {source_path} (max_len {model_config.max_len})")

    # ---- data: the task's (source, target) id pairs
    def encode_pairs(split_examples):
        pairs = [source_and_target(example) for example in split_examples]
        sources = [ids[: cfg.max_source_len] for ids in tokenizer.encode_batch([s for s, _ in pairs])]
        targets = [ids[: cfg.max_target_len] for ids in tokenizer.encode_batch([t for _, t in pairs])]
        return [t for _, t in pairs], sources, targets

    task = {split: encode_pairs(split_examples) for split, split_examples in examples.items()}
    if task:
        rt.log(f"task {cfg.task}: " + " / ".join(f"{len(task[s][0])} {s}" for s in task) + " examples")

    def seq2seq_batch(sources, targets):
        """Teacher forcing: decoder reads [BOS] y, predicts y [EOS]; -100 labels at padding."""
        enc = data.pad_batch(sources, pad_id)
        dec = data.pad_batch([[bos_id] + t for t in targets], pad_id, labels=[t + [eos_id] for t in targets])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "decoder_input_ids": dec["input_ids"], "decoder_attention_mask": dec["attention_mask"],
                "labels": dec["labels"]}

    report = {"chapter": "03_transformer", "device": str(rt.device)}
    if pretrains_here:
        # ---- pretraining data: clean token windows x and their corruptions x~
        tokens = data.TokenCache(corpus, tokenizer, runtime=rt, log=rt.log, rebuild=cfg.rebuild_cache)
        rt.log(f"corpus {cfg.data}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens")

        def denoising_batch(split, it, batch_size):
            """Clean windows x and their corruptions x~, from a generator seeded by the step."""
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
            x, _ = tokens.get_batch(split, batch_size, cfg.block_size, generator=generator)     # (B, T)
            return seq2seq_batch(corrupt(x, cfg, mask_id, generator), x.tolist())

        # ---- pretraining: L_DAE = -log p(x | x~)
        torch.manual_seed(cfg.seed)
        model = Transformer(model_config).to(rt.device)
        rt.log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.n_encoder_layers}+{cfg.n_decoder_layers} "
               f"layers, d_model {cfg.d_model}, {'pre' if cfg.norm_first else 'post'}-LN")
        val_batches = [denoising_batch("val", -1 - k, cfg.batch_size) for k in range(cfg.eval_iters)]
        optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay)
        _, _, pretrain_seconds = train_stage(
            "pretrain", model, optimizer, lambda it: denoising_batch("train", it, cfg.batch_size),
            lambda m: mean_loss(m, val_batches, rt), cfg.max_iters, cfg.lr, cfg.warmup_iters, cfg.schedule,
            cfg.eval_interval, pretrain_path, cfg, rt, tokens_per_iter=cfg.batch_size * cfg.block_size * 2,
            flops=flops_per_token(model, 0.5),
            extra_state={"tokenizer": tokenizer.fingerprint, "corpus_fingerprint": tokens.corpus_fingerprint})
        pretrain_val = mean_loss(model, val_batches, rt)
        report["params"] = model.num_parameters()
        report["pretrain"] = {"val_loss": round(pretrain_val, 4), "val_ppl": round(math.exp(pretrain_val), 2),
                              "iters": cfg.max_iters, "seconds": round(pretrain_seconds, 1),
                              "tokens_per_second": round(cfg.max_iters * cfg.batch_size * cfg.block_size * 2
                                                         / max(pretrain_seconds, 1e-9))}
        rt.log(f"pretraining done: val loss {pretrain_val:.4f} (reconstructing x from x~)")
        if cfg.stage == "pretrain":
            merged = write_report(out_dir / "report.json", report, log=rt.log)
            print_report(merged, "03_transformer pretraining", log=rt.log)
            return merged
        pretrained_state = copy.deepcopy(model.state_dict())
    else:
        pretrained_state = source_ckpt["model"]
        if cfg.init_from:              # (--stage finetune of this folder keeps the pretraining figures it has)
            report["pretrain"] = {"init_from": str(source_path), "val_loss": round(source_ckpt["val_loss"], 4),
                                  "iters": source_ckpt["iter"]}
        rt.log(f"pretrained model: {source_path} (iter {source_ckpt['iter']}, val loss {source_ckpt['val_loss']:.4f})")

    # ---- finetuning: the same budget from the pretrained weights and from a fresh initialisation
    train_sources, train_targets = task["train"][1], task["train"][2]
    lengths = [len(s) + len(t) for s, t in zip(train_sources, train_targets)]
    steps_per_epoch = math.ceil(len(lengths) / cfg.ft_batch_size)
    val_task_batches = [seq2seq_batch([task["val"][1][i] for i in b], [task["val"][2][i] for i in b])
                        for b in data.batch_indices([len(s) for s in task["val"][1]], 64, shuffle=False, bucket=True)]

    def task_batch(it):
        """Length-bucketed, shuffled batches of the train split; a new order every epoch (a function of `it`)."""
        epoch, k = divmod(it, steps_per_epoch)
        batches = data.batch_indices(lengths, cfg.ft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True)
        return seq2seq_batch([train_sources[i] for i in batches[k]], [train_targets[i] for i in batches[k]])

    finetune, models = {}, {}
    for variant in ("pretrained", "scratch"):
        torch.manual_seed(cfg.seed + 1)
        model = Transformer(replace(model_config, dropout=cfg.ft_dropout)).to(rt.device)   # another dropout rate
        if variant == "pretrained":
            model.load_state_dict(pretrained_state)
        optimizer = configure_optimizer(model, cfg.ft_lr, cfg.weight_decay)
        best_loss, best_state, seconds = train_stage(
            f"finetune-{variant}", model, optimizer, task_batch, lambda m: mean_loss(m, val_task_batches, rt),
            cfg.ft_iters, cfg.ft_lr, cfg.ft_warmup_iters, cfg.schedule, cfg.ft_eval_interval,
            out_dir / f"finetune-{variant}.pt", cfg, rt,
            tokens_per_iter=round(cfg.ft_batch_size * sum(lengths) / len(lengths)),
            flops=flops_per_token(model, sum(map(len, train_sources)) / sum(lengths)),
            extra_state={"tokenizer": tokenizer.fingerprint, "task": cfg.task})
        model.load_state_dict(best_state)                                 # early stopping: the best val weights
        save_checkpoint(out_dir / f"finetune-{variant}-best.pt",
                        {"model": best_state, "model_config": asdict(model.config), "val_loss": best_loss,
                         "tokenizer": tokenizer.fingerprint, "task": cfg.task})
        models[variant] = model
        finetune[variant] = {"val_loss": round(best_loss, 4), "seconds": round(seconds, 1)}
    report["params"] = models["pretrained"].num_parameters()

    # ---- evaluation on the test split: greedy and beam search, three metrics
    references, test_sources, _ = task["test"]
    predictions = {}
    for variant, model in models.items():
        t0 = time.perf_counter()
        for search, beams in (("greedy", 1), ("beam", cfg.num_beams)):
            predicted = decode_all(model, test_sources, tokenizer, cfg, rt, beams)
            predictions[(variant, search)] = predicted
            finetune[variant][search] = {
                "exact_match": round(exact_match(predicted, references), 4),
                "char_f1": round(sum(map(char_f1, predicted, references)) / len(references), 4),
                "bleu": round(corpus_bleu(predicted, references, unit=cfg.bleu_unit), 4)}
        finetune[variant]["decode_seconds"] = round(time.perf_counter() - t0, 1)

    most_common = Counter(task["train"][0]).most_common(1)[0][0]
    constant = [most_common] * len(references)          # the floor: the most common train target, every time
    finetune["baseline"] = {"exact_match": round(exact_match(constant, references), 4),
                            "char_f1": round(sum(map(char_f1, constant, references)) / len(references), 4),
                            "bleu": round(corpus_bleu(constant, references, unit=cfg.bleu_unit), 4)}
    report["finetune"] = {task_name: {
        "metric": "exact_match (beam)",
        "pretrained": finetune["pretrained"]["beam"]["exact_match"],
        "scratch": finetune["scratch"]["beam"]["exact_match"],
        "baseline": finetune["baseline"]["exact_match"],
        "seconds": round(finetune["pretrained"]["seconds"] + finetune["scratch"]["seconds"], 1),
        "test_examples": len(references),
        "details": finetune,
    }}
    report["seconds"] = round(time.perf_counter() - run_started, 1)
    report["samples"] = [{"input": source_and_target(examples["test"][i])[0][:120], "reference": references[i],
                          **{f"{v} {s}": predictions[(v, s)][i] for v, s in predictions}}
                         for i in range(min(cfg.num_samples, len(references)))]

    # ---- report
    merged = write_report(out_dir / "report.json", report, log=rt.log)
    print_report(merged, "03_transformer: denoising pretraining -> " + task_name, log=rt.log)
    rows = [{"model": v, "search": s, **finetune[v][s]} for v in ("pretrained", "scratch") for s in ("greedy", "beam")]
    rows.append({"model": f"always {most_common!r}", "search": "-", **finetune["baseline"]})
    rt.log(format_table(rows, ["model", "search", "exact_match", "char_f1", "bleu"]))
    rt.log(f"(test split, {len(references)} examples; BLEU-4 over {'characters' if cfg.bleu_unit == 'char' else 'words'}; "
           f"the last row answers the most common train target every time)")
    rt.log("\nsamples from the test split:")
    for sample in report["samples"]:
        rt.log(f"  input:     {' '.join(sample['input'].split())[:90]!r}")
        rt.log(f"  reference: {sample['reference']!r}   " + "   ".join(
            f"{key}: {sample[key]!r}" for key in ("pretrained beam", "scratch beam")))
    rt.log(f"wrote {out_dir / 'report.json'} | total {report['seconds']:.0f}s")
    return merged


if __name__ == "__main__":
    run_main(main)

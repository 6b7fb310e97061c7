"""Pretrain T5 with span corruption, then finetune it on three tasks at once, all as text to text.

    python 06_t5/train.py                        # default: pydocs corpus, CPU, a few minutes
    python 06_t5/train.py --preset tiny          # seconds, for a smoke test
    python 06_t5/train.py --preset small --device cuda          # T5-small's shape, on a GPU
    torchrun --nproc_per_node 2 06_t5/train.py --preset small   # data parallel

The recipe, top to bottom:
  config -> flags -> setup -> tokenizer (with the sentinels <extra_id_0>, <extra_id_1>, ...)
  -> span corruption: drop 15% of the tokens in spans of mean length 3, each span replaced by one
     sentinel in the input; the target lists the sentinels followed by the dropped spans, then EOS
  -> pretraining: L = -sum_i log p(y_i | y_<i, x~)
  -> multitask finetuning, one mixed run: "summarize: " body -> summary line, "name: " docstring ->
     the function's name, "module: " docstring -> its module; from the pretrained weights and from
     scratch with the same budget
  -> test metrics per task (ROUGE-L, exact match, accuracy) with greedy and beam search
  -> report table + out/06_t5/report.json -> predictions next to references.

Optimiser: AdamW (betas 0.9, 0.98; weight decay on the matrices only) instead of T5's Adafactor, with
a linear warmup and then a linear decay to zero, in both stages. In pretraining each tensor's rate is
the peak (2e-2) times the tensor's RMS at the start, which is how Adafactor sizes its updates: with
one rate for all, Adam moves the std-1 embedding and the std-0.016 W^Q by the same amount per step,
and the pretrained model then finetuned worse than a random one on the module task (README, "Why the
learning rate is scaled by RMS"). Finetuning uses plain AdamW at 1e-3 for both models. T5 itself used
the inverse square root 1 / sqrt(max(step, warmup)) for pretraining and a constant rate for
finetuning (both available: --schedule inverse_sqrt, --finetune_schedule constant); those suit
open-ended runs, while our budgets are fixed and short, and ending at a rate near zero is worth more.
"""

import copy
import hashlib
import math
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # so `common` imports from any cwd

import torch  # noqa: E402

from common import data, load_module  # noqa: E402
from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main  # noqa: E402
from common.report import Progress, format_table, print_report, write_report  # noqa: E402
from common.runtime import StopFlag, setup  # noqa: E402
from common.tokenizer import BPETokenizer  # noqa: E402

model_lib = load_module(Path(__file__).resolve().parent / "model.py")
T5, T5Config = model_lib.T5, model_lib.T5Config

SPECIAL_TOKENS = ("<pad>", "</s>", "<|endoftext|>")     # padding (= decoder start), EOS, document break

# (prefix, built-in task, metric): each task becomes "prefix: input" -> "target text"
TASKS = (("summarize", "docstring-summary", "rouge_l"),
         ("name", "docstring-name", "exact_match"),
         ("module", "docstring-module", "accuracy"))


@dataclass
class Config:
    # data
    data: str = "pydocs"              # pretraining corpus: "pydocs", "shakespeare", a .txt file or a folder of them
    vocab_size: int = 2048            # BPE vocabulary: 256 bytes + merges + 3 specials + the sentinels
    num_sentinels: int = 32           # sentinel tokens <extra_id_0> ... (one per noise span of an input)
    out_dir: str = "out/06_t5"        # tokenizer, checkpoints and report.json go here
    # model (T5-small is d_model 512, d_kv 64, 8 heads, d_ff 2048 (v1.1: 1024), 6 + 6 layers: --preset small)
    variant: str = "v1.1"             # "v1.1": gated-GELU FFN, untied LM head | "v1.0": ReLU FFN, tied, rescaled
    d_model: int = 128                # width of the residual stream
    d_kv: int = 32                    # width of one attention head
    num_heads: int = 4                # attention heads
    d_ff: int = 384                   # inner width of the feed-forward network
    num_layers: int = 2               # encoder blocks
    num_decoder_layers: int = 2       # decoder blocks
    pretrain_dropout: float = 0.0     # dropout while pretraining (T5 v1.1 turned it off there)
    finetune_dropout: float = 0.1     # dropout while finetuning
    # span corruption pretraining
    input_length: int = 64            # tokens of corrupted input: raw windows are cut so that it fills the context
    noise_density: float = 0.15       # fraction of the raw tokens dropped into the target
    mean_noise_span_length: float = 3.0  # mean length of a dropped span
    pretrain_iters: int = 1200        # optimizer steps of pretraining
    batch_size: int = 32              # pretraining sequences per step (per process)
    lr: float = 2e-2                  # peak learning rate of pretraining (after warmup), times each tensor's RMS
    schedule: str = "linear"          # pretraining after warmup: "linear" decay to 0, "inverse_sqrt" (T5's) or "constant"
    warmup_iters: int = 50            # linear warmup steps of pretraining
    weight_decay: float = 0.01        # AdamW decay of the weight matrices (not of norms or embeddings)
    scale_lr_by_rms: bool = True      # pretraining: each tensor's lr = lr x its initial RMS, as Adafactor scales updates
    grad_clip: float = 1.0            # clip the global gradient norm to this (0 = off)
    eval_interval: int = 400          # pretraining: validation loss (and a checkpoint) every this many steps
    eval_batches: int = 4             # validation batches per pretraining evaluation
    # multitask finetuning
    finetune_iters: int = 800         # optimizer steps of finetuning, the same for pretrained and scratch
    finetune_batch_size: int = 32     # finetuning examples per step (per process), the three tasks mixed
    finetune_lr: float = 1e-3         # peak learning rate of finetuning (after warmup)
    finetune_schedule: str = "linear"  # after warmup: "constant" (T5's finetuning) or "linear" decay to 0
    finetune_warmup_iters: int = 30   # linear warmup steps of finetuning
    finetune_eval_interval: int = 200  # finetuning: validation loss every this many steps; the best weights are kept
    finetune_val_examples: int = 300  # validation examples for that loss (a fixed sample of the mixed val split)
    tasks: str = "summarize,name,module"  # the tasks mixed in finetuning, by prefix (a comma-separated subset)
    max_source_len: int = 64          # task inputs are cut to this many tokens (EOS included)
    max_target_len: int = 32          # task targets are cut to this many tokens (EOS excluded)
    # evaluation and decoding
    num_beams: int = 4                # beam width of beam search
    length_penalty: float = 0.6       # beam score = sum log p / length^length_penalty
    max_eval_examples: int = 0        # evaluate on at most this many test examples per task (0 = all)
    num_samples: int = 3              # test predictions per task to print next to their references
    # run
    stage: str = "all"                # all | pretrain | finetune (finetune reads out_dir/pretrain.pt)
    device: str = "auto"              # auto | cpu | cuda | mps
    dtype: str = "auto"               # autocast dtype: auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False             # torch.compile the model for training
    seed: int = 1337                  # same seed, same run
    resume: bool = False              # continue from the checkpoints in out_dir
    log_interval: int = 50            # a progress line every this many steps


PRESETS = {
    "tiny": dict(vocab_size=320, num_sentinels=8, d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1,
                 num_decoder_layers=1, input_length=32, pretrain_iters=30, batch_size=8, warmup_iters=5,
                 eval_interval=15, eval_batches=2, finetune_iters=20, finetune_batch_size=8,
                 finetune_warmup_iters=4, finetune_eval_interval=10, finetune_val_examples=24,
                 max_source_len=32, max_target_len=8, num_beams=2, max_eval_examples=6, num_samples=1,
                 log_interval=10),
    "default": {},
    "small": dict(vocab_size=8192, num_sentinels=100, d_model=512, d_kv=64, num_heads=8, d_ff=1024,
                  num_layers=6, num_decoder_layers=6, input_length=512, batch_size=64, pretrain_iters=5000,
                  lr=1e-2, warmup_iters=500, eval_interval=500, eval_batches=8, finetune_iters=2000,
                  finetune_batch_size=64, finetune_lr=3e-4, finetune_warmup_iters=100, finetune_eval_interval=250,
                  finetune_val_examples=1000, max_source_len=256, max_target_len=48, log_interval=100),
}


# ----------------------------------------------------------------------------------------------------
# span corruption (tested in tests/test_t5.py)


def corrupted_lengths(tokens_length, noise_density, mean_noise_span_length):
    """(input length, target length) after corrupting `tokens_length` raw tokens, EOS included in both.

    noise = round(L * density) tokens in spans = round(noise / mean_span) spans; the input keeps the
    L - noise other tokens plus one sentinel per span; the target holds a sentinel per span plus the
    noise tokens. 148 raw tokens -> 22 noise tokens in 7 spans -> input 126 kept + 7 sentinels + EOS = 134,
    target 7 sentinels + 22 noise + EOS = 30.
    """
    num_noise = noise_token_count(tokens_length, noise_density)
    num_spans = noise_span_count(num_noise, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def noise_token_count(length, noise_density):
    return min(max(round(length * noise_density), 1), length - 1)      # at least one kept, one dropped


def noise_span_count(num_noise, mean_noise_span_length):
    return max(round(num_noise / mean_noise_span_length), 1)


def raw_length_for(input_length, noise_density, mean_noise_span_length):
    """The longest raw window whose corrupted input still fits in `input_length` tokens (so it fills
    the context: dropping spans frees room that more raw text takes). Returns (raw, target) lengths."""
    raw = input_length
    while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= input_length:
        raw += 1
    return raw, corrupted_lengths(raw, noise_density, mean_noise_span_length)[1]


def random_segmentation(num_items, num_segments, generator):
    """Split `num_items` into `num_segments` non-empty parts at random (num_segments - 1 distinct cuts
    among the num_items - 1 gaps). random_segmentation(10, 3, g) -> e.g. [4, 1, 5]."""
    cuts = torch.randperm(num_items - 1, generator=generator)[:num_segments - 1].sort().values + 1
    bounds = [0] + cuts.tolist() + [num_items]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def random_spans_noise_mask(length, noise_density, mean_noise_span_length, generator):
    """A list of `length` booleans, True = dropped: round(length * density) noise tokens in spans of
    mean length `mean_noise_span_length`, alternating with kept spans, starting with a kept one.

        length 12, density 0.25, mean span 1.5 -> 3 noise tokens in 2 spans, e.g.
        [F, F, F, T, T, F, F, F, F, T, F, F]
    """
    num_noise = noise_token_count(length, noise_density)
    num_spans = noise_span_count(num_noise, mean_noise_span_length)
    noise_lengths = random_segmentation(num_noise, num_spans, generator)
    kept_lengths = random_segmentation(length - num_noise, num_spans, generator)
    mask = []
    for kept, noise in zip(kept_lengths, noise_lengths):
        mask += [False] * kept + [True] * noise
    return mask


def span_corrupt(tokens, noise_mask, sentinel_ids, eos_id):
    """Replace each noise span by the next sentinel in the input; the target is each sentinel followed by
    the span it stands for, then EOS. With S0, S1 the first two sentinels:

        tokens  Thank you for inviting me to your party last week .
        mask            ^^^^^^^^^^^^^^^^             ^^^^
        input   Thank you S0 me to your party S1 week . </s>
        target  S0 for inviting S1 last </s>
    """
    inputs, targets, span = [], [], -1
    for i, (token, noise) in enumerate(zip(tokens, noise_mask)):
        if noise:
            if i == 0 or not noise_mask[i - 1]:                        # a new span starts here
                span += 1
                if span >= len(sentinel_ids):
                    raise UserError(f"an input needs more than {len(sentinel_ids)} sentinels: "
                                    f"raise --num_sentinels or lower --input_length")
                inputs.append(sentinel_ids[span])
                targets.append(sentinel_ids[span])
            targets.append(token)
        else:
            inputs.append(token)
    return inputs + [eos_id], targets + [eos_id]


# ----------------------------------------------------------------------------------------------------
# metrics (tested on hand-checked cases in tests/test_t5.py)


def rouge_tokens(text):
    """ROUGE's tokenisation: lowercase, anything but letters and digits separates words.
    "Return the `len()` of x." -> ["return", "the", "len", "of", "x"]"""
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def lcs_length(a, b):
    """Length of the longest common subsequence (not necessarily contiguous), by dynamic programming.
    lcs_length("the cat sat".split(), "the cat on the mat sat".split()) -> 3"""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F1 (Lin, 2004): with LCS the longest common subsequence of the two word sequences,
    P = LCS / |prediction|, R = LCS / |reference|, F1 = 2 P R / (P + R)."""
    hyp, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(metric, predictions, references):
    """Mean ROUGE-L F1, or the fraction of exact answers (exact match for names, accuracy for modules)."""
    if metric == "rouge_l":
        return sum(map(rouge_l, predictions, references)) / max(1, len(references))
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(1, len(references))


# ----------------------------------------------------------------------------------------------------
# optimisation


def get_lr(it, peak, warmup, schedule, total=None):
    """Learning rate at step `it` (0-based): linear warmup to `peak`, then
        inverse_sqrt: peak * sqrt(warmup / step)     (T5's pretraining schedule, rescaled to reach `peak`)
        constant:     peak                           (T5's finetuning schedule)
        linear:       peak * (total - step) / (total - warmup), down to 0 at the last step"""
    step = it + 1
    if step <= warmup:
        return peak * step / warmup
    if schedule == "inverse_sqrt":
        return peak * math.sqrt(warmup / step)
    if schedule == "linear":
        return peak * max(0.0, total - step + 1) / max(1, total - warmup)
    return peak


def configure_optimizer(model, lr, weight_decay, scale_lr_by_rms=False):
    """AdamW; weight decay on the weight matrices only (not on RMS-norm scales, embeddings or the
    position-bias table).

    scale_lr_by_rms: each tensor's learning rate is lr x its RMS at the start (at least 1e-3), as
    Adafactor, T5's optimizer, scales its updates by the parameter's RMS. Adam moves every entry by
    about lr per step whatever its size, and T5's initialisation spans two orders of magnitude: the
    embedding has std 1, W^Q std (d_model d_kv)^-0.5 = 0.016 at d_model 128. One lr cannot suit both."""
    groups = []
    for name, p in model.named_parameters():
        is_table = name == "shared.weight" or name.endswith("relative_attention_bias.weight")
        decay = weight_decay if p.dim() >= 2 and not is_table else 0.0
        scale = max(p.detach().float().pow(2).mean().sqrt().item(), 1e-3) if scale_lr_by_rms else 1.0
        groups.append({"params": [p], "weight_decay": decay, "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)


def flops_per_token(model, source_tokens, target_tokens):
    """Training FLOPs per token, 6 x the weights a token meets (forward 2, backward 4): a source token the
    encoder's, a target token the decoder's and the output layer's. Embedding lookups cost nothing."""
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters()) + model.config.vocab_size * model.config.d_model
    return 6 * (encoder * source_tokens + decoder * target_tokens) / (source_tokens + target_tokens)


def train_stage(name, model, get_batch, evaluate, total_iters, peak_lr, warmup_iters, schedule, ckpt_path,
                cfg, rt, tokens_per_iter, eval_interval, flops):
    """The loop both stages share: AdamW + schedule + clipping + AMP (+ DDP), periodic validation, the
    best weights kept, atomic checkpoints, --resume, Ctrl-C saves.

    get_batch(it) -> dict of model inputs for this process: a pure function of the step, so a resumed
    run sees the batches an uninterrupted one would. Returns (best val loss, best weights, seconds).
    """
    optimizer = configure_optimizer(model, peak_lr, cfg.weight_decay, cfg.scale_lr_by_rms and name == "pretrain")
    start_iter, best_loss, best_state, seconds = 0, math.inf, None, 0.0
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("stage") != name or ckpt.get("model_config") != asdict(model.config):
            raise UserError(f"{ckpt_path} was written for another stage or model config; "
                            f"use another --out_dir or drop --resume")
        load_model_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, best_loss, best_state, seconds = ckpt["iter"], ckpt["best_loss"], ckpt["best_model"], ckpt["seconds"]
        rt.log(f"{name}: resuming from {ckpt_path} at step {start_iter}/{total_iters}")
    train_model = rt.wrap(rt.maybe_compile(model))
    started = time.perf_counter()

    def save(it):
        if rt.is_main:
            save_checkpoint(ckpt_path, {
                "stage": name, "iter": it, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "best_loss": best_loss, "best_model": best_state, "model_config": asdict(model.config),
                "seconds": seconds + time.perf_counter() - started, "config": asdict(cfg)})

    progress = Progress(total_iters, tokens_per_iter * rt.world_size, log=rt.log, log_interval=cfg.log_interval,
                        flops_per_token=flops, device=rt.device, dtype=rt.dtype,
                        start_iter=start_iter, name=name)
    model.train()
    with StopFlag() as stop:
        for it in range(start_iter, total_iters):
            lr = get_lr(it, peak_lr, warmup_iters, schedule, total_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            batch = {k: v.to(rt.device) for k, v in get_batch(it).items()}
            with rt.autocast():
                _, loss = train_model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=batch["labels"])
            rt.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if it % cfg.log_interval == 0 and not math.isfinite(loss.item()):
                raise UserError(f"{name}: the loss became {loss.item()} at step {it + 1}; try a lower learning rate")
            progress.step(it, loss=loss.detach(), lr=lr)
            if (it + 1) % eval_interval == 0 or it + 1 == total_iters:
                val_loss = evaluate(model)
                model.train()
                if val_loss < best_loss:
                    best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
                rt.log(f"{name} step {it + 1}: val loss {val_loss:.4f}" + (" (best)" if best_loss == val_loss else ""))
                save(it + 1)
            stop_now = rt.all_reduce_mean(float(stop.requested)) > 0 if rt.ddp else stop.requested
            if stop_now:
                save(it + 1)
                rt.log(f"interrupted: saved {ckpt_path} at step {it + 1}; run again with --resume to continue")
                sys.exit(130)
    return best_loss, best_state, seconds + time.perf_counter() - started


@torch.no_grad()
def mean_loss(model, batches, rt):
    """Cross-entropy per target token over a list of batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        with rt.autocast():
            _, loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        n = (batch["labels"] != -100).sum().item()
        total, count = total + loss.item() * n, count + n
    return total / max(1, count)


@torch.no_grad()
def decode_all(model, sources, tokenizer, pad_id, max_new_tokens, num_beams, cfg, rt):
    """Decode every source (batched, similar lengths together) -> list of strings in the original order."""
    model.eval()
    predictions = [None] * len(sources)
    for indices in data.batch_indices([len(s) for s in sources], 64, shuffle=False, bucket=True):
        batch = data.pad_batch([sources[i] for i in indices], pad_id)
        with rt.autocast():
            outputs = model.generate(batch["input_ids"].to(rt.device), batch["attention_mask"].to(rt.device),
                                     max_new_tokens=max_new_tokens, num_beams=num_beams,
                                     length_penalty=cfg.length_penalty)
        for i, ids in zip(indices, outputs):
            predictions[i] = tokenizer.decode(ids).strip()
    return predictions


# ----------------------------------------------------------------------------------------------------
# the recipe


def main(argv=None):
    cfg = parse_config(Config, presets=PRESETS, argv=argv, description=__doc__.split("\n")[0])
    if cfg.stage not in ("all", "pretrain", "finetune"):
        raise UserError(f"unknown --stage {cfg.stage!r} (valid: all, pretrain, finetune)")
    if cfg.schedule not in ("inverse_sqrt", "constant", "linear"):
        raise UserError(f"unknown --schedule {cfg.schedule!r} (valid: inverse_sqrt, constant, linear)")
    if cfg.finetune_schedule not in ("constant", "linear"):
        raise UserError(f"unknown --finetune_schedule {cfg.finetune_schedule!r} (valid: constant, linear)")
    if cfg.variant not in ("v1.0", "v1.1"):
        raise UserError(f"unknown --variant {cfg.variant!r} (valid: v1.0, v1.1)")
    if not 0 < cfg.noise_density < 1 or cfg.mean_noise_span_length < 1:
        raise UserError("--noise_density must be in (0, 1) and --mean_noise_span_length at least 1")
    if cfg.max_source_len < 2 or cfg.max_target_len < 1 or cfg.input_length < 8:
        raise UserError("--max_source_len must be >= 2, --max_target_len >= 1 and --input_length >= 8")
    run_started = time.perf_counter()
    rt = setup(cfg.device, cfg.dtype, cfg.compile, cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rt.log(f"device {rt.device} | autocast {str(rt.dtype).replace('torch.', '')} | {torch.get_num_threads()} "
           f"CPU threads{f' | {rt.world_size} processes' if rt.ddp else ''} | out_dir {out_dir}")

    # ---- tokenizer: byte-level BPE with the sentinels as special tokens, trained once and cached
    documents = data.corpus_documents(cfg.data)
    sentinels = tuple(f"<extra_id_{i}>" for i in range(cfg.num_sentinels))
    specials = SPECIAL_TOKENS + sentinels
    if cfg.vocab_size < 256 + len(specials):
        raise UserError(f"--vocab_size {cfg.vocab_size} leaves no room: 256 bytes + {len(specials)} special tokens")
    tokenizer_path = out_dir / "tokenizer.json"
    corpus_id = "t5-" + hashlib.sha256("\n\n".join(documents).encode("utf-8")).hexdigest()[:16]   # names the corpus
    tokenizer = None
    if tokenizer_path.exists():
        try:
            tokenizer = BPETokenizer.load(tokenizer_path)
        except ValueError:
            tokenizer = None                                # corrupt: train it again
        if tokenizer is not None and (tokenizer.vocab_size != cfg.vocab_size or tokenizer.name != corpus_id
                                      or tuple(tokenizer.special_tokens) != specials):
            tokenizer = None                                # another corpus or vocabulary: train again
    if tokenizer is None:
        if rt.ddp and not rt.is_main:
            rt.barrier()                                    # rank 0 trains it, the others then load it
            tokenizer = BPETokenizer.load(tokenizer_path)
        else:
            t0 = time.perf_counter()
            tokenizer = BPETokenizer.train(documents, cfg.vocab_size, special_tokens=specials, name=corpus_id)
            tokenizer.save(tokenizer_path)
            rt.log(f"tokenizer: trained {cfg.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {tokenizer_path}")
            rt.barrier()
    elif rt.ddp:
        rt.barrier()
    pad_id, eos_id = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
    sentinel_ids = [tokenizer.token_to_id(s) for s in sentinels]

    # ---- pretraining data: raw windows long enough that the corrupted input fills input_length
    tokens = data.TokenCache(documents, tokenizer, out_dir / "tokens")
    raw_length, target_length = raw_length_for(cfg.input_length, cfg.noise_density, cfg.mean_noise_span_length)
    if noise_span_count(noise_token_count(raw_length, cfg.noise_density), cfg.mean_noise_span_length) > cfg.num_sentinels:
        raise UserError(f"--input_length {cfg.input_length} needs more noise spans than --num_sentinels "
                        f"{cfg.num_sentinels}: raise --num_sentinels")
    rt.log(f"corpus {cfg.data}: {tokens.num_tokens('train'):,} train / {tokens.num_tokens('val'):,} val tokens | "
           f"span corruption: {raw_length} raw tokens -> input {cfg.input_length}, target {target_length}")

    def span_corruption_batch(split, seed, batch_size):
        """Raw windows -> (corrupted input, sentinel target) pairs; every row has the same two lengths."""
        generator = torch.Generator().manual_seed(seed)
        windows, _ = tokens.get_batch(split, batch_size, raw_length, generator=generator)    # (B, raw)
        pairs = [span_corrupt(row, random_spans_noise_mask(raw_length, cfg.noise_density,
                                                           cfg.mean_noise_span_length, generator),
                              sentinel_ids, eos_id) for row in windows.tolist()]
        batch = data.pad_batch([p[0] for p in pairs], pad_id)
        batch["labels"] = data.pad_batch([p[1] for p in pairs], pad_id)["labels"]
        return batch

    # ---- finetuning data: three tasks as "prefix: input" -> "target", mixed in proportion to their sizes
    def encode_task(prefix, task, split):
        examples = data.load_task(task, split)
        if split == "test" and cfg.max_eval_examples:
            examples = examples[:cfg.max_eval_examples]
        inputs = [f"{prefix}: {e.get('input', e.get('text'))}" for e in examples]
        targets = [e.get("target", e.get("label")) for e in examples]
        sources = [ids[:cfg.max_source_len - 1] + [eos_id] for ids in tokenizer.encode_batch(inputs)]
        labels = [ids[:cfg.max_target_len] + [eos_id] for ids in tokenizer.encode_batch(targets)]
        return {"inputs": inputs, "targets": targets, "sources": sources, "labels": labels}

    chosen = [t for t in TASKS if t[0] in cfg.tasks.split(",")]
    if not chosen or len(chosen) != len(set(cfg.tasks.split(","))):
        raise UserError(f"--tasks {cfg.tasks!r}: choose from {','.join(t[0] for t in TASKS)}")
    tasks = {prefix: {split: encode_task(prefix, task, split) for split in ("train", "val", "test")}
             for prefix, task, _ in chosen}
    rt.log("tasks: " + " | ".join(f"{p}: " + "/".join(str(len(tasks[p][s]["sources"])) for s in ("train", "val", "test"))
                                  for p in tasks) + " (train/val/test)")
    mixed = {split: [(s, l) for p in tasks for s, l in zip(tasks[p][split]["sources"], tasks[p][split]["labels"])]
             for split in ("train", "val")}
    val_sample = torch.randperm(len(mixed["val"]), generator=torch.Generator().manual_seed(0))
    mixed["val"] = [mixed["val"][i] for i in sorted(val_sample[:cfg.finetune_val_examples].tolist())]

    def seq2seq_batch(pairs):
        batch = data.pad_batch([s for s, _ in pairs], pad_id)
        batch["labels"] = data.pad_batch([l for _, l in pairs], pad_id)["labels"]      # -100 at padding
        return batch

    train_lengths = [len(s) + len(l) for s, l in mixed["train"]]
    global_batch = cfg.finetune_batch_size * rt.world_size
    steps_per_epoch = math.ceil(len(train_lengths) / global_batch)

    def task_batch(it):
        """Length-bucketed, shuffled batches of the mixed train set; a new order every epoch."""
        epoch, k = divmod(it, steps_per_epoch)
        batches = data.batch_indices(train_lengths, global_batch, shuffle=True, seed=cfg.seed + epoch, bucket=True)
        share = batches[k][rt.rank::rt.world_size] or batches[k]
        return seq2seq_batch([mixed["train"][i] for i in share])

    val_task_batches = [seq2seq_batch([mixed["val"][i] for i in b])
                        for b in data.batch_indices([len(s) for s, _ in mixed["val"]], 64, shuffle=False, bucket=True)]

    # ---- model
    def new_model(dropout):
        gated = cfg.variant == "v1.1"
        model_config = T5Config(
            vocab_size=tokenizer.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
            num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
            dropout_rate=dropout, feed_forward_proj="gated-gelu" if gated else "relu",
            tie_word_embeddings=not gated, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
        return T5(model_config).to(rt.device)

    # ---- pretraining: span corruption, L = -sum_i log p(y_i | y_<i, x~)
    torch.manual_seed(cfg.seed)
    model = new_model(cfg.pretrain_dropout)
    rt.log(f"model: T5 {cfg.variant}, {model.num_parameters() / 1e6:.2f}M parameters, {cfg.num_layers}+"
           f"{cfg.num_decoder_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}")
    pretrain_path = out_dir / "pretrain.pt"
    val_batches = [span_corruption_batch("val", 10_000 + k, cfg.batch_size) for k in range(cfg.eval_batches)]
    report = {"chapter": "06_t5", "device": str(rt.device), "variant": cfg.variant, "params": model.num_parameters()}
    pretrain_tokens = cfg.batch_size * (cfg.input_length + target_length)
    finished = False
    if cfg.stage in ("all", "pretrain") and cfg.resume and pretrain_path.exists():
        finished = load_checkpoint(pretrain_path).get("iter") == cfg.pretrain_iters
    if cfg.stage in ("all", "pretrain") and not finished:
        _, _, pretrain_seconds = train_stage(
            "pretrain", model, lambda it: span_corruption_batch("train", cfg.seed * 1_000_003 + it * 1009 + rt.rank,
                                                                 cfg.batch_size),
            lambda m: mean_loss(m, val_batches, rt), cfg.pretrain_iters, cfg.lr, cfg.warmup_iters, cfg.schedule,
            pretrain_path, cfg, rt, pretrain_tokens, cfg.eval_interval,
            flops_per_token(model, cfg.input_length, target_length))
    else:                                                   # --stage finetune, or a finished run resumed
        ckpt = load_checkpoint(pretrain_path)
        if ckpt.get("model_config") != asdict(model.config):
            raise UserError(f"{pretrain_path} was pretrained with another model config or tokenizer; "
                            f"pretrain again (--stage pretrain) or use its flags")
        load_model_state(model, ckpt["model"], pretrain_path)
        pretrain_seconds = ckpt["seconds"]
        rt.log(f"pretraining: loaded {pretrain_path} (step {ckpt['iter']})")
    pretrain_val = mean_loss(model, val_batches, rt)
    report["pretrain"] = {"val_loss": round(pretrain_val, 4), "iters": cfg.pretrain_iters,
                          "seconds": round(pretrain_seconds, 1),
                          "tokens_per_second": round(cfg.pretrain_iters * pretrain_tokens * rt.world_size
                                                     / max(pretrain_seconds, 1e-9))}
    rt.log(f"pretraining done: val loss {pretrain_val:.4f} (predicting the dropped spans)")
    if cfg.stage == "pretrain":
        if rt.is_main:
            print_report(report, "06_t5 pretraining")
            write_report(out_dir / "report.json", report)
        return report
    pretrained_state = copy.deepcopy(model.state_dict())

    # ---- multitask finetuning: the same budget from the pretrained weights and from scratch
    models, finetune_info = {}, {}
    for init in ("pretrained", "scratch"):
        torch.manual_seed(cfg.seed + 1)                     # the scratch model's initialisation
        model = new_model(cfg.finetune_dropout)
        if init == "pretrained":
            model.load_state_dict(pretrained_state)
        best_loss, best_state, seconds = train_stage(
            f"finetune-{init}", model, task_batch, lambda m: mean_loss(m, val_task_batches, rt),
            cfg.finetune_iters, cfg.finetune_lr, cfg.finetune_warmup_iters, cfg.finetune_schedule,
            out_dir / f"finetune-{init}.pt", cfg, rt,
            round(cfg.finetune_batch_size * sum(train_lengths) / len(train_lengths)), cfg.finetune_eval_interval,
            flops_per_token(model, sum(len(s) for s, _ in mixed["train"]), sum(len(l) for _, l in mixed["train"])))
        model.load_state_dict(best_state)                   # early stopping: the best validation weights
        models[init] = model
        finetune_info[init] = {"val_loss": round(best_loss, 4), "seconds": round(seconds, 1)}
    if not rt.is_main:
        return None                                         # evaluation and the report happen on rank 0
    for init, model in models.items():
        save_checkpoint(out_dir / f"t5-{init}.pt", {"model": model.state_dict(), "model_config": asdict(model.config),
                                                    "tokenizer": tokenizer.fingerprint})

    # ---- evaluation on the test splits: greedy and beam search
    report["finetune"], predictions = {}, {}
    for prefix, task, metric in chosen:
        test = tasks[prefix]["test"]
        # long enough for the longest train target of the task (+ EOS)
        max_new = max(len(l) for l in tasks[prefix]["train"]["labels"])
        row = {"metric": metric, "search": "beam" if prefix == "summarize" else "greedy", "by_search": {}}
        t0 = time.perf_counter()
        for init, model in models.items():
            row["by_search"][init] = {}
            for search, beams in (("greedy", 1), ("beam", cfg.num_beams)):
                predicted = decode_all(model, test["sources"], tokenizer, pad_id, max_new, beams, cfg, rt)
                predictions[(prefix, init, search)] = predicted
                row["by_search"][init][search] = round(score(metric, predicted, test["targets"]), 4)
        # T5 decoded short answers greedily and summaries with beam search; the row's headline follows it
        row["pretrained"] = row["by_search"]["pretrained"][row["search"]]
        row["scratch"] = row["by_search"]["scratch"][row["search"]]
        train_examples = [{"target": t} for t in tasks[prefix]["train"]["targets"]]
        if metric == "rouge_l":                             # lead baseline: the input's first 12 words
            leads = [" ".join(text.split(": ", 1)[1].split()[:12]) for text in test["inputs"]]
            row["baseline"] = round(score(metric, leads, test["targets"]), 4)
        else:                                               # the most common train answer
            row["baseline"] = round(data.majority_baseline(train_examples, [{"target": t} for t in test["targets"]]), 4)
        row["seconds"] = round(sum(f["seconds"] for f in finetune_info.values()) + time.perf_counter() - t0, 1)
        row["test_examples"] = len(test["targets"])
        report["finetune"][prefix] = row
    report["finetune_runs"] = finetune_info
    report["samples"] = [{"task": prefix, "input": tasks[prefix]["test"]["inputs"][i][:100],
                          "reference": tasks[prefix]["test"]["targets"][i],
                          **{f"{init} {search}": predictions[(prefix, init, search)][i]
                             for init in models for search in ("greedy", "beam")}}
                         for prefix, _, _ in chosen for i in range(min(cfg.num_samples, len(tasks[prefix]["test"]["targets"])))]
    report["seconds"] = round(time.perf_counter() - run_started, 1)

    # ---- report
    print_report(report, "06_t5: span-corruption pretraining -> multitask text-to-text finetuning")
    rows = [{"task": p, "metric": r["metric"], **{f"{init} {search}": r["by_search"][init][search]
                                                    for init in models for search in ("greedy", "beam")}}
            for p, r in report["finetune"].items()]
    print(format_table(rows, ["task", "metric", "pretrained greedy", "pretrained beam", "scratch greedy", "scratch beam"]))
    print(f"(headline: beam search for summarize, greedy for name and module, as T5 decoded; "
          f"finetuning val loss pretrained {finetune_info['pretrained']['val_loss']} vs scratch "
          f"{finetune_info['scratch']['val_loss']})")
    print("\nsamples from the test splits:")
    for sample in report["samples"]:
        print(f"  [{sample['task']}] {' '.join(sample['input'].split())[:80]!r}")
        print(f"      reference: {sample['reference']!r} | pretrained: {sample['pretrained ' + ('beam' if sample['task'] == 'summarize' else 'greedy')]!r}"
              f" | scratch: {sample['scratch ' + ('beam' if sample['task'] == 'summarize' else 'greedy')]!r}")
    write_report(out_dir / "report.json", report)
    print(f"wrote {out_dir / 'report.json'} | total {report['seconds']:.0f}s")
    return report


if __name__ == "__main__":
    run_main(main)

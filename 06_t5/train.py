"""Pretrain T5 with span corruption, then finetune it on three tasks at once, all as text to text.

    python 06_t5/train.py                        # default: pydocs corpus, CPU, a few minutes
    python 06_t5/train.py --preset tiny          # seconds, for a smoke test
    python 06_t5/train.py --preset small --device cuda          # T5-small's shape on C4, on a GPU
    torchrun --nproc_per_node 2 06_t5/train.py --preset small   # data parallel
    python 06_t5/train.py --init_from out/06_t5/hf --task my_task.jsonl --out_dir out/mine   # finetune only

The recipe, top to bottom:
  config -> flags -> setup -> tokenizer (with the sentinels <extra_id_0>, <extra_id_1>, ...)
  -> span corruption: drop 15% of the tokens in spans of mean length 3, each span replaced by one
     sentinel in the input; the target lists the sentinels followed by the dropped spans, then EOS
  -> pretraining: L = -sum_i log p(y_i | y_<i, x~); the model is exported as a Hugging Face folder,
     out_dir/hf (or, with --init_from, such a folder is read instead of pretraining)
  -> multitask finetuning, one mixed run: "summarize: " body -> summary line, "name: " docstring ->
     the function's name, "module: " docstring -> its module (and --task FILE: one more task); from the
     pretrained weights and from scratch with the same budget
  -> test metrics per task (ROUGE-L, exact match, accuracy) with greedy and beam search
  -> report table + out/06_t5/report.json -> predictions next to references.

Optimiser: AdamW (betas 0.9, 0.98; weight decay on the matrices only) instead of T5's Adafactor, with
a linear warmup and then a linear decay to zero, in both stages. In pretraining each tensor's rate is
the peak (2e-2) times the tensor's RMS at the start, which is how Adafactor sizes its updates: with
one rate for all, Adam moves the std-1 embedding and the std-0.016 W^Q by the same amount per step,
and the pretrained model then finetuned worse than a random one on the module task (README, "Why the
learning rate is scaled by RMS"). Finetuning uses plain AdamW at 1e-3 for both models. T5 itself used
the inverse square root 1 / sqrt(max(step, warmup)) for pretraining and a constant rate for
finetuning (both available: --schedule inverse_sqrt, --ft_schedule constant); those suit
open-ended runs, while our budgets are fixed and short, and ending at a rate near zero is worth more.
"""

import copy
import json
import math
import sys
import time
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
T5, T5Config = model_lib.T5, model_lib.T5Config

SPECIAL_TOKENS = ("<pad>", "</s>", "<|endoftext|>")     # padding (= decoder start), EOS, document break
HF_TOKENIZER = "llmfs_tokenizer.json"                   # our tokenizer, in a Hugging Face folder beside config.json
STAGES = ("all", "pretrain", "finetune")
SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")

# (prefix, built-in task, metric): each task becomes "prefix: input" -> "target text"
TASKS = (("summarize", "docstring-summary", "rouge_l"),
         ("name", "docstring-name", "exact_match"),
         ("module", "docstring-module", "accuracy"))


@dataclass
class Config:
    # what to run
    stage: str = "all"                # all | pretrain | finetune (finetune reads out_dir/pretrain.pt, or --init_from)
    out_dir: str = "out/06_t5"        # tokenizer, checkpoints, report.json and the exported hf/ folder go here
    resume: bool = False              # continue every stage from its checkpoint in out_dir (Ctrl-C saves one)
    init_from: str = ""               # finetune a Hugging Face T5 folder with our llmfs_tokenizer.json (out/06_t5/hf) instead
    # data
    data: str = "pydocs"              # corpus: pydocs | shakespeare | wikitext-2 | tinystories | c4[:N] | file (.txt .txt.gz .jsonl .jsonl.gz) | folder
    text_field: str = "text"          # the field of a .jsonl corpus's rows that holds the text
    tokenizer_sample_mb: float = 100  # the BPE is trained on this many MB, spread over the corpus (pydocs: all of it)
    rebuild_cache: bool = False       # encode the corpus again (after an edit its fingerprint cannot see)
    vocab_size: int = 2048            # BPE vocabulary: 256 bytes + merges + 3 specials + the sentinels
    num_sentinels: int = 32           # sentinel tokens <extra_id_0> ... (one per noise span of an input)
    # model (T5-small is d_model 512, d_kv 64, 8 heads, d_ff 2048 (v1.1: 1024), 6 + 6 layers: --preset small)
    variant: str = "v1.1"             # "v1.1": gated-GELU FFN, untied LM head | "v1.0": ReLU FFN, tied, rescaled
    d_model: int = 128                # width of the residual stream
    d_kv: int = 32                    # width of one attention head
    num_heads: int = 4                # attention heads
    d_ff: int = 384                   # inner width of the feed-forward network
    num_layers: int = 2               # encoder blocks
    num_decoder_layers: int = 2       # decoder blocks
    dropout: float = 0.0              # dropout while pretraining (T5 v1.1 turned it off there; finetuning: ft_dropout)
    # span corruption pretraining
    input_length: int = 64            # tokens of corrupted input: raw windows are cut so that it fills the context
    noise_density: float = 0.15       # fraction of the raw tokens dropped into the target
    mean_noise_span_length: float = 3.0  # mean length of a dropped span
    max_iters: int = 1200             # optimizer steps of pretraining
    batch_size: int = 32              # pretraining sequences per step (per process)
    lr: float = 2e-2                  # peak learning rate of pretraining (after warmup), times each tensor's RMS
    schedule: str = "linear"          # pretraining after warmup: linear | cosine | inverse_sqrt (T5's) | constant
    min_lr_ratio: float = 0.0         # floor of the linear and cosine decay (both stages), as a fraction of the peak
    warmup_iters: int = 50            # linear warmup steps of pretraining
    weight_decay: float = 0.01        # AdamW decay of the weight matrices (not of norms or embeddings)
    scale_lr_by_rms: bool = True      # pretraining: each tensor's lr = lr x its initial RMS, as Adafactor scales updates
    grad_clip: float = 1.0            # clip the global gradient norm to this (0 = off)
    eval_interval: int = 400          # pretraining: validation loss (and a checkpoint) every this many steps
    eval_iters: int = 4               # validation batches per pretraining evaluation
    log_interval: int = 50            # a progress line every this many steps
    # multitask finetuning
    tasks: str = "summarize,name,module"  # the built-in tasks mixed in finetuning, by prefix (a comma-separated subset, or "")
    task: str = ""                    # your own .jsonl/.csv task file: one more task in the mix, prefixed by its name (README)
    ft_iters: int = 800               # optimizer steps of finetuning, the same for pretrained and scratch
    ft_batch_size: int = 32           # finetuning examples per step (per process), the tasks mixed
    ft_lr: float = 1e-3               # peak learning rate of finetuning (after warmup)
    ft_schedule: str = "linear"       # finetuning after warmup: linear | constant (T5's) | cosine | inverse_sqrt
    ft_warmup_iters: int = 30         # linear warmup steps of finetuning
    ft_dropout: float = 0.1           # dropout while finetuning
    ft_eval_interval: int = 200       # finetuning: validation loss every this many steps; the best weights are kept
    ft_val_examples: int = 300        # validation examples for that loss (a fixed sample of the mixed val split)
    max_source_len: int = 64          # task inputs are cut to this many tokens (EOS included)
    max_target_len: int = 32          # task targets are cut to this many tokens (EOS excluded)
    # evaluation and decoding
    num_beams: int = 4                # beam width of beam search
    length_penalty: float = 0.6       # beam score = sum log p / length^length_penalty
    max_eval_examples: int = 0        # evaluate on at most this many test examples per task (0 = all)
    num_samples: int = 3              # test predictions per task to print next to their references
    # runtime
    device: str = "auto"              # auto | cpu | cuda | mps
    dtype: str = "auto"               # autocast dtype: auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False             # torch.compile the model for training
    seed: int = 1337                  # same seed, same run


PRESETS = {
    # dropout on in pretraining too, so that the resume tests cover the saved RNG state
    "tiny": dict(vocab_size=320, num_sentinels=8, d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1,
                 num_decoder_layers=1, dropout=0.1, input_length=32, max_iters=30, batch_size=8, warmup_iters=5,
                 eval_interval=15, eval_iters=2, ft_iters=20, ft_batch_size=8, ft_warmup_iters=4,
                 ft_eval_interval=10, ft_val_examples=24, max_source_len=32, max_target_len=8, num_beams=2,
                 max_eval_examples=6, num_samples=1, log_interval=10),
    "default": {},
    # the GPU preset: T5-small's shape (v1.1; 46M parameters with this vocabulary), pretrained on C4 for
    # Chinchilla's compute-optimal ~20 tokens per parameter: a step reads 64 windows of 568 corpus tokens
    # (input 512 + target 114 once corrupted), 36k tokens, so 25,000 steps are 0.91B tokens, 20 per parameter.
    # A C4 shard is ~356k documents, ~800 MB of text, ~170M GPT-2 tokens (more of this smaller vocabulary):
    # c4:6 holds over 1B tokens, about one pass over its train split. (T5 itself: 524k steps of 65k tokens, 34B.)
    # Under torchrun each process takes its own 64 windows: divide --max_iters by the number of GPUs.
    "small": dict(data="c4:6", vocab_size=8192, num_sentinels=100, d_model=512, d_kv=64, num_heads=8, d_ff=1024,
                  num_layers=6, num_decoder_layers=6, input_length=512, batch_size=64, max_iters=25000,
                  lr=1e-2, warmup_iters=500, eval_interval=1000, eval_iters=8, ft_iters=2000,
                  ft_batch_size=64, ft_lr=3e-4, ft_warmup_iters=100, ft_eval_interval=250,
                  ft_val_examples=1000, max_source_len=256, max_target_len=48, log_interval=100),
}

# The values that decide what a folder's checkpoints are: a run with other values writes elsewhere.
RUN_FIELDS = ("init_from", "data", "text_field", "vocab_size", "num_sentinels", "variant", "d_model", "d_kv",
              "num_heads", "d_ff", "num_layers", "num_decoder_layers")


def user_task_prefix(cfg):
    """The prefix of the --task file's examples: its name without the suffix ("my_task: ...")."""
    return Path(cfg.task).stem if cfg.task else None


def check_config(cfg):
    """Every bad value -> one clear line (UserError), before anything slow runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown --stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    for name in ("schedule", "ft_schedule"):
        if getattr(cfg, name) not in SCHEDULES:
            raise UserError(f"unknown --{name} {getattr(cfg, name)!r} (valid: {', '.join(SCHEDULES)})")
    if cfg.variant not in ("v1.0", "v1.1"):
        raise UserError(f"unknown --variant {cfg.variant!r} (valid: v1.0, v1.1)")
    for name in ("num_sentinels", "d_model", "d_kv", "num_heads", "d_ff", "num_layers", "num_decoder_layers",
                 "max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval", "ft_iters",
                 "ft_batch_size", "ft_eval_interval", "ft_val_examples", "max_target_len", "num_beams"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "ft_warmup_iters", "weight_decay", "grad_clip", "max_eval_examples", "num_samples"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    for name in ("lr", "ft_lr", "tokenizer_sample_mb"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("dropout", "ft_dropout", "min_lr_ratio"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0 < cfg.noise_density < 1 or cfg.mean_noise_span_length < 1:
        raise UserError("--noise_density must be in (0, 1) and --mean_noise_span_length at least 1")
    if cfg.max_source_len < 2 or cfg.input_length < 8:
        raise UserError("--max_source_len must be >= 2 and --input_length >= 8")
    specials = len(SPECIAL_TOKENS) + cfg.num_sentinels
    if cfg.vocab_size < 256 + specials and not cfg.init_from:
        raise UserError(f"--vocab_size must be at least {256 + specials} (256 bytes + {specials} special tokens), "
                        f"got {cfg.vocab_size}")
    raw_length, _ = raw_length_for(cfg.input_length, cfg.noise_density, cfg.mean_noise_span_length)
    if noise_span_count(noise_token_count(raw_length, cfg.noise_density), cfg.mean_noise_span_length) > cfg.num_sentinels:
        raise UserError(f"--input_length {cfg.input_length} needs more noise spans than --num_sentinels "
                        f"{cfg.num_sentinels}: raise --num_sentinels")
    prefixes = [prefix for prefix, _, _ in TASKS]
    chosen = [name for name in cfg.tasks.split(",") if name]
    unknown = [name for name in chosen if name not in prefixes]
    if unknown or len(chosen) != len(set(chosen)):
        raise UserError(f"--tasks {cfg.tasks!r}: choose from {','.join(prefixes)} (each once), or pass --task FILE")
    if not chosen and not cfg.task and cfg.stage != "pretrain":
        raise UserError("no finetuning task: --tasks is empty and no --task FILE is given")
    if user_task_prefix(cfg) in chosen:
        raise UserError(f"--task {cfg.task}: its prefix {user_task_prefix(cfg)!r} is a built-in task's; rename the file")
    if cfg.init_from and cfg.stage == "pretrain":
        raise UserError(f"--init_from {cfg.init_from} replaces pretraining, so --stage pretrain would ignore it "
                        f"(use --stage all or finetune)")
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise UserError(f"--init_from {cfg.init_from}: no such folder (a Hugging Face T5 folder with config.json, "
                        f"model.safetensors and {HF_TOKENIZER})")


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
# the model to finetune, when this run does not pretrain it


def load_tokenizer_file(path):   # same as 03_transformer/train.py
    """A tokenizer file a run wrote; missing or corrupt -> one UserError line naming it."""
    try:
        return BPETokenizer.load(path)
    except (OSError, ValueError) as error:
        raise UserError(str(error)) from None


def read_pretrained(source):   # same as 03_transformer/train.py
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


def read_hf_tokenizer(folder):
    """The tokenizer of a Hugging Face T5 folder: our BPE file, llmfs_tokenizer.json, which `export_hf` writes
    beside config.json. Google's T5 folders have a SentencePiece vocabulary instead (spiece.model, or a
    Unigram tokenizer.json), which this repository does not read: one line saying so."""
    folder = Path(folder)
    if (folder / HF_TOKENIZER).is_file():
        return load_tokenizer_file(folder / HF_TOKENIZER)
    for name in ("spiece.model", "tokenizer.json"):
        if (folder / name).is_file():
            kind = "SentencePiece"
            if name == "tokenizer.json":
                try:
                    kind = f"a Hugging Face {json.loads((folder / name).read_text(encoding='utf-8'))['model']['type']}"
                except (OSError, ValueError, KeyError, TypeError):
                    kind = "a Hugging Face"
            raise UserError(f"--init_from {folder} has {name}, {kind} vocabulary: this repository reads BPE vocabularies "
                            f"only, its own {HF_TOKENIZER} (06_t5/train.py exports one with the model to out_dir/hf)")
    raise UserError(f"--init_from {folder} has no {HF_TOKENIZER} (06_t5/train.py exports one with the model to out_dir/hf)")


def read_hf_model(folder, tokenizer):
    """T5.from_pretrained(folder), checked against the folder's tokenizer: the same pad/EOS ids, every id in range."""
    try:
        model = T5.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UserError(f"--init_from {folder}: {error}") from None
    config = model.config
    ids = {token: tokenizer.special_tokens.get(token) for token in ("<pad>", "</s>")}
    expected = (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id)   # T5 starts decoding at <pad>
    if (ids["<pad>"], ids["</s>"], ids["<pad>"]) != expected or tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"--init_from {folder}: {HF_TOKENIZER} does not fit config.json (pad/EOS ids {ids} vs "
                        f"{expected[:2]}, vocabulary {tokenizer.vocab_size} vs {config.vocab_size})")
    return model


def export_hf(model, tokenizer, folder):
    """The pretrained model as a Hugging Face folder that --init_from (and transformers) reads: config.json +
    model.safetensors by `save_pretrained`, and our tokenizer beside them (written first: a folder with a
    config.json is complete)."""
    tokenizer.save(folder / HF_TOKENIZER)
    model.save_pretrained(folder)


def source_and_target(example):   # same as 03_transformer/train.py
    """A task example as (source text, target text), whatever its columns, as T5 casts every task as text
    to text: input -> target; instruction (+ input) -> response; text -> label."""
    if "target" in example:
        return example["input"], example["target"]
    if "response" in example:
        return "\n".join(part for part in (example["instruction"], example.get("input")) if part), example["response"]
    return example["text"], example["label"]


# ----------------------------------------------------------------------------------------------------
# optimisation


def get_lr(it, peak, warmup, total, schedule, min_ratio):   # same as 03_transformer/train.py
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


# same as 03_transformer/train.py, but for the forward line: T5 trains on plain cross-entropy (03 smooths labels)
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
                _, loss = train_model(**batch)
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
def mean_loss(model, batches, rt):   # same as 03_transformer/train.py
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
    check_config(cfg)
    run_started = time.perf_counter()
    rt = setup(cfg.device, cfg.dtype, cfg.compile, cfg.seed)
    out_dir = Path(cfg.out_dir)
    pretrain_path = out_dir / "pretrain.pt"

    # ---- what gets read before anything slow: the pretrained model to finetune (when this run does not
    # pretrain), the corpus (when it does) and the tasks' examples, so that bad input fails at once
    pretrains_here = cfg.stage != "finetune" and not cfg.init_from
    source_path, source_ckpt, tokenizer = None, None, None
    if cfg.init_from:
        source_path, tokenizer = Path(cfg.init_from), read_hf_tokenizer(cfg.init_from)
    elif not pretrains_here:
        source_path, source_ckpt, tokenizer = read_pretrained(pretrain_path)
    corpus = data.Corpus(cfg.data, cfg.text_field, log=rt.log, runtime=rt) if pretrains_here else None
    chosen = [task for task in TASKS if task[0] in cfg.tasks.split(",")]
    if cfg.task:                                        # a user's file: one more task in the mix
        chosen.append((user_task_prefix(cfg), cfg.task, None))
    examples = {} if cfg.stage == "pretrain" else {
        prefix: {split: data.load_task(task, split) for split in ("train", "val", "test")} for prefix, task, _ in chosen}
    if cfg.task and examples:                           # labels are scored as answers, texts by ROUGE-L
        prefix = user_task_prefix(cfg)
        chosen[-1] = (prefix, cfg.task, "accuracy" if "label" in examples[prefix]["train"][0] else "rouge_l")
    for prefix in examples:
        if cfg.max_eval_examples:
            examples[prefix]["test"] = examples[prefix]["test"][:cfg.max_eval_examples]
    if cfg.init_from:                                   # this folder holds finetunings of another run's model
        claim_out_dir(out_dir, {"init_from": str(source_path.resolve())}, ["init_from"])
    elif pretrains_here:
        claim_out_dir(out_dir, asdict(cfg), RUN_FIELDS)
    hf_model = read_hf_model(source_path, tokenizer) if cfg.init_from else None
    rt.log(f"device {rt.device} | autocast {str(rt.dtype).replace('torch.', '')} | {torch.get_num_threads()} "
           f"CPU threads{f' | {rt.world_size} processes' if rt.ddp else ''} | out_dir {out_dir}")

    # ---- tokenizer: byte-level BPE with the sentinels as special tokens, trained once on a sample spread over
    # the corpus (all of a small one), cached under the corpus's fingerprint and the sample's size, and kept
    # in out_dir/tokenizer.json; --resume and finetuning read that file
    sentinels = tuple(f"<extra_id_{i}>" for i in range(cfg.num_sentinels))
    if pretrains_here and cfg.resume and pretrain_path.exists():
        tokenizer = load_tokenizer_file(out_dir / "tokenizer.json")   # train_stage checks it against pretrain.pt
    elif pretrains_here:
        tokenizer = BPETokenizer.load_or_train(lambda: corpus.sample_texts(cfg.tokenizer_sample_mb * 1e6),
                                               cfg.vocab_size, special_tokens=SPECIAL_TOKENS + sentinels,
                                               name="06_t5", runtime=rt, log=rt.log,
                                               key=f"{corpus.fingerprint}-{cfg.tokenizer_sample_mb:g}")
        if rt.is_main:
            tokenizer.save(out_dir / "tokenizer.json")
    expected = SPECIAL_TOKENS + sentinels if pretrains_here else SPECIAL_TOKENS      # finetuning needs no sentinels
    if tuple(tokenizer.special_tokens)[:len(expected)] != expected:
        raise UserError(f"the tokenizer of {source_path or out_dir} was not made by this chapter (other special tokens)")
    pad_id, eos_id = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")

    # ---- the model's shape: from the flags when pretraining here, else the pretrained model's
    if pretrains_here:
        gated = cfg.variant == "v1.1"
        model_config = T5Config(
            vocab_size=tokenizer.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
            num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
            dropout_rate=cfg.dropout, feed_forward_proj="gated-gelu" if gated else "relu",
            tie_word_embeddings=not gated, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
    else:
        model_config = hf_model.config if cfg.init_from else T5Config(**source_ckpt["model_config"])
    variant = "v1.0" if model_config.feed_forward_proj == "relu" else "v1.1"
    report = {"chapter": "06_t5", "device": str(rt.device), "variant": variant}

    if pretrains_here:
        # ---- pretraining data: raw windows long enough that the corrupted input fills input_length
        sentinel_ids = [tokenizer.token_to_id(s) for s in sentinels]
        tokens = data.TokenCache(corpus, tokenizer, runtime=rt, log=rt.log, rebuild=cfg.rebuild_cache)
        raw_length, target_length = raw_length_for(cfg.input_length, cfg.noise_density, cfg.mean_noise_span_length)
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

        # ---- pretraining: span corruption, L = -sum_i log p(y_i | y_<i, x~)
        torch.manual_seed(cfg.seed)
        model = T5(model_config).to(rt.device)
        rt.log(f"model: T5 {cfg.variant}, {model.num_parameters() / 1e6:.2f}M parameters, {cfg.num_layers}+"
               f"{cfg.num_decoder_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}")
        val_batches = [span_corruption_batch("val", 10_000 + k, cfg.batch_size) for k in range(cfg.eval_iters)]
        pretrain_tokens = cfg.batch_size * (cfg.input_length + target_length)
        optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, scale_lr_by_rms=cfg.scale_lr_by_rms)
        _, _, pretrain_seconds = train_stage(
            "pretrain", model, optimizer,
            lambda it: span_corruption_batch("train", cfg.seed * 1_000_003 + it * 1009 + rt.rank, cfg.batch_size),
            lambda m: mean_loss(m, val_batches, rt), cfg.max_iters, cfg.lr, cfg.warmup_iters, cfg.schedule,
            cfg.eval_interval, pretrain_path, cfg, rt, pretrain_tokens,
            flops_per_token(model, cfg.input_length, target_length),
            {"tokenizer": tokenizer.fingerprint, "corpus_fingerprint": tokens.corpus_fingerprint})
        pretrain_val = mean_loss(model, val_batches, rt)
        report["params"] = model.num_parameters()
        report["pretrain"] = {"val_loss": round(pretrain_val, 4), "iters": cfg.max_iters,
                              "seconds": round(pretrain_seconds, 1),
                              "tokens_per_second": round(cfg.max_iters * pretrain_tokens * rt.world_size
                                                         / max(pretrain_seconds, 1e-9))}
        rt.log(f"pretraining done: val loss {pretrain_val:.4f} (predicting the dropped spans)")
        if rt.is_main:
            export_hf(model, tokenizer, out_dir / "hf")
            rt.log(f"exported the pretrained model to {out_dir / 'hf'} (finetune it elsewhere with --init_from)")
        if cfg.stage == "pretrain":
            if rt.is_main:
                merged = write_report(out_dir / "report.json", report, log=rt.log)
                print_report(merged, "06_t5 pretraining", log=rt.log)
            return report
        pretrained_state = copy.deepcopy(model.state_dict())
    else:
        pretrained_state = hf_model.state_dict() if cfg.init_from else source_ckpt["model"]
        if cfg.init_from:              # (--stage finetune of this folder keeps the pretraining figures it has)
            report["pretrain"] = {"init_from": str(source_path)}
        rt.log(f"pretrained model: {source_path}")

    # ---- finetuning data: each task as "prefix: input" -> "target", mixed in proportion to their sizes
    def encode_task(prefix, split_examples):
        pairs = [source_and_target(example) for example in split_examples]
        inputs = [f"{prefix}: {source}" for source, _ in pairs]
        targets = [target for _, target in pairs]
        sources = [ids[:cfg.max_source_len - 1] + [eos_id] for ids in tokenizer.encode_batch(inputs)]
        labels = [ids[:cfg.max_target_len] + [eos_id] for ids in tokenizer.encode_batch(targets)]
        return {"inputs": inputs, "targets": targets, "sources": sources, "labels": labels}

    tasks = {prefix: {split: encode_task(prefix, split_examples) for split, split_examples in examples[prefix].items()}
             for prefix, _, _ in chosen}
    rt.log("tasks: " + " | ".join(f"{p}: " + "/".join(str(len(tasks[p][s]["sources"])) for s in ("train", "val", "test"))
                                  for p in tasks) + " (train/val/test)")
    mixed = {split: [(s, l) for p in tasks for s, l in zip(tasks[p][split]["sources"], tasks[p][split]["labels"])]
             for split in ("train", "val")}
    val_sample = torch.randperm(len(mixed["val"]), generator=torch.Generator().manual_seed(0))
    mixed["val"] = [mixed["val"][i] for i in sorted(val_sample[:cfg.ft_val_examples].tolist())]

    def seq2seq_batch(pairs):
        batch = data.pad_batch([s for s, _ in pairs], pad_id)
        batch["labels"] = data.pad_batch([l for _, l in pairs], pad_id)["labels"]      # -100 at padding
        return batch

    train_lengths = [len(s) + len(l) for s, l in mixed["train"]]
    global_batch = cfg.ft_batch_size * rt.world_size
    steps_per_epoch = math.ceil(len(train_lengths) / global_batch)

    def task_batch(it):
        """Length-bucketed, shuffled batches of the mixed train set; a new order every epoch (a function of
        `it`); each process takes its share of the step's batch."""
        epoch, k = divmod(it, steps_per_epoch)
        batches = data.batch_indices(train_lengths, global_batch, shuffle=True, seed=cfg.seed + epoch, bucket=True)
        share = batches[k][rt.rank::rt.world_size] or batches[k]
        return seq2seq_batch([mixed["train"][i] for i in share])

    val_task_batches = [seq2seq_batch([mixed["val"][i] for i in b])
                        for b in data.batch_indices([len(s) for s, _ in mixed["val"]], 64, shuffle=False, bucket=True)]

    # ---- multitask finetuning: the same budget from the pretrained weights and from scratch
    models, finetune_info = {}, {}
    for init in ("pretrained", "scratch"):
        torch.manual_seed(cfg.seed + 1)                     # the scratch model's initialisation
        model = T5(replace(model_config, dropout_rate=cfg.ft_dropout)).to(rt.device)
        if init == "pretrained":
            model.load_state_dict(pretrained_state)
        optimizer = configure_optimizer(model, cfg.ft_lr, cfg.weight_decay)
        best_loss, best_state, seconds = train_stage(
            f"finetune-{init}", model, optimizer, task_batch, lambda m: mean_loss(m, val_task_batches, rt),
            cfg.ft_iters, cfg.ft_lr, cfg.ft_warmup_iters, cfg.ft_schedule, cfg.ft_eval_interval,
            out_dir / f"finetune-{init}.pt", cfg, rt,
            round(cfg.ft_batch_size * sum(train_lengths) / len(train_lengths)),
            flops_per_token(model, sum(len(s) for s, _ in mixed["train"]), sum(len(l) for _, l in mixed["train"])),
            {"tokenizer": tokenizer.fingerprint, "tasks": [list(task) for task in chosen]})
        model.load_state_dict(best_state)                   # early stopping: the best validation weights
        models[init] = model
        finetune_info[init] = {"val_loss": round(best_loss, 4), "seconds": round(seconds, 1)}
    if not rt.is_main:
        return None                                         # evaluation and the report happen on rank 0
    report["params"] = models["pretrained"].num_parameters()
    for init, model in models.items():
        save_checkpoint(out_dir / f"t5-{init}.pt", {"model": model.state_dict(), "model_config": asdict(model.config),
                                                    "tokenizer": tokenizer.fingerprint})

    # ---- evaluation on the test splits: greedy and beam search
    report["finetune"], predictions = {}, {}
    for prefix, task, metric in chosen:
        test = tasks[prefix]["test"]
        # long enough for the longest train target of the task (+ EOS)
        max_new = max(len(l) for l in tasks[prefix]["train"]["labels"])
        row = {"metric": metric, "search": "beam" if metric == "rouge_l" else "greedy", "by_search": {}}
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
    merged = write_report(out_dir / "report.json", report, log=rt.log)
    print_report(merged, "06_t5: span-corruption pretraining -> multitask text-to-text finetuning", log=rt.log)
    rows = [{"task": p, "metric": r["metric"], **{f"{init} {search}": r["by_search"][init][search]
                                                    for init in models for search in ("greedy", "beam")}}
            for p, r in report["finetune"].items()]
    rt.log(format_table(rows, ["task", "metric", "pretrained greedy", "pretrained beam", "scratch greedy", "scratch beam"]))
    rt.log(f"(headline: beam search for ROUGE-L (summaries), greedy for short answers, as T5 decoded; "
           f"finetuning val loss pretrained {finetune_info['pretrained']['val_loss']} vs scratch "
           f"{finetune_info['scratch']['val_loss']})")
    rt.log("\nsamples from the test splits:")
    for sample in report["samples"]:
        search = "beam" if report["finetune"][sample["task"]]["search"] == "beam" else "greedy"
        rt.log(f"  [{sample['task']}] {' '.join(sample['input'].split())[:80]!r}")
        rt.log(f"      reference: {sample['reference']!r} | pretrained: {sample['pretrained ' + search]!r}"
               f" | scratch: {sample['scratch ' + search]!r}")
    rt.log(f"wrote {out_dir / 'report.json'} | total {report['seconds']:.0f}s")
    return merged


if __name__ == "__main__":
    run_main(main)

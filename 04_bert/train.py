"""Pretrain a small BERT (masked LM + next sentence prediction), then finetune it three ways.

    python 04_bert/train.py                    # pretrain + finetune (full, linear probe, cloze prompt)
    python 04_bert/train.py --stage simcse     # optional: unsupervised SimCSE on the pretrained encoder
    python 04_bert/train.py --preset tiny      # seconds, for tests

The recipe, top to bottom:
1. a BPE tokenizer with the special tokens [PAD] [CLS] [SEP] [MASK] (trained once, cached);
2. pretraining data as the original create_pretraining_data.py makes it: documents -> sentences ->
   pairs (A, B) where B is the true continuation or, half of the time, a segment of another
   document; 15% of the tokens chosen for prediction (80% [MASK], 10% random, 10% unchanged);
3. pretraining with L_BERT = L_MLM + L_NSP, reporting MLM and NSP accuracy on held-out documents;
4. finetuning on `docstring-module` (which module does a docstring belong to?) from the pretrained
   encoder and from a random one, with the same budget: full finetuning, a frozen encoder with a
   linear classifier (probe), and a cloze prompt read through the MLM head;
5. the report table, out/04_bert/report.json, and a few fill-in-the-blank samples.
"""

import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # so `common` imports from any cwd
sys.path.insert(0, str(Path(__file__).resolve().parent))          # and model.py from this folder

from common import data                                                           # noqa: E402
from common.checkpoint import load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main                      # noqa: E402
from common.report import Progress, print_report, write_report                   # noqa: E402
from common.runtime import StopFlag, setup                                        # noqa: E402
from common.tokenizer import BPETokenizer                                         # noqa: E402
from model import BertClassifier, BertConfig, BertForPretraining, pretraining_loss  # noqa: E402

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
PROMPT = " This belongs to module"          # "<text> This belongs to module [MASK]."


@dataclass
class Config:
    # data
    data: str = "pydocs"              # pretraining corpus: pydocs, shakespeare, wikitext-2, a .txt file or folder
    task: str = "docstring-module"    # classification task: docstring-module or a .jsonl/.csv with text,label
    num_labels: int = 10              # docstring-module keeps the modules with the most train examples
    vocab_size: int = 4096            # BPE vocabulary: 256 bytes + merges + the 4 special tokens
    max_train_examples: int = 0       # finetune on at most this many train examples (0: all)
    # model
    n_layer: int = 2                  # encoder blocks (L=2, H=128 is Google's BERT-Tiny)
    n_head: int = 4                   # attention heads
    d_model: int = 128                # hidden size
    d_ff: int = 512                   # FFN inner size (4 * d_model in the paper)
    dropout: float = 0.1              # hidden and attention dropout
    # pretraining data (the original script's flags)
    seq_len: int = 64                 # max_seq_length: [CLS] A [SEP] B [SEP] is cut to this many tokens
    mask_prob: float = 0.15           # masked_lm_prob: fraction of tokens chosen for prediction
    max_predictions: int = 10         # max_predictions_per_seq: the cap on chosen tokens per sequence
    short_seq_prob: float = 0.1       # how often a shorter target length is drawn (train = test lengths)
    # pretraining optimisation
    pretrain_iters: int = 2000        # optimizer steps
    batch_size: int = 32              # sequences per step (per process under DDP)
    lr: float = 2e-3                  # peak learning rate, linear warmup then linear decay to 0
    warmup_iters: int = 100           # linear warmup steps
    weight_decay: float = 0.01        # AdamW decay on matrices (not on biases and LayerNorm)
    beta2: float = 0.98               # Adam's second-moment decay (BERT 0.999; RoBERTa's 0.98 is steadier at high lr)
    grad_clip: float = 1.0            # clip the global gradient norm (0: off)
    eval_interval: int = 500          # evaluate on the val documents every this many steps
    eval_batches: int = 16            # val batches per evaluation
    log_interval: int = 100           # print a progress line every this many steps
    # finetuning (identical for the pretrained and the random encoder)
    finetune_len: int = 96            # tokens of a finetuning input; longer texts are cut
    finetune_epochs: int = 3          # epochs of full and prompt finetuning (the paper: 2 to 4)
    finetune_batch_size: int = 32     # examples per finetuning step
    finetune_lr: float = 5e-4         # peak lr of full and prompt finetuning
    probe_epochs: int = 100           # epochs of the linear probe (cheap: the encoder runs once)
    probe_lr: float = 1e-2            # lr of the linear probe
    # SimCSE (optional stage)
    simcse_iters: int = 200           # steps of unsupervised SimCSE
    simcse_batch_size: int = 64       # sentences per step: each one's positive is itself, other dropout
    simcse_lr: float = 1e-4           # SimCSE learning rate
    temperature: float = 0.05         # tau in the InfoNCE loss
    # run
    stage: str = "all"                # all (pretrain + finetune) | pretrain | finetune | simcse
    device: str = "auto"              # auto | cpu | cuda | mps
    dtype: str = "auto"               # auto (bf16/fp16 autocast on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = False             # torch.compile the model for pretraining
    seed: int = 1337                  # same seed, same run
    out_dir: str = "out/04_bert"      # checkpoint, tokenizer, exported model and report.json
    resume: bool = False              # continue pretraining from out_dir/ckpt.pt


PRESETS = {
    "tiny": dict(vocab_size=300, n_layer=1, n_head=2, d_model=32, d_ff=64, seq_len=32, max_predictions=5,
                 pretrain_iters=30, batch_size=8, warmup_iters=5, eval_interval=15, eval_batches=2,
                 log_interval=10, finetune_len=32, finetune_epochs=1, max_train_examples=64, probe_epochs=5,
                 simcse_iters=5, simcse_batch_size=8),
    "default": {},
    "bert-mini-gpu": dict(vocab_size=8192, n_layer=4, n_head=4, d_model=256, d_ff=1024, seq_len=128,
                          max_predictions=20, pretrain_iters=20000, batch_size=128, lr=5e-4, warmup_iters=1000,
                          eval_interval=1000, eval_batches=20, log_interval=100, finetune_len=256,
                          finetune_epochs=4, finetune_lr=1e-4, compile=True),
}
MODEL_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "seq_len", "finetune_len")


def bert_config(cfg, vocab_size, pad_id):
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                      max_position_embeddings=max(cfg.seq_len, cfg.finetune_len), pad_token_id=pad_id)


# ----------------------------------------------------------------------------------------- pretraining data

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`*])")


def document_sentences(document):
    """A document as sentences: paragraphs (split at blank lines) with their lines joined, cut after
    ". ", "! ", "? " when a capital follows.
    >>> document_sentences("Return x.\\nUse it  well.\\n\\nSee also y. And z!")
    ['Return x.', 'Use it well.', 'See also y.', 'And z!']
    """
    sentences = []
    for paragraph in re.split(r"\n\s*\n", document):
        sentences += [s for s in _SENTENCE_END.split(" ".join(paragraph.split())) if s]
    return sentences


def truncate_pair(tokens_a, tokens_b, max_num_tokens, rng):
    """Cut the longer segment, one token at a time from its front or back (at random), until they fit."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        del longer[0 if rng.random() < 0.5 else -1]


def sentence_pairs(documents, index, rng, max_num_tokens, short_seq_prob):
    """The (A, B, is_random_next) pairs of one document, as create_instances_from_document makes them.

    Sentences are gathered into a chunk until it reaches the target length; A is the chunk's first
    a_end sentences (a_end random), B is the rest of the chunk (IsNext) or, with probability 1/2,
    sentences from a random other document starting at a random sentence (NotNext); the chunk's
    unused sentences then go back to be read again. `documents` are lists of sentences (token ids).

    One change: a chunk of a single sentence is cut at a random token into two segments (the paper's
    "sentence" is any span of contiguous text). The reference code always gives such a chunk a random
    B, which on a corpus of short docstrings would make ~70% of the pairs NotNext instead of 50%.
    """
    document = documents[index]
    # mostly fill the sequence; sometimes (short_seq_prob) a shorter one, so short inputs are seen too
    target_len = max_num_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_num_tokens)
    pairs, chunk, chunk_len, i = [], [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == len(document) - 1 or chunk_len >= target_len:
            whole_sentences = len(chunk)
            if len(chunk) == 1 and len(chunk[0]) >= 2:
                cut = rng.randint(1, len(chunk[0]) - 1)
                chunk = [chunk[0][:cut], chunk[0][cut:]]
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random_next = True
                other = rng.randrange(len(documents) - 1)
                other += other >= index                              # any document but this one
                other_document = documents[other]
                tokens_b = []
                for sentence in other_document[rng.randrange(len(other_document)):]:
                    tokens_b += sentence
                    if len(tokens_b) >= target_len - len(tokens_a):
                        break
                i -= max(0, whole_sentences - a_end)                # unused sentences: read them again
            else:
                is_random_next = False
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
            truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
            pairs.append((tokens_a, tokens_b, is_random_next))
            chunk, chunk_len = [], 0
        i += 1
    return pairs


def mask_tokens(tokens, rng, mask_prob, max_predictions, mask_id, special_ids, num_ordinary):
    """Choose min(max_predictions, max(1, round(len * mask_prob))) positions, never a special token;
    replace each by [MASK] (80%), a random ordinary token (10%) or keep it (10%).
    Returns (input tokens, sorted positions, original tokens at those positions)."""
    candidates = [i for i, t in enumerate(tokens) if t not in special_ids]
    rng.shuffle(candidates)
    num_to_predict = min(max_predictions, max(1, round(len(tokens) * mask_prob)))
    positions = sorted(candidates[:num_to_predict])
    masked = list(tokens)
    for p in positions:
        if rng.random() < 0.8:
            masked[p] = mask_id
        elif rng.random() < 0.5:
            pass                                        # kept: the model must not trust unmasked tokens
        else:
            masked[p] = rng.randrange(num_ordinary)     # ids 0..num_ordinary-1 are the non-special tokens
    return masked, positions, [tokens[p] for p in positions]


def make_instances(documents, rng, cfg, specials):
    """One pass over the documents: every pair as a masked training instance, shuffled."""
    cls_id, sep_id, mask_id = specials["[CLS]"], specials["[SEP]"], specials["[MASK]"]
    instances = []
    for index in range(len(documents)):
        for tokens_a, tokens_b, is_random_next in sentence_pairs(documents, index, rng, cfg.seq_len - 3,
                                                                 cfg.short_seq_prob):
            tokens = [cls_id] + tokens_a + [sep_id] + tokens_b + [sep_id]
            segments = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
            masked, positions, labels = mask_tokens(tokens, rng, cfg.mask_prob, cfg.max_predictions, mask_id,
                                                    set(specials.values()), min(specials.values()))
            instances.append((masked, segments, positions, labels, int(is_random_next)))
    rng.shuffle(instances)
    return instances


def collate(instances, pad_id, seq_len, max_predictions):
    """Instances -> fixed-shape tensors (B, seq_len) and (B, max_predictions); unused slots get label -100."""
    B = len(instances)
    batch = {"input_ids": torch.full((B, seq_len), pad_id), "token_type_ids": torch.zeros(B, seq_len, dtype=torch.long),
             "attention_mask": torch.zeros(B, seq_len, dtype=torch.long),
             "masked_positions": torch.zeros(B, max_predictions, dtype=torch.long),
             "mlm_labels": torch.full((B, max_predictions), -100), "nsp_labels": torch.zeros(B, dtype=torch.long)}
    for row, (tokens, segments, positions, labels, is_random_next) in enumerate(instances):
        batch["input_ids"][row, :len(tokens)] = torch.tensor(tokens)
        batch["token_type_ids"][row, :len(tokens)] = torch.tensor(segments)
        batch["attention_mask"][row, :len(tokens)] = 1
        batch["masked_positions"][row, :len(positions)] = torch.tensor(positions, dtype=torch.long)
        batch["mlm_labels"][row, :len(labels)] = torch.tensor(labels)
        batch["nsp_labels"][row] = is_random_next
    return batch


def pretraining_batches(documents, cfg, specials, pad_id, batch_size, start_iter=0):
    """An endless stream of batches; pass k over the documents uses random.Random(seed + k), so the
    stream is a pure function of the seed and --resume can skip to where it stopped."""
    served, pass_index = 0, 0
    while True:
        instances = make_instances(documents, random.Random(cfg.seed + pass_index), cfg, specials)
        for start in range(0, len(instances) - batch_size + 1, batch_size):
            if served >= start_iter:
                yield collate(instances[start:start + batch_size], pad_id, cfg.seq_len, cfg.max_predictions)
            served += 1
        pass_index += 1


@torch.no_grad()
def evaluate_pretraining(model, batches, rt):
    """Mean loss, MLM accuracy (over predicted positions) and NSP accuracy on fixed val batches."""
    model.eval()
    loss_sum, mlm_correct, mlm_total, nsp_correct, nsp_total = 0.0, 0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        with rt.autocast():
            mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                           batch["masked_positions"])
        loss, _, _ = pretraining_loss(mlm_logits, nsp_logits, batch["mlm_labels"], batch["nsp_labels"])
        loss_sum += loss.item()
        predicted = batch["mlm_labels"] != -100
        mlm_correct += (mlm_logits.argmax(-1) == batch["mlm_labels"])[predicted].sum().item()
        mlm_total += predicted.sum().item()
        nsp_correct += (nsp_logits.argmax(-1) == batch["nsp_labels"]).sum().item()
        nsp_total += len(batch["nsp_labels"])
    model.train()
    return {"val_loss": loss_sum / len(batches), "mlm_accuracy": mlm_correct / mlm_total,
            "nsp_accuracy": nsp_correct / nsp_total}


def get_lr(it, cfg):
    """Linear warmup to cfg.lr over warmup_iters, then linear decay to 0 at pretrain_iters (as BERT)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    return cfg.lr * max(0.0, (cfg.pretrain_iters - it) / max(1, cfg.pretrain_iters - cfg.warmup_iters))


def configure_optimizer(model, lr, weight_decay, beta2=0.999):
    """AdamW with decay on weight matrices only: biases and LayerNorm parameters are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-6)


def pretrain(cfg, rt, tokenizer, out_dir):
    """Stage 1: L_BERT = L_MLM + L_NSP on sentence pairs. Returns the pretraining report."""
    specials = tokenizer.special_tokens
    documents = data.corpus_documents(cfg.data)
    if len(documents) < 2:      # one text file: its paragraphs are the documents (NSP needs two or more)
        documents = [p for d in documents for p in d.split("\n\n") if p.strip()]
    sentences = [document_sentences(d) for d in documents]
    flat = encode_plain(tokenizer, [s for doc in sentences for s in doc])
    encoded, k = [], 0
    for doc in sentences:
        encoded.append([ids for ids in flat[k:k + len(doc)] if ids])
        k += len(doc)
    encoded = [doc for doc in encoded if doc]
    # every 10th document is held out: val pairs come from text the model never trained on
    train_docs = [doc for i, doc in enumerate(encoded) if i % 10 != 9]
    val_docs = [doc for i, doc in enumerate(encoded) if i % 10 == 9]
    if len(train_docs) < 2 or len(val_docs) < 2:
        raise UserError(f"the corpus {cfg.data!r} has {len(encoded)} documents; pretraining needs at least 20")
    val_instances = make_instances(val_docs, random.Random(cfg.seed - 1), cfg, specials)
    val_batches = [collate(val_instances[i:i + cfg.batch_size], specials["[PAD]"], cfg.seq_len, cfg.max_predictions)
                   for i in range(0, len(val_instances), cfg.batch_size)][:cfg.eval_batches]
    rt.log(f"pretraining data: {len(train_docs)} train / {len(val_docs)} val documents, "
           f"{sum(len(s) for d in train_docs for s in d):,} train tokens")

    torch.manual_seed(cfg.seed)
    model = BertForPretraining(bert_config(cfg, tokenizer.vocab_size, specials["[PAD]"])).to(rt.device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, cfg.beta2)
    ckpt_path = out_dir / "ckpt.pt"
    start_iter, history = 0, []
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        changed = [f for f in MODEL_FIELDS if ckpt.get("config", {}).get(f) != getattr(cfg, f)]
        if changed:
            raise UserError(f"{ckpt_path} was written with another {changed[0]} "
                            f"({ckpt.get('config', {}).get(changed[0])} vs {getattr(cfg, changed[0])})")
        load_model_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, history = ckpt["iter"], ckpt.get("history", [])
        rt.log(f"resumed from {ckpt_path} at iter {start_iter}")
    ddp_model = rt.wrap(rt.maybe_compile(model))

    def save(it):
        if rt.is_main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "iter": it, "config": asdict(cfg), "history": history,
                                        "tokenizer": tokenizer.fingerprint})

    # each step takes batch_size * world_size instances from the stream; this process trains on its share
    stream = pretraining_batches(train_docs, cfg, specials, specials["[PAD]"], cfg.batch_size * rt.world_size,
                                 start_iter)
    share = slice(rt.rank * cfg.batch_size, (rt.rank + 1) * cfg.batch_size)
    L, T, C = cfg.n_layer, cfg.seq_len, cfg.d_model
    flops_per_token = 6 * sum(p.numel() for p in model.bert.encoder.parameters()) + 12 * L * T * C
    progress = Progress(cfg.pretrain_iters, cfg.batch_size * cfg.seq_len * rt.world_size, log=rt.log,
                        log_interval=cfg.log_interval, flops_per_token=flops_per_token, device=rt.device,
                        dtype=rt.dtype, start_iter=start_iter, name="pretrain")
    with StopFlag() as stop:               # Ctrl-C: finish the step, save, exit; a 2nd Ctrl-C: at once
        for it in range(start_iter, cfg.pretrain_iters):
            batch = {k: v[share].to(rt.device) for k, v in next(stream).items()}
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with rt.autocast():
                mlm_logits, nsp_logits = ddp_model(batch["input_ids"], batch["token_type_ids"],
                                                   batch["attention_mask"], batch["masked_positions"])
            loss, mlm_loss, nsp_loss = pretraining_loss(mlm_logits, nsp_logits, batch["mlm_labels"],
                                                        batch["nsp_labels"])
            optimizer.zero_grad(set_to_none=True)
            rt.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            progress.step(it, loss=loss, lr=lr)
            if (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.pretrain_iters:
                metrics = evaluate_pretraining(model, val_batches, rt)
                history.append({"iter": it + 1, "train_loss": loss.item(), "mlm_loss": mlm_loss.item(),
                                "nsp_loss": nsp_loss.item(), **metrics})
                rt.log(f"eval iter {it + 1}: val loss {metrics['val_loss']:.4f} | MLM accuracy "
                       f"{metrics['mlm_accuracy']:.3f} | NSP accuracy {metrics['nsp_accuracy']:.3f}")
                save(it + 1)
            if rt.all_reduce_mean(float(stop.requested)) > 0:      # every rank stops at the same step
                save(it + 1)
                raise UserError(f"interrupted after iter {it + 1}; checkpoint saved to {ckpt_path}, "
                                f"continue with --resume")

    if not history or history[-1]["iter"] != cfg.pretrain_iters:    # e.g. resumed with nothing left to do
        history.append({"iter": cfg.pretrain_iters, **evaluate_pretraining(model, val_batches, rt)})
        save(cfg.pretrain_iters)
    if rt.is_main:
        model.save_pretrained(out_dir / "pretrained")   # config.json + model.safetensors, HF-loadable
    last = history[-1]
    return {"val_loss": last["val_loss"], "mlm_accuracy": last["mlm_accuracy"],
            "nsp_accuracy": last["nsp_accuracy"], "iters": cfg.pretrain_iters,
            "first_train_loss": history[0].get("train_loss"), "last_train_loss": last.get("train_loss"),
            "tokens_per_second": progress.average_tokens_per_second, "seconds": progress.seconds,
            "history": history}


# ----------------------------------------------------------------------------------------- finetuning

def clean(text):
    """Whitespace collapsed, as the pretraining sentences were."""
    return " ".join(text.split())


def macro_f1(predictions, targets, num_labels):
    """Mean over labels of F1 = 2 TP / (2 TP + FP + FN); a label never predicted nor present counts 0.
    >>> macro_f1([0, 0, 1], [0, 1, 1], 2)
    0.6666666666666666
    """
    scores = []
    for label in range(num_labels):
        tp = sum(p == label and t == label for p, t in zip(predictions, targets))
        fp = sum(p == label and t != label for p, t in zip(predictions, targets))
        fn = sum(p != label and t == label for p, t in zip(predictions, targets))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_labels


def scores(predictions, targets, num_labels):
    accuracy = sum(p == t for p, t in zip(predictions, targets)) / len(targets)
    return accuracy, macro_f1(predictions, targets, num_labels)


def linear_schedule(optimizer, total_steps, warmup_fraction=0.1):
    """lr(step) = peak * step / warmup for the first 10% of the steps, then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / (total_steps - warmup)))


def make_batch(sequences, pad_id, device):
    batch = data.pad_batch(sequences, pad_id)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def predict(model, logits_of, split, num_examples, rt):
    """Label predictions for every example of a split, in batches of similar length."""
    model.eval()
    predictions = []
    for start in range(0, num_examples, 64):
        with rt.autocast():
            logits = logits_of(model, split, list(range(start, min(start + 64, num_examples))))
        predictions += logits.argmax(-1).tolist()
    model.train()
    return predictions


def train_and_select(model, params, splits, num_labels, cfg, rt, epochs, lr, logits_of, name):
    """Train `params` for `epochs` on the train split and keep the state with the best val accuracy
    (early stopping); return test (accuracy, macro-F1) of that state and the seconds it all took.
    splits[s] = (token sequences, label ids); logits_of(model, split, indices) -> (B, num_labels)."""
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sequences, targets = splits["train"]
    steps_per_epoch = math.ceil(len(sequences) / cfg.finetune_batch_size)
    scheduler = linear_schedule(optimizer, epochs * steps_per_epoch)
    lengths = [len(s) for s in sequences]
    best_accuracy, best_state = -1.0, None
    model.train()
    for epoch in range(epochs):
        for batch in data.batch_indices(lengths, cfg.finetune_batch_size, shuffle=True, seed=cfg.seed + epoch,
                                        bucket=True):     # batches of similar lengths: little padding
            with rt.autocast():
                logits = logits_of(model, "train", batch)
            loss = F.cross_entropy(logits.float(), torch.tensor([targets[i] for i in batch], device=rt.device))
            optimizer.zero_grad(set_to_none=True)
            rt.scaler.scale(loss).backward()
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            scheduler.step()
        val_accuracy, _ = scores(predict(model, logits_of, "val", len(splits["val"][1]), rt), splits["val"][1],
                                 num_labels)
        if epochs <= 10 or (epoch + 1) % (epochs // 5) == 0:
            rt.log(f"  {name} epoch {epoch + 1}/{epochs}: train loss {loss.item():.4f} | val accuracy {val_accuracy:.3f}")
        if val_accuracy > best_accuracy:
            best_accuracy, best_state = val_accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    accuracy, f1 = scores(predict(model, logits_of, "test", len(splits["test"][1]), rt), splits["test"][1],
                          num_labels)
    return accuracy, f1, time.perf_counter() - started


def finetune_full(encoder, bert_cfg, splits, num_labels, cfg, rt, pad_id, name):
    """BertClassifier: logits = W_c Dropout(pooled [CLS]); every parameter trains."""
    torch.manual_seed(cfg.seed)
    model = BertClassifier(bert_cfg, num_labels).to(rt.device)
    if encoder is not None:
        model.bert.load_state_dict(encoder.state_dict())

    def logits_of(m, split, indices):
        input_ids, attention_mask = make_batch([splits[split][0][i] for i in indices], pad_id, rt.device)
        return m(input_ids, attention_mask=attention_mask)

    return train_and_select(model, list(model.parameters()), splits, num_labels, cfg, rt, cfg.finetune_epochs,
                            cfg.finetune_lr, logits_of, name)


def finetune_probe(encoder, bert_cfg, splits, num_labels, cfg, rt, pad_id, name):
    """The linear probe: BertClassifier(freeze_encoder=True), only W_c and b_c train. The frozen encoder
    runs in eval mode, so its pooled output is a fixed feature of each example: computed once here."""
    torch.manual_seed(cfg.seed)
    model = BertClassifier(bert_cfg, num_labels, freeze_encoder=True).to(rt.device)
    if encoder is not None:
        model.bert.load_state_dict(encoder.state_dict())
    model.train()                                  # the classifier's dropout on, the frozen encoder in eval
    features = {}
    with torch.no_grad():
        for split, (sequences, _) in splits.items():
            pooled = [model.bert(*make_batch(sequences[k:k + 64], pad_id, rt.device))[1].float()
                      for k in range(0, len(sequences), 64)]
            features[split] = torch.cat(pooled)                                # (N, d_model)

    def logits_of(m, split, indices):
        return m.classifier(m.dropout(features[split][indices]))

    return train_and_select(model, list(model.classifier.parameters()), splits, num_labels, cfg, rt,
                            cfg.probe_epochs, cfg.probe_lr, logits_of, name)


def finetune_prompt(pretrained, bert_cfg, splits, verbalizer, cfg, rt, pad_id, name):
    """Cloze prompt learning: "[CLS] <text> This belongs to module [MASK]. [SEP]", classified by the MLM
    head's logits at [MASK] restricted to the verbalizer tokens (one per label); all weights train.
    Returns (zero-shot test accuracy before any finetuning, test accuracy, macro-F1, seconds)."""
    torch.manual_seed(cfg.seed)
    model = BertForPretraining(bert_cfg).to(rt.device)
    if pretrained is not None:
        model.load_state_dict(pretrained.state_dict())
    verbalizer_ids = torch.tensor(verbalizer, device=rt.device)

    def logits_of(m, split, indices):
        sequences = [splits[split][0][i] for i in indices]
        input_ids, attention_mask = make_batch(sequences, pad_id, rt.device)
        mask_positions = torch.tensor([[len(s) - 3] for s in sequences], device=rt.device)  # ... [MASK] . [SEP]
        mlm_logits, _ = m(input_ids, attention_mask=attention_mask, masked_positions=mask_positions)  # (B, 1, V)
        return mlm_logits[:, 0, verbalizer_ids]                                                 # (B, num_labels)

    zero_shot, _ = scores(predict(model, logits_of, "test", len(splits["test"][1]), rt), splits["test"][1],
                          len(verbalizer))
    return (zero_shot, *train_and_select(model, list(model.parameters()), splits, len(verbalizer), cfg, rt,
                                         cfg.finetune_epochs, cfg.finetune_lr, logits_of, name))


def choose_verbalizer(labels, tokenizer):
    """One token per label, none shared: the label itself if it is one token ("asyncio"), else " label"
    if that is one token, else the first token of " label" (then of "label") no other label took."""
    verbalizer = []
    for label in labels:
        whole = [ids[0] for ids in (tokenizer.encode(label), tokenizer.encode(" " + label)) if len(ids) == 1]
        candidates = whole + tokenizer.encode(" " + label) + tokenizer.encode(label)
        free = [t for t in candidates if t not in verbalizer]
        if not free:
            raise UserError(f"no verbalizer token left for the label {label!r}; use a larger --vocab_size")
        verbalizer.append(free[0])
    return verbalizer


def encode_plain(tokenizer, texts):
    """Encode raw text: a special token's string inside it ("[SEP]" in a docstring) stays ordinary text."""
    pattern = re.compile("|".join(re.escape(s) for s in tokenizer.special_tokens))
    return tokenizer.encode_batch([pattern.sub(lambda m: m.group(0).lower(), t) for t in texts])


def finetune(cfg, rt, tokenizer, out_dir):
    """Stage 2: the three finetuning modes, each from the pretrained encoder and from a random one."""
    pretrained_dir = out_dir / "pretrained"
    if not (pretrained_dir / "config.json").is_file():
        raise UserError(f"no pretrained model in {pretrained_dir}: run the pretrain stage first")
    try:
        pretrained = BertForPretraining.from_pretrained(pretrained_dir, hidden_dropout_prob=cfg.dropout,
                                                        attention_probs_dropout_prob=cfg.dropout).to(rt.device)
    except ValueError as error:
        raise UserError(f"{pretrained_dir}: {error}") from None
    bert_cfg = pretrained.config
    if bert_cfg.vocab_size != tokenizer.vocab_size:
        raise UserError(f"{pretrained_dir} has vocab_size {bert_cfg.vocab_size}, the tokenizer {tokenizer.vocab_size}")
    specials = tokenizer.special_tokens
    cls_id, sep_id, mask_id, pad_id = (specials[s] for s in ("[CLS]", "[SEP]", "[MASK]", "[PAD]"))

    examples = {s: data.load_task(cfg.task, s, num_labels=cfg.num_labels) for s in ("train", "val", "test")}
    if "label" not in examples["train"][0]:
        raise UserError(f"{cfg.task} is not a classification task (needs text,label examples)")
    if cfg.max_train_examples:
        examples["train"] = random.Random(cfg.seed).sample(examples["train"], min(cfg.max_train_examples,
                                                                                   len(examples["train"])))
    labels = data.task_labels(examples["train"])
    label_id = {label: i for i, label in enumerate(labels)}
    for s in ("val", "test"):                           # a user file's rare label may miss the train split
        examples[s] = [e for e in examples[s] if e["label"] in label_id]
    verbalizer = choose_verbalizer(labels, tokenizer)
    prompt_ids = tokenizer.encode(PROMPT)
    period_id = tokenizer.encode(".")
    max_len = bert_cfg.max_position_embeddings
    classify, cloze = {}, {}
    for s, rows in examples.items():
        texts = encode_plain(tokenizer, [clean(e["text"]) for e in rows])
        targets = [label_id[e["label"]] for e in rows]
        classify[s] = ([[cls_id] + ids[:cfg.finetune_len - 2] + [sep_id] for ids in texts], targets)
        room = min(cfg.finetune_len, max_len) - len(prompt_ids) - len(period_id) - 3
        cloze[s] = ([[cls_id] + ids[:room] + prompt_ids + [mask_id] + period_id + [sep_id] for ids in texts], targets)
    rt.log(f"finetuning on {cfg.task}: {len(examples['train'])} train / {len(examples['val'])} val / "
           f"{len(examples['test'])} test examples, {len(labels)} labels; verbalizer "
           + ", ".join(f"{label}->{tokenizer.decode([v])!r}" for label, v in zip(labels, verbalizer)))

    baseline = data.majority_baseline(examples["train"], examples["test"])
    majority = label_id[max(labels, key=lambda label: (sum(e["label"] == label for e in examples["train"]), -labels.index(label)))]
    baseline_f1 = macro_f1([majority] * len(classify["test"][1]), classify["test"][1], len(labels))
    results = {}
    for mode, run in (("full", finetune_full), ("probe", finetune_probe), ("prompt", finetune_prompt)):
        row = {"metric": "accuracy", "pretrained": None, "scratch": None, "baseline": baseline, "seconds": 0.0}
        for init in ("pretrained", "scratch"):
            rt.log(f"{mode} finetuning, {init} encoder:")
            if mode == "prompt":
                zero_shot, accuracy, f1, seconds = run(pretrained if init == "pretrained" else None, bert_cfg, cloze,
                                                       verbalizer, cfg, rt, pad_id, f"{mode}/{init}")
                if init == "pretrained":
                    row["zero_shot"] = zero_shot          # the prompt read by the pretrained MLM, untrained
            else:
                accuracy, f1, seconds = run(pretrained.bert if init == "pretrained" else None, bert_cfg, classify,
                                            len(labels), cfg, rt, pad_id, f"{mode}/{init}")
            row[init], row[f"{init}_f1"] = accuracy, f1
            row["seconds"] += seconds
            rt.log(f"  -> {mode}/{init}: test accuracy {accuracy:.3f}, macro-F1 {f1:.3f} ({seconds:.1f}s)")
        row["baseline_f1"] = baseline_f1
        results[mode] = row
    return results, pretrained


# ----------------------------------------------------------------------------------------- SimCSE

def embed(encoder, sequences, pad_id, rt):
    """Sentence embeddings for retrieval: the final hidden state at [CLS], before the pooler (as SimCSE
    evaluates its unsupervised models)."""
    encoder.eval()
    with torch.no_grad():
        out = [encoder(*make_batch(sequences[k:k + 64], pad_id, rt.device))[0][:, 0].float()
               for k in range(0, len(sequences), 64)]
    encoder.train()
    return F.normalize(torch.cat(out), dim=-1)


def retrieval_top1(encoder, queries, keys, pad_id, rt):
    """Fraction of queries whose nearest key (cosine similarity) is their own (the same index)."""
    similarity = embed(encoder, queries, pad_id, rt) @ embed(encoder, keys, pad_id, rt).T    # (N, N)
    return (similarity.argmax(-1) == torch.arange(len(queries), device=similarity.device)).float().mean().item()


def simcse(cfg, rt, tokenizer, out_dir):
    """Unsupervised SimCSE: each sentence is encoded twice; dropout makes the two views differ.

        L = -log exp(sim(h_i, h_i+) / tau) / sum_j exp(sim(h_i, h_j+) / tau),  sim = cosine,

    the other sentences of the batch being the negatives. Evaluated by retrieval on docstring-summary
    test: for each docstring body, is its own summary line the nearest of all test summaries?
    """
    started = time.perf_counter()
    pretrained_dir = out_dir / "pretrained"
    if not (pretrained_dir / "config.json").is_file():
        raise UserError(f"no pretrained model in {pretrained_dir}: run the pretrain stage first")
    encoder = BertForPretraining.from_pretrained(pretrained_dir, hidden_dropout_prob=cfg.dropout,
                                                 attention_probs_dropout_prob=cfg.dropout).bert.to(rt.device)
    specials = tokenizer.special_tokens
    cls_id, sep_id, pad_id = specials["[CLS]"], specials["[SEP]"], specials["[PAD]"]

    def encode(texts):
        return [[cls_id] + ids[:cfg.finetune_len - 2] + [sep_id] for ids in encode_plain(tokenizer, map(clean, texts))]

    train = data.load_task("docstring-summary", "train")
    test = data.load_task("docstring-summary", "test")
    sentences = encode([e["input"] for e in train] + [e["target"] for e in train])   # no pairing used
    bodies, summaries = encode([e["input"] for e in test]), encode([e["target"] for e in test])
    before = retrieval_top1(encoder, bodies, summaries, pad_id, rt)
    rt.log(f"SimCSE: top-1 retrieval of the summary among {len(test)} test summaries before: {before:.3f}")

    optimizer = configure_optimizer(encoder, cfg.simcse_lr, cfg.weight_decay)
    rng = random.Random(cfg.seed)
    progress = Progress(cfg.simcse_iters, 0, log=rt.log, log_interval=cfg.log_interval, name="simcse")
    encoder.train()
    for it in range(cfg.simcse_iters):
        batch = rng.sample(sentences, min(cfg.simcse_batch_size, len(sentences)))
        input_ids, attention_mask = make_batch(batch + batch, pad_id, rt.device)   # each sentence twice
        with rt.autocast():
            _, pooled = encoder(input_ids, attention_mask=attention_mask)          # pooler = SimCSE's MLP
        z1, z2 = F.normalize(pooled.float(), dim=-1).chunk(2)                      # (B, C) each
        similarity = z1 @ z2.T / cfg.temperature                                   # (B, B)
        loss = F.cross_entropy(similarity, torch.arange(len(batch), device=rt.device))  # positives: diagonal
        optimizer.zero_grad(set_to_none=True)
        rt.scaler.scale(loss).backward()
        rt.scaler.step(optimizer)
        rt.scaler.update()
        progress.step(it, loss=loss, lr=cfg.simcse_lr)
    after = retrieval_top1(encoder, bodies, summaries, pad_id, rt)
    rt.log(f"SimCSE: top-1 retrieval after: {after:.3f}")
    return {"metric": "top1_retrieval", "before": before, "after": after,
            "baseline": 1 / len(test), "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------- samples

@torch.no_grad()
def fill_mask_samples(model, tokenizer, rt):
    """The pretrained MLM's top-3 guesses for a few blanks."""
    model.eval()
    mask_id = tokenizer.special_tokens["[MASK]"]
    samples = []
    for text in ("Return a new [MASK] with the items of the iterable.", "If the key is not found, raise [MASK].",
                 "Open the [MASK] and return a file object."):
        ids = [tokenizer.special_tokens["[CLS]"]] + tokenizer.encode(text, allowed_special={"[MASK]"}) \
            + [tokenizer.special_tokens["[SEP]"]]
        if len(ids) > model.config.max_position_embeddings:
            continue
        position = ids.index(mask_id)
        with rt.autocast():
            mlm_logits, _ = model(torch.tensor([ids], device=rt.device),
                                  masked_positions=torch.tensor([[position]], device=rt.device))
        guesses = [repr(tokenizer.decode([i])) for i in mlm_logits[0, 0].topk(3).indices.tolist()]
        samples.append(f"{text}  ->  {', '.join(guesses)}")
    return samples


# ----------------------------------------------------------------------------------------- main

def get_tokenizer(cfg, out_dir, rt):
    """The BPE tokenizer with [PAD] [CLS] [SEP] [MASK], trained once per corpus and vocab size."""
    corpus = data.load_corpus(cfg.data)
    digest = hashlib.sha1(corpus.encode("utf-8")).hexdigest()[:10]
    path = out_dir / f"tokenizer-{cfg.vocab_size}-{digest}.json"
    if path.is_file():
        try:
            return BPETokenizer.load(path)
        except ValueError as error:
            raise UserError(str(error)) from None
    if cfg.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1}")
    started = time.perf_counter()
    tokenizer = BPETokenizer.train(corpus, cfg.vocab_size, special_tokens=SPECIAL_TOKENS, name="bert-bpe")
    if rt.is_main:
        tokenizer.save(path)
    rt.log(f"trained a {tokenizer.vocab_size}-token BPE tokenizer in {time.perf_counter() - started:.1f}s -> {path}")
    return tokenizer


def main(argv=None):
    cfg = parse_config(Config, presets=PRESETS, argv=argv, description=__doc__.split("\n")[0])
    if cfg.stage not in ("all", "pretrain", "finetune", "simcse"):
        raise UserError(f"unknown stage {cfg.stage!r} (valid: all, pretrain, finetune, simcse)")
    for name in ("pretrain_iters", "batch_size", "seq_len", "n_layer", "d_model", "finetune_batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be positive")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"--d_model {cfg.d_model} is not a multiple of --n_head {cfg.n_head}")
    if cfg.seq_len < 8 or cfg.finetune_len < 16:
        raise UserError("--seq_len must be at least 8 and --finetune_len at least 16")
    started = time.perf_counter()
    rt = setup(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, seed=cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rt.log(f"04_bert on {rt.device} ({str(rt.dtype).removeprefix('torch.')}), stage {cfg.stage}, out_dir {out_dir}")
    tokenizer = get_tokenizer(cfg, out_dir, rt)
    if any(s not in tokenizer.special_tokens for s in SPECIAL_TOKENS):
        raise UserError(f"the tokenizer lacks the special tokens {SPECIAL_TOKENS}")

    report_path = out_dir / "report.json"
    report = {"chapter": "04_bert", "device": str(rt.device), "task": cfg.task}
    if cfg.stage in ("finetune", "simcse") and report_path.is_file():
        report = {**json.loads(report_path.read_text()), **report}     # keep the earlier stages' figures
    if cfg.stage in ("all", "pretrain"):
        report["pretrain"] = pretrain(cfg, rt, tokenizer, out_dir)
    if not rt.is_main:
        return None                        # finetuning is small: the main process does it alone
    if cfg.stage in ("all", "finetune"):
        report["finetune"], pretrained = finetune(cfg, rt, tokenizer, out_dir)
        report["samples"] = fill_mask_samples(pretrained, tokenizer, rt)
    if cfg.stage == "simcse":
        report["simcse"] = simcse(cfg, rt, tokenizer, out_dir)
    report["seconds"] = time.perf_counter() - started
    printable = {k: v for k, v in report.items() if k != "pretrain"}
    if "pretrain" in report:
        printable["pretrain"] = {k: v for k, v in report["pretrain"].items() if k != "history"}
    print_report(printable, "04_bert report")
    if "simcse" in report:
        rt.log("simcse: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in report["simcse"].items()))
    for sample in report.get("samples", []):
        rt.log(sample)
    write_report(report_path, report)
    rt.log(f"wrote {report_path}")
    return report


if __name__ == "__main__":
    run_main(main)

"""Pretrain a small BERT (masked LM + next sentence prediction), then finetune it three ways.

    python 04_bert/train.py                    # pretrain + finetune (full, linear probe, cloze prompt)
    python 04_bert/train.py --stage simcse     # optional: unsupervised SimCSE on the pretrained encoder
    python 04_bert/train.py --init_from DIR    # finetune a Hugging Face BERT folder instead of pretraining
    python 04_bert/train.py --preset tiny      # seconds, for tests

The recipe, top to bottom:
1. a BPE tokenizer with the special tokens [PAD] [CLS] [SEP] [MASK] (trained once, cached, saved with the run);
2. pretraining data as the original create_pretraining_data.py makes it: documents -> sentences ->
   pairs (A, B) where B is the true continuation or, half of the time, a segment of another
   document; 15% of the tokens chosen for prediction (80% [MASK], 10% random, 10% unchanged);
3. pretraining with L_BERT = L_MLM + L_NSP, reporting MLM and NSP accuracy on held-out documents;
4. finetuning on `docstring-module` (which module does a docstring belong to?) from the pretrained
   encoder and from a random one, with the same budget: full finetuning, a frozen encoder with a
   linear classifier (probe), and a cloze prompt read through the MLM head;
5. the report table, out/04_bert/report.json, and a few fill-in-the-blank samples.
"""

import json
import math
import random
import re
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # so `common` imports from any cwd
sys.path.insert(0, str(Path(__file__).resolve().parent))          # and model.py from this folder

from common import data                                                                         # noqa: E402
from common.checkpoint import claim_out_dir, load_checkpoint, load_model_state, save_checkpoint  # noqa: E402
from common.config import UserError, parse_config, run_main                                     # noqa: E402
from common.report import Progress, print_report, write_report                                  # noqa: E402
from common.runtime import StopFlag, setup                                                      # noqa: E402
from common.tokenizer import BPETokenizer                                                       # noqa: E402
from model import BertClassifier, BertConfig, BertForPretraining, pretraining_loss  # noqa: E402

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
PROMPT = " This belongs to module"          # "<text> This belongs to module [MASK]."
EXPORTED_TOKENIZER = "llmfs_tokenizer.json"  # our tokenizer, beside config.json in an exported folder


@dataclass
class Config:
    # data
    data: str = "pydocs"              # corpus: pydocs | shakespeare | wikitext-2 | tinystories | c4[:N] | file (.txt .txt.gz .jsonl .jsonl.gz) | folder
    text_field: str = "text"          # the field of a .jsonl corpus's rows that holds the text
    tokenizer_sample_mb: float = 100  # the BPE is trained on this many MB, spread over the corpus (pydocs: all of it)
    max_corpus_mb: float = 512        # the head of the corpus read into memory for the sentence pairs (NSP): this many MB at most
    task: str = "docstring-module"    # classification task: docstring-module or a .jsonl/.csv with text,label
    num_labels: int = 10              # docstring-module keeps the modules with the most train examples
    vocab_size: int = 4096            # BPE vocabulary: 256 bytes + merges + the 4 special tokens
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
    max_iters: int = 2000             # pretraining optimizer steps
    batch_size: int = 32              # sequences per step (per process under DDP)
    lr: float = 2e-3                  # peak learning rate, linear warmup then linear decay to 0
    warmup_iters: int = 100           # linear warmup steps
    weight_decay: float = 0.01        # AdamW decay on matrices (not on biases and LayerNorm)
    beta2: float = 0.98               # Adam's second-moment decay (BERT 0.999; RoBERTa's 0.98 is steadier at high lr)
    grad_clip: float = 1.0            # clip the global gradient norm, in pretraining and finetuning (0: off)
    eval_interval: int = 500          # evaluate on the val documents every this many steps
    eval_iters: int = 16              # val batches per evaluation
    log_interval: int = 100           # print a progress line every this many steps
    # finetuning (identical for the pretrained and the random encoder)
    ft_max_len: int = 96              # tokens of a finetuning input; longer texts are cut
    ft_epochs: int = 3                # full and prompt finetuning epochs (paper: 2 to 4); by epochs, so no --ft_iters
    ft_batch_size: int = 32           # examples per finetuning step
    ft_lr: float = 5e-4               # peak lr of full and prompt finetuning
    max_ft_examples: int = 0          # finetune on at most this many train examples (0: all)
    probe_epochs: int = 100           # epochs of the linear probe (cheap: the encoder runs once)
    probe_lr: float = 1e-2            # lr of the linear probe
    # SimCSE (optional stage)
    simcse_iters: int = 200           # steps of unsupervised SimCSE
    simcse_batch_size: int = 64       # sentences per step: each one's positive is itself, other dropout
    simcse_lr: float = 1e-4           # SimCSE learning rate
    temperature: float = 0.05         # tau in the InfoNCE loss
    # run
    stage: str = "all"                # all (pretrain + finetune) | pretrain | finetune | simcse
    init_from: str = ""               # a Hugging Face BERT folder (weights, tokenizer) to finetune instead of pretraining
    device: str = "auto"              # auto | cpu | cuda | mps
    dtype: str = "auto"               # auto (bf16/fp16 autocast on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = False             # torch.compile the model for pretraining
    seed: int = 1337                  # same seed, same run
    out_dir: str = "out/04_bert"      # checkpoint, tokenizer, exported model and report.json
    resume: bool = False              # continue pretraining from out_dir/ckpt.pt


PRESETS = {
    "tiny": dict(vocab_size=300, n_layer=1, n_head=2, d_model=32, d_ff=64, seq_len=32, max_predictions=5,
                 max_iters=30, batch_size=8, warmup_iters=5, eval_interval=15, eval_iters=2,
                 log_interval=10, ft_max_len=32, ft_epochs=1, max_ft_examples=64, probe_epochs=5,
                 simcse_iters=5, simcse_batch_size=8),
    "default": {},
    # BERT-Mini's shape (5.5M parameters with this vocabulary), pretrained on C4 for Chinchilla's compute-optimal
    # ~20 tokens per parameter: 6,500 steps of 128 x 128 tokens are 106M tokens, 19.5 per parameter (counted
    # over every input position; MLM predicts 15% of them, one reason BERT itself trained far longer, on
    # ~128B tokens). A C4 shard is ~356k documents, ~800 MB of text, ~170M GPT-2 tokens: the first 512 MB of
    # c4:1 (--max_corpus_mb) hold ~110M GPT-2 tokens and more of this smaller vocabulary, about one pass.
    "bert-mini-gpu": dict(data="c4:1", vocab_size=8192, n_layer=4, n_head=4, d_model=256, d_ff=1024, seq_len=128,
                          max_predictions=20, max_iters=6500, batch_size=128, lr=5e-4, warmup_iters=650,
                          eval_interval=1000, eval_iters=20, log_interval=100, ft_max_len=256,
                          ft_epochs=4, ft_lr=1e-4, compile=True),
}
STAGES = ("all", "pretrain", "finetune", "simcse")
# What decides a run folder's checkpoints (see claim_out_dir): another value is another run.
CLAIMED_FIELDS = ("data", "text_field", "max_corpus_mb", "vocab_size", "n_layer", "n_head", "d_model", "d_ff", "seq_len",
                  "ft_max_len", "init_from")
CHECKPOINT_KEYS = {"model", "optimizer", "scaler", "rng", "iter", "history", "config", "bert_config", "tokenizer"}
MIN_DOCUMENTS = 20     # every 10th document is held out, and each side needs two for NSP's random B


def check_config(cfg):
    """Every bad value -> one clear line (UserError), before anything slow runs."""
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage {cfg.stage!r} (valid: {', '.join(STAGES)})")
    for name in ("n_layer", "n_head", "d_model", "d_ff", "max_predictions", "max_iters", "batch_size",
                 "eval_interval", "eval_iters", "log_interval", "ft_epochs", "ft_batch_size", "probe_epochs",
                 "simcse_iters", "simcse_batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "max_ft_examples", "weight_decay", "grad_clip"):
        if not getattr(cfg, name) >= 0:                                        # `not >=`: NaN fails too
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    for name in ("lr", "ft_lr", "probe_lr", "simcse_lr", "temperature", "tokenizer_sample_mb", "max_corpus_mb"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name, low, high in (("dropout", 0, 0.99), ("mask_prob", 0.01, 0.99), ("short_seq_prob", 0, 1),
                            ("beta2", 0, 0.9999)):
        if not low <= getattr(cfg, name) <= high:
            raise UserError(f"--{name} must be between {low} and {high}, got {getattr(cfg, name)}")
    if cfg.num_labels < 2:
        raise UserError(f"--num_labels must be at least 2, got {cfg.num_labels}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"--d_model {cfg.d_model} is not a multiple of --n_head {cfg.n_head}")
    if cfg.seq_len < 8:
        raise UserError(f"--seq_len must be at least 8 ([CLS] A [SEP] B [SEP] and a few tokens), got {cfg.seq_len}")
    if cfg.ft_max_len < 16:
        raise UserError(f"--ft_max_len must be at least 16 (the cloze prompt alone takes 9), got {cfg.ft_max_len}")
    if cfg.vocab_size < 256 + len(SPECIAL_TOKENS) + 1 and not cfg.init_from:
        raise UserError(f"--vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes, "
                        f"{len(SPECIAL_TOKENS)} special tokens and a merge), got {cfg.vocab_size}")
    if cfg.init_from:
        if not Path(cfg.init_from).is_dir():
            raise UserError(f"--init_from {cfg.init_from}: no such folder (expected a Hugging Face BERT folder)")
        if cfg.stage == "pretrain":
            raise UserError(f"--init_from {cfg.init_from} replaces pretraining, so --stage pretrain would ignore "
                            f"it: use --stage all, finetune or simcse")
        if cfg.resume:
            raise UserError(f"--resume continues this run's pretraining and --init_from {cfg.init_from} skips "
                            f"pretraining: pass one of them")
    if cfg.resume and cfg.stage not in ("all", "pretrain"):
        raise UserError(f"--resume continues pretraining, which --stage {cfg.stage} does not run")


# ----------------------------------------------------------------------------------------- tokenizer

def encode_plain(tokenizer, texts):
    """Encode raw text: a special token's string inside it ("[SEP]" in a docstring) stays ordinary text."""
    pattern = re.compile("|".join(re.escape(s) for s in tokenizer.special_tokens))
    return tokenizer.encode_batch([pattern.sub(lambda m: m.group(0).lower(), t) for t in texts])


def load_run_tokenizer(path, fingerprint):
    """The tokenizer a run saved beside its checkpoint; it must be the one the checkpoint was trained with."""
    try:
        tokenizer = BPETokenizer.load(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the checkpoint beside it cannot be read without its tokenizer") from None
    except ValueError as error:
        raise UserError(str(error)) from None
    if tokenizer.fingerprint != fingerprint:
        raise UserError(f"{path} is not the tokenizer the checkpoint beside it was trained with "
                        f"(fingerprint {tokenizer.fingerprint}, the checkpoint's {fingerprint})")
    return tokenizer


class WordPieceTokenizer:
    """BERT's own tokenizer, for an official checkpoint's vocab.txt (one token per line; the line number
    is the id). Two steps, as in the reference tokenization.py:

    1. basic: clean the text, lower-case it and strip accents (uncased models), split at whitespace,
       around every punctuation character and every CJK character;
    2. WordPiece: each word becomes the longest vocabulary entry that starts it, then the longest "##"
       continuation of the rest, and so on (greedy longest-match-first); a word with a piece that no
       entry matches, or longer than 100 characters, is [UNK].
           "unaffable" -> ["un", "##aff", "##able"]
    """

    def __init__(self, vocab, lower_case=True, name="wordpiece"):
        self.vocab = vocab                                             # token -> id
        self.tokens = {i: token for token, i in vocab.items()}
        self.lower_case = lower_case
        self.name = name
        self.special_tokens = {t: vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab}
        self.vocab_size = max(vocab.values()) + 1

    @classmethod
    def load(cls, folder):
        """vocab.txt of a folder; lower-cased unless its tokenizer_config.json says do_lower_case false."""
        folder = Path(folder)
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        vocab = {token: i for i, token in enumerate(line.rstrip("\r") for line in lines) if token}
        lower_case = True
        if (folder / "tokenizer_config.json").is_file():
            try:
                lower_case = bool(json.loads((folder / "tokenizer_config.json").read_text()).get("do_lower_case", True))
            except (ValueError, AttributeError):
                raise UserError(f"{folder / 'tokenizer_config.json'} is not a JSON object") from None
        return cls(vocab, lower_case=lower_case, name=folder.name)

    def basic_tokens(self, text):
        """'Héllo, World!' -> ['hello', ',', 'world', '!'] (uncased)."""
        text = "".join(" " if is_whitespace(c) else c for c in text
                       if not (ord(c) in (0, 0xFFFD) or is_control(c)))
        text = unicodedata.normalize("NFC", "".join(f" {c} " if is_cjk(c) else c for c in text))
        words = []
        for word in text.split():
            if self.lower_case:                                        # and strip the accents: é -> e
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            piece = ""
            for c in word:
                if is_punctuation(c):
                    words += [piece, c] if piece else [c]
                    piece = ""
                else:
                    piece += c
            if piece:
                words.append(piece)
        return words

    def wordpiece(self, word):
        if len(word) > 100:
            return [self.vocab["[UNK]"]]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):                    # the longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.vocab["[UNK]"]]                            # no entry matches: the whole word
        return ids

    def encode(self, text, allowed_special=()):
        """Token ids; the special tokens in `allowed_special` ("[MASK]") are read as those tokens."""
        parts = re.split("(" + "|".join(map(re.escape, allowed_special)) + ")", text) if allowed_special else [text]
        ids = []
        for part in parts:
            if part in allowed_special:
                ids.append(self.vocab[part])
            else:
                ids += [i for word in self.basic_tokens(part) for i in self.wordpiece(word)]
        return ids

    def encode_batch(self, texts):
        return [self.encode(text) for text in texts]

    def decode(self, ids):
        text = " ".join(self.tokens.get(i, "[UNK]") for i in ids)
        return text.replace(" ##", "")


def is_whitespace(c):
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def is_control(c):
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def is_punctuation(c):
    """The reference's rule: ASCII symbols ($, `, ^...) count as punctuation, and every Unicode P* category."""
    return 33 <= ord(c) <= 47 or 58 <= ord(c) <= 64 or 91 <= ord(c) <= 96 or 123 <= ord(c) <= 126 \
        or unicodedata.category(c).startswith("P")


def is_cjk(c):
    """A CJK ideograph (not Hangul, Hiragana or Katakana: those are split into words by spaces)."""
    return any(low <= ord(c) <= high for low, high in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                                      (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                                      (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


# ----------------------------------------------------------------------------------------- pretraining data

def pretraining_documents(corpus, max_corpus_mb, log=print):
    """The head of the corpus, at most `max_corpus_mb` MB of text, as a list of documents: the pairs of next
    sentence prediction are built in memory, and that bounds it. pydocs and JSON lines come as documents (a
    reference page, a docstring, a row); a corpus with text files follows BERT's pretraining-data format, blank
    lines between documents, so a single file (or a folder of two) still gives the many documents NSP needs."""
    documents = corpus.documents(max_bytes=max_corpus_mb * 1e6)
    characters = sum(map(len, documents))
    if characters >= max_corpus_mb * 1e6:       # Corpus.documents stopped there: the corpus holds more
        log(f"pretraining data: the first {characters / 1e6:,.1f} MB of {corpus.spec} (--max_corpus_mb "
            f"{max_corpus_mb:g}); the rest of the corpus is not read")
    if any(path.name.lower().endswith((".txt", ".txt.gz")) for path in corpus.files):
        documents = [d for text in documents for d in re.split(r"\n\s*\n", text)]
    documents = [d for d in documents if d.strip()]
    if len(documents) < MIN_DOCUMENTS:
        raise UserError(f"--data {corpus.spec} has {len(documents)} documents (blank-line-separated paragraphs); "
                        f"BERT pretraining needs at least {MIN_DOCUMENTS}: every 10th is held out for "
                        f"validation, and next sentence prediction takes its random B from another document")
    return documents


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
    """An endless stream of batches. Pass k over the documents (new pairs, new masks: dynamic masking)
    uses random.Random(seed + k), and a pass's last instances open the next pass's first batch, so the
    stream is a pure function of the seed (--resume skips to where it stopped), on a corpus smaller
    than a batch too."""
    pending, served, pass_index = [], 0, 0
    while True:
        pending += make_instances(documents, random.Random(cfg.seed + pass_index), cfg, specials)
        pass_index += 1
        while len(pending) >= batch_size:
            instances, pending = pending[:batch_size], pending[batch_size:]
            if served >= start_iter:
                yield collate(instances, pad_id, cfg.seq_len, cfg.max_predictions)
            served += 1


# ----------------------------------------------------------------------------------------- pretraining

def bert_config(cfg, vocab_size, pad_id):
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                      max_position_embeddings=max(cfg.seq_len, cfg.ft_max_len), pad_token_id=pad_id)


def configure_optimizer(model, lr, weight_decay, beta2=0.999):
    """AdamW with decay on weight matrices only: biases and LayerNorm parameters are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-6)


def get_lr(it, cfg):
    """Linear warmup to cfg.lr over warmup_iters, then linear decay to 0 at max_iters (as BERT)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    return cfg.lr * max(0.0, (cfg.max_iters - it) / max(1, cfg.max_iters - cfg.warmup_iters))


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


def rng_state(rt):
    """Every random stream a resumed run must continue: the batches are a function of the seed and the
    step (pretraining_batches), so that leaves the dropout masks, drawn from torch's generator."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device_type == "cuda" else None}


def load_run_checkpoint(path):
    """ckpt.pt of a pretraining run of this script (for --resume, or to finetune the finished run)."""
    checkpoint = load_checkpoint(path)
    if not CHECKPOINT_KEYS <= set(checkpoint):
        raise UserError(f"{path} was not written by this version of 04_bert/train.py: pretrain again, or "
                        f"pass another --out_dir")
    return checkpoint


def checkpoint_to_resume(cfg, out_dir, corpus):
    """--resume: this out_dir's ckpt.pt, written with the same model and data, not past --max_iters."""
    path = out_dir / "ckpt.pt"
    checkpoint = load_run_checkpoint(path)
    changed = [f for f in CLAIMED_FIELDS if checkpoint["config"].get(f) != getattr(cfg, f)]
    if changed:
        raise UserError(f"{path} was written with another {changed[0]} ({checkpoint['config'].get(changed[0])!r}, "
                        f"now {getattr(cfg, changed[0])!r})")
    if checkpoint.get("corpus_fingerprint") != corpus.fingerprint:
        raise UserError(f"{path} was pretrained on another version of --data {cfg.data} (edited since?): "
                        f"drop --resume to start again, or pass another --out_dir")
    if checkpoint["iter"] > cfg.max_iters:
        raise UserError(f"{path} is at iter {checkpoint['iter']}, past --max_iters {cfg.max_iters}")
    return checkpoint


def pretrain(cfg, rt, tokenizer, documents, corpus_fingerprint, out_dir, checkpoint=None):
    """Stage 1: L_BERT = L_MLM + L_NSP on sentence pairs, from random weights or, with --resume, from
    `checkpoint`. Writes ckpt.pt, tokenizer.json and the exported pretrained/ folder; returns the model
    and the pretraining report."""
    specials = tokenizer.special_tokens
    pad_id = specials["[PAD]"]
    sentences = [document_sentences(d) for d in documents]
    flat = encode_plain(tokenizer, [s for doc in sentences for s in doc])
    encoded, k = [], 0
    for doc in sentences:
        encoded.append(flat[k:k + len(doc)])
        k += len(doc)
    # every 10th document is held out: val pairs come from text the model never trained on
    train_docs = [doc for i, doc in enumerate(encoded) if i % 10 != 9]
    val_docs = [doc for i, doc in enumerate(encoded) if i % 10 == 9]
    val_instances = make_instances(val_docs, random.Random(cfg.seed - 1), cfg, specials)
    val_batches = [collate(val_instances[i:i + cfg.batch_size], pad_id, cfg.seq_len, cfg.max_predictions)
                   for i in range(0, len(val_instances), cfg.batch_size)][:cfg.eval_iters]
    rt.log(f"pretraining data: {len(train_docs)} train / {len(val_docs)} val documents, "
           f"{sum(len(s) for d in train_docs for s in d):,} train tokens")

    torch.manual_seed(cfg.seed)
    model = BertForPretraining(bert_config(cfg, tokenizer.vocab_size, pad_id)).to(rt.device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, cfg.beta2)
    ckpt_path = out_dir / "ckpt.pt"
    start_iter, history = 0, []
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], ckpt_path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            rt.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])          # the dropout masks go on where they stopped
        if rt.device_type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], rt.device)
        start_iter, history = checkpoint["iter"], checkpoint["history"]
        rt.log(f"resumed from {ckpt_path} at iter {start_iter}")
    train_model = rt.wrap(rt.maybe_compile(model))

    def save(it):
        if rt.is_main:
            tokenizer.save(out_dir / "tokenizer.json")
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": rt.scaler.state_dict(), "rng": rng_state(rt), "iter": it,
                                        "history": history, "config": asdict(cfg),
                                        "bert_config": model.config.to_dict(), "tokenizer": tokenizer.fingerprint,
                                        "corpus_fingerprint": corpus_fingerprint})

    # each step takes batch_size * world_size instances from the stream; this process trains on its share
    stream = pretraining_batches(train_docs, cfg, specials, pad_id, cfg.batch_size * rt.world_size, start_iter)
    share = slice(rt.rank * cfg.batch_size, (rt.rank + 1) * cfg.batch_size)
    L, T, C = cfg.n_layer, cfg.seq_len, cfg.d_model
    flops_per_token = 6 * sum(p.numel() for p in model.bert.encoder.parameters()) + 12 * L * T * C
    progress = Progress(cfg.max_iters, cfg.batch_size * cfg.seq_len * rt.world_size, log=rt.log,
                        log_interval=cfg.log_interval, flops_per_token=flops_per_token, device=rt.device,
                        dtype=rt.dtype, start_iter=start_iter)
    with StopFlag() as stop:               # Ctrl-C: finish the step, save, exit; a 2nd Ctrl-C: at once
        for it in range(start_iter, cfg.max_iters):
            batch = {k: v[share].to(rt.device) for k, v in next(stream).items()}
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with rt.autocast():
                mlm_logits, nsp_logits = train_model(batch["input_ids"], batch["token_type_ids"],
                                                     batch["attention_mask"], batch["masked_positions"])
            loss, mlm_loss, nsp_loss = pretraining_loss(mlm_logits, nsp_logits, batch["mlm_labels"],
                                                        batch["nsp_labels"])
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
                metrics = evaluate_pretraining(model, val_batches, rt)
                history.append({"iter": it + 1, "train_loss": loss.item(), "mlm_loss": mlm_loss.item(),
                                "nsp_loss": nsp_loss.item(), **metrics})
                rt.log(f"eval iter {it + 1}: val loss {metrics['val_loss']:.4f} | MLM accuracy "
                       f"{metrics['mlm_accuracy']:.3f} | NSP accuracy {metrics['nsp_accuracy']:.3f}")
                save(it + 1)
            if rt.all_reduce_mean(float(stop.requested)) > 0:      # every rank stops at the same step
                save(it + 1)
                rt.log(f"interrupted: saved {ckpt_path} at iter {it + 1}; continue with --resume")
                sys.exit(130)

    if not history or history[-1]["iter"] != cfg.max_iters:    # e.g. resumed with nothing left to do
        history.append({"iter": cfg.max_iters, **evaluate_pretraining(model, val_batches, rt)})
        save(cfg.max_iters)
    if rt.is_main:   # a Hugging Face folder; the tokenizer goes first, as config.json marks a complete folder
        tokenizer.save(out_dir / "pretrained" / EXPORTED_TOKENIZER)
        model.save_pretrained(out_dir / "pretrained")
    last = history[-1]
    return model, {"val_loss": last["val_loss"], "mlm_accuracy": last["mlm_accuracy"],
                   "nsp_accuracy": last["nsp_accuracy"], "iters": cfg.max_iters,
                   "first_train_loss": history[0].get("train_loss"), "last_train_loss": last.get("train_loss"),
                   "tokens_per_second": progress.average_tokens_per_second, "seconds": progress.seconds,
                   "history": history}


# ------------------------------------------------------------------------- or: a model pretrained before

def load_finished_run(cfg, rt, out_dir):
    """The pretrained model and tokenizer of the run in out_dir (--stage finetune, simcse): ckpt.pt of a
    finished pretraining, and the tokenizer.json it was trained with."""
    ckpt_path = out_dir / "ckpt.pt"
    if not ckpt_path.is_file():
        raise UserError(f"no pretraining run in {out_dir} (no ckpt.pt): run --stage pretrain first, or pass "
                        f"--init_from a Hugging Face BERT folder")
    checkpoint = load_run_checkpoint(ckpt_path)
    planned = checkpoint["config"].get("max_iters")
    if checkpoint["iter"] < planned:
        raise UserError(f"the pretraining in {out_dir} stopped at iter {checkpoint['iter']} of {planned}: "
                        f"finish it with --resume --stage pretrain")
    tokenizer = load_run_tokenizer(out_dir / "tokenizer.json", checkpoint["tokenizer"])
    config = BertConfig.from_dict({**checkpoint["bert_config"], "hidden_dropout_prob": cfg.dropout,
                                   "attention_probs_dropout_prob": cfg.dropout})
    model = BertForPretraining(config)
    load_model_state(model, checkpoint["model"], ckpt_path)
    rt.log(f"pretrained model: {ckpt_path} (iter {checkpoint['iter']})")
    return model.to(rt.device), tokenizer


def load_hf_folder(cfg, rt, folder):
    """--init_from: a Hugging Face BERT folder (config.json + model.safetensors or pytorch_model.bin) and
    its tokenizer: ours (llmfs_tokenizer.json, which pretraining exports beside the weights) or an
    official checkpoint's WordPiece vocab.txt."""
    if (folder / EXPORTED_TOKENIZER).is_file():
        try:
            tokenizer = BPETokenizer.load(folder / EXPORTED_TOKENIZER)
        except ValueError as error:
            raise UserError(str(error)) from None
    elif (folder / "vocab.txt").is_file():
        tokenizer = WordPieceTokenizer.load(folder)
    else:
        raise UserError(f"--init_from {folder}: no tokenizer there ({EXPORTED_TOKENIZER} or a WordPiece vocab.txt)")
    missing = [s for s in SPECIAL_TOKENS if s not in tokenizer.special_tokens]
    if missing:
        raise UserError(f"--init_from {folder}: the tokenizer lacks the special tokens {', '.join(missing)}")
    try:
        model = BertForPretraining.from_pretrained(folder, hidden_dropout_prob=cfg.dropout,
                                                   attention_probs_dropout_prob=cfg.dropout)
    except (OSError, ValueError) as error:
        raise UserError(f"--init_from {folder}: {error}") from None
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"--init_from {folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model's "
                        f"embedding only {model.config.vocab_size}: they are not one checkpoint")
    rt.log(f"pretrained model: {folder} ({model.config.num_hidden_layers} layers, hidden "
           f"{model.config.hidden_size}, {tokenizer.vocab_size}-token {tokenizer.name} tokenizer)")
    return model.to(rt.device), tokenizer


# ----------------------------------------------------------------------------------------- finetuning data

def load_task_examples(cfg):
    """The classification task's train/val/test examples, read before anything slow runs, so that a bad
    --task fails at once rather than after pretraining."""
    examples = {s: data.load_task(cfg.task, s, num_labels=cfg.num_labels) for s in ("train", "val", "test")}
    if "label" not in examples["train"][0]:
        raise UserError(f"{cfg.task} is not a classification task (needs text,label examples)")
    if cfg.max_ft_examples:
        examples["train"] = random.Random(cfg.seed).sample(examples["train"], min(cfg.max_ft_examples,
                                                                                   len(examples["train"])))
    labels = set(data.task_labels(examples["train"]))
    if len(labels) < 2:
        raise UserError(f"{cfg.task}: the train examples have {len(labels)} label; classification needs two or more")
    for s in ("val", "test"):                           # a user file's rare label may miss the train split
        examples[s] = [e for e in examples[s] if e["label"] in labels]
        if not examples[s]:
            raise UserError(f"{cfg.task}: no {s} example has a label that the train examples have")
    return examples


def clean(text):
    """Whitespace collapsed, as the pretraining sentences were."""
    return " ".join(text.split())


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


# ----------------------------------------------------------------------------------------- finetuning

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


def accuracy(predictions, targets):
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)


def linear_schedule(optimizer, total_steps, warmup_fraction=0.1):
    """lr(step) = peak * step / warmup for the first 10% of the steps, then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / (total_steps - warmup)))


def make_batch(sequences, pad_id, device):
    batch = data.pad_batch(sequences, pad_id)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def log_epoch(rt, name, epoch, epochs, loss, val_accuracy):
    if epochs <= 10 or (epoch + 1) % (epochs // 5) == 0:          # at most ~10 lines per run
        rt.log(f"  {name} epoch {epoch + 1}/{epochs}: train loss {loss.item():.4f} | val accuracy {val_accuracy:.3f}")


@torch.no_grad()
def classifier_predictions(model, sequences, pad_id, rt):
    """A BertClassifier's label for each sequence."""
    model.eval()
    predictions = []
    for k in range(0, len(sequences), 64):
        input_ids, attention_mask = make_batch(sequences[k:k + 64], pad_id, rt.device)
        with rt.autocast():
            predictions += model(input_ids, attention_mask=attention_mask).argmax(-1).tolist()
    return predictions


def finetune_full(pretrained, bert_cfg, splits, num_labels, cfg, rt, pad_id, name):
    """Full finetuning: BertClassifier, logits = W_c Dropout(pooled [CLS]), every weight trains. The
    epoch with the best val accuracy is kept (early stopping); returns its test predictions."""
    torch.manual_seed(cfg.seed)
    model = BertClassifier(bert_cfg, num_labels).to(rt.device)
    if pretrained is not None:
        model.bert.load_state_dict(pretrained.bert.state_dict())
    sequences, targets = splits["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.ft_lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, cfg.ft_epochs * math.ceil(len(sequences) / cfg.ft_batch_size))
    best_accuracy, best_state = -1.0, None
    for epoch in range(cfg.ft_epochs):
        model.train()
        for batch in data.batch_indices([len(s) for s in sequences], cfg.ft_batch_size, shuffle=True,
                                        seed=cfg.seed + epoch, bucket=True):   # similar lengths: little padding
            input_ids, attention_mask = make_batch([sequences[i] for i in batch], pad_id, rt.device)
            with rt.autocast():
                logits = model(input_ids, attention_mask=attention_mask)                # (B, num_labels)
            loss = F.cross_entropy(logits.float(), torch.tensor([targets[i] for i in batch], device=rt.device))
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        val_accuracy = accuracy(classifier_predictions(model, splits["val"][0], pad_id, rt), splits["val"][1])
        log_epoch(rt, name, epoch, cfg.ft_epochs, loss, val_accuracy)
        if val_accuracy > best_accuracy:
            best_accuracy, best_state = val_accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return classifier_predictions(model, splits["test"][0], pad_id, rt)


@torch.no_grad()
def pooled_features(encoder, sequences, pad_id, rt):
    """The frozen encoder's pooled [CLS] vector of each sequence, (N, hidden)."""
    encoder.eval()
    return torch.cat([encoder(*make_batch(sequences[k:k + 64], pad_id, rt.device))[1].float()
                      for k in range(0, len(sequences), 64)])


def finetune_probe(pretrained, bert_cfg, splits, num_labels, cfg, rt, pad_id, name):
    """The linear probe: BertClassifier(freeze_encoder=True), only W_c and b_c train. The frozen encoder
    runs in eval mode, so its pooled output is a fixed feature of each example: computed once here."""
    torch.manual_seed(cfg.seed)
    model = BertClassifier(bert_cfg, num_labels, freeze_encoder=True).to(rt.device)
    if pretrained is not None:
        model.bert.load_state_dict(pretrained.bert.state_dict())
    features = {split: pooled_features(model.bert, sequences, pad_id, rt) for split, (sequences, _) in splits.items()}
    targets = torch.tensor(splits["train"][1], device=rt.device)
    optimizer = torch.optim.AdamW(model.classifier.parameters(), lr=cfg.probe_lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, cfg.probe_epochs * math.ceil(len(targets) / cfg.ft_batch_size))
    best_accuracy, best_state = -1.0, None
    for epoch in range(cfg.probe_epochs):
        model.train()                                  # the classifier's dropout on; the frozen encoder stays in eval
        shuffled = torch.randperm(len(targets), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for batch in shuffled.split(cfg.ft_batch_size):
            batch = batch.to(rt.device)
            logits = model.classifier(model.dropout(features["train"][batch]))          # (B, num_labels)
            loss = F.cross_entropy(logits, targets[batch])
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        model.eval()
        with torch.no_grad():
            val_accuracy = accuracy(model.classifier(features["val"]).argmax(-1).tolist(), splits["val"][1])
        log_epoch(rt, name, epoch, cfg.probe_epochs, loss, val_accuracy)
        if val_accuracy > best_accuracy:
            best_accuracy, best_state = val_accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    with torch.no_grad():
        return model.classifier(features["test"]).argmax(-1).tolist()


@torch.no_grad()
def cloze_predictions(model, sequences, verbalizer_ids, pad_id, mask_id, rt):
    """The label whose verbalizer token the MLM head ranks highest at each prompt's [MASK]."""
    model.eval()
    predictions = []
    for k in range(0, len(sequences), 64):
        chosen = sequences[k:k + 64]
        input_ids, attention_mask = make_batch(chosen, pad_id, rt.device)
        mask_positions = torch.tensor([[s.index(mask_id)] for s in chosen], device=rt.device)
        with rt.autocast():
            mlm_logits, _ = model(input_ids, attention_mask=attention_mask, masked_positions=mask_positions)
        predictions += mlm_logits[:, 0, verbalizer_ids].argmax(-1).tolist()
    return predictions


def finetune_prompt(pretrained, bert_cfg, splits, verbalizer, cfg, rt, pad_id, mask_id, name):
    """Cloze prompt learning: "[CLS] <text> This belongs to module [MASK]. [SEP]", classified by the MLM
    head's logits at [MASK] restricted to the verbalizer tokens (one per label); all weights train.
    Returns the zero-shot test predictions (before any finetuning) and those of the best val epoch."""
    torch.manual_seed(cfg.seed)
    model = BertForPretraining(bert_cfg).to(rt.device)
    if pretrained is not None:
        model.load_state_dict(pretrained.state_dict())
    verbalizer_ids = torch.tensor(verbalizer, device=rt.device)
    zero_shot = cloze_predictions(model, splits["test"][0], verbalizer_ids, pad_id, mask_id, rt)
    sequences, targets = splits["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.ft_lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, cfg.ft_epochs * math.ceil(len(sequences) / cfg.ft_batch_size))
    best_accuracy, best_state = -1.0, None
    for epoch in range(cfg.ft_epochs):
        model.train()
        for batch in data.batch_indices([len(s) for s in sequences], cfg.ft_batch_size, shuffle=True,
                                        seed=cfg.seed + epoch, bucket=True):
            chosen = [sequences[i] for i in batch]
            input_ids, attention_mask = make_batch(chosen, pad_id, rt.device)
            mask_positions = torch.tensor([[s.index(mask_id)] for s in chosen], device=rt.device)   # (B, 1)
            with rt.autocast():
                mlm_logits, _ = model(input_ids, attention_mask=attention_mask, masked_positions=mask_positions)
            logits = mlm_logits[:, 0, verbalizer_ids]                              # (B, num_labels)
            loss = F.cross_entropy(logits.float(), torch.tensor([targets[i] for i in batch], device=rt.device))
            rt.scaler.scale(loss).backward()
            # the optimizer step (same in every train.py)
            if cfg.grad_clip > 0:
                rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        val_predictions = cloze_predictions(model, splits["val"][0], verbalizer_ids, pad_id, mask_id, rt)
        val_accuracy = accuracy(val_predictions, splits["val"][1])
        log_epoch(rt, name, epoch, cfg.ft_epochs, loss, val_accuracy)
        if val_accuracy > best_accuracy:
            best_accuracy, best_state = val_accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return zero_shot, cloze_predictions(model, splits["test"][0], verbalizer_ids, pad_id, mask_id, rt)


def finetune(cfg, rt, tokenizer, pretrained, examples):
    """Stage 2: the three finetuning modes, each from the pretrained encoder and from a random one."""
    bert_cfg = pretrained.config
    specials = tokenizer.special_tokens
    cls_id, sep_id, mask_id, pad_id = (specials[s] for s in ("[CLS]", "[SEP]", "[MASK]", "[PAD]"))
    labels = data.task_labels(examples["train"])
    label_id = {label: i for i, label in enumerate(labels)}
    verbalizer = choose_verbalizer(labels, tokenizer)
    prompt_ids, period_ids = tokenizer.encode(PROMPT), tokenizer.encode(".")
    max_len = min(cfg.ft_max_len, bert_cfg.max_position_embeddings)
    classify, cloze = {}, {}          # split -> (token sequences, label ids)
    for s, rows in examples.items():
        texts = encode_plain(tokenizer, [clean(e["text"]) for e in rows])
        targets = [label_id[e["label"]] for e in rows]
        classify[s] = ([[cls_id] + ids[:max_len - 2] + [sep_id] for ids in texts], targets)
        room = max_len - len(prompt_ids) - len(period_ids) - 3
        cloze[s] = ([[cls_id] + ids[:room] + prompt_ids + [mask_id] + period_ids + [sep_id] for ids in texts], targets)
    rt.log(f"finetuning on {cfg.task}: {len(examples['train'])} train / {len(examples['val'])} val / "
           f"{len(examples['test'])} test examples, {len(labels)} labels; verbalizer "
           + ", ".join(f"{label}->{tokenizer.decode([v])!r}" for label, v in zip(labels, verbalizer)))

    test_targets = classify["test"][1]
    baseline = data.majority_baseline(examples["train"], examples["test"])
    majority = label_id[min(labels, key=lambda label: (-sum(e["label"] == label for e in examples["train"]), label))]
    baseline_f1 = macro_f1([majority] * len(test_targets), test_targets, len(labels))
    results = {}
    for mode in ("full", "probe", "prompt"):
        row = {"metric": "accuracy", "pretrained": None, "scratch": None, "baseline": baseline, "seconds": 0.0}
        for init in ("pretrained", "scratch"):
            rt.log(f"{mode} finetuning, {init} encoder:")
            started = time.perf_counter()
            start_from, name = (pretrained if init == "pretrained" else None), f"{mode}/{init}"
            if mode == "full":
                predictions = finetune_full(start_from, bert_cfg, classify, len(labels), cfg, rt, pad_id, name)
            elif mode == "probe":
                predictions = finetune_probe(start_from, bert_cfg, classify, len(labels), cfg, rt, pad_id, name)
            else:
                zero_shot, predictions = finetune_prompt(start_from, bert_cfg, cloze, verbalizer, cfg, rt, pad_id,
                                                         mask_id, name)
                if init == "pretrained":
                    row["zero_shot"] = accuracy(zero_shot, test_targets)   # the pretrained MLM read untrained
            seconds = time.perf_counter() - started
            row[init] = accuracy(predictions, test_targets)
            row[f"{init}_f1"] = macro_f1(predictions, test_targets, len(labels))
            row["seconds"] += seconds
            rt.log(f"  -> {name}: test accuracy {row[init]:.3f}, macro-F1 {row[f'{init}_f1']:.3f} ({seconds:.1f}s)")
        row["baseline_f1"] = baseline_f1
        results[mode] = row
    return results


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


def simcse(cfg, rt, tokenizer, pretrained):
    """Unsupervised SimCSE: each sentence is encoded twice; dropout makes the two views differ.

        L = -log exp(sim(h_i, h_i+) / tau) / sum_j exp(sim(h_i, h_j+) / tau),  sim = cosine,

    the other sentences of the batch being the negatives. Evaluated by retrieval on docstring-summary
    test: for each docstring body, is its own summary line the nearest of all test summaries?
    """
    started = time.perf_counter()
    encoder = pretrained.bert
    specials = tokenizer.special_tokens
    cls_id, sep_id, pad_id = specials["[CLS]"], specials["[SEP]"], specials["[PAD]"]
    max_len = min(cfg.ft_max_len, pretrained.config.max_position_embeddings)

    def encode(texts):
        return [[cls_id] + ids[:max_len - 2] + [sep_id] for ids in encode_plain(tokenizer, map(clean, texts))]

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
        rt.scaler.scale(loss).backward()
        # the optimizer step, as in every train.py, clipping the encoder's gradients (SimCSE has no heads)
        if cfg.grad_clip > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.step(it, loss=loss, lr=cfg.simcse_lr)
    after = retrieval_top1(encoder, bodies, summaries, pad_id, rt)
    rt.log(f"SimCSE: top-1 retrieval after: {after:.3f}")
    return {"metric": "top1_retrieval", "before": before, "after": after,
            "baseline": 1 / len(test), "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------- main

def main(argv=None):
    cfg = parse_config(Config, presets=PRESETS, argv=argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    started = time.perf_counter()
    rt = setup(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, seed=cfg.seed)
    out_dir = Path(cfg.out_dir)
    rt.log(f"04_bert on {rt.device} ({str(rt.dtype).removeprefix('torch.')}), stage {cfg.stage}, out_dir {out_dir}")
    report = {"chapter": "04_bert", "device": str(rt.device)}
    examples = load_task_examples(cfg) if cfg.stage in ("all", "finetune") else None

    # the pretrained model: a Hugging Face folder, this out_dir's finished run, or pretraining it now
    if cfg.init_from:
        folder = Path(cfg.init_from)
        pretrained, tokenizer = load_hf_folder(cfg, rt, folder)
        if folder.resolve() != (out_dir / "pretrained").resolve():     # not this out_dir's own export
            claim_out_dir(out_dir, {"init_from": str(folder.resolve())}, ["init_from"])
            report["init_from"] = str(folder)
    elif cfg.stage in ("finetune", "simcse"):
        pretrained, tokenizer = load_finished_run(cfg, rt, out_dir)
    else:
        corpus = data.Corpus(cfg.data, cfg.text_field, log=rt.log, runtime=rt)
        checkpoint = checkpoint_to_resume(cfg, out_dir, corpus) if cfg.resume else None
        documents = pretraining_documents(corpus, cfg.max_corpus_mb, log=rt.log)
        claim_out_dir(out_dir, asdict(cfg), CLAIMED_FIELDS)
        if checkpoint is not None:
            tokenizer = load_run_tokenizer(out_dir / "tokenizer.json", checkpoint["tokenizer"])
        else:   # trained once on a sample spread over the corpus (all of a small one), cached by its fingerprint
            tokenizer = BPETokenizer.load_or_train(lambda: corpus.sample_texts(cfg.tokenizer_sample_mb * 1e6),
                                                   cfg.vocab_size, special_tokens=SPECIAL_TOKENS, name="bert-bpe",
                                                   runtime=rt, log=rt.log,
                                                   key=f"{corpus.fingerprint}-{cfg.tokenizer_sample_mb:g}")
        if examples is not None:
            choose_verbalizer(data.task_labels(examples["train"]), tokenizer)   # fails now, not after pretraining
        pretrained, report["pretrain"] = pretrain(cfg, rt, tokenizer, documents, corpus.fingerprint, out_dir,
                                                  checkpoint)
    if not rt.is_main:
        return None                        # finetuning is small: the main process does it alone

    if cfg.stage in ("all", "finetune"):
        report["task"] = cfg.task
        report["finetune"] = finetune(cfg, rt, tokenizer, pretrained, examples)
        report["samples"] = fill_mask_samples(pretrained, tokenizer, rt)
    if cfg.stage == "simcse":
        report["simcse"] = simcse(cfg, rt, tokenizer, pretrained)
    if cfg.stage == "all":
        report["seconds"] = time.perf_counter() - started
    report_path = out_dir / "report.json"
    merged = write_report(report_path, report, log=rt.log)     # --stage X replaces its part, keeps the rest
    print_report(merged, "04_bert report", log=rt.log)
    if "simcse" in merged:
        rt.log("simcse: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in merged["simcse"].items()))
    for sample in merged.get("samples", []):
        rt.log(sample)
    rt.log(f"wrote {report_path}")
    return merged


if __name__ == "__main__":
    run_main(main)

"""Benchmarks (not collected by pytest): python tests/bench.py [--nanogpt PATH] [--only NAME ...]

    tokenizer   BPE training on 1 MB of the default corpus to vocab 1024 (ours, one core) beside the
                naive re-count-every-merge algorithm (timed on its first merges, extrapolated per merge);
                encode throughput of the tiktoken path vs the pure-Python reference
    gpt         05_gpt training tokens/s and MFU at the benchmark config (4 layers, 4 heads, 256 wide,
                context 256, batch 16, vocab 1024, float32, eager) against this CPU's measured matmul
                peak; with --nanogpt PATH, nanoGPT's model.py from a local checkout timed side by side
                in the same process, step for step alternating with ours
    generate    256 new tokens with the KV cache vs recomputing the whole context every step
    modern      a training step of the modern decoder (RMSNorm, RoPE, SwiGLU, 2 of 4 KV heads, no biases) beside
                GPT-2's at the gpt benchmark's shape, per parameter-FLOP (6 N + 12 L H Q T per token): eager,
                and with --compile also torch.compiled (needs a C++ compiler; about a minute to compile)
    ablation    training tokens/s of each row of 05's --stage ablation (GPT-2 -> + RMSNorm -> + RoPE -> + SwiGLU
                -> + GQA -> + QK-norm) at the default config (4 layers, 192 wide, context 128, batch 16), the six
                models timed side by side in one process, step for step alternating
    hf          greedy generation with the KV cache, 256 tokens after 16, on the same small Llama (the modern
                decoder saved with save_pretrained, loaded by transformers): ours vs transformers' generate,
                identical tokens asserted (needs transformers)
    chapters    training tokens/s of each chapter's model (01 to 06) at one small shape
    data        the start of a pretraining run on a large folder of real text (this machine's Python sources,
                headers and docs, copied as .txt into --data_dir, --corpus_mb MB; 400 by default): a 16k BPE on
                the 100 MB sample and the token cache, first run (cold cache) and warm restart, each in a fresh
                process: seconds, peak RSS (the process and its encoding workers), encoding MB/s beside the cores'
                limit (cores x one thread of tiktoken's encode_ordinary on the same bytes), and the same figures
                extrapolated to 10 GB from the measured rates
    --gpu       the GPU check (also tests/gpu_check.sh), on one CUDA GPU in about 8 minutes: every
                chapter's tiny preset with --device cuda (bf16 autocast) and --compile, 05's modern
                decoder in eager mode, a 1-process torchrun of 05, 100 compiled steps of 05's gpt2-124m
                model and that model under a 1-process torchrun with --parallel ddp and fsdp (on pydocs:
                nothing downloads); a table of pass/fail, tokens/s, MFU and peak memory, read from each
                run's last progress line

Figures vary with the machine and its load; run it on an otherwise idle machine.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from common import data, load_module  # noqa: E402
from common.runtime import measure_cpu_peak_flops  # noqa: E402
from common.tokenizer import BPETokenizer  # noqa: E402


def bench_tokenizer():
    text = data.load_corpus("pydocs")[:1_000_000]
    print(f"\n== tokenizer: {len(text.encode()) / 1e6:.2f} MB of pydocs, vocab 1024 ==")
    start = time.perf_counter()
    tokenizer = BPETokenizer.train(text, 1024, special_tokens=("<|endoftext|>",))
    ours = time.perf_counter() - start
    merges = 1024 - 256 - 1
    print(f"ours (incremental pair counts + heap): {ours:.2f} s for {merges} merges "
          f"({1000 * ours / merges:.2f} ms per merge, including pre-tokenization)")
    naive_merges = 3
    start = time.perf_counter()
    BPETokenizer.train_reference(text, 256 + naive_merges + 1, special_tokens=("<|endoftext|>",))
    naive = (time.perf_counter() - start) / naive_merges
    print(f"naive (re-count every pair after every merge): {naive:.2f} s per merge, timed on the first "
          f"{naive_merges} -> ~{naive * merges / 60:.0f} min for {merges} merges ({naive * merges / ours:.0f}x slower)")

    start = time.perf_counter()
    ids = tokenizer.encode(text)
    fast = time.perf_counter() - start
    documents = text.split("\n\n")
    start = time.perf_counter()
    tokenizer.encode_batch(documents, allowed_special="all")
    batch = time.perf_counter() - start
    piece = text[:100_000]
    start = time.perf_counter()
    tokenizer.encode_reference(piece)
    reference = (time.perf_counter() - start) * len(text) / len(piece)
    print(f"encode 1 MB: tiktoken path {fast * 1000:.0f} ms ({len(text) / fast / 1e6:.1f} MB/s), "
          f"encode_batch {batch * 1000:.0f} ms, reference {reference:.1f} s (extrapolated from 100 kB); "
          f"{len(ids):,} tokens, {len(text.encode()) / len(ids):.2f} bytes/token")


def time_steps(step_functions, iters, warmup=3, rounds=None):
    """Run each step function `warmup` times, then `iters` rounds alternating between them; return the
    median seconds per step of each (alternating spreads any drift in machine load evenly). With a list
    `rounds`, each round's {name: seconds} is appended to it too (for ratios within a round)."""
    for step in step_functions.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in step_functions}
    for _ in range(iters):
        for name, step in step_functions.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
        if rounds is not None:
            rounds.append({name: t[-1] for name, t in times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def make_train_step(model, forward, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_gpt(nanogpt_path, iters):
    B, T, V = 16, 256, 1024
    gpt = load_module(REPO_ROOT / "05_gpt" / "model.py")
    torch.manual_seed(0)
    ours = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=V, n_layer=4, n_head=4, n_embd=256, dropout=0.0))
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    # Each model trains with its own configure_optimizers, as its train.py does: a whole training step.
    steps = {"llm-from-scratch 05_gpt": make_train_step(
        ours, lambda: ours(x, y)[1], ours.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu"))}
    if nanogpt_path:
        nano = load_module(Path(nanogpt_path) / "model.py", name="peer_nanogpt_model")
        torch.manual_seed(0)
        theirs = nano.GPT(nano.GPTConfig(block_size=T, vocab_size=V, n_layer=4, n_head=4, n_embd=256,
                                         dropout=0.0, bias=True))
        steps["nanoGPT (same config)"] = make_train_step(
            theirs, lambda: theirs(x, y)[1], theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu"))
    peak = measure_cpu_peak_flops()
    flops_per_token = ours.num_flops_per_token()
    print(f"\n== GPT training: 4 layers, 4 heads, 256 wide, context {T}, batch {B}, vocab {V}, float32, eager, "
          f"{torch.get_num_threads()} threads ==")
    print(f"{ours.num_parameters() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs per token; "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    for name, seconds in time_steps(steps, iters).items():
        tokens_per_second = B * T / seconds
        print(f"{name:<26} {seconds * 1000:7.1f} ms/step  {tokens_per_second:8,.0f} tok/s  "
              f"MFU {100 * flops_per_token * tokens_per_second / peak:.1f}%")


def bench_generate():
    gpt = load_module(REPO_ROOT / "05_gpt" / "model.py")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=512, vocab_size=1024, n_layer=4, n_head=4, n_embd=256)).eval()
    prompt = torch.randint(0, 1024, (1, 16))
    print("\n== generation: 256 new tokens after a 16-token prompt, greedy, batch 1 ==")
    results = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        results[use_cache] = model.generate(prompt, 256, temperature=0, use_cache=use_cache)
        seconds = time.perf_counter() - start
        print(f"{'KV cache' if use_cache else 'no cache':<9} {seconds:6.2f} s  {256 / seconds:7.1f} tok/s")
        results[f"t{use_cache}"] = seconds
    assert torch.equal(results[True], results[False]), "cached and uncached outputs differ"
    print(f"the cache is {results['tFalse'] / results['tTrue']:.1f}x faster, with identical tokens")


MODERN_SWITCHES = dict(norm="rmsnorm", pos="rope", mlp="swiglu", intermediate_size=704, n_kv_head=2, bias=False)


def bench_modern(iters, compile_too):
    """Seconds per step / FLOPs per token of the modern decoder over GPT-2's: 1.0 = as fast per unit of work."""
    B, T, V = 16, 256, 1024
    gpt = load_module(REPO_ROOT / "05_gpt" / "model.py")
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    print(f"\n== modern decoder vs GPT-2: training step per parameter-FLOP, 4 layers, 4 heads, 256 wide, context {T}, "
          f"batch {B}, float32 ==")
    for compiled in ([False, True] if compile_too else [False]):
        models, steps = {}, {}
        for name, switches in (("GPT-2", {}), ("modern", MODERN_SWITCHES)):
            torch.manual_seed(0)
            model = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=V, n_layer=4, n_head=4, n_embd=256, dropout=0.0,
                                          **switches))
            run = torch.compile(model) if compiled else model
            models[name] = model
            steps[name] = make_train_step(model, lambda run=run: run(x, y)[1],
                                          model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu"))
        rounds = []
        seconds = time_steps(steps, iters, rounds=rounds)
        flops = {name: models[name].num_flops_per_token() for name in models}
        for name, model in models.items():
            print(f"{'compiled' if compiled else 'eager':<9} {name:<7} {model.num_parameters() / 1e6:.2f}M parameters "
                  f"{flops[name] / 1e6:5.1f} MFLOPs/token  {seconds[name] * 1000:6.1f} ms/step")
        # the median over rounds of each round's ratio: the two steps of a round see the same machine load
        ratios = sorted(r["modern"] / r["GPT-2"] * flops["GPT-2"] / flops["modern"] for r in rounds)
        print(f"{'compiled' if compiled else 'eager':<9} time per FLOP, modern / GPT-2: "
              f"{statistics.median(ratios):.3f} (middle half of the {len(ratios)} rounds: "
              f"{ratios[len(ratios) // 4]:.3f} to {ratios[(3 * len(ratios)) // 4 - 1]:.3f})")


def bench_ablation(iters):
    """Training steps of the ablation's six architectures, alternating (the losses come from --stage ablation)."""
    train = load_module(REPO_ROOT / "05_gpt" / "train.py")
    cfg = train.Config()
    x, y = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size)), torch.randint(
        0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    models, steps = {}, {}
    for name, switches in train.ablation_rows(cfg):
        torch.manual_seed(0)
        model = train.GPT(train.model_config_for(cfg, cfg.vocab_size, **switches))
        models[name] = model
        steps[name] = make_train_step(model, lambda model=model: model(x, y)[1], model.configure_optimizers(
            cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), "cpu"))
    print(f"\n== ablation rows: training step, {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, context "
          f"{cfg.block_size}, batch {cfg.batch_size}, vocab {cfg.vocab_size}, float32, eager ==")
    for name, seconds in time_steps(steps, iters).items():
        print(f"{name:<26} {models[name].num_parameters():>9,} parameters {seconds * 1000:7.1f} ms/step "
              f"{cfg.batch_size * cfg.block_size / seconds:8,.0f} tok/s")


def bench_vs_transformers(iters):
    """Greedy generation with the cache: our GPT vs transformers' LlamaForCausalLM with the same weights."""
    import tempfile
    try:
        import transformers
    except ImportError:
        print("\n== hf: skipped (pip install transformers to compare with its generate) ==")
        return
    transformers.logging.set_verbosity_error()
    gpt = load_module(REPO_ROOT / "05_gpt" / "model.py")
    torch.manual_seed(0)
    ours = gpt.GPT(gpt.GPTConfig(block_size=512, vocab_size=1024, n_layer=4, n_head=4, n_embd=256,
                                 **MODERN_SWITCHES)).eval()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt, new = torch.randint(0, 1024, (1, 16)), 256
    outputs = {}

    def run(name, generate):
        def step():
            outputs[name] = generate()
        return step
    steps = {"ours": run("ours", lambda: ours.generate(prompt, new, temperature=0)),
             f"transformers {transformers.__version__}": run("theirs", lambda: theirs.generate(
                 prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0))}
    print(f"\n== generation vs transformers: {type(theirs).__name__}, 4 layers, 4 heads (2 KV), 256 wide, greedy, "
          f"{new} tokens after 16, batch 1 ==")
    with torch.no_grad():
        seconds = time_steps(steps, max(3, iters // 2), warmup=1)
    assert torch.equal(outputs["ours"], outputs["theirs"]), "our tokens differ from transformers'"
    for name, s in seconds.items():
        print(f"{name:<22} {s:6.3f} s  {new / s:7.1f} tok/s")
    ours_seconds, theirs_seconds = seconds.values()
    print(f"ours / transformers: {ours_seconds / theirs_seconds:.2f}x the time, identical tokens")


def bench_chapters(iters):
    """Training tokens/s of each chapter's model at one small shape: width 256, 4 heads, 4 layers (2 + 2
    for the encoder-decoders), batch 16, context 128 (64 + 64 for the encoder-decoders), float32, eager."""
    print("\n== chapters: training tokens/s, width 256, 4 heads, 4 layers, batch 16, 128 tokens a row, float32 ==")
    B, T, V, C = 16, 128, 1024, 256
    torch.manual_seed(0)
    x = torch.randint(4, V, (B, T))
    src, tgt = x[:, :T // 2], x[:, T // 2:]                   # encoder-decoders: 64 in, 64 out
    rows = {}
    hello = load_module(REPO_ROOT / "01_hello_pytorch" / "model.py")
    m1 = hello.NeuralLM(vocab_size=V, context_size=4, d_embed=64, d_hidden=C)
    rows["01 NeuralLM (k=4)"] = (m1, lambda: m1(x, x)[1])
    attention = load_module(REPO_ROOT / "02_attention" / "model.py")
    m2 = attention.AttentionLM(V, block_size=T, d_model=C, n_head=4, n_layer=4)
    rows["02 AttentionLM"] = (m2, lambda: m2(x, x)[1])
    transformer = load_module(REPO_ROOT / "03_transformer" / "model.py")
    m3 = transformer.Transformer(transformer.TransformerConfig(vocab_size=V, d_model=C, n_head=4, n_encoder_layers=2,
                                                               n_decoder_layers=2, d_ff=4 * C, dropout=0.0))
    rows["03 Transformer (2+2)"] = (m3, lambda: m3(src, tgt, labels=tgt)[1])
    bert = load_module(REPO_ROOT / "04_bert" / "model.py")
    m4 = bert.BertForPretraining(bert.BertConfig(vocab_size=V, hidden_size=C, num_hidden_layers=4, num_attention_heads=4,
                                                 intermediate_size=4 * C, hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0, max_position_embeddings=T))
    rows["04 BERT (MLM logits)"] = (m4, lambda: torch.nn.functional.cross_entropy(m4(x)[0].flatten(0, 1), x.flatten()))
    gpt = load_module(REPO_ROOT / "05_gpt" / "model.py")
    m5 = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=V, n_layer=4, n_head=4, n_embd=C, dropout=0.0))
    rows["05 GPT"] = (m5, lambda: m5(x, x)[1])
    t5 = load_module(REPO_ROOT / "06_t5" / "model.py")
    m6 = t5.T5(t5.T5Config(vocab_size=V, d_model=C, d_kv=C // 4, d_ff=4 * C, num_layers=2, num_heads=4,
                           dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    rows["06 T5 v1.1 (2+2)"] = (m6, lambda: m6(src, labels=tgt)[1])
    steps = {name: make_train_step(model, forward) for name, (model, forward) in rows.items()}
    for name, step_seconds in time_steps(steps, iters).items():
        params = sum(p.numel() for p in rows[name][0].parameters())
        print(f"{name:<24} {params / 1e6:5.2f}M parameters  {step_seconds * 1000:7.1f} ms/step  "
              f"{B * T / step_seconds:8,.0f} tok/s")


DATA_SUFFIXES = (".py", ".pyi", ".h", ".hpp", ".c", ".md", ".rst", ".txt", ".html", ".json")

# One pretraining start in a fresh process (so that its peak memory is its own): the corpus, the tokenizer on
# its sample, the token cache; prints one JSON line of figures.
DATA_START = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
started = time.perf_counter()
from common import data
from common.tokenizer import BPETokenizer
corpus = data.Corpus(sys.argv[2], log=lambda line: None)
tokenizer = BPETokenizer.load_or_train(lambda: corpus.sample_texts(100e6), 16384, special_tokens=("<|endoftext|>",),
                                       log=lambda line: print(line, file=sys.stderr), key=corpus.fingerprint)
tokenizer_done = time.perf_counter()
tokens = data.TokenCache(corpus, tokenizer, log=lambda line: print(line, file=sys.stderr))
done = time.perf_counter()
kib = 1024
print(json.dumps({"seconds": done - started, "tokenizer_seconds": tokenizer_done - started,
                  "cache_seconds": done - tokenizer_done, "tokens": sum(tokens.meta["num_tokens"].values()),
                  "encode_seconds": tokens.meta["seconds"], "characters": tokens.meta["characters"],
                  "workers": tokens.meta["workers"], "built": tokens.built,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e6}))
"""


def make_text_folder(folder, megabytes):
    """A folder of ~`megabytes` MB of real text: this machine's Python sources, headers and docs as .txt files."""
    import os
    import shutil
    target = int(megabytes * 1e6)
    if folder.exists() and sum(p.stat().st_size for p in folder.rglob("*.txt")) >= 0.95 * target:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total, count = 0, 0
    roots = ["/usr/include", "/usr/share", f"{sys.base_prefix}/lib", f"{sys.prefix}/lib"]
    for root in dict.fromkeys(roots):
        for directory, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                path = Path(directory) / name
                if not name.endswith(DATA_SUFFIXES) or path.is_symlink():
                    continue
                try:
                    raw = path.read_bytes()
                    raw.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if not raw.strip() or b"\x00" in raw or len(raw) > 4 << 20:
                    continue
                (folder / f"{count:06d}-{name}.txt").write_bytes(raw)
                total, count = total + len(raw), count + 1
                if total >= target:
                    return folder
    print(f"(this machine has only {total / 1e6:.0f} MB of such text: the folder is that size)")
    return folder


def bench_data(corpus_mb, data_dir):
    import json
    import os
    import subprocess
    import tempfile
    import tiktoken
    folder = make_text_folder(Path(data_dir) / f"text-{corpus_mb:g}mb", corpus_mb)
    corpus = data.Corpus(folder)
    print(f"\n== data: {corpus.num_bytes / 1e6:.0f} MB of text in {len(corpus.files):,} files ({folder}), "
          f"{os.cpu_count()} cores ==")
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LLMFS_CACHE": cache}
        for run in ("first run", "warm restart"):
            result = subprocess.run([sys.executable, "-c", DATA_START, str(REPO_ROOT), str(folder)], env=env,
                                    capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"error: the {run} failed:\n{result.stderr[-3000:]}")
            runs[run] = json.loads(result.stdout.strip().splitlines()[-1])
            figures = runs[run]
            print(f"{run:<13} {figures['seconds']:6.1f} s (tokenizer {figures['tokenizer_seconds']:.1f} s, token "
                  f"cache {figures['cache_seconds']:.1f} s)  peak RSS {figures['rss_mb']:,.0f} MB (the encoding "
                  f"workers are forked from it and share its pages)")
        tokenizer_files = list(Path(cache, "tokenizers").glob("*.json"))
        tokenizer = BPETokenizer.load(tokenizer_files[0])
    first = runs["first run"]
    encode_rate = first["characters"] / first["encode_seconds"]
    # the cores' limit: one thread of tiktoken on the same kind of bytes, times the cores
    pieces, size = [], 0
    for text, _ in corpus.pieces():                       # ~30 MB of the corpus, for one thread of tiktoken
        pieces.append(text)
        size += len(text)
        if size >= 30e6:
            break
    sample = "".join(pieces)
    encoding = tiktoken.Encoding("bench", pat_str=tokenizer.pattern, mergeable_ranks=tokenizer.ranks,
                                 special_tokens=tokenizer.special_tokens)
    start = time.perf_counter()
    encoding.encode_ordinary(sample)
    one_thread = len(sample) / (time.perf_counter() - start)
    limit = one_thread * (os.cpu_count() or 1)
    print(f"encoding: {encode_rate / 1e6:.1f} MB/s with {first['workers']} processes; one thread of tiktoken "
          f"{one_thread / 1e6:.1f} MB/s on {len(sample) / 1e6:.0f} MB, so the cores' limit is {limit / 1e6:.1f} MB/s: "
          f"{100 * encode_rate / limit:.0f}% of it")
    scale = 10e9 / first["characters"]
    other = first["seconds"] - first["encode_seconds"] - first["tokenizer_seconds"]
    print(f"10 GB, extrapolated: tokenizer {first['tokenizer_seconds']:.0f} s (the same 100 MB sample) + encoding "
          f"{first['encode_seconds'] * scale / 60:.0f} min at {encode_rate / 1e6:.1f} MB/s + the rest "
          f"{other * scale:.0f} s; {first['tokens'] * scale / 1e9:.1f}B tokens, "
          f"{2 * first['tokens'] * scale / 1e9:.0f} GB of uint16 on disk; peak RSS as measured (it does not grow "
          f"with the corpus: pieces of 4M characters)")


CHAPTERS = ["01_hello_pytorch", "02_attention", "03_transformer", "04_bert", "05_gpt", "06_t5", "07_peft"]


def gpu_check_runs(out_root):
    """(name, command, timeout in seconds) of every run of the GPU check. Nothing downloads (a GPU machine may
    have no internet): the gpt2-124m runs keep the preset's model, batch and vocabulary on the built-in pydocs
    corpus instead of TinyStories, and share one tokenizer and token cache (the first run builds them)."""
    python = [sys.executable]
    torchrun = python + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    runs = [(f"{chapter} tiny", python + [f"{chapter}/train.py", "--preset", "tiny", "--device", "cuda",
                                          "--compile", "--out_dir", f"{out_root}/{chapter}"], 150)
            for chapter in CHAPTERS]
    runs.append(("05_gpt tiny llama eager", python + ["05_gpt/train.py", "--preset", "tiny", "--device", "cuda",
                                                      "--arch", "llama", "--n_head", "4", "--n_kv_head", "2",
                                                      "--out_dir", f"{out_root}/05_gpt-llama"], 150))
    runs.append(("05_gpt torchrun x1", torchrun + ["05_gpt/train.py", "--preset", "tiny", "--device", "cuda",
                                                   "--out_dir", f"{out_root}/05_gpt-torchrun"], 150))
    gpt2_124m = ["05_gpt/train.py", "--preset", "gpt2-124m", "--data", "pydocs", "--device", "cuda", "--stage",
                 "pretrain", "--eval_iters", "5", "--log_interval", "10"]
    runs.append(("05_gpt gpt2-124m 100 steps", python + [*gpt2_124m, "--compile", "--max_iters", "100",
                                                        "--eval_interval", "100", "--out_dir",
                                                        f"{out_root}/05_gpt-124m"], 300))
    for parallel in ("ddp", "fsdp"):   # the comparison: the same model and batch on one GPU, eager
        runs.append((f"05_gpt gpt2-124m {parallel} x1, 50 steps", torchrun + [
            *gpt2_124m, "--parallel", parallel, "--max_iters", "50", "--eval_interval", "50",
            "--out_dir", f"{out_root}/05_gpt-124m-{parallel}"], 200))
    return runs


def last_progress_figures(output):
    """tokens/s, MFU and peak memory from the last progress line that shows them ("-" when absent)."""
    import re
    figures = {"tok/s": "-", "MFU": "-", "peak mem": "-"}
    for line in output.splitlines():
        if " tok/s" in line:
            figures["tok/s"] = re.search(r"([\d.]+[kM]?) tok/s", line).group(1)
            mfu = re.search(r"MFU ([\d.]+%)", line)
            mem = re.search(r"mem ([\d.]+GiB)", line)
            figures["MFU"] = mfu.group(1) if mfu else "-"
            figures["peak mem"] = mem.group(1) if mem else "-"
    return figures


def bench_gpu():
    import subprocess
    import tempfile
    if not torch.cuda.is_available():
        sys.exit("error: the GPU check needs a CUDA GPU (torch.cuda.is_available() is False here)")
    print(f"\n== GPU check on {torch.cuda.get_device_name()} (torch {torch.__version__}) ==")
    rows = []
    with tempfile.TemporaryDirectory() as out_root:
        for name, command, timeout in gpu_check_runs(out_root):
            started = time.perf_counter()
            try:
                result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
                status = "pass" if result.returncode == 0 else f"FAIL (exit {result.returncode})"
                output = result.stdout + result.stderr
            except subprocess.TimeoutExpired as error:
                status, output = f"FAIL (over {timeout}s)", (error.stdout or b"").decode(errors="replace")
            seconds = time.perf_counter() - started
            rows.append({"run": name, "status": status, "seconds": f"{seconds:.0f}", **last_progress_figures(output)})
            print(f"{name}: {status} in {seconds:.0f}s", flush=True)
            if not status.startswith("pass"):
                print("\n".join(output.splitlines()[-15:]), flush=True)
    from common.report import format_table
    print()
    print(format_table(rows, ["run", "status", "seconds", "tok/s", "MFU", "peak mem"]))
    if any(not row["status"].startswith("pass") for row in rows):
        sys.exit(1)


BENCHMARKS = ("tokenizer", "gpt", "generate", "modern", "ablation", "hf", "chapters", "data")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", default="", help="path to a nanoGPT checkout, timed side by side")
    parser.add_argument("--only", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS), metavar="NAME",
                        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per model")
    parser.add_argument("--compile", action="store_true", help="modern: also time both models torch.compiled")
    parser.add_argument("--corpus_mb", type=float, default=400, help="data: the size of the text folder")
    parser.add_argument("--data_dir", default="/tmp/llmfs-bench", help="data: where the text folder is made (kept)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU check instead (see above)")
    args = parser.parse_args()
    if args.gpu:
        return bench_gpu()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "tokenizer" in args.only:
        bench_tokenizer()
    if "gpt" in args.only:
        bench_gpt(args.nanogpt, args.iters)
    if "generate" in args.only:
        bench_generate()
    if "modern" in args.only:
        bench_modern(args.iters, args.compile)
    if "ablation" in args.only:
        bench_ablation(args.iters)
    if "hf" in args.only:
        bench_vs_transformers(args.iters)
    if "chapters" in args.only:
        bench_chapters(args.iters)
    if "data" in args.only:
        bench_data(args.corpus_mb, args.data_dir)


if __name__ == "__main__":
    main()

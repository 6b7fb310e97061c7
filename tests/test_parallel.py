"""common/parallel.py and 05_gpt's --parallel fsdp | tp: on the CPU, gloo, 2 processes (4 for 2-D).

The from-scratch linears run in processes started by torch.multiprocessing; the training runs are
05_gpt/train.py started once per rank with torchrun's environment (RANK, WORLD_SIZE, MASTER_PORT...), so
that a test can send Ctrl-C to one rank.
"""

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import REPO_ROOT, load_module

from common import parallel
from common.config import UserError

TRAIN = REPO_ROOT / "05_gpt" / "train.py"
needs_new_torch = pytest.mark.skipif(parallel.torch_version() < parallel.MIN_TORCH,
                                     reason=f"--parallel fsdp / tp need torch {parallel.MIN_TORCH}+")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ from scratch: f, g, the linears
def _linears_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)                                      # the same layers and input on every rank
    first, second = nn.Linear(8, 12), nn.Linear(12, 8)
    x = torch.randn(3, 5, 8, requires_grad=True)
    column = parallel.ColumnParallelLinear(first, rank, world_size)
    row = parallel.RowParallelLinear(second, rank, world_size)
    z = row(torch.tanh(column(x)))                            # Z = tanh(X A) B, A by columns, B by rows
    (z ** 2).sum().backward()
    torch.save({"z": z.detach(), "x_grad": x.grad, "column_weight_grad": column.weight.grad,
                "column_bias_grad": column.bias.grad, "row_weight_grad": row.weight.grad,
                "row_bias_grad": row.bias.grad}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_from_scratch_parallel_linears_equal_nn_linear_forward_and_backward(tmp_path):
    mp.spawn(_linears_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    torch.manual_seed(0)
    first, second = nn.Linear(8, 12), nn.Linear(12, 8)
    x = torch.randn(3, 5, 8, requires_grad=True)
    z = second(torch.tanh(first(x)))
    (z ** 2).sum().backward()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for rank, got in enumerate(ranks):
        rows, columns = slice(6 * rank, 6 * (rank + 1)), slice(6 * rank, 6 * (rank + 1))
        torch.testing.assert_close(got["z"], z.detach())                 # g summed the partial products
        torch.testing.assert_close(got["x_grad"], x.grad)                # f summed the input gradients
        torch.testing.assert_close(got["column_weight_grad"], first.weight.grad[rows])
        torch.testing.assert_close(got["column_bias_grad"], first.bias.grad[rows])
        torch.testing.assert_close(got["row_weight_grad"], second.weight.grad[:, columns])
        torch.testing.assert_close(got["row_bias_grad"], second.bias.grad)
    # without f the input gradient would be one rank's share only: the test can fail
    assert not torch.allclose(ranks[0]["x_grad"], ranks[0]["x_grad"] + ranks[1]["x_grad"])


def _fsdp_bf16_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    gpt_model = load_module("05_gpt/model.py")
    torch.manual_seed(0)
    config = gpt_model.GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, norm="rmsnorm",
                                 pos="rope", mlp="swiglu", intermediate_size=64, n_kv_head=2, bias=False)
    model = gpt_model.GPT(config)
    reference = gpt_model.GPT(config)
    reference.load_state_dict(model.state_dict())
    parallel.apply_fsdp(model, init_device_mesh("cpu", (world_size,)), mixed_precision=torch.bfloat16)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    loss = model(x, x)[1]
    loss.backward()
    weight = model.transformer.h[0].ln_1.weight
    torch.save({"loss": loss.detach(), "reference_loss": reference(x, x)[1].detach(),
                "master_dtype": str(weight.dtype), "grad_dtype": str(weight.grad.dtype)}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@needs_new_torch
def test_fsdp_bf16_policy_computes_in_bf16_and_keeps_fp32_master_weights_and_gradients(tmp_path):
    """The policy --parallel fsdp uses on CUDA, run here on gloo: the modern decoder (its eager RMSNorm, RoPE
    and SwiGLU backwards included) computes in bf16 from fp32 master weights, and reduces fp32 gradients."""
    mp.spawn(_fsdp_bf16_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["master_dtype"] == got["grad_dtype"] == "torch.float32"
        assert got["loss"].item() == pytest.approx(got["reference_loss"].item(), abs=0.05)   # bf16's precision
        assert got["loss"].item() != got["reference_loss"].item()                         # computed in bf16


def test_interleave_order_puts_each_ranks_heads_together():
    assert parallel.interleave_order([4, 2, 2], 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert parallel.interleave_order([6], 3).tolist() == list(range(6))


# ------------------------------------------------------------------------------ 05_gpt under 2 ranks
TINY = ["--preset", "tiny", "--stage", "pretrain", "--device", "cpu", "--eval_iters", "4", "--grad_accum", "2"]


def launch(args, cache, nproc=2, interrupt_rank0_at=None, timeout=240, rank_args=None, signal_number=signal.SIGINT):
    """Run train.py on `nproc` ranks (torchrun's environment, one process each); returns [(returncode,
    stdout, stderr)] per rank. With interrupt_rank0_at, rank 0 gets Ctrl-C (or signal_number) once it printed
    that iter; rank_args {rank: [flags]} adds flags to one rank only."""
    port = free_port()
    processes = []
    for rank in range(nproc):
        env = {**os.environ, "LLMFS_CACHE": str(cache), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = [sys.executable, str(TRAIN), *args, *(rank_args or {}).get(rank, [])]
        processes.append(subprocess.Popen(command, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    if interrupt_rank0_at is not None:
        lines, deadline = [], time.time() + timeout
        for line in processes[0].stdout:
            lines.append(line)
            if line.startswith("iter") and int(line.split()[1].split("/")[0]) >= interrupt_rank0_at:
                processes[0].send_signal(signal_number)
                break
            assert time.time() < deadline
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append((process.returncode, out, err))
    if interrupt_rank0_at is not None:
        results[0] = (results[0][0], "".join(lines) + results[0][1], results[0][2])
    return results


def run_one(args, cache, timeout=240):
    env = {**os.environ, "LLMFS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def assert_ok(results):
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"


def history(out_dir):
    return json.loads((out_dir / "report.json").read_text())["pretrain"]["history"]


def assert_same_training(got_dir, expected_dir, rtol=1e-5):
    got, expected = history(got_dir), history(expected_dir)
    assert [h["iter"] for h in got] == [h["iter"] for h in expected]
    for a, b in zip(got, expected):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=rtol, abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=rtol, abs=1e-6)
    got_state = torch.load(got_dir / "ckpt.pt", weights_only=True)["model"]
    expected_state = torch.load(expected_dir / "ckpt.pt", weights_only=True)["model"]
    assert got_state.keys() == expected_state.keys()
    for name in expected_state:
        torch.testing.assert_close(got_state[name], expected_state[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A corpus, tokenizer and token cache built once, by one process, before any comparison: the runs
    compared then read the very same token ids."""
    path = tmp_path_factory.mktemp("llmfs-cache")
    warm = run_one([*TINY, "--max_iters", "1", "--out_dir", str(tmp_path_factory.mktemp("warm"))], path)
    assert warm.returncode == 0, warm.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def ddp_run(cache, tmp_path_factory):
    """DDP on 2 ranks, once per architecture: the reference of the FSDP and 2-D tests."""
    runs = {}

    def run(arch):
        if arch not in runs:
            out_dir = tmp_path_factory.mktemp(f"ddp-{arch}")
            assert_ok(launch([*TINY, "--arch", arch, "--out_dir", str(out_dir)], cache))
            runs[arch] = out_dir
        return runs[arch]
    return run


@needs_new_torch
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fsdp_on_two_ranks_trains_like_ddp_and_shards_the_state(cache, ddp_run, tmp_path, arch):
    # llama also recomputes its blocks in backward (--activation_checkpointing): the same numbers again
    extra = ["--activation_checkpointing"] if arch == "llama" else []
    fsdp = launch([*TINY, "--arch", arch, *extra, "--parallel", "fsdp", "--out_dir", str(tmp_path / "fsdp")], cache)
    assert_ok(fsdp)
    assert "FSDP: parameters, gradients and AdamW moments sharded over 2 ranks" in fsdp[0][1]
    assert_same_training(tmp_path / "fsdp", ddp_run(arch))
    # parameters + gradients + AdamW moments per rank: FSDP halves DDP's (up to the padding of odd sizes)
    ddp_bytes = json.loads((ddp_run(arch) / "report.json").read_text())["pretrain"]["memory"]
    fsdp_bytes = json.loads((tmp_path / "fsdp" / "report.json").read_text())["pretrain"]["memory"]
    for kind in ("parameters", "gradients", "optimizer"):
        full, sharded = ddp_bytes["state_bytes_per_rank"][0][kind], fsdp_bytes["state_bytes_per_rank"][0][kind]
        assert full / 2 <= sharded < full / 2 * 1.05, (kind, full, sharded)


@needs_new_torch
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tensor_parallel_on_two_ranks_trains_like_one_process(cache, tmp_path, arch):
    # llama: SwiGLU's fused [W1; W3] and grouped-query attention (4 query heads, 2 kv heads): each rank
    # holds 2 query heads and the kv head they share
    args = [*TINY, "--arch", arch] + (["--n_head", "4", "--n_kv_head", "2"] if arch == "llama" else [])
    one = run_one([*args, "--out_dir", str(tmp_path / "one")], cache)
    assert one.returncode == 0, one.stderr[-3000:]
    tp = launch([*args, "--parallel", "tp", "--out_dir", str(tmp_path / "tp")], cache)
    assert_ok(tp)
    assert "tensor parallel" in tp[0][1]
    assert_same_training(tmp_path / "tp", tmp_path / "one", rtol=1e-4)


@needs_new_torch
def test_two_d_tensor_parallel_inside_fsdp_across_on_four_ranks_trains_like_ddp_on_two(cache, ddp_run, tmp_path):
    # 4 ranks: 2 TP groups of 2 (heads split), FSDP across the groups; data parallel over 2, as the DDP run
    runs = launch([*TINY, "--arch", "llama", "--parallel", "tp", "--tp_size", "2", "--out_dir", str(tmp_path)],
                  cache, nproc=4, timeout=400)
    assert_ok(runs)
    assert "FSDP across 2 groups (2-D)" in runs[0][1]
    assert_same_training(tmp_path, ddp_run("llama"), rtol=1e-4)
    memory = json.loads((tmp_path / "report.json").read_text())["pretrain"]["memory"]["state_bytes_per_rank"]
    full = json.loads((ddp_run("llama") / "report.json").read_text())["pretrain"]["memory"]["state_bytes_per_rank"]
    # below FSDP-over-2's half: the blocks are 1/4 per rank (TP x FSDP), the whole embeddings FSDP's 1/2
    assert sum(memory[0].values()) < sum(full[0].values()) / 2


@needs_new_torch
@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_sharded_checkpoint_resumes_exactly_and_loads_in_one_process(cache, tmp_path, kind):
    """Stopped by Ctrl-C on 2 ranks, resumed on 2: fsdp with activation checkpointing; tp with GQA and SwiGLU,
    whose fused rows and AdamW moments are reordered per rank, resumed in one process too."""
    base = [*TINY, "--max_iters", "30", "--log_interval", "1", "--eval_interval", "15"]
    if kind == "fsdp":
        base += ["--activation_checkpointing"]
    else:
        base += ["--arch", "llama", "--n_head", "4", "--n_kv_head", "2"]
    args = [*base, "--parallel", kind]
    full = launch([*args, "--out_dir", str(tmp_path / "full")], cache)
    assert_ok(full)
    cut = launch([*args, "--out_dir", str(tmp_path / "cut")], cache, interrupt_rank0_at=5)
    assert all(code == 130 for code, _, _ in cut), [err[-2000:] for _, _, err in cut]
    assert "interrupted: saved" in cut[0][1]
    stopped_at = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["iter"]
    assert 5 <= stopped_at < 30
    if kind == "tp":   # the same stopped run, continued in one process (a copy of the folder)
        shutil.copytree(tmp_path / "cut", tmp_path / "cut-one")
        one = run_one([*base, "--out_dir", str(tmp_path / "cut-one"), "--resume"], cache)
        assert one.returncode == 0, one.stderr[-3000:]
        assert "resumed from" in one.stdout
        assert_same_training(tmp_path / "cut-one", tmp_path / "full", rtol=1e-4)
    resumed = launch([*args, "--out_dir", str(tmp_path / "cut"), "--resume"], cache)
    assert_ok(resumed)
    assert "resumed from" in resumed[0][1]
    assert_same_training(tmp_path / "cut", tmp_path / "full")
    # the consolidated ckpt.pt is what one process reads: --stage sample (tp) or finetune (fsdp), save_pretrained
    stage = "sample" if kind == "tp" else "finetune"
    one = run_one(["--preset", "tiny", "--stage", stage, "--device", "cpu", "--out_dir", str(tmp_path / "cut")], cache)
    assert one.returncode == 0, one.stderr[-2000:]
    if stage == "sample":
        assert "samples:" in one.stdout
    else:   # every finetuning row of the tiny preset ran on the consolidated model
        finetune = json.loads((tmp_path / "cut" / "report.json").read_text())["finetune"]
        assert {"chat", "preference"} <= set(finetune), finetune.keys()
    gpt_model = load_module("05_gpt/model.py")
    ckpt = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    model = gpt_model.GPT(gpt_model.GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.save_pretrained(tmp_path / "hf")
    again = gpt_model.GPT.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, ckpt["model_config"]["vocab_size"], (2, 8))
    torch.testing.assert_close(again(ids)[0], model(ids)[0])


@needs_new_torch
def test_bad_tensor_parallel_size_is_one_line_on_every_rank(cache, tmp_path):
    # 3 heads cannot be split over 2 ranks
    results = launch([*TINY, "--n_head", "3", "--n_embd", "48", "--parallel", "tp", "--out_dir", str(tmp_path)],
                     cache)
    for code, _, err in results:
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: --parallel tp splits attention by heads")


@needs_new_torch
def test_ranks_started_with_different_flags_stop_with_one_line(cache, tmp_path):
    results = launch([*TINY, "--parallel", "fsdp", "--out_dir", str(tmp_path)], cache,
                     rank_args={1: ["--lr", "1e-3"]}, timeout=120)
    for code, _, err in results:
        assert code == 2 and "Traceback" not in err
        assert "run different configs (lr differ)" in err.strip().splitlines()[-1]


def test_a_rank_that_stops_mid_run_ends_every_rank_with_one_line(cache, tmp_path):
    # torchrun stops the other ranks with SIGTERM when one fails: rank 0 gets it here, mid-run; rank 1 then
    # loses its partner inside a collective (gloo: connection reset) and must say so, not hang or trace back
    started = time.time()
    results = launch([*TINY, "--max_iters", "5000", "--log_interval", "1", "--out_dir", str(tmp_path)], cache,
                     interrupt_rank0_at=3, signal_number=signal.SIGTERM, timeout=120)
    assert time.time() - started < 100                      # well inside the collective timeout: no hang
    (code0, _, err0), (code1, _, err1) = results
    assert code0 == 143 and "Traceback" not in err0
    assert err0.strip().splitlines()[-1].startswith("error: rank 0: stopped by the launcher (SIGTERM)")
    assert code1 == 1 and "Traceback" not in err1
    assert err1.strip().splitlines()[-1].startswith("error: rank 1: another process of this run stopped or hung")


def test_only_a_lost_peer_becomes_one_line_a_bug_keeps_its_traceback(tmp_path):
    from common.config import lost_process_line
    assert lost_process_line(RuntimeError("Connection reset by peer")) is None     # no process group: not ours
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:20676: "
                            "Connection reset by peer. This is typically caused by a remote worker hanging")
        assert lost_process_line(gloo) == ("error: rank 0: another process of this run stopped or hung (Read error "
                                           "[127.0.0.1]:20676: Connection reset by peer); its own output says why, "
                                           "and the checkpoints already written are complete")
        assert lost_process_line(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 6x8)")) is None
        assert lost_process_line(ValueError("invalid literal for int()")) is None
    finally:
        dist.destroy_process_group()


def test_torch_too_old_for_sharding_is_one_line(monkeypatch):
    monkeypatch.setattr(parallel, "torch_version", lambda: (2, 1))
    with pytest.raises(UserError, match=r"--parallel fsdp needs torch 2\.6\+"):
        parallel.check_parallel_config("fsdp", 0, 4, 4, 16, {"RANK": "0", "WORLD_SIZE": "2"})
    parallel.check_parallel_config("ddp", 0, 4, 4, 16, {})                 # DDP needs nothing new


def test_parallel_config_checks_are_one_line():
    env = {"RANK": "0", "WORLD_SIZE": "4"}
    checks = [(("pipeline", 0, 4, 4, 16, env), "unknown parallel"),
              (("fsdp", 0, 4, 4, 16, {}), "start it with torchrun"),
              (("ddp", 2, 4, 4, 16, env), "needs --parallel tp"),
              (("tp", 3, 3, 3, 12, env), "must divide the number of processes"),
              (("tp", 2, 4, 1, 16, env), "n_kv_head (1) must be divisible"),
              (("tp", 0, 4, 4, 18, env), "the FFN width (18) must be divisible")]
    for arguments, message in checks:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parallel.check_parallel_config(*arguments)
    parallel.check_parallel_config("tp", 2, 4, 2, 16, env)                 # fine: 2 x 2, heads per rank


def saved_activation_bytes(model, x):
    """Bytes autograd keeps for backward during one forward (saved_tensors_hooks see every saved tensor)."""
    total = []

    def pack(tensor):
        total.append(tensor.numel() * tensor.element_size())
        return tensor.detach()            # not the tensor itself: a saved output would keep its graph alive
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, x)[1]
    return loss, sum(total)


def test_activation_checkpointing_keeps_less_and_computes_the_same():
    gpt_model = load_module("05_gpt/model.py")
    torch.manual_seed(0)
    model = gpt_model.GPT(gpt_model.GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=32))
    x = torch.randint(0, 64, (4, 16))
    loss, kept = saved_activation_bytes(model, x)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    names = list(model.state_dict())
    parallel.checkpoint_blocks(model)
    checkpointed_loss, checkpointed_kept = saved_activation_bytes(model, x)
    checkpointed_loss.backward()
    assert checkpointed_loss.item() == loss.item()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name])
    assert checkpointed_kept < kept / 2                     # each block keeps its input, not its internals
    assert list(model.state_dict()) == names                # checkpoints keep their names

"""Device, mixed precision, torch.compile, seeding and data-parallel training, set up in one call.

    rt = setup(device="auto", dtype="auto", compile=False, seed=1337)
    model = rt.maybe_compile(model.to(rt.device))
    with rt.autocast():
        logits, loss = model(x, y)
    rt.scaler.scale(loss).backward()

- Device: "auto" picks cuda > mps > cpu.
- Mixed precision: on CUDA, autocast runs matmuls in bfloat16 where the GPU supports it (Ampere and
  later), else in float16 with a GradScaler, since float16's narrow exponent range lets small gradients
  underflow to zero unless the loss is scaled up first. On CPU everything stays float32 unless asked.
  TF32 is allowed for the float32 matmuls that remain on CUDA.
- Data parallel: under `torchrun`, each process holds a full model copy and a shard of the batch; DDP
  all-reduces (averages) the gradients during backward, so every rank applies the same update.
  The process group is nccl on CUDA and gloo on CPU.
"""

import atexit
import contextlib
import datetime
import functools
import json
import os
import platform
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.checkpoint import atomic_write_json, cache_dir
from common.config import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (no sparsity) bfloat16/float16 tensor-core peaks in FLOP/s, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name() in order, so the more specific names come first.
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 125e12), ("A10", 125e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),
]


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype             # the autocast dtype; float32 means no autocast
    compile: bool
    seed: int
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False

    def __post_init__(self):
        # A GradScaler only does something for float16; for bf16/float32 it is a transparent no-op.
        enabled = self.dtype == torch.float16
        if hasattr(torch.amp, "GradScaler"):
            self.scaler = torch.amp.GradScaler(self.device_type, enabled=enabled)
        else:  # torch < 2.3 has the CUDA one only, which is all float16 training needs there
            self.scaler = torch.cuda.amp.GradScaler(enabled=enabled)

    @property
    def device_type(self):
        return self.device.type

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        """Mixed-precision context for forward passes (a no-op in float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def log(self, *args, **kwargs):
        """print, on the main process only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def synchronize(self):
        """Wait for queued GPU work, so that a wall-clock timing measures the work itself."""
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device_type == "mps":
            torch.mps.synchronize()

    def wrap(self, model):
        """Wrap `model` in DistributedDataParallel when running under torchrun; else return it as is."""
        if not self.ddp:
            return model
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.local_rank] if self.device_type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def maybe_compile(self, model):
        """torch.compile(model) when asked for and possible; otherwise the model, with one warning line."""
        if not self.compile:
            return model
        reason = compile_unavailable_reason(self.device_type)
        if reason:
            self.log(f"warning: --compile ignored: {reason}")
            return model
        return torch.compile(model)

    def all_reduce_mean(self, value):
        """Average a float across ranks (the same float when not distributed)."""
        if not self.ddp:
            return float(value)
        tensor = torch.tensor(float(value), device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.item() / self.world_size

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def cleanup(self):
        """At exit: wait for every rank, then tear the process group down. A rank that finished first and
        destroyed its half could leave the others blocked in destroy_process_group (seen with gloo on
        torch 2.1); if a rank does not arrive within a minute (it failed), leave without the teardown."""
        if self.ddp and dist.is_initialized():
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
            except RuntimeError:
                return
            dist.destroy_process_group()


class StopFlag:
    """Ctrl-C as a request, not an exception: the first one sets `requested`, and the training loop saves
    a checkpoint at the next step boundary and returns; a second one interrupts at once. Raising
    KeyboardInterrupt mid-step instead could leave half the parameters updated by optimizer.step().

        with StopFlag() as stop:
            for it in range(max_iters):
                ...one optimizer step...
                if stop.requested:
                    save_checkpoint(...); break
    """

    def __init__(self, message="\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to abort)"):
        self.message = message
        self.requested = False
        self.previous = None

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)     # a second Ctrl-C gets the usual KeyboardInterrupt
        print(self.message, flush=True)                  # stdout, with the progress lines

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:                               # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def compile_unavailable_reason(device_type):
    """Why torch.compile cannot work here, or None. Checked up front because compile fails lazily,
    at the first forward pass, deep inside the compiler."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs torch 2.0+)"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401  (the compiler's GPU code generator)
        except ImportError:
            return "Triton is not installed (pip install triton)"
    elif device_type == "cpu":
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
            return "no C++ compiler found for the CPU backend"
    elif device_type == "mps":
        return "torch.compile does not support MPS well yet"
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows"
    return None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(device="auto", dtype="auto", compile=False, seed=1337):
    """Pick the device and precision, seed everything, start DDP under torchrun; return a `Runtime`."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ   # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r} (valid: auto, cpu, cuda, mps)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (try --device cpu)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available on this machine (try --device cpu)")
    if device == "cuda" and distributed:
        device = f"cuda:{local_rank}"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        torch.set_float32_matmul_precision("high")   # TF32 for the float32 matmuls autocast leaves

    if dtype == "auto":
        if torch_device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (valid: auto, {', '.join(DTYPES)})")

    if distributed:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            # A bounded wait: a collective that a rank never joins (it died, or runs other shapes) fails
            # after LLMFS_DIST_TIMEOUT seconds (default 10 minutes) instead of gloo's default 30.
            timeout = datetime.timedelta(seconds=float(os.environ.get("LLMFS_DIST_TIMEOUT") or 600))
            dist.init_process_group(backend=backend, timeout=timeout)
    seed_everything(seed)
    runtime = Runtime(device=torch_device, dtype=DTYPES[dtype], compile=bool(compile), seed=seed,
                      rank=rank, local_rank=local_rank, world_size=world_size, ddp=distributed)
    if distributed:
        atexit.register(runtime.cleanup)
        # torchrun stops the other ranks with SIGTERM when one fails: say so in one line, not silently
        signal.signal(signal.SIGTERM, functools.partial(stopped_by_launcher, rank))
    return runtime


def stopped_by_launcher(rank, signum, frame):
    """SIGTERM under torchrun: another rank failed (or the job was cancelled). One line, exit 143 (128 +
    SIGTERM) at once: a collective with the failed rank could otherwise hold this one until its timeout.
    Every write is atomic, so what was saved is complete."""
    print(f"error: rank {rank}: stopped by the launcher (SIGTERM): another process of this run failed or the run "
          f"was cancelled; the checkpoints already written are complete", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(143)


def measure_cpu_peak_flops(size=1024, repeats=5):
    """The best float32 matmul throughput of this CPU with torch's current thread count, in FLOP/s."""
    generator = torch.Generator().manual_seed(0)      # its own: never shifts the training's random stream
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    a @ b                                           # warm up the BLAS threads
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best                       # a (n x n) @ (n x n) matmul is 2 n^3 flops


def peak_flops(device, dtype=torch.bfloat16, at_least=0.0):
    """Peak FLOP/s for MFU: a data-sheet figure on known GPUs; on CPU, the best float32 matmul rate
    this machine has shown (kept in the cache folder).

    A CPU measurement taken while other programs ran reads low, and MFU against it would read above
    100%. So the peak is re-measured on every call and the best ever seen is kept, and `at_least`, a
    rate the caller has just achieved, raises it further: the true peak is at least what a training
    step reached. MFU against this peak never exceeds 100%."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                # Without autocast the matmuls run in TF32, at half the bf16 tensor-core rate.
                return flops if dtype in (torch.bfloat16, torch.float16) else flops / 2
        return None
    if device.type != "cpu":
        return None
    key = f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
    path = cache_dir() / "cpu_peak_flops.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    best = max(measure_cpu_peak_flops(), float(at_least))   # a tenth of a second
    if best > cached.get(key, 0.0):
        cached[key] = best
        try:
            atomic_write_json(path, cached)
        except OSError:
            pass                                    # a read-only home: nothing to keep
    return cached[key]


def estimate_mfu(flops_per_token, tokens_per_second, device, dtype=torch.bfloat16):
    """Model FLOPs utilisation: the fraction of the device's peak that the training step achieves."""
    achieved = flops_per_token * tokens_per_second
    peak = peak_flops(device, dtype, at_least=achieved if torch.device(device).type == "cpu" else 0.0)
    if not peak:
        return None
    return achieved / peak

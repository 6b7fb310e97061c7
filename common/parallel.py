"""Model parallelism: each rank holds and computes a part of the model, not a whole copy (DDP's way).

    par = setup_parallel(rt, "fsdp")                # or "tp" (tensor parallel, 2-D with FSDP), "ddp"
    model = par.shard(GPT(config).to(rt.device))    # in place: the same module, its parameters sharded
    optimizer = model.configure_optimizers(...)     # after sharding: AdamW's moments are sharded too
    state = full_state_dict(model, par)             # every rank calls it: the state dict one process reads

- From scratch, for reading: Megatron-LM's column- and row-parallel linears (Shoeybi et al. 2019) in plain
  torch.distributed collectives. An MLP Z = act(X A) B with A split by columns and B by rows,

      A = [A_1, A_2]     Y_i = act(X A_i)                  rank i, no communication (act is elementwise)
      B = [B_1; B_2]     Z = Y_1 B_1 + Y_2 B_2             one all-reduce

  needs two operators: f (identity forward, all-reduce backward: every rank's dL/dX adds up) before the
  column-parallel layer, g (all-reduce forward, identity backward) after the row-parallel one. Attention
  splits the same way by heads: W^Q, W^K, W^V by columns (heads per rank), W^O by rows.
- With torch: `--parallel tp` is the same plan written with torch.distributed.tensor.parallel
  (ColwiseParallel, RowwiseParallel) on a device mesh; `--parallel fsdp` is FSDP2 (`fully_shard`, per block
  and the root): each rank keeps 1/N of every parameter, gradient and AdamW moment, all-gathers a block's
  parameters just before it runs and reduce-scatters its gradients after its backward (ZeRO-3, Rajbhandari
  et al. 2020). `--tp_size N` below the world size gives 2-D parallelism: TP inside groups of N ranks,
  FSDP across the groups.
- Fused matrices: c_attn stacks [W^Q; W^K; W^V] and SwiGLU's c_fc [W1; W3]. Splitting the stack in halves
  would give rank 0 all of q and rank 1 k and v; so before sharding, each part's rows are reordered rank by
  rank ([q_0; k_0; v_0; q_1; k_1; v_1]: heads per rank, also for grouped-query attention's fewer K/V heads)
  and a plain ColwiseParallel then hands each rank its heads. State dicts undo the reordering, so a
  checkpoint has the one-process layout.
- Checkpoints gather to one consolidated state dict (full tensors, the one-process layout) rather than
  torch.distributed.checkpoint's sharded folders: ckpt.pt stays one file that --stage sample / finetune,
  save_pretrained and a one-process --resume read unchanged, and a run may resume on another number of
  ranks. The price is that every rank holds the full state on the CPU while it is saved: fine up to a few
  billion parameters; beyond that, DCP (each rank writes its own shards) is the tool.
"""

import contextlib
import dataclasses
import functools
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.config import UserError

PARALLEL_KINDS = ("ddp", "fsdp", "tp")
MIN_TORCH = (2, 6)            # fully_shard and torch.distributed.tensor public


def torch_version():
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


# ------------------------------------------------------------------ from scratch: Megatron's f and g
class _CopyToParallelRegion(torch.autograd.Function):
    """f: identity forward; all-reduce (sum) backward, since each rank's part of the layer sent a share
    of dL/dX back and X fed all of them."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromParallelRegion(torch.autograd.Function):
    """g: all-reduce (sum) forward, Z = sum_i Y_i B_i; identity backward, since dL/dZ reaches every
    partial sum unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """Y_i = f(X) A_i^T + b_i: rank i of n holds rows i*out/n .. (i+1)*out/n of the (out, in) weight, i.e. the
    output columns of Y = X A. The output stays split (one slice per rank), as a RowParallelLinear wants it.

    A (4 -> 6) Linear on 2 ranks: rank 0 holds weight rows 0-2 and returns Y[..., 0:3], rank 1 rows 3-5."""

    def __init__(self, linear, rank, world_size, group=None):
        super().__init__()
        if linear.out_features % world_size:
            raise ValueError(f"out_features ({linear.out_features}) must be divisible by world_size ({world_size})")
        rows = slice(rank * linear.out_features // world_size, (rank + 1) * linear.out_features // world_size)
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach()[rows].clone())

    def forward(self, x):
        return F.linear(_CopyToParallelRegion.apply(x, self.group), self.weight, self.bias)   # (..., out / n)


class RowParallelLinear(nn.Module):
    """Z = g(Y_i B_i^T) + b: rank i holds columns i*in/n .. (i+1)*in/n of the (out, in) weight (the rows of
    B in Z = Y B) and reads its slice Y_i of the input; the partial products are summed by one all-reduce.
    The bias is added once, after the sum."""

    def __init__(self, linear, rank, world_size, group=None):
        super().__init__()
        if linear.in_features % world_size:
            raise ValueError(f"in_features ({linear.in_features}) must be divisible by world_size ({world_size})")
        columns = slice(rank * linear.in_features // world_size, (rank + 1) * linear.in_features // world_size)
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach()[:, columns].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, y_local):
        z = _ReduceFromParallelRegion.apply(F.linear(y_local, self.weight), self.group)     # (..., out)
        return z if self.bias is None else z + self.bias


# ------------------------------------------------------------------------------------ checks and setup
def tp_divisibility_error(tp_size, n_head, n_kv_head, ffn_width):
    """Why a model with these widths cannot be split over tp_size ranks by heads, or None."""
    for name, value in (("n_head", n_head), ("n_kv_head", n_kv_head), ("the FFN width", ffn_width)):
        if value % tp_size:
            return (f"--parallel tp splits attention by heads and the FFN by columns: {name} ({value}) must be "
                    f"divisible by the tensor-parallel size ({tp_size})")
    return None


def check_parallel_config(kind, tp_size, n_head, n_kv_head, ffn_width, environ=os.environ):
    """Bad --parallel / --tp_size input -> UserError (one line), before anything starts. The world size is
    torchrun's WORLD_SIZE."""
    if kind not in PARALLEL_KINDS:
        raise UserError(f"unknown parallel {kind!r} (valid: {', '.join(PARALLEL_KINDS)})")
    if tp_size < 0:
        raise UserError(f"--tp_size must be at least 0 (0 = every rank), got {tp_size}")
    if tp_size > 1 and kind != "tp":
        raise UserError(f"--tp_size {tp_size} needs --parallel tp")
    if kind == "ddp":
        return
    if torch_version() < MIN_TORCH:
        raise UserError(f"--parallel {kind} needs torch {'.'.join(map(str, MIN_TORCH))}+ (fully_shard, "
                        f"torch.distributed.tensor); this is torch {torch.__version__}: upgrade, or use --parallel ddp")
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        raise UserError(f"--parallel {kind} shards the model across processes: start it with torchrun "
                        f"(torchrun --standalone --nproc_per_node=2 05_gpt/train.py --parallel {kind})")
    world_size = int(environ["WORLD_SIZE"])
    if kind == "tp":
        tp = tp_size or world_size
        if world_size % tp:
            raise UserError(f"--tp_size {tp} must divide the number of processes ({world_size})")
        error = tp_divisibility_error(tp, n_head, n_kv_head, ffn_width)
        if error:
            raise UserError(error)


@dataclasses.dataclass
class Parallel:
    """How the ranks share the work: dp_size data-parallel replicas (DDP copies or FSDP shards), each of
    tp_size tensor-parallel ranks. The batch is drawn by data-parallel rank: TP ranks share one."""
    kind: str = "ddp"
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    mesh: object = None                 # DeviceMesh ("dp", "tp") under fsdp / tp; None under ddp
    fused_rows: dict = dataclasses.field(default_factory=dict)  # TP: {state name: per-part rows}, reordered

    @property
    def sharded(self):
        return self.kind in ("fsdp", "tp")

    @property
    def fsdp(self):
        return self.kind == "fsdp" or (self.kind == "tp" and self.dp_size > 1)

    def shard(self, model, mixed_precision=None):
        """Shard `model` in place (TP first, then FSDP across the data-parallel ranks) and return it."""
        if self.kind == "tp":
            apply_tensor_parallel(model, self.mesh["tp"], self)
        if self.fsdp:
            apply_fsdp(model, self.mesh["dp"], mixed_precision)
        return model

    def describe(self, config):
        """One line: how the model is split."""
        if self.kind == "fsdp":
            return (f"FSDP: parameters, gradients and AdamW moments sharded over {self.dp_size} ranks "
                    f"({config.n_layer} blocks + the root, each all-gathered when it runs)")
        line = (f"tensor parallel: {self.tp_size} ranks per group, {config.n_head // self.tp_size} of "
                f"{config.n_head} heads and 1/{self.tp_size} of the FFN each")
        return line + (f"; FSDP across {self.dp_size} groups (2-D)" if self.dp_size > 1 else "")

    def gradient_sync(self, model, last_micro_step, ddp):
        """The context of one micro-batch's forward and backward under gradient accumulation: gradients
        are averaged across data-parallel ranks (DDP's all-reduce, FSDP's reduce-scatter) on the last one
        only; before it they accumulate locally."""
        if self.fsdp:
            model.set_requires_gradient_sync(last_micro_step)
            return contextlib.nullcontext()
        if ddp and not self.sharded and not last_micro_step:
            return model.no_sync()
        return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _mesh(device_type, dp_size, tp_size):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (dp_size, tp_size), mesh_dim_names=("dp", "tp"))


def setup_parallel(rt, kind="ddp", tp_size=0, config=None):
    """The `Parallel` of this run. Under fsdp / tp, a device mesh of dp_size x tp_size ranks (rank r is TP
    rank r % tp_size of replica r // tp_size: TP groups are neighbours, inside one node). With `config` (a
    dict), the ranks first check that they run the same config: ranks that disagree (other flags, another
    file) stop with one line instead of hanging in a collective whose shapes differ."""
    if config is not None and rt.ddp:
        ours = json.dumps(config, sort_keys=True, default=str)
        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, ours)
        differing = [rank for rank, theirs in enumerate(everyone) if theirs != ours]
        if differing:
            theirs = json.loads(everyone[differing[0]])
            keys = [key for key in config if theirs.get(key) != config[key]]
            raise UserError(f"rank {rt.rank} and rank {differing[0]} run different configs "
                            f"({', '.join(keys[:3]) or 'fields'} differ): start every rank with the same flags")
    if kind == "ddp" or not rt.ddp:
        return Parallel("ddp", dp_rank=rt.rank, dp_size=rt.world_size)
    tp = (tp_size or rt.world_size) if kind == "tp" else 1
    dp = rt.world_size // tp
    return Parallel(kind, dp_rank=rt.rank // tp, dp_size=dp, tp_size=tp, mesh=_mesh(rt.device_type, dp, tp))


# ---------------------------------------------------------------------------- with torch: TP and FSDP2
def interleave_order(sizes, parts):
    """The row order that puts each rank's share of every part together, part after part:

        sizes [4, 2, 2] (q, k, v rows), parts 2 -> [0, 1, 4, 6, 2, 3, 5, 7]   rank 0: q 0-1, k 4, v 6
    """
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order = []
    for rank in range(parts):
        for start, size in zip(starts, sizes):
            share = size // parts
            order.extend(range(start + rank * share, start + (rank + 1) * share))
    return torch.tensor(order)


def apply_tensor_parallel(model, tp_mesh, par):
    """Megatron's plan with torch.distributed.tensor.parallel, per block: c_attn (W^Q, W^K, W^V) and c_fc
    split by output columns (ColwiseParallel: f before them), both c_proj by input rows (RowwiseParallel:
    g after them, one all-reduce per sublayer). Embeddings, norms and the tied LM head stay whole on every
    rank (their inputs are the same on every rank, so are their gradients), as Replicate DTensors. The
    attention modules are told how many heads they now hold."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    tp = tp_mesh.size()
    config = model.config
    error = tp_divisibility_error(tp, config.n_head, config.kv_heads, config.ffn_width)
    if error:
        raise UserError(error)
    for i, block in enumerate(model.transformer.h):
        fused = {"attn.c_attn": block.attn.qkv_sizes}
        if config.mlp == "swiglu":
            fused["mlp.c_fc"] = [config.ffn_width, config.ffn_width]               # [W1 (gate); W3 (up)]
        for name, sizes in fused.items():
            linear = block.get_submodule(name)
            order = interleave_order(sizes, tp)
            with torch.no_grad():
                for kind in ("weight", "bias"):
                    tensor = getattr(linear, kind)
                    if tensor is not None:
                        tensor.copy_(tensor[order.to(tensor.device)])
                        par.fused_rows[f"transformer.h.{i}.{name}.{kind}"] = sizes
        block.attn.n_head //= tp                                      # the heads this rank computes
        block.attn.n_kv_head //= tp
        parallelize_module(block, tp_mesh, {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
                                            "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()})
    replicate_the_rest(model, tp_mesh)
    return model


def replicate_the_rest(model, tp_mesh):
    """Make the parameters that TP leaves whole (embeddings, norms, the tied head) Replicate DTensors on the
    mesh, each module taking and giving plain tensors: then every parameter is a DTensor of one mesh, as
    torch's clip_grad_norm_, AdamW's fused kernel and FSDP across the groups want them."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def inputs_to_dtensors(module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) if torch.is_tensor(x) else x
                     for x in inputs)

    def output_to_local(module, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    tied = model.config.tie_word_embeddings
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        if own and not any(isinstance(p, DTensor) for p in own) and not (tied and module is model.lm_head):
            distribute_module(module, tp_mesh, input_fn=inputs_to_dtensors, output_fn=output_to_local)
    if tied:   # wte.weight is a new (DTensor) parameter now: tie the head to it again
        model.lm_head.weight = model.transformer.wte.weight
        distribute_module(model.lm_head, tp_mesh, input_fn=inputs_to_dtensors, output_fn=output_to_local)


def apply_fsdp(model, dp_mesh, mixed_precision=None):
    """FSDP2: each block is one unit (its parameters are all-gathered together just before it runs and
    freed after), the root holds what is left (embeddings, final norm, the tied head). `mixed_precision`
    (bf16 on CUDA) is the dtype the parameters are all-gathered and computed in; master weights, the
    gradients' reduction and AdamW stay fp32. (float16 is left to autocast: its GradScaler is untested here
    with sharded gradients.)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy()
    if mixed_precision == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return model


def _checkpointed_forward(block, *args):
    if not torch.is_grad_enabled():                  # evaluation, generation: nothing to save for backward
        return type(block).forward(block, *args)
    return checkpoint(type(block).forward, block, *args, use_reentrant=False)


def checkpoint_blocks(model):
    """Activation checkpointing: each block keeps only its input for backward and runs its forward again
    there, so activations take O(n_layer) memory instead of O(n_layer x block internals), for one extra
    forward (~1/3 more compute). In place; parameter names do not change (so checkpoints do not either)."""
    for block in model.transformer.h:
        block.forward = functools.partial(_checkpointed_forward, block)
    return model


# --------------------------------------------------------------------------- gradients, state, memory
def _dtensor_class():
    from torch.distributed.tensor import DTensor
    return DTensor


def _full(name, tensor, par):
    """One tensor of a state dict in the one-process layout: gathered, the TP reordering undone, on CPU."""
    if isinstance(tensor, _dtensor_class()):
        tensor = tensor.full_tensor()
    if name in par.fused_rows:
        tensor = tensor[torch.argsort(interleave_order(par.fused_rows[name], par.tp_size)).to(tensor.device)]
    return tensor.detach().cpu().clone()


def full_state_dict(model, par):
    """model.state_dict() with full tensors in the one-process layout, on every rank (a collective under
    fsdp / tp: every rank calls it)."""
    if not par.sharded:
        return model.state_dict()
    return {name: _full(name, tensor, par) for name, tensor in model.state_dict().items()}


def _names_by_index(model, optimizer):
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model, optimizer, par):
    """optimizer.state_dict() as one process would have it (AdamW's moments gathered and in the
    one-process layout), on every rank; a collective under fsdp / tp."""
    state = optimizer.state_dict()
    if not par.sharded:
        return state
    names = _names_by_index(model, optimizer)
    return {"state": {index: {key: _full(names[index], value, par) if torch.is_tensor(value) and value.dim() else value
                              for key, value in moments.items()}
                      for index, moments in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_full_optimizer_state_dict(model, optimizer, state, par):
    """Load a one-process optimizer state dict (every rank has read it) into the optimizer of a sharded
    model: each moment is reordered (TP) and sharded like its parameter."""
    if not par.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor
    DTensor = _dtensor_class()
    names = _names_by_index(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, moments in state["state"].items():
        index, param, name = int(index), params[int(index)], names[int(index)]
        sharded[index] = {}
        for key, value in moments.items():
            if torch.is_tensor(value) and value.dim() and isinstance(param, DTensor):
                if name in par.fused_rows:
                    value = value[interleave_order(par.fused_rows[name], par.tp_size)]
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            sharded[index][key] = value
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def _local_bytes(tensor):
    if isinstance(tensor, _dtensor_class()):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def state_bytes(model):
    """What this rank holds of the model, in bytes: {"parameters", "gradients"} (a sharded tensor counts its
    local shard; the tied embedding once). Under FSDP each is 1/N of DDP's."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"parameters": sum(_local_bytes(p) for p in params),
            "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None)}


def optimizer_bytes(optimizer):
    """Bytes of the optimizer's state on this rank (AdamW: two moments per parameter, sharded like it)."""
    return sum(_local_bytes(value) for moments in optimizer.state.values() for value in moments.values()
               if torch.is_tensor(value))


def describe_memory(per_rank):
    """state_bytes of each rank as one line: "training state per rank: 0.27 MiB (parameters 0.09, ...)"."""
    mib = [{key: value / 2**20 for key, value in rank.items()} for rank in per_rank]
    first = mib[0]
    return (f"training state per rank: {sum(first.values()):.2f} MiB (parameters {first['parameters']:.2f}, "
            f"gradients {first['gradients']:.2f}, AdamW {first['optimizer']:.2f})"
            + (f" on rank 0 of {len(mib)}" if len(mib) > 1 else ""))


def peak_memory_bytes(device):
    """This process's peak memory: allocated GPU memory on CUDA, else the resident set size (RSS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # kB on Linux


def gather_objects(rt, obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process)."""
    if not rt.ddp:
        return [obj]
    everyone = [None] * rt.world_size
    dist.all_gather_object(everyone, obj)
    return everyone

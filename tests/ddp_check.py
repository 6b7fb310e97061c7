"""Worker for test_common_runtime's DDP test (run under torchrun; not collected by pytest).

Each rank trains the same tiny model for a few SGD steps on its shard of one fixed batch and writes its
final parameters to OUT_DIR/rank{rank}.pt. With DDP averaging the gradients, every rank must end with
the parameters that one process gets by training on the whole batch.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.runtime import setup  # noqa: E402


def make_model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 8, generator=generator)
    targets = torch.randn(16, 1, generator=generator)
    return model, inputs, targets


def train(model, inputs, targets, steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    rt = setup(device="cpu", seed=0)
    model, inputs, targets = make_model_and_batch()
    shard = slice(rt.rank * len(inputs) // rt.world_size, (rt.rank + 1) * len(inputs) // rt.world_size)
    ddp_model = rt.wrap(model)
    train(ddp_model, inputs[shard], targets[shard])
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / f"rank{rt.rank}.pt")
    rt.cleanup()

"""Processes: one per device under `torchrun --nproc_per_node=N` (gloo on CPU, NCCL on GPU), or a
single process, and the two collectives the trainers need. Every rank must reach every collective.
"""
import os

import torch
import torch.distributed as dist

from configurator import require


def check_device(device):
    """--device, checked before any model work: auto, cpu or cuda[:N], and CUDA only where torch sees it."""
    require(device in ("auto", "cpu") or device.startswith("cuda"), f"--device must be auto, cpu or cuda[:N], got {device!r}")
    require(not device.startswith("cuda") or torch.cuda.is_available(), f"--device={device}, but torch sees no CUDA device")


def setup(device="auto"):
    """Join the process group if torchrun started us. Returns (ddp, rank, world_size, torch.device)."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    return ddp, rank, world, torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")


def gather(x):
    """Every rank's tensor `x` (same shape on each), concatenated in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def average_gradients(params):
    """Average the gradients of `params` over the ranks: what DistributedDataParallel would do, done
    by hand because only the small LoRA weights train."""
    world = dist.get_world_size()
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world


def teardown(ddp):
    if ddp:
        dist.destroy_process_group()

"""Processes: one per device under `torchrun --nproc_per_node=N` (gloo on CPU, NCCL on GPU), or a
single process, and the collectives the trainers and their evaluation need. Every rank must reach every
collective.
"""
import os
import re

import torch
import torch.distributed as dist

from plumbing.configurator import require


def check_device(device):
    """--device, checked before any model work: auto, cpu, cuda or cuda:N, for a GPU torch sees. A typo,
    mps or any other backend is refused (the code runs on CUDA GPUs and the CPU). Under torchrun each
    process takes the GPU of its LOCAL_RANK (pick_device), so a fixed cuda:N is refused there."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device)
    require(m, f"--device must be auto, cpu, cuda or cuda:N, got {device!r}"
               + ("; mps is not supported (CUDA GPUs and the CPU only)" if device.startswith("mps") else ""))
    if not device.startswith("cuda"):
        return
    n = torch.cuda.device_count()
    require(n > 0, f"--device={device}, but torch sees no CUDA device; pass --device=cpu or auto")
    require(m.group(1) is None or int(m.group(1)) < n,
            f"--device={device}, but torch sees {n} CUDA device{'s' * (n > 1)}: cuda:0 to cuda:{n - 1}")
    require(m.group(1) is None or int(os.environ.get("WORLD_SIZE", "1")) == 1,
            f"--device={device} under torchrun: each process takes the GPU of its LOCAL_RANK; pass --device=cuda "
            "and choose the GPUs with CUDA_VISIBLE_DEVICES")


def pick_device(device):
    """The torch.device of this process for a checked --device: auto is cuda if torch sees a GPU, else the
    CPU; under torchrun rank r on a node takes cuda:LOCAL_RANK; otherwise cuda:N as given (cuda = cuda:0)."""
    if not (torch.cuda.is_available() if device == "auto" else device.startswith("cuda")):
        return torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda", int(device.partition(":")[2] or 0))


def use_device(device):
    """pick_device, made the current CUDA device (torch.cuda.set_device), so that NCCL and whatever
    allocates on "cuda" without an index use this process's GPU, not every rank cuda:0."""
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def setup(device="auto"):
    """Pick this process's device (use_device) and join the process group if torchrun started us.
    Returns (ddp, rank, world_size, torch.device).

    The process group keeps torch's timeout (NCCL 10 minutes, gloo 30): a rank waits in a collective only
    while another finishes its share of the same work or rank 0 writes the epoch's files, seconds. The
    long work alone, the evaluation, is shared out over the ranks (plumbing/evaluation.py), not waited for."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    dev = use_device(device)
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    return ddp, rank, world, dev


def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) in a run of one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather(x):
    """Every rank's tensor `x` (same shape on each), concatenated in rank order; `x` itself in a run
    of one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def assemble(x):
    """The whole of `x` on every rank, where each rank filled in its own part and left zeros elsewhere
    (evaluation.evaluate's images and rewards): a sum over the ranks, exact, since each element is one
    rank's number plus zeros. NCCL sums on this process's GPU, gloo on the CPU; `x` comes back where it
    was. `x` itself in a run of one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    y = x.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y)
    return y.to(x.device)


def average_gradients(params):
    """Average the gradients of `params` over the ranks: what DistributedDataParallel would do, done
    by hand because only the small LoRA weights train. Nothing to do in a run of one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world


def teardown(ddp):
    """Leave the process group, all ranks together: a rank that closed its connections while another
    still listened on them could make gloo's reader thread throw (an uncaught C++ exception: SIGABRT)."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()

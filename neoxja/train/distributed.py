"""Process-group set-up and model wrapping: one process, DDP, or FSDP2 (`fully_shard` per layer).

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; we only read them.
Backend: NCCL when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    distributed: bool  # a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: str | None = None, need_group: bool = False) -> DistEnv:
    """Join the process group torchrun describes (or make a group of one when FSDP needs a group)."""
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)  # plain "cuda": each process its own GPU
        torch.cuda.set_device(device)
    distributed = launched or need_group
    if distributed and not dist.is_initialized():
        if not launched:  # a group of one on this machine
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
    return DistEnv(rank, local_rank, world_size, device, distributed)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed and env.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= env.world_size
    return value


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def shard_fsdp(module: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.Module:
    """FSDP2: each transformer layer is its own unit (gathered just for its forward / backward); the
    root unit holds the rest (embeddings, tied LM head, final LayerNorm). Parameters, gradients and
    optimizer state are sharded across all ranks."""
    from torch.distributed.fsdp import fully_shard

    # Each layer also returns its key/value tensors, views of the fused QKV projection; nothing writes
    # into them in place, which is the only case this warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module

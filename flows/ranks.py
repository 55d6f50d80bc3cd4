"""Where this process sits among the ranks of a job, as the pipeline needs it: its rank and the
world size (each rank reads its slice of every global batch), and rank 0's view of an object
(the file manifest, listed once per job). Joining a process group is the trainer's business
(:mod:`flows.training.distributed`); without one, everything here is single-process."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist


def distributed_position() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else from torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

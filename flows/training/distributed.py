"""Running under ``torchrun``: the process group, the global batch size, and resume checks.

flows has no launcher and no communication of its own: ``torchrun`` starts the processes and
sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` joins the process group those describe (``gloo`` for CPU tensors, ``nccl`` for
CUDA ones), and torch.distributed does the rest (DDP's gradient all-reduce, metric gathering,
the location of rank 0's file manifest, broadcast: see :mod:`flows.sources.manifest`).
:func:`flows.training.train.train` calls :func:`setup` itself, so a recipe runs unchanged under
``torchrun --nproc-per-node N``.

Data order is global: every flow cuts each epoch into *global* batches and rank ``r`` of ``W``
takes ``batch[r::W]`` (see :mod:`flows.sampling`). The loader position counts global batches, so
rank 0's loader state, taken between batches (when all ranks are in step), is every rank's, on
any number of ranks that makes the same global batches: a mid-epoch checkpoint written on 2
ranks with batch size 2 resumes on 1 rank with batch size 4, or on 4 ranks with batch size 1.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from flows.errors import FlowsError
from flows.ranks import broadcast_object

if TYPE_CHECKING:
    from flows.loader import Loader
    from flows.training.checkpoint import CheckpointManager
    from flows.training.recipe import Recipe

__all__ = ["Ranks", "backend_for", "check_plans", "global_plans", "newest_on_every_rank",
           "per_rank_batch_size", "setup", "teardown", "with_batch_size"]

R = TypeVar("R", bound="Recipe")

_created = False  # whether setup() initialized the process group (so teardown() may destroy it)


def backend_for(device: str | torch.device | None = None) -> str:
    """``gloo`` for CPU training; with CUDA, ``nccl`` for CUDA tensors and ``gloo`` for CPU ones
    (torch's ``"cpu:gloo,cuda:nccl"``), so CPU-side collectives keep working."""
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def setup(device: str | torch.device | None = None,
          timeout: timedelta | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes, if there is one; ``(rank, world size)``.

    Under ``torchrun`` with ``WORLD_SIZE`` > 1 and no process group yet, initializes it from the
    environment (``env://``) with :func:`backend_for` ``(device)``; on CUDA, first selects the
    GPU ``LOCAL_RANK``. Idempotent: a group already initialized (by you or an earlier call) is
    used as it is. Outside ``torchrun`` this does nothing and returns ``(0, 1)``. A group created
    here is destroyed by :func:`teardown`, or at interpreter exit."""
    global _created
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise FlowsError(f"WORLD_SIZE is {world} but this torch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise FlowsError(f"WORLD_SIZE is {world} but {', '.join(missing)} not set: launch with "
                         f"torchrun (e.g. torchrun --nproc-per-node {world} -m flows train ...)")
    backend = backend_for(device)
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    options: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend, **options)
    if not _created:
        atexit.register(teardown)
    _created = True
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it (a group you created is yours)."""
    global _created
    if _created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _created = False


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """The batch size each of ``world_size`` ranks uses for ``global_batch_size`` in all."""
    if global_batch_size < 1 or global_batch_size % world_size:
        raise FlowsError(f"global batch size {global_batch_size} does not split evenly over "
                         f"{world_size} ranks")
    return global_batch_size // world_size


def with_batch_size(recipe: R, batch_size: int) -> R:
    """A copy of ``recipe`` whose config has ``batch_size`` (the recipe itself is unchanged)."""
    if recipe.config.batch_size == batch_size:
        return recipe
    changed = copy.copy(recipe)
    changed.config = dataclasses.replace(recipe.config, batch_size=batch_size)
    return changed


def global_plans(loader: Loader) -> list[str] | None:
    """What makes the global batches of each flow in ``loader``: the source's sample count and
    the plan (global batch size, drop_last, label, bucket limits). Two runs whose descriptions
    are equal cut every epoch into the same global batches, whatever their numbers of ranks,
    so a mid-epoch loader position carries over. None when a plan cannot be described (a
    custom plan that is not a dataclass)."""
    described: list[str] = []
    for sampler in loader.samplers:
        if not dataclasses.is_dataclass(sampler.plan):
            return None
        described.append(f"{len(sampler.source)} samples, {sampler.plan!r}")
    return described



def check_plans(url: str, state: dict[str, Any], plans: list[str] | None, world: int) -> None:
    """Refuse to resume checkpoint ``state`` (read from ``url``) mid-epoch unless this run, on
    ``world`` ranks, makes the same global batches (``plans``: :func:`global_plans`): a
    mid-epoch loader position means something only for those. An epoch-end checkpoint starts
    the next epoch, which any batching may do."""
    saved = state.get("plans")
    if state["batch"] == 0 or saved is None or plans is None or saved == plans:
        return
    raise FlowsError(
        f"checkpoint {url} stopped mid-epoch on {state.get('world_size', 1)} rank(s) with global "
        f"batches [{'; '.join(saved)}], but this run on {world} rank(s) makes "
        f"[{'; '.join(plans)}]: resume with the same global batch size (--global-batch-size, "
        f"or --batch-size global/ranks), or from an epoch-end checkpoint")


def newest_on_every_rank(checkpoints: CheckpointManager, rank: int) -> tuple[str, dict[str, Any]] | None:
    """The newest valid checkpoint as ``(url, state)``, the same on every rank: rank 0 picks it,
    every rank loads that one (from storage every machine reads)."""
    found = checkpoints.latest_valid(map_location="cpu") if rank == 0 else None
    url = broadcast_object(found[0] if found is not None else None)
    if url is None or found is not None:
        return found
    try:
        return url, checkpoints.load(url, map_location="cpu")
    except FlowsError as e:
        raise FlowsError(f"rank {rank}: {e}; under torchrun on several machines the checkpoint "
                         "directory must be storage every machine reads (s3://, a shared file "
                         "system)") from e


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` of ``world`` (0 of 1 without a process group) and what the ranks
    of a training job do together; alone, each is a no-op."""

    rank: int
    world: int
    device: torch.device  # where the collectives' tensors live (nccl: CUDA)

    def sum(self, n: int) -> int:
        """``n`` added over the ranks."""
        if self.world == 1:
            return n
        total = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

"""Thread counts: torch intra-op threads for the training step, and one each for worker threads."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable

import torch


def training_threads() -> int:
    """torch intra-op threads for the training step: half the cores this rank may use (its CPU
    affinity divided by torchrun's ``LOCAL_WORLD_SIZE``), at least 1, leaving the other half to
    the loader's workers (one thread each); ``OMP_NUM_THREADS``, when set, wins. Oversubscribed
    OpenMP threads spin and wait on each other. The count deliberately does not depend on the
    number of workers: another intra-op thread count changes the order of float reductions, so a
    run resumed with another worker count would no longer be bit-identical."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) // 2)


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (it sets the calling thread's
    count only), or None when there is none to be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps}
    except OSError:
        return None
    for path in sorted(paths):
        if path.rsplit("/", 1)[-1].startswith(("libgomp", "libiomp", "libomp")):
            with contextlib.suppress(OSError, AttributeError):
                return ctypes.CDLL(path).omp_set_num_threads
    return None


def one_intra_op_thread() -> None:
    """A worker thread's initializer: its torch ops use one intra-op thread. torch's own
    ``set_num_threads`` would also change the count every thread starting torch later takes up
    (the training loop's included), so OpenMP's per-thread setting is used where it is found."""
    torch.get_num_threads()  # torch's per-thread set-up first: it would reset this thread's count
    set_this_thread = _omp_set_num_threads()
    if set_this_thread is not None:
        set_this_thread(1)
    else:
        torch.set_num_threads(1)

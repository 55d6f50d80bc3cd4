"""Evaluation: a model's loss and metric sums over an eval loader, leaving training untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from flows.nodes.to_device import to_device
from flows.training.checkpoint import capture_rng, restore_rng
from flows.training.tasks import Sums, Task, add_sums, count_samples


def evaluate(model: torch.nn.Module, task: Task, batches: Iterable[Any], device: torch.device,
             autocast: Callable[[], Any], stopping: Callable[[], bool]) -> Sums | None:
    """The loss and metric sums of ``model`` over ``batches``, in eval mode without gradients;
    the model is back in train mode and every RNG restored afterwards, so evaluating never
    changes what training does next. None when ``stopping()`` turns true before a batch."""
    rng = capture_rng()
    model.eval()
    sums: Sums = {}
    try:
        with torch.no_grad():
            for batch in batches:
                if stopping():
                    return None
                batch = to_device(batch, device)
                n = float(count_samples(batch))
                with autocast():
                    output = model(task.inputs(batch))
                    loss = task.loss(output, batch)
                add_sums(sums, {"loss": (loss.item() * n, n), **task.metrics(output, batch)})
    finally:
        model.train()
        restore_rng(rng)
    return sums

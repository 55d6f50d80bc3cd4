"""ToDevice: moves each batch to the training device and runs batched transforms there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchdata.nodes import BaseNode


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


class ToDevice(BaseNode):
    """Moves each batch to ``device`` (non-blocking from pinned memory) and applies
    ``transform`` there, e.g. a batched resample or mel spectrogram on the GPU."""

    def __init__(self, source: BaseNode, device: str | torch.device,
                 transform: Callable[[Any], Any] | None = None):
        super().__init__()
        self.source, self.device, self.transform = source, torch.device(device), transform

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state else None)

    def next(self) -> Any:
        batch = to_device(next(self.source), self.device)
        return self.transform(batch) if self.transform else batch

    def get_state(self) -> dict:
        return {"source": self.source.state_dict()}

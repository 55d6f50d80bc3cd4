"""Collation: lists of sample dicts into batch dicts.

Tensors of equal shape are stacked. With ``variable=True`` the ``audio`` field (or another
``length_key``) is right-padded to the longest and the batch carries ``lengths`` and an
``attention_mask`` (True on real frames). Numbers become tensors; strings and anything else
(ids, paths, metadata, numbers with gaps) stay lists, so a batch keeps its labels and extra columns.
Tensors that cannot be stacked raise a :class:`~flows.errors.StageError` (stage ``collate``) naming
a sample of each shape and what to add (``.downmix()`` for mixed channel counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch

from flows.errors import StageError


@dataclass(frozen=True)
class Collate:
    """Turn a list of items into one batch (see the module docstring)."""

    variable: bool = False
    length_key: str = "audio"
    pad_value: float = 0.0

    def __call__(self, items: Sequence[Any]) -> Any:
        first = items[0]
        if isinstance(first, torch.Tensor):
            return self._tensors("item", list(items), items)
        if not isinstance(first, dict):
            return list(items)
        batch: dict[str, Any] = {}
        for key in first:
            values = [item[key] for item in items]
            if isinstance(values[0], torch.Tensor):
                if self.variable and key == self.length_key:
                    batch.update(self._padded(values, items))
                else:
                    batch[key] = self._tensors(key, values, items)
            elif all(isinstance(v, (Number, bool)) for v in values):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        return batch

    def _tensors(self, key: str, values: list[torch.Tensor], items: Sequence[Any]) -> torch.Tensor:
        _check_shapes(key, values, items, padded=False)
        return torch.stack(values)

    def _padded(self, values: list[torch.Tensor], items: Sequence[Any]) -> dict[str, torch.Tensor]:
        _check_shapes(self.length_key, values, items, padded=True)
        lengths = torch.tensor([v.shape[-1] for v in values])
        longest = int(lengths.max())
        padded = torch.stack(
            [torch.nn.functional.pad(v, (0, longest - v.shape[-1]), value=self.pad_value) for v in values]
        )
        mask = torch.arange(longest)[None, :] < lengths[:, None]
        return {self.length_key: padded, "lengths": lengths, "attention_mask": mask}


def _check_shapes(key: str, values: list[torch.Tensor], items: Sequence[Any], padded: bool) -> None:
    """Raise a :class:`StageError` naming a sample of each shape, and what to add, when the
    tensors of field ``key`` cannot be stacked (``padded``: their last dimension may differ)."""
    shapes = [tuple(v.shape) for v in values]
    if padded:
        kept = {s[:-1] for s in shapes}
        if len(kept) == 1 and all(shapes):
            return
    elif len(set(shapes)) == 1:
        return
    examples: dict[tuple[int, ...], tuple[str, tuple[int, ...]]] = {}  # one sample per kind
    for i, (shape, item) in enumerate(zip(shapes, items, strict=True)):
        examples.setdefault(shape[:-1] if padded else shape, (_name(item, i), shape))
    listed = ", ".join(f"{name} {list(shape)}" for name, shape in list(examples.values())[:4])
    same_rank = len({len(s) for s in shapes}) == 1
    if same_rank and len(shapes[0]) >= 2 and len({s[-2] for s in shapes}) > 1:
        advice = "channel counts differ: add .downmix() before batching"
    elif same_rank and len({s[:-1] for s in shapes}) == 1:
        advice = ("lengths differ: pad or crop to a fixed length (.pad(n) / .crop(n)) or batch with "
                  "variable=True")
    else:
        advice = "make them equal with a stage before batching"
    raise StageError(f"cannot batch field {key!r}: shapes differ ({listed}); {advice}",
                     stage="collate", sample=next(iter(examples.values()))[0])


def _name(item: Any, index: int) -> str:
    """How a collate error names a sample: its path, else its key, else its place in the batch."""
    if isinstance(item, dict):
        for field in ("path", "key"):
            if isinstance(item.get(field), str):
                return item[field]
    return f"item {index}"
